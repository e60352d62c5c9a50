"""Training batches: the split decoded once onto the device and the streamed one give the same batches."""

import datasets
import numpy as np
import pytest
import torch
from accelerate.data_loader import prepare_data_loader, skip_first_batches
from PIL import Image

from prg_hub.data import load_image_dataset
from prg_hub.image_processing_prg import PRGImageProcessorPil
from prg_hub.training_data import decode_split, fits_on_device, get_train_dataloader, resolve_dataloader

SIZE = 8
NUM_TRAIN = 22  # not a multiple of the batch: drop_last matters
SEED = 3


@pytest.fixture(scope="module")
def image_data(tmp_path_factory):
    rng = np.random.default_rng(0)
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"])})
    folder = tmp_path_factory.mktemp("device-data")
    for split, count in (("train", NUM_TRAIN), ("test", 4)):
        images = [Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)) for _ in range(count)]
        table = datasets.Dataset.from_dict({"img": images, "label": [i % 3 for i in range(count)]}, features=features)
        table.to_parquet(str(folder / f"{split}-00000-of-00001.parquet"))
    return load_image_dataset(str(folder))


def _loaders(image_data, batch_size=3, drop_last=True, max_train_samples=None):
    processor = PRGImageProcessorPil(size={"height": SIZE, "width": SIZE})
    options = dict(train_split="train", train_batch_size=batch_size, drop_last=drop_last, seed=SEED,
                   max_train_samples=max_train_samples)
    cpu = torch.device("cpu")
    stream, stream_path = get_train_dataloader(image_data, processor, cpu, dataloader="stream", **options)
    device, device_path = get_train_dataloader(image_data, processor, cpu, dataloader="device", **options)
    assert (stream_path, device_path) == ("stream", "device")
    return stream, device


def _shard(dataloader, num_processes, process_index):
    """The loader as `accelerator.prepare` gives it to one of `num_processes` processes (seedable sampler)."""
    return prepare_data_loader(dataloader, num_processes=num_processes, process_index=process_index,
                               use_seedable_sampler=True, data_seed=SEED)


def _epoch(dataloader, epoch):
    dataloader.set_epoch(epoch)
    return list(dataloader)


@pytest.mark.parametrize("num_processes", [1, 2])
def test_device_path_gives_the_stream_path_batches_per_process_epoch_and_resume(image_data, num_processes):
    """Same sample indices, labels and bit-identical images, step by step, on every process and after a resume."""
    stream, device = _loaders(image_data)
    orders = []
    for process_index in range(num_processes):
        stream_shard, device_shard = _shard(stream, num_processes, process_index), _shard(device, num_processes,
                                                                                          process_index)
        for epoch in (0, 1):
            stream_batches, device_batches = _epoch(stream_shard, epoch), _epoch(device_shard, epoch)
            assert len(stream_batches) == len(device_batches) == NUM_TRAIN // (3 * num_processes)
            for stream_batch, device_batch in zip(stream_batches, device_batches):
                assert device_batch["index"].tolist() == stream_batch["index"].tolist()
                assert device_batch["labels"].tolist() == stream_batch["labels"].tolist()
                assert device_batch["images"].dtype == torch.uint8
                assert torch.equal(device_batch["images"], stream_batch["images"])
            orders.append([batch["index"].tolist() for batch in device_batches])
            # Resuming after one batch of this epoch, in a new process (fresh loaders), as
            # `TrainingProgress.epoch_batches` does: both skip it and go on with the same batches.
            for loader in (device, stream):
                fresh = _shard(loader, num_processes, process_index)
                fresh.set_epoch(epoch)
                resumed = skip_first_batches(fresh, 1)
                resumed.set_epoch(epoch)
                assert [batch["index"].tolist() for batch in resumed] == orders[-1][1:]
    assert orders[0] != orders[1]  # a new shuffle every epoch
    if num_processes == 2:  # the processes train on disjoint shards
        first, second = {i for b in orders[0] for i in b}, {i for b in orders[2] for i in b}
        assert not first & second


def test_both_paths_give_identical_augmented_pixel_values(image_data):
    """The augmentation is keyed by sample: the same batch from either path trains on the same pixel values."""
    augment = pytest.importorskip("prg_hub.augment", reason="the training augmentation needs torchvision")
    processor = PRGImageProcessorPil(size={"height": SIZE, "width": SIZE})
    augmentation = augment.TrainAugmentation("randaugment", processor, random_erasing=0.5, seed=SEED)
    stream, device = (_shard(loader, 1, 0) for loader in _loaders(image_data))
    for epoch in (0, 1):
        for stream_batch, device_batch in zip(_epoch(stream, epoch), _epoch(device, epoch), strict=True):
            stream_pixels = augmentation(stream_batch["images"], stream_batch["index"], epoch)
            device_pixels = augmentation(device_batch["images"], device_batch["index"], epoch)
            assert torch.equal(stream_pixels, device_pixels)
            plain = augment.TrainAugmentation("none", processor)(device_batch["images"], device_batch["index"], 0)
            assert not torch.equal(device_pixels, plain)


def test_decoded_images_are_the_processors_rgb_resized_images(image_data):
    processor = PRGImageProcessorPil(size={"height": 4, "width": 4})
    images = decode_split(image_data.split("train"), "img", processor)
    assert images.shape == (NUM_TRAIN, 3, 4, 4) and images.dtype == torch.uint8
    expected = processor(image_data.split("train")[2]["img"], return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close((images[2].float() / 255 - 0.5) / 0.5, expected, rtol=0, atol=1e-6)


def test_auto_keeps_the_split_on_the_device_when_it_fits():
    cpu = torch.device("cpu")
    cifar_bytes = 50_000 * 3 * 32 * 32
    assert resolve_dataloader("auto", 50_000, 32, cpu, memory_bytes=4 * cifar_bytes) == "device"
    assert resolve_dataloader("auto", 50_000, 32, cpu, memory_bytes=4 * cifar_bytes - 1) == "stream"
    assert resolve_dataloader("stream", 50_000, 32, cpu) == "stream"
    assert resolve_dataloader("device", 10**9, 32, cpu) == "device"  # asked for: no size check
    assert fits_on_device(1000, 32, cpu) and not fits_on_device(10**13, 32, cpu)  # against this machine's RAM
    with pytest.raises(ValueError, match=r"'disk'.*\['auto', 'device', 'stream'\]"):
        resolve_dataloader("disk", 10, 32, cpu)


def test_an_unreadable_image_is_skipped_when_streaming_and_named_by_the_device_path(tmp_path, caplog):
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    good = [Image.fromarray(np.full((SIZE, SIZE, 3), 40 * i, dtype=np.uint8)) for i in range(3)]
    rows = {"img": [good[0], {"bytes": b"\x89PNG\r\n\x1a\n broken", "path": None}, good[1], good[2]],
            "label": [0, 1, 0, 1]}
    folder = tmp_path / "d"
    folder.mkdir()
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(folder / "train-00000-of-00001.parquet"))
    data = load_image_dataset(str(folder))
    processor = PRGImageProcessorPil(size={"height": SIZE, "width": SIZE})
    options = dict(train_batch_size=4, seed=0)
    stream, _ = get_train_dataloader(data, processor, torch.device("cpu"), dataloader="stream", **options)
    with caplog.at_level("WARNING"):
        (batch,) = list(stream)
    assert "Skipping example 1: its image cannot be decoded" in caplog.text
    assert sorted(batch["index"].tolist()) == [0, 2, 3] and batch["images"].shape == (3, 3, SIZE, SIZE)
    with pytest.raises(ValueError, match=r"Example 1 cannot be decoded .*--dataloader stream"):
        get_train_dataloader(data, processor, torch.device("cpu"), dataloader="device", **options)
