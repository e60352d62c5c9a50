"""Frozen-flow classifiers: a pretrained flow stays fixed and only a head on its features is trained, any head.

    # (a) the PRG head on x at feature_t (the paper's "frozen" row)
    accelerate launch examples/linear_probe.py --head_type prg --model_name_or_path runs/otcfm-c10 \
        --dataset uoft-cs/cifar10 --feature_t 1.0 --num_steps 20 --output_dir runs/probe-prg-c10
    # (b) DDAE's probe: one block's output at a low noise level, averaged over positions, BatchNorm, one Linear
    accelerate launch examples/linear_probe.py --head_type linear --feature_blocks up_blocks.0 --feature_times 0.011 \
        --num_steps 1 --model_name_or_path runs/otcfm-c10 --dataset uoft-cs/cifar10 --output_dir runs/probe-ddae-c10
    # (c) DifFormer over two blocks at two times
    accelerate launch examples/linear_probe.py --head_type difformer --feature_blocks mid_block up_blocks.0 \
        --feature_times 0.011 0.25 --num_steps 4 --model_name_or_path runs/otcfm-c10 --dataset uoft-cs/cifar10 \
        --output_dir runs/probe-difformer-c10

The classifier is `PRGForImageClassification` with the pretrained flow and a new head of --head_type (prg, linear,
attention, difformer, diffeed; `prg_hub/heads.py`) reading --feature_blocks at --feature_times. Its forward pass is
split in two (`frozen_features`, `head_logits`):

1. `frozen_features`, computed once for the train and evaluation splits (no augmentation), every process taking a
   shard, then gathered: the pooled x at --feature_t (prg), the blocks' outputs at the times reduced to averages
   (linear) or pooled tokens (attention, difformer), or the ODE states at the times and the outputs of the sending
   blocks of the first network pass there (diffeed, whose second pass depends on its feedback). All times come from
   one reversed-ODE pass per image.
2. `head_logits` trains on them for --num_train_epochs with AdamW and cosine decay, identically on every process
   (diffeed runs its second network pass, with the feedback, per time in every step, from the cached states).

The flow stays frozen throughout (`requires_grad_(False)`, eval mode); the main process saves the whole classifier
(the flow's weights as loaded, the trained head), which evaluate.py and the pipelines load.

DDAE's probe, (b): its noised x_t = α_t·x + σ_t·ε is the reversed ODE's state x_t here (deterministic: one Euler step
to t = 0.011 with --num_steps 1), and its standardisation by the training features' mean and std is the linear
head's BatchNorm without affine parameters.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from prg_hub import HEADS, PRGForImageClassification, default_image_processor
from prg_hub.data import get_dataloaders, load_image_dataset
from prg_hub.finiteness import NonFiniteError
from prg_hub.run_records import save_model, write_json

logger = get_logger(__name__)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train a head on the features of a frozen PRG flow.")
    parser.add_argument("--model_name_or_path", required=True, help="Pretrained flow: local folder or Hub id.")
    parser.add_argument("--head_type", choices=list(HEADS), default="prg", help="The head (prg_hub/heads.py).")
    parser.add_argument("--feature_blocks", nargs="+", default=None,
                        help="Blocks the head reads, e.g. mid_block up_blocks.0 (DiT: transformer_blocks.6).")
    parser.add_argument("--feature_times", nargs="+", type=float, default=None,
                        help="Increasing times in (0, 1] at which the blocks are read (default: --feature_t).")
    parser.add_argument("--feature_t", type=float, default=1.0, help="prg head: time of x_t (1 is noise).")
    parser.add_argument("--num_steps", type=int, default=20,
                        help="Solver steps from t = 0 to --feature_t (prg) or to the last of --feature_times.")
    parser.add_argument("--dataset", required=True, help="Hub dataset id or local folder (parquet or imagefolder).")
    parser.add_argument("--image_column", default=None)
    parser.add_argument("--label_column", default=None)
    parser.add_argument("--train_split", default="train")
    parser.add_argument("--eval_split", default="eval", help="'eval' picks test, validation, valid or val.")
    parser.add_argument("--max_train_samples", type=int, default=None)
    parser.add_argument("--max_eval_samples", type=int, default=None)
    parser.add_argument("--feature_batch_size", type=int, default=256, help="Per-process batch for features.")
    parser.add_argument("--train_batch_size", type=int, default=256, help="Batch of the head's training.")
    parser.add_argument("--num_train_epochs", type=int, default=15)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--weight_decay", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dataloader_num_workers", type=int, default=0)
    parser.add_argument("--cache_dir", default=None)
    parser.add_argument("--output_dir", required=True)
    return parser.parse_args(argv)


@torch.no_grad()
def extract_frozen_features(model, dataloader, accelerator, description: str):
    """`model.frozen_features` {key: (N, ...)} and the labels (N,) of a whole split, in dataset order, on every
    process (on the CPU)."""
    dataloader = accelerator.prepare(dataloader)
    batches, labels, indices = [], [], []
    for batch in tqdm(dataloader, desc=description, disable=not accelerator.is_local_main_process):
        features = model.frozen_features(batch["pixel_values"])
        features, batch_labels, batch_indices = accelerator.gather_for_metrics(
            (features, batch["labels"], batch["index"]))
        batches.append({key: value.cpu() for key, value in features.items()})
        labels.append(batch_labels.cpu())
        indices.append(batch_indices.cpu())
    order = torch.cat(indices).argsort()
    return {key: torch.cat([batch[key] for batch in batches])[order] for key in batches[0]}, torch.cat(labels)[order]


def take(features: dict[str, torch.Tensor], rows: torch.Tensor, device) -> dict[str, torch.Tensor]:
    """The cached features of `rows`, on `device`."""
    return {key: value[rows].to(device) for key, value in features.items()}


@torch.no_grad()
def accuracy(model, features, labels, batch_size: int, device) -> float:
    """Top-1 of the head (eval mode) on cached features."""
    rows = torch.arange(len(labels)).split(batch_size)
    correct = sum((model.head_logits(take(features, batch, device)).argmax(-1).cpu() == labels[batch]).sum().item()
                  for batch in rows)
    return correct / len(labels)


def train_head(model, train, evaluation, args, device) -> list[dict]:
    """AdamW with cosine decay on the head's parameters, from cached (features, labels); returns per epoch the
    top-1 on the training batches as they were trained, and on the evaluation split."""
    (train_features, train_labels), (eval_features, eval_labels) = train, evaluation
    head = model.head.requires_grad_(True)
    generator = torch.Generator().manual_seed(args.seed)
    steps_per_epoch = math.ceil(len(train_labels) / args.train_batch_size)
    optimizer = torch.optim.AdamW(head.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=0,
                              num_training_steps=args.num_train_epochs * steps_per_epoch)
    history = []
    for epoch in range(args.num_train_epochs):
        head.train()
        correct = 0
        for batch in torch.randperm(len(train_labels), generator=generator).split(args.train_batch_size):
            labels = train_labels[batch].to(device)
            logits = model.head_logits(take(train_features, batch, device))
            loss = F.cross_entropy(logits, labels)
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            correct += (logits.argmax(-1) == labels).sum().item()
        head.eval()
        eval_top1 = accuracy(model, eval_features, eval_labels, args.train_batch_size, device)
        history.append({"epoch": epoch, "train_top1": correct / len(train_labels), "eval_top1": eval_top1,
                        "loss": loss.item()})
        logger.info(f"epoch {epoch}: loss {loss.item():.4f} eval_top1 {eval_top1:.4f}")
    return history


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    accelerator = Accelerator()
    output_dir = Path(args.output_dir)
    image_data = load_image_dataset(
        args.dataset, image_column=args.image_column, label_column=args.label_column, cache_dir=args.cache_dir
    )
    label_names = image_data.label_names
    set_seed(args.seed)  # the same head initialisation on every process
    model = PRGForImageClassification.from_pretrained(
        args.model_name_or_path,
        num_labels=len(label_names),
        id2label=dict(enumerate(label_names)),
        label2id={name: index for index, name in enumerate(label_names)},
        feature_t=args.feature_t,
        num_steps=args.num_steps,
        head_type=args.head_type,
        feature_blocks=args.feature_blocks,
        feature_times=args.feature_times,
    )
    model.requires_grad_(False).eval().to(accelerator.device)  # the flow stays frozen; only the head will train

    train_dataloader, eval_dataloader = get_dataloaders(
        image_data,
        default_image_processor(model.config.image_size),
        train_split=args.train_split,
        eval_split=args.eval_split,
        train_batch_size=args.feature_batch_size,
        eval_batch_size=args.feature_batch_size,
        max_train_samples=args.max_train_samples,
        max_eval_samples=args.max_eval_samples,
        shuffle=False,  # features are cached in dataset order
        num_workers=args.dataloader_num_workers,
    )
    start = time.perf_counter()
    train = extract_frozen_features(model, train_dataloader, accelerator, "features (train)")
    evaluation = extract_frozen_features(model, eval_dataloader, accelerator, "features (eval)")
    extract_seconds = time.perf_counter() - start
    start = time.perf_counter()
    history = train_head(model, train, evaluation, args, accelerator.device)
    train_seconds = time.perf_counter() - start

    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_model(model, output_dir)
        final = history[-1]
        feature_dim = sum(value[0].numel() for value in train[0].values())
        metrics = {
            "head_type": args.head_type,
            "feature_blocks": model.config.feature_blocks,
            "feature_times": model.config.block_feature_times if model.head.reads_blocks else None,
            "top1": final["eval_top1"],
            "train_top1": final["train_top1"],
            "feature_dim": feature_dim,
            "num_train": len(train[1]),
            "num_eval": len(evaluation[1]),
            "extract_seconds": extract_seconds,
            "train_seconds": train_seconds,
            "history": history,
        }
        write_json(output_dir / "args.json", vars(args))
        write_json(output_dir / "metrics.json", metrics)
        print(
            f"linear_probe: head_type={args.head_type} top1={final['eval_top1']:.4f} "
            f"train_top1={final['train_top1']:.4f} feature_dim={feature_dim} output_dir={output_dir}"
        )
    accelerator.wait_for_everyone()  # every process tears the process group down together
    accelerator.end_training()


if __name__ == "__main__":
    try:
        main()
    except NonFiniteError as error:  # a model with NaN weights: say so, without a traceback
        sys.exit(f"{Path(__file__).name}: {error}")
