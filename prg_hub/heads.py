"""The classifier heads of `PRGForImageClassification`, one per `PRGConfig.head_type` (`HEADS`).

| head_type   | reads                                             | computes                                          |
|-------------|---------------------------------------------------|---------------------------------------------------|
| `prg`       | x at `feature_t`, pooled to p×p per channel       | LayerNorm → Linear → Tanh → Linear (the PRG head) |
| `linear`    | `feature_blocks` at `feature_times`               | each output averaged over positions, all          |
|             |                                                   | concatenated → BatchNorm (no affine) → Linear     |
|             |                                                   | (DDAE's linear probe)                             |
| `attention` | `feature_blocks` at `feature_times`               | each output pooled to a g×g token grid, Linear to |
|             |                                                   | the head width + a learned positional embedding   |
|             |                                                   | per output; one Transformer over all its tokens   |
|             |                                                   | and a CLS token; Linear on the CLS                |
| `difformer` | `feature_blocks` at `feature_times`               | one tokenizer per block, shared by the times; one |
|             |                                                   | Transformer (with its CLS) per time over the      |
|             |                                                   | tokens of all blocks; the CLS of every time       |
|             |                                                   | concatenated → Linear                             |
| `diffeed`   | `feature_blocks` at `feature_times`, on a second  | the attention head, on features of a network pass |
|             | network pass with feedback                        | that `FeedbackPath` modifies                      |

Notation: K = len(feature_times), J = len(feature_blocks), W = `head_width`, g = `head_token_grid`, L = num_labels.
A block's output is a (B, C, h, w) map (UNet2D) or (B, N, D) tokens (DiT, N = s² patches); either is a square grid
of tokens (`block_features.as_token_grid`), pooled to min(s, g)² tokens for the attention-based heads.

Block heads work in two stages, so that features of a frozen velocity network can be computed once and cached
(`examples/linear_probe.py`):

    reduce(block_features) -> {key: tensor}   parameter-free: averages (linear) or pooled token grids (others)
    classify(reduced) -> logits (B, L)        everything the head learns
    forward(block_features) = classify(reduce(block_features))

`block_features` is {`block_features.block_feature_key(name, t)`: block output}, as `PRGModel` returns it; a head
reads the keys of its own blocks and times and ignores any other.

DifFeed (`FeedbackPath`): on a first network pass at (x_t, t) the outputs of later ("sending") blocks are read (they
are part of its frozen features); on a second pass at the same (x_t, t) each is mapped and added to the output of
an earlier ("receiving") block:

    UNet2D: receiving output += ReLU(BatchNorm(Conv1×1(sending output)))      (maps of the same h × w)
    DiT:    receiving tokens += GELU(LayerNorm(Linear(sending tokens)))        (the same N tokens)

The pairs are `feedback_blocks` ({receiving: sending}), by default `VelocityBackbone.default_feedback_pairs`: for
UNet2D each encoder block receives the deepest decoder block of its output size, for DiT block i receives block
L − 1 − i. The second pass's `feature_blocks` go to the attention head (`PRGModel.read_blocks` with the feedback).

Every head computes in its weights' dtype; `PRGForImageClassification` casts the logits to the state dtype.
Heads are built from a `PRGConfig` (typed `PreTrainedConfig` here: the config module imports this one).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedConfig
from transformers import initialization as init

from .backbones import BACKBONES
from .block_features import (
    block_feature_key,
    block_output_shapes,
    mean_token,
    pooled_tokens,
    token_dim,
    token_grid_side,
)

BlockShapes = dict[str, tuple[int, ...]]


class PRGHead(nn.Module):
    """The PRG classification head on pooled features (B, C·p²): LayerNorm → Linear → Tanh → Linear → (B, num_labels).

    The last Linear, W·h (+ b), has the bias b only when `config.head_bias` (the released PRG code has none).
    It computes in its weights' dtype and returns the logits in the dtype of the pooled features it is given (the
    state dtype of `PRGModel`), as `backbones.VelocityBackbone` does for the network.
    """

    reads_blocks = False

    def __init__(self, config: PreTrainedConfig):
        super().__init__()
        in_features = config.num_channels * config.head_pool_size**2
        self.norm = nn.LayerNorm(in_features)
        self.hidden = nn.Linear(in_features, config.head_hidden_size)
        self.classifier = nn.Linear(config.head_hidden_size, config.num_labels, bias=config.head_bias)

    @classmethod
    def from_config(cls, config: PreTrainedConfig) -> PRGHead:
        return cls(config)

    def forward(self, pooled_features: torch.Tensor) -> torch.Tensor:
        h = pooled_features.to(self.norm.weight.dtype)
        return self.classifier(torch.tanh(self.hidden(self.norm(h)))).to(pooled_features.dtype)


class BlockHead(nn.Module):
    """Base of the heads that read block outputs at `config.feature_times` (module docstring: reduce, classify).

    Attributes:
        feature_blocks, feature_times: what the head reads.
        keys: the keys it reads, time-major: [key(block_1, t_1), …, key(block_J, t_1), key(block_1, t_2), …].
        block_of_key: {key: the block it names}.
        block_shapes: {block name: output shape without batch} of every block of the network.
    """

    reads_blocks = True

    def __init__(self, config: PreTrainedConfig, block_shapes: BlockShapes):
        super().__init__()
        self.feature_blocks = list(config.feature_blocks)
        self.feature_times = list(config.block_feature_times)
        self.block_of_key = {
            block_feature_key(name, t): name for t in self.feature_times for name in self.feature_blocks
        }
        self.keys = list(self.block_of_key)
        self.block_shapes = block_shapes

    @classmethod
    def from_config(cls, config: PreTrainedConfig) -> BlockHead:
        """The head for `config`, sized from the network's block output shapes (`block_output_shapes`)."""
        shapes = block_output_shapes(config.backbone_type, config.backbone_config, config.image_size,
                                     config.num_channels)
        return cls(config, shapes)

    @property
    def weight_dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def reduce(self, block_features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def classify(self, reduced: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, block_features: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits (B, num_labels) in the head's weights' dtype from {key: block output}."""
        return self.classify(self.reduce(block_features))


class LinearHead(BlockHead):
    """DDAE's probe: z = concat over times and blocks of the mean of each output over positions (B, Σ D_j·K), then
    logits = Linear(BatchNorm(z)), the BatchNorm without affine parameters (standardisation by running
    statistics in evaluation)."""

    def __init__(self, config: PreTrainedConfig, block_shapes: BlockShapes):
        super().__init__(config, block_shapes)
        in_features = len(self.feature_times) * sum(token_dim(block_shapes[name]) for name in self.feature_blocks)
        self.norm = nn.BatchNorm1d(in_features, affine=False)
        self.classifier = nn.Linear(in_features, config.num_labels)

    def reduce(self, block_features):
        """{key: (B, D) mean of the output over its positions}."""
        return {key: mean_token(block_features[key].to(self.weight_dtype)) for key in self.keys}

    def classify(self, reduced):
        return self.classifier(self.norm(torch.cat([reduced[key] for key in self.keys], dim=1)))


class BlockTokenizer(nn.Module):
    """Pooled tokens (B, n, D) → Linear(D, W) + a learned positional embedding (n, W): (B, n, W)."""

    def __init__(self, dim: int, num_tokens: int, width: int):
        super().__init__()
        self.projection = nn.Linear(dim, width)
        self.position_embedding = nn.Parameter(torch.zeros(1, num_tokens, width))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.projection(tokens) + self.position_embedding


class ClsTransformer(nn.Module):
    """A learned CLS token prepended to tokens (B, n, W), a pre-norm Transformer encoder (`head_depth` layers,
    `head_attention_heads` heads, MLP 4W, GELU, no dropout), and LayerNorm of the CLS output: (B, W)."""

    def __init__(self, config: PreTrainedConfig):
        super().__init__()
        width = config.head_width
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        layer = nn.TransformerEncoderLayer(width, config.head_attention_heads, dim_feedforward=4 * width, dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, config.head_depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        return self.norm(self.encoder(torch.cat([cls, tokens], dim=1))[:, 0])


class TokenPooling(BlockHead):
    """`reduce` of the attention-based heads: every output pooled to a min(s, g)² token grid, (B, n, D)."""

    def __init__(self, config: PreTrainedConfig, block_shapes: BlockShapes):
        super().__init__(config, block_shapes)
        self.grid_sides = {name: min(token_grid_side(block_shapes[name]), config.head_token_grid)
                           for name in self.feature_blocks}

    def reduce(self, block_features):
        """{key: (B, n, D) pooled tokens}."""
        return {key: pooled_tokens(block_features[key].to(self.weight_dtype), self.grid_sides[name])
                for key, name in self.block_of_key.items()}

    def tokenizer(self, name: str, width: int) -> BlockTokenizer:
        """A new tokenizer for the pooled tokens of block `name`."""
        return BlockTokenizer(token_dim(self.block_shapes[name]), self.grid_sides[name] ** 2, width)


class AttentionHead(TokenPooling):
    """One tokenizer per (time, block) output, one `ClsTransformer` over the tokens of all of them, Linear(W, L) on
    its CLS: with one block and one time, the attention head of DifFormer's paper."""

    def __init__(self, config: PreTrainedConfig, block_shapes: BlockShapes):
        super().__init__(config, block_shapes)
        self.tokenizers = nn.ModuleList(
            [self.tokenizer(name, config.head_width) for _ in self.feature_times for name in self.feature_blocks]
        )
        self.transformer = ClsTransformer(config)
        self.classifier = nn.Linear(config.head_width, config.num_labels)

    def classify(self, reduced):
        tokens = [tokenizer(reduced[key]) for tokenizer, key in zip(self.tokenizers, self.keys, strict=True)]
        return self.classifier(self.transformer(torch.cat(tokens, dim=1)))


class DifFormerHead(TokenPooling):
    """DifFormer: tokenizer_j per block (shared by the times); for each time t_k a `ClsTransformer` over
    concat_j tokenizer_j(tokens of block j at t_k); logits = Linear(concat_k CLS_k) with Linear(K·W, L)."""

    def __init__(self, config: PreTrainedConfig, block_shapes: BlockShapes):
        super().__init__(config, block_shapes)
        self.tokenizers = nn.ModuleList([self.tokenizer(name, config.head_width) for name in self.feature_blocks])
        self.transformers = nn.ModuleList([ClsTransformer(config) for _ in self.feature_times])
        self.classifier = nn.Linear(len(self.feature_times) * config.head_width, config.num_labels)

    def classify(self, reduced):
        cls_tokens = []
        for t, transformer in zip(self.feature_times, self.transformers, strict=True):
            tokens = [tokenizer(reduced[block_feature_key(name, t)])
                      for tokenizer, name in zip(self.tokenizers, self.feature_blocks, strict=True)]
            cls_tokens.append(transformer(torch.cat(tokens, dim=1)))
        return self.classifier(torch.cat(cls_tokens, dim=1))


class FeedbackPath(nn.Module):
    """DifFeed's feedback: for each pair (receiving block r, sending block s), the map added to r's output on the
    second pass, from s's output on the first (module docstring).

    `forward({s: output of s})` → {r: addition, shaped like r's output}.
    """

    def __init__(self, pairs: dict[str, str], block_shapes: BlockShapes):
        super().__init__()
        self.receivers = list(pairs)
        self.senders = [pairs[name] for name in self.receivers]
        self.maps = nn.ModuleList()
        for receiver, sender in pairs.items():
            sent, received = block_shapes[sender], block_shapes[receiver]
            if len(sent) == 3:
                self.maps.append(nn.Sequential(nn.Conv2d(sent[0], received[0], kernel_size=1),
                                               nn.BatchNorm2d(received[0]), nn.ReLU()))
            else:
                self.maps.append(nn.Sequential(nn.Linear(sent[1], received[1]), nn.LayerNorm(received[1]), nn.GELU()))

    def forward(self, sent: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        dtype = next(self.parameters()).dtype
        return {receiver: feedback_map(sent[sender].to(dtype))
                for receiver, sender, feedback_map in zip(self.receivers, self.senders, self.maps, strict=True)}


def positions(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The positions of a block output of `shape` (without batch): (h, w) of a (C, h, w) map, (N,) of N tokens."""
    return shape[1:] if len(shape) == 3 else shape[:1]


def feedback_pairs(config: PreTrainedConfig, block_shapes: BlockShapes) -> dict[str, str]:
    """{receiving block: sending block} of a DifFeed head: `config.feedback_blocks`, or the backbone's default pairs;
    a ValueError when there are none, or when a pair's outputs differ in size."""
    pairs = config.feedback_blocks or BACKBONES[config.backbone_type].default_feedback_pairs(block_shapes)
    if not pairs:
        raise ValueError(
            f"head_type 'diffeed' found no block to feed back: no later block of this {config.backbone_type} network "
            f"has the output size of an earlier one that receives feedback (block output shapes: {block_shapes}). "
            "Give feedback_blocks={receiving block: sending block} of equal sizes, or use a UNet2D of 3 or more "
            "levels, whose decoder matches an encoder block."
        )
    for receiver, sender in pairs.items():
        received, sent = block_shapes[receiver], block_shapes[sender]
        if positions(received) != positions(sent):
            raise ValueError(
                f"feedback_blocks pairs {receiver!r} (output {received}) with {sender!r} (output {sent}): the "
                "sending block's output must have the receiving block's spatial size or number of tokens."
            )
    return dict(pairs)


class DifFeedHead(AttentionHead):
    """DifFeed: the attention head over `feature_blocks` read on the second pass of `PRGModel.read_blocks`, whose
    feedback is `self.feedback` (`FeedbackPath`)."""

    def __init__(self, config: PreTrainedConfig, block_shapes: BlockShapes):
        super().__init__(config, block_shapes)
        self.feedback = FeedbackPath(feedback_pairs(config, block_shapes), block_shapes)


HEADS: dict[str, type[nn.Module]] = {
    "prg": PRGHead,
    "linear": LinearHead,
    "attention": AttentionHead,
    "difformer": DifFormerHead,
    "diffeed": DifFeedHead,
}


def head_attribute(head_type: str) -> str:
    """The name a classifier holds its head under: `head` for the prg head, `<head_type>_head` for the others, so
    that a checkpoint's head weights load only into a head of the same type."""
    return "head" if head_type == "prg" else f"{head_type}_head"


def build_head(config: PreTrainedConfig) -> nn.Module:
    """The head of `config.head_type` (one of `HEADS`) for `config`."""
    return HEADS[config.head_type].from_config(config)


def initialize_head_module(module: nn.Module, std: float) -> None:
    """Initialise one module of a head (the model's `_init_weights` calls it for each): Linear and 1×1 Conv weights
    and attention projections ~ N(0, std²) with zero biases, CLS tokens and positional embeddings ~ N(0, std²),
    LayerNorm and BatchNorm the identity (BatchNorm statistics: mean 0, variance 1)."""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        init.normal_(module.weight, std=std)
        if module.bias is not None:
            init.zeros_(module.bias)
    elif isinstance(module, nn.MultiheadAttention):
        init.normal_(module.in_proj_weight, std=std)
        init.zeros_(module.in_proj_bias)
    elif isinstance(module, nn.LayerNorm):
        init.ones_(module.weight)
        init.zeros_(module.bias)
    elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        if module.affine:
            init.ones_(module.weight)
            init.zeros_(module.bias)
        init.zeros_(module.running_mean)
        init.ones_(module.running_var)
        init.zeros_(module.num_batches_tracked)
    elif isinstance(module, BlockTokenizer):
        init.normal_(module.position_embedding, std=std)
    elif isinstance(module, ClsTransformer):
        init.normal_(module.cls_token, std=std)
