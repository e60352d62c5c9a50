"""Quickstart: build a small PRG classifier, save it as a checkpoint, and use it through transformers' pipelines.

    python examples/quickstart.py [--output_dir prg-quickstart]

Runs on a CPU in seconds. The model is untrained, so its predictions are arbitrary: the point is the API.
"""

import argparse

import numpy as np
import torch
from PIL import Image
from transformers import pipeline

from prg_hub import PRGConfig, PRGForImageClassification, PRGImageProcessor

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--output_dir", default="prg-quickstart")
args = parser.parse_args()

# 1. A PRG classifier: a small diffusers UNet2D velocity field, OT-CFM path, 10 Euler steps to t = 1, CIFAR labels.
labels = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
config = PRGConfig(backbone_type="unet2d", path="otcfm", num_steps=10, id2label=dict(enumerate(labels)))
torch.manual_seed(0)
model = PRGForImageClassification(config)
print(f"built {type(model).__name__} with {model.num_parameters() / 1e6:.2f}M parameters")

# 2. Save it the Hugging Face way: config.json + model.safetensors + preprocessor_config.json.
model.save_pretrained(args.output_dir)
PRGImageProcessor().save_pretrained(args.output_dir)

# 3. Use it through the standard pipelines, on images of any size and mode.
images = [
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)),
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32), dtype=np.uint8)),
]
extractor = pipeline("image-feature-extraction", model=args.output_dir)
features = extractor(images, pool=True, return_tensors=True)
print(f"{type(extractor).__name__}: pooled PRG features of shape {tuple(features[0].shape)} per image")
half_way = extractor(images[0], feature_t=0.5, num_steps=5, return_tensors=True)
print(f"x_t at feature_t=0.5 has shape {tuple(half_way.shape)}")

classifier = pipeline("image-classification", model=args.output_dir)
prediction = classifier(images[0], top_k=1)[0]
print(f"quickstart: saved {args.output_dir}, top-1 label of the first image: {prediction['label']} "
      f"(p={prediction['score']:.3f}, untrained model)")
