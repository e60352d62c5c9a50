"""Reversed-ODE feature extraction and finetuning speed against the reference approach, in one run.

    python benchmarks/speed.py --backbone unet2d            # on a GPU: the DDPM-CIFAR UNet (35.7M), 20 Euler steps
    python benchmarks/speed.py --backbone dit               # a DiT-S/2 of similar size
    python benchmarks/speed.py --smoke                      # tiny sizes: checks the script itself on a CPU

The fast paths use the package's own speed options, as a user of `from_pretrained` or the pipelines gets them:
`PRGPreTrainedModel.enable_fast_inference(dtype=..., compile=..., channels_last=...)`, with `torch.compile` of the
velocity network in one graph (fullgraph: a graph break or a recompilation past dynamo's limit stops the run, for
the DiT too; nothing falls back to eager) unless `--no_compile`, and channels-last weights on CUDA unless
`--no_channels_last` (never on the CPU, where a compiled network with them has wrong gradients). Measured in the
same process, on the same weights:
* extract_reference: torchdiffeq `odeint(method="euler")`, eager, fp32 — how the reference implementation runs —
  at the first of `--extract_batch_sizes`.
* extract: `PRGModel` after `enable_fast_inference(dtype=torch.bfloat16, ...)` (bf16 network, float32 ODE state),
  fixed-grid Euler, at each of `--extract_batch_sizes` (default 256 and 1024): `extract_img_per_s_by_batch`
  {batch: img/s}; `extract_img_per_s`, `extract_speedup` and `extract_fraction_of_peak` are those of the first
  batch size. Each batch size gets its own static graph. FLOPs come from `torch.utils.flop_counter` on the eager
  network (the same operations); the peak is a large bf16 matmul timed in the same run, so
  `extract_fraction_of_peak` = achieved FLOP/s / matmul FLOP/s.
* finetune_adjoint: `torchdiffeq.odeint_adjoint` (Euler), eager fp32, forward + backward of the PRG loss.
* finetune: `PRGForImageClassification` after `enable_fast_inference(dtype=torch.float32, ...)` (float32 weights
  under bf16 autocast), with per-step checkpointing.
* finetune_grad_rel_err: ‖g − g_exact‖ / ‖g_exact‖ of the finetune model's fp32 gradient (checkpointing, compile,
  channels-last, no autocast) against plain backprop on a small case, without dropout (eval mode).
Prints one JSON object with the keys listed in `RESULT_KEYS`.
"""

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F
import torchdiffeq
from torch.utils.flop_counter import FlopCounterMode

from prg_hub import PRGConfig, PRGForImageClassification
from prg_hub.presets import backbone_preset

DDPM_CIFAR_UNET = {  # diffusers' google/ddpm-cifar10-32 network: 35.7M parameters
    "sample_size": 32, "in_channels": 3, "out_channels": 3, "layers_per_block": 2,
    "block_out_channels": [128, 256, 256, 256],
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}
# Calls before timing a batch size: the first compiles its graph, the next lets kernels and caches settle.
WARMUP_CALLS = 2
RESULT_KEYS = (
    "extract_img_per_s", "extract_img_per_s_by_batch", "extract_reference_img_per_s", "extract_speedup",
    "extract_fraction_of_peak", "finetune_img_per_s", "finetune_adjoint_img_per_s", "finetune_speedup",
    "finetune_grad_rel_err", "finetune_peak_gib", "finetune_adjoint_peak_gib", "device", "command",
)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(function, device, repeats):
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        function()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_gib(function, device):
    if device.type != "cuda":
        return None
    torch.cuda.reset_peak_memory_stats(device)
    function()
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2)


def matmul_flop_rate(device, dtype, size):
    a, b = torch.rand(size, size, device=device, dtype=dtype), torch.rand(size, size, device=device, dtype=dtype)
    return 2 * size**3 / median_seconds(lambda: a @ b, device, 10)


def random_images(batch_size, device):
    return torch.rand(batch_size, 3, 32, 32, device=device) * 2 - 1


def torchdiffeq_features(model, pixel_values, adjoint):
    """The reference approach: torchdiffeq over the uniform grid, f(t, x) = v(x, t)."""
    velocity = model.prg.velocity
    grid = torch.linspace(0.0, model.config.feature_t, model.config.num_steps + 1, device=pixel_values.device)

    class Field(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.velocity = velocity

        def forward(self, t, x):
            return self.velocity(x, t.expand(x.shape[0]))

    if adjoint:
        return torchdiffeq.odeint_adjoint(Field(), pixel_values, grid, method="euler",
                                          adjoint_params=tuple(velocity.parameters()))[-1]
    return torchdiffeq.odeint(Field(), pixel_values, grid, method="euler")[-1]


def reference_loss(model, pixel_values, labels):
    features = torchdiffeq_features(model, pixel_values, adjoint=True)
    return F.cross_entropy(model.head(model.prg.pool(features).flatten(1)), labels)


def gradient_vector(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def fast_model(reference, dtype, args):
    """A copy of `reference` with the package's speed options: `dtype` weights and the command line's levers."""
    model = PRGForImageClassification(reference.config).to(reference.device)
    model.load_state_dict(reference.state_dict())
    return model.enable_fast_inference(dtype=dtype, compile=not args.no_compile,
                                       channels_last=args.channels_last)


def measure_extraction(model, args, device):
    """The extraction keys of the result: the bf16 fast model at each batch size against torchdiffeq at the first."""
    model.eval()
    fast = fast_model(model, torch.bfloat16, args).eval()
    first_batch_size = args.extract_batch_sizes[0]
    with torch.inference_mode():
        images = random_images(first_batch_size, device)
        reference_features = torchdiffeq_features(model, images, adjoint=False)
        reference = median_seconds(lambda: torchdiffeq_features(model, images, adjoint=False), device, args.repeats)
        torch.testing.assert_close(fast.prg(images).last_hidden_state, reference_features, rtol=0.1, atol=0.1)
        with FlopCounterMode(display=False) as counter:
            model.prg(images)
        seconds_by_batch = {}
        for batch_size in args.extract_batch_sizes:
            batch = random_images(batch_size, device)
            for _ in range(WARMUP_CALLS):
                fast.prg(batch)
            seconds_by_batch[batch_size] = median_seconds(lambda: fast.prg(batch), device, args.repeats)
    extract = seconds_by_batch[first_batch_size]
    img_per_s_by_batch = {str(size): round(size / seconds, 1) for size, seconds in seconds_by_batch.items()}
    peak_rate = matmul_flop_rate(device, torch.bfloat16, 256 if args.smoke else 8192)
    return {
        "extract_img_per_s": round(first_batch_size / extract, 1),
        "extract_img_per_s_by_batch": img_per_s_by_batch,
        "extract_reference_img_per_s": round(first_batch_size / reference, 1),
        "extract_speedup": round(reference / extract, 2),
        "extract_fraction_of_peak": round(counter.get_total_flops() / extract / peak_rate, 3),
        "peak_tflop_per_s": round(peak_rate / 1e12, 1),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="unet2d", choices=["unet2d", "dit"])
    parser.add_argument("--num_steps", type=int, default=20)
    parser.add_argument("--extract_batch_sizes", type=int, nargs="+", default=[256, 1024],
                        help="batch sizes of the extraction curve; the first is also the reference's")
    parser.add_argument("--finetune_batch_size", type=int, default=128)
    parser.add_argument("--no_compile", action="store_true", help="leave out torch.compile")
    parser.add_argument("--no_channels_last", action="store_true",
                        help="leave the weights contiguous (channels-last is used on CUDA only: with compile it gives "
                             "wrong gradients on the CPU)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="tiny network and batches, to check the script")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.channels_last = not args.no_channels_last and device.type == "cuda"
    if args.smoke:
        args.extract_batch_sizes, args.finetune_batch_size, args.num_steps, args.repeats = [4, 8], 4, 2, 1
        backbone_config = backbone_preset(args.backbone, "tiny", image_size=32)
    elif args.backbone == "unet2d":
        backbone_config = DDPM_CIFAR_UNET
    else:
        backbone_config = backbone_preset("dit", "paper", image_size=32)
    # One static graph per batch size, as a process serving one batch size compiles it, rather than a
    # dynamic-shape graph from the second batch size on. The velocity network's code is compiled for each batch
    # size, the training step (grad mode, autocast, inputs requiring grad) and the gradient check: more graphs than
    # dynamo's default limit of 8 allows once several batch sizes are measured, and with fullgraph hitting the
    # limit is an error.
    torch._dynamo.config.automatic_dynamic_shapes = False
    torch._dynamo.config.recompile_limit = 8 + len(args.extract_batch_sizes)
    torch.manual_seed(0)
    config = PRGConfig(backbone_type=args.backbone, backbone_config=dict(backbone_config), num_steps=args.num_steps,
                       num_labels=10)
    model = PRGForImageClassification(config).to(device)
    result = {"parameters_m": round(model.num_parameters() / 1e6, 2), "num_steps": args.num_steps,
              "compile": not args.no_compile, "channels_last": args.channels_last}

    result.update(measure_extraction(model, args, device))

    # Finetuning step: forward + backward of the classification loss through the solver.
    model.train()
    batch = random_images(args.finetune_batch_size, device)
    labels = torch.randint(0, 10, (args.finetune_batch_size,), device=device)

    def adjoint_step():
        model.zero_grad(set_to_none=True)
        reference_loss(model, batch, labels).backward()

    finetune = fast_model(model, torch.float32, args).train()
    finetune.activation_checkpointing_enable()  # per solver step

    def fast_step():
        finetune.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = finetune(batch, labels=labels).loss
        loss.backward()

    adjoint_step()
    fast_step()
    batch_size = args.finetune_batch_size
    result.update(
        finetune_adjoint_img_per_s=round(batch_size / median_seconds(adjoint_step, device, args.repeats), 1),
        finetune_img_per_s=round(batch_size / median_seconds(fast_step, device, args.repeats), 1),
        finetune_adjoint_peak_gib=peak_gib(adjoint_step, device),
        finetune_peak_gib=peak_gib(fast_step, device),
    )
    result["finetune_speedup"] = round(result["finetune_img_per_s"] / result["finetune_adjoint_img_per_s"], 2)

    # Exactness of the finetune model's gradients (fp32, small case) against plain backprop, in eval mode: dropout
    # (the DiT's) draws different masks in eager and compiled code.
    model.eval()
    finetune.eval()
    small_batch, small_labels = batch[:8], labels[:8]
    model.zero_grad(set_to_none=True)
    model(small_batch, labels=small_labels).loss.backward()
    exact = gradient_vector(model)
    finetune.zero_grad(set_to_none=True)
    finetune(small_batch, labels=small_labels).loss.backward()
    result["finetune_grad_rel_err"] = float(((gradient_vector(finetune) - exact).norm() / exact.norm()).item())

    result["compiled_graphs"] = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    if not args.no_compile and not result["compiled_graphs"]:
        raise RuntimeError("torch.compile was asked for but dynamo compiled no graph")
    result["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result["command"] = "python " + " ".join(sys.argv)
    missing = [key for key in RESULT_KEYS if key not in result]
    assert not missing, missing
    print(json.dumps(result))


if __name__ == "__main__":
    main()
