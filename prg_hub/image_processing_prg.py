"""`PRGImageProcessor`: any PIL image → RGB → resized → pixel values in [-1, 1], shape (B, 3, H, W).

The model never guesses about its input: this processor owns the RGB conversion, the resizing and the scaling
x ↦ (x/255 − 0.5)/0.5 = x/127.5 − 1. PIL images go through `prg_hub.image_conversion.to_rgb`, the rule shared
by every entry point (16-bit images keep their range, alpha is composited on white, float images in [0, 1] are
scaled to 8 bits); image paths and URLs are read with `prg_hub.image_files.open_image`, keeping their mode
until `to_rgb` runs. NumPy arrays and torch tensors go through transformers' PIL backend unchanged. The
conversion happens in the public `preprocess`, before the backend sees the images: the backend's own
`convert_to_rgb` hook has changed signature between transformers releases.
"""

from __future__ import annotations

from PIL import Image
from transformers.image_processing_backends import PilBackend
from transformers.image_utils import PILImageResampling

from .image_conversion import to_rgb
from .image_files import open_image


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

    def preprocess(self, images, *args, **kwargs):
        """Open the paths among `images` and, unless `do_convert_rgb` is False, convert the PIL images with
        `to_rgb`; then resize, rescale and normalise them as transformers' PIL backend does."""
        do_convert_rgb = kwargs.get("do_convert_rgb")
        do_convert_rgb = self.do_convert_rgb if do_convert_rgb is None else do_convert_rgb
        return super().preprocess(opened_and_converted(images, do_convert_rgb), *args, **kwargs)


def opened_and_converted(images, convert: bool):
    """`images` (an image, a path or nested lists of them) with the paths opened and, if `convert`, every PIL
    image converted to RGB; arrays and tensors are left as they are."""
    if isinstance(images, (list, tuple)):
        return [opened_and_converted(image, convert) for image in images]
    if isinstance(images, str):
        images = open_image(images)
    return to_rgb(images) if convert and isinstance(images, Image.Image) else images
