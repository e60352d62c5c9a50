"""The checkpoint installed with prg_hub (`prg_hub.DEFAULT_MODEL`): stored, carded, offline, on the Hub, in wheels."""

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import HfApi, ModelCard, hf_hub_download
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForImageClassification, pipeline

import prg_hub
from prg_hub import PRGConfig, PRGForImageClassification
from prg_hub.cli import main as prg_hub_cli

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_IMAGES = ROOT / "examples" / "images"
EVALUATION = ROOT / "benchmarks" / "results" / "default_model_cifar10_test.json"
MODEL_FILES = {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"}
CIFAR10_LABELS = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def example_labels() -> dict[str, str]:
    with (EXAMPLE_IMAGES / "labels.csv").open(newline="") as rows:
        return {row["file"]: row["label"] for row in csv.DictReader(rows)}


def example_pixel_values() -> torch.Tensor:
    """The example images, in file-name order, as the shipped model's processor prepares them: (20, 3, 32, 32)."""
    processor = prg_hub.PRGImageProcessor.from_pretrained(prg_hub.DEFAULT_MODEL)
    images = [Image.open(EXAMPLE_IMAGES / name) for name in sorted(example_labels())]
    return processor(images, return_tensors="pt")["pixel_values"]


def dead_endpoint() -> str:
    """An address nothing listens on: any attempt to reach a hub fails."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}"


def run_offline(command: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """Run a command as a new user with no network: HF_HUB_OFFLINE=1, a dead endpoint and an empty HF_HOME."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": dead_endpoint(), "HF_HOME": str(tmp_path / "hf-home")}
    return subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)


def test_default_model_lives_in_the_package_in_float16_and_loads_in_float32():
    folder = Path(prg_hub.DEFAULT_MODEL)
    assert folder.parent.parent == Path(prg_hub.__file__).parent
    assert {path.name for path in folder.iterdir()} == MODEL_FILES
    assert (folder / "model.safetensors").stat().st_size <= 16_000_000
    with safe_open(folder / "model.safetensors", "pt") as weights:
        stored = {name: weights.get_tensor(name) for name in weights.keys()}
    assert {tensor.dtype for tensor in stored.values()} == {torch.float16}

    model = PRGForImageClassification.from_pretrained(prg_hub.DEFAULT_MODEL)
    assert model.dtype == torch.float32
    assert [model.config.id2label[i] for i in range(10)] == CIFAR10_LABELS
    loaded = model.state_dict()
    assert loaded.keys() == stored.keys()
    for name, tensor in stored.items():
        assert torch.equal(loaded[name], tensor.float()), name
    assert AutoModelForImageClassification.from_pretrained(prg_hub.DEFAULT_MODEL).dtype == torch.float32
    assert PRGForImageClassification.from_pretrained(prg_hub.DEFAULT_MODEL, dtype=torch.float16).dtype == torch.float16


def test_card_states_the_measured_top1_the_recipe_the_hardware_and_the_limits():
    card = ModelCard.load(Path(prg_hub.DEFAULT_MODEL) / "README.md")
    evaluation = json.loads(EVALUATION.read_text())
    [result] = card.data.eval_results
    assert (result.metric_type, result.dataset_split) == ("accuracy", "test")
    assert result.metric_value == evaluation["top1"]  # the measurement of these weights, not a number typed in
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "image-classification"
    assert {"prg_hub", "custom_code"} <= set(card.data.tags)
    text = card.text
    assert evaluation["command"] in text and f"{evaluation['img_per_s']:.1f} images/s" in text
    for fragment in ("python examples/pretrain.py --dataset cifar10-jpeg", "--max_train_steps 1509",
                     "python examples/finetune.py --dataset cifar10-jpeg", "--max_train_steps 223",
                     "NVIDIA H200", "Training time: 3.8 minutes", "56.65%", "45.32%"):
        assert fragment in text, fragment
    for limit in ("10 classes only", "32×32 pixels", "short-budget model", "97.65%", "stored in float16"):
        assert limit in text, limit
    assert "../shared" not in text and "prg_hub.DEFAULT_MODEL" in text


def test_the_shipped_weights_classify_the_example_images_and_random_weights_do_not():
    labels = example_labels()
    assert len(labels) == 20 and sorted(labels.values()) == sorted(CIFAR10_LABELS * 2)
    classifier = pipeline("image-classification", model=prg_hub.DEFAULT_MODEL)
    names = sorted(labels)
    predictions = classifier([str(EXAMPLE_IMAGES / name) for name in names], top_k=1)
    right = sum(prediction["label"] == labels[name] for name, [prediction] in zip(names, predictions, strict=True))
    assert right >= 10, f"{right}/20 example images right"

    # The same images through the same architecture with random weights: the bar above is out of their reach.
    torch.manual_seed(0)
    random_model = PRGForImageClassification(PRGConfig.from_pretrained(prg_hub.DEFAULT_MODEL)).eval()
    pixel_values = example_pixel_values()
    with torch.inference_mode():
        random_predictions = random_model(pixel_values).logits.argmax(-1).tolist()
    random_right = sum(CIFAR10_LABELS[index] == labels[name]
                       for name, index in zip(names, random_predictions, strict=True))
    assert random_right < 10


def test_the_main_job_runs_offline_with_no_flags(tmp_path):
    labels = example_labels()
    executable = shutil.which("prg-hub") or pytest.fail("the prg-hub console script is not installed")
    classified = run_offline([executable, "classify", str(EXAMPLE_IMAGES), "--top-k", "1", "--json"], tmp_path)
    assert classified.returncode == 0, classified.stderr
    records = [json.loads(line) for line in classified.stdout.splitlines()]
    assert [Path(record["path"]).name for record in records] == sorted(labels)
    assert all(record["predictions"][0]["label"] in CIFAR10_LABELS for record in records)

    features_file = tmp_path / "f.safetensors"
    extracted = run_offline([executable, "extract", str(EXAMPLE_IMAGES), "--output", str(features_file)], tmp_path)
    assert extracted.returncode == 0, extracted.stderr
    with safe_open(features_file, "pt") as features:
        assert features.get_tensor("features").shape == (20, 3 * 16 * 16)
        assert [Path(path).name for path in json.loads(features.metadata()["paths"])] == sorted(labels)
        assert features.metadata()["model"] == prg_hub.DEFAULT_MODEL

    script = textwrap.dedent(f"""
        import huggingface_hub.constants, prg_hub
        from transformers import pipeline
        from safetensors.torch import save_file
        assert huggingface_hub.constants.HF_HUB_OFFLINE
        images = {[str(EXAMPLE_IMAGES / name) for name in sorted(labels)]!r}
        classifier = pipeline("image-classification", model=prg_hub.DEFAULT_MODEL)
        extractor = pipeline("image-feature-extraction", model=prg_hub.DEFAULT_MODEL)
        assert classifier.model.dtype == extractor.model.dtype == __import__("torch").float32
        print([prediction[0]["label"] for prediction in classifier(images, top_k=1)])
        save_file({{"pooled": __import__("torch").cat(extractor(images, pool=True, return_tensors=True))}},
                  {str(tmp_path / "pipeline.safetensors")!r})
    """)
    piped = run_offline([sys.executable, "-c", script], tmp_path)
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout.strip() == str([record["predictions"][0]["label"] for record in records])
    with safe_open(features_file, "pt") as features:
        torch.testing.assert_close(load_file(tmp_path / "pipeline.safetensors")["pooled"],
                                   features.get_tensor("features"), rtol=1e-5, atol=1e-5)


def test_quickstart_classifies_the_examples_and_saves_the_trajectory_and_samples(tmp_path):
    result = run_offline([sys.executable, str(ROOT / "examples" / "quickstart.py"), "--output_dir", str(tmp_path / "out"),
                          "--num_samples", "4"], tmp_path)
    assert result.returncode == 0, result.stderr
    [accuracy_line] = [line for line in result.stdout.splitlines() if line.startswith("accuracy on these images")]
    right = int(accuracy_line.split(": ")[1].split("/")[0])
    assert right >= 10 and "/20 = " in accuracy_line
    config = PRGConfig.from_pretrained(prg_hub.DEFAULT_MODEL)
    with Image.open(tmp_path / "out" / "trajectory.png") as strip:  # num_steps + 1 frames, t = 0 … 1
        assert strip.size == (96 * (config.num_steps + 1), 96)
        first_frame = strip.crop((0, 0, 96, 96)).resize((32, 32), Image.NEAREST)
    with Image.open(EXAMPLE_IMAGES / sorted(example_labels())[0]) as image:  # the strip starts at the image itself (t = 0)
        assert np.array_equal(np.asarray(first_frame.convert("RGB")), np.asarray(image.convert("RGB")))
    with Image.open(tmp_path / "out" / "samples.png") as samples:
        assert samples.size == (4 * 96, 96)


def test_default_model_pushed_to_the_hub_loads_in_a_fresh_process_with_the_same_outputs(hub_server, tmp_path):
    repo_id = "org/prg-otcfm-cifar10"
    assert prg_hub_cli(["push", prg_hub.DEFAULT_MODEL, repo_id]) == 0
    assert set(HfApi().list_repo_files(repo_id)) >= MODEL_FILES
    for name in ("model.safetensors", "README.md", "config.json"):  # uploaded as shipped: float16, its own card
        pulled = Path(hf_hub_download(repo_id, name, cache_dir=tmp_path / "check"))
        assert pulled.read_bytes() == (Path(prg_hub.DEFAULT_MODEL) / name).read_bytes(), name

    outputs = tmp_path / "outputs.safetensors"
    script = textwrap.dedent(f"""
        import torch, prg_hub
        from PIL import Image
        from safetensors.torch import save_file
        from transformers import pipeline
        from prg_hub import PRGForImageClassification, PRGImageProcessor
        images = [Image.open(path) for path in {[str(EXAMPLE_IMAGES / name) for name in sorted(example_labels())]!r}]
        results = {{}}
        for where, model_id in (("hub", {repo_id!r}), ("local", prg_hub.DEFAULT_MODEL)):
            model = PRGForImageClassification.from_pretrained(model_id)
            pixel_values = PRGImageProcessor.from_pretrained(model_id)(images, return_tensors="pt")["pixel_values"]
            with torch.inference_mode():
                results[f"{{where}}_logits"] = model(pixel_values).logits
            extractor = pipeline("image-feature-extraction", model=model_id)
            results[f"{{where}}_features"] = torch.cat(extractor(images, pool=True, return_tensors=True))
        save_file(results, {str(outputs)!r})
    """)
    env = {**os.environ, "HF_HOME": str(tmp_path / "fresh-hf-home")}  # HF_ENDPOINT: the test hub
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert any((tmp_path / "fresh-hf-home" / "hub").glob("models--org--prg-otcfm-cifar10/snapshots/*/model.safetensors"))
    results = load_file(outputs)
    assert results["hub_logits"].shape == (20, 10) and results["hub_features"].shape == (20, 768)
    assert torch.equal(results["hub_logits"], results["local_logits"])
    assert torch.equal(results["hub_features"], results["local_features"])


def test_the_wheel_installs_the_default_model(tmp_path):
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, symlinks=True,
                    ignore=shutil.ignore_patterns(".git", "build", "dist", "runs", "*.egg-info", "__pycache__"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                            "--wheel-dir", str(tmp_path / "wheels"), str(source)],
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr
    [wheel] = (tmp_path / "wheels").glob("prg_hub-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        shipped = {name: archive.read(name) for name in archive.namelist()
                   if name.startswith("prg_hub/pretrained/prg-otcfm-cifar10-small/")}
        card_template = archive.read("prg_hub/templates/model_card.md")
    assert {Path(name).name for name in shipped} == MODEL_FILES
    for name, content in shipped.items():
        assert content == (ROOT / name).read_bytes(), name
    assert card_template == (ROOT / "model_cards" / "model_card.md").read_bytes()
