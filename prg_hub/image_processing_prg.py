"""`PRGImageProcessor`: any PIL image → RGB → resized → pixel values in [-1, 1], shape (B, 3, H, W).

The model never guesses about its input: this processor owns the RGB conversion, the resizing and the scaling
x ↦ (x/255 − 0.5)/0.5 = x/127.5 − 1. Grayscale (L, I;16), palette (P), alpha (LA, RGBA; composited on white) and
CMYK images all become RGB; 16-bit images are scaled to 8 bits first (value/257) so they keep their full range.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from transformers.image_processing_backends import PilBackend
from transformers.image_utils import PILImageResampling

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class PRGImageProcessor(PilBackend):
    """Image processor of PRG checkpoints (PIL backend; saved as `preprocessor_config.json`).

    Defaults: convert to RGB, bilinear resize to 32×32, rescale by 1/255, normalise with mean = std = 0.5.
    """

    model_input_names = ["pixel_values"]
    resample = PILImageResampling.BILINEAR
    size = {"height": 32, "width": 32}
    image_mean = [0.5, 0.5, 0.5]
    image_std = [0.5, 0.5, 0.5]
    do_resize = True
    do_rescale = True
    rescale_factor = 1 / 255
    do_normalize = True
    do_convert_rgb = True

    @classmethod
    def for_image_size(cls, image_size: int) -> "PRGImageProcessor":
        """The processor for a model that takes image_size × image_size images (`PRGConfig.image_size`)."""
        return cls(size={"height": image_size, "width": image_size})

    def convert_to_rgb(self, image, input_data_format=None):
        """RGB conversion that keeps the range of 16-bit grayscale images (PIL would clip them at 255)."""
        if isinstance(image, Image.Image) and image.mode in SIXTEEN_BIT_MODES:
            eight_bit = np.clip(np.round(np.asarray(image, dtype=np.float64) / 257.0), 0, 255).astype(np.uint8)
            image = Image.fromarray(eight_bit)  # uint8 (H, W) -> mode "L"
        return super().convert_to_rgb(image, input_data_format=input_data_format)
