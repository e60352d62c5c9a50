"""NaN and Inf are never trained on, saved, pushed or printed as results, and out-of-range inputs are refused."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from huggingface_hub import HfApi
from huggingface_hub.errors import RepositoryNotFoundError
from PIL import Image
from safetensors.torch import load_file, save_file
from test_training import (
    PRETRAIN_ARGS,
    REPO,
    communicate,
    finish,
    launch,
    read_json,
    start,
    summary_line,
    write_shapes,
)
from torch import nn
from transformers import pipeline

from prg_hub import PRGConfig, PRGForImageClassification, PRGImageProcessor, PRGModel
from prg_hub.checkpointing import checkpoint_step, list_checkpoints
from prg_hub.cli import main
from prg_hub.finiteness import NonFiniteError, NonFiniteLossGuard, SkippedSteps, check_finite_weights
from prg_hub.hub_upload import push_model_to_hub

IMAGE_SIZE = 16
POISONED = "prg.velocity.network.conv_in.weight"  # the tensor given one NaN


def tiny_classifier(seed: int = 0) -> PRGForImageClassification:
    torch.manual_seed(seed)
    return PRGForImageClassification(PRGConfig(image_size=IMAGE_SIZE, num_steps=2, num_labels=3))


def poison_saved_weights(folder: Path, key: str = POISONED) -> None:
    """Write one NaN into a saved model's safetensors file, as a diverged run or a bad disk would."""
    weights = load_file(folder / "model.safetensors")
    weights[key] = weights[key].clone()
    weights[key].view(-1)[0] = float("nan")
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.fixture(scope="module")
def poisoned_classifier(tmp_path_factory) -> Path:
    """A saved 16×16 classifier (with its processor) whose weights hold one NaN."""
    folder = tmp_path_factory.mktemp("poisoned")
    tiny_classifier().save_pretrained(folder)
    PRGImageProcessor.for_image_size(IMAGE_SIZE).save_pretrained(folder)
    poison_saved_weights(folder)
    return folder


@pytest.fixture(scope="module")
def image_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("image") / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(path)
    return path


# ------------------------------------------------------------------------------------------- saving, pushing


def test_save_pretrained_refuses_non_finite_weights_and_writes_nothing(tmp_path):
    model = tiny_classifier()
    with torch.no_grad():
        model.head.classifier.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match=r"1 of [\d,]+ weight values are NaN or Inf \(in 1 tensors: "
                                             r"head\.classifier\.weight\)"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_push_refuses_non_finite_weights_before_creating_the_repo(hub_server, poisoned_classifier, capsys):
    model = PRGForImageClassification.from_pretrained(poisoned_classifier)
    with pytest.raises(NonFiniteError, match="NaN or Inf"):
        push_model_to_hub(model, "nan-org/in-memory")
    assert main(["push", str(poisoned_classifier), "nan-org/from-folder"]) == 1
    error = capsys.readouterr().err
    assert "1 of" in error and POISONED in error and "Traceback" not in error
    for repo_id in ("nan-org/in-memory", "nan-org/from-folder"):
        with pytest.raises(RepositoryNotFoundError):
            HfApi().model_info(repo_id)


# ---------------------------------------------------------------------------------------------- inference


def test_inference_refuses_non_finite_outputs(poisoned_classifier, image_file, capsys):
    model = PRGForImageClassification.from_pretrained(poisoned_classifier).eval()
    pixel_values = torch.zeros(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    with pytest.raises(NonFiniteError, match=r"non-finite features .* for 2 of 2 images"):
        model(pixel_values)
    with pytest.raises(NonFiniteError, match="non-finite features"):
        pipeline("image-classification", model=str(poisoned_classifier))(str(image_file))
    assert main(["classify", str(image_file), "--model", str(poisoned_classifier)]) == 1
    captured = capsys.readouterr()
    assert "nan" not in captured.out.lower() and "non-finite" in captured.err and "Traceback" not in captured.err
    model.train()  # training forward passes return the values: the loss guard of the scripts decides
    assert torch.isnan(model(pixel_values).logits).all()


def test_a_model_in_eval_mode_refuses_non_finite_logits_of_some_images():
    model = tiny_classifier().eval()
    with torch.no_grad():
        model.head.classifier.bias[1] = float("nan")
    with pytest.raises(NonFiniteError, match=r"non-finite logits .* for 3 of 3 images \(batch rows \[0, 1, 2\]\)"):
        model(torch.zeros(3, 3, IMAGE_SIZE, IMAGE_SIZE))


@pytest.mark.parametrize("scale, message", [(255.0, r"reach \|x\| = 255"), (1e4, r"reach \|x\| = 10000")])
def test_pixel_values_far_outside_the_processor_range_are_refused(scale, message):
    model = PRGModel(PRGConfig(image_size=IMAGE_SIZE, num_steps=2))
    pixel_values = torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE) * scale
    pixel_values[0, 0, 0, 0] = scale
    with pytest.raises(ValueError, match=message + ".*Use PRGImageProcessor"):
        model(pixel_values)
    with pytest.raises(ValueError, match=message):
        model.flow_matching_loss(pixel_values)
    model(pixel_values / scale * 2 - 1)  # the same images in [-1, 1] are accepted


# ------------------------------------------------------------------------------------------------ training


def test_loss_guard_skips_at_most_n_steps_then_stops_naming_the_step():
    parameter = torch.zeros(1, requires_grad=True)
    guard = NonFiniteLossGuard(Accelerator(cpu=True), torch.optim.SGD([parameter]), max_skipped=1)
    assert not guard.skips_on_device  # not a fused Adam: the host decides, step by step
    guard.observe(torch.tensor(0.5))
    assert guard.should_step(1)
    guard.observe(torch.tensor(float("nan")))
    guard.observe(torch.tensor(0.5))  # one bad micro-batch spoils the whole accumulated step
    assert not guard.should_step(2) and guard.skipped_steps() == SkippedSteps(1, 2, 2)
    guard.observe(torch.tensor(0.7))
    assert guard.should_step(3)
    guard.observe(torch.tensor(float("inf")))
    with pytest.raises(NonFiniteError, match=r"Step 4: the training loss is inf .* 2 optimizer steps had a "
                                             r"non-finite loss by step 4, the first at step 2.*\(1 non-finite steps "
                                             r"were skipped first"):
        guard.should_step(4)


X = torch.randn(5, 8, 3, generator=torch.Generator().manual_seed(0))  # the inputs of 5 optimizer steps
Y = torch.randn(8, 2, generator=torch.Generator().manual_seed(1))


def snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The parameters and every tensor of the optimizer state (step, exp_avg, exp_avg_sq), copied."""
    state = [optimizer.state[p][key].clone() for p in model.parameters() for key in sorted(optimizer.state[p])]
    return [p.detach().clone() for p in model.parameters()] + state


def fused_adamw_run(nan_steps=(), guard_steps=True, skip_on_host=False, max_skipped=2):
    """5 steps of a fused AdamW on a linear regression, the loss made NaN at `nan_steps`: a snapshot after each.

    Guarded: steps 1 to 4 go through a `NonFiniteLossGuard`, step 5 is a plain `optimizer.step()`; else a plain
    run, which with `skip_on_host` leaves out `optimizer.step()` at `nan_steps` (the reference for a skipped step).
    Returns (snapshots, guard or None).
    """
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    optimizer = accelerator.prepare(torch.optim.AdamW(model.parameters(), lr=0.1, fused=True))
    guard = NonFiniteLossGuard(accelerator, optimizer, max_skipped) if guard_steps else None
    snapshots = []
    for step in range(1, 6):
        loss = F.mse_loss(model(X[step - 1]), Y)
        if step in nan_steps:
            loss = loss * float("nan")
        loss.backward()
        if guard is not None and step < 5:
            guard.observe(loss)
            assert guard.should_step(step)  # the device decides
        if not (skip_on_host and step in nan_steps):
            optimizer.step()
        optimizer.zero_grad()
        snapshots.append(snapshot(model, optimizer.optimizer))
    return snapshots, guard


def assert_same_tensors(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_a_fused_adamw_skips_a_non_finite_step_on_the_device_and_changes_nothing_else(caplog):
    plain, _ = fused_adamw_run()
    guarded, guard = fused_adamw_run()
    assert guard.skips_on_device and guard.skipped_steps() == SkippedSteps(0, None, None)
    for plain_step, guarded_step in zip(plain, guarded, strict=True):  # found_inf = 0: the same step, bit for bit
        assert_same_tensors(plain_step, guarded_step)

    skipped, guard = fused_adamw_run(nan_steps={2, 4})
    assert_same_tensors(skipped[1], skipped[0])  # step 2 left the parameters, exp_avg, exp_avg_sq and step as they were
    assert_same_tensors(skipped[3], skipped[2])
    assert all(torch.isfinite(tensor).all() for tensor in skipped[-1])
    reference, _ = fused_adamw_run(nan_steps={2, 4}, guard_steps=False, skip_on_host=True)
    for on_device, on_host in zip(skipped, reference, strict=True):
        assert_same_tensors(on_device, on_host)  # the other steps update as if steps 2 and 4 had never been taken
    for step in (3, 5):  # step 5, a plain step after the skipped step 4, finds no found_inf left to skip it
        assert not torch.equal(skipped[step - 1][0], skipped[step - 2][0])
    assert guard.skipped_steps() == SkippedSteps(2, 2, 4)
    with caplog.at_level("WARNING"):
        guard.raise_if_too_many_skipped(5)  # 2 of at most 2: reported, not raised
        guard.raise_if_too_many_skipped(5)  # nothing new: nothing logged again
    assert caplog.text.count("Step 4: non-finite training loss (nan); 2 more optimizer step(s) skipped without an "
                             "update, 2 of at most 2 (the first at step 2)") == 1


def test_the_device_path_reads_nothing_back_until_asked(monkeypatch):
    """No `.item()`, `bool()`, `float()`, `int()` or `.tolist()` of a tensor in observe, should_step and the step:
    on a GPU each would wait for the device."""
    accelerator = Accelerator(cpu=True)
    model = nn.Linear(3, 2)
    optimizer = accelerator.prepare(torch.optim.AdamW(model.parameters(), lr=0.1, fused=True))
    guard = NonFiniteLossGuard(accelerator, optimizer, max_skipped=0)

    def host_read(tensor, *args):
        raise AssertionError("a tensor was read back to the host")

    with monkeypatch.context() as patch:
        for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
            patch.setattr(torch.Tensor, name, host_read)
        for step, scale in enumerate([1.0, float("nan"), 1.0], start=1):
            loss = F.mse_loss(model(X[step]), Y) * scale
            loss.backward()
            guard.observe(loss)
            guard.should_step(step)
            optimizer.step()
            optimizer.zero_grad()
    assert guard.skipped_steps() == SkippedSteps(1, 2, 2) and torch.isfinite(model.weight).all()


@pytest.mark.parametrize("max_skipped, advice", [(0, "or pass --skip_nonfinite_steps N to skip up to N such steps"),
                                                 (1, r"\(1 non-finite steps were skipped first")])
def test_too_many_steps_skipped_on_the_device_raise_naming_the_steps(max_skipped, advice):
    snapshots, guard = fused_adamw_run(nan_steps={2, 4}, max_skipped=max_skipped)
    message = (r"Step 4: the training loss is nan \(not finite\); 2 optimizer steps had a non-finite loss by step 5, "
               r"the first at step 2\..*Lower --learning_rate, set --max_grad_norm.*--resume_from_checkpoint latest.*")
    with pytest.raises(NonFiniteError, match=message + advice):
        guard.raise_if_too_many_skipped(5)
    assert all(torch.isfinite(tensor).all() for tensor in snapshots[-1])  # the skipped updates never happened


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return write_shapes(tmp_path_factory.mktemp("data") / "shapes", num_train=64, num_test=24)


def assert_every_checkpoint_is_finite(output_dir: Path) -> None:
    for checkpoint in list_checkpoints(output_dir):
        weights = load_file(checkpoint / "model.safetensors")
        assert all(torch.isfinite(tensor).all() for tensor in weights.values()), checkpoint


RUNS_A_SCRIPT = pytest.mark.needs_train_extra  # the training scripts need prg_hub[train]
# Skipped on the host (AdamW, the default on the CPU) or on the device (fused AdamW): the same stop.
OPTIMIZERS = pytest.mark.parametrize("optimizer", ["--no-fused_optimizer", "--fused_optimizer"])


@RUNS_A_SCRIPT
@OPTIMIZERS
def test_diverging_pretraining_stops_at_the_first_non_finite_loss(shapes, tmp_path, optimizer):
    output_dir = tmp_path / "run"
    args = ["--dataset", shapes, "--output_dir", output_dir, "--max_train_steps", 8, *PRETRAIN_ARGS, optimizer,
            "--learning_rate", 1e20, "--max_grad_norm", 0, "--checkpointing_steps", 1, "--skip_nonfinite_steps", 1]
    process = start("pretrain.py", args, num_processes=1)
    stdout, stderr = communicate(process)
    assert process.returncode == 1, stderr[-3000:]
    # One line from the script says where and what to do (the launcher then reports the exit status).
    message = re.search(r"^pretrain\.py: Step (\d+): the training loss is (nan|inf).*$", stderr, re.MULTILINE)
    assert message and "NonFiniteError" not in stderr, stderr[-3000:]
    assert "Lower --learning_rate, set --max_grad_norm" in message.group(0)
    assert "1 non-finite steps were skipped first" in message.group(0)
    assert not (output_dir / "model.safetensors").exists() and "pretrain: steps=" not in stdout
    assert_every_checkpoint_is_finite(output_dir)


# A script that runs examples/pretrain.py with the loss of one micro-batch made NaN, on process 0 only.
PRETRAIN_WITH_ONE_NAN_LOSS = """import os
import runpy

from prg_hub import PRGForFlowMatching

forward, calls = PRGForFlowMatching.forward, []


def forward_with_one_nan_loss(self, *args, **kwargs):
    output = forward(self, *args, **kwargs)
    calls.append(None)
    if len(calls) == {micro_batch} and os.environ.get("RANK", "0") == "0":
        output.loss = output.loss * float("nan")
    return output


PRGForFlowMatching.forward = forward_with_one_nan_loss
runpy.run_path({script!r}, run_name="__main__")
"""


@RUNS_A_SCRIPT
def test_fused_pretraining_skips_a_non_finite_step_on_every_process_and_trains_on(shapes, tmp_path):
    """One NaN loss on one of 2 processes: both skip that step on the device (no weight or optimizer state changes),
    report it, and train on to finite weights, the same on both."""
    script = tmp_path / "pretrain_with_one_nan_loss.py"
    script.write_text(PRETRAIN_WITH_ONE_NAN_LOSS.format(micro_batch=3, script=str(REPO / "examples" / "pretrain.py")))
    output_dir = tmp_path / "run"
    args = ["--dataset", shapes, "--output_dir", output_dir, "--max_train_steps", 4, *PRETRAIN_ARGS,
            "--fused_optimizer", "--skip_nonfinite_steps", 1, "--checkpointing_steps", 1, "--record_batches"]
    result = finish(start(script, args))  # 2 micro-batches per step: micro-batch 3 is the first of step 2
    assert summary_line(result, "pretrain")["steps"] == "4"
    reports = re.findall(r"Step 2: non-finite training loss \(nan\); 1 more optimizer step\(s\) skipped without an "
                         r"update, 1 of at most 1 \(the first at step 2\)", result.stderr)
    assert len(reports) == 2, result.stderr[-3000:]  # each process knows
    checkpoints = {checkpoint_step(path): path for path in list_checkpoints(output_dir)}
    assert sorted(checkpoints) == [1, 2, 3, 4]

    def state(step: int) -> list[torch.Tensor]:
        weights = load_file(checkpoints[step] / "model.safetensors")
        optimizer = torch.load(checkpoints[step] / "optimizer.bin", weights_only=True)["state"]
        return [weights[key] for key in sorted(weights)] + [
            tensor for index in sorted(optimizer) for _, tensor in sorted(optimizer[index].items())]

    assert_same_tensors(state(2), state(1))  # step 2: no update, and the optimizer's step count stays at 1
    assert not torch.equal(*(load_file(checkpoints[step] / "model.safetensors")[POISONED] for step in (2, 3)))
    assert_every_checkpoint_is_finite(output_dir)
    check_finite_weights(PRGModel.from_pretrained(output_dir), "the final model")
    processes = read_json(output_dir / "metrics.json")["processes"]
    assert len({record["parameters_sha256"] for record in processes}) == 1 and len(processes) == 2


@RUNS_A_SCRIPT
def test_finetuning_from_a_flow_with_one_nan_weight_is_refused(shapes, tmp_path):
    flow = tmp_path / "flow"
    PRGModel(PRGConfig(image_size=IMAGE_SIZE, num_steps=2)).save_pretrained(flow)
    poison_saved_weights(flow, POISONED.removeprefix("prg."))
    process = start("finetune.py", ["--model_name_or_path", flow, "--dataset", shapes, "--output_dir", tmp_path / "ft",
                                    "--max_train_steps", 2, "--num_steps", 2], num_processes=1)
    _, stderr = communicate(process)
    assert process.returncode == 1
    assert f"finetune.py: The pretrained model '{flow}': 1 of" in stderr and "NonFiniteError" not in stderr
    assert not (tmp_path / "ft" / "model.safetensors").exists() and not (tmp_path / "ft" / "best").exists()


@RUNS_A_SCRIPT
@OPTIMIZERS
def test_diverging_distributed_finetuning_stops_on_every_process_and_keeps_no_nan(shapes, pretrained_flow, tmp_path,
                                                                                  optimizer):
    output_dir = tmp_path / "ft"
    process = start("finetune.py", ["--model_name_or_path", pretrained_flow, "--dataset", shapes,
                                    "--output_dir", output_dir, "--train_batch_size", 8, "--num_steps", 2,
                                    "--max_train_steps", 6, "--learning_rate", 1e20, "--checkpointing_steps", 1,
                                    "--num_warmup_steps", 0, "--augmentation", "none", optimizer])
    stdout, stderr = communicate(process)
    assert process.returncode != 0 and "NonFiniteError" not in stderr
    stops = set(re.findall(r"finetune\.py: Step (\d+): the training loss is (?:nan|inf)", stderr))
    assert len(stops) == 1, stderr[-3000:]  # the processes stopped at the same step
    assert "finetune: best_top1" not in stdout and not (output_dir / "model.safetensors").exists()
    assert_every_checkpoint_is_finite(output_dir)
    best = output_dir / "best" / "model.safetensors"
    assert not best.exists() or all(torch.isfinite(t).all() for t in load_file(best).values())


@pytest.fixture(scope="module")
def pretrained_flow(shapes, tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("flow") / "run"
    launch("pretrain.py", ["--dataset", shapes, "--output_dir", output_dir, "--max_train_steps", 2, *PRETRAIN_ARGS],
           num_processes=1)
    check_finite_weights(PRGModel.from_pretrained(output_dir), "the test flow")
    return output_dir
