"""The heads compared on one frozen flow: every way of reading it, trained on the same images for the same epochs.

    python benchmarks/heads_comparison.py --model FLOW --dataset DATA --max_train_samples 10000 --epochs 8 \
        --output benchmarks/results/heads_cifar10.json
    python benchmarks/heads_comparison.py --model FLOW --dataset DATA --max_train_samples 64 --max_eval_samples 64 \
        --epochs 1                                                     # a smoke run

| head        | reads (defaults)                                                                  |
|-------------|-----------------------------------------------------------------------------------|
| `prg`       | x at the flow's `feature_t`, pooled                                               |
| `linear`    | `--best_block` at `--best_time` (DDAE's probe: up_blocks.0 at t = 0.011)          |
| `attention` | the same block and time                                                           |
| `difformer` | `--difformer_blocks` (2) at `--difformer_times` (2)                               |
| `diffeed`   | the same block and time as `linear`, on the second pass of its feedback (default |
|             | pairs: each encoder block fed back from the decoder block of its size)            |

One reversed-ODE pass per image serves them all: `PRGModel.feature_states` integrates from the image through the
union of the heads' times (and the flow's `feature_t`), `solvers.segment_steps` sharing `--num_steps` between the
segments, and `PRGModel.read_blocks` evaluates the network once at each time a block head reads, with hooks on the
union of their blocks (DifFeed's: its sending blocks, the first of its two passes). Each head keeps what it reads
(`PRGForImageClassification.frozen_features_of_pass`: pooled x, block averages, pooled tokens, or DifFeed's ODE
states and sending blocks' outputs), cached in memory for both splits. Then every head is trained alone by
`examples/linear_probe.py`'s `train_head` (AdamW, cosine decay, the flow frozen; DifFeed runs its second pass, with
the feedback, in every step) and scored on the whole evaluation split after each epoch.

The prg head reads x at feature_t from this shared pass: when the other times fall off the uniform grid of
`--num_steps` over [0, feature_t], its grid differs a little from the flow's own feature pass (the JSON records the
times and the steps of each segment).

Prints one JSON object: per head its configuration, top-1 on the evaluation split after the last epoch, training
seconds (evaluations included) and history; the shared extraction's times, blocks, steps and seconds; the machine
and the command. `--output` also writes it to a file.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch
from accelerate import PartialState
from tqdm.auto import tqdm

from prg_hub import HEADS, PRGForImageClassification, PRGModel, default_image_processor
from prg_hub.data import get_dataloaders, load_image_dataset
from prg_hub.heads import DifFeedHead
from prg_hub.run_records import describe_machine
from prg_hub.solvers import segment_steps

HEAD_TYPES = list(HEADS)
LINEAR_PROBE = Path(__file__).resolve().parents[1] / "examples" / "linear_probe.py"


def load_linear_probe():
    """examples/linear_probe.py as a module: its `train_head` trains every head here."""
    spec = importlib.util.spec_from_file_location("linear_probe", LINEAR_PROBE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Compare the heads on one frozen PRG flow.")
    parser.add_argument("--model", required=True, help="The pretrained flow: local folder or Hub id.")
    parser.add_argument("--dataset", required=True, help="Hub dataset id or local folder (parquet or imagefolder).")
    parser.add_argument("--image_column", default=None)
    parser.add_argument("--label_column", default=None)
    parser.add_argument("--train_split", default="train")
    parser.add_argument("--eval_split", default="eval", help="'eval' picks test, validation, valid or val.")
    parser.add_argument("--max_train_samples", type=int, default=10_000)
    parser.add_argument("--max_eval_samples", type=int, default=None, help="Default: the whole evaluation split.")
    parser.add_argument("--epochs", type=int, default=8, help="Training epochs of every head.")
    parser.add_argument("--heads", nargs="+", choices=HEAD_TYPES, default=HEAD_TYPES)
    parser.add_argument("--best_block", default="up_blocks.0", help="The block of linear, attention and diffeed.")
    parser.add_argument("--best_time", type=float, default=0.011, help="Their time (DDAE: 0.011).")
    parser.add_argument("--difformer_blocks", nargs="+", default=["mid_block", "up_blocks.0"])
    parser.add_argument("--difformer_times", nargs="+", type=float, default=[0.011, 0.25])
    parser.add_argument("--num_steps", type=int, default=4,
                        help="Solver steps over [0, last time] of the shared pass (the shipped classifier takes 4).")
    parser.add_argument("--feature_batch_size", type=int, default=128)
    parser.add_argument("--train_batch_size", type=int, default=256)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--weight_decay", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="Also write the JSON here.")
    return parser.parse_args(argv)


def head_settings(args) -> dict[str, dict]:
    """{head type: the config fields that make it}, for the heads asked for."""
    best = {"feature_blocks": [args.best_block], "feature_times": [args.best_time]}
    settings = {
        "prg": {},
        "linear": best,
        "attention": best,
        "difformer": {"feature_blocks": list(args.difformer_blocks), "feature_times": list(args.difformer_times)},
        "diffeed": best,
    }
    return {head_type: {"head_type": head_type, **settings[head_type]} for head_type in args.heads}


def build_classifiers(args, label_names: list[str]) -> dict[str, PRGForImageClassification]:
    """One classifier per head on the flow's weights, frozen, its head freshly initialised from `--seed`."""
    labels = {"num_labels": len(label_names), "id2label": dict(enumerate(label_names)),
              "label2id": {name: index for index, name in enumerate(label_names)}}
    classifiers = {}
    for head_type, settings in head_settings(args).items():
        torch.manual_seed(args.seed)
        model = PRGForImageClassification.from_pretrained(args.model, **labels, **settings, num_steps=args.num_steps)
        classifiers[head_type] = model.requires_grad_(False).eval()
    return classifiers


@torch.no_grad()
def extract(flow: PRGModel, classifiers: dict, dataloader, times: list[float], block_times: list[float],
            blocks: list[str], num_steps: int, description: str):
    """{head type: its frozen features (N, ...)} and the labels (N,) of a split, from one pass per image: the ODE
    states at `times`, and the outputs of `blocks` at `block_times`."""
    cached = {head_type: [] for head_type in classifiers}
    labels = []
    for batch in tqdm(dataloader, desc=description):
        pixel_values = batch["pixel_values"].to(flow.device)
        flow.check_pixel_values(pixel_values)
        states = dict(zip(times, flow.feature_states(flow.ode_state(pixel_values), times, num_steps), strict=True))
        block_features = flow.read_blocks([states[t] for t in block_times], block_times, blocks) if blocks else {}
        for head_type, model in classifiers.items():
            features = model.frozen_features_of_pass(states, block_features)
            cached[head_type].append({key: value.cpu() for key, value in features.items()})
        labels.append(batch["labels"])
    return ({head_type: {key: torch.cat([batch[key] for batch in batches]) for key in batches[0]}
             for head_type, batches in cached.items()}, torch.cat(labels))


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    image_data = load_image_dataset(args.dataset, image_column=args.image_column, label_column=args.label_column)
    classifiers = build_classifiers(args, image_data.label_names)
    flow = PRGModel.from_pretrained(args.model, num_steps=args.num_steps).requires_grad_(False).eval().to(device)
    for model in classifiers.values():
        model.to(device)
    num_steps = args.num_steps

    block_heads = [model for model in classifiers.values() if model.head.reads_blocks]
    block_times = sorted({t for model in block_heads for t in model.head.feature_times})
    blocks = sorted({name for model in block_heads for name in model.frozen_blocks()})
    times = sorted({*block_times, *([flow.config.feature_t] if "prg" in classifiers else [])})

    train_loader, eval_loader = get_dataloaders(
        image_data, default_image_processor(flow.config.image_size), train_split=args.train_split,
        eval_split=args.eval_split, train_batch_size=args.feature_batch_size, eval_batch_size=args.feature_batch_size,
        max_train_samples=args.max_train_samples, max_eval_samples=args.max_eval_samples, shuffle=False,
    )
    start = time.perf_counter()
    train = extract(flow, classifiers, train_loader, times, block_times, blocks, num_steps, "features (train)")
    evaluation = extract(flow, classifiers, eval_loader, times, block_times, blocks, num_steps, "features (eval)")
    extract_seconds = time.perf_counter() - start

    PartialState()  # linear_probe's logger is accelerate's, which needs the process state
    linear_probe = load_linear_probe()
    training = argparse.Namespace(seed=args.seed, train_batch_size=args.train_batch_size,
                                  learning_rate=args.learning_rate, weight_decay=args.weight_decay,
                                  num_train_epochs=args.epochs)
    heads = {}
    for head_type, model in classifiers.items():
        start = time.perf_counter()
        history = linear_probe.train_head(model, (train[0][head_type], train[1]),
                                          (evaluation[0][head_type], evaluation[1]), training, device)
        config = {key: getattr(model.config, key) for key in head_settings(args)[head_type]}
        if not model.head.reads_blocks:
            config["feature_t"] = model.config.feature_t
        if isinstance(model.head, DifFeedHead):
            config["feedback_blocks"] = dict(zip(model.head.feedback.receivers, model.head.feedback.senders))
        if model.head.reads_blocks and head_type != "linear":
            config.update({key: getattr(model.config, key)
                           for key in ("head_width", "head_depth", "head_attention_heads", "head_token_grid")})
        heads[head_type] = {
            "config": config,
            "top1": history[-1]["eval_top1"],
            "train_top1": history[-1]["train_top1"],
            "train_seconds": round(time.perf_counter() - start, 2),
            "head_parameters": sum(parameter.numel() for parameter in model.head.parameters()),
            "history": history,
        }
    result = {
        "command": " ".join(["python", "benchmarks/heads_comparison.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": describe_machine(device),
        "model": args.model,
        "num_train": len(train[1]),
        "num_eval": len(evaluation[1]),
        "epochs": args.epochs,
        "shared_pass": {"times": times, "segment_steps": segment_steps(times, num_steps), "block_times": block_times,
                        "blocks": blocks, "extract_seconds": round(extract_seconds, 2)},
        "heads": heads,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text + "\n", encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
