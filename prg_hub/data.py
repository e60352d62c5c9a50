"""Image-classification data for the example scripts: loading a dataset, finding its columns, feeding torch.

`--dataset` is a Hub id (`uoft-cs/cifar10`, `zh-plus/tiny-imagenet`) or a local folder that `datasets` reads
as parquet files or as an image folder (`load_dataset(folder)` picks the format from the files). The image and
label columns are found by name (`img`/`image`, `label`/`labels`) or by feature type (`Image`, `ClassLabel`),
or named explicitly.

`get_dataloaders` turns the splits a script uses into torch data loaders of {"pixel_values", "labels", "index"}
batches, without augmentation; training batches, which are augmented on the device, come from
`prg_hub.training_data`.

Unreadable images (corrupt or truncated bytes) do not stop a run: the example is skipped with a warning that
names its index and the decoder's reason, and `collate_readable` builds each batch from the readable examples.

Grayscale and every other PIL mode: images are converted to 3-channel RGB by the image processor (a grey
image becomes three equal channels). Every PRG model is therefore RGB, the head's input is C·16² = 768 as in the
paper, and a flow pretrained on colour images can be finetuned on a grayscale dataset and the other way round.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from PIL import Image

from .image_processing_prg import PRGImageProcessing

logger = logging.getLogger(__name__)

IMAGE_COLUMN_CANDIDATES = ("img", "image")
LABEL_COLUMN_CANDIDATES = ("label", "labels")
EVAL_SPLIT_CANDIDATES = ("test", "validation", "valid", "val")


@dataclass
class ImageDataset:
    """A loaded dataset: its splits, the resolved column names and the class names (None without labels)."""

    splits: datasets.DatasetDict
    image_column: str
    label_column: str | None
    label_names: list[str] | None

    def split_name(self, name: str) -> str:
        """`name` checked against the dataset's splits; "eval" resolves to the first of test, validation, valid, val."""
        available = list(self.splits)
        if name == "eval":
            name = next((candidate for candidate in EVAL_SPLIT_CANDIDATES if candidate in self.splits), None)
            if name is None:
                raise ValueError(
                    f"No evaluation split found: the dataset's splits are {available}, none of "
                    f"{list(EVAL_SPLIT_CANDIDATES)}. Name one with --eval_split."
                )
        if name not in self.splits:
            raise ValueError(f"Split {name!r} not found: the dataset's splits are {available}.")
        return name

    def split(self, name: str, max_samples: int | None = None) -> datasets.Dataset:
        """The split `name` (see `split_name`), cut to its first `max_samples` rows when that is given."""
        split = self.splits[self.split_name(name)]
        if max_samples is not None:
            split = split.select(range(min(max_samples, len(split))))
        return split


def _resolve_column(
    columns: list[str],
    features: datasets.Features,
    requested: str | None,
    candidates: tuple[str, ...],
    feature_type: type,
    kind: str,
    option: str,
) -> str:
    """The requested column, else the first candidate name present, else the only column of `feature_type`."""
    if requested is not None:
        if requested not in columns:
            raise ValueError(f"{kind} column {requested!r} not found: the dataset's columns are {columns}.")
        return requested
    for candidate in candidates:
        if candidate in columns:
            return candidate
    typed = [name for name in columns if isinstance(features.get(name), feature_type)]
    if len(typed) == 1:
        return typed[0]
    raise ValueError(
        f"No {kind.lower()} column found: looked for {list(candidates)} or a single {feature_type.__name__} "
        f"feature, but the dataset's columns are {columns}. Name it with {option}."
    )


def _load_splits(name_or_path: str, cache_dir: str | None) -> datasets.DatasetDict:
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return datasets.load_dataset(str(path), cache_dir=cache_dir)
    if path.exists():
        raise ValueError(
            f"--dataset {name_or_path!r} is a file; give the folder that holds the parquet files or images."
        )
    if path.is_absolute() or name_or_path.startswith("."):
        raise FileNotFoundError(
            f"No folder at {name_or_path!r}. --dataset takes a local folder of parquet or imagefolder data, or a Hub "
            "dataset id such as uoft-cs/cifar10."
        )
    return datasets.load_dataset(name_or_path, cache_dir=cache_dir)


def load_image_dataset(
    name_or_path: str,
    image_column: str | None = None,
    label_column: str | None = None,
    require_labels: bool = True,
    cache_dir: str | None = None,
) -> ImageDataset:
    """Load a Hub dataset or a local folder and resolve its image and label columns.

    Args:
        name_or_path: Hub id or local folder (parquet or imagefolder).
        image_column, label_column: column names; detected when None (see the module docstring).
        require_labels: raise when no label column is found; otherwise the dataset is used without labels.
        cache_dir: the `datasets` cache folder.

    Raises:
        ValueError naming the missing column (or split) and listing the columns (or splits) that exist.
    """
    splits = _load_splits(name_or_path, cache_dir)
    first = next(iter(splits.values()))
    columns, features = list(first.column_names), first.features
    image_column = _resolve_column(
        columns, features, image_column, IMAGE_COLUMN_CANDIDATES, datasets.Image, "Image", "--image_column"
    )
    try:
        label_column = _resolve_column(
            columns, features, label_column, LABEL_COLUMN_CANDIDATES, datasets.ClassLabel, "Label", "--label_column"
        )
    except ValueError:
        if require_labels or label_column is not None:
            raise
        return ImageDataset(splits, image_column, None, None)

    label_feature = features[label_column]
    if isinstance(label_feature, datasets.Value) and label_feature.dtype == "string":
        splits = splits.class_encode_column(label_column)
        label_feature = splits[next(iter(splits))].features[label_column]
    if isinstance(label_feature, datasets.ClassLabel):
        label_names = list(label_feature.names)
    else:
        largest = max(int(max(split[label_column])) for split in splits.values() if len(split))
        label_names = [str(index) for index in range(largest + 1)]
    return ImageDataset(splits, image_column, label_column, label_names)


class ImageClassificationDataset(torch.utils.data.Dataset):
    """A `datasets` split as a torch dataset of {"pixel_values": (3, H, W) in [-1, 1], "labels": int, "index": int}.

    Images go through `processor` (RGB conversion, resize, normalisation). "labels" is absent when `label_column`
    is None.
    """

    def __init__(
        self,
        split: datasets.Dataset,
        image_column: str,
        label_column: str | None,
        processor: PRGImageProcessing,
    ):
        self.split = split
        self.image_column = image_column
        self.label_column = label_column
        self.processor = processor

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> dict | None:
        """The example at `index`, or None (with a warning naming it) when its image cannot be decoded."""
        example = read_example(self.split, index, self.image_column)
        if example is None:
            return None
        item = {"pixel_values": self.processor(example[self.image_column], return_tensors="pt")["pixel_values"][0],
                "index": index}
        if self.label_column is not None:
            item["labels"] = int(example[self.label_column])
        return item


def read_example(split: datasets.Dataset, index: int, image_column: str) -> dict | None:
    """Row `index` of `split` with its image decoded, or None (with a warning naming it) when the image cannot be
    decoded. Raises TypeError when `image_column` does not hold images."""
    try:
        example = split[index]
    except (OSError, SyntaxError, ValueError) as error:  # what PIL raises for corrupt or truncated files
        logger.warning(f"Skipping example {index}: its image cannot be decoded ({type(error).__name__}: {error}).")
        return None
    if not isinstance(example[image_column], Image.Image):
        raise TypeError(
            f"Column {image_column!r} holds {type(example[image_column]).__name__}, not images; choose the image "
            "column with --image_column."
        )
    return example


def collate_readable(items: list[dict | None]) -> dict:
    """`default_collate` of the examples whose image could be decoded (`ImageClassificationDataset` gives None
    for the others). A batch with no readable image at all is an error naming the problem."""
    readable = [item for item in items if item is not None]
    if not readable:
        raise ValueError(f"None of the {len(items)} images of this batch can be decoded; check the dataset files.")
    return torch.utils.data.default_collate(readable)


def get_dataloaders(
    image_data: ImageDataset,
    processor: PRGImageProcessing,
    *,
    train_split: str | None = None,
    eval_split: str | None = None,
    train_batch_size: int = 1,
    eval_batch_size: int = 1,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    shuffle: bool = True,
    drop_last: bool = False,
    labels: bool = True,
    seed: int = 0,
    num_workers: int = 0,
) -> tuple[torch.utils.data.DataLoader | None, torch.utils.data.DataLoader | None]:
    """(train, eval) data loaders of `ImageClassificationDataset`s, each None when its split is not asked for.

    Args:
        image_data: the loaded dataset (`load_image_dataset`).
        processor: converts the images (RGB, size, [-1, 1]).
        train_split, eval_split: split names (see `ImageDataset.split_name`; "eval" finds the evaluation split),
            each cut to its first `max_train_samples` / `max_eval_samples` rows when that is given.
        train_batch_size, eval_batch_size: per-process batch sizes once `accelerator.prepare` shards the loaders.
        shuffle: shuffle the training split, in an order drawn from a generator of its own seeded with `seed`:
            starting an epoch then never draws from the global RNG (the model's noise source), so a resumed run
            draws exactly the noise an uninterrupted one does. Without it the training split is read in order.
        drop_last: drop the training split's last incomplete batch.
        labels: give "labels" (when the dataset has a label column).
        num_workers: data-loader worker processes.

    The evaluation split is read in order. Batches hold "pixel_values" (B, 3, H, W) in
    [-1, 1], "index" (B,) and, with `labels`, "labels" (B,); unreadable images are left out (`collate_readable`).
    """
    label_column = image_data.label_column if labels else None

    def dataset(split: str, max_samples: int | None):
        return ImageClassificationDataset(image_data.split(split, max_samples), image_data.image_column, label_column,
                                          processor)

    train_dataloader = eval_dataloader = None
    if train_split is not None:
        train_dataloader = torch.utils.data.DataLoader(
            dataset(train_split, max_train_samples),
            batch_size=train_batch_size,
            shuffle=shuffle,
            generator=torch.Generator().manual_seed(seed) if shuffle else None,
            drop_last=drop_last,
            num_workers=num_workers,
            collate_fn=collate_readable,
        )
    if eval_split is not None:
        eval_dataloader = torch.utils.data.DataLoader(
            dataset(eval_split, max_eval_samples),
            batch_size=eval_batch_size,
            num_workers=num_workers,
            collate_fn=collate_readable,
        )
    return train_dataloader, eval_dataloader
