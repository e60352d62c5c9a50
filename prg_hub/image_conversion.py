"""`to_rgb`: the one rule by which every entry point turns a PIL image of any mode into RGB, 8 bits per channel.

`PRGImageProcessor`, both PRG pipelines, the `prg-hub` command and the training dataset all call it, so the
same image gives the same pixel values whichever way it comes in. The rule, after the EXIF orientation tag (if
any) has been applied so that the image is upright:

| mode | RGB value of a pixel |
|---|---|
| `RGB` | unchanged |
| `1`, `L`, `P`, `CMYK`, `YCbCr`, `LAB`, `HSV`, `RGBX` | PIL's `convert("RGB")` (`1` gives 0 or 255; gray v gives (v, v, v)) |
| `LA`, `PA`, `RGBA`, `RGBa`, and `1`/`L`/`P`/`RGB` with a transparency key | composited on white: c·a/255 + 255·(1 − a/255), rounded |
| `I;16`, `I;16L`, `I;16B`, `I;16N`, `I` | gray round(v / 257) clipped to [0, 255]: 0..65535 is the 16-bit range |
| `F` | gray round(255·v) if every finite v lies in [0, 1], else gray round(v) (0..255 is the range); clipped to [0, 255], NaN → 0 |

A transparency key on an integer image (a 16-bit PNG with a tRNS chunk) makes the pixels equal to the key white.
PIL's own `convert("RGB")` would clip 16-bit values at 255 (every pixel above 255 saturates to white) and would
ignore the alpha channel (transparent pixels take whatever colour they store, often black).

The `F` rule is decided per image from its values: float images are usually either normalised to [0, 1] or
kept at the 8-bit scale. An image at the 8-bit scale whose values all happen to lie within [0, 1] (a nearly
black image) is therefore read as normalised.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

INTEGER_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})
ALPHA_MODES = frozenset({"LA", "La", "PA", "RGBA", "RGBa"})
SIXTEEN_BIT_TO_EIGHT_BIT = 257.0  # 65535 / 255
WHITE = (255, 255, 255, 255)


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` (any PIL mode, shape (H, W) or (H, W, C)) as an upright RGB image, (H', W', 3) uint8; see the module
    docstring for the rule per mode. The input is left unchanged."""
    image = ImageOps.exif_transpose(image)
    if image.mode in INTEGER_MODES:
        values = np.asarray(image, dtype=np.float64)
        return gray_to_rgb(values / SIXTEEN_BIT_TO_EIGHT_BIT, transparent=transparent_pixels(image, values))
    if image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        finite = values[np.isfinite(values)]
        normalised = finite.size > 0 and finite.min() >= 0.0 and finite.max() <= 1.0
        return gray_to_rgb(values * 255.0 if normalised else values)
    if image.mode in ALPHA_MODES or "transparency" in image.info:
        background = Image.new("RGBA", image.size, WHITE)
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def transparent_pixels(image: Image.Image, values: np.ndarray) -> np.ndarray | None:
    """Boolean mask (H, W) of the pixels equal to the image's transparency key, or None without a key."""
    key = image.info.get("transparency")
    return values == key if isinstance(key, int) else None


def gray_to_rgb(values: np.ndarray, transparent: np.ndarray | None = None) -> Image.Image:
    """Gray levels (H, W) on the 0..255 scale → RGB image (H, W, 3): rounded, clipped to [0, 255], NaN → 0;
    pixels where `transparent` is True become white."""
    gray = np.clip(np.round(np.nan_to_num(values, nan=0.0)), 0, 255).astype(np.uint8)
    if transparent is not None:
        gray[transparent] = 255
    return Image.fromarray(gray).convert("RGB")  # uint8 (H, W) is mode "L"
