"""Reading the outputs of a velocity network's blocks through forward hooks, for one network call at a time.

    with reading_blocks(network, ["down_blocks.1", "mid_block"]) as outputs:
        velocity(x, t)
    outputs  # {"down_blocks.1": (B, C, h, w), "mid_block": (B, C, h, w)}

The hooks live only inside the `with` block: they are removed on leaving it, also when the call raises, so a model
never keeps a hook, nor the tensors a hook captured, from one call to the next. With `stop_when_read=True` the call
stops once the last block asked for has run, skipping the layers after it.

Blocks are named by their module paths in the diffusers network, as `backbones.VelocityBackbone.block_names` lists
them: UNet2D "down_blocks.i", "mid_block", "up_blocks.i"; DiT "transformer_blocks.i". What a block gives:

* UNet2D: its hidden state, a (B, C, h, w) map. Down blocks return (hidden state, skip states); the hidden state
  (the first element) is the one read.
* DiT: its tokens, (B, N, D), N = (image side / patch size)² patches in row-major order.

`as_token_grid` turns either into a square grid of tokens, and `pooled_tokens` pools that grid: a (B, C, h, w) map
is tokenised as (B, h·w, C), one token per position, as DiT tokens already are.

`adding_to_blocks(network, {name: tensor})` adds a tensor to the output of blocks for one call (the feedback of a
DifFeed head, `heads.FeedbackPath`). A down block's addition reaches both its hidden state and the skip state that
is the same tensor, so the decoder sees the fed-back features as well.

Features of a block read at time t are stored under `block_feature_key(name, t)`, "name@t=t", e.g.
"up_blocks.0@t=0.25": in `PRGModel`'s output, in the feature-extraction pipeline and in the heads.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import BACKBONES, build_backbone


def block_feature_key(name: str, t: float) -> str:
    """The key of the output of block `name` read at time t: "name@t=t" with t written as a float ("@t=1.0")."""
    return f"{name}@t={float(t)}"


def check_block_names(parameter: str, names, backbone_type: str, backbone_config: dict) -> None:
    """`names` must be a list of distinct blocks of the network that `backbone_config` describes; a ValueError
    naming `parameter`, the offending entry and the network's blocks otherwise."""
    available = BACKBONES[backbone_type].block_names(backbone_config)
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise ValueError(
            f"{parameter} must be a list of block names, got {names!r}; e.g. {parameter}=[{available[-1]!r}]."
        )
    for name in names:
        if name not in available:
            raise ValueError(
                f"Unknown {parameter} entry {name!r} for this {backbone_type} network: its blocks are {available}."
            )
    repeated = sorted({name for name in names if list(names).count(name) > 1})
    if repeated:
        raise ValueError(f"{parameter} lists {repeated} more than once; list each block once.")


def _hidden_state(output):
    """The hidden state of a block's output: the output itself, or the first element of a tuple."""
    return output[0] if isinstance(output, tuple) else output


class _AllBlocksRead(Exception):
    """Raised by the last hook of `reading_blocks(..., stop_when_read=True)` to skip the rest of the network call."""


@contextmanager
def reading_blocks(
    network: nn.Module, names: Sequence[str], stop_when_read: bool = False
) -> Iterator[dict[str, torch.Tensor]]:
    """Within the `with` block, every call of `network` stores the output (hidden state) of each block of `names` in
    the yielded dict, under its name. The hooks are removed on leaving the block, whatever happens inside it.

    With `stop_when_read`, the call ends as soon as every block of `names` has run: the network's later layers are
    skipped and the call returns nothing (the statement making it is abandoned, and the `with` block goes on after
    it). For callers that want the blocks' outputs only, which then cost only the layers up to the last of them.
    """
    outputs: dict[str, torch.Tensor] = {}
    wanted = set(names)
    handles = []
    try:
        for name in wanted:
            def keep(module, inputs, output, name=name):
                outputs[name] = _hidden_state(output)
                if stop_when_read and wanted <= outputs.keys():
                    raise _AllBlocksRead

            handles.append(network.get_submodule(name).register_forward_hook(keep))
        try:
            yield outputs
        except _AllBlocksRead:
            pass
    finally:
        for handle in handles:
            handle.remove()


def _add(output, addition: torch.Tensor):
    """A block's output with `addition` added to its hidden state (and to a skip state that is the same tensor)."""
    if not isinstance(output, tuple):
        return output + addition.to(output.dtype)
    hidden, *rest = output
    fed_back = hidden + addition.to(hidden.dtype)
    rest = [tuple(fed_back if state is hidden else state for state in part) if isinstance(part, tuple) else part
            for part in rest]
    return (fed_back, *rest)


@contextmanager
def adding_to_blocks(network: nn.Module, additions: dict[str, torch.Tensor]) -> Iterator[None]:
    """Within the `with` block, every call of `network` adds `additions[name]` (shaped like the block's hidden state)
    to the output of block `name`. The hooks are removed on leaving the block, whatever happens inside it."""
    with ExitStack() as stack:
        for name, addition in additions.items():
            handle = network.get_submodule(name).register_forward_hook(
                lambda module, inputs, output, addition=addition: _add(output, addition)
            )
            stack.callback(handle.remove)
        yield


def block_output_shapes(
    backbone_type: str, backbone_config: dict, image_size: int, num_channels: int
) -> dict[str, tuple[int, ...]]:
    """{block name: output shape without the batch dimension} for every block of the network, found by running it
    once on the meta device (no memory, no arithmetic): (C, h, w) for UNet2D blocks, (N, D) for DiT blocks."""
    with torch.device("meta"):
        velocity = build_backbone(backbone_type, backbone_config, time_scale=1.0)
        names = BACKBONES[backbone_type].block_names(backbone_config)
        with reading_blocks(velocity.network, names, stop_when_read=True) as outputs:
            velocity(torch.zeros(1, num_channels, image_size, image_size), torch.zeros(1))
    return {name: tuple(outputs[name].shape[1:]) for name in names}


def token_grid_side(shape: tuple[int, ...]) -> int:
    """The side of the square token grid of a block output of `shape` (without batch): h of a (C, h, w) map, √N of
    N DiT tokens."""
    return shape[1] if len(shape) == 3 else math.isqrt(shape[0])


def token_dim(shape: tuple[int, ...]) -> int:
    """The width of one token of a block output of `shape` (without batch): C of a (C, h, w) map, D of (N, D)."""
    return shape[0] if len(shape) == 3 else shape[1]


def as_token_grid(output: torch.Tensor) -> torch.Tensor:
    """A block output as a (B, D, s, s)-shaped grid: a UNet map (B, C, h, w) as it is, DiT tokens (B, N, D) laid
    back on their √N × √N patch grid."""
    if output.dim() == 4:
        return output
    batch, num_tokens, dim = output.shape
    side = math.isqrt(num_tokens)
    return output.transpose(1, 2).reshape(batch, dim, side, side)


def pooled_tokens(output: torch.Tensor, side: int) -> torch.Tensor:
    """A block output average-pooled to a side × side grid and tokenised: (B, side², D), tokens in row-major order."""
    return F.adaptive_avg_pool2d(as_token_grid(output), side).flatten(2).transpose(1, 2)


def mean_token(output: torch.Tensor) -> torch.Tensor:
    """A block output averaged over its positions or tokens: (B, C, h, w) or (B, N, D) → (B, D)."""
    return output.mean(dim=(2, 3)) if output.dim() == 4 else output.mean(dim=1)
