"""Frozen-feature baselines: a pretrained flow stays fixed, only a small classifier on its features is trained.

    # (a) PRG endpoint features, head only (the paper's "frozen" row)
    accelerate launch examples/linear_probe.py --method prg_head --model_name_or_path runs/otcfm-c10 \
        --dataset uoft-cs/cifar10 --feature_t 1.0 --num_steps 20 --output_dir runs/probe-prg-c10
    # (b) DDAE: internal activations of one block at a low noise level, global-average pooled, linear classifier
    accelerate launch examples/linear_probe.py --method ddae --block up_blocks.1 --noise_t 0.011 \
        --model_name_or_path runs/otcfm-c10 --dataset uoft-cs/cifar10 --output_dir runs/probe-ddae-c10

Features (no augmentation) are computed once for the train and evaluation splits, every process taking a shard,
and gathered. Then the classifier is trained on the cached features for --num_train_epochs with AdamW and
cosine decay (DDAE: Adam 1e-3, 15 epochs), identically on every process; the main process saves it.

* prg_head: x_0 = image, x_t = ODESolve(v_θ, x_0, 0 → feature_t); features AvgPool16(x_t) flattened, (B, 768);
  the classifier is the PRG head (LayerNorm → Linear → Tanh → Linear). Saved as a complete
  `PRGForImageClassification` (the frozen flow plus the trained head), which evaluate.py and pipelines load.
* ddae: x_t = α_t·x_0 + σ_t·ε at t = --noise_t (t = 0 is data; DDAE's DDPM step 11 of 1000 is about 0.011),
  with ε seeded per sample; the output of --block of the velocity network during v_θ(x_t, t), averaged over
  space (UNet, (B, C, h, w) → (B, C)) or tokens (DiT, (B, N, D) → (B, D)); features standardised with the
  training mean and std, then one Linear layer. Saved as `probe.safetensors` + `probe_config.json`.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from diffusers.optimization import get_scheduler
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from prg_hub import PRGForImageClassification, default_image_processor
from prg_hub.data import get_dataloaders, load_image_dataset
from prg_hub.finiteness import NonFiniteError
from prg_hub.run_records import save_model, write_json

logger = get_logger(__name__)
METHODS = ("prg_head", "ddae")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Frozen-feature baselines of a pretrained PRG flow.")
    parser.add_argument("--method", choices=METHODS, required=True)
    parser.add_argument("--model_name_or_path", required=True, help="Pretrained flow: local folder or Hub id.")
    parser.add_argument("--feature_t", type=float, default=1.0, help="prg_head: time of x_t (1 is noise).")
    parser.add_argument("--num_steps", type=int, default=20, help="prg_head: solver steps from t = 0.")
    parser.add_argument("--block", default="mid_block",
                        help="ddae: block of the velocity network, e.g. mid_block, up_blocks.1, transformer_blocks.6.")
    parser.add_argument("--noise_t", type=float, default=0.011, help="ddae: noise level t of x_t (0 is data).")
    parser.add_argument("--dataset", required=True, help="Hub dataset id or local folder (parquet or imagefolder).")
    parser.add_argument("--image_column", default=None)
    parser.add_argument("--label_column", default=None)
    parser.add_argument("--train_split", default="train")
    parser.add_argument("--eval_split", default="eval", help="'eval' picks test, validation, valid or val.")
    parser.add_argument("--max_train_samples", type=int, default=None)
    parser.add_argument("--max_eval_samples", type=int, default=None)
    parser.add_argument("--feature_batch_size", type=int, default=256, help="Per-process batch for features.")
    parser.add_argument("--train_batch_size", type=int, default=256, help="Batch of the classifier training.")
    parser.add_argument("--num_train_epochs", type=int, default=15)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--weight_decay", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dataloader_num_workers", type=int, default=0)
    parser.add_argument("--cache_dir", default=None)
    parser.add_argument("--output_dir", required=True)
    args = parser.parse_args(argv)
    if not 0 <= args.noise_t <= 1:
        parser.error(f"--noise_t must be in [0, 1] (0 is data, 1 is noise), got {args.noise_t}.")
    return args


def probe_blocks(network: nn.Module) -> list[str]:
    """Blocks a DDAE probe can read: every entry of the network's block lists, and its middle block."""
    names = []
    for name, child in network.named_children():
        if isinstance(child, nn.ModuleList):
            names += [f"{name}.{index}" for index in range(len(child))]
        elif name == "mid_block":
            names.append(name)
    return names


class DDAEFeatures:
    """Global-average-pooled output of one block of v_θ evaluated at x_t = α_t·x + σ_t·ε, t = noise_t."""

    def __init__(self, prg, block: str, noise_t: float, seed: int):
        network = prg.velocity.network
        if block not in probe_blocks(network):
            raise ValueError(
                f"Unknown --block {block!r} for this {type(network).__name__}: choose one of {probe_blocks(network)}."
            )
        self.prg, self.noise_t, self.seed = prg, noise_t, seed
        self._activation = None
        network.get_submodule(block).register_forward_hook(self._keep_output)

    def _keep_output(self, module, inputs, output):
        self._activation = output[0] if isinstance(output, tuple) else output

    def __call__(self, pixel_values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images and their dataset indices → (B, D) pooled activations."""
        noise = torch.stack([
            torch.randn(pixel_values.shape[1:], generator=torch.Generator().manual_seed(self.seed * 10**7 + int(i)))
            for i in indices
        ]).to(pixel_values)
        t = torch.full((pixel_values.shape[0],), self.noise_t, device=pixel_values.device)
        x_t = self.prg.probability_path.interpolate(pixel_values, noise, t)
        self.prg.velocity(x_t, t)
        activation = self._activation.float()
        return activation.mean(dim=(2, 3)) if activation.dim() == 4 else activation.mean(dim=1)


class LinearProbe(nn.Module):
    """(x − mean) / std, then Linear(D, num_labels); mean and std are the training features' (buffers)."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, num_labels: int):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.linear = nn.Linear(mean.numel(), num_labels)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear((features - self.mean) / self.std)


@torch.no_grad()
def extract_features(feature_fn, dataloader, accelerator, description: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (N, D) and labels (N,) of a whole split, in dataset order, on every process."""
    dataloader = accelerator.prepare(dataloader)
    features, labels, indices = [], [], []
    for batch in tqdm(dataloader, desc=description, disable=not accelerator.is_local_main_process):
        batch_features = feature_fn(batch["pixel_values"], batch["index"])
        gathered = accelerator.gather_for_metrics((batch_features, batch["labels"], batch["index"]))
        for store, value in zip((features, labels, indices), gathered, strict=True):
            store.append(value.cpu())
    order = torch.cat(indices).argsort()
    return torch.cat(features)[order], torch.cat(labels)[order]


def train_classifier(classifier: nn.Module, train, evaluation, args) -> list[dict]:
    """AdamW with cosine decay on cached (features, labels); returns the per-epoch train and eval top-1."""
    (train_features, train_labels), (eval_features, eval_labels) = train, evaluation
    generator = torch.Generator().manual_seed(args.seed)
    steps_per_epoch = math.ceil(len(train_labels) / args.train_batch_size)
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=0,
                              num_training_steps=args.num_train_epochs * steps_per_epoch)
    history = []
    for epoch in range(args.num_train_epochs):
        classifier.train()
        for batch in torch.randperm(len(train_labels), generator=generator).split(args.train_batch_size):
            loss = F.cross_entropy(classifier(train_features[batch]), train_labels[batch])
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        classifier.eval()
        with torch.no_grad():
            train_top1 = (classifier(train_features).argmax(-1) == train_labels).float().mean().item()
            eval_top1 = (classifier(eval_features).argmax(-1) == eval_labels).float().mean().item()
        history.append({"epoch": epoch, "train_top1": train_top1, "eval_top1": eval_top1, "loss": loss.item()})
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
    set_seed(args.seed)
    model = PRGForImageClassification.from_pretrained(
        args.model_name_or_path,
        num_labels=len(label_names),
        id2label=dict(enumerate(label_names)),
        label2id={name: index for index, name in enumerate(label_names)},
        feature_t=args.feature_t,
        num_steps=args.num_steps,
    )
    model.requires_grad_(False).eval()
    prg = accelerator.prepare_model(model.prg, evaluation_mode=True)

    if args.method == "prg_head":
        def feature_fn(pixel_values, indices):
            return prg(pixel_values).pooler_output
    else:
        feature_fn = DDAEFeatures(accelerator.unwrap_model(prg), args.block, args.noise_t, args.seed)
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
    splits = {
        "train": extract_features(feature_fn, train_dataloader, accelerator, "features (train)"),
        "eval": extract_features(feature_fn, eval_dataloader, accelerator, "features (eval)"),
    }
    train_features = splits["train"][0]

    if args.method == "prg_head":
        classifier = model.head.requires_grad_(True)
    else:
        classifier = LinearProbe(train_features.mean(0), train_features.std(0).clamp_min(1e-6), len(label_names))
    history = train_classifier(classifier, splits["train"], splits["eval"], args)

    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        if args.method == "prg_head":
            save_model(model, output_dir)
        else:
            save_file(classifier.state_dict(), str(output_dir / "probe.safetensors"))
            write_json(output_dir / "probe_config.json", {
                "flow": args.model_name_or_path, "block": args.block, "noise_t": args.noise_t,
                "feature_dim": train_features.shape[1], "id2label": dict(enumerate(label_names)), "seed": args.seed,
            })
        final = history[-1]
        metrics = {
            "method": args.method,
            "top1": final["eval_top1"],
            "train_top1": final["train_top1"],
            "feature_dim": train_features.shape[1],
            "num_train": len(splits["train"][1]),
            "num_eval": len(splits["eval"][1]),
            "history": history,
        }
        write_json(output_dir / "args.json", vars(args))
        write_json(output_dir / "metrics.json", metrics)
        detail = f"feature_t={args.feature_t}" if args.method == "prg_head" else f"block={args.block} t={args.noise_t}"
        print(
            f"linear_probe: method={args.method} {detail} top1={final['eval_top1']:.4f} "
            f"train_top1={final['train_top1']:.4f} feature_dim={train_features.shape[1]} output_dir={output_dir}"
        )
    accelerator.wait_for_everyone()  # every process tears the process group down together
    accelerator.end_training()


if __name__ == "__main__":
    try:
        main()
    except NonFiniteError as error:  # a model with NaN weights: say so, without a traceback
        sys.exit(f"{Path(__file__).name}: {error}")
