"""Where a training run stands: epochs, optimizer steps with gradient accumulation, and the resume point.

An epoch of `batches_per_epoch` per-process batches has steps_per_epoch = ⌈batches_per_epoch / A⌉ optimizer steps,
A = gradient_accumulation_steps (Accelerate steps on the epoch's last batch even when its accumulation is
incomplete). A run lasts `max_train_steps` optimizer steps (default: num_train_epochs · steps_per_epoch), that is
⌈max_train_steps / steps_per_epoch⌉ epochs. After `global_step` steps it stands in epoch
⌊global_step / steps_per_epoch⌋, of which it has trained on (global_step mod steps_per_epoch) · A batches: a run
resumed from a checkpoint skips exactly those, so it sees the batches an uninterrupted run would.

The training scripts keep their loop in view and use this for the arithmetic:

    progress = TrainingProgress(len(train_dataloader), accumulation, num_train_epochs, max_train_steps)
    progress.resume(accelerator, output_dir, "latest")
    for epoch in progress.remaining_epochs():
        for batch in progress.epoch_batches(accelerator, train_dataloader, epoch):
            with accelerator.accumulate(model):
                ...  # forward, backward, optimizer step
            if accelerator.sync_gradients:
                progress.global_step += 1
                if progress.finished:
                    break
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from pathlib import Path

from accelerate.logging import get_logger
from diffusers.training_utils import EMAModel

from .checkpointing import checkpoint_step, load_checkpoint, resolve_checkpoint

logger = get_logger(__name__)


def resume_position(global_step: int, batches_per_epoch: int, gradient_accumulation_steps: int) -> tuple[int, int]:
    """(epoch, batches of that epoch already trained on) after `global_step` optimizer steps."""
    steps_per_epoch = math.ceil(batches_per_epoch / gradient_accumulation_steps)
    epoch, step_in_epoch = divmod(global_step, steps_per_epoch)
    return epoch, step_in_epoch * gradient_accumulation_steps


class TrainingProgress:
    """The step arithmetic of a run (see the module docstring) and its optimizer step count, `global_step`.

    The training loop adds 1 to `global_step` after every optimizer step, skipped non-finite steps included.
    """

    def __init__(self, batches_per_epoch: int, gradient_accumulation_steps: int, num_train_epochs: int,
                 max_train_steps: int | None = None):
        if batches_per_epoch < 1:
            raise ValueError("The training data loader yields no batch: the training split is empty.")
        self.batches_per_epoch = batches_per_epoch
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.steps_per_epoch = math.ceil(batches_per_epoch / gradient_accumulation_steps)
        self.max_train_steps = max_train_steps or num_train_epochs * self.steps_per_epoch
        self.num_train_epochs = math.ceil(self.max_train_steps / self.steps_per_epoch)
        self.global_step = 0

    @property
    def finished(self) -> bool:
        """All `max_train_steps` optimizer steps are done."""
        return self.global_step >= self.max_train_steps

    @property
    def epoch_finished(self) -> bool:
        """The last optimizer step ended an epoch, or the run."""
        return self.global_step % self.steps_per_epoch == 0 or self.finished

    @property
    def epochs_done(self) -> float:
        """Epochs trained so far, global_step / steps_per_epoch."""
        return self.global_step / self.steps_per_epoch

    def resume(self, accelerator, output_dir: str | Path, resume_from_checkpoint: str | None,
               ema: EMAModel | None = None) -> Path | None:
        """Restore the training state (and `ema`) of the checkpoint `resume_from_checkpoint` names: None (a fresh
        run), "latest" (the run's newest checkpoint, if it has one) or a checkpoint folder; `global_step` becomes
        its step. Returns the checkpoint, or None when the run starts from step 0."""
        checkpoint = resolve_checkpoint(output_dir, resume_from_checkpoint)
        if checkpoint is None:
            if resume_from_checkpoint is not None:
                logger.info("No checkpoint yet: starting a new run")
            return None
        load_checkpoint(accelerator, checkpoint, ema)
        self.global_step = checkpoint_step(checkpoint)
        epoch, _ = resume_position(self.global_step, self.batches_per_epoch, self.gradient_accumulation_steps)
        logger.info(f"Resumed from {checkpoint} at step {self.global_step} (epoch {epoch})")
        return checkpoint

    @property
    def batches_trained_in_epoch(self) -> int:
        """Batches of the current epoch already trained on: (global_step mod steps_per_epoch) · A."""
        return resume_position(self.global_step, self.batches_per_epoch, self.gradient_accumulation_steps)[1]

    def remaining_epochs(self) -> Iterator[int]:
        """The epochs still to train, from the one the run stands in, until it is finished (none if it is)."""
        epoch, _ = resume_position(self.global_step, self.batches_per_epoch, self.gradient_accumulation_steps)
        while not self.finished:
            yield epoch
            epoch += 1

    def epoch_batches(self, accelerator, dataloader, epoch: int) -> Iterable:
        """The batches of `epoch` still to train on, from the prepared `dataloader`.

        Sets the epoch of the data order (the seeded sampler); in the epoch a run resumed in, the batches it already
        trained on are skipped.
        """
        dataloader.set_epoch(epoch)
        trained = self.batches_trained_in_epoch
        if not trained:
            return dataloader
        batches = accelerator.skip_first_batches(dataloader, trained)
        batches.set_epoch(epoch)  # the epoch's shuffle (older accelerate restarts at epoch 0's)
        return batches
