"""Checkpoint folders of the training scripts: the full training state, saved atomically and restored.

A checkpoint is `output_dir/checkpoints/checkpoint-<optimizer step>`, written by `accelerator.save_state` (model,
optimizer, scheduler and every process's RNG states), plus the EMA weights as `ema.safetensors` and any JSON
files a script adds (`trainer_state.json`). `--resume_from_checkpoint latest` picks the highest step.
Nothing in a checkpoint is a pickle that can run code: accelerate loads its files with
`torch.load(weights_only=True)`, and the EMA weights are a safetensors file rather than a pickled custom state.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from diffusers.training_utils import EMAModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .finiteness import check_finite_weights
from .run_records import write_json

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
EMA_STATE_FILE = "ema.safetensors"


def checkpoint_path(output_dir: str | Path, step: int) -> Path:
    """The folder of the checkpoint written at optimizer step `step`: output_dir/checkpoints/checkpoint-<step>."""
    return Path(output_dir) / "checkpoints" / f"checkpoint-{step}"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """The run's checkpoint folders, oldest (lowest step) first."""
    folder = Path(output_dir) / "checkpoints"
    found = [p for p in folder.iterdir() if p.is_dir() and CHECKPOINT_PATTERN.match(p.name)] if folder.is_dir() else []
    return sorted(found, key=checkpoint_step)


def checkpoint_step(path: str | Path) -> int:
    """The optimizer step a checkpoint folder was written at, from its name `checkpoint-<step>`."""
    match = CHECKPOINT_PATTERN.match(Path(path).name)
    if match is None:
        raise ValueError(f"{str(path)!r} is not a checkpoint folder: its name must be checkpoint-<step>.")
    return int(match.group(1))


def resolve_checkpoint(output_dir: str | Path, resume_from_checkpoint: str | None) -> Path | None:
    """The checkpoint to resume from: None, "latest" (None when the run has none yet) or a checkpoint folder."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(resume_from_checkpoint)
    if not path.is_dir():
        raise FileNotFoundError(
            f"No checkpoint folder at {resume_from_checkpoint!r}. Pass 'latest' or a folder such as "
            f"{checkpoint_path(output_dir, 1000)}."
        )
    checkpoint_step(path)
    return path


def save_checkpoint(accelerator, model: nn.Module, output_dir: str | Path, step: int, total_limit: int | None = None,
                    extra_json: dict[str, dict] | None = None, ema: EMAModel | None = None) -> Path:
    """Save the full training state as checkpoints/checkpoint-<step>, atomically; all processes call it.

    `accelerator.save_state` (model, optimizer, scheduler and each process's RNG states) writes into
    `checkpoint-<step>.partial`, which the main process then renames: a run killed mid-save leaves no half-written
    `checkpoint-<step>` for `--resume_from_checkpoint latest` to pick up. The main process adds the `extra_json`
    files ({name: data}) and the `ema` state (`EMA_STATE_FILE`). Only once the new checkpoint is complete are the
    oldest ones deleted down to `total_limit`, so a kill at any moment leaves at least one complete checkpoint.

    Raises `NonFiniteError` (and writes nothing) if `model` holds NaN or Inf weights.
    """
    check_finite_weights(accelerator.unwrap_model(model), f"Step {step}: the checkpoint")
    final = checkpoint_path(output_dir, step)
    partial = final.with_name(final.name + ".partial")
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for name, data in (extra_json or {}).items():
            write_json(partial / name, data)
        if ema is not None:
            save_ema_state(ema, partial / EMA_STATE_FILE)
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        prune_checkpoints(output_dir, total_limit)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, checkpoint: str | Path, ema: EMAModel | None = None) -> None:
    """Restore the training state `save_checkpoint` wrote in `checkpoint` (`accelerator.load_state`), and the EMA
    weights into `ema` when it is given."""
    accelerator.load_state(str(checkpoint))
    if ema is not None:
        load_ema_state(ema, Path(checkpoint) / EMA_STATE_FILE, accelerator.device)


def prune_checkpoints(output_dir: str | Path, total_limit: int | None) -> None:
    """Delete the oldest checkpoints so that at most `total_limit` remain."""
    if total_limit is None:
        return
    checkpoints = list_checkpoints(output_dir)
    for stale in checkpoints[: max(0, len(checkpoints) - total_limit)]:
        shutil.rmtree(stale)


def save_ema_state(ema: EMAModel, path: str | Path) -> None:
    """Write an `EMAModel` as safetensors: its shadow weights as tensors "shadow.<i>", its scalars as metadata."""
    state = ema.state_dict()
    tensors = {f"shadow.{index}": tensor.detach().contiguous().cpu()
               for index, tensor in enumerate(state.pop("shadow_params"))}
    save_file(tensors, path, metadata={"ema_state": json.dumps(state)})


def load_ema_state(ema: EMAModel, path: str | Path, device: torch.device | str) -> None:
    """Restore an `EMAModel` written by `save_ema_state`, its shadow weights on `device`."""
    tensors = load_file(path)
    with safe_open(path, framework="pt") as file:
        state = json.loads(file.metadata()["ema_state"])
    if len(tensors) != len(ema.shadow_params):
        raise ValueError(
            f"{path} holds {len(tensors)} EMA tensors but the model has {len(ema.shadow_params)} parameters; it was "
            "written for another architecture."
        )
    ema.load_state_dict({**state, "shadow_params": [tensors[f"shadow.{index}"] for index in range(len(tensors))]})
    ema.to(device=device)
