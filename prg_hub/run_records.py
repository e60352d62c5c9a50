"""A training run's output folder: what the training scripts leave in their `output_dir`, and its push.

`examples/pretrain.py` and `examples/finetune.py` leave, in `output_dir`:
* the model, saved by `save_model`: `config.json` (its `architectures` names the class: `PRGModel`,
  `PRGForImageClassification` or `PRGForFlowMatching`), `model.safetensors` (or `model.safetensors.index.json`
  and its shards), the remote code (`prg_hub.remote_code`), and `preprocessor_config.json`, the image processor
  that `pipeline(...)` loads beside it;
* `args.json` (`RUN_ARGS_FILE`): the run's arguments, one entry each (`dataset` names the training data,
  `model_name_or_path` the checkpoint it started from, `from_scratch` whether it did not);
* `metrics.json` (`RUN_METRICS_FILE`): what the run measured, one top-level entry each. The entries named in
  `prg_hub.model_card.EVALUATION_METRICS` (`final_top1`, the top-1 accuracy of the saved weights as a fraction in
  [0, 1], on the split named by `eval_split`) score the final weights; the other numbers (`steps`,
  `final_fm_loss`, `best_top1`, `train_seconds`, ...) describe the training; lists and strings (`history`,
  `processes`, hashes) are records of the run that cards do not show.
Both JSON files are written by `write_json`. Anything else in the folder (`checkpoint-<step>/`, sample grids,
`best/`) belongs to the run and is not pushed. `describe_machine` names the hardware a measurement ran on, for
the result files of scripts that measure (`examples/evaluate.py`, the benchmarks).

    args, metrics = read_training_output("runs/finetune-c10")
    push_training_output("runs/finetune-c10", "org/name")  # the saved model as stored; card from the records
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
from pathlib import Path

import torch
from huggingface_hub import CommitInfo, HfApi
from torch import nn

from .finiteness import check_finite_weights
from .hub_upload import create_repo_and_branch, upload_model_folder
from .image_processing_prg import default_image_processor
from .loading import load_prg_model, saved_weight_files
from .model_card import DEFAULT_LICENSE, render_model_card
from .remote_code import write_remote_code

RUN_ARGS_FILE = "args.json"
RUN_METRICS_FILE = "metrics.json"


def save_model(model: nn.Module, output_dir: str | Path) -> None:
    """`save_pretrained` (safetensors) plus the image processor that `pipeline(...)` loads beside it
    (`default_image_processor`; either backend saves the same `preprocessor_config.json`)."""
    model.save_pretrained(output_dir, safe_serialization=True)
    default_image_processor(model.config.image_size).save_pretrained(output_dir)


def describe_machine(device: torch.device | None = None) -> str:
    """What a run was measured on: "NVIDIA H200, torch 2.11" or "2-core x86_64 CPU, torch 2.13.0+cpu".

    `device` defaults to the first GPU when torch sees one, the CPU otherwise.
    """
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return f"{os.cpu_count()}-core {platform.machine()} CPU, torch {torch.__version__}"


def write_json(path: str | Path, data: dict) -> None:
    """Write `data` as indented JSON with sorted keys (values JSON cannot hold as their `str`), creating the
    folder if needed."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")


def read_training_output(output_dir: str | Path) -> tuple[dict, dict]:
    """The run records in `output_dir`: (`args.json`, `metrics.json`) as dicts, each `{}` when the file is absent."""
    records = []
    for name in (RUN_ARGS_FILE, RUN_METRICS_FILE):
        path = Path(output_dir) / name
        records.append(json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {})
    return records[0], records[1]


def push_training_output(
    output_dir: str | Path,
    repo_id: str,
    *,
    commit_message: str | None = None,
    private: bool | None = None,
    token: bool | str | None = None,
    revision: str | None = None,
    license: str = DEFAULT_LICENSE,  # noqa: A002 - the model-card field's name
) -> CommitInfo:
    """Push the model saved in `output_dir` as it is stored, with its own card or one made from the run's records.

    The weights are uploaded byte for byte (a checkpoint stored in float16 stays float16), after the model was
    loaded once to check them; `config.json` and `preprocessor_config.json` as stored, plus the remote-code
    entries and files of `prg_hub.remote_code.write_remote_code` when they lack them. Nothing else of the folder
    (checkpoints, samples, `best/`) is uploaded.

    Expected in `output_dir` (the format of the module docstring):
        - the model, saved with `save_pretrained` (config.json + model.safetensors or shards);
        - `preprocessor_config.json` (optional; `default_image_processor` for the model's image size otherwise);
        - `README.md` (optional): a model card the checkpoint already carries (such as `prg_hub.DEFAULT_MODEL`'s);
          it is uploaded as it is, and the run records below are then not read;
        - `args.json` (optional): the run's arguments, shown as the card's hyper-parameter table. `dataset` names
          the training data; `model_name_or_path` the checkpoint it was finetuned from (unless `from_scratch`
          is true), which becomes `base_model` when it is a Hub id;
        - `metrics.json` (optional): the run's measured numbers. The `EVALUATION_METRICS` entries (`final_top1`)
          become the model-index, on the split named by its `eval_split` entry when there is one; every other
          numeric top-level entry (`steps`, `final_fm_loss`, `best_top1`, ...) is listed as a training result.
    A folder with no card and neither JSON file is pushed with a card that says "not evaluated".
    """
    source = Path(output_dir)
    model = load_prg_model(str(source))
    check_finite_weights(model, f"The model saved in {str(source)!r}")  # before the repo is created
    api = HfApi(token=token)
    repo_id = create_repo_and_branch(api, repo_id, private, revision)
    with tempfile.TemporaryDirectory(prefix="prg-push-") as folder:
        staged = Path(folder)
        for file in [source / "config.json", *saved_weight_files(source)]:
            shutil.copyfile(file, staged / file.name)
        if (source / "preprocessor_config.json").is_file():
            shutil.copyfile(source / "preprocessor_config.json", staged / "preprocessor_config.json")
        else:
            default_image_processor(model.config.image_size).save_pretrained(staged)
        write_remote_code(staged)
        if (source / "README.md").is_file():
            shutil.copyfile(source / "README.md", staged / "README.md")
        else:
            args, metrics = read_training_output(source)
            render_model_card(
                model,
                repo_id,
                dataset=args.get("dataset"),
                base_model=None if args.get("from_scratch") else args.get("model_name_or_path"),
                hyperparameters=args,
                metrics=metrics,
                eval_split=metrics.get("eval_split"),
                license=license,
            ).save(staged / "README.md")
        return upload_model_folder(api, staged, repo_id, commit_message or f"Upload {type(model).__name__}")
