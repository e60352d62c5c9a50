"""The PRG image processor in transformers' two backends: any image → RGB → resized → pixel values in [-1, 1],
shape (B, 3, H, W).

The model never guesses about its input: the processor owns the RGB conversion, the resizing and the scaling
x ↦ (x/255 − 0.5)/0.5 = x/127.5 − 1. As in transformers 5 (`ViTImageProcessor`, `ViTImageProcessorPil`), it
comes in two classes with the same settings, both saved as `preprocessor_config.json` with
`"image_processor_type": "PRGImageProcessor"` (transformers drops the `Pil` suffix):
* `PRGImageProcessor`, the torchvision backend (torchvision is optional: `pip install "prg_hub[vision]"`). It
  takes PIL images, arrays and tensors; a (B, C, H, W) tensor is resized as one batch on its device, so a
  training data path can process batches on the GPU.
* `PRGImageProcessorPil`, the PIL backend (Pillow and NumPy only): the same inputs, one image at a time, on
  the CPU.

`AutoImageProcessor.from_pretrained(folder)` gives `PRGImageProcessor` when torchvision is available and
`PRGImageProcessorPil` otherwise; `backend="pil"` or `backend="torchvision"` chooses. `default_image_processor`
and `default_image_processor_class` choose the same way for code that makes a processor itself; the package's
own code uses them, so it runs with or without torchvision. The package's top-level name
`prg_hub.PRGImageProcessor` is likewise the PIL class without torchvision, as `transformers.ViTImageProcessor` is.

PIL images go through `prg_hub.image_conversion.to_rgb`, the rule shared by every entry point (16-bit images
keep their range, alpha is composited on white, float images in [0, 1] are scaled to 8 bits); image paths and
URLs are read with `prg_hub.image_files.open_image`, keeping their mode until `to_rgb` runs. The conversion
happens in the public `preprocess`, before the backend sees the images: the backends' own `convert_to_rgb`
hook has changed between transformers releases. Arrays and tensors go to the backend unchanged: with the
defaults they hold values in [0, 255] (uint8 or float); pass `do_rescale=False` for floats already in [0, 1].

The two backends agree to within 1 in [0, 255] units (2/255 on the [-1, 1] scale) for the same images: exactly,
up to float rounding, without resizing; when resizing, PIL's bilinear filter and torchvision's antialiased
bilinear on uint8 round some pixels differently.
"""

from __future__ import annotations

from PIL import Image
from transformers.image_processing_backends import PilBackend, TorchvisionBackend
from transformers.image_utils import PILImageResampling
from transformers.utils import is_torchvision_available

from .image_conversion import to_rgb
from .image_files import open_image
from .remote_code import IMAGE_PROCESSOR_AUTO_MAP


class PRGImageProcessing:
    """What both PRG image processors share: the defaults (convert to RGB, bilinear resize to 32×32, rescale by
    1/255, normalise with mean = std = 0.5), `for_image_size`, and the conversion of PIL images in `preprocess`.
    Put before the backend class among the bases."""

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
    def for_image_size(cls, image_size: int) -> PRGImageProcessing:
        """The processor for a model that takes image_size × image_size images (`PRGConfig.image_size`)."""
        return cls(size={"height": image_size, "width": image_size})

    def to_dict(self) -> dict:
        """The settings as saved, with the `auto_map` of transformers' remote code (`prg_hub.remote_code`)."""
        return {**super().to_dict(), "auto_map": IMAGE_PROCESSOR_AUTO_MAP}

    def preprocess(self, images, *args, **kwargs):
        """Open the paths among `images` and, unless `do_convert_rgb` is False, convert the PIL images with
        `to_rgb`; then resize, rescale and normalise them as the backend does."""
        do_convert_rgb = kwargs.get("do_convert_rgb")
        do_convert_rgb = self.do_convert_rgb if do_convert_rgb is None else do_convert_rgb
        return super().preprocess(opened_and_converted(images, do_convert_rgb), *args, **kwargs)


class PRGImageProcessor(PRGImageProcessing, TorchvisionBackend):
    """Image processor of PRG checkpoints, torchvision backend (saved as `preprocessor_config.json`).

    `processor(images, return_tensors="pt")["pixel_values"]` is a float32 tensor (B, 3, H, W) in [-1, 1] on the
    images' device (or on `device=...`). `images`: PIL images, paths, arrays or tensors, one or a list, or a
    batch tensor (B, C, H, W), uint8 or float in [0, 255]. Requires torchvision.
    """

    def __init__(self, **kwargs):
        if not is_torchvision_available():
            raise ImportError(
                "PRGImageProcessor is the torchvision backend and torchvision is not installed: install it with "
                '`pip install "prg_hub[vision]"`, or use PRGImageProcessorPil or '
                "prg_hub.default_image_processor(image_size), which pick the PIL backend without torchvision."
            )
        super().__init__(**kwargs)


class PRGImageProcessorPil(PRGImageProcessing, PilBackend):
    """Image processor of PRG checkpoints, PIL backend (saved as `preprocessor_config.json`).

    `processor(images, return_tensors="pt")["pixel_values"]` is a float32 tensor (B, 3, H, W) in [-1, 1].
    `images`: PIL images, paths, arrays or tensors, one or a list, each (H, W, C) or (C, H, W).
    """


def default_image_processor_class() -> type[PRGImageProcessor] | type[PRGImageProcessorPil]:
    """`PRGImageProcessor` when torchvision is available, else `PRGImageProcessorPil`: the class that
    `AutoImageProcessor.from_pretrained` picks for a PRG checkpoint without a `backend` argument."""
    return PRGImageProcessor if is_torchvision_available() else PRGImageProcessorPil


def default_image_processor(image_size: int) -> PRGImageProcessor | PRGImageProcessorPil:
    """The processor, of `default_image_processor_class()`, for image_size × image_size models."""
    return default_image_processor_class().for_image_size(image_size)


def opened_and_converted(images, convert: bool):
    """`images` (an image, a path or nested lists of them) with the paths opened and, if `convert`, every PIL
    image converted to RGB; arrays and tensors are left as they are."""
    if isinstance(images, (list, tuple)):
        return [opened_and_converted(image, convert) for image in images]
    if isinstance(images, str):
        images = open_image(images)
    return to_rgb(images) if convert and isinstance(images, Image.Image) else images
