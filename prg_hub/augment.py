"""Training augmentations of the PRG recipes, on PIL images, with an explicit random generator.

The official PRG finetuning recipe (built on timm and torchvision) is, at 32 px:

    RandomCrop(32, padding=4) → RandomHorizontalFlip → RandAugment("rand-m9-mstd0.5-inc1") → normalise
    → RandomErasing(p=0.25)

torchvision cannot be installed beside this project's torch build, and timm depends on it, so the operations are
written here with PIL. Every operation draws from the `numpy.random.Generator` it is given; the data pipeline
seeds one per (seed, epoch, sample index), which makes augmentation independent of the number of processes,
the data-loader workers and the resume point.

Recipes (`build_augmentation`):

| name          | operations                                              |
|---------------|---------------------------------------------------------|
| `none`        | none                                                    |
| `flip`        | horizontal flip (p = 0.5): flow-matching pretraining    |
| `crop_flip`   | random crop with zero padding of size/8 (4 at 32 px), flip |
| `randaugment` | `crop_flip`, then RandAugment: 2 operations per image   |

RandAugment follows timm's "rand-m9-mstd0.5-inc1": 2 operations drawn uniformly from 15, each applied with
probability 0.5, at magnitude m ~ N(9, 0.5²) clipped to [0, 10] on a scale where 10 is the strongest; signed
operations (rotation, shear, translation, enhancement) take a random sign; "inc" means every operation gets
stronger as m grows. Timm's colour jitter is inactive whenever RandAugment is on, so it is not offered.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

AUGMENTATIONS: tuple[str, ...] = ("none", "flip", "crop_flip", "randaugment")
FILL = (128, 128, 128)  # grey fill of pixels that geometric operations bring in


def random_crop_with_padding(image: Image.Image, padding: int, rng: np.random.Generator) -> Image.Image:
    """Pad every side with `padding` black pixels, then crop back to the original size at a uniform offset."""
    if padding <= 0:
        return image
    width, height = image.size
    padded = Image.new(image.mode, (width + 2 * padding, height + 2 * padding))
    padded.paste(image, (padding, padding))
    left, top = (int(v) for v in rng.integers(0, 2 * padding + 1, size=2))
    return padded.crop((left, top, left + width, top + height))


def random_horizontal_flip(image: Image.Image, rng: np.random.Generator, probability: float = 0.5) -> Image.Image:
    """Mirror left-right with the given probability."""
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < probability else image


def _signed(value: float, rng: np.random.Generator) -> float:
    return value if rng.random() < 0.5 else -value


def _solarize_add(image: Image.Image, amount: int) -> Image.Image:
    """Add `amount` to every channel value below 128 (clipped to 255)."""
    table = [min(255, v + amount) if v < 128 else v for v in range(256)] * len(image.getbands())
    return image.point(table)


def _affine(image: Image.Image, matrix: tuple[float, ...]) -> Image.Image:
    return image.transform(
        image.size, Image.Transform.AFFINE, matrix, resample=Image.Resampling.BILINEAR, fillcolor=FILL
    )


# Each operation maps (image, strength f ∈ [0, 1], rng) to an image; f = magnitude / 10.
RANDAUGMENT_OPS = {
    "AutoContrast": lambda im, f, rng: ImageOps.autocontrast(im),
    "Equalize": lambda im, f, rng: ImageOps.equalize(im),
    "Invert": lambda im, f, rng: ImageOps.invert(im),
    "Rotate": lambda im, f, rng: im.rotate(_signed(30.0 * f, rng), resample=Image.Resampling.BILINEAR, fillcolor=FILL),
    "PosterizeIncreasing": lambda im, f, rng: ImageOps.posterize(im, max(1, 4 - int(4 * f))),
    "SolarizeIncreasing": lambda im, f, rng: ImageOps.solarize(im, 256 - int(256 * f)),
    "SolarizeAdd": lambda im, f, rng: _solarize_add(im, int(110 * f)),
    "ColorIncreasing": lambda im, f, rng: ImageEnhance.Color(im).enhance(1.0 + _signed(0.9 * f, rng)),
    "ContrastIncreasing": lambda im, f, rng: ImageEnhance.Contrast(im).enhance(1.0 + _signed(0.9 * f, rng)),
    "BrightnessIncreasing": lambda im, f, rng: ImageEnhance.Brightness(im).enhance(1.0 + _signed(0.9 * f, rng)),
    "SharpnessIncreasing": lambda im, f, rng: ImageEnhance.Sharpness(im).enhance(1.0 + _signed(0.9 * f, rng)),
    "ShearX": lambda im, f, rng: _affine(im, (1, _signed(0.3 * f, rng), 0, 0, 1, 0)),
    "ShearY": lambda im, f, rng: _affine(im, (1, 0, 0, _signed(0.3 * f, rng), 1, 0)),
    "TranslateXRel": lambda im, f, rng: _affine(im, (1, 0, _signed(0.45 * f, rng) * im.size[0], 0, 1, 0)),
    "TranslateYRel": lambda im, f, rng: _affine(im, (1, 0, 0, 0, 1, _signed(0.45 * f, rng) * im.size[1])),
}


def rand_augment(
    image: Image.Image,
    rng: np.random.Generator,
    num_ops: int = 2,
    magnitude: float = 9.0,
    magnitude_std: float = 0.5,
    probability: float = 0.5,
) -> Image.Image:
    """timm-style RandAugment on an RGB image; see the module docstring for the operations and the magnitude."""
    names = list(RANDAUGMENT_OPS)
    for name_index in rng.choice(len(names), size=num_ops, replace=True):
        if rng.random() >= probability:
            continue
        level = magnitude + magnitude_std * rng.standard_normal() if magnitude_std > 0 else magnitude
        strength = min(max(level, 0.0), 10.0) / 10.0
        image = RANDAUGMENT_OPS[names[name_index]](image, strength, rng)
    return image


def random_erasing(pixel_values: torch.Tensor, rng: np.random.Generator, probability: float) -> torch.Tensor:
    """With `probability`, replace one rectangle of a normalised image (C, H, W) by N(0, 1) noise.

    The rectangle covers a fraction of the area drawn from U[0.02, 1/3] with aspect ratio log-uniform in
    [0.3, 1/0.3], as timm's RandomErasing in "pixel" mode (10 tries to fit it in the image).
    """
    if probability <= 0 or rng.random() >= probability:
        return pixel_values
    channels, height, width = pixel_values.shape
    for _ in range(10):
        area = rng.uniform(0.02, 1 / 3) * height * width
        aspect = math.exp(rng.uniform(math.log(0.3), math.log(1 / 0.3)))
        box_h, box_w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < box_h < height and 0 < box_w < width:
            top, left = int(rng.integers(0, height - box_h + 1)), int(rng.integers(0, width - box_w + 1))
            noise = torch.from_numpy(rng.standard_normal((channels, box_h, box_w))).to(pixel_values.dtype)
            erased = pixel_values.clone()
            erased[:, top : top + box_h, left : left + box_w] = noise
            return erased
    return pixel_values


class TrainAugmentation:
    """A training recipe: PIL operations before normalisation, random erasing after it.

    Args:
        name: one of `AUGMENTATIONS`.
        image_size: side of the (square) training images; the crop padding is image_size // 8.
        random_erasing: probability of random erasing on the normalised tensor (the official recipe uses 0.25).
        randaugment_magnitude, randaugment_num_ops: RandAugment's m and n (9 and 2 in the official recipe).
    """

    def __init__(
        self,
        name: str,
        image_size: int,
        random_erasing: float = 0.0,
        randaugment_magnitude: float = 9.0,
        randaugment_num_ops: int = 2,
    ):
        if name not in AUGMENTATIONS:
            raise ValueError(f"Unknown augmentation {name!r}: allowed augmentations are {list(AUGMENTATIONS)}.")
        if not 0 <= random_erasing <= 1:
            raise ValueError(f"random_erasing is a probability in [0, 1], got {random_erasing}.")
        self.name = name
        self.crop_padding = image_size // 8 if name in ("crop_flip", "randaugment") else 0
        self.flip = name != "none"
        self.randaugment = name == "randaugment"
        self.random_erasing = random_erasing
        self.randaugment_magnitude = randaugment_magnitude
        self.randaugment_num_ops = randaugment_num_ops

    @property
    def is_identity(self) -> bool:
        return self.name == "none" and self.random_erasing == 0

    def augment_image(self, image: Image.Image, rng: np.random.Generator) -> Image.Image:
        """Crop, flip and RandAugment an RGB image already resized to the training size."""
        image = random_crop_with_padding(image, self.crop_padding, rng)
        if self.flip:
            image = random_horizontal_flip(image, rng)
        if self.randaugment:
            image = rand_augment(image, rng, self.randaugment_num_ops, self.randaugment_magnitude)
        return image

    def augment_tensor(self, pixel_values: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """Random erasing on normalised pixel values (C, H, W)."""
        return random_erasing(pixel_values, rng, self.random_erasing)
