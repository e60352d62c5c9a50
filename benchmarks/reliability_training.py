"""Reliability checks of the models and the training scripts: bad tensors, NaN paths, kills during training.

`training_checks(quick)` returns {category: {"tried", "correct", "wrong", "wrong_cases"}} for
* "tensors": malformed inputs to the models get a ValueError naming the problem; good ones give finite outputs;
* "NaN paths": non-finite weights or losses are never saved, pushed, printed or trained on (scripts, CLI, API);
* "resume kills": SIGKILL of a pretraining run at random moments, checkpoints included; every resume starts from
  the last complete checkpoint and the final weights equal those of an uninterrupted run.
Training runs are tiny (16×16 random images, the `tiny` UNet preset) and run on the CPU.
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import datasets
import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from prg_hub import PRGConfig, PRGForImageClassification, PRGModel, default_image_processor
from prg_hub.checkpointing import list_checkpoints
from prg_hub.finiteness import NonFiniteError
from prg_hub.hub_server import serve_hub

REPO = Path(__file__).resolve().parents[1]
IMAGE_SIZE = 16
TOKEN = "hf_reliability_admin"
PRETRAIN_ARGS = ["--image_size", IMAGE_SIZE, "--preset", "tiny", "--backbone", "unet2d", "--probability_path", "otcfm",
                 "--train_batch_size", 8, "--learning_rate", 1e-3, "--lr_warmup_steps", 1, "--use_ema",
                 "--sample_every_steps", 1000, "--num_sample_images", 4, "--sample_num_steps", 2]


class Tally:
    """Counts of one category, with a short description of every wrong case."""

    def __init__(self):
        self.tried, self.correct, self.wrong_cases = 0, 0, []

    def record(self, case: str, ok: bool, detail: str = "") -> None:
        self.tried += 1
        if ok:
            self.correct += 1
        else:
            self.wrong_cases.append(f"{case}: {detail}"[:300])

    def as_dict(self) -> dict:
        return {"tried": self.tried, "correct": self.correct, "wrong": len(self.wrong_cases),
                "wrong_cases": self.wrong_cases}


def raises(call, error_type: type[Exception], words: str) -> tuple[bool, str]:
    """(True, "") if `call()` raises `error_type` whose message contains `words`, else (False, what happened)."""
    try:
        call()
    except error_type as error:
        return words in str(error), str(error)[:200]
    except Exception as error:  # noqa: BLE001 - the wrong kind of error is a wrong answer, reported
        return False, f"{type(error).__name__}: {error}"[:200]
    return False, "no error"


def check_tensors(tally: Tally) -> None:
    model = PRGForImageClassification(PRGConfig(image_size=IMAGE_SIZE, num_steps=2, num_labels=3)).eval()
    good = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE) * 2 - 1
    nan, inf = good.clone(), good.clone()
    nan[0, 0, 0, 0], inf[1, 2, 3, 4] = float("nan"), float("inf")
    cases = {
        "NaN pixel": (lambda: model(nan), "NaN or Inf"),
        "Inf pixel": (lambda: model(inf), "NaN or Inf"),
        "[0, 255] values": (lambda: model((good + 1) * 127.5), "[0, 255]"),
        "|x| = 1e4": (lambda: model(good * 1e4), "far outside"),
        "uint8 tensor": (lambda: model(((good + 1) * 127.5).to(torch.uint8)), "floating-point"),
        "numpy array": (lambda: model(good.numpy()), "floating-point torch.Tensor"),
        "one channel": (lambda: model(good[:, :1]), "shape (B, 3, H, W)"),
        "no batch axis": (lambda: model(good[0]), "shape (B, 3, H, W)"),
        "float labels": (lambda: model(good, labels=torch.tensor([0.0, 1.0])), "integer class indices"),
        "label out of range": (lambda: model(good, labels=torch.tensor([0, 3])), "must be in [0, 3)"),
        "feature_t 0": (lambda: model(good, feature_t=0.0), "feature_t"),
        "num_steps 0": (lambda: model(good, num_steps=0), "num_steps"),
    }
    for case, (call, words) in cases.items():
        ok, detail = raises(call, ValueError, words)
        tally.record(case, ok, detail)
    with torch.no_grad():
        logits = model(good).logits
    tally.record("valid batch", bool(torch.isfinite(logits).all()) and logits.shape == (2, 3), str(logits.shape))


def shapes_dataset(folder: Path) -> Path:
    """64 train and 16 test random 16×16 images in 3 classes, as parquet files with an Image feature."""
    rng = np.random.default_rng(0)
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"])})
    folder.mkdir(parents=True)
    for split, count in (("train", 64), ("test", 16)):
        images = [Image.fromarray(rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8))
                  for _ in range(count)]
        table = datasets.Dataset.from_dict({"img": images, "label": [i % 3 for i in range(count)]}, features=features)
        table.to_parquet(str(folder / f"{split}-00000-of-00001.parquet"))
    return folder


def run(command: list, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([str(part) for part in command], check=False, capture_output=True, text=True,
                          timeout=timeout, env=env)


def script(name: str, args: list, num_processes: int = 1) -> list:
    """The command line of examples/<name>: the script itself, or `accelerate launch` of it on CPU processes."""
    if num_processes == 1:
        return [sys.executable, REPO / "examples" / name, *args]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", num_processes,
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
            random.randint(20000, 40000), REPO / "examples" / name, *args]


def all_finite(path: Path) -> bool:
    return all(bool(torch.isfinite(tensor).all()) for tensor in load_file(path).values())


def poisoned_copy(source: Path, target: Path) -> Path:
    """A copy of a saved model folder with one NaN in the velocity network's first convolution."""
    target.mkdir(parents=True)
    for file in source.iterdir():
        if file.is_file():
            target.joinpath(file.name).write_bytes(file.read_bytes())
    weights = load_file(target / "model.safetensors")
    key = next(name for name in weights if name.endswith("conv_in.weight"))
    weights[key] = weights[key].clone()
    weights[key].view(-1)[0] = float("nan")
    save_file(weights, target / "model.safetensors", metadata={"format": "pt"})
    return target


@contextmanager
def hub(root: Path):
    """A hub server on a free port whose token `TOKEN` is an admin; yields the environment that reaches it."""
    token_file = root / "tokens.txt"
    token_file.write_text(f"{TOKEN} reliability admin\n")
    server = serve_hub(root / "hub", "127.0.0.1", 0, token_file=token_file)
    try:
        yield {"HF_ENDPOINT": server.url, "HF_TOKEN": TOKEN, "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0",
               "HF_HOME": str(root / "hf-home")}
    finally:
        server.shutdown()


def repo_exists(env: dict, repo_id: str) -> bool:
    probe = ("import sys; from huggingface_hub import HfApi; "
             "sys.exit(0 if HfApi().repo_exists(sys.argv[1]) else 3)")
    return run([sys.executable, "-c", probe, repo_id], env).returncode == 0


def check_nan_paths(tally: Tally, work: Path, data: Path, quick: bool) -> None:
    classifier = work / "classifier"
    PRGForImageClassification(PRGConfig(image_size=IMAGE_SIZE, num_steps=2, num_labels=3)).save_pretrained(classifier)
    default_image_processor(IMAGE_SIZE).save_pretrained(classifier)
    poisoned = poisoned_copy(classifier, work / "poisoned")
    image = work / "x.png"
    Image.fromarray(np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)).save(image)

    model = PRGForImageClassification.from_pretrained(poisoned)
    ok, detail = raises(lambda: model.save_pretrained(work / "saved"), NonFiniteError, "NaN or Inf")
    tally.record("save_pretrained of NaN weights", ok and not (work / "saved").exists(), detail)
    ok, detail = raises(lambda: model.eval()(torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE)), NonFiniteError, "non-finite")
    tally.record("forward of NaN weights in eval mode", ok, detail)

    result = run([sys.executable, "-m", "prg_hub.cli", "classify", image, "--model", poisoned])
    tally.record("prg-hub classify with NaN weights", result.returncode == 1 and "nan" not in result.stdout.lower()
                 and "non-finite" in result.stderr and "Traceback" not in result.stderr, result.stderr[-200:])
    pipeline_probe = ("import sys, prg_hub; from transformers import pipeline; from prg_hub.finiteness import "
                      "NonFiniteError\ntry:\n    pipeline(sys.argv[1], model=sys.argv[2])(sys.argv[3])\n"
                      "except NonFiniteError:\n    sys.exit(0)\nsys.exit(3)")
    for task in ("image-classification", "image-feature-extraction"):
        result = run([sys.executable, "-c", pipeline_probe, task, poisoned, image])
        tally.record(f"{task} pipeline with NaN weights", result.returncode == 0, result.stderr[-200:])

    with hub(work) as env:
        result = run([sys.executable, "-m", "prg_hub.cli", "push", poisoned, "nan/folder"], env)
        tally.record("prg-hub push of NaN weights", result.returncode == 1 and "NaN or Inf" in result.stderr
                     and not repo_exists(env, "nan/folder"), result.stderr[-200:])
        push_probe = ("import sys; from prg_hub import PRGForImageClassification\n"
                      "PRGForImageClassification.from_pretrained(sys.argv[1]).push_to_hub('nan/in-memory')")
        result = run([sys.executable, "-c", push_probe, poisoned], env)
        tally.record("push_to_hub of NaN weights", result.returncode != 0 and "NonFiniteError" in result.stderr
                     and not repo_exists(env, "nan/in-memory"), result.stderr[-200:])

    if quick:  # the training scripts' NaN paths are in tests/test_nonfinite.py
        return
    output = work / "diverged-pretrain"
    result = run(script("pretrain.py", ["--dataset", data, "--output_dir", output, *PRETRAIN_ARGS,
                                        "--max_train_steps", 6, "--checkpointing_steps", 1,
                                        "--learning_rate", 1e20, "--max_grad_norm", 0]))
    checkpoints_finite = all(all_finite(c / "model.safetensors") for c in list_checkpoints(output))
    tally.record("pretraining with --learning_rate 1e20", result.returncode == 1 and "the training loss is" in
                 result.stderr and not (output / "model.safetensors").exists() and checkpoints_finite,
                 result.stderr[-200:])

    flow = work / "flow"
    PRGModel(PRGConfig(image_size=IMAGE_SIZE, num_steps=2)).save_pretrained(flow)
    poisoned_flow = poisoned_copy(flow, work / "poisoned-flow")
    output = work / "finetune-from-nan"
    result = run(script("finetune.py", ["--model_name_or_path", poisoned_flow, "--dataset", data,
                                        "--output_dir", output, "--max_train_steps", 2, "--num_steps", 2]))
    tally.record("finetuning from a flow with one NaN weight", result.returncode == 1 and "NaN or Inf" in
                 result.stderr and not (output / "model.safetensors").exists(), result.stderr[-200:])
    output = work / "diverged-finetune"
    result = run(script("finetune.py", ["--model_name_or_path", flow, "--dataset", data, "--output_dir", output,
                                        "--max_train_steps", 6, "--num_steps", 2, "--learning_rate", 1e20,
                                        "--checkpointing_steps", 1, "--num_warmup_steps", 0], num_processes=2),
                 env={"ACCELERATE_USE_CPU": "1"})
    saved = [output / "model.safetensors", output / "best" / "model.safetensors",
             *(c / "model.safetensors" for c in list_checkpoints(output))]
    stopped = re.search(r"^finetune\.py: Step \d+: ", result.stderr, re.MULTILINE) is not None
    tally.record("2-process finetuning with --learning_rate 1e20", result.returncode != 0 and stopped
                 and not saved[0].exists() and all(all_finite(p) for p in saved if p.exists()),
                 result.stderr[-200:])


def check_resume_kills(tally: Tally, work: Path, data: Path, quick: bool) -> None:
    """SIGKILL a pretraining run (checkpointing every step, keeping 1) again and again, resuming each time, then
    compare with an uninterrupted run. Every other kill lands while a checkpoint is being written; the others at a
    random moment up to 0.3 s after this launch's first new checkpoint. A kill is answered correctly when the next
    launch resumes from the newest complete checkpoint left (so never from step 0 once one exists); the final
    weights must equal the uninterrupted run's."""
    steps, kills = (12, 2) if quick else (60, 10)
    common = ["--dataset", data, *PRETRAIN_ARGS, "--max_train_steps", steps, "--checkpointing_steps", 1,
              "--checkpoints_total_limit", 1]
    straight = work / "straight"
    run(script("pretrain.py", [*common, "--output_dir", straight]))
    killed = work / "killed"
    rng = random.Random(0)
    for kill in range(kills + 1):
        before = list_checkpoints(killed)
        process = subprocess.Popen([str(p) for p in script("pretrain.py", [*common, "--output_dir", killed,
                                                                           "--resume_from_checkpoint", "latest"])],
                                   env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if kill < kills:
            kill_during_this_launch(process, killed, before, mid_checkpoint=kill % 2 == 1, delay=rng.uniform(0, 0.3))
        _, stderr = process.communicate(timeout=600)
        resumed = [line for line in stderr.splitlines() if "Resumed from" in line]
        ok = f"Resumed from {before[-1]}" in "".join(resumed) if before else not resumed
        if process.returncode == 0:
            tally.record(f"launch {kill + 1}: resumed and finished", ok, f"before {before}, log {resumed}")
            break
        tally.record(f"launch {kill + 1}: resumed, then killed{' mid-checkpoint' if kill % 2 else ''}",
                     ok and bool(list_checkpoints(killed)), f"before {before}, log {resumed}")
    straight_weights = load_file(straight / "model.safetensors")
    same = (killed / "model.safetensors").exists() and max(
        (straight_weights[key] - value).abs().max().item()
        for key, value in load_file(killed / "model.safetensors").items()
    ) <= 1e-6
    tally.record("weights after the kills equal an uninterrupted run's", same, "")


def kill_during_this_launch(process: subprocess.Popen, output_dir: Path, before: list[Path], mid_checkpoint: bool,
                            delay: float) -> None:
    """SIGKILL `process` once it has made progress: while it writes a checkpoint (with `mid_checkpoint`), or
    `delay` seconds after its first complete checkpoint newer than `before`."""
    newest = before[-1].name if before else None
    folder = output_dir / "checkpoints"
    launched = time.time()
    while process.poll() is None:
        if mid_checkpoint:
            if any(partial.stat().st_mtime > launched for partial in folder.glob("*.partial")):
                process.kill()  # a partial of an earlier, killed launch does not count
                return
        elif list_checkpoints(output_dir) and list_checkpoints(output_dir)[-1].name != newest:
            time.sleep(delay)
            process.kill()
            return
        time.sleep(0.002)


def training_checks(quick: bool) -> dict[str, dict]:
    tallies = {name: Tally() for name in ("tensors", "NaN paths", "resume kills")}
    check_tensors(tallies["tensors"])
    with tempfile.TemporaryDirectory(prefix="prg-reliability-") as folder:
        work = Path(folder)
        data = shapes_dataset(work / "data")
        check_nan_paths(tallies["NaN paths"], work, data, quick)
        check_resume_kills(tallies["resume kills"], work, data, quick)
    return {name: tally.as_dict() for name, tally in tallies.items()}
