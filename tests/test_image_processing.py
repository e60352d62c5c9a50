"""PRGImageProcessor: every PIL mode becomes RGB in [-1, 1] at the configured size, and it saves and reloads."""

import numpy as np
import pytest
from PIL import Image

from prg_hub import PRGImageProcessor


def gradient_rgb(width=40, height=24):
    row = np.linspace(0, 255, width, dtype=np.float64)
    array = np.stack([np.tile(row, (height, 1)), np.tile(row, (height, 1)), np.tile(row / 2, (height, 1))], -1)
    return Image.fromarray(array.round().astype(np.uint8), "RGB")


@pytest.mark.parametrize("mode", ["RGB", "L", "LA", "P", "RGBA", "CMYK", "I;16"])
def test_every_mode_becomes_rgb_in_minus_one_to_one(mode):
    image = gradient_rgb()
    if mode == "I;16":
        image = Image.fromarray(np.asarray(image.convert("L"), dtype=np.uint16) * 257)
        assert image.mode == "I;16"
    else:
        image = image.convert(mode)
    pixel_values = PRGImageProcessor()(image, return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (1, 3, 32, 32)
    assert pixel_values.min() >= -1.0 and pixel_values.max() <= 1.0
    assert pixel_values.max() - pixel_values.min() > 1.5  # the gradient's contrast survives the conversion


def test_sixteen_bit_grayscale_keeps_its_full_range():
    values = np.array([[0, 65535], [32896, 65535]], dtype=np.uint16)
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    processor = PRGImageProcessor(do_resize=False)
    pixel_values = processor(image, return_tensors="pt")["pixel_values"][0]
    assert pixel_values.shape == (3, 2, 2)
    np.testing.assert_allclose(pixel_values[:, 0, 0].numpy(), -1.0, atol=1e-6)
    np.testing.assert_allclose(pixel_values[:, 0, 1].numpy(), 1.0, atol=1e-6)
    np.testing.assert_allclose(pixel_values[:, 1, 0].numpy(), 128 / 127.5 - 1, atol=1e-6)


def test_scaling_is_x_over_127_5_minus_one():
    image = Image.fromarray(np.array([[[0, 255, 51]]], dtype=np.uint8), "RGB")
    pixel_values = PRGImageProcessor(do_resize=False)(image, return_tensors="pt")["pixel_values"][0, :, 0, 0]
    np.testing.assert_allclose(pixel_values.numpy(), [-1.0, 1.0, 51 / 127.5 - 1], atol=1e-6)


def test_transparent_pixels_are_composited_on_white():
    image = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    pixel_values = PRGImageProcessor(do_resize=False)(image, return_tensors="pt")["pixel_values"]
    np.testing.assert_allclose(pixel_values.numpy(), 1.0, atol=1e-6)


def test_saves_as_preprocessor_config_and_reloads(tmp_path):
    processor = PRGImageProcessor(size={"height": 64, "width": 64})
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "preprocessor_config.json").is_file()
    reloaded = PRGImageProcessor.from_pretrained(tmp_path)
    assert reloaded.size == {"height": 64, "width": 64}
    image = gradient_rgb()
    np.testing.assert_array_equal(
        processor(image, return_tensors="np")["pixel_values"], reloaded(image, return_tensors="np")["pixel_values"]
    )
