"""Probes that check two runs took the same data and reached the same weights: SHA-256 digests.

The training scripts compute them only when asked (`--record_batches`): `BatchRecord` gathers every optimizer
step's sample indices across processes and `parameters_sha256` copies every weight to the CPU.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from torch import nn


class BatchRecord:
    """Which samples a run trained on: SHA-256 digests of sample indices, in training order.

    * `global_sha256`: for every optimizer step, the indices of the whole global batch (all processes, all
      accumulated micro-batches) sorted, then hashed in step order. Two runs with the same digest took the same
      global batches, whatever their number of processes.
    * `local_sha256`: the indices this process trained on, in order.

    Per micro-batch, `add_batch` keeps the indices where they are (no synchronisation); per optimizer step,
    `end_step` gathers them from every process and hashes them (one gather and one host copy per step). Both
    digests cover the steps taken since this launch started (a resumed run starts a new record).
    """

    def __init__(self):
        self._global = hashlib.sha256()
        self._local = hashlib.sha256()
        self._step_indices: list[torch.Tensor] = []

    def add_batch(self, indices: torch.Tensor) -> None:
        """Record one micro-batch's sample indices, shape (B,)."""
        self._step_indices.append(indices)

    def end_step(self, accelerator) -> None:
        """Close the current optimizer step on every process (a collective call)."""
        local = torch.cat(self._step_indices)
        self._step_indices = []
        self._local.update(local.cpu().numpy().astype(np.int64).tobytes())
        step = accelerator.gather(local).sort().values
        self._global.update(step.cpu().numpy().astype(np.int64).tobytes())

    @property
    def global_sha256(self) -> str:
        return self._global.hexdigest()

    @property
    def local_sha256(self) -> str:
        return self._local.hexdigest()


def parameters_sha256(module: nn.Module) -> str:
    """SHA-256 of all parameters' bytes (as float32) in order: equal digests mean bit-identical weights."""
    digest = hashlib.sha256()
    for parameter in module.parameters():
        digest.update(parameter.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
