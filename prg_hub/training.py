"""Helpers shared by the training scripts in `examples/`: recipes, checkpoint folders, run records, image grids.

Recipes: `--config recipe.yaml` sets any of a script's options (keys are the option names without `--`); options
given on the command line override the recipe.

Checkpoints (full training state, written by `accelerator.save_state`) live in
`output_dir/checkpoints/checkpoint-<optimizer step>`; `--resume_from_checkpoint latest` picks the highest step.
Nothing in them is a pickle that can run code: accelerate loads its files with `torch.load(weights_only=True)`,
and the EMA weights are a safetensors file (`ema.safetensors`) rather than a pickled custom state.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import platform
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import yaml
from diffusers.training_utils import EMAModel
from diffusers.utils import make_image_grid
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .finiteness import NonFiniteError, check_finite_weights
from .image_processing_prg import default_image_processor
from .modeling_prg import PRGModel

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
EMA_STATE_FILE = "ema.safetensors"


def parse_args_with_recipe(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line on top of an optional YAML recipe given as `--config`.

    Raises a parser error naming any recipe key that is not an option of the script (listing the options) and any
    value outside an option's choices.
    """
    parser.add_argument(
        "--config", default=None, help="YAML recipe (see examples/configs); the command line overrides it."
    )
    recipe_parser = argparse.ArgumentParser(add_help=False)
    recipe_parser.add_argument("--config", default=None)
    recipe_path = recipe_parser.parse_known_args(argv)[0].config
    if recipe_path is not None:
        recipe = yaml.safe_load(Path(recipe_path).read_text(encoding="utf-8")) or {}
        options = {action.dest: action for action in parser._actions if action.dest != "help"}
        unknown = sorted(set(recipe) - set(options))
        if unknown:
            parser.error(f"{recipe_path}: unknown options {unknown}; the options are {sorted(options)}.")
        for key, value in recipe.items():
            if options[key].choices is not None and value not in options[key].choices:
                parser.error(f"{recipe_path}: {key} = {value!r} is not one of {list(options[key].choices)}.")
            options[key].required = False
        parser.set_defaults(**recipe)
    return parser.parse_args(argv)


class FlowMatchingObjective(nn.Module):
    """L_FM of a `PRGModel` as a forward pass: (B, C, H, W) images in [-1, 1] → scalar loss.

    Distributed wrappers (DDP, FSDP, DeepSpeed) synchronise gradients of what runs inside `forward`, so the
    pretraining loss must be computed through a module's forward rather than by calling
    `PRGModel.flow_matching_loss` on the unwrapped model.
    """

    def __init__(self, prg: PRGModel):
        super().__init__()
        self.prg = prg

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.prg.flow_matching_loss(pixel_values)


def checkpoint_path(output_dir: str | Path, step: int) -> Path:
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


class NonFiniteLossGuard:
    """Stops a run at the first optimizer step whose loss is NaN or Inf, or skips up to `max_skipped` such steps.

    Per micro-batch, call `observe(loss)` after the backward pass; per optimizer step, call `step_is_finite(step)`
    before `optimizer.step()`. A skipped step applies no update (the gradients are discarded) but still counts as
    a step, so the learning-rate schedule and the resume position stay those of an uninterrupted run. The check
    costs one host synchronisation per optimizer step, plus one all-reduce of a flag with several processes, so
    that every process takes the same decision.
    """

    def __init__(self, accelerator, max_skipped: int = 0):
        self.accelerator = accelerator
        self.max_skipped = max_skipped
        self.skipped_steps: list[int] = []
        self._non_finite_losses = torch.zeros((), device=accelerator.device)
        self._last_loss = torch.zeros((), device=accelerator.device)

    def observe(self, loss: torch.Tensor) -> None:
        """Record one micro-batch's loss (no synchronisation)."""
        self._last_loss = loss.detach().float()
        self._non_finite_losses += (~torch.isfinite(self._last_loss)).float()

    def step_is_finite(self, step: int) -> bool:
        """True if every micro-batch of optimizer step `step` had a finite loss on every process.

        Otherwise the step is recorded in `skipped_steps` and False is returned, or, once more than `max_skipped`
        steps were skipped, `NonFiniteError` is raised naming the step.
        """
        non_finite = self.accelerator.reduce(self._non_finite_losses, reduction="sum").item()
        self._non_finite_losses.zero_()
        if non_finite == 0:
            return True
        self.skipped_steps.append(step)
        if len(self.skipped_steps) > self.max_skipped:
            raise NonFiniteError(
                f"Step {step}: the training loss is {self._last_loss.item()} (not finite) in {int(non_finite)} "
                f"micro-batch(es). The run stopped before the update, so no checkpoint or model holds non-finite "
                f"weights; the checkpoints saved before are intact. Lower --learning_rate, set --max_grad_norm, check "
                "the data and the starting weights, then resume with --resume_from_checkpoint latest"
                + (f" ({self.max_skipped} non-finite steps were skipped first, at steps "
                   f"{self.skipped_steps[:-1]})." if self.max_skipped else
                   ", or pass --skip_nonfinite_steps N to skip up to N such steps.")
            )
        logger.warning(f"Step {step}: non-finite training loss; the step is skipped "
                       f"({len(self.skipped_steps)} of at most {self.max_skipped}).")
        return False


def resume_position(global_step: int, batches_per_epoch: int, gradient_accumulation_steps: int) -> tuple[int, int]:
    """(epoch, batches of that epoch to skip) after `global_step` optimizer steps.

    An epoch of `batches_per_epoch` per-process batches has ceil(batches_per_epoch / accumulation) optimizer steps
    (Accelerate steps on the epoch's last batch even when the accumulation is incomplete).
    """
    steps_per_epoch = math.ceil(batches_per_epoch / gradient_accumulation_steps)
    epoch, step_in_epoch = divmod(global_step, steps_per_epoch)
    return epoch, step_in_epoch * gradient_accumulation_steps


class BatchRecord:
    """Which samples a run trained on: SHA-256 digests of sample indices, in training order.

    * `global_sha256`: for every optimizer step, the indices of the whole global batch (all processes, all
      accumulated micro-batches) sorted, then hashed in step order. Two runs with the same digest took the same
      global batches, whatever their number of processes.
    * `local_sha256`: the indices this process trained on, in order.

    Both cover the steps taken since this launch started (a resumed run starts a new record).
    """

    def __init__(self):
        self._global = hashlib.sha256()
        self._local = hashlib.sha256()
        self._step_indices: list[torch.Tensor] = []

    def add_batch(self, accelerator, indices: torch.Tensor) -> None:
        """Record one micro-batch's sample indices (B,) on every process (a collective call)."""
        self._local.update(indices.cpu().numpy().astype(np.int64).tobytes())
        self._step_indices.append(accelerator.gather(indices))

    def end_step(self) -> None:
        """Close the current optimizer step."""
        indices = torch.cat(self._step_indices).sort().values
        self._global.update(indices.cpu().numpy().astype(np.int64).tobytes())
        self._step_indices = []

    @property
    def global_sha256(self) -> str:
        return self._global.hexdigest()

    @property
    def local_sha256(self) -> str:
        return self._local.hexdigest()


def parameters_sha256(module: nn.Module) -> str:
    """SHA-256 of all parameters' bytes in order: equal digests mean bit-identical weights."""
    digest = hashlib.sha256()
    for parameter in module.parameters():
        digest.update(parameter.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def save_model(model: nn.Module, output_dir: str | Path) -> None:
    """`save_pretrained` (safetensors) plus the image processor that `pipeline(...)` loads beside it
    (`default_image_processor`; either backend saves the same `preprocessor_config.json`)."""
    model.save_pretrained(output_dir, safe_serialization=True)
    default_image_processor(model.config.image_size).save_pretrained(output_dir)


def describe_machine(device: torch.device | None = None) -> str:
    """What a run was measured on: "NVIDIA H200, torch 2.11" or "2-core x86_64 CPU, torch 2.13.0+cpu".

    `device` defaults to the first GPU when torch sees one, the CPU otherwise.
    """
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return f"{os.cpu_count()}-core {platform.machine()} CPU, torch {torch.__version__}"


def write_json(path: str | Path, data: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")


def to_pil_images(images: torch.Tensor) -> list[Image.Image]:
    """Images (B, C, H, W) in [-1, 1] → B RGB PIL images."""
    pixels = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    arrays = pixels.permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.repeat(a, 3, axis=2) if a.shape[2] == 1 else a, mode="RGB") for a in arrays]


def save_image_grid(images: torch.Tensor, path: str | Path) -> None:
    """Save images (B, C, H, W) in [-1, 1] as one PNG grid, as square as B allows (rows · columns = B)."""
    pil_images = to_pil_images(images)
    rows = max(r for r in range(1, math.isqrt(len(pil_images)) + 1) if len(pil_images) % r == 0)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    make_image_grid(pil_images, rows=rows, cols=len(pil_images) // rows).save(path)
