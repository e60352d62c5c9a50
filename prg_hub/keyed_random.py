"""Random numbers keyed by (seed, epoch, sample index): the same draws for a sample wherever it is processed.

Training augmentation draws every parameter of a sample from a counter-based generator,

    h_k = mix(mix(mix(seed) ⊕ epoch) ⊕ index) ⊕ k·φ)  ∈ [0, 2³²)        k = 0, 1, …  (the k-th draw)

with `mix` a bijective 32-bit integer mixer (xor-shift and multiply rounds) and φ = 0x9E3779B1, computed with
int64 tensor ops on the indices' device. A sample is therefore augmented the same way whatever the number of
processes, the batch it falls in, the resume point, or whether its batch was made on the accelerator or streamed
from disk, and no generator state has to be saved in a checkpoint or moved between devices.

    uniform_k = ⌊h_k / 2⁸⌋ / 2²⁴ ∈ [0, 1)                                (exact in float32)
    normal_k  = √(−2·ln(1 − uniform_{2k})) · cos(2π·uniform_{2k+1})       (Box–Muller)
"""

from __future__ import annotations

import math

import torch

_MASK32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B1
# Odd multipliers below 2³¹: a product with a value below 2³² stays below 2⁶³, so int64 never overflows.
_MULTIPLIERS = (0x7FEB352D, 0x6C8E9CF5)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijection of [0, 2³²) on int64 values (xor-shift and multiply rounds)."""
    for multiplier in _MULTIPLIERS:
        x = x ^ (x >> 16)
        x = (x * multiplier) & _MASK32
    return x ^ (x >> 16)


def keyed_hashes(seed: int, epoch: int, index: torch.Tensor, count: int, first: int = 0) -> torch.Tensor:
    """Integers h_k for k = first, …, first + count − 1: shape (B, count), int64 in [0, 2³²) on `index`' device.
    Row b depends only on (seed, epoch, index[b]); callers give disjoint ranges of k to independent draws."""
    key = _mix32(torch.tensor((seed & _MASK32) ^ 0x5BD1E995, dtype=torch.int64))
    key = _mix32(key ^ (epoch & _MASK32))
    per_sample = _mix32(key.to(index.device) ^ (index.long() & _MASK32))
    counters = torch.arange(first, first + count, device=index.device, dtype=torch.int64) * _GOLDEN & _MASK32
    return _mix32(per_sample[:, None] ^ counters[None, :])


def keyed_uniform(seed: int, epoch: int, index: torch.Tensor, count: int, first: int = 0) -> torch.Tensor:
    """U[0, 1) draws k = first, …, first + count − 1, float32 (B, count): the top 24 bits of `keyed_hashes`."""
    return (keyed_hashes(seed, epoch, index, count, first) >> 8).float() / 2**24


def keyed_normal(seed: int, epoch: int, index: torch.Tensor, count: int, first: int = 0) -> torch.Tensor:
    """N(0, 1) draws, float32 (B, count), by Box–Muller from the keyed uniforms k = first, …, first + 2·count − 1."""
    uniform = keyed_uniform(seed, epoch, index, 2 * count, first)
    radius = torch.sqrt(-2.0 * torch.log1p(-uniform[:, :count]))
    return radius * torch.cos(2 * math.pi * uniform[:, count:])
