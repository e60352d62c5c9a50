"""Quickstart: the PRG classifier shipped with prg_hub, through transformers' pipelines, on real CIFAR-10 images.

    python examples/quickstart.py [--images examples/images] [--output_dir quickstart-output]

Runs offline on a CPU in well under a minute. It
1. classifies the images in `--images` with `pipeline("image-classification", model=prg_hub.DEFAULT_MODEL)` and,
   when the folder has a `labels.csv` (columns `file`, `label`), prints the accuracy on them;
2. extracts PRG features of the same images with `pipeline("image-feature-extraction")`;
3. saves `trajectory.png`: the reversed ODE for the first image, x_t from t = 0 (the image) to t = 1, the end the
   flow maps to noise, which is the point the classifier reads. With 4 coarse Euler steps and a velocity network
   finetuned for classification, x_1 keeps much of the image's layout;
4. saves `samples.png`: images generated from noise by integrating the same velocity network from t = 1 to t = 0.
   The shipped checkpoint is the finetuned classifier, whose velocity network was trained for classification
   after pretraining, so these samples show the mechanism, not a good generator.
"""

import argparse
import csv
from pathlib import Path

import torch
from diffusers.utils import make_image_grid
from PIL import Image
from transformers import pipeline

import prg_hub
from prg_hub.image_grid import to_pil_images

SHOWN_SIZE = 96  # pixels per 32×32 image in the saved PNGs (nearest-neighbour upscaling)

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--images", default=str(Path(__file__).parent / "images"), help="A folder of images.")
parser.add_argument("--output_dir", default="quickstart-output", help="Where trajectory.png and samples.png go.")
parser.add_argument("--num_samples", type=int, default=16, help="Images to generate from noise.")
args = parser.parse_args()
output_dir = Path(args.output_dir)
output_dir.mkdir(parents=True, exist_ok=True)

# 1. Classify. The model folder is inside the installed package: no download, no network.
classifier = pipeline("image-classification", model=prg_hub.DEFAULT_MODEL)
config = classifier.model.config
print(f"model: {prg_hub.DEFAULT_MODEL}\n  {classifier.model.num_parameters() / 1e6:.2f}M parameters, "
      f"{config.probability_path} flow, {config.num_steps} {config.solver} steps from t = 0 to t = {config.feature_t}")
paths = sorted(path for path in Path(args.images).iterdir() if path.suffix.lower() in {".png", ".jpg", ".jpeg"})
images = [Image.open(path).convert("RGB") for path in paths]
predictions = classifier(images, top_k=1)
labels_file = Path(args.images) / "labels.csv"
true_labels = {}
if labels_file.is_file():
    with labels_file.open(newline="") as rows:
        true_labels = {row["file"]: row["label"] for row in csv.DictReader(rows)}
correct = 0
for path, [prediction] in zip(paths, predictions, strict=True):
    truth = true_labels.get(path.name)
    correct += prediction["label"] == truth
    verdict = "" if truth is None else ("  right" if prediction["label"] == truth else f"  wrong (is {truth})")
    print(f"  {path.name}: {prediction['label']} (p={prediction['score']:.2f}){verdict}")
if true_labels:
    print(f"accuracy on these images: {correct}/{len(paths)} = {correct / len(paths):.0%} "
          f"(the model's CIFAR-10 test top-1 is in its card: {Path(prg_hub.DEFAULT_MODEL) / 'README.md'})")

# 2. Features: x_1 pooled to 16×16 per channel, the 768 numbers the head reads.
extractor = pipeline("image-feature-extraction", model=prg_hub.DEFAULT_MODEL)
features = extractor(images, pool=True, return_tensors=True)
print(f"features: {type(extractor).__name__} gives {len(features)} vectors of shape {tuple(features[0].shape[1:])}")

# 3. The reversed trajectory of the first image: num_steps + 1 states from the image (t = 0) to noise (t = 1).
model = classifier.model
pixel_values = classifier.image_processor(images[:1], return_tensors="pt")["pixel_values"]
with torch.inference_mode():
    trajectory = model.prg(pixel_values, output_hidden_states=True).hidden_states
strip = make_image_grid(to_pil_images(torch.cat(trajectory)), rows=1, cols=len(trajectory))
strip = strip.resize((SHOWN_SIZE * len(trajectory), SHOWN_SIZE), Image.NEAREST)
strip.save(output_dir / "trajectory.png")
times = ", ".join(f"{step * config.feature_t / config.num_steps:.2f}" for step in range(len(trajectory)))
print(f"trajectory: {output_dir / 'trajectory.png'} shows {paths[0].name} at t = {times}")

# 4. Generation: noise at t = 1 integrated to data at t = 0 by the classifier's velocity network.
samples = model.prg.generate(args.num_samples, num_steps=20, generator=torch.Generator().manual_seed(0))
columns = min(8, args.num_samples)
rows = -(-args.num_samples // columns)
sample_images = to_pil_images(samples) + [Image.new("RGB", (32, 32), "white")] * (rows * columns - len(samples))
grid = make_image_grid(sample_images, rows=rows, cols=columns)
grid = grid.resize((grid.width * SHOWN_SIZE // 32, grid.height * SHOWN_SIZE // 32), Image.NEAREST)
grid.save(output_dir / "samples.png")
print(f"samples: {output_dir / 'samples.png'}: {args.num_samples} images from noise, 20 Euler steps, generated by the "
      "classifier's velocity network (finetuned for classification: expect poor samples)")
