"""Non-finite numbers (NaN, ±Inf) are never trained on, saved, pushed or reported as results.

A single NaN weight turns every output of a PRG model into NaN: the reversed ODE carries it through every solver
step, and argmax over NaN logits still "predicts" a class. So each boundary where numbers leave the package checks
them and raises `NonFiniteError`, naming what holds them and how many there are:

* weights: `save_pretrained`, `push_to_hub`, `prg-hub push` and the training scripts' checkpoints;
* outputs: a model in eval mode refuses to return non-finite features or logits;
* losses: the training scripts stop at the first non-finite loss (`NonFiniteLossGuard` in `prg_hub.training`).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

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
