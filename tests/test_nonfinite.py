"""NaN and Inf are never trained on, saved, pushed or printed as results, and out-of-range inputs are refused."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from huggingface_hub import HfApi
from huggingface_hub.errors import RepositoryNotFoundError
from PIL import Image
from safetensors.torch import load_file, save_file
from test_training import PRETRAIN_ARGS, communicate, launch, start, write_shapes
from transformers import pipeline

from prg_hub import PRGConfig, PRGForImageClassification, PRGImageProcessor, PRGModel
from prg_hub.checkpointing import list_checkpoints
from prg_hub.cli import main
from prg_hub.finiteness import NonFiniteError, NonFiniteLossGuard, check_finite_weights
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
    guard = NonFiniteLossGuard(Accelerator(cpu=True), max_skipped=1)
    guard.observe(torch.tensor(0.5))
    assert guard.step_is_finite(1)
    guard.observe(torch.tensor(float("nan")))
    guard.observe(torch.tensor(0.5))  # one bad micro-batch spoils the whole accumulated step
    assert not guard.step_is_finite(2) and guard.skipped_steps == [2]
    guard.observe(torch.tensor(0.7))
    assert guard.step_is_finite(3)
    guard.observe(torch.tensor(float("inf")))
    with pytest.raises(NonFiniteError, match=r"Step 4: the training loss is inf .* skipped first, at steps \[2\]"):
        guard.step_is_finite(4)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return write_shapes(tmp_path_factory.mktemp("data") / "shapes", num_train=64, num_test=24)


def assert_every_checkpoint_is_finite(output_dir: Path) -> None:
    for checkpoint in list_checkpoints(output_dir):
        weights = load_file(checkpoint / "model.safetensors")
        assert all(torch.isfinite(tensor).all() for tensor in weights.values()), checkpoint


def test_diverging_pretraining_stops_at_the_first_non_finite_loss(shapes, tmp_path):
    output_dir = tmp_path / "run"
    args = ["--dataset", shapes, "--output_dir", output_dir, "--max_train_steps", 8, *PRETRAIN_ARGS,
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


def test_diverging_distributed_finetuning_stops_on_every_process_and_keeps_no_nan(shapes, pretrained_flow, tmp_path):
    output_dir = tmp_path / "ft"
    process = start("finetune.py", ["--model_name_or_path", pretrained_flow, "--dataset", shapes,
                                    "--output_dir", output_dir, "--train_batch_size", 8, "--num_steps", 2,
                                    "--max_train_steps", 6, "--learning_rate", 1e20, "--checkpointing_steps", 1,
                                    "--num_warmup_steps", 0, "--augmentation", "none"])
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
