from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="prg_hub",
    version="0.1.0",
    description="Pretrained Reversible Generation (PRG): flow-matching models as image feature extractors and "
    "classifiers, for transformers, diffusers and the Hugging Face Hub.",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["prg_hub", "prg_hub.*"]),
    include_package_data=True,
    package_data={"prg_hub": ["templates/*", "pretrained/**/*"]},
    python_requires=">=3.10",
    # Lower bounds: the oldest releases the test suite passes on. .ci/floors.txt pins them and CI runs the suite
    # there as well as on the newest releases; torch>=2.11 is the oldest known to work, not tested in CI.
    # CONTRIBUTING.md ("Supported versions") says what breaks below each one.
    install_requires=[
        "torch>=2.11",
        "diffusers>=0.35.2",
        "transformers>=5.10.1",
        "huggingface_hub>=1.5",
        "safetensors>=0.4.3",
        "torchdiffeq>=0.2.5",
        "scipy>=1.10",
        "numpy",
        "pillow",
        "jinja2",
        "tqdm",
    ],
    entry_points={"console_scripts": ["prg-hub=prg_hub.cli:main"]},
    extras_require={
        # the training scripts; torchvision runs their batched augmentation (prg_hub/augment.py) on the device.
        # 0.26 pairs with torch 2.11, the oldest torch above; CI tests torchvision 0.29.1.
        "train": ["accelerate>=1.1", "datasets>=3.0", "pyyaml", "torchvision>=0.26"],
        # the torchvision backend of the image processor (PRGImageProcessor); without it, PRGImageProcessorPil
        "vision": ["torchvision"],
        # the web demo (`prg-hub demo`, app.py): gradio 6 takes the theme in launch()
        "demo": ["gradio>=6.0"],
        # setuptools: the tests build a wheel (without build isolation) to check what it installs; selenium drives
        # Chromium in the demo's browser test
        "test": ["pytest>=8", "accelerate>=1.1", "datasets>=3.0", "pyyaml", "setuptools>=70.1", "selenium>=4.11"],
    },
)
