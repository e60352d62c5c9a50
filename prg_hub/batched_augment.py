"""Random crop with padding and horizontal flip on a whole batch of uint8 images, on the images' device.

The device-resident training data (`prg_hub.device_data`) augments every batch with one call and no host
synchronisation. Each sample gets parameters of its own, drawn from its (seed, epoch, sample index) alone:

    u_k = hash(seed, epoch, index, k)  ∈ [0, 2³²)      a counter-based hash (integer mixing on int64 tensors)
    top = u_0 mod (2p + 1),   left = u_1 mod (2p + 1),   flip = u_2 < 2³¹

so a sample is augmented the same way whatever the number of processes, the batch it falls in or the resume
point, as on the streaming path (`prg_hub.augment`, which draws from numpy with the same key). The two paths draw
from different generators: the parameters follow the same distribution but differ sample by sample.

Why not torchvision.transforms.v2: on a batch tensor (B, C, H, W), `RandomCrop` and `RandomHorizontalFlip` draw
ONE set of parameters per call, so the whole batch would share one crop and one flip. Per-sample crops are a
gather instead: the output pixel (b, c, i, j) is the zero-padded image's pixel
(b, c, top_b + i, left_b + j), or (b, c, top_b + i, left_b + W − 1 − j) when sample b is flipped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_MASK32 = 0xFFFFFFFF
# Odd multipliers below 2³¹: a product with a value below 2³² stays below 2⁶³, so int64 never overflows.
_MULTIPLIERS = (0x7FEB352D, 0x6C8E9CF5)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit integer mixer on int64 values in [0, 2³²) (xor-shift and multiply rounds)."""
    for multiplier in _MULTIPLIERS:
        x = x ^ (x >> 16)
        x = (x * multiplier) & _MASK32
    return x ^ (x >> 16)


def sample_hashes(seed: int, epoch: int, indices: torch.Tensor, streams: int) -> torch.Tensor:
    """Counter-based random integers in [0, 2³²), shape (B, streams), int64 on `indices`' device.

    Row b depends only on (seed, epoch, indices[b]); column k is the k-th independent draw of that sample.
    """
    key = _mix32(torch.tensor((seed & _MASK32) ^ 0x5BD1E995, dtype=torch.int64))
    key = _mix32(key ^ (epoch & _MASK32))
    per_sample = _mix32(key.to(indices.device) ^ (indices.long() & _MASK32))
    counters = torch.arange(streams, device=indices.device, dtype=torch.int64) * 0x9E3779B1 & _MASK32
    return _mix32(per_sample[:, None] ^ counters[None, :])


def crop_flip_parameters(
    seed: int, epoch: int, indices: torch.Tensor, padding: int, flip: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample (top, left, flipped) for `indices` (B,): offsets in [0, 2·padding] (int64) and flips (bool,
    probability 1/2; all False when `flip` is False). See the module docstring for the draw."""
    draws = sample_hashes(seed, epoch, indices, 3)
    top = draws[:, 0] % (2 * padding + 1)
    left = draws[:, 1] % (2 * padding + 1)
    flipped = draws[:, 2] < 2**31 if flip else torch.zeros_like(indices, dtype=torch.bool)
    return top, left, flipped


def crop_flip(
    images: torch.Tensor, top: torch.Tensor, left: torch.Tensor, flipped: torch.Tensor, padding: int
) -> torch.Tensor:
    """Pad `images` (B, C, H, W) with `padding` zeros on every side, crop each back to H × W at (top_b, left_b),
    then mirror left-right the samples where `flipped` (B,) is True. Same dtype, shape and device as `images`."""
    batch, _, height, width = images.shape
    padded = F.pad(images, (padding, padding, padding, padding)) if padding > 0 else images
    rows = top[:, None] + torch.arange(height, device=images.device)  # (B, H)
    columns = torch.arange(width, device=images.device).expand(batch, width)
    columns = left[:, None] + torch.where(flipped[:, None], width - 1 - columns, columns)  # (B, W)
    samples = torch.arange(batch, device=images.device)[:, None, None]
    # Advanced indexing puts the indexed dimensions first: (B, H, W, C), then back to channels-first.
    return padded.permute(0, 2, 3, 1)[samples, rows[:, :, None], columns[:, None, :]].permute(0, 3, 1, 2)
