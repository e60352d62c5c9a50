"""Image tensors in [-1, 1] as PIL images and as one PNG grid (sample grids of the scripts and of `prg-hub`)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from diffusers.utils import make_image_grid
from PIL import Image


def to_pil_images(images: torch.Tensor) -> list[Image.Image]:
    """Images (B, C, H, W) in [-1, 1] → B RGB PIL images: pixel = round((x + 1) · 127.5), one channel repeated."""
    pixels = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    arrays = pixels.permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.repeat(a, 3, axis=2) if a.shape[2] == 1 else a, mode="RGB") for a in arrays]


def save_image_grid(images: torch.Tensor, path: str | Path) -> None:
    """Save images (B, C, H, W) in [-1, 1] as one PNG grid, as square as B allows (rows · columns = B)."""
    pil_images = to_pil_images(images)
    rows = max(r for r in range(1, math.isqrt(len(pil_images)) + 1) if len(pil_images) % r == 0)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    make_image_grid(pil_images, rows=rows, cols=len(pil_images) // rows).save(path)
