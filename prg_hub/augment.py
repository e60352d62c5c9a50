"""Training augmentations of the PRG recipes, on whole batches of uint8 images, on the batch's device.

The official PRG finetuning recipe (built on timm and torchvision) is, at 32 px:

    RandomCrop(32, padding=4) → RandomHorizontalFlip → RandAugment("rand-m9-mstd0.5-inc1") → normalise
    → RandomErasing(p=0.25)

`TrainAugmentation` runs it on a batch of B images in one call, with parameters of each sample's own, drawn from
`prg_hub.keyed_random` with the key (seed, epoch, sample index): the same sample is augmented the same way on one
process or eight, after a resume, and whether its batch was made on the accelerator or streamed from disk
(`prg_hub.training_data`). Nothing is read back to the host.

Recipes:

| name          | operations                                                  |
|---------------|-------------------------------------------------------------|
| `none`        | none                                                        |
| `flip`        | horizontal flip (p = 0.5): flow-matching pretraining        |
| `crop_flip`   | random crop with zero padding of size/8 (4 at 32 px), flip  |
| `randaugment` | `crop_flip`, then RandAugment: 2 operations per image       |

RandAugment follows timm's "rand-m9-mstd0.5-inc1": 2 operations drawn uniformly from 15, each applied with
probability 0.5, at magnitude m ~ N(9, 0.5²) clipped to [0, 10]; the strength is f = m / 10. Signed operations
(rotation, shear, translation, enhancement) take a random sign s = ±1; "inc" means every operation grows with f:

| operation            | effect on a uint8 image v                                                     |
|----------------------|-------------------------------------------------------------------------------|
| AutoContrast         | each channel stretched to [0, 255]                                             |
| Equalize             | each channel's histogram equalised                                             |
| Invert               | 255 − v                                                                        |
| PosterizeIncreasing  | keep the top b = max(1, 4 − ⌊4f⌋) bits                                         |
| SolarizeIncreasing   | 255 − v where v ≥ 256 − ⌊256f⌋                                                 |
| SolarizeAdd          | min(v + ⌊110f⌋, 255) where v < 128                                              |
| ColorIncreasing      | blend(v, grey image, 1 + 0.9·s·f)                                              |
| ContrastIncreasing   | blend(v, the grey image's mean, 1 + 0.9·s·f)                                   |
| BrightnessIncreasing | blend(v, black, 1 + 0.9·s·f)                                                   |
| SharpnessIncreasing  | blend(v, the smoothed image, 1 + 0.9·s·f)                                      |
| Rotate               | s·30f degrees about the centre                                                 |
| ShearX, ShearY       | shear factor s·0.3f                                                            |
| TranslateXRel/YRel   | s·0.45f of the width / height                                                  |

blend(v, d, a) = clamp(a·v + (1 − a)·d, 0, 255), rounded. Geometric operations sample bilinearly and fill with
grey (128). Timm's colour jitter is inactive whenever RandAugment is on, so it is not offered.

The image operations are torchvision.transforms.v2's, applied to the whole batch. A v2 transform draws one set of
parameters per call, so per-sample parameters enter by selection (`torch.where` over each sample's choice) and by
per-sample factors in the blends; the per-sample crop is a gather of the padded batch, and the per-sample affine
warps one `grid_sample`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sized

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image

from .image_processing_prg import PRGImageProcessing
from .keyed_random import keyed_normal, keyed_uniform

AUGMENTATIONS: tuple[str, ...] = ("none", "flip", "crop_flip", "randaugment")
RANDAUGMENT_OPS: tuple[str, ...] = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd",
    "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing",
    "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
)
FILL = 128  # grey value of the pixels that geometric operations bring in
ERASING_TRIES = 10
# Keyed draws per sample: crop (2) and flip (1); per RandAugment operation: choice, gate, sign, magnitude (a
# normal from 2 uniforms); random erasing: gate and 4 per try (area, aspect, top, left); then the erasing noise.
_CROP_FLIP_DRAWS = 3
_DRAWS_PER_OP = 5


def normalisation_table(processor: PRGImageProcessing) -> torch.Tensor:
    """(3, 256) float32: entry [c, v] is the processor's output for value v in channel c, found by running the
    processor on a 1 × 256 image whose pixel v holds v in every channel; a gather through it normalises a uint8
    batch to exactly the values the processor gives."""
    ramp = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2)  # (1, 256, 3)
    table = processor(Image.fromarray(ramp), do_resize=False, return_tensors="pt")["pixel_values"]
    return table[0, :, 0, :].float()


def crop_flip(images: torch.Tensor, top: torch.Tensor, left: torch.Tensor, flipped: torch.Tensor,
              padding: int) -> torch.Tensor:
    """Pad `images` (B, C, H, W) with `padding` zeros on every side, crop each back to H × W at (top_b, left_b),
    then mirror left-right the samples where `flipped` (B,) is True. Same dtype, shape and device.

    The output pixel (b, c, i, j) is the padded image's (b, c, top_b + i, left_b + j), or
    (b, c, top_b + i, left_b + W − 1 − j) when sample b is flipped: one gather for the whole batch.
    """
    batch, _, height, width = images.shape
    padded = TF.pad(images, [padding]) if padding > 0 else images
    rows = top[:, None] + torch.arange(height, device=images.device)  # (B, H)
    columns = torch.arange(width, device=images.device).expand(batch, width)
    columns = left[:, None] + torch.where(flipped[:, None], width - 1 - columns, columns)  # (B, W)
    samples = torch.arange(batch, device=images.device)[:, None, None]
    # Advanced indexing puts the indexed dimensions first: (B, H, W, C), then back to channels-first.
    return padded.permute(0, 2, 3, 1)[samples, rows[:, :, None], columns[:, None, :]].permute(0, 3, 1, 2)


def _blend(images: torch.Tensor, degenerate: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """clamp(factor·images + (1 − factor)·degenerate, 0, 255), rounded to uint8; factor (B,)."""
    factor = factor.view(-1, 1, 1, 1)
    mixed = factor * images.float() + (1 - factor) * degenerate.float()
    return mixed.clamp(0, 255).round().to(torch.uint8)


def _affine_warp(images: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
    """Warp each image (B, C, H, W) by its 2 × 3 matrix (B, 2, 3), which maps output to input coordinates in
    [−1, 1] (`F.affine_grid`'s convention); bilinear, grey outside the image."""
    grid = F.affine_grid(matrices, list(images.shape), align_corners=False)
    warped = F.grid_sample(images.float() - FILL, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return (warped + FILL).clamp(0, 255).round().to(torch.uint8)


def _geometric_matrices(op: torch.Tensor, strength: torch.Tensor, sign: torch.Tensor,
                        aspect: float) -> torch.Tensor:
    """(B, 2, 3) output-to-input maps in [−1, 1] coordinates for the geometric operations (identity for the
    others). `aspect` = height / width. Shears act about the top-left corner, as PIL's affine transforms do:
    x_in = x + k·y in pixels is u_in = u + k·(H/W)·(v + 1) in normalised coordinates."""
    batch = op.shape[0]
    matrices = torch.zeros((batch, 2, 3), device=op.device)
    matrices[:, 0, 0] = matrices[:, 1, 1] = 1.0
    signed = sign * strength
    angle = torch.where(op == RANDAUGMENT_OPS.index("Rotate"), signed * math.radians(30.0), 0.0)
    cos, sin = torch.cos(angle), torch.sin(angle)
    # Rotation about the centre, in pixel units (u scaled by W, v by H): [[cos, −sin·H/W], [sin·W/H, cos]].
    matrices[:, 0, 0], matrices[:, 0, 1] = cos, -sin * aspect
    matrices[:, 1, 0], matrices[:, 1, 1] = sin / aspect, cos
    shear_x = torch.where(op == RANDAUGMENT_OPS.index("ShearX"), signed * 0.3, 0.0)
    shear_y = torch.where(op == RANDAUGMENT_OPS.index("ShearY"), signed * 0.3, 0.0)
    matrices[:, 0, 1] += shear_x * aspect
    matrices[:, 0, 2] += shear_x * aspect
    matrices[:, 1, 0] += shear_y / aspect
    matrices[:, 1, 2] += shear_y / aspect
    matrices[:, 0, 2] += torch.where(op == RANDAUGMENT_OPS.index("TranslateXRel"), signed * 0.9, 0.0)
    matrices[:, 1, 2] += torch.where(op == RANDAUGMENT_OPS.index("TranslateYRel"), signed * 0.9, 0.0)
    return matrices


def rand_augment_op(images: torch.Tensor, op: torch.Tensor, strength: torch.Tensor,
                    sign: torch.Tensor) -> torch.Tensor:
    """Apply RandAugment operation `RANDAUGMENT_OPS[op_b]` at strength f_b ∈ [0, 1] with sign s_b = ±1 to each
    image b of `images` (B, 3, H, W) uint8; op (B,) long, −1 for none. See the module docstring for the table."""
    def chosen(name: str) -> torch.Tensor:
        return (op == RANDAUGMENT_OPS.index(name)).view(-1, 1, 1, 1)

    as_image = (-1, 1, 1, 1)
    out = images
    out = torch.where(chosen("AutoContrast"), TF.autocontrast(images), out)
    out = torch.where(chosen("Equalize"), TF.equalize(images), out)
    inverted = TF.invert(images)
    out = torch.where(chosen("Invert"), inverted, out)
    bits = (4 - torch.floor(4 * strength)).clamp(min=1).long()
    keep_mask = ((0xFF << (8 - bits)) & 0xFF).to(torch.uint8).view(as_image)
    out = torch.where(chosen("PosterizeIncreasing"), images & keep_mask, out)
    threshold = (256 - torch.floor(256 * strength)).view(as_image)
    out = torch.where(chosen("SolarizeIncreasing") & (images >= threshold), inverted, out)
    added = (images.int() + torch.floor(110 * strength).int().view(as_image)).clamp(max=255).to(torch.uint8)
    out = torch.where(chosen("SolarizeAdd") & (images < 128), added, out)

    factor = 1 + 0.9 * sign * strength
    grey = TF.rgb_to_grayscale(images, num_output_channels=3)
    blend_with = {
        "ColorIncreasing": grey,
        "ContrastIncreasing": grey.float().mean(dim=(1, 2, 3), keepdim=True).expand_as(images),
        "BrightnessIncreasing": torch.zeros_like(images),
        "SharpnessIncreasing": TF.adjust_sharpness(images, 0.0),
    }
    degenerate = images
    for name, image in blend_with.items():
        degenerate = torch.where(chosen(name), image.to(degenerate.dtype), degenerate)
    blended = torch.zeros_like(op, dtype=torch.bool)
    for name in blend_with:
        blended |= op == RANDAUGMENT_OPS.index(name)
    out = torch.where(blended.view(as_image), _blend(images, degenerate, factor), out)

    geometric = torch.zeros_like(op, dtype=torch.bool)
    for name in ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"):
        geometric |= op == RANDAUGMENT_OPS.index(name)
    aspect = images.shape[-2] / images.shape[-1]
    warped = _affine_warp(images, _geometric_matrices(op, strength, sign, aspect))
    return torch.where(geometric.view(as_image), warped, out)


def erasing_boxes(uniform: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, ...]:
    """Random-erasing rectangles from keyed uniforms (B, 4·ERASING_TRIES), as timm's RandomErasing draws them:
    try t has area U[0.02, 1/3]·H·W and aspect ratio log-uniform in [0.3, 1/0.3], h = round(√(area·aspect)),
    w = round(√(area/aspect)); the first try with h < H and w < W is placed uniformly.

    Returns (found, top, left, box_height, box_width), each (B,): `found` is False when no try fits.
    """
    draws = uniform.view(uniform.shape[0], ERASING_TRIES, 4)
    area = (0.02 + draws[..., 0] * (1 / 3 - 0.02)) * height * width
    aspect = torch.exp(math.log(0.3) + draws[..., 1] * (math.log(1 / 0.3) - math.log(0.3)))
    box_height = torch.round(torch.sqrt(area * aspect)).long()
    box_width = torch.round(torch.sqrt(area / aspect)).long()
    fits = (box_height > 0) & (box_height < height) & (box_width > 0) & (box_width < width)
    first = fits.long().argmax(dim=1, keepdim=True)  # the first fitting try (0 when none fits)

    def pick(values: torch.Tensor) -> torch.Tensor:
        return values.gather(1, first).squeeze(1)

    box_height, box_width = pick(box_height), pick(box_width)
    top = torch.floor(pick(draws[..., 2]) * (height - box_height + 1)).long()
    left = torch.floor(pick(draws[..., 3]) * (width - box_width + 1)).long()
    return fits.any(dim=1), top, left, box_height, box_width


class TrainAugmentation:
    """A training recipe on batches: uint8 images (B, 3, H, W) and their sample indices in, normalised pixel
    values out, every parameter keyed by (seed, epoch, index).

    Args:
        name: one of `AUGMENTATIONS`.
        processor: the image processor whose normalisation the output follows exactly (`normalisation_table`);
            its size is the training size, and the crop padding is its height // 8.
        random_erasing: probability of random erasing after normalisation (the official recipe uses 0.25).
        randaugment_magnitude, randaugment_num_ops: RandAugment's m and n (9 and 2 in the official recipe).
        seed: the run's seed.
    """

    def __init__(
        self,
        name: str,
        processor: PRGImageProcessing,
        *,
        random_erasing: float = 0.0,
        randaugment_magnitude: float = 9.0,
        randaugment_num_ops: int = 2,
        seed: int = 0,
    ):
        if name not in AUGMENTATIONS:
            raise ValueError(f"Unknown augmentation {name!r}: allowed augmentations are {list(AUGMENTATIONS)}.")
        if not 0 <= random_erasing <= 1:
            raise ValueError(f"random_erasing is a probability in [0, 1], got {random_erasing}.")
        self.name = name
        self.image_size = (processor.size["height"], processor.size["width"])
        self.crop_padding = self.image_size[0] // 8 if name in ("crop_flip", "randaugment") else 0
        self.flip = name != "none"
        self.randaugment_num_ops = randaugment_num_ops if name == "randaugment" else 0
        self.randaugment_magnitude = randaugment_magnitude
        self.random_erasing = random_erasing
        self.seed = seed
        self.table = normalisation_table(processor)

    def augment_images(self, images: torch.Tensor, index: torch.Tensor, epoch: int) -> torch.Tensor:
        """Crop, flip and RandAugment: uint8 (B, 3, H, W) → uint8 (B, 3, H, W), on the images' device; `index`
        (B,) holds the samples' indices in the split."""
        if tuple(images.shape[-2:]) != self.image_size or images.dtype != torch.uint8:
            raise ValueError(f"Expected uint8 images of size {self.image_size}, got {images.dtype} "
                             f"{tuple(images.shape)}.")
        if self.name == "none":
            return images
        index = index.to(images.device)
        draws = keyed_uniform(self.seed, epoch, index, _CROP_FLIP_DRAWS)
        offsets = (draws[:, :2] * (2 * self.crop_padding + 1)).long()
        images = crop_flip(images, offsets[:, 0], offsets[:, 1], draws[:, 2] < 0.5, self.crop_padding)
        for slot in range(self.randaugment_num_ops):
            first = _CROP_FLIP_DRAWS + slot * _DRAWS_PER_OP
            choice, gate, sign = keyed_uniform(self.seed, epoch, index, 3, first).unbind(1)
            level = self.randaugment_magnitude + 0.5 * keyed_normal(self.seed, epoch, index, 1, first + 3)[:, 0]
            op = torch.where(gate < 0.5, (choice * len(RANDAUGMENT_OPS)).long(), -1)
            images = rand_augment_op(images, op, level.clamp(0, 10) / 10, torch.where(sign < 0.5, 1.0, -1.0))
        return images

    def erase(self, pixel_values: torch.Tensor, index: torch.Tensor, epoch: int) -> torch.Tensor:
        """Random erasing on normalised pixel values (B, 3, H, W): with probability `random_erasing`, one
        rectangle (`erasing_boxes`) of a sample is replaced by N(0, 1) noise."""
        batch, channels, height, width = pixel_values.shape
        first = _CROP_FLIP_DRAWS + self.randaugment_num_ops * _DRAWS_PER_OP
        draws = keyed_uniform(self.seed, epoch, index, 1 + 4 * ERASING_TRIES, first)
        found, top, left, box_height, box_width = erasing_boxes(draws[:, 1:], height, width)
        erased = (draws[:, 0] < self.random_erasing) & found
        rows = torch.arange(height, device=index.device)[None, :]
        columns = torch.arange(width, device=index.device)[None, :]
        in_rows = (rows >= top[:, None]) & (rows < (top + box_height)[:, None])  # (B, H)
        in_columns = (columns >= left[:, None]) & (columns < (left + box_width)[:, None])  # (B, W)
        mask = erased[:, None, None, None] & in_rows[:, None, :, None] & in_columns[:, None, None, :]
        noise_first = first + 1 + 4 * ERASING_TRIES
        noise = keyed_normal(self.seed, epoch, index, channels * height * width, noise_first)
        return torch.where(mask, noise.view(batch, channels, height, width).to(pixel_values.dtype), pixel_values)

    def __call__(self, images: torch.Tensor, index: torch.Tensor, epoch: int) -> torch.Tensor:
        """Augmented, normalised pixel values: float32 (B, 3, H, W) on the images' device, equal to the image
        processor's output for the augmented images (then random erasing)."""
        index = index.to(images.device)
        images = self.augment_images(images, index, epoch)
        if self.table.device != images.device:
            self.table = self.table.to(images.device)
        channels = torch.arange(3, device=images.device).view(1, 3, 1, 1)
        pixel_values = self.table[channels, images.long()]
        if self.random_erasing > 0:
            pixel_values = self.erase(pixel_values, index, epoch)
        return pixel_values

    def batches(self, batches: Sized, epoch: int) -> AugmentedBatches:
        """`batches` of `epoch` (training batches with "images" and "index") with their "pixel_values" added."""
        return AugmentedBatches(batches, self, epoch)


class AugmentedBatches:
    """A sized iterable of training batches, each given "pixel_values" = augmentation(images, index, epoch) as it
    is taken (lazily: the underlying loader still flags the end of its epoch on its last batch)."""

    def __init__(self, batches: Sized, augmentation: TrainAugmentation, epoch: int):
        self.source = batches
        self.augmentation = augmentation
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.source)

    def __iter__(self) -> Iterator[dict]:
        for batch in self.source:
            yield {**batch, "pixel_values": self.augmentation(batch["images"], batch["index"], self.epoch)}
