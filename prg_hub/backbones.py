"""Adapters that give every diffusers network one signature: the velocity field v(x, t).

    v: (x of shape (B, C, H, W), t of shape (B,) in [0, 1]) -> velocity of shape (B, C, H, W)

diffusers networks embed their timestep sinusoidally with frequencies tuned for the range 0..1000, so the adapter
feeds them `time_scale · t` (default 1000). This is the only place where t is rescaled; the scale is stored in
`PRGConfig.time_scale`.

Adding a backbone: subclass `VelocityBackbone`, set `network_class`, implement `forward` and
`check_spatial_size`, add it to `BACKBONES` under a short name, and give it its sizes in
`presets.backbone_preset` (its `tiny` one is the network of a `PRGConfig` given no `backbone_config`).
"""

from __future__ import annotations

import torch
from diffusers import DiTTransformer2DModel, UNet2DModel
from torch import nn

from .checks import check_choice


class VelocityBackbone(nn.Module):
    """A diffusers network seen as v(x, t). The network lives in `self.network` (weights saved as `network.*`)."""

    network_class: type[nn.Module]

    def __init__(self, network: nn.Module, time_scale: float):
        super().__init__()
        self.network = network
        self.time_scale = time_scale

    @classmethod
    def from_config(cls, backbone_config: dict, time_scale: float) -> "VelocityBackbone":
        """Build a freshly initialised network from its diffusers config dict."""
        return cls(cls.network_class.from_config(backbone_config), time_scale)

    def check_spatial_size(self, height: int, width: int) -> None:
        """Raise a ValueError naming the size and the rule if the network cannot take (height, width) images."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class UNet2DVelocity(VelocityBackbone):
    """`diffusers.UNet2DModel` as a velocity field (unconditional)."""

    network_class = UNet2DModel

    def check_spatial_size(self, height, width):
        factor = 2 ** (len(self.network.config.down_block_types) - 1)
        if height % factor or width % factor:
            raise ValueError(
                f"This UNet2D backbone downsamples {factor}x, so height and width must be multiples of {factor}; "
                f"got {height}x{width}. Resize the images (the image processor's `size`) to a multiple of {factor}."
            )

    def forward(self, x, t):
        return self.network(x, t * self.time_scale).sample


class DiTVelocity(VelocityBackbone):
    """`diffusers.DiTTransformer2DModel` as a velocity field.

    DiT is class-conditional through adaLN-Zero. PRG needs an unconditional field, so every sample is given the
    "null" class (index `num_embeds_ada_norm`, the classifier-free-guidance token), which label dropout maps to
    itself: the embedding is the same in training and evaluation.
    """

    network_class = DiTTransformer2DModel

    def check_spatial_size(self, height, width):
        patch = self.network.config.patch_size
        if height != width or height % patch:
            raise ValueError(
                f"This DiT backbone needs square images whose side is a multiple of its patch size {patch}; "
                f"got {height}x{width}. Resize the images (the image processor's `size`)."
            )

    def forward(self, x, t):
        null_class = torch.full((x.shape[0],), self.network.config.num_embeds_ada_norm, device=x.device)
        return self.network(x, t * self.time_scale, class_labels=null_class).sample


BACKBONES: dict[str, type[VelocityBackbone]] = {"unet2d": UNet2DVelocity, "dit": DiTVelocity}


def backbone_type_of(network: nn.Module) -> str:
    """The `backbone_type` name of an existing diffusers network, or a ValueError listing what is supported."""
    for name, adapter in BACKBONES.items():
        if isinstance(network, adapter.network_class):
            return name
    supported = ", ".join(adapter.network_class.__name__ for adapter in BACKBONES.values())
    raise ValueError(f"Cannot wrap a {type(network).__name__}: supported networks are {supported}.")


def check_backbone_type(backbone_type: str) -> None:
    """`backbone_type` must name an adapter of `BACKBONES` ("unet2d", "dit")."""
    check_choice("backbone_type", backbone_type, sorted(BACKBONES), "backbones")


def build_backbone(backbone_type: str, backbone_config: dict, time_scale: float) -> VelocityBackbone:
    """Build the adapter of `backbone_type`, one of `BACKBONES`, around a new network made from `backbone_config`."""
    check_backbone_type(backbone_type)
    return BACKBONES[backbone_type].from_config(backbone_config, time_scale)
