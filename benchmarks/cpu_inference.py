"""CPU inference: latency of classifying one 32×32 image, and images/s at batch 64, through the reversed ODE.

    python benchmarks/cpu_inference.py [--backbone unet2d] [--preset small] [--compare benchmarks/results/cpu_inference.json]
    python benchmarks/cpu_inference.py --model prg_hub/pretrained/prg-otcfm-cifar10-small   # the shipped model

The model is `PRGForImageClassification` with the `small` preset (≤ 10M parameters) and 20 Euler steps, or, with
`--model`, a saved checkpoint with its own solver and steps; fp32, in a warm process (after warm-up runs). Two
baselines are measured in the same run:
* the reference implementation's approach, `torchdiffeq.odeint` with method "euler" on the same grid and the same
  weights (the logits are checked to agree), giving `speedup_*`;
* the CPU's fp32 matrix-multiply rate (a 1024³ matmul), giving `fraction_of_peak` = achieved FLOP/s at batch 64
  (FLOPs counted by `torch.utils.flop_counter`) over that rate.

Prints one JSON object. With `--compare`, it also reports the change of each ratio against a stored result and
exits with status 1 when one fell by more than `--max_regression` (default 20%): ratios, not seconds, so the
check holds across machines of one kind.
"""

import argparse
import json
import statistics
import sys
import time

import torch
import torchdiffeq
from torch.utils.flop_counter import FlopCounterMode

from prg_hub import PRGConfig, PRGForImageClassification
from prg_hub.presets import backbone_preset


def median_seconds(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_flop_rate(size: int = 1024, repeats: int = 10) -> float:
    """FLOP/s of an fp32 (size × size) @ (size × size) product on this CPU."""
    a, b = torch.rand(size, size), torch.rand(size, size)
    a @ b
    return 2 * size**3 / median_seconds(lambda: a @ b, repeats)


def reference_logits(model: PRGForImageClassification, pixel_values: torch.Tensor) -> torch.Tensor:
    """The reference approach: torchdiffeq Euler over the same grid, f(t, x) = v(x, t)."""
    config = model.config
    grid = torch.linspace(0.0, config.feature_t, config.num_steps + 1)
    velocity = model.prg.velocity

    def field(t, x):
        return velocity(x, t.expand(x.shape[0]))

    features = torchdiffeq.odeint(field, pixel_values, grid, method="euler")[-1]
    return model.head(model.prg.pool(features).flatten(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="unet2d", choices=["unet2d", "dit"])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--model", help="a saved PRGForImageClassification (folder or Hub id) instead of a preset")
    parser.add_argument("--num_steps", type=int, help="Euler steps (default: 20, or the --model's own)")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compare", help="a stored result of this script to compare the speedups against")
    parser.add_argument("--max_regression", type=float, default=0.2)
    args = parser.parse_args()

    torch.manual_seed(0)
    if args.model is not None:
        overrides = {} if args.num_steps is None else {"num_steps": args.num_steps}
        model = PRGForImageClassification.from_pretrained(args.model, dtype=torch.float32, **overrides).eval()
        if model.config.solver != "euler":
            parser.error(f"--model must use the euler solver (the baseline is torchdiffeq's), not {model.config.solver}")
    else:
        config = PRGConfig(
            backbone_type=args.backbone,
            backbone_config=backbone_preset(args.backbone, args.preset, image_size=32),
            num_steps=20 if args.num_steps is None else args.num_steps,
            solver="euler",
            num_labels=10,
        )
        model = PRGForImageClassification(config).eval()
    size = model.config.image_size
    one_image = torch.rand(1, 3, size, size) * 2 - 1
    batch = torch.rand(args.batch_size, 3, size, size) * 2 - 1

    with torch.inference_mode():
        torch.testing.assert_close(model(one_image).logits, reference_logits(model, one_image), rtol=1e-4, atol=1e-5)
        for _ in range(2):  # warm-up: allocator, kernels, thread pool
            model(one_image), reference_logits(model, one_image), model(batch)
        latency = median_seconds(lambda: model(one_image), args.repeats * 4)
        reference_latency = median_seconds(lambda: reference_logits(model, one_image), args.repeats * 4)
        batch_seconds = median_seconds(lambda: model(batch), args.repeats)
        reference_batch_seconds = median_seconds(lambda: reference_logits(model, batch), args.repeats)
        with FlopCounterMode(display=False) as flop_counter:
            model(batch)
    peak = matmul_flop_rate()
    achieved = flop_counter.get_total_flops() / batch_seconds

    result = {
        "device": "cpu",
        "threads": torch.get_num_threads(),
        **({"model": args.model} if args.model else {"backbone": args.backbone, "preset": args.preset}),
        "parameters_m": round(model.num_parameters() / 1e6, 2),
        "num_steps": model.config.num_steps,
        "latency_ms": round(latency * 1e3, 2),
        "reference_latency_ms": round(reference_latency * 1e3, 2),
        "speedup_latency": round(reference_latency / latency, 3),
        "batch_size": args.batch_size,
        "img_per_s": round(args.batch_size / batch_seconds, 2),
        "reference_img_per_s": round(args.batch_size / reference_batch_seconds, 2),
        "speedup_throughput": round(reference_batch_seconds / batch_seconds, 3),
        "gflop_per_image": round(flop_counter.get_total_flops() / args.batch_size / 1e9, 2),
        "achieved_gflop_per_s": round(achieved / 1e9, 1),
        "matmul_gflop_per_s": round(peak / 1e9, 1),
        "fraction_of_peak": round(achieved / peak, 3),
        "command": "python " + " ".join(sys.argv),
    }
    regressed = []
    if args.compare:
        with open(args.compare) as stored_file:
            stored = json.load(stored_file)
        for key in ("speedup_latency", "speedup_throughput", "fraction_of_peak"):
            change = result[key] / stored[key] - 1
            result[f"{key}_change_vs_stored"] = round(change, 3)
            if change < -args.max_regression:
                regressed.append(key)
    print(json.dumps(result))
    if regressed:
        sys.exit(f"regression: {regressed} fell by more than {args.max_regression:.0%} against {args.compare}")


if __name__ == "__main__":
    main()
