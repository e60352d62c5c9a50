"""Non-finite numbers (NaN, ±Inf) are never trained on, saved, pushed or reported as results.

A single NaN weight turns every output of a PRG model into NaN: the reversed ODE carries it through every solver
step, and argmax over NaN logits still "predicts" a class. So each boundary where numbers leave the package checks
them and raises `NonFiniteError`, naming what holds them and how many there are:

* weights: `save_pretrained`, `push_to_hub`, `prg-hub push` and the training scripts' checkpoints;
* outputs: a model in eval mode refuses to return non-finite features or logits;
* losses: the training scripts stop at the first non-finite loss (`NonFiniteLossGuard`), or skip a few such
  steps when asked; with a fused Adam/AdamW the skip happens on the device, without waiting for the check.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import NamedTuple

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


class SkippedSteps(NamedTuple):
    """The optimizer steps skipped so far for a non-finite loss: how many, the first and the last (None if none)."""

    count: int
    first: int | None
    last: int | None


class NonFiniteLossGuard:
    """Stops a run whose loss is NaN or Inf, or skips up to `max_skipped` such optimizer steps of `optimizer` (as
    `accelerator.prepare` returns it, or the torch optimizer itself).

    A skipped step applies no update (its gradients are discarded) but still counts as a step, so the learning-rate
    schedule and the resume position stay those of an uninterrupted run. Per micro-batch, call `observe(loss)` after
    the backward pass; on the last micro-batch of optimizer step `step`, call `should_step(step)` and, only if it
    returns True, clip the gradients and call `optimizer.step()`; call `raise_if_too_many_skipped(step)` at logging
    steps, before saving a checkpoint or a model, and at the end of training. Every process takes the same decision:
    the count of non-finite losses of a step is summed over the processes (one all-reduce per optimizer step).

    Where the step is skipped, and which calls wait for the device (host synchronisation):

    * on the device, with a fused torch Adam/AdamW (`fused=True`) and no GradScaler: `should_step` never
      synchronises and always returns True; it hands found_inf = 1.0 (the step had a non-finite loss) or 0.0 to
      the optimizer, whose fused kernel then leaves the parameters and its state (exp_avg, exp_avg_sq, step)
      exactly unchanged, or takes the ordinary step bit for bit. The skipped steps are counted on the device;
      `raise_if_too_many_skipped` reads the count back (one synchronisation per call), logs the steps skipped
      since its last call, and raises `NonFiniteError` once more than `max_skipped` steps were skipped. An EMA of
      the weights still takes its step on a skipped step, towards the unchanged weights.
    * on the host, otherwise (another optimizer, or a GradScaler, which owns found_inf itself): `should_step`
      reads the count back (one synchronisation per optimizer step), returns False for a step to skip, and raises
      at once for the step one past `max_skipped`; `raise_if_too_many_skipped` then has nothing left to report.
    """

    def __init__(self, accelerator, optimizer: torch.optim.Optimizer, max_skipped: int = 0):
        from accelerate.optimizer import AcceleratedOptimizer  # a training dependency, not one of the models

        self.accelerator = accelerator
        self.max_skipped = max_skipped
        self.optimizer = optimizer.optimizer if isinstance(optimizer, AcceleratedOptimizer) else optimizer
        self.skips_on_device = (
            isinstance(self.optimizer, (torch.optim.Adam, torch.optim.AdamW))
            and bool(self.optimizer.defaults.get("fused"))
            and accelerator.scaler is None
        )
        if self.skips_on_device:
            self.optimizer.register_step_post_hook(self._clear_found_inf)
        device = accelerator.device
        # This step, per process: [non-finite micro-batch losses, sum of those losses (0 if none)].
        self._step_losses = torch.zeros(2, device=device)
        # Over the run, the same on every process: skipped steps, first and last skipped (0: none), and the
        # non-finite loss of the last one (summed over its micro-batches and processes).
        self._skipped = torch.zeros((), dtype=torch.int64, device=device)
        self._first_skipped = torch.zeros((), dtype=torch.int64, device=device)
        self._last_skipped = torch.zeros((), dtype=torch.int64, device=device)
        self._last_skipped_loss = torch.zeros((), device=device)
        self._reported = 0  # skipped steps already logged

    @staticmethod
    def _clear_found_inf(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        """After each step: found_inf concerns one step only, so a later step (guarded or not) sees no stale flag."""
        vars(optimizer).pop("found_inf", None)

    def observe(self, loss: torch.Tensor) -> None:
        """Record one micro-batch's loss (no synchronisation)."""
        loss = loss.detach().float()
        non_finite = ~torch.isfinite(loss)
        self._step_losses += torch.stack([non_finite.float(), torch.where(non_finite, loss, 0.0)])

    def should_step(self, step: int) -> bool:
        """Whether to call `optimizer.step()` for optimizer step `step` (call on its last micro-batch).

        On the device path always True: a step with a non-finite loss on any process is skipped by the fused
        optimizer itself. On the host path False for such a step, after logging it; the step one past
        `max_skipped` raises `NonFiniteError` naming it.
        """
        losses = self.accelerator.reduce(self._step_losses, reduction="sum")  # a copy: no sync, one all-reduce
        self._step_losses.zero_()
        skip = losses[0] > 0
        self._skipped += skip
        self._first_skipped = torch.where(skip & (self._first_skipped == 0), step, self._first_skipped)
        self._last_skipped = torch.where(skip, step, self._last_skipped)
        self._last_skipped_loss = torch.where(skip, losses[1], self._last_skipped_loss)
        if self.skips_on_device:
            self.optimizer.found_inf = skip.float()  # 1.0 = skip: the fused kernel's and step count's convention
            return True
        if not bool(skip):
            return True
        self._report_skipped(step)
        return False

    def skipped_steps(self) -> SkippedSteps:
        """The steps skipped so far (one synchronisation)."""
        count, first, last = torch.stack([self._skipped, self._first_skipped, self._last_skipped]).tolist()
        return SkippedSteps(count, first or None, last or None)

    def raise_if_too_many_skipped(self, step: int) -> None:
        """Log the steps skipped on the device since the last call, and raise `NonFiniteError` if more than
        `max_skipped` were skipped by step `step` (one synchronisation). On the host path `should_step` has
        reported every skipped step already: nothing to read back."""
        if self.skips_on_device:
            self._report_skipped(step)

    def _report_skipped(self, step: int) -> None:
        skipped = self.skipped_steps()
        if skipped.count == self._reported:
            return
        loss = self._last_skipped_loss.item()
        if skipped.count > self.max_skipped:
            raise NonFiniteError(
                f"Step {skipped.last}: the training loss is {loss} (not finite); {skipped.count} optimizer steps "
                f"had a non-finite loss by step {step}, the first at step {skipped.first}. The run stopped, and the "
                "skipped steps applied no update, so no checkpoint or model holds non-finite weights; the "
                "checkpoints saved before are intact. Lower --learning_rate, set --max_grad_norm, check the data "
                "and the starting weights, then resume with --resume_from_checkpoint latest"
                + (f" ({self.max_skipped} non-finite steps were skipped first, as --skip_nonfinite_steps allows)."
                   if self.max_skipped else ", or pass --skip_nonfinite_steps N to skip up to N such steps.")
            )
        logger.warning(
            f"Step {skipped.last}: non-finite training loss ({loss}); {skipped.count - self._reported} more "
            f"optimizer step(s) skipped without an update, {skipped.count} of at most {self.max_skipped} "
            f"(the first at step {skipped.first})."
        )
        self._reported = skipped.count
