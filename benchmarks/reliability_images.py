"""Reliability of image input: every PIL mode through every entry point, and bad files through the CLI and pipelines.

    from reliability_images import image_checks
    image_checks(quick=True)  # {"image modes": {...}, "bad files": {...}}

Each category is {"tried", "correct", "wrong", "wrong_cases": [short descriptions]}. The model is the classifier
installed with the package (`prg_hub.DEFAULT_MODEL`), offline.

* "image modes": images of modes 1, L, LA, P with and without a transparent index, RGBA, CMYK, I;16, I, F (values
  in [0, 1] and in [0, 255]), YCbCr, LAB and RGB, saved where a format holds the mode (PNG, TIFF) and otherwise
  passed as PIL images; `quick=False` adds PA, HSV, big-endian I;16B, an EXIF-rotated JPEG, GIF, WebP and BMP files.
  Each mode is tried through each entry point: `PRGImageProcessor` on the opened image, the image-classification
  and the image-feature-extraction pipelines (given the path and the PIL image; a forward pre-hook takes the
  model's input and stops the call, so the model does not run), and the CLI's reader. Correct:
  the processor's pixel values match the RGB the conversion rule gives for the image, computed here independently
  (exactly, or within 20 levels for the JPEG file), and every other entry point gives pixel values identical to
  the processor's.
* "bad files": a truncated PNG, an empty file, a text file named .png, decompression bombs (a PNG header over
  PIL's limit, and over twice it), a directory named x.png and a missing path. Through `python -m prg_hub.cli
  classify` (one process, good images around the bad ones): correct when the good images are classified, each
  bad file gets one stderr line that starts with its path, and no traceback or raw warning is printed. Through
  each pipeline, given [bad, good] (`quick`) or [good, bad, good]: correct when the call raises
  `UnreadableImageError` whose message starts with the path (the pipelines' rule: one result per input, so a
  bad input stops the call), no raw warning escapes, and the pipeline processes good images.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import tempfile
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import pipeline

import prg_hub
from prg_hub import PRGImageProcessor
from prg_hub.cli import read_image
from prg_hub.image_files import UnreadableImageError

HEIGHT, WIDTH = 24, 40
GRAY = np.tile(np.linspace(0, 255, WIDTH).round().astype(np.uint8), (HEIGHT, 1))  # (H, W) ramp, 0 on the left
COLOUR = np.stack([GRAY, GRAY[:, ::-1], np.full_like(GRAY, 60)], axis=-1)  # (H, W, 3)
TRANSPARENT = np.arange(WIDTH)[None].repeat(HEIGHT, 0) < WIDTH // 2  # (H, W): the left half
ALPHA = np.where(TRANSPARENT, 0, 255).astype(np.uint8)
PALETTE = np.array([[255, 0, 0], [0, 128, 0], [0, 0, 255], [200, 200, 0]], dtype=np.uint8)
INDICES = (GRAY // 64).astype(np.uint8)  # (H, W) in 0..3
LOSSY_TOLERANCE = 20  # levels, for the JPEG file
EXIF_ORIENTATION_TAG, ROTATE_90_CLOCKWISE = 0x0112, 6
CLI_TIMEOUT_S = 300


class Tally:
    """Counts of one category and a short description of each wrong case."""

    def __init__(self):
        self.tried = 0
        self.correct = 0
        self.wrong_cases: list[str] = []

    def record(self, case: str, problem: str | None) -> None:
        self.tried += 1
        if problem is None:
            self.correct += 1
        else:
            self.wrong_cases.append(f"{case}: {problem}")

    def as_dict(self) -> dict:
        return {"tried": self.tried, "correct": self.correct, "wrong": len(self.wrong_cases),
                "wrong_cases": self.wrong_cases}


def white_where_transparent(colour: np.ndarray, transparent: np.ndarray) -> np.ndarray:
    return np.where(transparent[..., None], 255, colour).astype(np.uint8)


def gray_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=-1)


def palette_image(transparent_index: int | None = None) -> Image.Image:
    image = Image.fromarray(INDICES, "P")
    image.putpalette(PALETTE.flatten().tolist())
    if transparent_index is not None:
        image.info["transparency"] = transparent_index
    return image


def colour_space(mode: str, suffix: str | None) -> tuple[Image.Image, str | None, np.ndarray, int]:
    """COLOUR in `mode`, whose RGB by the rule is PIL's conversion back to RGB (lossy for LAB)."""
    image = Image.fromarray(COLOUR).convert(mode)
    return image, suffix, np.asarray(image.convert("RGB")), 0


def mode_corpus(quick: bool) -> dict[str, tuple[Image.Image, str | None, np.ndarray, int]]:
    """name → (image, file suffix that stores its mode or None, expected RGB (H, W, 3) uint8, tolerance in levels)."""
    colours = PALETTE[INDICES]
    corpus = {
        "RGB": (Image.fromarray(COLOUR), ".png", COLOUR, 0),
        "1": (Image.fromarray(GRAY >= 128), ".png", gray_rgb(np.where(GRAY >= 128, 255, 0).astype(np.uint8)), 0),
        "L": (Image.fromarray(GRAY), ".png", gray_rgb(GRAY), 0),
        "LA": (Image.fromarray(np.dstack([GRAY, ALPHA]), "LA"), ".png",
               white_where_transparent(gray_rgb(GRAY), TRANSPARENT), 0),
        "P": (palette_image(), ".png", colours, 0),
        "P, transparent index": (palette_image(0), ".png", white_where_transparent(colours, INDICES == 0), 0),
        "RGBA": (Image.fromarray(np.dstack([COLOUR, ALPHA]), "RGBA"), ".png",
                 white_where_transparent(COLOUR, TRANSPARENT), 0),
        "CMYK": (Image.fromarray(COLOUR).convert("CMYK"), ".tiff", COLOUR, 0),
        "I;16": (Image.fromarray(GRAY.astype(np.uint16) * 257), ".png", gray_rgb(GRAY), 0),
        "I": (Image.fromarray(GRAY.astype(np.int32) * 257), ".tiff", gray_rgb(GRAY), 0),
        "F in [0, 1]": (Image.fromarray((GRAY / 255).astype(np.float32)), ".tiff", gray_rgb(GRAY), 0),
        "F in [0, 255]": (Image.fromarray(GRAY.astype(np.float32)), ".tiff", gray_rgb(GRAY), 0),
        "YCbCr": colour_space("YCbCr", ".tiff"),
        "LAB": colour_space("LAB", ".tiff"),
    }
    if quick:
        return corpus
    palette_with_alpha = palette_image().convert("PA")
    palette_with_alpha.putalpha(Image.fromarray(ALPHA))
    rotated = Image.fromarray(COLOUR)
    rotated.info["exif"] = exif_with_orientation(ROTATE_90_CLOCKWISE)
    big_endian = Image.frombytes("I;16B", (WIDTH, HEIGHT), (GRAY.astype(">u2") * 257).tobytes())  # PIL's convert clips
    return corpus | {
        "PA": (palette_with_alpha, ".tiff", white_where_transparent(colours, TRANSPARENT), 0),
        "HSV": colour_space("HSV", None),
        "I;16B": (big_endian, ".tiff", gray_rgb(GRAY), 0),
        "RGB, EXIF-rotated JPEG": (rotated, ".jpg", np.rot90(COLOUR, k=-1), LOSSY_TOLERANCE),
        "P, GIF": (palette_image(), ".gif", colours, 0),
        "RGBA, WebP": (Image.fromarray(np.dstack([COLOUR, ALPHA]), "RGBA"), ".webp",
                       white_where_transparent(COLOUR, TRANSPARENT), 0),
        "RGB, BMP": (Image.fromarray(COLOUR), ".bmp", COLOUR, 0),
    }


def exif_with_orientation(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[EXIF_ORIENTATION_TAG] = orientation
    return exif.tobytes()


def save_corpus(corpus: dict, folder: Path) -> dict[str, str | Image.Image]:
    """name → the path of the saved file, or the PIL image where no format stores the mode."""
    sources = {}
    for index, (name, (image, suffix, _, _)) in enumerate(corpus.items()):
        if suffix is None:
            sources[name] = image
            continue
        path = folder / f"mode-{index}{suffix}"
        options = {"lossless": True} if suffix == ".webp" else {"quality": 100} if suffix == ".jpg" else {}
        image.save(path, exif=image.getexif(), **options)  # PNG, TIFF and JPEG writers take EXIF only as an argument
        sources[name] = str(path)
    return sources


def opened(source: str | Image.Image) -> Image.Image:
    return Image.open(source) if isinstance(source, str) else source


class ModelInput(Exception):
    """Raised by the hook of `model_inputs` with the pixel values the model was called with; it stops the call."""

    def __init__(self, pixel_values: torch.Tensor):
        super().__init__("model input captured")
        self.pixel_values = pixel_values


def model_inputs(pipe, image) -> torch.Tensor:
    """The pixel values (1, 3, H, W) that `pipe(image)` hands to its model (which is not run: only the input
    matters here)."""
    def stop(module, args, kwargs):
        raise ModelInput(kwargs["pixel_values"])

    hook = pipe.model.register_forward_pre_hook(stop, with_kwargs=True)
    try:
        pipe(image)
    except ModelInput as captured:
        return captured.pixel_values
    finally:
        hook.remove()
    raise RuntimeError(f"{type(pipe).__name__} did not call its model")


def difference(got: torch.Tensor, reference: torch.Tensor) -> str | None:
    """None when identical, else what differs."""
    if got.shape != reference.shape:
        return f"shape {tuple(got.shape)}, expected {tuple(reference.shape)}"
    if torch.equal(got, reference):
        return None
    return f"pixel values differ from the processor's by up to {(got - reference).abs().max().item():.3f}"


def check_image_modes(folder: Path, quick: bool, processor, classifier, extractor) -> Tally:
    tally = Tally()
    corpus = mode_corpus(quick)
    sources = save_corpus(corpus, folder)
    unresized = PRGImageProcessor(do_resize=False)
    for name, (_, _, expected, tolerance) in corpus.items():
        source = sources[name]
        try:
            values = unresized(opened(source), return_tensors="pt")["pixel_values"][0].permute(1, 2, 0).numpy()
            levels = np.abs((values + 1) * 127.5 - expected).max()
            tally.record(f"{name} / processor", None if levels <= tolerance + 1e-3 else
                         f"off the conversion rule by {levels:.1f} levels (allowed {tolerance})")
            reference = processor(opened(source), return_tensors="pt")["pixel_values"]
        except Exception as error:  # noqa: BLE001 - any failure is a wrong case, reported by name
            tally.record(f"{name} / processor", f"{type(error).__name__}: {error}")
            continue
        for entry_point in entry_points(isinstance(source, str)):
            try:
                problem = difference(pixel_values_of(entry_point, source, processor, classifier, extractor),
                                     reference)
            except Exception as error:  # noqa: BLE001 - any failure is a wrong case, reported by name
                problem = f"{type(error).__name__}: {error}"
            tally.record(f"{name} / {entry_point}", problem)
    return tally


def entry_points(from_file: bool) -> list[str]:
    """The entry points other than the processor itself; the path ones need the image in a file."""
    return ["classification pipeline (PIL image)", "feature pipeline (PIL image)"] + (
        ["classification pipeline (path)", "feature pipeline (path)", "CLI reader"] if from_file else [])


def pixel_values_of(entry_point: str, source: str | Image.Image, processor, classifier, extractor) -> torch.Tensor:
    """The pixel values (1, 3, H, W) that `entry_point` (one of `entry_points`) makes of the image at `source`."""
    if entry_point == "CLI reader":
        return read_image(source, processor)[None]
    pipe = classifier if entry_point.startswith("classification") else extractor
    return model_inputs(pipe, source if entry_point.endswith("(path)") else opened(source))


def png_header_only(side: int) -> bytes:
    """A PNG that declares side × side 8-bit gray pixels and holds one row (PIL checks the size on opening)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * (side + 1)))
            + chunk(b"IEND", b""))


def write_bad_files(folder: Path) -> tuple[list[str], dict[str, str]]:
    """(two good image paths, kind → path of a bad one)."""
    rng = np.random.default_rng(0)
    good = []
    for index in range(2):
        path = folder / f"good-{index}.png"
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
        good.append(str(path))
    bad = {kind: str(folder / name) for kind, name in (
        ("truncated PNG", "truncated.png"), ("empty file", "empty.png"), ("text file named .png", "text.png"),
        ("decompression bomb over the limit", "bomb.png"), ("decompression bomb over twice the limit", "bomb2.png"),
        ("directory named x.png", "x.png"), ("missing path", "missing.png"))}
    Path(bad["truncated PNG"]).write_bytes(Path(good[0]).read_bytes()[:1000])
    Path(bad["empty file"]).write_bytes(b"")
    Path(bad["text file named .png"]).write_text("not an image\n")
    Path(bad["decompression bomb over the limit"]).write_bytes(png_header_only(10_000))  # 1e8 pixels: PIL warns
    Path(bad["decompression bomb over twice the limit"]).write_bytes(png_header_only(20_000))  # 4e8: PIL raises
    Path(bad["directory named x.png"]).mkdir()
    return good, bad


def start_cli(good: list[str], bad: dict[str, str]) -> subprocess.Popen:
    """One `prg-hub classify` process over the good files around the bad ones, running in the background."""
    command = [sys.executable, "-m", "prg_hub.cli", "classify", good[0], *bad.values(), good[1], "--top-k", "1"]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})


def check_cli(tally: Tally, process: subprocess.Popen, good: list[str], bad: dict[str, str]) -> None:
    """Wait for the process of `start_cli`; one case per bad file."""
    try:
        stdout, stderr = process.communicate(timeout=CLI_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        for kind in bad:
            tally.record(f"CLI / {kind}", f"no exit within {CLI_TIMEOUT_S} s")
        return
    classified = [line.split(": ", 1)[0] for line in stdout.splitlines()]
    common = None
    if classified != good:
        common = f"classified {classified}, expected the good files {good}"
    elif process.returncode != 1:
        common = f"exit status {process.returncode}, expected 1"
    elif "Traceback" in stderr or "Warning:" in stderr:
        common = f"traceback or raw warning on stderr: {stderr[-300:]!r}"
    for kind, path in bad.items():
        lines = [line for line in stderr.splitlines() if line.startswith(f"{path}: ")]
        tally.record(f"CLI / {kind}", common or (None if len(lines) == 1 else f"{len(lines)} stderr lines name it"))


def check_pipelines(tally: Tally, quick: bool, good: list[str], bad: dict[str, str], classifier, extractor) -> None:
    """Each pipeline on a list holding a bad file ([bad, good] when `quick`, which stops before the model runs;
    else [good, bad, good]): an error naming the bad file; then the good images are still processed."""
    for label, pipe in (("classification pipeline", classifier), ("feature pipeline", extractor)):
        options = {"num_steps": 1} if pipe.task == "image-feature-extraction" else {}
        problems = {}
        for kind, path in bad.items():
            problem = None
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    pipe([path, good[0]] if quick else [good[0], path, good[1]], **options)
                    problem = "no error"
                except UnreadableImageError as error:
                    if not str(error).startswith(f"{path}: cannot read image ("):
                        problem = f"message does not start with the path: {str(error)[:120]!r}"
                except Exception as error:  # noqa: BLE001 - the wrong kind of error is a wrong case
                    problem = f"{type(error).__name__} instead of UnreadableImageError: {str(error)[:120]!r}"
            raw = [str(warning.category.__name__) for warning in caught
                   if issubclass(warning.category, Image.DecompressionBombWarning)]
            problems[kind] = problem or (f"raw warnings escaped: {raw}" if raw else None)
        processed = len(pipe(good, **options)) == len(good)
        for kind, problem in problems.items():
            tally.record(f"{label} / {kind}", problem or (None if processed else "good images not processed after"))


def image_checks(quick: bool) -> dict[str, dict]:
    """{"image modes": tally, "bad files": tally}; see the module docstring. quick=True takes 10 to 30 s on 2 cores."""
    with tempfile.TemporaryDirectory(prefix="prg-image-checks-") as folder:
        bad_folder = Path(folder) / "bad"
        bad_folder.mkdir()
        good, bad = write_bad_files(bad_folder)
        cli = start_cli(good, bad)
        try:
            classifier = pipeline("image-classification", model=prg_hub.DEFAULT_MODEL)
            extractor = pipeline("image-feature-extraction", model=prg_hub.DEFAULT_MODEL)
            processor = PRGImageProcessor.from_pretrained(prg_hub.DEFAULT_MODEL)
            modes = check_image_modes(Path(folder), quick, processor, classifier, extractor)
            bad_files = Tally()
            check_pipelines(bad_files, quick, good, bad, classifier, extractor)
            check_cli(bad_files, cli, good, bad)
        finally:
            if cli.poll() is None:
                cli.kill()
                cli.wait()
    return {"image modes": modes.as_dict(), "bad files": bad_files.as_dict()}
