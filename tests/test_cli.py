"""The `prg-hub` command, run in-process through `main(argv)` and as a real process (console script, `-m`)."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import HfApi
from PIL import Image
from safetensors import safe_open

import prg_hub
from prg_hub import PRGConfig, PRGForFlowMatching, PRGForImageClassification, PRGImageProcessor, PRGModel
from prg_hub.cli import DTYPE_CHOICES, main
from prg_hub.hub_upload import push_model_to_hub
from prg_hub.image_grid import save_image_grid

LABELS = {0: "cat", 1: "dog", 2: "bird"}
IMAGE_SIZE = 16
EXAMPLE_IMAGES = Path(__file__).resolve().parents[1] / "examples" / "images"


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory) -> Path:
    """A saved PRG classifier (16×16 RGB, 3 labels, 2 Euler steps) with its image processor."""
    torch.manual_seed(0)
    model = PRGForImageClassification(PRGConfig(image_size=IMAGE_SIZE, num_steps=2, num_labels=3, id2label=LABELS))
    folder = tmp_path_factory.mktemp("classifier")
    model.save_pretrained(folder)
    PRGImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def images_dir(tmp_path_factory) -> Path:
    """Three readable images (one grayscale JPEG in a subfolder), a corrupt PNG and a text file."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)).save(folder / "c.png")
    (folder / "nested").mkdir()
    Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(folder / "nested" / "d.jpg")
    (folder / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n but not really")
    (folder / "notes.txt").write_text("not an image, and not named like one")
    return folder


def readable_images(images_dir: Path) -> list[str]:
    """The files a directory argument expands to, minus the corrupt one, in the order they are processed."""
    return [str(images_dir / "a.png"), str(images_dir / "c.png"), str(images_dir / "nested" / "d.jpg")]


def expected_pixel_values(paths: list[str]) -> torch.Tensor:
    processor = PRGImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return processor([Image.open(path) for path in paths], return_tensors="pt")["pixel_values"]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """`prg-hub argv` in this process: (exit status, stdout, stderr); usage errors give status 2 like argparse."""
    try:
        status = main(list(argv))
    except SystemExit as exit_:
        status = exit_.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_classify_console_script_reports_the_bad_file_and_classifies_the_rest(classifier_dir, images_dir):
    executable = shutil.which("prg-hub")
    assert executable, "the prg-hub console script is missing: run `pip install -e .`"
    result = subprocess.run([executable, "classify", str(images_dir), "--model", str(classifier_dir), "--json",
                             "--top-k", "2", "--batch-size", "2"], capture_output=True, text=True, timeout=120)

    assert result.returncode == 1
    assert f"{images_dir / 'b.png'}: cannot read image (cannot identify image file" in result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [record["path"] for record in records] == readable_images(images_dir)

    model = PRGForImageClassification.from_pretrained(classifier_dir)
    with torch.no_grad():
        probabilities = model(expected_pixel_values(readable_images(images_dir))).logits.softmax(-1)
    scores, indices = probabilities.topk(2, dim=-1)
    for record, image_scores, image_indices in zip(records, scores.tolist(), indices.tolist(), strict=True):
        assert [p["label"] for p in record["predictions"]] == [LABELS[i] for i in image_indices]
        np.testing.assert_allclose([p["score"] for p in record["predictions"]], image_scores, rtol=1e-5)


def test_classify_text_output_and_usage_errors(capsys, monkeypatch, classifier_dir, images_dir, tmp_path):
    good = readable_images(images_dir)
    status, out, err = run_cli(capsys, "classify", *good, "--model", str(classifier_dir), "--top-k", "5")
    assert status == 0 and err == ""
    lines = out.splitlines()
    assert [line.split(": ")[0] for line in lines] == good
    assert all(line.count("(") == len(LABELS) for line in lines)  # --top-k 5 is capped at the 3 labels

    status, out, err = run_cli(capsys, "classify", good[0], str(tmp_path / "missing.png"), "--model",
                               str(classifier_dir))
    assert status == 1 and out.startswith(f"{good[0]}: ")
    assert f"{tmp_path / 'missing.png'}: no such file or directory" in err

    monkeypatch.setattr(prg_hub, "DEFAULT_MODEL", str(classifier_dir))  # without --model: prg_hub.DEFAULT_MODEL
    status, out, _ = run_cli(capsys, "classify", good[0])
    assert status == 0 and out.startswith(f"{good[0]}: ")

    flow_dir = tmp_path / "flow"
    PRGModel(PRGConfig(image_size=IMAGE_SIZE, num_steps=2)).save_pretrained(flow_dir)
    status, _, err = run_cli(capsys, "classify", good[0], "--model", str(flow_dir))
    assert status == 2 and "PRGModel checkpoint" in err and "prg-hub extract" in err

    status, _, err = run_cli(capsys, "classify", good[0], "--model", str(tmp_path / "no-such-model"))
    assert status == 1 and err.startswith(f"prg-hub: cannot load model '{tmp_path / 'no-such-model'}'")

    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    status, out, err = run_cli(capsys, "classify", str(empty_dir), good[0], "--model", str(classifier_dir))
    assert status == 1 and f"{empty_dir}: no image files in this directory" in err and out.startswith(good[0])


def test_extract_writes_the_model_features_with_their_paths(capsys, classifier_dir, images_dir, tmp_path):
    good = readable_images(images_dir)
    model = PRGModel.from_pretrained(classifier_dir)
    with torch.no_grad():
        expected = model(expected_pixel_values(good), feature_t=0.5, num_steps=3).pooler_output

    output = tmp_path / "features.safetensors"
    status, _, err = run_cli(capsys, "extract", str(images_dir), "--model", str(classifier_dir), "--output",
                             str(output), "--feature-t", "0.5", "--num-steps", "3")
    assert status == 1 and f"{images_dir / 'b.png'}: cannot read image" in err
    with safe_open(output, framework="pt") as saved:
        features, metadata = saved.get_tensor("features"), saved.metadata()
    assert features.shape == (3, 3 * 16 * 16)
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-6)
    assert json.loads(metadata["paths"]) == good
    assert (metadata["feature_t"], metadata["num_steps"], metadata["model"]) == ("0.5", "3", str(classifier_dir))

    output = tmp_path / "features.npy"
    status, out, _ = run_cli(capsys, "extract", *good, "--model", str(classifier_dir), "--output", str(output),
                             "--feature-t", "0.5", "--num-steps", "3")
    assert status == 0 and "(3, 768)" in out
    np.testing.assert_allclose(np.load(output), expected.numpy(), rtol=1e-5, atol=1e-6)
    assert json.loads((tmp_path / "features.paths.json").read_text()) == good

    status, _, err = run_cli(capsys, "extract", str(images_dir / "b.png"), "--model", str(classifier_dir),
                             "--output", str(tmp_path / "none.npy"))
    assert status == 1 and "no image could be read" in err and not (tmp_path / "none.npy").exists()

    for bad_option, message in ((("--output", "f.csv"), "--output must end in .safetensors or .npy"),
                                (("--output", "f.npy", "--feature-t", "1.5"), "feature_t must be in (0, 1]")):
        status, _, err = run_cli(capsys, "extract", good[0], "--model", str(classifier_dir), *bad_option)
        assert status == 2 and message in err


def test_classify_in_bfloat16_gives_the_float32_top1_of_the_example_images(capsys):
    """The shipped classifier with `--dtype bfloat16`: scores within 0.02 of float32 (measured: 0.003), so every
    example image that float32 labels with a margin over 0.04 gets the same label (all but a few near-ties)."""
    runs = {}
    for dtype in ("float32", "bfloat16"):
        status, out, err = run_cli(capsys, "classify", str(EXAMPLE_IMAGES), "--top-k", "2", "--json", "--dtype", dtype)
        assert status == 0, err
        runs[dtype] = [json.loads(line) for line in out.splitlines()]
    assert len(runs["float32"]) == len(list(EXAMPLE_IMAGES.glob("*.png")))
    clear = 0
    for fast, exact in zip(runs["bfloat16"], runs["float32"], strict=True):
        assert fast["path"] == exact["path"]
        (top, second), (fast_top, _) = exact["predictions"], fast["predictions"]
        assert fast_top["score"] == pytest.approx(top["score"], abs=0.02)
        if top["score"] - second["score"] > 0.04:
            clear += 1
            assert fast_top["label"] == top["label"], exact["path"]
    assert clear >= 15


def test_extract_in_bfloat16_writes_float32_features_close_to_float32(capsys, tmp_path):
    paths = [str(path) for path in sorted(EXAMPLE_IMAGES.glob("*.png"))[:6]]
    features = {}
    for dtype in ("float32", "bfloat16"):
        output = tmp_path / f"{dtype}.safetensors"
        status, _, err = run_cli(capsys, "extract", *paths, "--output", str(output), "--dtype", dtype)
        assert status == 0, err
        with safe_open(output, framework="pt") as saved:
            features[dtype] = saved.get_tensor("features")
    assert features["bfloat16"].dtype == torch.float32
    torch.testing.assert_close(features["bfloat16"], features["float32"], rtol=0.05, atol=0.02)


@pytest.mark.parametrize("option", ["--compile", "--channels-last"])
def test_compile_and_channels_last_reach_the_model(capsys, monkeypatch, classifier_dir, images_dir, option):
    """`--compile` and `--channels-last` are handed to `enable_fast_inference`, and the fast model prints the scores
    of the eager float32 one."""
    good = readable_images(images_dir)
    status, expected, err = run_cli(capsys, "classify", *good, "--model", str(classifier_dir), "--json")
    assert status == 0, err

    calls, models = [], []
    enable_fast_inference = PRGForImageClassification.enable_fast_inference

    def recording(model, **options):
        calls.append(options)
        models.append(model)
        return enable_fast_inference(model, **options)

    monkeypatch.setattr(PRGForImageClassification, "enable_fast_inference", recording)
    status, out, err = run_cli(capsys, "classify", *good, "--model", str(classifier_dir), "--json", option)
    assert status == 0, err
    compile_on = option == "--compile"
    assert calls == [{"dtype": "float32", "compile": compile_on, "channels_last": not compile_on}]
    options = models[0].fast_inference_options
    assert (options.compile, options.channels_last) == (compile_on, not compile_on)
    for record, expected_record in zip(map(json.loads, out.splitlines()), map(json.loads, expected.splitlines()),
                                       strict=True):
        assert [p["label"] for p in record["predictions"]] == [p["label"] for p in expected_record["predictions"]]
        np.testing.assert_allclose([p["score"] for p in record["predictions"]],
                                   [p["score"] for p in expected_record["predictions"]], rtol=1e-4)


def test_compile_with_channels_last_on_the_cpu_is_a_usage_error(capsys, classifier_dir, images_dir):
    status, out, err = run_cli(capsys, "classify", str(images_dir), "--model", str(classifier_dir), "--compile",
                               "--channels-last")
    assert status == 2 and out == ""
    assert "--compile with --channels-last: compile with channels_last is refused on the CPU" in err


@pytest.mark.parametrize("command", [["classify"], ["extract", "--output", "features.npy"]])
def test_an_unknown_dtype_is_a_usage_error_naming_the_choices(capsys, images_dir, command):
    status, _, err = run_cli(capsys, *command, str(images_dir), "--dtype", "float8")
    assert status == 2
    assert "argument --dtype: invalid choice: 'float8'" in err
    assert all(name in err for name in DTYPE_CHOICES)


def test_push_then_info_show_the_weights_and_the_card_metric(capsys, hub_server, classifier_dir, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(classifier_dir, run_dir)
    (run_dir / "args.json").write_text(json.dumps({"dataset": "uoft-cs/cifar10", "learning_rate": 1e-4}))
    (run_dir / "metrics.json").write_text(json.dumps({"final_top1": 0.6875, "eval_split": "test", "steps": 40}))

    status, out, err = run_cli(capsys, "push", str(run_dir), "org/cli-pushed")
    assert status == 0, err
    commit = HfApi().model_info("org/cli-pushed").sha
    assert f"commit {commit}" in out
    local = PRGForImageClassification.from_pretrained(classifier_dir)
    pulled = PRGForImageClassification.from_pretrained("org/cli-pushed")
    for name, tensor in local.state_dict().items():
        assert torch.equal(pulled.state_dict()[name], tensor), name

    status, out, _ = run_cli(capsys, "info", "org/cli-pushed")
    assert status == 0
    assert f"parameters: {sum(p.numel() for p in local.parameters()):,}" in out
    assert "metric: accuracy = 0.6875 on uoft-cs/cifar10, test split" in out
    assert "class: PRGForImageClassification (pipeline tag image-classification)" in out
    assert "labels: 3 (cat, dog, bird)" in out

    status, out, _ = run_cli(capsys, "info", str(classifier_dir))
    assert status == 0 and "metrics: not evaluated (no model card)" in out

    status, _, err = run_cli(capsys, "push", str(tmp_path), "org/nothing")
    assert status == 2 and "has no config.json" in err


def test_info_of_a_pushed_model_without_results_says_not_evaluated(capsys, hub_server):
    push_model_to_hub(PRGModel(PRGConfig(image_size=IMAGE_SIZE, num_steps=2)), "org/cli-flow")
    status, out, _ = run_cli(capsys, "info", "org/cli-flow")
    assert status == 0
    assert "class: PRGModel (pipeline tag image-feature-extraction)" in out
    assert "metrics: not evaluated (no model-index in the model card)" in out


def test_info_names_a_flow_matching_checkpoint_and_its_probability_path(capsys, tmp_path):
    model = PRGForFlowMatching(PRGConfig(image_size=IMAGE_SIZE, num_steps=2, probability_path="icfm"))
    model.save_pretrained(tmp_path)
    status, out, _ = run_cli(capsys, "info", str(tmp_path))
    assert status == 0
    assert "class: PRGForFlowMatching (pipeline tag image-feature-extraction)" in out
    assert f"parameters: {sum(p.numel() for p in model.parameters()):,}" in out
    assert "probability_path: icfm" in out


def test_generate_writes_a_grid_of_the_seeded_samples(capsys, classifier_dir, tmp_path):
    output = tmp_path / "grid.png"
    status, out, _ = run_cli(capsys, "generate", "--model", str(classifier_dir), "--num-images", "6", "--output",
                             str(output), "--seed", "3")
    assert status == 0 and str(output) in out
    grid = Image.open(output)
    assert grid.size == (3 * IMAGE_SIZE, 2 * IMAGE_SIZE)  # 6 images: 2 rows of 3

    model = PRGModel.from_pretrained(classifier_dir)
    save_image_grid(model.generate(6, generator=torch.Generator().manual_seed(3)), tmp_path / "expected.png")
    np.testing.assert_array_equal(np.asarray(grid), np.asarray(Image.open(tmp_path / "expected.png")))

    status, _, err = run_cli(capsys, "generate", "--model", str(classifier_dir), "--num-images", "0", "--output",
                             str(output))
    assert status == 2 and "--num-images must be >= 1" in err


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_serve_hub_serves_the_real_client(tmp_path):
    port = free_port()
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("# token name role\nhf_cli_writer cli-user write\n")
    server = subprocess.Popen([sys.executable, "-m", "prg_hub.cli", "serve-hub", "--root", str(tmp_path / "hub"),
                               "--port", str(port), "--token-file", str(tokens)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert server.poll() is None, server.communicate()[1]
            assert time.monotonic() < deadline, "serve-hub did not start listening within 60 s"
            time.sleep(0.2)

        api = HfApi(endpoint=f"http://127.0.0.1:{port}", token="hf_cli_writer")
        assert api.whoami()["name"] == "cli-user"
        api.create_repo("org/served")
        api.upload_file(path_or_fileobj=b"{}", path_in_repo="config.json", repo_id="org/served")
        assert api.list_repo_files("org/served") == [".gitattributes", "config.json"]
        assert (tmp_path / "hub" / "repos" / "models" / "org--served" / "repo.json").is_file()
    finally:
        server.send_signal(signal.SIGINT if os.name == "posix" else signal.SIGTERM)
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:  # SIGINT is ignored when the test itself runs in the background
            server.kill()
            server.wait()
    assert f"Hub server on http://127.0.0.1:{port}" in server.stderr.read()
