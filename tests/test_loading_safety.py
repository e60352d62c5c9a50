"""Resuming and loading are safe: checkpoints rotate only after the new one is complete, nothing in a checkpoint is
an executable pickle, broken checkpoints and outputs get one-line errors, and cards name no local paths."""

import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.utils.other import load as load_without_code
from huggingface_hub import HfApi
from PIL import Image
from safetensors.torch import load_file
from test_training import (
    PRETRAIN_ARGS,
    communicate,
    launch,
    max_abs_difference,
    start,
    write_shapes,
)

from prg_hub import PRGConfig, PRGForImageClassification, PRGImageProcessor, PRGModel
from prg_hub.checkpointing import (
    EMA_STATE_FILE,
    checkpoint_path,
    list_checkpoints,
    resolve_checkpoint,
    save_checkpoint,
)
from prg_hub.cli import main
from prg_hub.model_card import render_model_card

REPO = Path(__file__).resolve().parents[1]


class CodeThatRuns:
    """A pickle payload: unpickling it creates `marker` (what a planted checkpoint file would do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return write_shapes(tmp_path_factory.mktemp("data") / "shapes", num_train=64, num_test=24)


# ------------------------------------------------------------------------------------------- checkpoint rotation


def test_the_old_checkpoint_is_deleted_only_after_the_new_one_is_complete(tmp_path, monkeypatch):
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(torch.nn.Linear(2, 2))
    save_checkpoint(accelerator, model, tmp_path, 1, total_limit=1)

    def killed_while_saving(output_dir):
        Path(output_dir, "model.safetensors").parent.mkdir(parents=True, exist_ok=True)
        raise KeyboardInterrupt  # the process dies half-way through writing the new checkpoint

    monkeypatch.setattr(accelerator, "save_state", killed_while_saving)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(accelerator, model, tmp_path, 2, total_limit=1)
    assert resolve_checkpoint(tmp_path, "latest") == checkpoint_path(tmp_path, 1)
    assert (checkpoint_path(tmp_path, 1) / "model.safetensors").is_file()

    monkeypatch.undo()
    save_checkpoint(accelerator, model, tmp_path, 2, total_limit=1)  # a complete save rotates
    assert list_checkpoints(tmp_path) == [checkpoint_path(tmp_path, 2)]


@pytest.mark.needs_train_extra
def test_a_run_killed_while_checkpointing_resumes_from_the_last_complete_checkpoint(shapes, tmp_path):
    """SIGKILL the moment a new checkpoint is being written (with a limit of 1): the run resumes from the previous
    one, not from step 0, and ends with the weights of an uninterrupted run."""
    common = ["--dataset", shapes, *PRETRAIN_ARGS, "--max_train_steps", 6, "--checkpointing_steps", 1,
              "--checkpoints_total_limit", 1, "--sample_every_steps", 100]
    killed_dir = tmp_path / "killed"
    # The script itself, not a launcher: SIGKILL must reach the process that writes the checkpoint.
    process = subprocess.Popen(
        [sys.executable, str(REPO / "examples" / "pretrain.py"), *map(str, common), "--output_dir", str(killed_dir)],
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    checkpoints = killed_dir / "checkpoints"
    while process.poll() is None:
        partial = [p for p in checkpoints.glob("checkpoint-*.partial")] if checkpoints.is_dir() else []
        if partial and partial[0].name != "checkpoint-1.partial":
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.002)
    process.wait()
    assert process.returncode != 0, "the run finished before it could be killed mid-checkpoint"
    survivors = list_checkpoints(killed_dir)
    assert survivors, "no complete checkpoint survived the kill"

    result = launch("pretrain.py", [*common, "--output_dir", killed_dir, "--resume_from_checkpoint", "latest"],
                    num_processes=1)
    assert f"Resumed from {survivors[-1]}" in result.stderr
    straight_dir = tmp_path / "straight"
    launch("pretrain.py", [*common, "--output_dir", straight_dir], num_processes=1)
    assert max_abs_difference(straight_dir / "model.safetensors", killed_dir / "model.safetensors") <= 1e-6


# -------------------------------------------------------------------------------------------------- no pickles


@pytest.fixture(scope="module")
def ema_run(shapes, tmp_path_factory) -> Path:
    """A 1-process pretraining run with EMA, checkpointed at step 1 of 2."""
    output_dir = tmp_path_factory.mktemp("ema") / "run"
    launch("pretrain.py", ["--dataset", shapes, "--output_dir", output_dir, *PRETRAIN_ARGS, "--max_train_steps", 2,
                           "--checkpointing_steps", 1], num_processes=1)
    return output_dir
@pytest.mark.needs_train_extra  # ema_run trains with the scripts
def test_checkpoints_hold_no_pickle_that_needs_weights_only_false(ema_run):
    checkpoint = checkpoint_path(ema_run, 1)
    names = sorted(path.name for path in checkpoint.iterdir())
    assert EMA_STATE_FILE in names and not [name for name in names if name.startswith("custom_checkpoint")], names
    for path in checkpoint.iterdir():
        if path.suffix in (".bin", ".pkl"):
            # How accelerate's load_state reads them: weights_only=True (plus numpy arrays for the RNG states),
            # which raises for anything but tensors and plain data.
            load_without_code(path)
    ema = load_file(checkpoint / EMA_STATE_FILE)
    assert len(ema) == len(list(PRGModel.from_pretrained(ema_run).parameters()))


@pytest.mark.needs_train_extra  # ema_run trains with the scripts
@pytest.mark.parametrize("planted", ["custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin"])
def test_a_planted_pickle_in_a_checkpoint_never_runs(ema_run, shapes, planted, tmp_path):
    """A pickle that runs code when loaded, planted as the old EMA state file or in place of accelerate's files."""
    output_dir = tmp_path / "run"
    shutil.copytree(checkpoint_path(ema_run, 1), checkpoint_path(output_dir, 1))
    marker = tmp_path / "code-ran"
    with open(checkpoint_path(output_dir, 1) / planted, "wb") as file:
        pickle.dump(CodeThatRuns(marker), file)
    process = start("pretrain.py", ["--dataset", shapes, "--output_dir", output_dir, *PRETRAIN_ARGS,
                                    "--max_train_steps", 2, "--checkpointing_steps", 1,
                                    "--resume_from_checkpoint", "latest"], num_processes=1)
    communicate(process)
    assert not marker.exists()  # accelerate refuses the file (weights_only=True) or the folder; nothing runs


# ----------------------------------------------------------------------------------------- broken checkpoints


@pytest.fixture(scope="module")
def saved_classifier(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("classifier")
    torch.manual_seed(0)
    PRGForImageClassification(PRGConfig(image_size=16, num_steps=2, num_labels=3)).save_pretrained(folder)
    PRGImageProcessor.for_image_size(16).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def image_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("image") / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(path)
    return path


def broken_copy(source: Path, folder: Path, breakage: str) -> Path:
    shutil.copytree(source, folder)
    if breakage == "truncated weights":
        data = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif breakage == "corrupt preprocessor_config.json":
        (folder / "preprocessor_config.json").write_text('{"size": {"height": 16,')
    return folder


@pytest.mark.parametrize("breakage, message", [
    ("truncated weights", "a weight file is truncated or corrupt"),
    ("corrupt preprocessor_config.json", "preprocessor_config.json' is not a valid JSON file"),
])
def test_a_broken_checkpoint_is_one_error_line(saved_classifier, image_file, tmp_path, capsys, breakage, message):
    folder = broken_copy(saved_classifier, tmp_path / "model", breakage)
    for command in (["classify", str(image_file)], ["extract", str(image_file), "--output", str(tmp_path / "f.npy")]):
        assert main([*command, "--model", str(folder)]) == 1
        error = capsys.readouterr().err
        assert error.startswith(f"prg-hub: cannot load model '{folder}': ") and message in error, error
        assert "Traceback" not in error
    assert not (tmp_path / "f.npy").exists()


@pytest.mark.parametrize("planted", [False, True], ids=["tensors", "code"])
def test_a_hub_repo_with_only_a_pickled_checkpoint(hub_server, saved_classifier, image_file, tmp_path, capsys, planted):
    """pytorch_model.bin and no safetensors: tensors load (weights_only=True); a pickle that would run code is refused
    with one line, and its code never runs."""
    api = HfApi()
    repo_id = api.create_repo(f"safety-org/pickle-only-{planted}".lower(), exist_ok=True).repo_id
    marker = tmp_path / "code-ran"
    weights = load_file(saved_classifier / "model.safetensors")
    with (tmp_path / "pytorch_model.bin").open("wb") as file:
        torch.save({**weights, "payload": CodeThatRuns(marker)} if planted else weights, file)
    api.upload_file(path_or_fileobj=str(saved_classifier / "config.json"), path_in_repo="config.json", repo_id=repo_id)
    api.upload_file(path_or_fileobj=str(tmp_path / "pytorch_model.bin"), path_in_repo="pytorch_model.bin",
                    repo_id=repo_id)
    status = main(["classify", str(image_file), "--model", repo_id])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and not marker.exists()
    if planted:
        assert status == 1 and captured.out == ""
        assert captured.err.startswith(f"prg-hub: cannot load model '{repo_id}': its pickled weights"), captured.err
    else:
        assert status == 0 and main(["classify", str(image_file), "--model", str(saved_classifier)]) == 0
        assert capsys.readouterr().out.split(": ", 1)[1] == captured.out.split(": ", 1)[1]


@pytest.mark.parametrize("output", ["/proc/no-such-dir/features.npy", "DIRECTORY.npy"])
def test_an_unwritable_output_fails_before_any_model_or_image_is_read(tmp_path, capsys, output):
    if output == "DIRECTORY.npy":
        output = tmp_path / "DIRECTORY.npy"
        output.mkdir()
    started = time.perf_counter()
    status = main(["extract", str(tmp_path / "missing.png"), "--output", str(output),
                   "--model", str(tmp_path / "no-model-either")])
    error = capsys.readouterr().err
    assert status == 1 and error.startswith(f"prg-hub: cannot write '{output}': "), error
    assert "no-model-either" not in error and "missing.png" not in error  # checked first
    assert time.perf_counter() - started < 5


# ----------------------------------------------------------------------------------------------------- cards


def test_a_card_never_shows_a_local_path(tmp_path):
    data = tmp_path / "datasets" / "cifar10-jpeg"
    flow = tmp_path / "runs" / "otcfm-flow"
    data.mkdir(parents=True)
    flow.mkdir(parents=True)
    model = PRGForImageClassification(PRGConfig(image_size=16, num_steps=2, num_labels=3))
    card = render_model_card(
        model, "org/prg-c10", dataset=str(data), base_model=str(flow),
        hyperparameters={"dataset": str(data), "model_name_or_path": str(flow), "cache_dir": str(tmp_path / "c"),
                         "learning_rate": 1e-3},
        metrics={"final_top1": 0.5}, eval_split="test",
    )
    text = str(card)
    assert str(tmp_path) not in text and "/tmp" not in text
    assert "cifar10-jpeg" in text and "otcfm-flow" in text
    assert card.data.datasets is None and card.data.base_model is None  # local: not Hub metadata
    assert card.data.eval_results[0].dataset_name == "cifar10-jpeg"
