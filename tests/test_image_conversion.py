"""One image, one set of pixel values: `to_rgb`'s rule per PIL mode, and `PRGImageProcessor`, both pipelines and
the CLI reader agreeing exactly on a corpus of every mode (stored in PNG or TIFF files, or passed as PIL images
where no format holds the mode); unreadable files give errors that name them."""

import base64
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from transformers import pipeline

from prg_hub import PRGConfig, PRGForImageClassification, PRGImageProcessor
from prg_hub.cli import main, read_image
from prg_hub.image_conversion import to_rgb
from prg_hub.image_files import UnreadableImageError, open_image

HEIGHT, WIDTH = 24, 40
IMAGE_SIZE = 16
MINI_UNET = {"block_out_channels": [16, 32], "layers_per_block": 1, "down_block_types": ["DownBlock2D"] * 2,
             "up_block_types": ["UpBlock2D"] * 2, "norm_num_groups": 8}
GRAY = np.tile(np.linspace(0, 255, WIDTH).round().astype(np.uint8), (HEIGHT, 1))  # (H, W), 0 on the left, 255 right
COLOUR = np.stack([GRAY, GRAY[:, ::-1], np.full_like(GRAY, 60)], axis=-1)  # (H, W, 3)
ALPHA = np.where(np.arange(WIDTH) < WIDTH // 2, 0, 255).astype(np.uint8)[None].repeat(HEIGHT, 0)  # left transparent
PALETTE = [255, 0, 0, 0, 128, 0, 0, 0, 255, 200, 200, 0]  # four colours
INDICES = (GRAY // 64).astype(np.uint8)  # (H, W) in 0..3
EXIF_ROTATE_90_CLOCKWISE = 6  # value of the EXIF orientation tag


def rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=-1)


def white_where_transparent(colour: np.ndarray, transparent: np.ndarray) -> np.ndarray:
    return np.where(transparent[..., None], 255, colour).astype(np.uint8)


def palette_image(mode: str = "P") -> Image.Image:
    image = Image.fromarray(INDICES, "P")
    image.putpalette(PALETTE)
    return image if mode == "P" else image.convert(mode)


def corpus() -> dict[str, tuple[Image.Image, str | None, np.ndarray | None]]:
    """name → (image, file suffix that stores its mode or None, its RGB by the rule (H, W, 3) uint8 or None when
    the rule is PIL's own conversion)."""
    palette_colours = np.asarray(PALETTE, dtype=np.uint8).reshape(4, 3)[INDICES]
    transparent_palette = palette_image()
    transparent_palette.info["transparency"] = 0
    palette_with_alpha = palette_image("PA")
    palette_with_alpha.putalpha(Image.fromarray(ALPHA))
    exif = Image.Exif()
    exif[0x0112] = EXIF_ROTATE_90_CLOCKWISE
    rotated = Image.fromarray(COLOUR)
    rotated.info["exif"] = exif.tobytes()
    return {
        "RGB": (Image.fromarray(COLOUR), ".png", COLOUR),
        "RGB, EXIF-rotated": (rotated, ".png", np.rot90(COLOUR, k=-1)),
        "1": (Image.fromarray(GRAY >= 128), ".png", rgb(np.where(GRAY >= 128, 255, 0).astype(np.uint8))),
        "L": (Image.fromarray(GRAY), ".png", rgb(GRAY)),
        "LA": (Image.fromarray(np.stack([GRAY, ALPHA], -1), "LA"), ".png", white_where_transparent(rgb(GRAY), ALPHA == 0)),
        "P": (palette_image(), ".png", palette_colours),
        "P, transparent index": (transparent_palette, ".png", white_where_transparent(palette_colours, INDICES == 0)),
        "PA": (palette_with_alpha, ".tiff", white_where_transparent(palette_colours, ALPHA == 0)),
        "RGBA": (Image.fromarray(np.dstack([COLOUR, ALPHA]), "RGBA"), ".png",
                 white_where_transparent(COLOUR, ALPHA == 0)),
        "CMYK": (Image.fromarray(COLOUR).convert("CMYK"), ".tiff", COLOUR),
        "YCbCr": (Image.fromarray(COLOUR).convert("YCbCr"), ".tiff", None),
        "LAB": (Image.fromarray(COLOUR).convert("LAB"), ".tiff", None),
        "HSV": (Image.fromarray(COLOUR).convert("HSV"), None, None),
        "I;16": (Image.fromarray(GRAY.astype(np.uint16) * 257), ".png", rgb(GRAY)),
        "I": (Image.fromarray(GRAY.astype(np.int32) * 257), ".tiff", rgb(GRAY)),
        "F in [0, 1]": (Image.fromarray((GRAY / 255).astype(np.float32)), ".tiff", rgb(GRAY)),
        "F in [0, 255]": (Image.fromarray(GRAY.astype(np.float32)), ".tiff", rgb(GRAY)),
    }


CORPUS = corpus()


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, str | Image.Image]:
    """name → a file path where a format stores the mode, else the PIL image itself."""
    folder = tmp_path_factory.mktemp("modes")
    found = {}
    for index, (name, (image, suffix, _)) in enumerate(CORPUS.items()):
        if suffix is None:
            found[name] = image
            continue
        path = folder / f"{index}{suffix}"
        image.save(path, exif=image.getexif())  # PNG and TIFF writers take EXIF data only as an argument
        found[name] = str(path)
    return found


def opened(source: str | Image.Image) -> Image.Image:
    return Image.open(source) if isinstance(source, str) else source


@pytest.mark.parametrize("name", CORPUS)
def test_rule_per_mode(sources, name):
    image, _, expected = CORPUS[name]
    source = opened(sources[name])
    assert source.mode == image.mode  # the file kept the mode
    converted = to_rgb(source)
    assert converted.mode == "RGB" and source.mode == image.mode
    if expected is None:  # PIL's own conversion
        expected = np.asarray(source.convert("RGB"))
    np.testing.assert_array_equal(np.asarray(converted), expected)
    pixel_values = PRGImageProcessor(do_resize=False)(source, return_tensors="pt")["pixel_values"][0]
    np.testing.assert_allclose(pixel_values.permute(1, 2, 0).numpy(), expected / 127.5 - 1, atol=1e-6)


def test_the_reported_cases_keep_their_range():
    mean = {name: np.asarray(to_rgb(image)).mean() for name, (image, _, _) in CORPUS.items()}
    assert 120 < mean["I;16"] < 135  # PIL's convert("RGB") saturates it to 255
    assert 120 < mean["F in [0, 1]"] < 135  # not black
    for name in ("LA", "RGBA", "PA", "P, transparent index"):  # transparent on the left: white there
        assert (np.asarray(to_rgb(CORPUS[name][0]))[:, : WIDTH // 8] == 255).all(), name


def test_float_rule_reads_values_in_zero_one_as_normalised_and_others_on_the_8_bit_scale():
    values = np.array([[0.0, 0.5, 1.0, np.nan]], dtype=np.float32)
    np.testing.assert_array_equal(np.asarray(to_rgb(Image.fromarray(values)))[0, :, 0], [0, 128, 255, 0])
    values = np.array([[-5.0, 0.5, 100.0, 300.0]], dtype=np.float32)
    np.testing.assert_array_equal(np.asarray(to_rgb(Image.fromarray(values)))[0, :, 0], [0, 0, 100, 255])


def test_integer_rule_clips_and_whitens_the_transparency_key():
    image = Image.fromarray(np.array([[-7, 257, 70000, 514]], dtype=np.int32))
    image.info["transparency"] = 514
    np.testing.assert_array_equal(np.asarray(to_rgb(image))[0, :, 0], [0, 1, 255, 255])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("prg-classifier")
    config = PRGConfig(image_size=IMAGE_SIZE, num_steps=1, backbone_config=dict(MINI_UNET), num_labels=2)
    PRGForImageClassification(config).save_pretrained(folder)
    PRGImageProcessor.for_image_size(IMAGE_SIZE).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def pipelines(checkpoint):
    return pipeline("image-classification", model=checkpoint), pipeline("image-feature-extraction", model=checkpoint)


def model_inputs(pipe, *args, **kwargs) -> list[torch.Tensor]:
    """The pixel values (B, 3, H, W) of each forward pass of `pipe(*args, **kwargs)`."""
    captured = []
    hook = pipe.model.register_forward_pre_hook(
        lambda module, args, kwargs: captured.append(kwargs["pixel_values"]), with_kwargs=True
    )
    try:
        pipe(*args, **kwargs)
    finally:
        hook.remove()
    return captured


@pytest.mark.parametrize("name", CORPUS)
def test_every_entry_point_gives_identical_pixel_values(checkpoint, pipelines, sources, name):
    processor = PRGImageProcessor.from_pretrained(checkpoint)
    source = sources[name]
    reference = processor(opened(source), return_tensors="pt")["pixel_values"]  # (1, 3, 16, 16)
    assert reference.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)
    computed = {}
    for pipe in pipelines:
        task = pipe.task
        computed[f"{task}, PIL image"] = model_inputs(pipe, opened(source))
        computed[f"{task}, list"] = model_inputs(pipe, [source, opened(source)])
        computed[f"{task}, batch of 2"] = model_inputs(pipe, [source, opened(source)], batch_size=2)
        if isinstance(source, str):
            computed[f"{task}, path"] = model_inputs(pipe, source)
    if isinstance(source, str):
        computed["processor, path"] = [processor(source, return_tensors="pt")["pixel_values"]]
        computed["CLI reader"] = [read_image(source, processor)[None]]
    for entry_point, batches in computed.items():
        images = torch.cat(batches)
        assert all(torch.equal(image, reference[0]) for image in images), entry_point


def png_header_only(side: int) -> bytes:
    """A PNG that declares side × side 8-bit gray pixels and holds one row: a decompression bomb for PIL's check."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * (side + 1)))
            + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict[str, tuple[str, str]]:
    """kind → (path, a fragment of the reason given for it)."""
    folder = tmp_path_factory.mktemp("bad")
    noise = np.random.default_rng(0).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "noise.png")
    (folder / "truncated.png").write_bytes((folder / "noise.png").read_bytes()[:1000])
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.png").write_text("not an image\n")
    (folder / "over-limit.png").write_bytes(png_header_only(10_000))  # 1e8 pixels: PIL would only warn
    (folder / "far-over-limit.png").write_bytes(png_header_only(20_000))  # 4e8 pixels: PIL raises
    (folder / "folder.png").mkdir()
    return {
        "truncated": (str(folder / "truncated.png"), "truncated"),
        "empty": (str(folder / "empty.png"), "cannot identify image file"),
        "text": (str(folder / "text.png"), "cannot identify image file"),
        "over limit": (str(folder / "over-limit.png"), "exceeds limit of 89478485 pixels"),
        "far over limit": (str(folder / "far-over-limit.png"), "decompression bomb"),
        "directory": (str(folder / "folder.png"), "Is a directory"),
        "missing": (str(folder / "missing.png"), "no such file or directory"),
    }


@pytest.mark.parametrize("kind", ["truncated", "empty", "text", "over limit", "far over limit", "directory",
                                  "missing"])
def test_an_unreadable_file_in_a_pipeline_call_raises_an_error_naming_it(pipelines, sources, bad_files, kind):
    path, reason = bad_files[kind]
    for pipe in pipelines:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # no raw warning escapes
            with pytest.raises(UnreadableImageError, match="cannot read image") as raised:
                pipe([sources["RGB"], path])
        assert str(raised.value).startswith(f"{path}: cannot read image (") and reason in str(raised.value)
        assert raised.value.source == path


def test_open_image_reads_base64_and_data_uris(sources):
    with open(sources["I;16"], "rb") as file:
        encoded = base64.b64encode(file.read()).decode()
    for source in (encoded, f"data:image/png;base64,{encoded}"):
        image = open_image(source)
        assert image.mode == "I;16" and np.array_equal(np.asarray(image), np.asarray(CORPUS["I;16"][0]))


def test_cli_names_each_bad_file_and_classifies_the_good_ones(capsys, checkpoint, sources, bad_files):
    paths = [sources["RGB"]] + [path for kind, (path, _) in bad_files.items() if kind not in ("directory", "missing")]
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        status = main(["classify", *paths, "--model", checkpoint, "--top-k", "1"])
    out, err = capsys.readouterr()
    assert status == 1 and out.startswith(f"{sources['RGB']}: ")
    lines = err.splitlines()
    assert len(lines) == len(paths) - 1 and "Traceback" not in err
    for line, path in zip(lines, paths[1:], strict=True):
        assert line.startswith(f"{path}: cannot read image (")
    assert "exceeds limit of 89478485 pixels" in err


def test_exif_orientation_is_applied_once(sources):
    upright = to_rgb(opened(sources["RGB, EXIF-rotated"]))
    assert np.array_equal(np.asarray(to_rgb(upright)), np.asarray(upright))
    assert np.array_equal(np.asarray(ImageOps.exif_transpose(upright)), np.asarray(upright))
