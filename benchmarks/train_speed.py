"""Training throughput: the fast path of the training scripts against today's path, side by side in one process.

    python benchmarks/train_speed.py --dataset ../shared/data/cifar10-jpeg --preset small --batch_size 128

Both paths train the same network (the same initial weights) on the same images, with the steps of
examples/pretrain.py and examples/finetune.py (forward, backward, the non-finite loss guard, clipping, AdamW, EMA):

* baseline, the scripts as they were: every image decoded with PIL every epoch and its batch augmented on the
  CPU inside the data loader (`--dataloader_num_workers` workers), then copied to the device; the OT pairing inside
  the step; eager, AdamW, an EMA updated parameter by parameter, the non-finite loss check read back every step;
* fast, the scripts' defaults: the split decoded once onto the device (`--dataloader device`) and augmented there
  (`TrainAugmentation`), the OT pairing one batch ahead (`NoisePairing`); `prg_hub.fast_step` (channels-last
  and fused AdamW on CUDA, off on the CPU; compiled with `--compile`), the non-finite check on the device (fused AdamW's
  `found_inf`), an EMA updated with foreach ops.

On CUDA both run under bf16 autocast. Finetuning goes through `--num_steps` (default 4) Euler steps with exact
gradients (plain backpropagation). Each measurement runs `--warmup_steps` untimed steps (compilation) and then
times `--steps` steps, synchronising the device at both ends; img/s = steps · batch / seconds.

`pretrain_fraction_of_peak` is the fast pretraining step's FLOP/s (FLOPs per step counted by
torch.utils.flop_counter on the eager network, forward and backward) over the FLOP/s of a large matrix product
timed in the same run: bf16 on CUDA; on the CPU the faster of float32 and bf16.

With `--profile_steps N`, N more steps of each fast path run under torch.profiler, and the operations with the
most self time (GPU time on CUDA) go into the JSON as `pretrain_profile_top_ops` / `finetune_profile_top_ops`: the
next bottleneck.

Prints one JSON object and writes it to benchmarks/results/train_speed_<device>.json (or --output).
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import shlex
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from diffusers.training_utils import EMAModel
from torch.utils.flop_counter import FlopCounterMode

from prg_hub import PRGConfig, PRGForFlowMatching, PRGForImageClassification, default_image_processor
from prg_hub.augment import TrainAugmentation
from prg_hub.data import collate_readable, load_image_dataset
from prg_hub.fast_step import COMPILE_MODES, resolve_fast_step, speed_up
from prg_hub.finiteness import NonFiniteLossGuard
from prg_hub.noise_pairing import NoisePairing
from prg_hub.presets import PRESETS, backbone_preset
from prg_hub.training_data import get_train_dataloader

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", required=True, help="Local folder (parquet or imagefolder) or Hub id.")
    parser.add_argument("--max_train_samples", type=int, default=4096, help="Images decoded and trained on.")
    parser.add_argument("--preset", choices=PRESETS, default="small")
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=50, help="Timed steps per measurement.")
    parser.add_argument("--warmup_steps", type=int, default=5, help="Untimed steps first (compilation).")
    parser.add_argument("--num_steps", type=int, default=4, help="Euler steps of the finetuning solver.")
    parser.add_argument("--dataloader_num_workers", type=int, default=0, help="Workers of the baseline's loader.")
    parser.add_argument("--profile_steps", type=int, default=0,
                        help="Profile N more steps of each fast path (torch.profiler): top operations in the JSON.")
    parser.add_argument("--compile", action="store_true", help="Compile the fast path's network (opt-in, as in the "
                        "scripts).")
    parser.add_argument("--compile_mode", choices=COMPILE_MODES, default="default",
                        help="torch.compile mode of the fast path (reduce-overhead: CUDA graphs).")
    parser.add_argument("--output", default=None, help="Default: benchmarks/results/train_speed_<device>.json.")
    args = parser.parse_args(argv)
    args.channels_last = args.fused_optimizer = None  # the scripts' defaults for the device
    return args


def device_name(device: torch.device) -> str:
    """A file-name-safe name of the device: the GPU model on CUDA (e.g. nvidia-h100-80gb-hbm3), else its type."""
    if device.type != "cuda":
        return device.type
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_flops(device: torch.device, size: int = 4096, repeats: int = 10) -> tuple[float, str]:
    """(FLOP/s, dtype) of the fastest square matrix product: bf16 on CUDA; float32 or bf16 on the CPU."""
    dtypes = [torch.bfloat16] if device.type == "cuda" else [torch.float32, torch.bfloat16]
    size = size if device.type == "cuda" else 1024
    best = (0.0, "")
    for dtype in dtypes:
        a, b = torch.randn(size, size, device=device, dtype=dtype), torch.randn(size, size, device=device, dtype=dtype)
        a @ b
        synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        synchronize(device)
        flops = 2 * size**3 * repeats / (time.perf_counter() - start)
        best = max(best, (flops, str(dtype).removeprefix("torch.")))
    return best


def pretrain_flops_per_step(model: PRGForFlowMatching, batch: torch.Tensor) -> int:
    """FLOPs of one forward and backward pass of the flow-matching loss on `batch` (torch.utils.flop_counter)."""
    counter = FlopCounterMode(display=False)
    with counter:
        model(batch).loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def profile_table(profiler: torch.profiler.profile, device: torch.device, rows: int = 15) -> list[dict]:
    """The `rows` operations with the most self time (on the GPU when there is one): name, milliseconds, calls."""
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(profiler.key_averages(), key=lambda event: getattr(event, key), reverse=True)[:rows]
    return [{"name": event.key, "self_ms": round(getattr(event, key) / 1000, 3), "calls": event.count}
            for event in events]


def timed_steps(accelerator, model, optimizer, ema, batches, loss_of, steps: int, warmup_steps: int,
                profile_steps: int = 0) -> tuple[float, list[dict]]:
    """Seconds for `steps` training steps after `warmup_steps` untimed ones, and the `profile_table` of
    `profile_steps` more steps run under torch.profiler (empty for 0); restarts `batches` when it runs out.

    One step as in the scripts: loss, backward, the non-finite loss guard, clipping to 1, AdamW, EMA.
    """
    guard = NonFiniteLossGuard(accelerator, optimizer)
    iterator = iter(batches())
    start = seconds = None
    activities = [torch.profiler.ProfilerActivity.CPU]
    if accelerator.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    profiler = torch.profiler.profile(activities=activities)
    for step in range(warmup_steps + steps + profile_steps):
        if step == warmup_steps:
            synchronize(accelerator.device)
            start = time.perf_counter()
        if step == warmup_steps + steps:
            synchronize(accelerator.device)
            seconds = time.perf_counter() - start
            profiler.start()
        batch = next(iterator, None)
        if batch is None:
            iterator = iter(batches())
            batch = next(iterator)
        with accelerator.autocast():
            loss = loss_of(model, batch)
        accelerator.backward(loss)
        guard.observe(loss)
        if guard.should_step(step + 1):
            accelerator.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(model.parameters())
    guard.raise_if_too_many_skipped(warmup_steps + steps + profile_steps)
    synchronize(accelerator.device)
    if not profile_steps:
        return time.perf_counter() - start, []
    profiler.stop()
    return seconds, profile_table(profiler, accelerator.device)


def augmenting_collate(augmentation: TrainAugmentation):
    """The baseline's collate function: the batch of readable examples, augmented in the data loader (epoch 0)."""
    def collate(items: list[dict | None]) -> dict:
        batch = collate_readable(items)
        return {**batch, "pixel_values": augmentation(batch["images"], batch["index"], 0)}
    return collate


def measure(args, accelerator, image_data, network, fast: bool, loss_of, augmentation: str,
            labels: bool) -> tuple[float, list[dict]]:
    """img/s of `network` (a fresh copy) trained on the fast path or the baseline path, and the profile of
    `--profile_steps` more steps of the fast path."""
    model = copy.deepcopy(network)
    processor = default_image_processor(args.image_size)
    augment = TrainAugmentation(augmentation, processor)
    loader, _ = get_train_dataloader(
        image_data, processor, accelerator.device, dataloader="device" if fast else "stream",
        train_batch_size=args.batch_size, max_train_samples=args.max_train_samples, drop_last=True, labels=labels,
        num_workers=0 if fast else args.dataloader_num_workers,
    )
    if fast:
        speed_up(model.prg, args)
    else:  # augmented in the data loader, on the CPU
        loader.collate_fn = augmenting_collate(augment)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fast and args.fused_optimizer)
    ema = EMAModel(model.parameters(), decay=0.999, foreach=fast)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    ema.to(accelerator.device)
    model.train()
    if fast and not labels:
        pairing = NoisePairing(accelerator.unwrap_model(model).prg.probability_path, seed=0)
        batches = lambda: pairing.batches(augment.batches(loader, epoch=0), epoch=0)  # noqa: E731
    elif fast:
        batches = lambda: augment.batches(loader, epoch=0)  # noqa: E731
    else:
        batches = lambda: loader  # noqa: E731
    seconds, profile = timed_steps(accelerator, model, optimizer, ema, batches, loss_of, args.steps,
                                   args.warmup_steps, args.profile_steps if fast else 0)
    accelerator.free_memory()
    return args.steps * args.batch_size / seconds, profile


def main(argv=None) -> dict:
    args = parse_args(argv)
    accelerator = Accelerator(
        mixed_precision="bf16" if torch.cuda.is_available() else "no",
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=0),
    )
    device = accelerator.device
    resolve_fast_step(args, device)
    image_data = load_image_dataset(args.dataset)
    torch.manual_seed(0)
    backbone = backbone_preset("unet2d", args.preset, args.image_size)
    flow = PRGForFlowMatching(PRGConfig(backbone_type="unet2d", backbone_config=backbone, probability_path="otcfm"))
    classifier = PRGForImageClassification(PRGConfig(
        backbone_type="unet2d", backbone_config=backbone, probability_path="otcfm", num_steps=args.num_steps,
        solver="euler", num_labels=len(image_data.label_names),
    ))

    def fm_loss(model, batch):
        return model(batch["pixel_values"], noise=batch.get("noise")).loss

    def classification_loss(model, batch):
        return model(batch["pixel_values"], labels=batch["labels"]).loss

    result = {}
    for name, network, loss_of, augmentation, labels in (
        ("pretrain", flow, fm_loss, "flip", False),
        ("finetune", classifier, classification_loss, "crop_flip", True),
    ):
        baseline, _ = measure(args, accelerator, image_data, network, False, loss_of, augmentation, labels)
        fast, profile = measure(args, accelerator, image_data, network, True, loss_of, augmentation, labels)
        result.update({f"{name}_img_per_s": fast, f"{name}_baseline_img_per_s": baseline,
                       f"{name}_speedup": fast / baseline})
        if profile:
            result[f"{name}_profile_top_ops"] = profile

    flops = pretrain_flops_per_step(copy.deepcopy(flow).to(device), torch.rand(
        args.batch_size, 3, args.image_size, args.image_size, device=device) * 2 - 1)
    peak, peak_dtype = matmul_peak_flops(device)
    achieved = flops * result["pretrain_img_per_s"] / args.batch_size
    result.update({
        "pretrain_fraction_of_peak": achieved / peak,
        "pretrain_flops_per_step": flops,
        "pretrain_achieved_flop_per_s": achieved,
        "matmul_peak_flop_per_s": peak,
        "matmul_peak_dtype": peak_dtype,
        "fast_path": {"compile": args.compile, "compile_mode": args.compile_mode, "channels_last": args.channels_last,
                      "fused_optimizer": args.fused_optimizer, "dataloader": "device", "ema_foreach": True},
        "batch_size": args.batch_size,
        "preset": args.preset,
        "steps": args.steps,
        "warmup_steps": args.warmup_steps,
        "finetune_num_steps": args.num_steps,
        "torch": torch.__version__,
        "device": device_name(device),
        "command": shlex.join(["python", "benchmarks/train_speed.py", *(sys.argv[1:] if argv is None else argv)]),
    })
    output = Path(args.output) if args.output else RESULTS / f"train_speed_{result['device']}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
