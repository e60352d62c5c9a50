"""The settings with which the paper recipes (examples/configs) match the released PRG code: the network's dropout,
the finetuning schedule's warm-up start and floor, and the time fed to the network's sinusoidal embedding."""

import math

import pytest
import torch
from diffusers.optimization import get_scheduler
from torch import nn

from prg_hub import PRGConfig, PRGModel
from prg_hub.lr_schedules import warmup_cosine_schedule
from prg_hub.presets import backbone_preset


@pytest.mark.parametrize("backbone", ["unet2d", "dit"])
def test_dropout_override_reaches_the_built_network(backbone):
    config = PRGConfig(backbone_type=backbone, backbone_config=backbone_preset(backbone, "tiny", 16, dropout=0.3))
    model = PRGModel(config)
    network = model.velocity.network
    assert network.config.dropout == 0.3
    dropouts = [module.p for module in network.modules() if isinstance(module, nn.Dropout)]
    assert dropouts and all(p == 0.3 for p in dropouts)


@pytest.mark.parametrize("backbone", ["unet2d", "dit"])
def test_dropout_none_keeps_the_preset_value_and_zero_gives_the_released_network(backbone):
    assert backbone_preset(backbone, "paper", 32)["dropout"] == 0.1
    assert backbone_preset(backbone, "paper", 32, dropout=None) == backbone_preset(backbone, "paper", 32)
    released = backbone_preset(backbone, "paper", 32, dropout=0.0)
    assert released == {**backbone_preset(backbone, "paper", 32), "dropout": 0.0}  # nothing else changes


def test_dropout_outside_zero_one_is_an_error():
    for dropout in (-0.1, 1.0):
        with pytest.raises(ValueError, match=r"dropout is a probability in \[0, 1\)"):
            backbone_preset("unet2d", "small", 32, dropout=dropout)


def learning_rates(scheduler, num_steps):
    """The learning rate of steps 0, 1, …, num_steps (one scheduler step per optimizer step)."""
    rates = []
    for _ in range(num_steps + 1):
        rates.append(scheduler.get_last_lr()[0])
        scheduler.optimizer.step()
        scheduler.step()
    return rates


def optimizer(learning_rate):
    return torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=learning_rate)


@pytest.mark.parametrize(("num_warmup_steps", "num_training_steps"), [(3, 10), (0, 7), (5, 5), (4, 13)])
def test_schedule_with_zero_ratios_is_diffusers_cosine_at_every_step(num_warmup_steps, num_training_steps):
    ours = warmup_cosine_schedule(optimizer(2e-4), num_warmup_steps, num_training_steps)
    reference = get_scheduler(
        "cosine", optimizer(2e-4), num_warmup_steps=num_warmup_steps, num_training_steps=num_training_steps
    )
    expected = learning_rates(reference, num_training_steps)
    assert learning_rates(ours, num_training_steps) == pytest.approx(expected, rel=1e-12, abs=1e-18)


def test_schedule_with_the_released_ratios_gives_the_released_learning_rates():
    """The released schedule for a peak learning rate of 1.25e-4 · s: warm-up from 1.25e-7 · s over W steps, then
    a cosine to 1.25e-6 · s at step T (timm's per-step CosineLRScheduler with the warm-up before the cosine)."""
    peak, warmup, total = 1.25e-4 * 2, 4, 12
    rates = learning_rates(warmup_cosine_schedule(optimizer(peak), warmup, total, 1e-3, 1e-2), total)
    warmup_lr, min_lr = 1.25e-7 * 2, 1.25e-6 * 2
    released = [warmup_lr + (peak - warmup_lr) * step / warmup for step in range(warmup)]
    released += [min_lr + 0.5 * (peak - min_lr) * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))
                 for step in range(warmup, total + 1)]
    assert rates == pytest.approx(released, rel=1e-12)
    assert (rates[0], rates[warmup], rates[total]) == pytest.approx((warmup_lr, peak, min_lr), rel=1e-12)


def test_schedule_ratios_outside_zero_one_are_errors():
    with pytest.raises(ValueError, match=r"min_lr_ratio .* in \[0, 1\]; got 1.5"):
        warmup_cosine_schedule(optimizer(1e-4), 2, 10, min_lr_ratio=1.5)
    with pytest.raises(ValueError, match=r"warmup_start_lr_ratio .* in \[0, 1\]; got -0.1"):
        warmup_cosine_schedule(optimizer(1e-4), 2, 10, warmup_start_lr_ratio=-0.1)


def improved_diffusion_timestep_embedding(timesteps, dim, max_period=10000):
    """improved diffusion's sinusoidal embedding, which the released network applies to the raw time in [0, 1]:
    [cos(t·f_0), …, cos(t·f_{half-1}), sin(t·f_0), …, sin(t·f_{half-1})], f_i = exp(−ln(max_period)·i/half)."""
    half = dim // 2
    frequencies = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64) / half)
    arguments = timesteps.double()[:, None] * frequencies[None]
    return torch.cat([torch.cos(arguments), torch.sin(arguments)], dim=-1)


def test_time_scale_one_gives_the_released_time_embedding():
    """With time_scale = 1 the paper UNet (diffusers' Timesteps, flip_sin_to_cos=True, freq_shift=0) embeds the raw
    t ∈ [0, 1] exactly as the released improved-diffusion UNet does; with the default 1000 it embeds 1000·t."""
    seen = {}
    for time_scale in (1.0, 1000.0):
        config = PRGConfig(backbone_config=backbone_preset("unet2d", "paper", 32), time_scale=time_scale)
        velocity = PRGModel(config).velocity
        velocity.network.time_proj.register_forward_hook(
            lambda module, inputs, output, scale=time_scale: seen.update({scale: (inputs[0], output)})
        )
        t = torch.linspace(0, 1, 9)
        with torch.no_grad():
            velocity(torch.zeros(9, 3, 8, 8), t)
    timesteps, embedding = seen[1.0]
    assert torch.equal(timesteps, torch.linspace(0, 1, 9))  # the raw time reaches the embedding
    assert embedding.shape == (9, 128)  # model_channels = 128, as released
    assert (embedding.double() - improved_diffusion_timestep_embedding(t, 128)).abs().max() < 1e-6
    _, scaled = seen[1000.0]
    assert (scaled.double() - improved_diffusion_timestep_embedding(1000 * t, 128)).abs().max() < 1e-4
    assert (scaled.double() - improved_diffusion_timestep_embedding(t, 128)).abs().max() > 0.5
