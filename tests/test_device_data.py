"""The device-resident training data: the same batches as the streaming data loader, batched crop and flip."""

import datasets
import numpy as np
import pytest
import torch
from accelerate.data_loader import prepare_data_loader, skip_first_batches
from PIL import Image

from prg_hub.augment import TrainAugmentation
from prg_hub.batched_augment import crop_flip, crop_flip_parameters
from prg_hub.data import get_dataloaders, load_image_dataset
from prg_hub.device_data import decode_split, device_train_dataloader, fits_on_device, resolve_dataloader
from prg_hub.image_processing_prg import PRGImageProcessorPil

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


def _loaders(image_data, augmentation, batch_size=3, drop_last=True):
    processor = PRGImageProcessorPil(size={"height": SIZE, "width": SIZE})
    options = dict(train_split="train", train_batch_size=batch_size, augmentation=augmentation, drop_last=drop_last,
                   seed=SEED)
    stream, _ = get_dataloaders(image_data, processor, **options)
    device = device_train_dataloader(image_data, processor, torch.device("cpu"), **options)
    return stream, device


def _shard(dataloader, num_processes, process_index):
    """The loader as `accelerator.prepare` gives it to one of `num_processes` processes (seedable sampler)."""
    return prepare_data_loader(dataloader, num_processes=num_processes, process_index=process_index,
                               use_seedable_sampler=True, data_seed=SEED)


def _epoch(dataloader, epoch):
    dataloader.set_epoch(epoch)
    dataloader.dataset.set_epoch(epoch)
    return list(dataloader)


@pytest.mark.parametrize("num_processes", [1, 2])
def test_device_path_gives_the_stream_path_batches_per_process_epoch_and_resume(image_data, num_processes):
    """Same sample indices, labels and (without augmentation) bit-identical pixel values, step by step."""
    stream, device = _loaders(image_data, TrainAugmentation("none", SIZE))
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
                assert device_batch["pixel_values"].dtype == torch.float32
                assert torch.equal(device_batch["pixel_values"], stream_batch["pixel_values"])
            orders.append([batch["index"].tolist() for batch in device_batches])
            # Resuming after one batch of this epoch: both skip it and go on with the same batches.
            resumed = skip_first_batches(device_shard, 1)
            resumed.set_epoch(epoch)
            assert [batch["index"].tolist() for batch in resumed] == orders[-1][1:]
            resumed_stream = skip_first_batches(stream_shard, 1)
            resumed_stream.set_epoch(epoch)
            assert [batch["index"].tolist() for batch in resumed_stream] == orders[-1][1:]
    assert orders[0] != orders[1]  # a new shuffle every epoch
    if num_processes == 2:  # the processes train on disjoint shards
        first, second = {i for b in orders[0] for i in b}, {i for b in orders[2] for i in b}
        assert not first & second


def test_device_crop_flip_depends_only_on_seed_epoch_and_index(image_data):
    device = _shard(_loaders(image_data, TrainAugmentation("crop_flip", SIZE), batch_size=NUM_TRAIN)[1], 1, 0)
    images = decode_split(image_data.split("train"), "img", PRGImageProcessorPil(size={"height": SIZE, "width": SIZE}))
    again = _shard(_loaders(image_data, TrainAugmentation("crop_flip", SIZE), batch_size=NUM_TRAIN)[1], 1, 0)
    batch = _epoch(device, 0)[0]
    assert torch.equal(batch["pixel_values"], _epoch(again, 0)[0]["pixel_values"])
    # Every sample is its own image cropped and flipped with the parameters of (seed, epoch, index).
    index = batch["index"]
    top, left, flipped = crop_flip_parameters(SEED, 0, index, SIZE // 8, True)
    expected = crop_flip(images[index], top, left, flipped, SIZE // 8).float() / 127.5 - 1
    torch.testing.assert_close(batch["pixel_values"], expected, rtol=0, atol=1e-6)
    next_epoch = _epoch(device, 1)[0]  # the same samples, in another order, augmented anew
    assert not torch.equal(batch["pixel_values"][index.argsort()],
                           next_epoch["pixel_values"][next_epoch["index"].argsort()])


def test_crop_flip_parameters_are_per_sample_keyed_and_uniform():
    indices = torch.arange(6000)
    top, left, flipped = crop_flip_parameters(0, 0, indices, 4, True)
    permutation = torch.randperm(6000)
    shuffled = crop_flip_parameters(0, 0, indices[permutation], 4, True)
    for original, reordered in zip((top, left, flipped), shuffled):  # a sample's draw ignores its batch
        assert torch.equal(original[permutation], reordered)
    for offsets in (top, left):
        counts = torch.bincount(offsets, minlength=9)
        assert len(counts) == 9 and counts.min() > 0.8 * 6000 / 9 and counts.max() < 1.2 * 6000 / 9
    assert 0.45 < flipped.float().mean() < 0.55
    assert (top == left).float().mean() < 0.2  # independent draws, not one number twice
    for other in (crop_flip_parameters(1, 0, indices, 4, True), crop_flip_parameters(0, 1, indices, 4, True)):
        assert (other[0] != top).float().mean() > 0.8
    assert not crop_flip_parameters(0, 0, indices, 4, False)[2].any()


def test_batched_crop_flip_equals_padding_cropping_and_mirroring_each_image():
    rng = np.random.default_rng(1)
    images = torch.from_numpy(rng.integers(1, 256, (5, 3, 6, 7), dtype=np.uint8))
    top, left = torch.tensor([0, 4, 2, 1, 3]), torch.tensor([4, 0, 2, 3, 1])
    flipped = torch.tensor([False, True, True, False, True])
    out = crop_flip(images, top, left, flipped, 2)
    assert out.shape == images.shape and out.dtype == torch.uint8
    for b in range(5):
        padded = np.pad(images[b].numpy(), ((0, 0), (2, 2), (2, 2)))
        crop = padded[:, top[b] : top[b] + 6, left[b] : left[b] + 7]
        assert np.array_equal(out[b].numpy(), crop[:, :, ::-1] if flipped[b] else crop)
    assert torch.equal(crop_flip(images, torch.full((5,), 2), torch.full((5,), 2), torch.zeros(5, dtype=bool), 2),
                       images)


def test_auto_picks_the_device_only_for_device_augmentations_that_fit():
    cpu = torch.device("cpu")
    crop_flip_aug, randaugment = TrainAugmentation("crop_flip", 32), TrainAugmentation("randaugment", 32)
    erasing = TrainAugmentation("flip", 32, random_erasing=0.25)
    cifar_bytes = 50_000 * 3 * 32 * 32
    assert resolve_dataloader("auto", crop_flip_aug, 50_000, 32, cpu, memory_bytes=4 * cifar_bytes) == "device"
    assert resolve_dataloader("auto", crop_flip_aug, 50_000, 32, cpu, memory_bytes=4 * cifar_bytes - 1) == "stream"
    assert resolve_dataloader("auto", randaugment, 50_000, 32, cpu, memory_bytes=100 * cifar_bytes) == "stream"
    assert resolve_dataloader("auto", erasing, 50_000, 32, cpu, memory_bytes=100 * cifar_bytes) == "stream"
    assert resolve_dataloader("stream", crop_flip_aug, 50_000, 32, cpu) == "stream"
    assert resolve_dataloader("device", crop_flip_aug, 10**9, 32, cpu) == "device"  # asked for: no size check
    assert fits_on_device(1000, 32, cpu) and not fits_on_device(10**13, 32, cpu)  # against this machine's RAM
    with pytest.raises(ValueError, match="randaugment.*--dataloader stream"):
        resolve_dataloader("device", randaugment, 10, 32, cpu)
    with pytest.raises(ValueError, match=r"'disk'.*\['auto', 'device', 'stream'\]"):
        resolve_dataloader("disk", crop_flip_aug, 10, 32, cpu)
