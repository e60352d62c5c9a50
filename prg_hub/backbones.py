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

Blocks. Heads that read the network's inner activations (`heads.py`, through `block_features.py`) name its blocks
by their diffusers module paths, which each adapter lists from a config with `block_names`: UNet2D "down_blocks.i",
"mid_block", "up_blocks.i"; DiT "transformer_blocks.i", in the order the network runs them. `default_feedback_pairs`
says which later block feeds which earlier one in a DifFeed head.

Adding a backbone: subclass `VelocityBackbone`, set `network_class`, implement `network_velocity`,
`check_spatial_size`, `block_names` and `default_feedback_pairs`, add it to `BACKBONES` under a short name, and
give it its sizes in `presets.backbone_preset` (its `tiny` one is the network of a `PRGConfig` given no
`backbone_config`).
"""

from __future__ import annotations

import inspect

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

    @classmethod
    def config_value(cls, backbone_config: dict, key: str):
        """`backbone_config[key]`, or the network class's default for it when the config does not hold it."""
        if key in backbone_config:
            return backbone_config[key]
        return inspect.signature(cls.network_class.__init__).parameters[key].default

    @classmethod
    def block_names(cls, backbone_config: dict) -> list[str]:
        """The blocks of the network that `backbone_config` describes, as module paths, in the order it runs them."""
        raise NotImplementedError

    @classmethod
    def default_feedback_pairs(cls, block_shapes: dict[str, tuple[int, ...]]) -> dict[str, str]:
        """{receiving block: sending block}: where a DifFeed head feeds a later block's output back by default.

        `block_shapes` maps every block name to its output shape without the batch dimension."""
        raise NotImplementedError

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

    @classmethod
    def block_names(cls, backbone_config):
        down = [f"down_blocks.{index}" for index in range(len(cls.config_value(backbone_config, "down_block_types")))]
        mid = ["mid_block"] if cls.config_value(backbone_config, "mid_block_type") is not None else []
        up = [f"up_blocks.{index}" for index in range(len(cls.config_value(backbone_config, "up_block_types")))]
        return down + mid + up

    @classmethod
    def default_feedback_pairs(cls, block_shapes):
        """Each encoder block (down_blocks.i) receives the output of the first decoder block (up_blocks.j, deepest
        first) whose output has its spatial size; encoder blocks that no decoder block matches receive nothing."""
        decoder = [name for name in block_shapes if name.startswith("up_blocks.")]
        pairs = {}
        for name, shape in block_shapes.items():
            if name.startswith("down_blocks."):
                matching = [sender for sender in decoder if block_shapes[sender][1:] == shape[1:]]
                if matching:
                    pairs[name] = matching[0]
        return pairs

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

    @classmethod
    def block_names(cls, backbone_config):
        return [f"transformer_blocks.{index}" for index in range(cls.config_value(backbone_config, "num_layers"))]

    @classmethod
    def default_feedback_pairs(cls, block_shapes):
        """DiT has no decoder: block i receives its mirror block L − 1 − i, for i < L // 2 (as a U-Net's skips pair
        its levels)."""
        names = list(block_shapes)
        return {names[index]: names[len(names) - 1 - index] for index in range(len(names) // 2)}

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
