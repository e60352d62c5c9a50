"""The fast training step: options of the training scripts.

| option               | effect                                                                  | default         |
|----------------------|-------------------------------------------------------------------------|-----------------|
| `--channels_last`    | 4-D weights in channels-last memory format (N, H, W, C strides), which  | on for CUDA     |
|                      | convolutions on tensor cores prefer; values and saved files unchanged   |                 |
| `--fused_optimizer`  | AdamW's fused implementation (`fused=True`): one kernel updates every   | on for CUDA     |
|                      | parameter, and a non-finite step is skipped on the device               |                 |
| `--compile`          | `torch.compile` of the velocity network v_θ(x, t), in place, one graph  | off: opt-in     |
|                      | (`PRGPreTrainedModel.enable_fast_inference`): state dict, checkpoints   |                 |
|                      | and saved models keep their keys                                        |                 |

Each is a `--option/--no-option` pair. `--compile` is opt-in because a compiler can be wrong where eager code is
right: on the CPU, inductor's layout optimisation schedules the read of nearest upsampling's input gradient (the
UNet's `Upsample2D`) before the kernel that accumulates it, so every weight below the first upsampler got a zero
or wrong gradient while the forward pass was right (relative gradient error 0.5 on the tiny UNet, torch 2.13).
On the CPU the network is therefore compiled with `layout_optimization` off (`modeling_prg.CPU_COMPILE_SETTINGS`),
which gives the eager gradients (a test checks it), and `--compile` with `--channels_last` is refused there:
channels-last weights bring the wrong gradients back (relative error 0.3). On CUDA the compiled gradients have not been
checked against eager ones yet. `--compile_mode` is `torch.compile`'s mode: "reduce-overhead" replays the
compiled network's kernels as CUDA graphs, which needs the same shapes every step (pretraining drops the last
incomplete batch; finetuning keeps it, which costs one more graph).

None of the options changes the arithmetic of the step beyond floating-point rounding. The EMA of the weights
always updates with `torch._foreach` ops (`EMAModel(foreach=True)`): one launch for all parameters instead of one
per parameter, the same update θ_ema ← θ_ema − (1 − decay)·(θ_ema − θ).
"""

from __future__ import annotations

import argparse

import torch

from .modeling_prg import PRGModel

FAST_STEP_OPTIONS: dict[str, str] = {
    "compile": "torch.compile the velocity network (default: off)",
    "channels_last": "keep the weights in channels-last memory format (default: on for CUDA)",
    "fused_optimizer": "use AdamW's fused implementation (default: on for CUDA)",
}
ON_FOR_CUDA = ("channels_last", "fused_optimizer")


COMPILE_MODES: tuple[str, ...] = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def add_fast_step_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `--compile`, `--channels_last` and `--fused_optimizer` (each with its `--no-` form) to `parser`."""
    group = parser.add_argument_group("speed (prg_hub/fast_step.py)")
    for name, effect in FAST_STEP_OPTIONS.items():
        group.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=None, help=effect.capitalize())
    group.add_argument("--compile_mode", choices=COMPILE_MODES, default="default",
                       help="torch.compile mode; reduce-overhead adds CUDA graphs (fixed shapes).")


def resolve_fast_step(args: argparse.Namespace, device: torch.device) -> None:
    """Set the fast-step options left unset (None) in `args`: `--compile` off, the others on for a CUDA device.

    Raises ValueError for `--compile` with `--channels_last` on the CPU (wrong gradients, see the module docstring).
    """
    for name in FAST_STEP_OPTIONS:
        if getattr(args, name) is None:
            setattr(args, name, name in ON_FOR_CUDA and device.type == "cuda")
    if device.type == "cpu" and args.compile and args.channels_last:
        raise ValueError("--compile with --channels_last gives wrong gradients on the CPU (torch's inductor); "
                         "drop one of them, e.g. --no-channels_last.")


def speed_up(model: PRGModel, args: argparse.Namespace) -> None:
    """Apply `--channels_last`, `--compile` and `--compile_mode` (resolved) to `model` in place, through
    `model.enable_fast_inference`; parameters stay the same objects."""
    model.enable_fast_inference(compile=args.compile, channels_last=args.channels_last, compile_mode=args.compile_mode)
