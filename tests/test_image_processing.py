"""The PRG image processor in both backends: every PIL mode becomes RGB in [-1, 1] at the configured size, the
torchvision backend (`PRGImageProcessor`) takes batched tensors, both backends agree within `BACKEND_TOLERANCE`,
save and reload through `AutoImageProcessor`, and without torchvision everything falls back to the PIL backend
(`PRGImageProcessorPil`).

The torchvision backend's tests are skipped where torchvision is not installed (it is an optional dependency:
`pip install "prg_hub[vision]"`).
"""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from test_image_conversion import CORPUS
from transformers.models.auto.image_processing_auto import AutoImageProcessor  # see prg_hub/__init__.py
from transformers.utils import is_torchvision_available

import prg_hub
from prg_hub.image_processing_prg import (
    PRGImageProcessor,
    PRGImageProcessorPil,
    default_image_processor,
    default_image_processor_class,
)

# The two backends' pixel values for the same image differ by at most 1 level of [0, 255], i.e. 2/255 on the
# [-1, 1] scale, plus float32 rounding: resizing rounds differently in PIL's bilinear filter and in torchvision's
# antialiased bilinear on uint8. Without resizing they agree to float rounding (1e-6).
LEVEL = 2 / 255  # one level of [0, 255] on the [-1, 1] scale
BACKEND_TOLERANCE = LEVEL + 1e-6
FLOAT_TOLERANCE = 1e-6

needs_torchvision = pytest.mark.skipif(
    not is_torchvision_available(),
    reason='torchvision is not installed: the torchvision backend (PRGImageProcessor) is tested only with it '
           '(pip install "prg_hub[vision]")',
)
BACKENDS = [
    pytest.param(PRGImageProcessorPil, id="pil"),
    pytest.param(PRGImageProcessor, id="torchvision", marks=needs_torchvision),
]


def gradient_rgb(width=40, height=24):
    row = np.linspace(0, 255, width, dtype=np.float64)
    array = np.stack([np.tile(row, (height, 1)), np.tile(row, (height, 1)), np.tile(row / 2, (height, 1))], -1)
    return Image.fromarray(array.round().astype(np.uint8), "RGB")


def noise_rgb(width, height, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def pixel_values(processor, images, **kwargs) -> np.ndarray:
    return processor(images, return_tensors="pt", **kwargs)["pixel_values"].numpy()


@pytest.mark.parametrize("processor_class", BACKENDS)
@pytest.mark.parametrize("mode", ["RGB", "L", "LA", "P", "RGBA", "CMYK", "I;16"])
def test_every_mode_becomes_rgb_in_minus_one_to_one(processor_class, mode):
    image = gradient_rgb()
    if mode == "I;16":
        image = Image.fromarray(np.asarray(image.convert("L"), dtype=np.uint16) * 257)
        assert image.mode == "I;16"
    else:
        image = image.convert(mode)
    values = pixel_values(processor_class(), image)
    assert values.shape == (1, 3, 32, 32) and values.dtype == np.float32
    assert values.min() >= -1.0 and values.max() <= 1.0
    assert values.max() - values.min() > 1.5  # the gradient's contrast survives the conversion


@pytest.mark.parametrize("processor_class", BACKENDS)
def test_sixteen_bit_grayscale_keeps_its_full_range(processor_class):
    image = Image.fromarray(np.array([[0, 65535], [32896, 65535]], dtype=np.uint16))
    assert image.mode == "I;16"
    values = pixel_values(processor_class(do_resize=False), image)[0]
    assert values.shape == (3, 2, 2)
    np.testing.assert_allclose(values[:, 0, 0], -1.0, atol=FLOAT_TOLERANCE)
    np.testing.assert_allclose(values[:, 0, 1], 1.0, atol=FLOAT_TOLERANCE)
    np.testing.assert_allclose(values[:, 1, 0], 128 / 127.5 - 1, atol=FLOAT_TOLERANCE)


@pytest.mark.parametrize("processor_class", BACKENDS)
def test_scaling_is_x_over_127_5_minus_one(processor_class):
    image = Image.fromarray(np.array([[[0, 255, 51]]], dtype=np.uint8), "RGB")
    values = pixel_values(processor_class(do_resize=False), image)[0, :, 0, 0]
    np.testing.assert_allclose(values, [-1.0, 1.0, 51 / 127.5 - 1], atol=FLOAT_TOLERANCE)


@pytest.mark.parametrize("processor_class", BACKENDS)
def test_transparent_pixels_are_composited_on_white(processor_class):
    image = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    np.testing.assert_allclose(pixel_values(processor_class(do_resize=False), image), 1.0, atol=FLOAT_TOLERANCE)


@pytest.mark.parametrize("processor_class", BACKENDS)
def test_for_image_size_sets_a_square_size(processor_class):
    processor = processor_class.for_image_size(48)
    assert isinstance(processor, processor_class) and dict(processor.size) == {"height": 48, "width": 48}
    assert pixel_values(processor, gradient_rgb()).shape == (1, 3, 48, 48)


AGREEMENT_IMAGES = {
    **{f"corpus {name}": image for name, (image, _, _) in CORPUS.items()},  # 40×24, every PIL mode
    "noise 97×61": noise_rgb(97, 61),
    "noise 300×200": noise_rgb(300, 200, seed=1),
    "noise 13×7": noise_rgb(13, 7, seed=2),
}


@needs_torchvision
@pytest.mark.parametrize("image_size", [None, 16, 32, 33, 64])
def test_both_backends_give_the_same_pixel_values(image_size):
    """Within one level of [0, 255] per value, and on average well under half a level (rounding only)."""
    if image_size is None:
        pil, torchvision = PRGImageProcessorPil(do_resize=False), PRGImageProcessor(do_resize=False)
    else:
        pil, torchvision = PRGImageProcessorPil.for_image_size(image_size), PRGImageProcessor.for_image_size(image_size)
    for name, image in AGREEMENT_IMAGES.items():
        difference = np.abs(pixel_values(pil, image) - pixel_values(torchvision, image))
        assert difference.max() <= (FLOAT_TOLERANCE if image_size is None else BACKEND_TOLERANCE), name
        assert difference.mean() < LEVEL / 2, name


@needs_torchvision
def test_torchvision_backend_takes_batched_tensors():
    images = [noise_rgb(40, 24, seed) for seed in range(4)]
    batch = torch.from_numpy(np.stack([np.asarray(image) for image in images])).permute(0, 3, 1, 2)  # (4, 3, 24, 40)
    processor = PRGImageProcessor()
    from_pil = processor(images, return_tensors="pt")["pixel_values"]
    from_uint8 = processor(batch, return_tensors="pt")["pixel_values"]
    assert from_uint8.shape == (4, 3, 32, 32) and from_uint8.dtype == torch.float32
    assert torch.equal(from_uint8, from_pil)
    from_float = processor(batch.float(), return_tensors="pt")["pixel_values"]  # [0, 255]: resized unrounded
    assert (from_float - from_uint8).abs().max() <= BACKEND_TOLERANCE
    from_unit_float = processor(batch.float() / 255, do_rescale=False, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(from_unit_float, from_float, atol=1e-5, rtol=0)
    by_pil_backend = torch.from_numpy(pixel_values(PRGImageProcessorPil(), images))
    assert (from_uint8 - by_pil_backend).abs().max() <= BACKEND_TOLERANCE


@needs_torchvision
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_torchvision_backend_processes_a_gpu_batch_on_the_gpu():
    batch = torch.randint(0, 256, (8, 3, 64, 48), dtype=torch.uint8)
    processor = PRGImageProcessor()
    on_gpu = processor(batch.cuda(), return_tensors="pt")["pixel_values"]
    assert on_gpu.device.type == "cuda" and on_gpu.shape == (8, 3, 32, 32)
    on_cpu = processor(batch, return_tensors="pt")["pixel_values"]
    assert (on_gpu.cpu() - on_cpu).abs().max() <= BACKEND_TOLERANCE


@pytest.mark.parametrize(("processor_class", "backend"), [
    pytest.param(PRGImageProcessorPil, "pil", id="pil"),
    pytest.param(PRGImageProcessor, "torchvision", id="torchvision", marks=needs_torchvision),
])
def test_saves_and_reloads_through_auto_image_processor(tmp_path, processor_class, backend):
    processor = processor_class(size={"height": 64, "width": 64})
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["image_processor_type"] == "PRGImageProcessor"  # the same file whichever backend saved it
    reloaded = AutoImageProcessor.from_pretrained(tmp_path, backend=backend)
    assert type(reloaded) is processor_class and dict(reloaded.size) == {"height": 64, "width": 64}
    assert type(processor_class.from_pretrained(tmp_path)) is processor_class
    assert type(AutoImageProcessor.from_pretrained(tmp_path)) is default_image_processor_class()
    image = gradient_rgb()
    np.testing.assert_array_equal(pixel_values(processor, image), pixel_values(reloaded, image))


def test_the_shipped_checkpoint_loads_with_either_backend():
    assert type(AutoImageProcessor.from_pretrained(prg_hub.DEFAULT_MODEL)) is default_image_processor_class()
    pil = AutoImageProcessor.from_pretrained(prg_hub.DEFAULT_MODEL, backend="pil")
    assert type(pil) is PRGImageProcessorPil and dict(pil.size) == {"height": 32, "width": 32}
    if is_torchvision_available():
        torchvision = AutoImageProcessor.from_pretrained(prg_hub.DEFAULT_MODEL, backend="torchvision")
        assert type(torchvision) is PRGImageProcessor and dict(torchvision.size) == {"height": 32, "width": 32}
    else:
        with pytest.raises(ImportError, match=r"prg_hub\[vision\]"):
            AutoImageProcessor.from_pretrained(prg_hub.DEFAULT_MODEL, backend="torchvision")


def test_default_processor_is_the_torchvision_backend_when_torchvision_is_available():
    expected = PRGImageProcessor if is_torchvision_available() else PRGImageProcessorPil
    assert default_image_processor_class() is expected and prg_hub.PRGImageProcessor is expected
    processor = default_image_processor(24)
    assert type(processor) is expected and dict(processor.size) == {"height": 24, "width": 24}


FALLBACK_CHECK = textwrap.dedent("""
    import sys
    sys.modules["torchvision"] = None  # `import torchvision` fails and transformers finds no torchvision

    import numpy as np
    from PIL import Image
    from transformers.models.auto.image_processing_auto import AutoImageProcessor

    import prg_hub
    from prg_hub.image_processing_prg import PRGImageProcessor, PRGImageProcessorPil, default_image_processor

    processor = default_image_processor(16)
    assert type(processor) is PRGImageProcessorPil, type(processor)
    assert prg_hub.PRGImageProcessor is PRGImageProcessorPil
    assert type(AutoImageProcessor.from_pretrained(prg_hub.DEFAULT_MODEL)) is PRGImageProcessorPil
    image = Image.fromarray(np.zeros((20, 30), dtype=np.uint16))
    assert processor(image, return_tensors="pt")["pixel_values"].shape == (1, 3, 16, 16)
    try:
        PRGImageProcessor()
    except ImportError as error:
        assert "prg_hub[vision]" in str(error), error
    else:
        raise AssertionError("PRGImageProcessor was built without torchvision")
    print("fell back to", type(processor).__name__)
""")


def test_without_torchvision_everything_falls_back_to_the_pil_backend():
    result = subprocess.run([sys.executable, "-c", FALLBACK_CHECK], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "fell back to PRGImageProcessorPil"
