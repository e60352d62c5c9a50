"""The CIFAR-10 budget table: PRG-OTCFM finetuned, the same finetune from scratch, and two frozen baselines.

    python benchmarks/cifar10_budget.py --dataset DIR --work_dir runs/budget \
        --pretrain_steps 3000 --finetune_steps 1500 [--preset small] [--mixed_precision bf16]
    python benchmarks/cifar10_budget.py --dataset DIR --work_dir /tmp/budget --smoke     # checks the driver on CPU

Runs the example scripts one after another on one device, times each, and scores every model on the whole test
split with `examples/evaluate.py`:

| row           | what                                                              | device time counted          |
|---------------|-------------------------------------------------------------------|------------------------------|
| `prg_otcfm`   | `pretrain.py --path otcfm`, then `finetune.py` from that flow     | pretrain + finetune          |
| `scratch`     | `finetune.py --from_scratch`, the same steps and batch            | finetune                     |
| `frozen_head` | `linear_probe.py --method prg_head` on the frozen flow            | pretrain + probe             |
| `ddae_probe`  | `linear_probe.py --method ddae` (block activations, linear layer) | pretrain + probe             |

Each row records its top-1, its device minutes, the images it trained on (steps × global batch, for probes
epochs × training images) and the exact commands. Prints the table as one JSON object and writes it to
`--output` (default `benchmarks/results/cifar10_budget.json`).
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run(script: str, arguments: list) -> tuple[dict, float, str]:
    """Run examples/<script>; return its summary line as {key: value}, the wall seconds and the command."""
    command = [sys.executable, str(EXAMPLES / script), *map(str, arguments)]
    start = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True)
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
    parser.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"])
    parser.add_argument("--output", default="benchmarks/results/cifar10_budget.json")
    parser.add_argument("--smoke", action="store_true", help="tiny network, a few steps, 256 images")
    args = parser.parse_args()

    work = Path(args.work_dir)
    limits = ["--max_train_samples", 256] if args.smoke else []
    eval_limit = ["--max_eval_samples", 128] if args.smoke else []
    preset = "tiny" if args.smoke else args.preset
    if args.smoke:
        args.pretrain_steps, args.finetune_steps, args.probe_epochs, args.num_steps = 4, 4, 1, 2
        args.pretrain_batch_size = args.finetune_batch_size = 16
    flow, rows = work / "flow", {}

    pretrain, pretrain_seconds, pretrain_command = run("pretrain.py", [
        "--dataset", args.dataset, "--output_dir", flow, "--path", "otcfm", "--backbone", "unet2d",
        "--preset", preset, "--train_batch_size", args.pretrain_batch_size, "--max_train_steps", args.pretrain_steps,
        "--use_ema", "--augmentation", "flip", "--mixed_precision", args.mixed_precision,
        "--checkpointing_steps", max(args.pretrain_steps // 2, 1), "--sample_every_steps", args.pretrain_steps,
        *limits,
    ])
    pretrain_images = args.pretrain_steps * args.pretrain_batch_size

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
        _, seconds, command = run("finetune.py", [*arguments, *finetune_common])
        counted = seconds + (pretrain_seconds if row == "prg_otcfm" else 0.0)
        commands = [pretrain_command, command] if row == "prg_otcfm" else [command]
        rows[row] = {"model": work / row, "seconds": counted, "commands": commands,
                     "images_seen": args.finetune_steps * args.finetune_batch_size
                     + (pretrain_images if row == "prg_otcfm" else 0)}
    for row, method in (("frozen_head", "prg_head"), ("ddae_probe", "ddae")):
        summary, seconds, command = run("linear_probe.py", [
            "--method", method, "--model_name_or_path", flow, "--dataset", args.dataset,
            "--num_steps", args.num_steps, "--num_train_epochs", args.probe_epochs, "--output_dir", work / row,
            *limits, *eval_limit,
        ])
        train_images = json.loads((work / row / "metrics.json").read_text())["num_train"]
        rows[row] = {"seconds": seconds + pretrain_seconds, "commands": [pretrain_command, command],
                     "images_seen": pretrain_images + train_images * args.probe_epochs,
                     "top1_from_probe": float(summary["top1"])}
        if method == "prg_head":
            rows[row]["model"] = work / row

    for row in rows.values():
        probe_top1 = row.pop("top1_from_probe", None)
        if "model" in row:
            summary, _, command = run("evaluate.py", [
                "--model_name_or_path", row.pop("model"), "--dataset", args.dataset, "--split", "test",
                *eval_limit,
            ])
            row["top1"], row["top5"] = float(summary["top1"]), float(summary["top5"])
            row["eval_images"] = int(summary["n"])
            row["commands"].append(command)
        else:
            row["top1"] = probe_top1
        row["device_minutes"] = round(row.pop("seconds") / 60, 2)

    result = {
        "dataset": args.dataset,
        "preset": preset,
        "pretrain_fm_loss": float(pretrain["final_fm_loss"]),
        "rows": rows,
        "command": "python " + " ".join(sys.argv),
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
