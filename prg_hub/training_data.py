"""Where a training script's batches come from: the split decoded once onto the accelerator, or streamed.

`--dataloader` chooses the path:

| choice   | batches                                                                                          |
|----------|--------------------------------------------------------------------------------------------------|
| `device` | the split decoded once to one uint8 tensor (N, 3, H, W) on the device; a batch is a gather there  |
| `stream` | every epoch each image is decoded again, in data-loader workers, and its batch copied to the device |
| `auto`   | `device` when the split fits (`fits_on_device`), else `stream`                                    |

Both give batches {"images": uint8 (B, 3, H, W), "index": (B,), "labels": (B,)} ("labels" when asked for), with
every image converted to RGB and resized to the processor's size with the processor's filter. The training
script then augments and normalises them on the device in one batched call (`prg_hub.augment.TrainAugmentation`),
keyed by each sample's index, so both paths train on identical pixel values.

Both loaders are ordinary `DataLoader`s over sample indices with the same batch size, seeded shuffle and
drop_last: `accelerator.prepare` (seedable sampler, per-process shards of every global batch) and
`accelerator.skip_first_batches` (resuming) treat them alike, and they yield the same samples in the same order.
The device path's collate function gathers the batch on the device, with no worker and no host copy.
Memory: N·3·H·W bytes per process (150 MB for CIFAR-10's 50,000 images at 32 px).

Unreadable images: the stream path skips them with a warning (its batch is one sample short); the device path
needs every image, and names the first one it cannot decode.
"""

from __future__ import annotations

import os

import datasets
import numpy as np
import torch
from PIL import Image

from .data import ImageDataset, collate_readable, read_example
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


def resolve_dataloader(choice: str, num_images: int, image_size: int, device: torch.device,
                       memory_bytes: int | None = None) -> str:
    """"device" or "stream" for `--dataloader choice` (see the module docstring); ValueError for another choice."""
    if choice not in DATALOADERS:
        raise ValueError(f"Unknown dataloader {choice!r}: choose one of {list(DATALOADERS)}.")
    if choice == "auto":
        return "device" if fits_on_device(num_images, image_size, device, memory_bytes) else "stream"
    return choice


def decode_image(image: Image.Image, processor: PRGImageProcessing) -> torch.Tensor:
    """An image converted to RGB and resized to the processor's size with its filter: uint8 (3, H, W)."""
    size = (processor.size["width"], processor.size["height"])
    image = to_rgb(image)
    if image.size != size:
        image = image.resize(size, processor.resample)
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


class StreamedImageDataset(torch.utils.data.Dataset):
    """A `datasets` split decoded image by image: item i is {"images": uint8 (3, H, W), "index": i, "labels": int}
    ("labels" when `label_column` is given), or None when its image cannot be decoded (`collate_readable`)."""

    def __init__(self, split: datasets.Dataset, image_column: str, label_column: str | None,
                 processor: PRGImageProcessing):
        self.split = split
        self.image_column = image_column
        self.label_column = label_column
        self.processor = processor

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> dict | None:
        example = read_example(self.split, index, self.image_column)
        if example is None:
            return None
        item = {"images": decode_image(example[self.image_column], self.processor), "index": index}
        if self.label_column is not None:
            item["labels"] = int(example[self.label_column])
        return item


class ResidentImageDataset(torch.utils.data.Dataset):
    """A split held on a device as uint8 images (N, 3, H, W) and labels (N,) or None. Item i is the index i;
    `collate` turns a list of indices into a batch gathered on the device."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None):
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> int:
        return index

    def __getitems__(self, indices: list[int]) -> list[int]:
        return indices

    def collate(self, indices: list[int]) -> dict:
        """{"images": uint8 (B, 3, H, W), "index": (B,), "labels": (B,) when kept}, all on the images' device."""
        index = torch.tensor(indices, dtype=torch.long)
        if self.images.is_cuda:  # from pinned memory the copy is queued without waiting for the device
            index = index.pin_memory()
        index = index.to(self.images.device, non_blocking=True)
        batch = {"images": self.images[index], "index": index}
        if self.labels is not None:
            batch["labels"] = self.labels[index]
        return batch


def decode_split(split: datasets.Dataset, image_column: str, processor: PRGImageProcessing) -> torch.Tensor:
    """Every image of `split` through `decode_image`: uint8 (N, 3, H, W) on the CPU.

    Raises ValueError naming the first image that cannot be decoded (`read_example` logs why), TypeError when
    `image_column` does not hold images.
    """
    height, width = processor.size["height"], processor.size["width"]
    images = torch.empty((len(split), 3, height, width), dtype=torch.uint8)
    for index in range(len(split)):
        example = read_example(split, index, image_column)
        if example is None:
            raise ValueError(
                f"Example {index} cannot be decoded (the warning above gives the reason); the device data path needs "
                "every image: use --dataloader stream, which skips unreadable ones."
            )
        images[index] = decode_image(example[image_column], processor)
    return images


def get_train_dataloader(
    image_data: ImageDataset,
    processor: PRGImageProcessing,
    device: torch.device,
    *,
    dataloader: str = "auto",
    train_split: str = "train",
    train_batch_size: int,
    max_train_samples: int | None = None,
    drop_last: bool = False,
    labels: bool = True,
    seed: int = 0,
    num_workers: int = 0,
) -> tuple[torch.utils.data.DataLoader, str]:
    """The training loader and its path ("device" or "stream", from `dataloader`: see `resolve_dataloader`).

    Args:
        image_data: the loaded dataset (`prg_hub.data.load_image_dataset`).
        processor: gives the training size and resize filter.
        device: the device a resident split lives on.
        train_split, max_train_samples: the split and how many of its first rows to use.
        train_batch_size: per-process batch size once `accelerator.prepare` shards the loader.
        drop_last: drop the last incomplete batch.
        labels: give "labels" (when the dataset has a label column).
        seed: the shuffle's own generator's seed (starting an epoch never draws from the global RNG, so a resumed
            run draws exactly the noise an uninterrupted one does).
        num_workers: worker processes of the stream path.
    """
    split = image_data.split(train_split, max_train_samples)
    path = resolve_dataloader(dataloader, len(split), processor.size["height"], device)
    label_column = image_data.label_column if labels else None
    if path == "device":
        label_values = None if label_column is None else torch.tensor(list(split[label_column]), dtype=torch.long)
        dataset = ResidentImageDataset(decode_split(split, image_data.image_column, processor).to(device),
                                       None if label_values is None else label_values.to(device))
        collate, workers = dataset.collate, 0
    else:
        dataset = StreamedImageDataset(split, image_data.image_column, label_column, processor)
        collate, workers = collate_readable, num_workers
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=train_batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
        drop_last=drop_last,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=path == "stream" and device.type == "cuda",
    )
    return loader, path
