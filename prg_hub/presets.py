"""Size presets of the velocity network: diffusers configs by backbone and size.

    backbone_preset("unet2d", "paper", image_size=32)  ->  a `UNet2DModel` config dict (≈ 52M parameters)

| preset  | unet2d (`UNet2DModel`)                                     | dit (`DiTTransformer2DModel`)              |
|---------|------------------------------------------------------------|--------------------------------------------|
| `tiny`  | channels (16, 32), 1 res block, no attention (tests;       | 2 layers, width 32, patch 4 (0.06M)        |
|         | 0.16M parameters)                                          |                                            |
| `small` | channels (64, 128, 128), 2 res blocks, attention at the    | 6 layers, width 256, 4 heads, patch 2      |
|         | bottom level (6.9M parameters: CPU and short GPU budgets)  | (8.0M)                                     |
| `paper` | the official PRG network: improved-diffusion UNet, 128     | DiT-S/2: 12 layers, width 384, 6 heads,    |
|         | channels, 3 res blocks, attention at 16 and 8 px,          | patch 2 (the smallest DiT of Peebles & Xie;|
|         | mult (1, 2, 2, 2) up to 32 px (52.5M parameters) and       | 35.2M)                                     |
|         | (1, 2, 3, 4) at 64 px (121M)                               |                                            |

`tiny` is also the network of a `PRGConfig` given no `backbone_config`.

The tiny UNet has no attention: an attention key bias gets an exactly zero gradient (softmax ignores a shift
shared by all keys), so Adam turns its rounding noise into full-size updates and runs that differ only in the order
of floating-point sums (one process with batch 2b, two with batch b) would drift apart in those biases.

The paper's network has dropout 0.1 (torchcfm's CIFAR-10 UNet uses the same; the released PRG code uses 0, which
`dropout=0.0` gives), scale-shift time conditioning (improved diffusion's `use_scale_shift_norm`) and 64-channel
attention heads. `tiny` has no dropout so that runs are exactly reproducible across process counts. Every DiT
preset has `num_embeds_ada_norm = 1`: the velocity adapter feeds DiT its "null" class (see `backbones.DiTVelocity`).
"""

from __future__ import annotations

PRESETS: tuple[str, ...] = ("tiny", "small", "paper")


def _unet2d(
    image_size: int,
    num_channels: int,
    base_channels: int,
    channel_mult: tuple[int, ...],
    layers_per_block: int,
    attention_resolutions: tuple[int, ...],
    attention_head_dim: int,
    norm_num_groups: int,
    dropout: float,
    time_scale_shift: str,
) -> dict:
    """A `UNet2DModel` config whose level i works at image_size / 2**i px, with attention where that is listed."""
    resolutions = [image_size // 2**level for level in range(len(channel_mult))]
    if image_size % 2 ** (len(channel_mult) - 1):
        raise ValueError(
            f"This preset downsamples {2 ** (len(channel_mult) - 1)}x, so image_size must be a multiple of "
            f"{2 ** (len(channel_mult) - 1)}; got {image_size}."
        )
    has_attention = [resolution in attention_resolutions for resolution in resolutions]
    return {
        "sample_size": image_size,
        "in_channels": num_channels,
        "out_channels": num_channels,
        "block_out_channels": [base_channels * mult for mult in channel_mult],
        "layers_per_block": layers_per_block,
        "down_block_types": ["AttnDownBlock2D" if attn else "DownBlock2D" for attn in has_attention],
        "up_block_types": ["AttnUpBlock2D" if attn else "UpBlock2D" for attn in reversed(has_attention)],
        "attention_head_dim": attention_head_dim,
        "norm_num_groups": norm_num_groups,
        "dropout": dropout,
        "resnet_time_scale_shift": time_scale_shift,
    }


def _dit(
    image_size: int, num_channels: int, num_layers: int, num_heads: int, head_dim: int, patch_size: int, dropout: float
) -> dict:
    """A `DiTTransformer2DModel` config of width num_heads · head_dim on (image_size / patch_size)² tokens."""
    if image_size % patch_size:
        raise ValueError(
            f"This DiT preset has patch size {patch_size}; image_size must be a multiple of it, got {image_size}."
        )
    return {
        "sample_size": image_size,
        "in_channels": num_channels,
        "out_channels": num_channels,
        "num_layers": num_layers,
        "num_attention_heads": num_heads,
        "attention_head_dim": head_dim,
        "patch_size": patch_size,
        "dropout": dropout,
        "num_embeds_ada_norm": 1,
    }


def _paper_unet_mult(image_size: int) -> tuple[int, ...]:
    """improved diffusion's channel multipliers: (1, 2, 2, 2) up to 32 px, (1, 2, 3, 4) at 64 px."""
    if image_size <= 32:
        return (1, 2, 2, 2)
    if image_size == 64:
        return (1, 2, 3, 4)
    raise ValueError(
        f"The paper preset covers 32 px (CIFAR-10) and 64 px (Tiny-ImageNet, ImageNet 64); got {image_size}."
    )


def backbone_preset(
    backbone_type: str, preset: str, image_size: int, num_channels: int = 3, dropout: float | None = None
) -> dict:
    """The diffusers config of a `backbone_type` network ("unet2d" or "dit") of size `preset` for square images.

    Args:
        backbone_type: "unet2d" or "dit".
        preset: one of `PRESETS`.
        image_size: side of the (image_size × image_size) inputs.
        num_channels: image channels (3: datasets are converted to RGB by `PRGImageProcessor`).
        dropout: the network's dropout probability, in [0, 1) (the diffusers config's `dropout`); None keeps the
            preset's (table above).

    Raises:
        ValueError naming the unknown value and the allowed ones, an image size the preset cannot take, or a
        dropout outside [0, 1).
    """
    if preset not in PRESETS:
        raise ValueError(f"Unknown preset {preset!r}: allowed presets are {list(PRESETS)}.")
    if dropout is not None and not 0 <= dropout < 1:
        raise ValueError(f"dropout is a probability in [0, 1), got {dropout}.")
    config = _preset_config(backbone_type, preset, image_size, num_channels)
    return config if dropout is None else {**config, "dropout": float(dropout)}


def _preset_config(backbone_type: str, preset: str, image_size: int, num_channels: int) -> dict:
    """The config of `backbone_preset` with the preset's own dropout."""
    if backbone_type == "unet2d":
        if preset == "tiny":
            config = _unet2d(image_size, num_channels, 16, (1, 2), 1, (), 8, 8, 0.0, "default")
            return {**config, "add_attention": False}
        if preset == "small":
            return _unet2d(image_size, num_channels, 64, (1, 2, 2), 2, (image_size // 4,), 32, 32, 0.1, "scale_shift")
        return _unet2d(
            image_size, num_channels, 128, _paper_unet_mult(image_size), 3, (16, 8), 64, 32, 0.1, "scale_shift"
        )
    if backbone_type == "dit":
        if preset == "tiny":
            return _dit(image_size, num_channels, 2, 2, 16, 4, 0.0)
        if preset == "small":
            return _dit(image_size, num_channels, 6, 4, 64, 2, 0.1)
        return _dit(image_size, num_channels, 12, 6, 64, 2, 0.1)
    raise ValueError(f"Unknown backbone {backbone_type!r}: allowed backbones are ['dit', 'unet2d'].")
