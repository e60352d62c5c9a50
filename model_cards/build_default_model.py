"""Build the checkpoint installed with prg_hub (`prg_hub.DEFAULT_MODEL`) from a training run, card included.

    python model_cards/build_default_model.py --run_dir RUN [--spec model_cards/prg-otcfm-cifar10-small.yaml]

RUN holds `flow/` (the output_dir of `examples/pretrain.py`) and `classifier/` (that of `examples/finetune.py`),
each with the run's `args.json` and `metrics.json`. The spec (YAML) names the checkpoint and says what the run's
records do not: the hardware, the exact commands (checked option by option against `args.json`), the evaluation
of the shipped weights (a result file of `examples/evaluate.py`) and the limits in plain words.

Writes `prg_hub/pretrained/<name>/`:
* `model.safetensors`: the classifier's weights in float16 (at most `MAX_WEIGHTS_BYTES`);
* `config.json`: with `dtype` float32, so that `from_pretrained` loads float32 unless asked for another dtype,
  and the remote-code entries (the code itself is the installed package; `prg-hub push` uploads it);
* `preprocessor_config.json`: the run's image processor, with its remote-code entry;
* `README.md`: the card, rendered by `prg_hub.model_card.render_model_card`.
"""

import argparse
import json
import math
import shlex
import shutil
from pathlib import Path

import torch
import yaml

from prg_hub import PRGConfig, PRGForImageClassification, PRGImageProcessor
from prg_hub.model_card import CardDetails, render_model_card
from prg_hub.remote_code import remote_code_files
from prg_hub.run_records import read_training_output

ROOT = Path(__file__).resolve().parents[1]
MAX_WEIGHTS_BYTES = 16_000_000
# Options the scripts renamed since the run: {today's name: the name the run's args.json records}.
RENAMED_OPTIONS = {"probability_path": "path"}


def command_options(command: str) -> dict[str, str | bool]:
    """`--name value` and bare `--flag` options of a shell command, as {name: value or True}."""
    words = shlex.split(command)
    options = {}
    for index, word in enumerate(words):
        if word.startswith("--"):
            following = words[index + 1] if index + 1 < len(words) else None
            options[word[2:]] = True if following is None or following.startswith("--") else following
    return options


def check_command_against_run(command: str, run_args: dict, generic_paths: list[str]) -> None:
    """Raise a ValueError naming each option of `command` whose value differs from the run's `args.json`."""
    mismatches = []
    for name, value in command_options(command).items():
        if name in generic_paths:
            continue
        recorded = run_args.get(name, run_args.get(RENAMED_OPTIONS.get(name), "<not an option of the run>"))
        if isinstance(recorded, bool) or value is True:
            same = recorded is True and value is True
        elif isinstance(recorded, (int, float)):
            same = math.isclose(float(value), recorded)
        else:
            same = value == recorded
        if not same:
            mismatches.append(f"--{name} {value} (the run had {recorded!r})")
    if mismatches:
        raise ValueError(f"The spec's command does not match the run's args.json: {', '.join(mismatches)}.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run_dir", required=True, help="The run: flow/ and classifier/ output folders.")
    parser.add_argument("--spec", default=str(ROOT / "model_cards" / "prg-otcfm-cifar10-small.yaml"))
    args = parser.parse_args()
    spec = yaml.safe_load(Path(args.spec).read_text(encoding="utf-8"))
    run_dir = Path(args.run_dir)

    flow_args, flow_metrics = read_training_output(run_dir / "flow")
    classifier_args, classifier_metrics = read_training_output(run_dir / "classifier")
    commands = spec["training_commands"]
    check_command_against_run(commands["pretrain"], flow_args, spec["generic_paths"])
    check_command_against_run(commands["finetune"], classifier_args, spec["generic_paths"])
    evaluation = json.loads((ROOT / spec["evaluation"]).read_text(encoding="utf-8"))

    output_dir = ROOT / "prg_hub" / "pretrained" / spec["name"]
    shutil.rmtree(output_dir, ignore_errors=True)
    model = PRGForImageClassification.from_pretrained(run_dir / "classifier", dtype=torch.float32)
    model.to(torch.float16).save_pretrained(output_dir)
    config = PRGConfig.from_pretrained(output_dir)
    config.dtype = "float32"  # the weights are stored in float16; models are built in float32
    config.save_pretrained(output_dir)
    PRGImageProcessor.from_pretrained(run_dir / "classifier").save_pretrained(output_dir)
    for code_file in remote_code_files():  # installed with the package; `prg-hub push` uploads them with it
        (output_dir / code_file.name).unlink()
    weights_bytes = (output_dir / "model.safetensors").stat().st_size
    if weights_bytes > MAX_WEIGHTS_BYTES:
        raise ValueError(f"model.safetensors is {weights_bytes:,} bytes, over the {MAX_WEIGHTS_BYTES:,} allowed.")

    # images per epoch, from the pretraining run: steps × batch over epochs (the same data for both stages)
    epoch_images = flow_metrics["steps"] * flow_metrics["global_batch_size"] / flow_metrics["epochs"]
    figures = {
        "top1": evaluation["top1"],
        "run_top1": classifier_metrics["final_top1"],
        "training_minutes": (flow_metrics["train_seconds"] + classifier_metrics["train_seconds"]) / 60,
        "pretrain_epochs": flow_metrics["epochs"],
        "finetune_epochs": classifier_metrics["steps"] * classifier_metrics["global_batch_size"] / epoch_images,
    }
    generic = command_options(commands["finetune"])
    hyperparameters = {key: generic[key] if key in spec["generic_paths"] else value
                       for key, value in classifier_args.items()}
    details = CardDetails(
        hardware=spec["hardware"],
        training_minutes=figures["training_minutes"],
        training_commands=[" ".join(commands[stage].split()) for stage in ("pretrain", "finetune")],
        training_commands_note=spec["training_commands_note"],
        evaluation_source=(
            f"Measured on these float16 weights, loaded in {evaluation['dtype']}, on the {evaluation['split']} split "
            f"of CIFAR-10 (JPEG copy, {evaluation['num_examples']:,} images), with `{evaluation['command']}` "
            f"({evaluation['img_per_s']:.1f} images/s on a {evaluation['machine']})"
        ),
        evaluation_notes=[note.format(**figures) for note in spec["evaluation_notes"]],
        limitations=[limitation.format(**figures) for limitation in spec["limitations"]],
        shipped_default=True,
    )
    metrics = {
        "final_top1": evaluation["top1"],
        "steps": classifier_metrics["steps"],
        "pretraining_steps": flow_metrics["steps"],
        "pretraining_final_fm_loss": flow_metrics["final_fm_loss"],
    }
    card = render_model_card(model, spec["name"], dataset=spec["dataset"], hyperparameters=hyperparameters,
                             metrics=metrics, eval_split=evaluation["split"], details=details)
    card.save(output_dir / "README.md")
    print(f"build_default_model: wrote {output_dir.relative_to(ROOT)} weights_bytes={weights_bytes} "
          f"top1={evaluation['top1']:.4f}")


if __name__ == "__main__":
    main()
