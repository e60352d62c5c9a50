"""The example scripts, run for real with `accelerate launch` on 2 CPU processes and on data written here.

Launch command: `accelerate launch --multi_gpu --num_processes 2` with ACCELERATE_USE_CPU=1. Accelerate 1.x starts
several CPU processes only through torchrun (its multi-GPU launcher; `--cpu --num_processes 2` alone starts a
single process unless MPI is configured), and ACCELERATE_USE_CPU=1 makes them a gloo process group on the CPU.
Every distributed test asserts that the run really had 2 processes.

The data: 16×16 images of six shapes (disc, square, triangle, cross, ring, bar), each with a random colour,
position and size, written as parquet files with an `Image` feature and a `ClassLabel`, and a grayscale copy.
"""

import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import psutil
import pytest
import torch
from huggingface_hub import ModelCard
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from prg_hub import PRGConfig, PRGForFlowMatching, PRGForImageClassification, PRGModel
from prg_hub.checkpointing import checkpoint_path, list_checkpoints, prune_checkpoints, resolve_checkpoint
from prg_hub.reproducibility import parameters_sha256
from prg_hub.run_records import push_training_output
from prg_hub.training_loop import TrainingProgress, resume_position

pytestmark = pytest.mark.needs_train_extra  # the training scripts need prg_hub[train]

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["disc", "square", "triangle", "cross", "ring", "bar"]
CHANCE = 1 / len(CLASSES)
IMAGE_SIZE = 16
PRETRAIN_STEPS = 6  # the resume test stops at half
FINETUNE_STEPS = 24  # 2 epochs of 12 steps (192 images, global batch 16)


def shape_image(label: int, rng: np.random.Generator) -> Image.Image:
    """One 16×16 RGB image of shape `label` in a random colour on a dark random background."""
    hue = int(rng.uniform(0, 255))
    colour = Image.new("HSV", (1, 1), (hue, 200, 230)).convert("RGB").getpixel((0, 0))
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), tuple(int(v) for v in rng.integers(0, 80, size=3)))
    draw = ImageDraw.Draw(image)
    r = rng.uniform(0.28, 0.4) * IMAGE_SIZE
    cx, cy = rng.uniform(r, IMAGE_SIZE - r, size=2)
    box = (cx - r, cy - r, cx + r, cy + r)
    if label == 0:
        draw.ellipse(box, fill=colour)
    elif label == 1:
        draw.rectangle(box, fill=colour)
    elif label == 2:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    elif label == 3:
        draw.rectangle((cx - r, cy - r / 2.5, cx + r, cy + r / 2.5), fill=colour)
        draw.rectangle((cx - r / 2.5, cy - r, cx + r / 2.5, cy + r), fill=colour)
    elif label == 4:
        draw.ellipse(box, outline=colour, width=2)
    else:
        draw.rectangle((cx - r, cy - r / 3, cx + r, cy + r / 3), fill=colour)
    return image


def write_shapes(folder: Path, num_train: int, num_test: int, mode: str = "RGB") -> Path:
    rng = np.random.default_rng(0)
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)})
    folder.mkdir(parents=True)
    for split, count in (("train", num_train), ("test", num_test)):
        labels = [index % len(CLASSES) for index in range(count)]
        images = [shape_image(label, rng).convert(mode) for label in labels]
        table = datasets.Dataset.from_dict({"img": images, "label": labels}, features=features)
        table.to_parquet(str(folder / f"{split}-00000-of-00001.parquet"))
    return folder


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(script: str, args: list, num_processes: int = 2, online: bool = False) -> subprocess.Popen:
    """Start `accelerate launch` of examples/<script> on CPU processes (offline unless it must reach the test hub)."""
    launcher = ["--multi_gpu"] if num_processes > 1 else []
    command = [
        sys.executable, "-m", "accelerate.commands.launch", *launcher, "--num_processes", str(num_processes),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()), str(REPO / "examples" / script), *map(str, args),
    ]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    if not online:
        env["HF_HUB_OFFLINE"] = "1"
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def communicate(process: subprocess.Popen, timeout: float = 300) -> tuple[str, str]:
    """`process.communicate`, killing the launcher and every process it started if `timeout` runs out."""
    try:
        return process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:  # torch's launcher starts each worker in a session of its own, which killpg would miss
            workers = psutil.Process(process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            workers = []
        os.killpg(process.pid, signal.SIGKILL)
        for worker in workers:
            try:
                worker.kill()
            except psutil.NoSuchProcess:
                pass
        process.communicate(timeout=60)
        raise


def finish(process: subprocess.Popen) -> subprocess.CompletedProcess:
    stdout, stderr = communicate(process)
    assert process.returncode == 0, f"{' '.join(process.args)}\n--- stdout\n{stdout}\n--- stderr\n{stderr[-6000:]}"
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def launch(script: str, args: list, num_processes: int = 2, online: bool = False) -> subprocess.CompletedProcess:
    return finish(start(script, args, num_processes, online))


def summary_line(result: subprocess.CompletedProcess, script: str) -> dict:
    """The script's one summary line (printed once, by the main process only), parsed into {key: value}."""
    lines = [line for line in result.stdout.splitlines() if line.startswith(f"{script}: ")]
    assert len(lines) == 1, result.stdout
    return dict(item.split("=", 1) for item in lines[0][len(script) + 2:].split())


def progress_bars(result: subprocess.CompletedProcess, description: str) -> int:
    """How many `description` progress bars a fresh run showed (tqdm draws each bar's 0% state once)."""
    return len(re.findall(rf"(?:^|[\r\n]){description}:\s+0%\|", result.stderr))


def max_abs_difference(file_a: Path, file_b: Path) -> float:
    a, b = load_file(file_a), load_file(file_b)
    assert a.keys() == b.keys()
    return max((a[key].double() - b[key].double()).abs().max().item() for key in a)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


PRETRAIN_ARGS = [
    "--image_size", IMAGE_SIZE, "--preset", "tiny", "--backbone", "unet2d", "--probability_path", "otcfm",
    "--max_train_samples", 64, "--train_batch_size", 8, "--gradient_accumulation_steps", 2,  # 2 steps per epoch
    "--learning_rate", 1e-3, "--lr_warmup_steps", 2, "--max_grad_norm", 1.0, "--use_ema", "--ema_decay", 0.9,
    "--checkpointing_steps", PRETRAIN_STEPS // 2, "--sample_every_steps", PRETRAIN_STEPS // 2,
    "--num_sample_images", 6, "--sample_num_steps", 2, "--logging_steps", 2,
]


@pytest.fixture(scope="session")
def shapes(tmp_path_factory) -> Path:
    return write_shapes(tmp_path_factory.mktemp("data") / "shapes", num_train=192, num_test=96)


@pytest.fixture(scope="session")
def gray_shapes(tmp_path_factory) -> Path:
    return write_shapes(tmp_path_factory.mktemp("data") / "gray-shapes", num_train=96, num_test=48, mode="L")


@pytest.fixture(scope="session")
def pretrained(shapes, tmp_path_factory):
    """A 2-process pretraining run of PRETRAIN_STEPS steps, checkpointing at half way, recording its batches and
    weights: (output_dir, result)."""
    output_dir = tmp_path_factory.mktemp("pretrain") / "run"
    result = launch("pretrain.py", ["--dataset", shapes, "--output_dir", output_dir,
                                    "--max_train_steps", PRETRAIN_STEPS, *PRETRAIN_ARGS, "--record_batches"])
    return output_dir, result


FINETUNE_ARGS = [
    "--num_steps", 2, "--feature_t", 1.0, "--solver", "euler", "--augmentation", "none", "--fm_loss_weight", 0.0,
    "--label_smoothing", 0.1, "--learning_rate", 2e-3, "--num_warmup_steps", 2, "--eval_batch_size", 20,
    "--max_train_steps", FINETUNE_STEPS, "--checkpointing_steps", FINETUNE_STEPS // 2,
]


@pytest.fixture(scope="session")
def finetuned(pretrained, shapes, tmp_path_factory):
    """The same finetuning twice, recording its batches: 2 processes with batch 8 and 1 process with batch 16.
    {processes: (dir, result)}."""
    flow_dir, _ = pretrained
    runs = {}
    for num_processes, batch_size in ((2, 8), (1, 16)):
        output_dir = tmp_path_factory.mktemp("finetune") / f"{num_processes}proc"
        args = ["--model_name_or_path", flow_dir, "--dataset", shapes, "--output_dir", output_dir,
                "--train_batch_size", batch_size, *FINETUNE_ARGS, "--record_batches"]
        runs[num_processes] = (output_dir, launch("finetune.py", args, num_processes))
    return runs


# ---------------------------------------------------------------------------------------------- pretraining


def test_pretrain_distributed_processes_train_one_model(pretrained):
    output_dir, result = pretrained
    metrics = read_json(output_dir / "metrics.json")
    assert metrics["num_processes"] == 2 and metrics["steps"] == PRETRAIN_STEPS
    assert metrics["global_batch_size"] == 8 * 2 * 2
    ranks = metrics["processes"]
    assert [rank["process_index"] for rank in ranks] == [0, 1]
    # Each process trained on its own samples with its own noise ...
    assert ranks[0]["sample_indices_sha256"] != ranks[1]["sample_indices_sha256"]
    assert ranks[0]["mean_fm_loss"] != ranks[1]["mean_fm_loss"]
    assert all(rank["num_batches"] == PRETRAIN_STEPS * 2 for rank in ranks)
    # ... yet both hold bit-identical weights, which moved away from the initialisation: gradients were averaged.
    assert ranks[0]["parameters_sha256"] == ranks[1]["parameters_sha256"]
    assert ranks[0]["parameters_sha256"] != metrics["initial_parameters_sha256"]
    # The recorded weights are the ones in the last checkpoint (the training state holds the PRGForFlowMatching).
    raw = PRGForFlowMatching(PRGConfig.from_pretrained(output_dir))
    raw.load_state_dict(load_file(checkpoint_path(output_dir, PRETRAIN_STEPS) / "model.safetensors"))
    assert parameters_sha256(raw) == ranks[0]["parameters_sha256"]

    summary = summary_line(result, "pretrain")
    assert summary["steps"] == str(PRETRAIN_STEPS) and summary["weights"] == "ema"
    assert 0 < float(summary["final_fm_loss"]) < 10 and float(summary["final_fm_loss"]) == pytest.approx(
        metrics["final_fm_loss"], abs=1e-4)
    assert progress_bars(result, "pretrain") == 1


def test_pretrain_output_loads_and_saves_sample_grids(pretrained):
    output_dir, _ = pretrained
    model = PRGModel.from_pretrained(output_dir)
    config = model.config
    assert (config.probability_path, config.backbone_type, config.image_size) == ("otcfm", "unet2d", IMAGE_SIZE)
    assert read_json(output_dir / "preprocessor_config.json")["size"] == {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    assert not list(output_dir.glob("*.bin")) and not list(output_dir.glob("*.pt"))
    for step in (PRETRAIN_STEPS // 2, PRETRAIN_STEPS):
        grid = Image.open(output_dir / "samples" / f"step-{step}.png")
        assert grid.size == (3 * IMAGE_SIZE, 2 * IMAGE_SIZE)  # 6 images: 2 rows of 3
        assert np.asarray(grid).std() > 1  # not a blank image
    args = read_json(output_dir / "args.json")
    assert args["probability_path"] == "otcfm" and args["max_train_steps"] == PRETRAIN_STEPS
    images = model.generate(2, num_steps=2, generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE) and torch.isfinite(images).all()


def test_pretrain_resume_matches_uninterrupted_run(pretrained, shapes, tmp_path):
    """Stop after N steps, resume to 2N: the same raw weights, EMA weights and optimizer state as a straight 2N run."""
    full_dir, _ = pretrained
    output_dir = tmp_path / "run"
    common = ["--dataset", shapes, "--output_dir", output_dir, *PRETRAIN_ARGS]
    launch("pretrain.py", [*common, "--max_train_steps", PRETRAIN_STEPS // 2])
    assert [p.name for p in list_checkpoints(output_dir)] == [f"checkpoint-{PRETRAIN_STEPS // 2}"]
    result = launch("pretrain.py", [*common, "--max_train_steps", PRETRAIN_STEPS, "--resume_from_checkpoint", "latest"])
    assert f"Resumed from {checkpoint_path(output_dir, PRETRAIN_STEPS // 2)}" in result.stderr
    assert read_json(output_dir / "metrics.json")["steps"] == PRETRAIN_STEPS

    final = checkpoint_path(full_dir, PRETRAIN_STEPS), checkpoint_path(output_dir, PRETRAIN_STEPS)
    assert max_abs_difference(final[0] / "model.safetensors", final[1] / "model.safetensors") <= 1e-6
    assert max_abs_difference(full_dir / "model.safetensors", output_dir / "model.safetensors") <= 1e-6  # EMA
    optimizer_states = [torch.load(path / "optimizer.bin", weights_only=True)["state"] for path in final]
    for key, state in optimizer_states[0].items():
        assert torch.allclose(state["exp_avg_sq"], optimizer_states[1][key]["exp_avg_sq"], rtol=0, atol=1e-9)


def test_pretrain_on_device_data_trains_the_same_weights_as_streamed_data(shapes, tmp_path):
    """2 processes, no augmentation: the device path feeds every process the batches the PIL path does, pixel for
    pixel, so both runs take the same global batches and end with bit-identical weights."""
    records = {}
    for dataloader in ("device", "stream"):
        output_dir = tmp_path / dataloader
        result = launch("pretrain.py", ["--dataset", shapes, "--output_dir", output_dir, *PRETRAIN_ARGS,
                                        "--max_train_steps", 2, "--augmentation", "none", "--dataloader", dataloader,
                                        "--record_batches"])
        assert f"({dataloader} data)" in result.stderr
        records[dataloader] = read_json(output_dir / "metrics.json")
    device, stream = records["device"], records["stream"]
    assert device["num_processes"] == 2
    assert device["global_batches_sha256"] == stream["global_batches_sha256"]
    for device_rank, stream_rank in zip(device["processes"], stream["processes"]):
        assert device_rank["sample_indices_sha256"] == stream_rank["sample_indices_sha256"]
        assert device_rank["parameters_sha256"] == stream_rank["parameters_sha256"]
    assert device["processes"][0]["parameters_sha256"] != device["initial_parameters_sha256"]


# ----------------------------------------------------------------------------------------------- finetuning


def test_finetune_distributed_equals_single_process_with_the_same_global_batch(finetuned):
    (dir_2, result_2), (dir_1, _) = finetuned[2], finetuned[1]
    metrics_2, metrics_1 = read_json(dir_2 / "metrics.json"), read_json(dir_1 / "metrics.json")
    assert (metrics_2["num_processes"], metrics_1["num_processes"]) == (2, 1)
    assert metrics_2["global_batch_size"] == metrics_1["global_batch_size"] == 16
    # Both runs took exactly the same global batches, step by step ...
    assert metrics_2["global_batches_sha256"] == metrics_1["global_batches_sha256"]
    # ... and ended with the same weights (up to the order of floating-point sums).
    assert max_abs_difference(dir_2 / "model.safetensors", dir_1 / "model.safetensors") <= 1e-5
    assert metrics_2["history"][-1]["eval_top1"] == pytest.approx(metrics_1["history"][-1]["eval_top1"], abs=1 / 96)
    assert progress_bars(result_2, "finetune") == 1


def test_finetune_learns_above_chance_and_saves_best_and_final(finetuned, shapes):
    output_dir, result = finetuned[2]
    metrics = read_json(output_dir / "metrics.json")
    assert [record["step"] for record in metrics["history"]] == [12, 24]  # evaluated after every epoch
    assert metrics["best_top1"] > 2 * CHANCE, metrics["history"]
    assert metrics["history"][-1]["train_loss"] < metrics["history"][0]["train_loss"]
    assert metrics["eval_split_size"] == 96
    summary = summary_line(result, "finetune")
    assert float(summary["best_top1"]) == pytest.approx(metrics["best_top1"], abs=1e-4)

    for folder in (output_dir, output_dir / "best"):
        model = PRGForImageClassification.from_pretrained(folder)
        assert model.config.id2label[2] == "triangle" and model.config.num_steps == 2
        assert (folder / "model.safetensors").exists() and (folder / "preprocessor_config.json").exists()
    best = read_json(output_dir / "metrics.json")["best_epoch"]
    assert best in (0, 1)


def test_finetune_resume_matches_uninterrupted_run(finetuned, shapes, pretrained, tmp_path):
    """Resume from the state saved at step N (as an interrupted run leaves it) and finish: same weights as 2N."""
    full_dir, _ = finetuned[1]
    output_dir = tmp_path / "run"
    half = checkpoint_path(full_dir, FINETUNE_STEPS // 2)
    shutil.copytree(half, checkpoint_path(output_dir, FINETUNE_STEPS // 2))
    args = ["--model_name_or_path", pretrained[0], "--dataset", shapes, "--output_dir", output_dir,
            "--train_batch_size", 16, *FINETUNE_ARGS, "--resume_from_checkpoint", "latest"]
    result = launch("finetune.py", args, num_processes=1)
    assert "Resumed from" in result.stderr
    assert max_abs_difference(full_dir / "model.safetensors", output_dir / "model.safetensors") <= 1e-6
    resumed, uninterrupted = read_json(output_dir / "metrics.json"), read_json(full_dir / "metrics.json")
    assert resumed["history"] == uninterrupted["history"]  # epoch 0 from the checkpoint, epoch 1 recomputed


# ------------------------------------------------------------------------------- probes, evaluation, samples


def test_finetune_from_a_hub_flow_and_push_with_a_card_from_the_run(pretrained, shapes, hub_server, tmp_path):
    """Pull the flow by Hub id, finetune, `--push_to_hub`: the card carries base_model and the run's own top-1."""
    flow_dir, _ = pretrained
    push_training_output(flow_dir, "org/prg-shapes-flow")
    output_dir = tmp_path / "run"
    args = ["--model_name_or_path", "org/prg-shapes-flow", "--dataset", shapes, "--output_dir", output_dir,
            "--train_batch_size", 16, *FINETUNE_ARGS, "--max_train_steps", 2,
            "--push_to_hub", "--hub_model_id", "org/prg-shapes-classifier"]
    result = launch("finetune.py", args, num_processes=1, online=True)
    metrics = read_json(output_dir / "metrics.json")
    assert float(summary_line(result, "finetune")["final_top1"]) == pytest.approx(metrics["final_top1"], abs=1e-4)

    card = ModelCard.load("org/prg-shapes-classifier")
    assert card.data.base_model == "org/prg-shapes-flow"
    assert card.data.pipeline_tag == "image-classification"
    [result_entry] = card.data.eval_results
    assert result_entry.metric_value == metrics["final_top1"]
    assert result_entry.dataset_split == metrics["eval_split"] == "test"
    pushed = PRGForImageClassification.from_pretrained("org/prg-shapes-classifier")
    local = PRGForImageClassification.from_pretrained(output_dir)
    for name, tensor in local.state_dict().items():
        assert torch.equal(pushed.state_dict()[name], tensor), name


@pytest.fixture(scope="session")
def probes(pretrained, shapes, gray_shapes, tmp_path_factory):
    """Two frozen-flow heads (one process each, run side by side): the PRG head on x_1, and DDAE's linear probe on
    up_blocks.0 at t = 0.011. {head_type: (dir, result)}."""
    flow_dir, _ = pretrained
    root = tmp_path_factory.mktemp("probe")
    common = ["--model_name_or_path", flow_dir, "--num_train_epochs", 15, "--train_batch_size", 32,
              "--feature_batch_size", 40]
    runs = {
        "prg": (root / "prg", start("linear_probe.py", [
            "--head_type", "prg", "--dataset", shapes, "--num_steps", 2, "--output_dir", root / "prg", *common,
        ], num_processes=1)),
        "linear": (root / "linear", start("linear_probe.py", [
            "--head_type", "linear", "--feature_blocks", "up_blocks.0", "--feature_times", 0.011, "--num_steps", 1,
            "--dataset", gray_shapes, "--output_dir", root / "linear", "--learning_rate", 1e-2, *common,
        ], num_processes=1)),
    }
    return {head_type: (folder, finish(process)) for head_type, (folder, process) in runs.items()}


def test_linear_probe_prg_head_is_a_classifier_evaluate_agrees_with(probes, shapes, tmp_path):
    output_dir, result = probes["prg"]
    metrics = read_json(output_dir / "metrics.json")
    assert metrics["feature_dim"] == 3 * 16 * 16 and metrics["num_train"] == 192 and metrics["num_eval"] == 96
    assert metrics["top1"] > 2 * CHANCE and metrics["train_top1"] > 2 * CHANCE
    summary = summary_line(result, "linear_probe")
    assert summary["head_type"] == "prg" and float(summary["top1"]) == pytest.approx(metrics["top1"], abs=1e-4)
    # The saved flow + head scores the same top-1 through evaluate.py (2 processes, uneven shards).
    evaluation = launch("evaluate.py", ["--model_name_or_path", output_dir, "--dataset", shapes, "--batch_size", 20,
                                        "--output_dir", tmp_path, "--confusion_matrix"])
    results = read_json(tmp_path / "eval_results_test.json")
    assert results["num_examples"] == 96
    assert results["top1"] == pytest.approx(metrics["top1"], abs=1e-6)
    assert results["top1"] <= results["top5"] <= 1
    confusion = np.array(results["confusion_matrix"])
    assert confusion.shape == (6, 6) and confusion.sum() == 96 and (confusion.sum(1) == 16).all()
    assert np.trace(confusion) / 96 == pytest.approx(results["top1"])
    png = Image.open(tmp_path / "confusion_matrix_test.png")
    assert png.size[0] > 6 * 28 and np.asarray(png.convert("L")).std() > 10
    summary = summary_line(evaluation, "evaluate")
    assert float(summary["top1"]) == pytest.approx(results["top1"], abs=1e-4) and summary["n"] == "96"
    assert progress_bars(evaluation, "evaluate") == 1


def test_linear_probe_ddae_linear_head_on_grayscale_data_keeps_the_flow_frozen(probes, pretrained):
    output_dir, result = probes["linear"]
    metrics = read_json(output_dir / "metrics.json")
    assert metrics["feature_dim"] == 32  # channels of the tiny UNet's first up block, averaged over positions
    assert (metrics["feature_blocks"], metrics["feature_times"]) == (["up_blocks.0"], [0.011])
    assert metrics["num_train"] == 96 and metrics["num_eval"] == 48
    assert metrics["top1"] > 1.5 * CHANCE and metrics["train_top1"] > 1.5 * CHANCE
    assert summary_line(result, "linear_probe")["head_type"] == "linear"
    model = PRGForImageClassification.from_pretrained(output_dir)
    assert model.config.head_type == "linear" and model.config.id2label[5] == "bar"
    assert model.head.classifier.weight.shape == (6, 32) and torch.isfinite(model.head.classifier.weight).all()
    flow = PRGModel.from_pretrained(pretrained[0]).state_dict()
    assert all(torch.equal(model.prg.state_dict()[name], tensor) for name, tensor in flow.items())


def test_linear_probe_trains_diffeed_on_cached_states_through_its_feedback(shapes, tmp_path):
    """DifFeed needs the network in its forward: its cached features are the ODE states and the first pass's sending
    block, and every training step runs the feedback pass (its BatchNorm counts one batch per step), while the flow
    stays as it was."""
    torch.manual_seed(0)
    flow = PRGForFlowMatching(PRGConfig(image_size=IMAGE_SIZE, backbone_config={
        "block_out_channels": [16, 32, 32], "down_block_types": ["DownBlock2D"] * 3,
        "up_block_types": ["UpBlock2D"] * 3, "layers_per_block": 1, "norm_num_groups": 8, "add_attention": False}))
    flow.save_pretrained(tmp_path / "flow")
    result = launch("linear_probe.py", [
        "--model_name_or_path", tmp_path / "flow", "--dataset", shapes, "--head_type", "diffeed",
        "--feature_blocks", "mid_block", "--feature_times", 0.5, "--num_steps", 1, "--max_train_samples", 32,
        "--max_eval_samples", 16, "--train_batch_size", 16, "--num_train_epochs", 2, "--output_dir", tmp_path / "run",
    ], num_processes=1)
    metrics = read_json(tmp_path / "run" / "metrics.json")
    assert metrics["feature_dim"] == 3 * IMAGE_SIZE**2 + 32 * 8 * 8  # x_0.5 and up_blocks.0 of the first pass
    assert [record["epoch"] for record in metrics["history"]] == [0, 1]
    assert summary_line(result, "linear_probe")["head_type"] == "diffeed"
    model = PRGForImageClassification.from_pretrained(tmp_path / "run")
    assert model.head.feedback.receivers == ["down_blocks.0"]
    assert model.head.feedback.maps[0][1].num_batches_tracked.item() == 2 * 2  # 2 epochs of 2 steps
    assert all(torch.equal(model.prg.state_dict()[name], tensor) for name, tensor in flow.prg.state_dict().items())


def test_generate_writes_a_grid_of_distinct_images(pretrained, tmp_path):
    flow_dir, _ = pretrained
    result = launch("generate.py", ["--model_name_or_path", flow_dir, "--num_images", 5, "--num_steps", 2,
                                    "--batch_size", 2, "--output", tmp_path / "grid.png"])
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert grid.shape == (IMAGE_SIZE, 5 * IMAGE_SIZE, 3)  # 5 images: one row
    tiles = [grid[:, i * IMAGE_SIZE:(i + 1) * IMAGE_SIZE] for i in range(5)]
    assert len({tile.tobytes() for tile in tiles}) == 5
    summary = summary_line(result, "generate")
    assert summary["images"] == "5" and 0 < float(summary["pixel_std"]) < 1.5


# ------------------------------------------------------------------------------------------- helpers


def test_resume_position_counts_accumulated_steps():
    assert resume_position(0, batches_per_epoch=8, gradient_accumulation_steps=2) == (0, 0)
    assert resume_position(3, batches_per_epoch=8, gradient_accumulation_steps=2) == (0, 6)
    assert resume_position(4, batches_per_epoch=8, gradient_accumulation_steps=2) == (1, 0)
    assert resume_position(5, batches_per_epoch=5, gradient_accumulation_steps=2) == (1, 4)  # 3 steps per epoch


def test_training_progress_runs_the_remaining_epochs_until_max_train_steps():
    progress = TrainingProgress(batches_per_epoch=5, gradient_accumulation_steps=2, num_train_epochs=4)
    assert (progress.steps_per_epoch, progress.max_train_steps, progress.num_train_epochs) == (3, 12, 4)
    progress = TrainingProgress(batches_per_epoch=5, gradient_accumulation_steps=2, num_train_epochs=4,
                                max_train_steps=7)  # overrides the epochs: 7 steps end in epoch 2
    assert progress.num_train_epochs == 3
    progress.global_step = 4  # resumed mid-epoch 1
    epochs = []
    for epoch in progress.remaining_epochs():
        epochs.append(epoch)
        progress.global_step = min(3 * (epoch + 1), progress.max_train_steps)  # what the epoch's loop trains
        assert progress.epoch_finished
    assert epochs == [1, 2] and progress.finished
    assert list(progress.remaining_epochs()) == []  # a finished run trains nothing more


def test_checkpoint_selection_and_pruning(tmp_path):
    assert resolve_checkpoint(tmp_path, "latest") is None  # a fresh run
    for step in (10, 200, 30):
        checkpoint_path(tmp_path, step).mkdir(parents=True)
    (tmp_path / "checkpoints" / "checkpoint-500.partial").mkdir()  # an interrupted save is never picked
    assert resolve_checkpoint(tmp_path, "latest") == checkpoint_path(tmp_path, 200)
    prune_checkpoints(tmp_path, total_limit=2)  # called once the newest is complete: keeps the newest two
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-30", "checkpoint-200"]
    with pytest.raises(FileNotFoundError, match="Pass 'latest'"):
        resolve_checkpoint(tmp_path, str(tmp_path / "missing"))


def load_example(name: str):
    """Import examples/<name>.py as a module (its functions, not its main)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", REPO / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("recipe", sorted((REPO / "examples" / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_recipe_is_valid_for_its_script(recipe):
    script = load_example("pretrain" if "_pretrain" in recipe.stem else "finetune")
    required = ["--output_dir", "out", "--dataset", "data", "--model_name_or_path", "flow"]
    if script.__name__ == "example_pretrain":
        required = required[:4]
    args = script.parse_args(["--config", str(recipe), *required])
    assert args.output_dir == "out" and args.dataset == "data"  # the command line overrides the recipe
    if recipe.stem == "cifar10_finetune":
        assert (args.num_steps, args.fm_loss_weight, args.label_smoothing, args.weight_decay) == (31, 0.0, 0.1, 0.05)
        assert args.augmentation == "randaugment" and args.learning_rate is None
    if recipe.stem == "tiny_imagenet_finetune":
        assert args.num_steps == 4 and args.feature_t == pytest.approx(4 / 19)
    released = not recipe.stem.endswith(("_budget", "_fast"))  # the paper recipes set the released code's values
    if script.__name__ == "example_pretrain":
        expected = (0.0, 1.0, 0.25) if released else (None, 1000.0, 0.0)
        assert (args.dropout, args.time_scale, args.random_erasing) == expected
    else:
        expected = (False, 1e-3, 1e-2) if released else (True, 0.0, 0.0)
        assert (args.head_bias, args.warmup_start_lr_ratio, args.min_lr_ratio) == expected


def test_recipe_errors_name_the_bad_key_or_value(tmp_path, capsys):
    pretrain = load_example("pretrain")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("preset: paper\nbatch_size: 64\n")
    with pytest.raises(SystemExit):
        pretrain.parse_args(["--config", str(recipe), "--dataset", "d", "--output_dir", "o"])
    assert "unknown options ['batch_size']" in capsys.readouterr().err
    recipe.write_text("preset: huge\n")
    with pytest.raises(SystemExit):
        pretrain.parse_args(["--config", str(recipe), "--dataset", "d", "--output_dir", "o"])
    assert "preset = 'huge' is not one of ['tiny', 'small', 'paper']" in capsys.readouterr().err
    recipe.write_text("preset: paper\nuse_ema: true\n")
    args = pretrain.parse_args(["--config", str(recipe), "--dataset", "d", "--output_dir", "o", "--preset", "tiny"])
    assert (args.preset, args.use_ema) == ("tiny", True)


def test_from_scratch_has_the_pretrained_architecture_but_fresh_weights(pretrained):
    finetune = load_example("finetune")
    flow_dir, _ = pretrained
    common = ["--model_name_or_path", str(flow_dir), "--dataset", "d", "--output_dir", "o", "--num_steps", "3"]
    pretrained_model = finetune.build_model(finetune.parse_args(common), CLASSES)
    scratch = finetune.build_model(finetune.parse_args([*common, "--from_scratch"]), CLASSES)
    assert scratch.config.backbone_config == pretrained_model.config.backbone_config
    assert (scratch.config.num_labels, scratch.config.num_steps, scratch.config.id2label[5]) == (6, 3, "bar")
    flow = PRGModel.from_pretrained(flow_dir).state_dict()
    loaded, fresh = pretrained_model.prg.state_dict(), scratch.prg.state_dict()
    assert all(torch.equal(loaded[key], flow[key]) for key in flow)  # the flow's weights, loaded
    assert not all(torch.equal(fresh[key], flow[key]) for key in flow)  # random initialisation
    assert torch.isfinite(pretrained_model.head.hidden.weight).all() and pretrained_model.head.hidden.weight.std() > 0


def test_finetune_builds_any_head_from_the_command_line(pretrained):
    finetune = load_example("finetune")
    common = ["--model_name_or_path", str(pretrained[0]), "--dataset", "d", "--output_dir", "o", "--num_steps", "2"]
    model = finetune.build_model(finetune.parse_args([
        *common, "--head_type", "difformer", "--feature_blocks", "mid_block", "up_blocks.0", "--feature_times", "0.25",
        "0.5"]), CLASSES)
    assert type(model.head).__name__ == "DifFormerHead"
    assert (model.config.feature_blocks, model.config.feature_times) == (["mid_block", "up_blocks.0"], [0.25, 0.5])
    with pytest.raises(ValueError, match=r"Unknown feature_blocks entry 'up_blocks.9'"):
        finetune.build_model(finetune.parse_args([*common, "--head_type", "linear", "--feature_blocks", "up_blocks.9"]),
                             CLASSES)


def test_finetune_trains_a_block_head_and_the_flow_through_the_ode(pretrained, shapes, tmp_path):
    flow_dir, _ = pretrained
    output_dir = tmp_path / "run"
    launch("finetune.py", ["--model_name_or_path", flow_dir, "--dataset", shapes, "--output_dir", output_dir,
                           "--train_batch_size", 16, *FINETUNE_ARGS, "--max_train_steps", 2, "--head_type", "attention",
                           "--feature_blocks", "up_blocks.0", "--feature_times", 0.5], num_processes=1)
    model = PRGForImageClassification.from_pretrained(output_dir)
    assert type(model.head).__name__ == "AttentionHead" and model.config.feature_times == [0.5]
    flow = PRGModel.from_pretrained(flow_dir).state_dict()
    trained = model.prg.state_dict()
    assert not all(torch.equal(trained[name], tensor) for name, tensor in flow.items())  # trained through the ODE
    assert 0 <= read_json(output_dir / "metrics.json")["final_top1"] <= 1
