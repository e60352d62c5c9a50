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
    install_requires=[
        "torch>=2.4",
        "diffusers>=0.35",
        "transformers>=5.0",
        "huggingface_hub>=1.0",
        "safetensors>=0.4",
        "torchdiffeq>=0.2.4",
        "scipy>=1.10",
        "numpy",
        "pillow",
        "jinja2",
        "tqdm",
    ],
    entry_points={"console_scripts": ["prg-hub=prg_hub.cli:main"]},
    extras_require={
        "train": ["accelerate>=1.0", "datasets>=3.0", "pyyaml"],
        # setuptools: the tests build a wheel (without build isolation) to check what it installs
        "test": ["pytest>=8", "accelerate>=1.0", "datasets>=3.0", "pyyaml", "setuptools>=70.1"],
    },
)
