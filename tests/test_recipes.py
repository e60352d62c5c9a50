"""The settings with which the paper recipes (examples/configs) match the released PRG code: the network's dropout,
the finetuning schedule's warm-up start and floor, and the time fed to the network's sinusoidal embedding. The fast
recipes: the budget recipes at batch 512 with the batch-size rules of examples/configs/README.md."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch
import yaml
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
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


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CONFIGS = EXAMPLES / "configs"
CIFAR10_TRAIN_IMAGES = 50_000


def load_example(name: str):
    """Import examples/<name>.py as a module (its functions, not its main)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_recipe(name: str) -> dict:
    return yaml.safe_load((CONFIGS / f"{name}.yaml").read_text(encoding="utf-8"))


def parse_recipe(name: str):
    """The options `examples/<script>.py --config <name>.yaml` runs with: the recipe gives the dataset, the command
    line only the output folder (and the pretrained flow)."""
    argv = ["--config", str(CONFIGS / f"{name}.yaml"), "--output_dir", "out"]
    if "_finetune" in name:
        return load_example("finetune").parse_args([*argv, "--model_name_or_path", "flow"])
    return load_example("pretrain").parse_args(argv)


def square_root_rule(learning_rate, batch_ref, batch):
    """Adam(W): lr(B) = lr_ref · sqrt(B / B_ref) (Malladi et al., NeurIPS 2022)."""
    return learning_rate * math.sqrt(batch / batch_ref)


def linear_rule(learning_rate, batch_ref, batch):
    """The released finetuning rule: lr(B) = lr_ref · B / B_ref (1.25e-4 · global batch / 512)."""
    return learning_rate * batch / batch_ref


def steps_of_the_same_images(steps, batch_ref, batch):
    """W(B) = W_ref · B_ref / B: as many images in W(B) steps of batch B as in W_ref steps of batch B_ref."""
    return steps * batch_ref / batch


def ema_decay_of_the_same_horizon(decay, batch_ref, batch):
    """decay(B) = decay_ref^(B / B_ref): after N images the old average keeps the weight decay_ref^(N / B_ref)."""
    return decay ** (batch / batch_ref)


SCALED_PRETRAINING = {"train_batch_size", "learning_rate", "lr_warmup_steps", "ema_decay", "checkpointing_steps",
                      "sample_every_steps"}
SCALED_FINETUNING = {"train_batch_size", "learning_rate", "checkpointing_steps"}
ONE_GPU = {"mixed_precision": "bf16", "dataloader": "device"}


@pytest.mark.needs_train_extra  # imports the training scripts
@pytest.mark.parametrize("name", ["cifar10_pretrain_fast", "cifar10_finetune_fast"])
def test_fast_recipe_keys_are_options_that_reach_the_script(name):
    recipe, args = read_recipe(name), parse_recipe(name)
    for key, value in recipe.items():
        assert getattr(args, key) == value, key
    assert (args.train_batch_size, args.mixed_precision, args.dataloader) == (512, "bf16", "device")
    # compiled, channels-last, fused-AdamW step: left to the device (on for CUDA, off on the CPU)
    assert (args.compile, args.channels_last, args.fused_optimizer) == (None, None, None)


def test_fast_pretraining_is_the_budget_recipe_with_the_square_root_rule():
    budget, fast = read_recipe("cifar10_pretrain_budget"), read_recipe("cifar10_pretrain_fast")
    unscaled = {key: value for key, value in fast.items() if key not in SCALED_PRETRAINING}
    assert unscaled == {**{key: value for key, value in budget.items() if key not in SCALED_PRETRAINING}, **ONE_GPU}
    batch_ref, batch = budget["train_batch_size"], fast["train_batch_size"]
    assert fast["learning_rate"] == pytest.approx(square_root_rule(budget["learning_rate"], batch_ref, batch),
                                                  rel=1e-12)
    assert fast["lr_warmup_steps"] == steps_of_the_same_images(budget["lr_warmup_steps"], batch_ref, batch)
    assert fast["ema_decay"] == pytest.approx(ema_decay_of_the_same_horizon(budget["ema_decay"], batch_ref, batch),
                                              rel=1e-12)
    for interval in ("checkpointing_steps", "sample_every_steps"):
        assert fast[interval] == steps_of_the_same_images(budget[interval], batch_ref, batch)
    assert fast["num_train_epochs"] == budget["num_train_epochs"]  # the same images


def test_fast_finetuning_is_the_budget_recipe_with_the_released_linear_rule():
    budget, fast = read_recipe("cifar10_finetune_budget"), read_recipe("cifar10_finetune_fast")
    unscaled = {key: value for key, value in fast.items() if key not in SCALED_FINETUNING}
    assert unscaled == {**{key: value for key, value in budget.items() if key not in SCALED_FINETUNING}, **ONE_GPU}
    batch_ref, batch = budget["train_batch_size"], fast["train_batch_size"]
    assert fast["learning_rate"] == pytest.approx(linear_rule(budget["learning_rate"], batch_ref, batch), rel=1e-12)
    assert "num_warmup_steps" not in fast and fast["num_warmup_epochs"] == budget["num_warmup_epochs"]
    assert fast["checkpointing_steps"] == steps_of_the_same_images(budget["checkpointing_steps"], batch_ref, batch)
    assert fast["num_train_epochs"] == budget["num_train_epochs"]  # the same images


def test_ema_ramp_keeps_its_horizon_in_images_and_stays_under_the_decay_of_both_pretraining_recipes():
    """diffusers' EMAModel uses min(ema_decay, (1 + s)/(10 + s)) at its update s; pretraining drops the last
    incomplete batch, so a run has epochs · floor(50,000 / B) updates on CIFAR-10."""
    last_decay = {}
    for name in ("cifar10_pretrain_budget", "cifar10_pretrain_fast"):
        recipe = read_recipe(name)
        batch = recipe["train_batch_size"]
        num_updates = recipe["num_train_epochs"] * (CIFAR10_TRAIN_IMAGES // batch)
        ema = EMAModel([nn.Parameter(torch.zeros(1))], decay=recipe["ema_decay"])
        last_decay[batch] = ema.get_decay(num_updates)
        assert last_decay[batch] < recipe["ema_decay"]  # the ramp, not ema_decay, acts to the end
    assert (last_decay[128], last_decay[512]) == pytest.approx((7800 / 7809, 1940 / 1949), rel=1e-12)
    # at the same number of images the ramp's horizon 1 / (1 − decay) in images is within 1 % at both batches
    horizon_in_images = {batch: batch / (1 - decay) for batch, decay in last_decay.items()}
    assert horizon_in_images[512] == pytest.approx(horizon_in_images[128], rel=1e-2)
