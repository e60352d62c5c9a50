"""The fast-step options: defaults by device, and the same training arithmetic with them as without."""

import argparse
import copy

import pytest
import torch
from diffusers.training_utils import EMAModel

from prg_hub import PRGConfig, PRGForFlowMatching
from prg_hub.fast_step import add_fast_step_arguments, resolve_fast_step, speed_up
from prg_hub.presets import backbone_preset


def _args(argv):
    parser = argparse.ArgumentParser()
    add_fast_step_arguments(parser)
    return parser.parse_args(argv)


def test_options_default_to_on_for_cuda_compile_to_off_and_explicit_choices_stand():
    for device, expected in (("cuda", True), ("cpu", False)):
        args = _args([])
        resolve_fast_step(args, torch.device(device))
        assert (args.compile, args.channels_last, args.fused_optimizer) == (False, expected, expected)
    args = _args(["--compile", "--no-fused_optimizer"])
    resolve_fast_step(args, torch.device("cpu"))
    assert (args.compile, args.channels_last, args.fused_optimizer) == (True, False, False)
    args = _args(["--compile", "--no-channels_last"])
    resolve_fast_step(args, torch.device("cuda"))
    assert (args.compile, args.channels_last, args.fused_optimizer) == (True, False, True)
    with pytest.raises(ValueError, match="--compile with --channels_last gives wrong gradients on the CPU"):
        resolve_fast_step(_args(["--compile", "--channels_last"]), torch.device("cpu"))


def test_compiled_network_has_the_eager_gradients_on_the_cpu():
    """`--compile` on the CPU: the same loss gradient for every weight as eager code (layout optimisation off)."""
    torch.manual_seed(0)
    config = PRGConfig(backbone_config=backbone_preset("unet2d", "tiny", 16))
    eager = PRGForFlowMatching(config).eval()  # no dropout: the same arithmetic in both
    compiled = copy.deepcopy(eager)
    args = _args(["--compile"])
    resolve_fast_step(args, torch.device("cpu"))
    speed_up(compiled.prg, args)
    x, t = torch.rand(4, 3, 16, 16) * 2 - 1, torch.rand(4)
    gradients = []
    for model in (eager, compiled):
        model.prg.velocity(x, t).square().mean().backward()
        gradients.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert ((gradients[1] - gradients[0]).norm() / gradients[0].norm()) < 1e-4


def _train(channels_last: bool, fused: bool, steps: int = 3):
    """A few AdamW steps with EMA on a tiny flow; returns (state dict, EMA weights, losses)."""
    torch.manual_seed(0)
    model = PRGForFlowMatching(PRGConfig())
    speed_up(model.prg, argparse.Namespace(compile=False, channels_last=channels_last, compile_mode="default"))
    ema = EMAModel(model.parameters(), decay=0.9, foreach=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=fused)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    losses = []
    for step in range(steps):
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(step))
        loss = model(x, generator=torch.Generator().manual_seed(100 + step), noise=noise).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        ema.step(model.parameters())
        losses.append(loss.item())
    return model, ema, losses


def test_channels_last_and_fused_adamw_train_like_the_plain_step():
    plain_model, plain_ema, plain_losses = _train(False, False)
    fast_model, fast_ema, fast_losses = _train(True, True)
    conv = next(p for p in fast_model.parameters() if p.dim() == 4)
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert fast_losses == pytest.approx(plain_losses, rel=1e-4)
    # Only rounding differs (channels-last convolutions sum in another order), and Adam's g/√v amplifies it for
    # near-zero gradients; 3 steps at lr 1e-3 move a weight by up to 3e-3, so 2e-4 is far below a real difference.
    for plain, fast in zip(plain_model.state_dict().values(), fast_model.state_dict().values()):
        torch.testing.assert_close(fast, plain, rtol=0, atol=2e-4)
    for plain, fast in zip(plain_ema.shadow_params, fast_ema.shadow_params):
        torch.testing.assert_close(fast, plain, rtol=0, atol=2e-4)
    assert plain_losses[0] != plain_losses[-1]  # the steps did train


def test_compile_keeps_the_state_dict_keys_and_the_velocity():
    torch.manual_seed(0)
    model = PRGForFlowMatching(PRGConfig())
    keys = list(model.state_dict())
    x, t = torch.rand(2, 3, 32, 32), torch.rand(2)
    eager = model.prg.velocity(x, t)
    compile_only = argparse.Namespace(compile=True, compile_mode="default", channels_last=False)
    speed_up(model.prg, compile_only)
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(model.prg.velocity(x, t), eager, rtol=1e-4, atol=1e-4)
