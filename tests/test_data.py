"""Data loading, column detection, grayscale handling and presets used by the example scripts."""

import collections

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from prg_hub import PRGImageProcessor
from prg_hub.data import ImageClassificationDataset, collate_readable, get_dataloaders, load_image_dataset
from prg_hub.presets import backbone_preset

SIZE = 8


def _images(count, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    shape = (SIZE, SIZE) if mode == "L" else (SIZE, SIZE, 3)
    return [Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode) for _ in range(count)]


def write_parquet(folder, image_column="img", label_column="label", mode="RGB", names=("cat", "dog", "fox")):
    """train (6 rows) and test (3 rows) parquet files with an Image feature and a ClassLabel."""
    features = datasets.Features({image_column: datasets.Image(), label_column: datasets.ClassLabel(names=list(names))})
    folder.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", 6), ("test", 3)):
        labels = [i % len(names) for i in range(count)]
        columns = {image_column: _images(count, mode), label_column: labels}
        table = datasets.Dataset.from_dict(columns, features=features)
        table.to_parquet(str(folder / f"{split}-00000-of-00001.parquet"))
    return folder


@pytest.mark.parametrize(("image_column", "label_column"), [("img", "label"), ("image", "labels")])
def test_columns_are_detected_by_name(tmp_path, image_column, label_column):
    data = load_image_dataset(str(write_parquet(tmp_path / "d", image_column, label_column)))
    assert (data.image_column, data.label_column) == (image_column, label_column)
    assert data.label_names == ["cat", "dog", "fox"]
    assert sorted(data.splits) == ["test", "train"]


def test_columns_are_detected_by_feature_type_or_named(tmp_path):
    folder = write_parquet(tmp_path / "d", "picture", "category")
    data = load_image_dataset(str(folder))
    assert (data.image_column, data.label_column) == ("picture", "category")
    named = load_image_dataset(str(folder), image_column="picture", label_column="category")
    assert named.label_names == ["cat", "dog", "fox"]


def test_missing_column_error_lists_existing_columns(tmp_path):
    folder = write_parquet(tmp_path / "d", "picture", "category")
    with pytest.raises(ValueError, match=r"'pixels' not found.*\['picture', 'category'\]"):
        load_image_dataset(str(folder), image_column="pixels")
    with pytest.raises(ValueError, match=r"'target' not found.*\['picture', 'category'\]"):
        load_image_dataset(str(folder), label_column="target")


def test_undetectable_label_column_error_names_columns_and_option(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    features = datasets.Features({"img": datasets.Image(), "a": datasets.Value("int64"), "b": datasets.Value("int64")})
    datasets.Dataset.from_dict({"img": _images(2), "a": [0, 1], "b": [1, 0]}, features=features).to_parquet(
        str(folder / "train-00000-of-00001.parquet")
    )
    with pytest.raises(ValueError, match=r"No label column found.*\['img', 'a', 'b'\].*--label_column"):
        load_image_dataset(str(folder))
    unlabelled = load_image_dataset(str(folder), require_labels=False)  # pretraining needs no labels
    assert unlabelled.label_column is None and unlabelled.image_column == "img"


def test_split_resolution_and_unknown_split(tmp_path):
    data = load_image_dataset(str(write_parquet(tmp_path / "d")))
    assert data.split_name("eval") == "test"
    assert len(data.split("train", max_samples=4)) == 4
    with pytest.raises(ValueError, match=r"'validation' not found.*\['train', 'test'\]"):
        data.split("validation")


def test_missing_local_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="No folder at .*Hub dataset id"):
        load_image_dataset(str(tmp_path / "nowhere"))


def test_imagefolder_with_string_class_names(tmp_path):
    for name, image in zip(("ant", "bee", "ant", "bee"), _images(4), strict=True):
        (tmp_path / "train" / name).mkdir(parents=True, exist_ok=True)
        image.save(tmp_path / "train" / name / f"{len(list((tmp_path / 'train' / name).iterdir()))}.png")
    data = load_image_dataset(str(tmp_path))
    assert data.label_names == ["ant", "bee"]
    labels = sorted(data.split("train")[data.label_column])
    assert labels == [0, 0, 1, 1]


def test_grayscale_images_become_three_equal_channels(tmp_path):
    data = load_image_dataset(str(write_parquet(tmp_path / "d", mode="L")))
    processor = PRGImageProcessor(size={"height": 16, "width": 16})
    dataset = ImageClassificationDataset(data.split("train"), data.image_column, data.label_column, processor)
    item = dataset[1]
    assert item["pixel_values"].shape == (3, 16, 16)
    assert item["pixel_values"].min() >= -1 and item["pixel_values"].max() <= 1
    assert torch.equal(item["pixel_values"][0], item["pixel_values"][1])
    assert torch.equal(item["pixel_values"][1], item["pixel_values"][2])
    assert item["labels"] == 1 and item["index"] == 1


def test_dataloaders_shuffle_training_data_with_their_own_seed_and_read_the_evaluation_split_in_order(tmp_path):
    data = load_image_dataset(str(write_parquet(tmp_path / "d")))  # train: 6 rows, test: 3 rows
    processor = PRGImageProcessor(size={"height": SIZE, "width": SIZE})

    def loaders(seed, **options):
        return get_dataloaders(data, processor, train_split="train", eval_split="eval", train_batch_size=4,
                               eval_batch_size=2, seed=seed, **options)

    def epoch_order(dataloader):
        return [batch["index"].tolist() for batch in dataloader]

    global_rng = torch.random.get_rng_state()
    train, evaluation = loaders(0, drop_last=True)
    order = epoch_order(train)
    # Drawing the order leaves the global RNG (the model's noise source) alone, so a resumed run draws its noise.
    assert torch.equal(torch.random.get_rng_state(), global_rng)
    assert len(order) == 1 and len(order[0]) == 4  # the incomplete last batch is dropped
    assert order == epoch_order(loaders(0, drop_last=True)[0])
    assert epoch_order(loaders(0)[0])[0] == order[0] and len(epoch_order(loaders(0)[0])[1]) == 2
    assert any(epoch_order(loaders(seed)[0])[0] != order[0] for seed in (1, 2, 3))
    assert epoch_order(evaluation) == [[0, 1], [2]]
    assert next(iter(evaluation))["labels"].tolist() == [0, 1]

    unshuffled, _ = get_dataloaders(data, processor, train_split="train", train_batch_size=4, shuffle=False,
                                    labels=False)
    assert epoch_order(unshuffled) == [[0, 1, 2, 3], [4, 5]]
    assert "labels" not in next(iter(unshuffled))


def test_unknown_preset_and_backbone_errors_list_allowed_values():
    with pytest.raises(ValueError, match=r"Unknown preset 'huge'.*\['tiny', 'small', 'paper'\]"):
        backbone_preset("unet2d", "huge", 32)
    with pytest.raises(ValueError, match=r"Unknown backbone 'vit'.*'dit'"):
        backbone_preset("vit", "tiny", 32)


@pytest.mark.parametrize(("backbone", "preset", "image_size", "millions"), [
    ("unet2d", "paper", 32, 52.5), ("unet2d", "paper", 64, 121.1), ("dit", "paper", 32, 35.2),
    ("unet2d", "small", 32, 6.9), ("dit", "small", 32, 8.0),
])
def test_preset_sizes(backbone, preset, image_size, millions):
    from diffusers import DiTTransformer2DModel, UNet2DModel

    network_class = UNet2DModel if backbone == "unet2d" else DiTTransformer2DModel
    with torch.device("meta"):
        network = network_class.from_config(backbone_preset(backbone, preset, image_size))
    assert sum(p.numel() for p in network.parameters()) / 1e6 == pytest.approx(millions, abs=0.05)


@pytest.mark.parametrize(("image_size", "attention_layers_by_width"), [
    (32, {16: 7, 8: 7, 4: 1}),  # the 16 and 8 px levels, and the 4 px middle block
    (64, {16: 7, 8: 7 + 1}),  # the middle block works at 8 px
])
def test_paper_unet_attends_at_16_and_8_pixels_and_in_its_middle(image_size, attention_layers_by_width):
    """The official network (improved diffusion's UNet) runs self-attention on its 16 px and 8 px feature maps and
    in its middle block. With 3 residual blocks per level, a level with attention has 3 attention layers on the way
    down and 4 on the way up (7); the middle block has 1."""
    from diffusers import UNet2DModel
    from diffusers.models.attention_processor import Attention

    widths = []
    with torch.device("meta"):  # shapes only: no weights are allocated
        network = UNet2DModel.from_config(backbone_preset("unet2d", "paper", image_size))
        for module in network.modules():
            if isinstance(module, Attention):
                module.register_forward_pre_hook(lambda _, inputs: widths.append(inputs[0].shape[-1]))
        output = network(torch.zeros(1, 3, image_size, image_size), torch.zeros(1)).sample
    assert output.shape == (1, 3, image_size, image_size)
    assert collections.Counter(widths) == attention_layers_by_width


def test_unreadable_images_are_skipped_with_a_warning_and_the_rest_kept(tmp_path, caplog):
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    good = _images(3)
    rows = {"img": [good[0], {"bytes": b"\x89PNG\r\n\x1a\n broken", "path": None}, good[1], good[2]],
            "label": [0, 1, 0, 1]}
    folder = tmp_path / "d"
    folder.mkdir()
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(folder / "train-00000-of-00001.parquet"))
    data = load_image_dataset(str(folder))
    dataset = ImageClassificationDataset(data.split("train"), "img", "label", PRGImageProcessor())

    with caplog.at_level("WARNING"):
        items = [dataset[index] for index in range(len(dataset))]
    assert items[1] is None
    assert "Skipping example 1: its image cannot be decoded" in caplog.text
    batch = collate_readable(items)
    assert batch["index"].tolist() == [0, 2, 3]
    assert batch["labels"].tolist() == [0, 0, 1]
    assert batch["pixel_values"].shape == (3, 3, 32, 32)
    with pytest.raises(ValueError, match="None of the 2 images of this batch can be decoded"):
        collate_readable([None, None])
