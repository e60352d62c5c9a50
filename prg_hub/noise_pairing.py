"""The noise of every pretraining batch, drawn and paired with its images one batch ahead, in a worker thread.

Pretraining regresses v_θ(α_t·x + σ_t·ε, t) onto α'_t·x + σ'_t·ε. For OT-CFM the pairing of the batch x (B, C, H, W)
with its noise ε is the exact minibatch optimal transport permutation

    π = argmin_π Σ_i ‖x_i − ε_π(i)‖²        (`paths.optimal_transport_permutation`, Hungarian algorithm)

which is solved on the CPU: done inside the step, it waits for the accelerator to finish all queued work before
it can copy the B × B cost matrix to the host. `NoisePairing.batches` instead pairs batch k + 1 in a worker thread
while the main thread runs step k, and hands over ε[π] with the batch as `batch["noise"]`, for
`model(pixel_values, noise=batch["noise"])`. On CUDA the worker computes on a stream of its own, which waits only for
the batch's images, and the main stream waits for the worker's stream (no host synchronisation in the main thread).

Every batch's noise comes from a generator of its own seeded by (seed, process index, epoch, batch number in the
epoch): processes draw different noise, and a run resumed mid-epoch draws exactly the noise of an uninterrupted run
without any generator state in the checkpoint. The pairing stays exact: π is a permutation of the batch.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sized
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .paths import ProbabilityPath


def noise_seed(seed: int, process_index: int, epoch: int, position: int) -> int:
    """A 63-bit seed for batch `position` of `epoch` on process `process_index` (numpy's SeedSequence hash)."""
    state = np.random.SeedSequence([seed, process_index, epoch, position]).generate_state(2, np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1


class NoisePairing:
    """Draws each batch's noise ε (B, C, H, W) and couples it with the images as `path.couple` does.

    Args:
        path: the probability path (`paths.get_path`); OT-CFM permutes ε, the other paths keep it as drawn.
        seed: the run's seed.
        process_index: this process's index (`accelerator.process_index`).
    """

    def __init__(self, path: ProbabilityPath, seed: int, process_index: int = 0):
        self.path = path
        self.seed = seed
        self.process_index = process_index

    def paired_noise(self, pixel_values: torch.Tensor, epoch: int, position: int) -> torch.Tensor:
        """ε drawn for (epoch, position), shaped and typed like `pixel_values`, then coupled with it: for OT-CFM
        ε[π] with π the optimal permutation above."""
        generator = torch.Generator(device=pixel_values.device)
        generator.manual_seed(noise_seed(self.seed, self.process_index, epoch, position))
        noise = torch.randn(pixel_values.shape, generator=generator, device=pixel_values.device,
                            dtype=pixel_values.dtype)
        return self.path.couple(pixel_values, noise)[1]

    def _paired(self, batch: dict, epoch: int, position: int, ready: torch.cuda.Event | None,
                stream: torch.cuda.Stream | None) -> dict:
        """In the worker thread: the batch with "noise" added (on `stream` after `ready`, on CUDA)."""
        if stream is None:
            return {**batch, "noise": self.paired_noise(batch["pixel_values"], epoch, position)}
        with torch.cuda.stream(stream):
            stream.wait_event(ready)
            noise = self.paired_noise(batch["pixel_values"], epoch, position)
        return {**batch, "noise": noise}

    def batches(self, batches: Sized, epoch: int, start: int = 0) -> Iterator[dict]:
        """`batches` of `epoch` (a sized iterable, numbered from `start`, the batches a resumed run skipped) in order,
        each with its paired noise as "noise"; the worker pairs the next batch while the caller trains on the
        current one.

        The last batch is taken only once the one before it is handed over: a prepared data loader flags the end of
        its epoch as it hands over its last batch, and Accelerate ends an incomplete gradient accumulation on that
        flag, so taking it early would move the epoch's last optimizer step.
        """
        last = start + len(batches) - 1
        iterator, stream, pending = iter(batches), None, None
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="noise-pairing") as worker:
            for position in itertools.count(start):
                if position == last and pending is not None:
                    yield self._handed_over(pending.result(), stream)
                    pending = None
                batch = next(iterator, None)
                if batch is None:
                    break
                ready = None
                if batch["pixel_values"].device.type == "cuda":
                    stream = stream or torch.cuda.Stream(batch["pixel_values"].device)
                    ready = torch.cuda.Event()
                    ready.record()  # the batch's images are made on the current stream up to here
                submitted = worker.submit(self._paired, batch, epoch, position, ready, stream)
                if pending is not None:
                    yield self._handed_over(pending.result(), stream)
                pending = submitted
            if pending is not None:
                yield self._handed_over(pending.result(), stream)

    @staticmethod
    def _handed_over(batch: dict, stream: torch.cuda.Stream | None) -> dict:
        """On CUDA, make the current stream wait for the worker's and tell the allocator it uses the noise."""
        if stream is not None:
            torch.cuda.current_stream().wait_stream(stream)
            batch["noise"].record_stream(torch.cuda.current_stream())
        return batch
