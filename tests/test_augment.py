"""Batched training augmentation: keyed per-sample parameters, each RandAugment operation against its definition
(torchvision's own scalar operations where there is one), random erasing, and the processor's exact normalisation."""

import numpy as np
import pytest
import torch

pytest.importorskip("torchvision", reason="the training augmentation needs torchvision (prg_hub[train])")
import torchvision.transforms.v2.functional as TF  # noqa: E402

from prg_hub import PRGImageProcessor  # noqa: E402
from prg_hub.augment import (  # noqa: E402
    RANDAUGMENT_OPS,
    TrainAugmentation,
    crop_flip,
    erasing_boxes,
    rand_augment_op,
)
from prg_hub.keyed_random import keyed_normal, keyed_uniform  # noqa: E402

SIZE = 16


def _images(count, seed=0, size=SIZE):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (count, 3, size, size), dtype=np.uint8))


def _processor(size=SIZE):
    return PRGImageProcessor(size={"height": size, "width": size})


def _op(name, count=4):
    return torch.full((count,), RANDAUGMENT_OPS.index(name))


def test_keyed_draws_depend_only_on_seed_epoch_and_index_and_are_uniform():
    index = torch.arange(6000)
    draws = keyed_uniform(0, 0, index, 3)
    permutation = torch.randperm(6000)
    assert torch.equal(keyed_uniform(0, 0, index[permutation], 3), draws[permutation])  # the batch plays no part
    assert torch.equal(keyed_uniform(0, 0, index, 2, first=1), draws[:, 1:])  # column k is the k-th draw
    for column in draws.unbind(1):
        counts = torch.bincount((column * 10).long(), minlength=10)
        assert counts.min() > 0.9 * 600 and counts.max() < 1.1 * 600
    assert abs(torch.corrcoef(draws.T)[0, 1]) < 0.05  # independent columns
    for other in (keyed_uniform(1, 0, index, 3), keyed_uniform(0, 1, index, 3)):
        assert (other != draws).float().mean() > 0.99
    normal = keyed_normal(0, 0, index, 4).flatten()
    assert abs(normal.mean()) < 0.05 and abs(normal.std() - 1) < 0.05


def test_batched_crop_flip_equals_padding_cropping_and_mirroring_each_image():
    images = _images(5)[..., :6, :7].contiguous()
    top, left = torch.tensor([0, 4, 2, 1, 3]), torch.tensor([4, 0, 2, 3, 1])
    flipped = torch.tensor([False, True, True, False, True])
    out = crop_flip(images, top, left, flipped, 2)
    assert out.shape == images.shape and out.dtype == torch.uint8
    for b in range(5):
        padded = np.pad(images[b].numpy(), ((0, 0), (2, 2), (2, 2)))
        crop = padded[:, top[b] : top[b] + 6, left[b] : left[b] + 7]
        assert np.array_equal(out[b].numpy(), crop[:, :, ::-1] if flipped[b] else crop)


@pytest.mark.parametrize(("name", "scalar_op"), [
    ("BrightnessIncreasing", TF.adjust_brightness),
    ("ColorIncreasing", TF.adjust_saturation),
    ("ContrastIncreasing", TF.adjust_contrast),
    ("SharpnessIncreasing", TF.adjust_sharpness),
])
def test_enhancements_take_a_factor_per_sample_as_torchvision_does_one_image_at_a_time(name, scalar_op):
    images = _images(4)
    strength, sign = torch.tensor([0.0, 0.3, 0.9, 1.0]), torch.tensor([1.0, -1.0, 1.0, -1.0])
    out = rand_augment_op(images, _op(name), strength, sign)
    for b in range(4):
        expected = scalar_op(images[b : b + 1], float(1 + 0.9 * sign[b] * strength[b]))
        assert (out[b].int() - expected[0].int()).abs().max() <= 1  # rounding of the blend


def test_point_operations_follow_their_definitions():
    images = _images(4)
    strength = torch.tensor([0.0, 0.3, 0.7, 1.0])
    ones = torch.ones(4)
    assert torch.equal(rand_augment_op(images, _op("Invert"), strength, ones), 255 - images)
    assert torch.equal(rand_augment_op(images, _op("Equalize"), strength, ones), TF.equalize(images))
    assert torch.equal(rand_augment_op(images, _op("AutoContrast"), strength, ones), TF.autocontrast(images))
    posterized = rand_augment_op(images, _op("PosterizeIncreasing"), strength, ones)
    solarized = rand_augment_op(images, _op("SolarizeIncreasing"), strength, ones)
    added = rand_augment_op(images, _op("SolarizeAdd"), strength, ones)
    for b, f in enumerate(strength):  # float32 arithmetic, as on the device
        bits = max(1, 4 - int(torch.floor(4 * f)))
        assert torch.equal(posterized[b], TF.posterize(images[b], bits))
        threshold = 256 - int(torch.floor(256 * f))
        assert torch.equal(solarized[b], torch.where(images[b].int() >= threshold, 255 - images[b], images[b]))
        shifted = (images[b].int() + int(torch.floor(110 * f))).clamp(max=255).to(torch.uint8)
        assert torch.equal(added[b], torch.where(images[b] < 128, shifted, images[b]))


def test_no_operation_is_the_identity_and_every_operation_changes_an_image():
    images = _images(4)
    strength, sign = torch.full((4,), 0.9), torch.ones(4)
    assert torch.equal(rand_augment_op(images, torch.full((4,), -1), strength, sign), images)
    steps = torch.arange(SIZE)
    ramp = (20 + 10 * steps[None, :] + 2 * steps[:, None]).to(torch.uint8).repeat(4, 3, 1, 1)  # 20..200
    ramp[..., 5, 5] = 0  # a dip, which smoothing fills (a linear ramp is its own smoothing)
    for name in RANDAUGMENT_OPS:
        assert not torch.equal(rand_augment_op(ramp, _op(name), strength, sign), ramp), name


def test_geometric_operations_move_pixels_as_stated_and_fill_grey():
    images = torch.zeros((2, 3, SIZE, SIZE), dtype=torch.uint8)
    images[:, :, :, 10] = 255  # a vertical line at column 10
    shift = 4  # pixels: 0.45·f·W = 4
    strength, sign = torch.full((2,), shift / (0.45 * SIZE)), torch.tensor([1.0, -1.0])
    moved = rand_augment_op(images, _op("TranslateXRel", 2), strength, sign)
    # x_in = x + s·shift: the line moves to column 10 − s·shift; the columns brought in are grey.
    assert moved[0, :, :, 10 - shift].eq(255).all() and moved[1, :, :, 10 + shift].eq(255).all()
    assert moved[0, :, :, -shift:].eq(128).all() and moved[1, :, :, :shift].eq(128).all()
    vertical = rand_augment_op(images, _op("TranslateYRel", 2), strength, sign)
    assert torch.equal(vertical[0, :, : SIZE - shift], images[0, :, shift:])
    # A rotation keeps the centre and turns the line; shears keep the first row (ShearX) or column (ShearY).
    square = _images(2)
    rotated = rand_augment_op(square, _op("Rotate", 2), torch.ones(2), torch.ones(2))
    assert not torch.equal(rotated, square) and rotated[:, :, 0, 0].eq(128).all()
    sheared = rand_augment_op(images, _op("ShearX", 2), torch.full((2,), 0.5), torch.ones(2))
    assert (sheared[:, :, 0, 10] > 200).all() and (sheared[:, :, -1, 10] < 50).all()  # x_in = x + 0.15·y


def test_augmentation_is_keyed_by_sample_and_epoch_and_normalises_as_the_processor():
    images, processor = _images(6), _processor()
    plain = TrainAugmentation("none", processor)
    expected = processor(list(images), return_tensors="pt", do_resize=False)["pixel_values"]
    assert torch.equal(plain(images, torch.arange(6), 0), expected)

    augmentation = TrainAugmentation("randaugment", processor, random_erasing=0.5, seed=7)
    index = torch.arange(100, 106)
    out = augmentation(images, index, epoch=0)
    assert out.shape == (6, 3, SIZE, SIZE) and out.dtype == torch.float32
    # Sample 103 is augmented the same way in any batch, and anew in another epoch or with another seed.
    reordered = augmentation(images[[3, 0]], index[[3, 0]], epoch=0)
    assert torch.equal(reordered[0], out[3])
    other_epochs = [augmentation(images, index, epoch=e) for e in (1, 2, 3)]
    assert all(not torch.equal(other, out) for other in other_epochs)
    other_seed = TrainAugmentation("randaugment", processor, random_erasing=0.5, seed=8)
    assert not torch.equal(other_seed(images, index, 0), out)


def test_randaugment_draws_two_gated_operations_uniformly():
    augmentation = TrainAugmentation("randaugment", _processor(), seed=0)
    index = torch.arange(30_000)
    choice, gate, _ = keyed_uniform(0, 0, index, 3, first=3).unbind(1)
    assert abs((gate < 0.5).float().mean() - 0.5) < 0.01
    counts = torch.bincount((choice * len(RANDAUGMENT_OPS)).long(), minlength=len(RANDAUGMENT_OPS))
    assert len(counts) == 15 and counts.min() > 0.9 * 2000 and counts.max() < 1.1 * 2000
    grey = _images(8).float().mean(1, keepdim=True).round().to(torch.uint8).expand(8, 3, SIZE, SIZE)
    augmented = augmentation.augment_images(grey.contiguous(), torch.arange(8), 0)
    assert torch.equal(augmented[:, 0], augmented[:, 1]) and torch.equal(augmented[:, 1], augmented[:, 2])


def test_random_erasing_fills_one_rectangle_with_noise_at_its_rate():
    augmentation = TrainAugmentation("none", _processor(), random_erasing=0.25, seed=1)
    pixels = torch.zeros((400, 3, SIZE, SIZE))
    erased = augmentation.erase(pixels, torch.arange(400), epoch=0)
    changed = erased.abs().sum(1) > 0  # (B, H, W)
    rate = changed.flatten(1).any(1).float().mean()
    assert 0.18 < rate < 0.32
    for mask in changed[changed.flatten(1).any(1)][:20]:
        rows, cols = torch.nonzero(mask).unbind(1)
        area = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        assert len(rows) == area and area < SIZE * SIZE  # one filled rectangle, smaller than the image
    found, top, left, height, width = erasing_boxes(keyed_uniform(0, 0, torch.arange(2000), 40), SIZE, SIZE)
    assert found.float().mean() > 0.95
    assert ((top + height) <= SIZE).all() and ((left + width) <= SIZE).all()
    area = (height * width).float()[found] / SIZE**2
    assert 0.015 < area.min() and area.max() < 0.45 and 0.12 < area.mean() < 0.22  # U[0.02, 1/3], rounded
    assert torch.equal(TrainAugmentation("none", _processor(), random_erasing=0.0)(
        _images(2), torch.arange(2), 0), TrainAugmentation("none", _processor())(_images(2), torch.arange(2), 0))


def test_bad_recipes_and_images_are_named():
    with pytest.raises(ValueError, match=r"Unknown augmentation 'autoaug'.*'randaugment'"):
        TrainAugmentation("autoaug", _processor())
    with pytest.raises(ValueError, match=r"random_erasing is a probability in \[0, 1\], got 1.5"):
        TrainAugmentation("flip", _processor(), random_erasing=1.5)
    with pytest.raises(ValueError, match=r"uint8 images of size \(16, 16\), got torch.float32"):
        TrainAugmentation("flip", _processor())(torch.zeros(2, 3, SIZE, SIZE), torch.arange(2), 0)
