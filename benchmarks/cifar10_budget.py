"""The CIFAR-10 budget table: PRG-OTCFM finetuned, the same finetune from scratch, and two frozen baselines.

    python benchmarks/cifar10_budget.py --dataset DIR --work_dir runs/budget \
        --pretrain_steps 3000 --finetune_steps 1500 [--preset small] [--mixed_precision bf16]
    python benchmarks/cifar10_budget.py --dataset DIR --work_dir /tmp/budget --smoke     # checks the driver on CPU

Runs the example scripts one after another on one device, times each, and scores every model on the whole test
split with `examples/evaluate.py`:

| row           | what                                                                      | device time counted |
|---------------|---------------------------------------------------------------------------|---------------------|
| `prg_otcfm`   | `pretrain.py --probability_path otcfm`, then `finetune.py` from that flow | pretrain + finetune |
| `scratch`     | `finetune.py --from_scratch`, the same steps and batch                    | finetune            |
| `frozen_head` | `linear_probe.py --head_type prg` on the frozen flow                      | pretrain + probe    |
| `ddae_probe`  | `linear_probe.py --head_type linear` (one block at t = 0.011, linear)     | pretrain + probe    |

Each row records its top-1 (the probes': their own score on the whole evaluation split at the end of training),
its device minutes, the images it trained on (steps × global batch, for probes epochs × training images), the
machine it was measured on and the exact commands. `--rows` runs some of the rows only; `--flow DIR` skips
pretraining and probes an existing flow (its pretraining time is then not counted). Rows already in `--output`
that were not run are kept, so a table can hold rows measured on different machines. Prints the table as one
JSON object and writes it to `--output` (default `benchmarks/results/cifar10_budget.json`).

    # the frozen baselines of an existing flow on a CPU, with a 10,000-image training subset
    python benchmarks/cifar10_budget.py --dataset DIR --work_dir runs/budget --flow runs/flow \
        --rows frozen_head ddae_probe --max_train_samples 10000
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from prg_hub.run_records import describe_machine

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
ROWS = ("prg_otcfm", "scratch", "frozen_head", "ddae_probe")


def run(script: str, arguments: list) -> tuple[dict, float, str]:
    """Run examples/<script>; return its summary line as {key: value}, the wall seconds and the command."""
    command = [sys.executable, str(EXAMPLES / script), *map(str, arguments)]
    start = time.perf_counter()
    completed = subprocess.run(command, check=False, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if completed.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{completed.stderr[-4000:]}")
    prefix = f"{Path(script).stem}: "
    [line] = [line for line in completed.stdout.splitlines() if line.startswith(prefix)]
    summary = dict(item.split("=", 1) for item in line[len(prefix):].split())
    return summary, seconds, " ".join(["python", f"examples/{script}", *map(str, arguments)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, help="CIFAR-10 as parquet (train and test splits).")
    parser.add_argument("--work_dir", required=True)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--pretrain_steps", type=int, default=3000)
    parser.add_argument("--pretrain_batch_size", type=int, default=128)
    parser.add_argument("--finetune_steps", type=int, default=1500)
    parser.add_argument("--finetune_batch_size", type=int, default=128)
    parser.add_argument("--num_steps", type=int, default=4, help="Euler steps from t = 0 to feature_t.")
    parser.add_argument("--probe_epochs", type=int, default=15)
    parser.add_argument("--ddae_block", default="up_blocks.0", help="Block the DDAE probe reads (a decoder block).")
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS), help="Rows to run (default: all).")
    parser.add_argument("--flow", help="An existing pretrained flow: skip pretraining (rows prg_otcfm, "
                                       "frozen_head, ddae_probe then count no pretraining time).")
    parser.add_argument("--max_train_samples", type=int, help="Train on the first N training images only.")
    parser.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"])
    parser.add_argument("--output", default="benchmarks/results/cifar10_budget.json")
    parser.add_argument("--smoke", action="store_true", help="tiny network, a few steps, 256 images")
    args = parser.parse_args()

    work = Path(args.work_dir)
    if args.smoke:
        args.max_train_samples = 256
    limits = [] if args.max_train_samples is None else ["--max_train_samples", args.max_train_samples]
    eval_limit = ["--max_eval_samples", 128] if args.smoke else []
    preset = "tiny" if args.smoke else args.preset
    if args.smoke:
        args.pretrain_steps, args.finetune_steps, args.probe_epochs, args.num_steps = 4, 4, 1, 2
        args.pretrain_batch_size = args.finetune_batch_size = 16
    machine, rows = describe_machine(), {}

    if args.flow is None:
        flow = work / "flow"
        pretrain, pretrain_seconds, pretrain_command = run("pretrain.py", [
            "--dataset", args.dataset, "--output_dir", flow, "--probability_path", "otcfm", "--backbone", "unet2d",
            "--preset", preset, "--train_batch_size", args.pretrain_batch_size,
            "--max_train_steps", args.pretrain_steps, "--use_ema", "--augmentation", "flip",
            "--mixed_precision", args.mixed_precision, "--checkpointing_steps", max(args.pretrain_steps // 2, 1),
            "--sample_every_steps", args.pretrain_steps, *limits,
        ])
        pretrain_images = args.pretrain_steps * args.pretrain_batch_size
        pretrain_commands = [pretrain_command]
    else:  # an existing flow: its training is not part of this run
        flow, pretrain, pretrain_seconds, pretrain_images, pretrain_commands = Path(args.flow), None, 0.0, 0, []

    finetune_common = [
        "--dataset", args.dataset, "--num_steps", args.num_steps, "--feature_t", 1.0, "--solver", "euler",
        "--gradient_checkpointing", "--train_batch_size", args.finetune_batch_size,
        "--max_train_steps", args.finetune_steps, "--augmentation", "crop_flip",
        "--mixed_precision", args.mixed_precision, "--checkpointing_steps", args.finetune_steps, *limits, *eval_limit,
    ]
    finetunes = {
        "prg_otcfm": ["--model_name_or_path", flow, "--output_dir", work / "prg_otcfm"],
        "scratch": ["--from_scratch", "--model_name_or_path", flow, "--output_dir", work / "scratch"],
    }
    for row, arguments in finetunes.items():
        if row not in args.rows:
            continue
        _, seconds, command = run("finetune.py", [*arguments, *finetune_common])
        pretrained = row == "prg_otcfm"
        summary, _, evaluate_command = run("evaluate.py", [
            "--model_name_or_path", work / row, "--dataset", args.dataset, "--split", "test", *eval_limit,
        ])
        rows[row] = {"top1": float(summary["top1"]), "top5": float(summary["top5"]), "eval_images": int(summary["n"]),
                     "seconds": seconds + (pretrain_seconds if pretrained else 0.0),
                     "images_seen": args.finetune_steps * args.finetune_batch_size
                     + (pretrain_images if pretrained else 0),
                     "commands": [*(pretrain_commands if pretrained else []), command, evaluate_command]}
    probes = {"frozen_head": ["--head_type", "prg", "--num_steps", args.num_steps],
              "ddae_probe": ["--head_type", "linear", "--feature_blocks", args.ddae_block, "--feature_times", 0.011,
                             "--num_steps", 1]}
    for row, method_arguments in probes.items():
        if row not in args.rows:
            continue
        summary, seconds, command = run("linear_probe.py", [
            *method_arguments, "--model_name_or_path", flow, "--dataset", args.dataset,
            "--num_train_epochs", args.probe_epochs, "--output_dir", work / row, *limits, *eval_limit,
        ])
        probe_metrics = json.loads((work / row / "metrics.json").read_text())
        rows[row] = {"top1": float(summary["top1"]), "eval_images": probe_metrics["num_eval"],
                     "train_images": probe_metrics["num_train"], "seconds": seconds + pretrain_seconds,
                     "images_seen": pretrain_images + probe_metrics["num_train"] * args.probe_epochs,
                     "commands": [*pretrain_commands, command]}
    for row in rows.values():
        row["device_minutes"] = round(row.pop("seconds") / 60, 2)
        row["measured_on"] = machine
        row["flow"] = str(flow)

    output = Path(args.output)
    result = json.loads(output.read_text()) if output.is_file() else {"rows": {}}
    result["rows"].update(rows)
    result["last_command"] = "python " + " ".join(sys.argv)
    if pretrain is not None:
        result["pretrain_fm_loss"] = float(pretrain["final_fm_loss"])
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
