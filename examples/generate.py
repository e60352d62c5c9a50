"""Sample images from a pretrained PRG flow: noise at t = 1 integrated to data at t = 0.

    accelerate launch examples/generate.py --model_name_or_path runs/otcfm-c10 --num_images 64 \
        --num_steps 50 --output samples.png          # one PNG grid
    accelerate launch examples/generate.py ... --output samples/                  # a folder, one PNG per image

Each process draws its share of the images from its own generator, seeded with seed + process index, so the
images depend on the seed and on the number of processes. The main process gathers them and writes the output.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from prg_hub import SOLVERS, PRGModel
from prg_hub.image_grid import save_image_grid, to_pil_images


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Sample images from a pretrained PRG flow.")
    parser.add_argument("--model_name_or_path", required=True, help="Pretrained flow: local folder or Hub id.")
    parser.add_argument("--num_images", type=int, default=16)
    parser.add_argument("--num_steps", type=int, default=50, help="Solver steps from t = 1 to t = 0.")
    parser.add_argument("--solver", choices=SOLVERS, default="euler")
    parser.add_argument("--batch_size", type=int, default=64, help="Per-process batch size.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", required=True, help="A .png path for one grid, or a folder for one PNG per image.")
    args = parser.parse_args(argv)
    if args.num_images < 1 or args.batch_size < 1:
        parser.error("--num_images and --batch_size must be >= 1.")
    return args


def main(argv=None):
    args = parse_args(argv)
    accelerator = Accelerator()
    model = PRGModel.from_pretrained(args.model_name_or_path).to(accelerator.device).eval()
    generator = torch.Generator(device=accelerator.device).manual_seed(args.seed + accelerator.process_index)

    with accelerator.split_between_processes(list(range(args.num_images))) as my_indices:
        images = []
        for start in tqdm(range(0, len(my_indices), args.batch_size), desc="generate",
                          disable=not accelerator.is_local_main_process):
            count = min(args.batch_size, len(my_indices) - start)
            batch = model.generate(count, num_steps=args.num_steps, generator=generator, solver=args.solver)
            images.append(batch.cpu())
    images = torch.cat(gather_object([torch.cat(images)] if images else []))

    if accelerator.is_main_process:
        output = Path(args.output)
        if output.suffix.lower() == ".png":
            save_image_grid(images, output)
        else:
            output.mkdir(parents=True, exist_ok=True)
            for index, image in enumerate(to_pil_images(images)):
                image.save(output / f"{index:05d}.png")
        print(
            f"generate: images={len(images)} steps={args.num_steps} solver={args.solver} "
            f"pixel_mean={images.mean().item():.4f} pixel_std={images.std().item():.4f} output={output}"
        )
    accelerator.wait_for_everyone()  # every process tears the process group down together
    accelerator.end_training()


if __name__ == "__main__":
    main()
