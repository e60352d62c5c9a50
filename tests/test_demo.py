"""The web demo's work behind each tab (`prg_hub.demo.PRGDemo`), its checks of uploads, `prg-hub demo` and the
Space entry point. The page itself is driven in a real browser by test_demo_browser.py."""

import runpy
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import pipeline

import prg_hub
from prg_hub import PRGConfig, PRGForImageClassification, PRGImageProcessor, PRGModel
from prg_hub.cli import main
from prg_hub.demo import (
    CAPTION_HEIGHT,
    MAX_FRAMES,
    SHOWN_PIXELS,
    DemoInputError,
    NotAClassifierError,
    PRGDemo,
    enlarged,
    example_images,
    for_display,
    frame_indices,
    read_upload,
    solver_progress,
)
from prg_hub.image_grid import to_pil_images

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples" / "images"
TINY_LABELS = {0: "cat", 1: "dog", 2: "bird"}


@pytest.fixture(scope="module")
def work() -> PRGDemo:
    """The demo's work on the shipped CIFAR-10 classifier."""
    return PRGDemo()


@pytest.fixture(scope="module")
def cat() -> Image.Image:
    return read_upload(EXAMPLES / "cat-6360.png")


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory) -> Path:
    """A saved 3-label PRG classifier on 16×16 images, with its image processor."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-classifier")
    PRGForImageClassification(PRGConfig(image_size=16, num_steps=2, num_labels=3, id2label=TINY_LABELS)
                               ).save_pretrained(folder)
    PRGImageProcessor(size={"height": 16, "width": 16}).save_pretrained(folder)
    return folder


def model_input(work: PRGDemo, image: Image.Image) -> torch.Tensor:
    return work.classifier.image_processor(image, return_tensors="pt")["pixel_values"]


def frame(strip: Image.Image, index: int) -> np.ndarray:
    """Frame `index` of a trajectory strip, without its caption."""
    pixels = np.asarray(strip)
    return pixels[:SHOWN_PIXELS, index * SHOWN_PIXELS:(index + 1) * SHOWN_PIXELS]


def png_header(width: int, height: int) -> bytes:
    """A PNG file that declares width × height 8-bit grayscale pixels and holds none (no IDAT chunk)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def test_classify_gives_the_top5_of_the_pipeline_reading_the_file_itself(work):
    assert len(example_images(EXAMPLES)) == 20
    paths = example_images(EXAMPLES)[::5]  # one image of four classes
    classifier = pipeline("image-classification", model=prg_hub.DEFAULT_MODEL)
    for path, expected in zip(paths, classifier([str(path) for path in paths], top_k=5), strict=True):
        shown = work.classify(read_upload(path))
        assert [p["label"] for p in shown] == [p["label"] for p in expected], path.name
        assert [p["score"] for p in shown] == pytest.approx([p["score"] for p in expected], rel=1e-6), path.name


def test_trajectory_at_the_models_settings_shows_the_image_first_and_predicts_as_the_pipeline(work, cat):
    config = work.config
    result = work.trajectory(cat, config.num_steps, config.feature_t)
    assert result.predictions == work.classify(cat)
    assert result.times == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    assert result.strip.size == (5 * SHOWN_PIXELS, SHOWN_PIXELS + CAPTION_HEIGHT)
    as_the_model_sees_it = enlarged(to_pil_images(model_input(work, cat))[0])
    assert np.array_equal(frame(result.strip, 0), np.asarray(as_the_model_sees_it))


def test_trajectory_follows_the_settings_through_the_models_solver(work, cat):
    result = work.trajectory(cat, 12, 0.5)
    shown = frame_indices(12)
    assert len(shown) == MAX_FRAMES
    assert result.times == pytest.approx([0.5 * k / 12 for k in shown])
    assert result.strip.width == MAX_FRAMES * SHOWN_PIXELS
    with torch.inference_mode():
        output = work.model(model_input(work, cat), feature_t=0.5, num_steps=12, output_hidden_states=True)
    scores, indices = output.logits.softmax(-1)[0].topk(5)
    assert [p["label"] for p in result.predictions] == [work.config.id2label[i] for i in indices.tolist()]
    assert [p["score"] for p in result.predictions] == pytest.approx(scores.tolist(), rel=1e-5)
    for position, k in enumerate(shown):
        expected = enlarged(to_pil_images(for_display(output.hidden_states[k]))[0])
        assert np.array_equal(frame(result.strip, position), np.asarray(expected)), f"frame of x_t, k = {k}"
    assert not np.array_equal(np.asarray(work.trajectory(cat, 4, 0.5).strip), np.asarray(result.strip))


@pytest.mark.parametrize("num_steps, expected", [
    (1, [0, 1]),
    (4, [0, 1, 2, 3, 4]),
    (9, list(range(10))),
    (1000, [0, 111, 222, 333, 444, 556, 667, 778, 889, 1000]),
])
def test_frame_indices_are_at_most_ten_evenly_spread_from_the_image_to_the_end(num_steps, expected):
    assert frame_indices(num_steps) == expected


def test_for_display_leaves_images_alone_and_compresses_noise_into_range():
    torch.manual_seed(0)
    image = torch.rand(1, 3, 8, 8) * 2 - 1
    assert torch.equal(for_display(image), image)
    noise = 3 * torch.randn(1, 3, 32, 32)
    shown = for_display(noise)
    assert shown.abs().flatten().quantile(0.99).item() == pytest.approx(1.0, abs=1e-5)
    assert torch.allclose(shown * noise.abs().flatten().quantile(0.99), noise, atol=1e-5)


class StillVelocity(torch.nn.Module):
    """v(x, t) = 0."""

    def forward(self, x, t):
        return torch.zeros_like(x)


def test_progress_follows_the_solver_both_ways_and_stops_with_the_block(work, cat):
    fractions = []
    work.trajectory(cat, 10, 0.5, report=fractions.append)
    assert fractions == pytest.approx([k / 10 for k in range(10)])  # Euler evaluates v at t_0 … t_9
    fractions.clear()
    work.generate(2, 5, seed=0, report=fractions.append)
    assert fractions == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8])

    calls = []
    velocity = StillVelocity()
    with solver_progress(velocity, 0.0, 1.0, calls.append):
        for t in torch.linspace(0, 1, 1001):
            velocity(torch.zeros(1), t.expand(1))
    assert len(calls) <= 101 and calls[0] == 0.0 and calls[-1] >= 0.99  # 1,001 evaluations, reported by 1%
    assert all(later - earlier >= 0.01 - 1e-6 for earlier, later in zip(calls, calls[1:]))
    reported = len(calls)
    velocity(torch.zeros(1), torch.ones(1))
    assert len(calls) == reported


def test_generate_draws_the_models_samples_for_a_seed(work):
    grid = work.generate(3, 2, seed=7)
    assert grid.size == (3 * SHOWN_PIXELS, SHOWN_PIXELS)
    samples = work.model.prg.generate(3, num_steps=2, generator=torch.Generator().manual_seed(7))
    for index, sample in enumerate(to_pil_images(samples)):
        tile = np.asarray(grid)[:, index * SHOWN_PIXELS:(index + 1) * SHOWN_PIXELS]
        assert np.array_equal(tile, np.asarray(enlarged(sample)))
    assert np.array_equal(np.asarray(work.generate(3, 2, seed=7)), np.asarray(grid))
    assert not np.array_equal(np.asarray(work.generate(3, 2, seed=8)), np.asarray(grid))
    assert work.generate(16, 1, seed=0).size == (8 * SHOWN_PIXELS, 2 * SHOWN_PIXELS)


def test_an_upload_is_read_in_its_stored_mode(tmp_path):
    path = tmp_path / "transparent.png"
    Image.new("RGBA", (40, 30), (10, 20, 30, 0)).save(path)
    image = read_upload(path)
    assert (image.mode, image.size) == ("RGBA", (40, 30))


def truncated_png() -> bytes:
    data = Path(EXAMPLES / "dog-6417.png").read_bytes()
    return data[:len(data) // 2]


@pytest.mark.parametrize("name, content, message", [
    ("notes.png", b"meeting at ten", "notes.png is not an image the demo can read (cannot identify image file "
                                     "'notes.png')"),
    ("empty.jpg", b"", "empty.jpg is not an image the demo can read"),
    ("cut.png", truncated_png(), "cut.png is not an image the demo can read"),
    ("wide.png", png_header(8000, 6000), "wide.png is too large (8000×6000 = 48 megapixels): the demo takes images "
                                         "of at most 40 megapixels. Downscale it and try again."),
    ("bomb.png", png_header(20000, 20000), "bomb.png is too large: the demo takes images of at most 40 megapixels"),
])
def test_a_bad_upload_is_a_message_naming_the_file_and_not_its_folder(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DemoInputError) as raised:
        read_upload(path)
    assert message in str(raised.value)
    assert str(tmp_path) not in str(raised.value)


def test_the_demo_refuses_a_checkpoint_without_a_classification_head(tmp_path):
    PRGModel(PRGConfig(image_size=16, num_steps=2)).save_pretrained(tmp_path)
    with pytest.raises(NotAClassifierError, match="is a PRGModel checkpoint: it has no classification head"):
        PRGDemo(str(tmp_path))


def test_a_model_with_fewer_labels_shows_them_all(tiny_classifier):
    work = PRGDemo(str(tiny_classifier))
    predictions = work.classify(Image.new("RGB", (20, 20), "red"))
    assert sorted(p["label"] for p in predictions) == sorted(TINY_LABELS.values())
    assert sum(p["score"] for p in predictions) == pytest.approx(1.0, abs=1e-5)


def test_prg_hub_demo_without_gradio_says_how_to_install_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` raises ImportError
    with pytest.raises(SystemExit) as exit_:
        main(["demo"])
    assert exit_.value.code == 2
    assert 'the demo needs gradio: pip install "prg_hub[demo]"' in capsys.readouterr().err


def test_prg_hub_demo_refuses_a_feature_extractor_and_reports_a_missing_model(tmp_path, capsys):
    pytest.importorskip("gradio")
    PRGModel(PRGConfig(image_size=16, num_steps=2)).save_pretrained(tmp_path / "flow")
    with pytest.raises(SystemExit) as exit_:
        main(["demo", "--model", str(tmp_path / "flow")])
    assert exit_.value.code == 2
    assert "is a PRGModel checkpoint: it has no classification head" in capsys.readouterr().err
    assert main(["demo", "--model", str(tmp_path / "missing")]) == 1
    assert f"prg-hub: cannot load model {str(tmp_path / 'missing')!r}" in capsys.readouterr().err


def test_app_py_builds_the_demo_of_the_model_the_space_names(tiny_classifier, monkeypatch):
    gradio = pytest.importorskip("gradio")
    monkeypatch.setenv("PRG_DEMO_MODEL", str(tiny_classifier))
    space = runpy.run_path(str(REPO / "app.py"), run_name="space")  # not "__main__": built, not launched
    demo = space["demo"]
    assert isinstance(demo, gradio.Blocks)
    element_ids = {block.elem_id for block in demo.blocks.values()}
    assert {"classify-upload", "classify-labels", "classify-status", "trajectory-steps", "trajectory-strip",
            "trajectory-labels", "generate-button", "generate-samples"} <= element_ids
    texts = " ".join(str(block.value) for block in demo.blocks.values() if isinstance(block, gradio.Markdown))
    assert f"Model: `{tiny_classifier.name}`, 16×16 images, 2 euler steps" in texts
