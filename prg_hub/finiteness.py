"""Non-finite numbers (NaN, ±Inf) are never trained on, saved, pushed or reported as results.

A single NaN weight turns every output of a PRG model into NaN: the reversed ODE carries it through every solver
step, and argmax over NaN logits still "predicts" a class. So each boundary where numbers leave the package checks
them and raises `NonFiniteError`, naming what holds them and how many there are:

* weights: `save_pretrained`, `push_to_hub`, `prg-hub push` and the training scripts' checkpoints;
* outputs: a model in eval mode refuses to return non-finite features or logits;
* losses: the training scripts stop at the first non-finite loss (`NonFiniteLossGuard`), or skip a few such
  steps when asked.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import nn

logger = logging.getLogger(__name__)

MAX_NAMED = 3  # tensors named in a message


class NonFiniteError(ValueError):
    """Weights, outputs or a loss hold NaN or ±Inf values."""


def count_non_finite(tensors: Iterable[tuple[str, torch.Tensor]]) -> tuple[int, int, list[str]]:
    """(non-finite elements, all elements, names of the tensors holding any) over floating-point `tensors`."""
    bad_total, total, bad_names = 0, 0, []
    for name, tensor in tensors:
        if not tensor.is_floating_point():
            continue
        bad = int((~torch.isfinite(tensor.detach())).sum())
        total += tensor.numel()
        if bad:
            bad_total += bad
            bad_names.append(name)
    return bad_total, total, bad_names


def check_finite_weights(module: nn.Module, what: str) -> None:
    """Raise `NonFiniteError` if any floating-point tensor of `module.state_dict()` holds NaN or ±Inf.

    `what` names the weights in the message, e.g. "the model saved to runs/c10".
    """
    bad, total, names = count_non_finite(module.state_dict().items())
    if bad:
        shown = ", ".join(names[:MAX_NAMED]) + (f" and {len(names) - MAX_NAMED} more" if len(names) > MAX_NAMED else "")
        raise NonFiniteError(
            f"{what}: {bad:,} of {total:,} weight values are NaN or Inf (in {len(names)} tensors: {shown}). "
            "Non-finite weights are never saved or pushed; train again from a finite checkpoint (lower the "
            "learning rate or clip gradients with --max_grad_norm)."
        )


def check_finite_output(values: torch.Tensor, what: str) -> None:
    """Raise `NonFiniteError` if `values` (B, ...) holds NaN or ±Inf, naming the batch rows affected."""
    finite_rows = torch.isfinite(values.detach()).flatten(1).all(dim=1)
    if not bool(finite_rows.all()):
        rows = (~finite_rows).nonzero().flatten().tolist()
        raise NonFiniteError(
            f"The model produced non-finite {what} (NaN or Inf) for {len(rows)} of {values.shape[0]} images "
            f"(batch rows {rows[:10]}{'...' if len(rows) > 10 else ''}). Its weights are corrupt, or it runs in a "
            "precision too low for it (try dtype=torch.float32)."
        )


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
