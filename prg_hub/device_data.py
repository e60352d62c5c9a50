"""The training split decoded once and kept on the accelerator: batches without per-sample work on the host.

`--dataloader` chooses where a training script's batches come from:

| choice   | batches                                                                                      |
|----------|----------------------------------------------------------------------------------------------|
| `stream` | `prg_hub.data`: every epoch, each image is decoded and augmented with PIL (optionally in workers) |
| `device` | this module: the split as one uint8 tensor (N, 3, H, W) on the device; a batch is a gather     |
| `auto`   | `device` when the augmentation runs there and the split fits (`fits_on_device`), else `stream` |

The device path yields the same batches as the streaming one for the same seed and process count: its data
loader is an ordinary `DataLoader` over sample indices, built with the same batch size, seeded shuffle and
drop_last, so `accelerator.prepare` (seedable sampler, per-process shards of every global batch) and
`accelerator.skip_first_batches` (resuming) treat both alike. Only the collate function differs: it gathers the
batch's images on the device, augments them there (`prg_hub.batched_augment`: per-sample random crop with padding
and flip) and normalises them through a 256-entry table computed by the image processor itself, so that without
augmentation the pixel values equal the streaming path's bit for bit.

RandAugment and random erasing stay on the streaming path (`auto` picks it for them; `device` refuses them).
Images are converted to RGB and resized to the processor's size with the processor's filter when decoded, as the
streaming path does before augmenting. Memory: N·3·H·W bytes per process (150 MB for CIFAR-10's 50,000 images).
"""

from __future__ import annotations

import os

import datasets
import numpy as np
import torch
from PIL import Image

from .augment import TrainAugmentation
from .batched_augment import crop_flip, crop_flip_parameters
from .data import ImageDataset
from .image_conversion import to_rgb
from .image_processing_prg import PRGImageProcessing

DATALOADERS: tuple[str, ...] = ("auto", "device", "stream")
DEVICE_MEMORY_FRACTION = 0.25  # `auto` keeps a split on the device only when it takes at most this share of it


def device_memory_bytes(device: torch.device) -> int:
    """Memory a resident split may draw on: free accelerator memory on CUDA, physical RAM on the CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    if device.type == "cpu":
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return 0


def fits_on_device(num_images: int, image_size: int, device: torch.device, memory_bytes: int | None = None) -> bool:
    """True when num_images · 3 · image_size² bytes are at most `DEVICE_MEMORY_FRACTION` of `memory_bytes`
    (default: `device_memory_bytes(device)`)."""
    memory_bytes = device_memory_bytes(device) if memory_bytes is None else memory_bytes
    return num_images * 3 * image_size**2 <= DEVICE_MEMORY_FRACTION * memory_bytes


def runs_on_device(augmentation: TrainAugmentation) -> bool:
    """The augmentation has a batched device version: none, flip or crop with flip, without random erasing."""
    return not augmentation.randaugment and augmentation.random_erasing == 0


def resolve_dataloader(choice: str, augmentation: TrainAugmentation, num_images: int, image_size: int,
                       device: torch.device, memory_bytes: int | None = None) -> str:
    """"device" or "stream" for `--dataloader choice` (see the module docstring).

    Raises ValueError for an unknown choice, or for "device" with an augmentation only the stream path has.
    """
    if choice not in DATALOADERS:
        raise ValueError(f"Unknown dataloader {choice!r}: choose one of {list(DATALOADERS)}.")
    if choice == "device" and not runs_on_device(augmentation):
        raise ValueError(
            f"--dataloader device runs crop and flip only; augmentation {augmentation.name!r} with random erasing "
            f"{augmentation.random_erasing} needs --dataloader stream (or auto)."
        )
    if choice == "auto":
        fits = fits_on_device(num_images, image_size, device, memory_bytes)
        return "device" if runs_on_device(augmentation) and fits else "stream"
    return choice


def decode_split(split: datasets.Dataset, image_column: str, processor: PRGImageProcessing) -> torch.Tensor:
    """Every image of `split`, converted to RGB and resized to the processor's size: uint8 (N, 3, H, W) on the CPU.

    Raises ValueError naming the first image that cannot be decoded (the streaming path skips such images).
    """
    height, width = processor.size["height"], processor.size["width"]
    images = torch.empty((len(split), 3, height, width), dtype=torch.uint8)
    for index in range(len(split)):
        try:
            image = split[index][image_column]
        except (OSError, SyntaxError, ValueError) as error:
            raise ValueError(
                f"Example {index} cannot be decoded ({type(error).__name__}: {error}); the device data path needs "
                "every image: use --dataloader stream, which skips unreadable ones."
            ) from error
        if not isinstance(image, Image.Image):
            raise TypeError(f"Column {image_column!r} holds {type(image).__name__}, not images; use --image_column.")
        image = to_rgb(image)
        if image.size != (width, height):
            image = image.resize((width, height), processor.resample)
        images[index] = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
    return images


def normalisation_table(processor: PRGImageProcessing) -> torch.Tensor:
    """(3, 256) float32: entry [c, v] is the processor's output for value v in channel c, found by running the
    processor on a 1 × 256 image whose pixel v holds v in every channel."""
    ramp = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2)  # (1, 256, 3)
    table = processor(Image.fromarray(ramp), do_resize=False, return_tensors="pt")["pixel_values"]
    return table[0, :, 0, :].float()


class DeviceImageDataset(torch.utils.data.Dataset):
    """A decoded split on a device. Item i is the sample index i; `collate` turns a list of indices into a batch.

    Args:
        images: uint8 (N, 3, H, W), on the device the batches are made on.
        labels: long (N,) on the same device, or None.
        table: (3, 256) normalisation table (`normalisation_table`), on the same device.
        augmentation: crop and flip parameters (see `runs_on_device`); None for none.
        seed: the augmentation's seed; with `set_epoch`, the key (seed, epoch, index) of each sample's draw.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None, table: torch.Tensor,
                 augmentation: TrainAugmentation | None = None, seed: int = 0):
        self.images = images
        self.labels = labels
        self.table = table
        self.augmentation = None if augmentation is None or augmentation.is_identity else augmentation
        self.seed = seed
        self.epoch = 0
        self._channels = torch.arange(3, device=images.device).view(1, 3, 1, 1)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> int:
        return index

    def __getitems__(self, indices: list[int]) -> list[int]:
        return indices

    def collate(self, indices: list[int]) -> dict:
        """{"pixel_values": (B, 3, H, W) float32 in [-1, 1], "index": (B,), "labels": (B,) when kept}, all on the
        images' device: gather, crop and flip (per sample), then the normalisation table."""
        index = torch.tensor(indices, dtype=torch.long).to(self.images.device, non_blocking=True)
        images = self.images[index]
        if self.augmentation is not None:
            padding = self.augmentation.crop_padding
            top, left, flipped = crop_flip_parameters(self.seed, self.epoch, index, padding, self.augmentation.flip)
            images = crop_flip(images, top, left, flipped, padding)
        batch = {"pixel_values": self.table[self._channels, images.long()], "index": index}
        if self.labels is not None:
            batch["labels"] = self.labels[index]
        return batch


def device_train_dataloader(
    image_data: ImageDataset,
    processor: PRGImageProcessing,
    device: torch.device,
    *,
    train_split: str,
    train_batch_size: int,
    max_train_samples: int | None = None,
    augmentation: TrainAugmentation | None = None,
    drop_last: bool = False,
    labels: bool = True,
    seed: int = 0,
) -> torch.utils.data.DataLoader:
    """The training loader of `prg_hub.data.get_dataloaders` (same arguments, shuffled with its own generator
    seeded with `seed`), with the split decoded once onto `device` and batches made there (no workers)."""
    split = image_data.split(train_split, max_train_samples)
    label_column = image_data.label_column if labels else None
    dataset = DeviceImageDataset(
        decode_split(split, image_data.image_column, processor).to(device),
        torch.tensor(list(split[label_column]), dtype=torch.long, device=device) if label_column is not None else None,
        normalisation_table(processor).to(device),
        augmentation,
        seed=seed,
    )
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=train_batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
        drop_last=drop_last,
        collate_fn=dataset.collate,
    )
