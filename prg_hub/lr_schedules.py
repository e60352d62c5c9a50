"""The finetuning learning-rate schedule: a linear warm-up from a fraction of the peak, then a cosine to a floor.

With peak learning rate η, W warm-up steps and T steps in all, the learning rate of step s is η · m(s) with

    m(s) = r_w + (1 − r_w) · s / W                                      for s < W
    m(s) = r_min + (1 − r_min) · ½ · (1 + cos(π · min(1, (s − W) / (T − W))))   for s ≥ W

r_w = `warmup_start_lr_ratio` and r_min = `min_lr_ratio`. With r_w = r_min = 0 this is diffusers'
`get_scheduler("cosine", ...)`. The released PRG code sets its warm-up start and floor as fixed learning rates
(timm's per-step `CosineLRScheduler` with the warm-up before the cosine); as ratios they are the same for every
global batch: 1.25e-7 / 1.25e-4 = 1e-3 and 1.25e-6 / 1.25e-4 = 1e-2.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine_multiplier(
    step: int, num_warmup_steps: int, num_training_steps: int, warmup_start_lr_ratio: float, min_lr_ratio: float
) -> float:
    """m(step) of the module docstring: the learning rate of `step` divided by the peak learning rate."""
    if step < num_warmup_steps:
        return warmup_start_lr_ratio + (1.0 - warmup_start_lr_ratio) * step / max(1, num_warmup_steps)
    progress = min(1.0, (step - num_warmup_steps) / max(1, num_training_steps - num_warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine_schedule(
    optimizer: Optimizer,
    num_warmup_steps: int,
    num_training_steps: int,
    warmup_start_lr_ratio: float = 0.0,
    min_lr_ratio: float = 0.0,
) -> LambdaLR:
    """A `LambdaLR` that scales every parameter group's learning rate by m(step) of the module docstring; call its
    `step()` once per optimizer step.

    Raises a ValueError when a ratio is outside [0, 1] or the step counts are negative.
    """
    for name, ratio in (("warmup_start_lr_ratio", warmup_start_lr_ratio), ("min_lr_ratio", min_lr_ratio)):
        if not 0 <= ratio <= 1:
            raise ValueError(f"{name} is a fraction of the peak learning rate, in [0, 1]; got {ratio}.")
    if num_warmup_steps < 0 or num_training_steps < 0:
        raise ValueError(
            f"The step counts must be >= 0, got num_warmup_steps = {num_warmup_steps} and "
            f"num_training_steps = {num_training_steps}."
        )

    def multiplier(step: int) -> float:
        return warmup_cosine_multiplier(step, num_warmup_steps, num_training_steps, warmup_start_lr_ratio, min_lr_ratio)

    return LambdaLR(optimizer, multiplier)
