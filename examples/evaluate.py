"""Top-1 and top-5 accuracy of a PRG classifier on one split of a dataset, with an optional confusion matrix.

    accelerate launch examples/evaluate.py --model_name_or_path runs/prg-c10 --dataset uoft-cs/cifar10 \
        --split test --output_dir runs/prg-c10/eval --confusion_matrix

Every process scores its shard of the split; predictions are gathered (duplicated padding samples dropped).
top-k = fraction of images whose label is among the k highest logits (k is capped at the number of classes).
With --output_dir, writes `eval_results_<split>.json` and, with --confusion_matrix, `confusion_matrix_<split>.png`
(rows: true class, columns: predicted class, shade: fraction of the row). The results also record the time the
whole pass took (decoding and preprocessing included) as `img_per_s`, the machine, the dtype and the command.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from prg_hub import PRGForImageClassification, default_image_processor
from prg_hub.data import get_dataloaders, load_image_dataset
from prg_hub.finiteness import NonFiniteError
from prg_hub.run_records import describe_machine, write_json

logger = get_logger(__name__)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Evaluate a PRG classifier: top-1, top-5, confusion matrix.")
    parser.add_argument("--model_name_or_path", required=True, help="Classifier: local folder or Hub id.")
    parser.add_argument("--dataset", required=True, help="Hub dataset id or local folder (parquet or imagefolder).")
    parser.add_argument("--split", default="eval", help="Split to score; 'eval' picks test, validation, valid or val.")
    parser.add_argument("--image_column", default=None)
    parser.add_argument("--label_column", default=None)
    parser.add_argument("--max_eval_samples", type=int, default=None)
    parser.add_argument("--batch_size", type=int, default=256, help="Per-process batch size.")
    parser.add_argument("--num_steps", type=int, default=None, help="Override the model's solver steps.")
    parser.add_argument("--feature_t", type=float, default=None, help="Override the model's feature time.")
    parser.add_argument("--output_dir", default=None, help="Where to write the results JSON (and the PNG).")
    parser.add_argument("--confusion_matrix", action="store_true", help="Also save the confusion matrix as PNG.")
    parser.add_argument("--dataloader_num_workers", type=int, default=0)
    parser.add_argument("--cache_dir", default=None)
    args = parser.parse_args(argv)
    if args.confusion_matrix and args.output_dir is None:
        parser.error("--confusion_matrix needs --output_dir, where the PNG is written.")
    return args


def render_confusion_matrix(matrix: torch.Tensor, label_names: list[str], cell: int = 28) -> Image.Image:
    """A (K, K) count matrix as an image: row = true class, column = prediction, darker = larger row fraction."""
    num_labels = matrix.shape[0]
    fractions = matrix.float() / matrix.sum(dim=1, keepdim=True).clamp_min(1)
    margin = max(40, 8 * min(12, max(len(name) for name in label_names)) + 8)
    image = Image.new("RGB", (margin + num_labels * cell + 1, margin + num_labels * cell + 1), "white")
    draw = ImageDraw.Draw(image)
    draw.text((4, 4), "true \\ predicted", fill="black")
    for row in range(num_labels):
        draw.text((4, margin + row * cell + cell // 3), label_names[row][:12], fill="black")
        draw.text((margin + row * cell + 2, margin - 14), label_names[row][:3], fill="black")
        for column in range(num_labels):
            shade = int(255 * (1 - fractions[row, column].item()))
            box = (margin + column * cell, margin + row * cell, margin + (column + 1) * cell, margin + (row + 1) * cell)
            draw.rectangle(box, fill=(shade, shade, 255), outline="grey")
            if num_labels <= 20:
                text_colour = "white" if shade < 128 else "black"
                draw.text((box[0] + 3, box[1] + cell // 3), str(int(matrix[row, column])), fill=text_colour)
    return image


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    accelerator = Accelerator()
    overrides = {k: v for k, v in (("num_steps", args.num_steps), ("feature_t", args.feature_t)) if v is not None}
    model = PRGForImageClassification.from_pretrained(args.model_name_or_path, **overrides)
    model.eval()

    image_data = load_image_dataset(
        args.dataset, image_column=args.image_column, label_column=args.label_column, cache_dir=args.cache_dir
    )
    num_labels = model.config.num_labels
    if len(image_data.label_names) != num_labels:
        raise ValueError(
            f"The model predicts {num_labels} classes but the dataset has {len(image_data.label_names)} "
            f"({image_data.label_names[:10]}...). Evaluate on the dataset the model was trained for."
        )
    model_names = [model.config.id2label[index] for index in range(num_labels)]
    if model_names != image_data.label_names:
        logger.warning(f"Class names differ: model {model_names[:5]}..., dataset {image_data.label_names[:5]}...")
    split_name = image_data.split_name(args.split)
    _, dataloader = get_dataloaders(
        image_data,
        default_image_processor(model.config.image_size),
        eval_split=split_name,
        eval_batch_size=args.batch_size,
        max_eval_samples=args.max_eval_samples,
        num_workers=args.dataloader_num_workers,
    )
    model, dataloader = accelerator.prepare(model, dataloader)

    k = min(5, num_labels)
    top1_correct = topk_correct = total = 0
    confusion = torch.zeros(num_labels, num_labels, dtype=torch.long)
    start = time.perf_counter()
    with torch.no_grad():
        for batch in tqdm(dataloader, desc="evaluate", disable=not accelerator.is_local_main_process):
            top_predictions = model(batch["pixel_values"]).logits.topk(k, dim=-1).indices  # (B, k)
            top_predictions, labels = accelerator.gather_for_metrics((top_predictions, batch["labels"]))
            top1_correct += (top_predictions[:, 0] == labels).sum().item()
            topk_correct += (top_predictions == labels[:, None]).any(dim=1).sum().item()
            total += labels.numel()
            confusion += torch.bincount(
                labels.cpu() * num_labels + top_predictions[:, 0].cpu(), minlength=num_labels**2
            ).reshape(num_labels, num_labels)

    seconds = time.perf_counter() - start  # decoding, preprocessing and the model: what a user waits for
    if accelerator.is_main_process:
        results = {
            "model": args.model_name_or_path,
            "dataset": args.dataset,
            "split": split_name,
            "num_examples": total,
            "top1": top1_correct / total,
            f"top{k}": topk_correct / total,
            "seconds": seconds,
            "img_per_s": total / seconds,
            "dtype": str(accelerator.unwrap_model(model).dtype).removeprefix("torch."),
            "machine": describe_machine(accelerator.device),
            "command": shlex.join(["python", "examples/evaluate.py", *(sys.argv[1:] if argv is None else argv)]),
            "confusion_matrix": confusion.tolist(),
            "labels": model_names,
        }
        if args.output_dir is not None:
            output_dir = Path(args.output_dir)
            write_json(output_dir / f"eval_results_{split_name}.json", results)
            if args.confusion_matrix:
                render_confusion_matrix(confusion, model_names).save(output_dir / f"confusion_matrix_{split_name}.png")
        print(f"evaluate: split={split_name} top1={results['top1']:.4f} top{k}={results[f'top{k}']:.4f} n={total} "
              f"img_per_s={results['img_per_s']:.2f}")
    accelerator.wait_for_everyone()  # every process tears the process group down together
    accelerator.end_training()


if __name__ == "__main__":
    try:
        main()
    except NonFiniteError as error:  # a model with NaN weights: say so, without a traceback
        sys.exit(f"{Path(__file__).name}: {error}")
