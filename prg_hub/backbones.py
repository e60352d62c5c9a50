"""Adapters that give every diffusers network one signature: the velocity field v(x, t).

    v: (x of shape (B, C, H, W), t of shape (B,) in [0, 1]) -> velocity of shape (B, C, H, W)

diffusers networks embed their timestep sinusoidally with frequencies tuned for the range 0..1000, so the adapter
feeds them `time_scale · t` (default 1000). This is the only place where t is rescaled; the scale is stored in
`PRGConfig.time_scale`.

Precision: the adapter is the boundary between the ODE state and the network. The PRG models keep the state x and
the time t in at least float32 (`state_dtype`); the network runs in its weights' dtype w (bfloat16, float16, …): the
adapter feeds it x cast to w and returns v cast back to x's dtype, so that an Euler step of a bfloat16 network is

    x_{k+1} = x_k + h · float32(v_θ(bf16(x_k), t_k))

and the rounding of x_k to w happens only at the network's input, never in the sum that carries the state from
step to step: the error of x at the end stays that of one network evaluation, whatever the number of steps.

Adding a backbone: subclass `VelocityBackbone`, set `network_class`, implement `network_velocity` and
`check_spatial_size`, add it to `BACKBONES` under a short name, and give it its sizes in
`presets.backbone_preset` (its `tiny` one is the network of a `PRGConfig` given no `backbone_config`).
"""

from __future__ import annotations

import torch
from diffusers import DiTTransformer2DModel, UNet2DModel
from torch import nn

from .checks import check_choice


def state_dtype(weight_dtype: torch.dtype, input_dtype: torch.dtype | None = None) -> torch.dtype:
    """The dtype of the ODE state for a network whose weights are `weight_dtype`, given an input of `input_dtype`:
    the widest of float32, the weights' dtype and the input's. float32 for bfloat16, float16 or float32 weights and
    inputs; float64 when the weights or the input are float64."""
    dtype = torch.promote_types(torch.float32, weight_dtype)
    return dtype if input_dtype is None else torch.promote_types(dtype, input_dtype)


class VelocityBackbone(nn.Module):
    """A diffusers network seen as v(x, t). The network lives in `self.network` (weights saved as `network.*`).

    `forward(x, t)`, x of shape (B, C, H, W) in any floating dtype, t of shape (B,): the network is fed x cast to
    `weight_dtype` and t·`time_scale` as it is (the diffusers time embeddings compute in float32 and cast to the
    network's dtype themselves), and the velocity, shape (B, C, H, W), is returned cast back to x's dtype:

        v(x, t) = dtype_x(v_θ(dtype_w(x), time_scale · t))

    Under autocast the weights stay float32, so the input cast does nothing; the network's output (bfloat16 from
    autocast's matrix products) is returned in x's dtype, so the solver forms h·v in float32 too.
    """

    network_class: type[nn.Module]

    def __init__(self, network: nn.Module, time_scale: float):
        super().__init__()
        self.network = network
        self.time_scale = time_scale

    @classmethod
    def from_config(cls, backbone_config: dict, time_scale: float) -> "VelocityBackbone":
        """Build a freshly initialised network from its diffusers config dict."""
        return cls(cls.network_class.from_config(backbone_config), time_scale)

    @property
    def weight_dtype(self) -> torch.dtype:
        """The dtype the network computes in: that of its weights."""
        return next(self.network.parameters()).dtype

    def check_spatial_size(self, height: int, width: int) -> None:
        """Raise a ValueError naming the size and the rule if the network cannot take (height, width) images."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.network_velocity(x.to(self.weight_dtype), t * self.time_scale).to(x.dtype)

    def network_velocity(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """The network's output for x (B, C, H, W) in the weights' dtype at diffusers timesteps (B,) (t·time_scale),
        shape (B, C, H, W)."""
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

    def network_velocity(self, x, timestep):
        return self.network(x, timestep).sample


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

    def network_velocity(self, x, timestep):
        null_class = torch.full((x.shape[0],), self.network.config.num_embeds_ada_norm, device=x.device)
        return self.network(x, timestep, class_labels=null_class).sample


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
