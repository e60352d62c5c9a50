"""The compiled, fused training step: three options of the training scripts, on by default on CUDA.

| option               | effect                                                                                    |
|----------------------|-------------------------------------------------------------------------------------------|
| `--compile`          | `torch.compile` of the velocity network v_θ(x, t), in place (`nn.Module.compile`): the     |
|                      | state dict, checkpoints and saved models keep their keys                                   |
| `--channels_last`    | 4-D weights in channels-last memory format (N, H, W, C strides), which convolutions on     |
|                      | tensor cores prefer; the values, shapes and saved files are unchanged                      |
| `--fused_optimizer`  | AdamW's fused implementation (`fused=True`): one kernel updates every parameter            |

Each is a `--option/--no-option` pair; left unset, it is on for a CUDA device and off elsewhere (on the CPU,
compiling takes longer than a short run gains; ask for it explicitly). `--compile_mode` is `torch.compile`'s
mode: "reduce-overhead" replays the compiled network's kernels as CUDA graphs, which needs the same shapes every
step (a fixed batch: pretraining drops the last incomplete batch; finetuning keeps it, which costs one more
graph). None of them changes the arithmetic of the step beyond floating-point rounding. The EMA of the weights
always updates with `torch._foreach` ops (`EMAModel(foreach=True)`): one launch for all parameters instead of one
per parameter, the same update θ_ema ← θ_ema − (1 − decay)·(θ_ema − θ).
"""

from __future__ import annotations

import argparse

import torch

from .modeling_prg import PRGModel

FAST_STEP_OPTIONS: dict[str, str] = {
    "compile": "torch.compile the velocity network",
    "channels_last": "keep the weights in channels-last memory format",
    "fused_optimizer": "use AdamW's fused implementation",
}


COMPILE_MODES: tuple[str, ...] = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def add_fast_step_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `--compile`, `--channels_last` and `--fused_optimizer` (each with its `--no-` form) to `parser`."""
    group = parser.add_argument_group("speed (default: on for CUDA, off otherwise)")
    for name, effect in FAST_STEP_OPTIONS.items():
        group.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=None, help=effect.capitalize())
    group.add_argument("--compile_mode", choices=COMPILE_MODES, default="default",
                       help="torch.compile mode; reduce-overhead adds CUDA graphs (fixed shapes).")


def resolve_fast_step(args: argparse.Namespace, device: torch.device) -> None:
    """Set every fast-step option left unset (None) in `args` to whether `device` is a CUDA device."""
    for name in FAST_STEP_OPTIONS:
        if getattr(args, name) is None:
            setattr(args, name, device.type == "cuda")


def speed_up(model: PRGModel, args: argparse.Namespace) -> None:
    """Apply `--channels_last` and `--compile` (resolved) to `model` in place; parameters stay the same objects."""
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if args.compile:
        model.velocity.compile(mode=args.compile_mode)
