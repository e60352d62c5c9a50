"""Reversed-ODE feature extraction and finetuning speed against the reference approach, in one run.

    python benchmarks/speed.py --backbone unet2d            # on a GPU: the DDPM-CIFAR UNet (35.7M), 20 Euler steps
    python benchmarks/speed.py --backbone dit               # a DiT-S/2 of similar size
    python benchmarks/speed.py --smoke                      # tiny sizes: checks the script itself on a CPU

Measured in the same process, on the same weights:
* extract_reference: torchdiffeq `odeint(method="euler")`, eager, fp32 — how the reference implementation runs.
* extract: `PRGModel` with the levers chosen on the command line (bf16 weights, channels_last, torch.compile of
  the velocity network), fixed-grid Euler. FLOPs come from `torch.utils.flop_counter`; the peak is a large bf16
  matmul timed in the same run, so `extract_fraction_of_peak` = achieved FLOP/s / matmul FLOP/s.
* finetune_adjoint: `torchdiffeq.odeint_adjoint` (Euler), eager fp32, forward + backward of the PRG loss.
* finetune: `PRGForImageClassification` with per-step checkpointing, bf16 autocast and the chosen levers.
* finetune_grad_rel_err: ‖g − g_exact‖ / ‖g_exact‖ of the levers' fp32 gradient against plain backprop on a
  small case.
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
RESULT_KEYS = (
    "extract_img_per_s", "extract_reference_img_per_s", "extract_speedup", "extract_fraction_of_peak",
    "finetune_img_per_s", "finetune_adjoint_img_per_s", "finetune_speedup", "finetune_grad_rel_err",
    "finetune_peak_gib", "finetune_adjoint_peak_gib", "device", "command",
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="unet2d", choices=["unet2d", "dit"])
    parser.add_argument("--num_steps", type=int, default=20)
    parser.add_argument("--extract_batch_size", type=int, default=256)
    parser.add_argument("--finetune_batch_size", type=int, default=128)
    parser.add_argument("--no_compile", action="store_true", help="leave out torch.compile")
    parser.add_argument("--no_channels_last", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="tiny network and batches, to check the script")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.smoke:
        args.extract_batch_size, args.finetune_batch_size, args.num_steps, args.repeats = 4, 4, 2, 1
        backbone_config = backbone_preset(args.backbone, "tiny", image_size=32)
    elif args.backbone == "unet2d":
        backbone_config = DDPM_CIFAR_UNET
    else:
        backbone_config = backbone_preset("dit", "paper", image_size=32)
    torch.manual_seed(0)
    config = PRGConfig(backbone_type=args.backbone, backbone_config=dict(backbone_config), num_steps=args.num_steps,
                       num_labels=10)
    model = PRGForImageClassification(config).to(device)
    memory_format = torch.preserve_format if args.no_channels_last else torch.channels_last
    result = {"parameters_m": round(model.num_parameters() / 1e6, 2), "num_steps": args.num_steps}

    # Feature extraction.
    images = torch.rand(args.extract_batch_size, 3, 32, 32, device=device) * 2 - 1
    model.eval()
    with torch.inference_mode():
        torchdiffeq_features(model, images, adjoint=False)
        reference = median_seconds(lambda: torchdiffeq_features(model, images, adjoint=False), device, args.repeats)
    fast = PRGForImageClassification(config).to(device, dtype=torch.bfloat16, memory_format=memory_format).eval()
    fast.load_state_dict(model.state_dict())
    if not args.no_compile:
        fast.prg.velocity.compile()
    fast_images = images.to(torch.bfloat16).contiguous(memory_format=memory_format)
    with torch.inference_mode():
        torch.testing.assert_close(fast.prg(fast_images).last_hidden_state.float(),
                                   torchdiffeq_features(model, images, adjoint=False), rtol=0.1, atol=0.1)
        extract = median_seconds(lambda: fast.prg(fast_images), device, args.repeats)
        with FlopCounterMode(display=False) as counter:
            fast.prg(fast_images)
    peak_rate = matmul_flop_rate(device, torch.bfloat16, 256 if args.smoke else 8192)
    result.update(
        extract_img_per_s=round(args.extract_batch_size / extract, 1),
        extract_reference_img_per_s=round(args.extract_batch_size / reference, 1),
        extract_speedup=round(reference / extract, 2),
        extract_fraction_of_peak=round(counter.get_total_flops() / extract / peak_rate, 3),
        peak_tflop_per_s=round(peak_rate / 1e12, 1),
    )

    # Finetuning step: forward + backward of the classification loss through the solver.
    model.train()
    batch = torch.rand(args.finetune_batch_size, 3, 32, 32, device=device) * 2 - 1
    labels = torch.randint(0, 10, (args.finetune_batch_size,), device=device)

    def adjoint_step():
        model.zero_grad(set_to_none=True)
        reference_loss(model, batch, labels).backward()

    fast.float().train()
    fast.config.gradient_checkpointing = True

    def fast_step():
        fast.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = fast(batch.contiguous(memory_format=memory_format), labels=labels).loss
        loss.backward()

    adjoint_step(), fast_step()
    result.update(
        finetune_adjoint_img_per_s=round(args.finetune_batch_size / median_seconds(adjoint_step, device, args.repeats), 1),
        finetune_img_per_s=round(args.finetune_batch_size / median_seconds(fast_step, device, args.repeats), 1),
        finetune_adjoint_peak_gib=peak_gib(adjoint_step, device),
        finetune_peak_gib=peak_gib(fast_step, device),
    )
    result["finetune_speedup"] = round(result["finetune_img_per_s"] / result["finetune_adjoint_img_per_s"], 2)

    # Exactness of the levers' gradients (fp32, small case) against plain backprop.
    small_batch, small_labels = batch[:8].float(), labels[:8]
    model.config.gradient_checkpointing = False
    model.zero_grad(set_to_none=True)
    model(small_batch, labels=small_labels).loss.backward()
    exact = gradient_vector(model)
    fast.config.gradient_checkpointing = True
    fast.load_state_dict(model.state_dict())
    fast.zero_grad(set_to_none=True)
    fast(small_batch.contiguous(memory_format=memory_format), labels=small_labels).loss.backward()
    result["finetune_grad_rel_err"] = float(((gradient_vector(fast) - exact).norm() / exact.norm()).item())

    result["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result["command"] = "python " + " ".join(sys.argv)
    missing = [key for key in RESULT_KEYS if key not in result]
    assert not missing, missing
    print(json.dumps(result))


if __name__ == "__main__":
    main()
