"""`PRGConfig`: everything needed to rebuild a PRG model (backbone, probability path, solver, head, loss)."""

from __future__ import annotations

import math

from transformers import PreTrainedConfig

from .backbones import BACKBONES, check_backbone_type
from .block_features import check_block_names
from .checks import check_choice, check_feature_t, check_feature_times, check_num_steps
from .heads import HEADS
from .paths import check_probability_path
from .presets import backbone_preset
from .solvers import check_solver

# transformers' remote-code entries. With them a saved PRG checkpoint loads through transformers alone
# (`trust_remote_code=True`), from the modules that `prg_hub.remote_code` copies beside the weights.
AUTO_MAP = {
    "AutoConfig": "configuration_prg.PRGConfig",
    "AutoModel": "modeling_prg.PRGModel",
    "AutoModelForImageClassification": "modeling_prg.PRGForImageClassification",
    "AutoModelForPreTraining": "modeling_prg.PRGForFlowMatching",
}
CUSTOM_PIPELINES = {
    "image-classification": {"impl": "pipelines.PRGImageClassificationPipeline", "pt": ["AutoModelForImageClassification"],
                             "tf": [], "type": "image"},
    "image-feature-extraction": {"impl": "pipelines.PRGFeatureExtractor", "pt": ["AutoModel"], "tf": [],
                                 "type": "image"},
}
# transformers asks for `trust_remote_code=True` before it uses a config's `custom_pipelines`, even when the model
# type is registered locally. The installed package registers the same pipelines itself (`prg_hub.pipelines`), so
# the PRGConfig imported from prg_hub leaves that entry out of the configs it loads (and writes it into every
# config it saves); the copy of this module that transformers imports from a checkpoint keeps it.
IMPORTED_FROM_PACKAGE = __name__.startswith("prg_hub.")
# Settings of a training run, not of the model, that configs saved by earlier versions may hold: ignored.
TRAINING_SWITCHES = ("gradient_checkpointing",)
# The probability path of a config that names none, under `probability_path` or its former name `path`.
DEFAULT_PROBABILITY_PATH = "otcfm"
# The size preset (`presets.backbone_preset`) of the network of a config given no `backbone_config`.
DEFAULT_BACKBONE_PRESET = "tiny"


class PRGConfig(PreTrainedConfig):
    r"""Configuration of `PRGModel`, `PRGForImageClassification` and `PRGForFlowMatching`.

    Args:
        backbone_type (`str`, defaults to `"unet2d"`): `"unet2d"` (`diffusers.UNet2DModel`) or `"dit"`
            (`diffusers.DiTTransformer2DModel`).
        backbone_config (`dict`, *optional*): the diffusers config of the velocity network. Defaults to the
            `tiny` preset of `backbone_type` (`presets.backbone_preset`) for `image_size`×`image_size` images with
            `num_channels` channels.
        image_size (`int`, *optional*): side of the square input images. Taken from `backbone_config["sample_size"]`
            when that is given, else 32.
        num_channels (`int`, *optional*): image channels. Taken from `backbone_config["in_channels"]`, else 3.
        probability_path (`str`, defaults to `"otcfm"`): the flow-matching path, `"gvp"`, `"icfm"` or `"otcfm"`.
            Configs saved before it had this name hold it as `path`, which is read as `probability_path`.
        num_steps (`int`, defaults to 20): solver grid intervals between t = 0 and `feature_t` (and for generation).
        solver (`str`, defaults to `"euler"`): `"euler"`, `"heun"`, `"midpoint"` (fixed-grid, exact backprop) or any
            torchdiffeq method (e.g. `"dopri5"`).
        feature_t (`float`, defaults to 1.0): the time in (0, 1] at which x_t is the representation (1 is noise).
        adjoint (`bool`, defaults to `False`): solve with torchdiffeq's adjoint method (approximate gradients).
        ode_rtol, ode_atol (`float`, defaults to 1e-5): tolerances of adaptive solvers.
        time_scale (`float`, defaults to 1000): the network sees timestep `time_scale · t`.
        head_type (`str`, defaults to `"prg"`): the classifier head of `PRGForImageClassification` (`heads.HEADS`):
            `"prg"` reads x at `feature_t`; `"linear"` (DDAE's probe), `"attention"`, `"difformer"` and `"diffeed"`
            read the outputs of `feature_blocks` of the velocity network at `feature_times`. See `heads.py`.
        feature_blocks (`list[str]`, *optional*): blocks of the velocity network whose outputs the block heads
            read, by their diffusers module paths: UNet2D `"down_blocks.i"`, `"mid_block"`, `"up_blocks.i"`; DiT
            `"transformer_blocks.i"`. Required by every head but `"prg"`; with `"prg"`, the blocks that
            `PRGModel(output_block_features=True)` and the feature-extraction pipeline's `return_blocks=True` read.
        feature_times (`list[float]`, *optional*): increasing times in (0, 1] at which the blocks are read: the
            reversed ODE is integrated from the image through them, and at each the network is evaluated once at
            (x_t, t) (`PRGModel.feature_states`). Defaults to `[feature_t]`.
        feedback_blocks (`dict[str, str]`, *optional*): the `"diffeed"` head's feedback, {receiving block: sending
            block}, the sending block later in the network with an output of the same spatial size (or token
            count). Defaults to `VelocityBackbone.default_feedback_pairs` (UNet2D: each encoder block receives the
            deepest decoder block of its size; DiT: block i receives block L − 1 − i).
        head_width (`int`, defaults to 256): width W of the tokens of the attention-based heads.
        head_depth (`int`, defaults to 2): Transformer layers of the attention-based heads.
        head_attention_heads (`int`, defaults to 4): attention heads per layer; must divide `head_width`.
        head_token_grid (`int`, defaults to 8): the attention-based heads pool each block output to at most
            `head_token_grid`² tokens.
        head_pool_size (`int`, defaults to 16): the PRG head pools x_t to `head_pool_size`² per channel.
        head_hidden_size (`int`, *optional*): width of the head's hidden layer; defaults to its input size
            `num_channels · head_pool_size²` (768 for RGB), as in the paper.
        head_bias (`bool`, defaults to `True`): whether the head's last Linear (hidden → num_labels) has a bias; the
            released PRG code has none (`False`).
        fm_loss_weight (`float`, defaults to 0.0): β in L = CE + β·L_FM.
        label_smoothing (`float`, defaults to 0.0): label smoothing of the cross-entropy, in [0, 1).
        initializer_range (`float`, defaults to 0.02): standard deviation of the normal initialisation of the head's
            Linear weights (the velocity network keeps diffusers' own initialisation).
        num_labels, id2label, label2id: as in every transformers classifier.
    """

    model_type = "prg"

    backbone_type: str = "unet2d"
    backbone_config: dict | None = None
    image_size: int | None = None
    num_channels: int | None = None
    probability_path: str | None = None  # None: DEFAULT_PROBABILITY_PATH, unless a legacy `path` is given
    num_steps: int = 20
    solver: str = "euler"
    feature_t: float | int = 1.0
    adjoint: bool = False
    ode_rtol: float = 1e-5
    ode_atol: float = 1e-5
    time_scale: float | int = 1000.0
    head_type: str = "prg"
    feature_blocks: list[str] | None = None
    feature_times: list[float] | None = None
    feedback_blocks: dict[str, str] | None = None
    head_width: int = 256
    head_depth: int = 2
    head_attention_heads: int = 4
    head_token_grid: int = 8
    head_pool_size: int = 16
    head_hidden_size: int | None = None
    head_bias: bool = True
    fm_loss_weight: float | int = 0.0
    label_smoothing: float | int = 0.0
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        self._resolve_probability_path(kwargs.pop("path", None))
        check_backbone_type(self.backbone_type)
        check_probability_path(self.probability_path)
        check_solver(self.solver)
        check_num_steps(self.num_steps)
        check_feature_t(self.feature_t)
        self._resolve_image_shape()
        if self.head_pool_size < 1:
            raise ValueError(f"head_pool_size must be a positive integer, got {self.head_pool_size}.")
        if self.head_hidden_size is None:
            self.head_hidden_size = self.num_channels * self.head_pool_size**2
        if self.feature_blocks is not None and not isinstance(self.feature_blocks, str):
            self.feature_blocks = list(self.feature_blocks)
        if self.feature_times is not None and not isinstance(self.feature_times, str):
            self.feature_times = [float(t) if isinstance(t, int) and not isinstance(t, bool) else t
                                  for t in self.feature_times]
        self.check_head()
        if not (self.fm_loss_weight >= 0 and math.isfinite(self.fm_loss_weight)):
            raise ValueError(f"fm_loss_weight (β) must be a finite number >= 0, got {self.fm_loss_weight}.")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}.")
        if not self.time_scale > 0:
            raise ValueError(f"time_scale must be > 0, got {self.time_scale}.")
        if not (self.initializer_range > 0 and math.isfinite(self.initializer_range)):
            raise ValueError(f"initializer_range must be a finite number > 0, got {self.initializer_range}.")
        for name in TRAINING_SWITCHES:
            kwargs.pop(name, None)
        kwargs.pop("auto_map", None)
        self.auto_map = dict(AUTO_MAP)
        custom_pipelines = kwargs.pop("custom_pipelines", None)
        if not IMPORTED_FROM_PACKAGE and custom_pipelines is not None:
            self.custom_pipelines = custom_pipelines
        super().__post_init__(**kwargs)

    @property
    def block_feature_times(self) -> list[float]:
        """The times at which the block heads read: `feature_times`, or `[feature_t]` when none are given."""
        return list(self.feature_times) if self.feature_times is not None else [self.feature_t]

    def check_head(self) -> None:
        """Raise a ValueError naming the problem and the fix unless `head_type`, `feature_blocks`, `feature_times`,
        `feedback_blocks` and the head sizes describe a head the network can feed. Called when the config is made
        and again when a model is built from it (`from_pretrained(..., head_type=...)` sets fields afterwards)."""
        check_choice("head_type", self.head_type, list(HEADS), "heads")
        if self.feature_blocks is not None:
            check_block_names("feature_blocks", self.feature_blocks, self.backbone_type, self.backbone_config)
        if self.feature_times is not None:
            check_feature_times(self.feature_times)
        blocks = BACKBONES[self.backbone_type].block_names(self.backbone_config)
        if HEADS[self.head_type].reads_blocks and not self.feature_blocks:
            raise ValueError(
                f"head_type {self.head_type!r} reads outputs of blocks of the velocity network, and feature_blocks "
                f"names none: give feature_blocks, e.g. feature_blocks=[{blocks[len(blocks) // 2]!r}] (the blocks of "
                f"this {self.backbone_type} network are {blocks})."
            )
        if self.feedback_blocks is not None:
            self._check_feedback_blocks(blocks)
        for name in ("head_width", "head_depth", "head_attention_heads", "head_token_grid"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if self.head_width % self.head_attention_heads:
            raise ValueError(
                f"head_attention_heads = {self.head_attention_heads} must divide head_width = {self.head_width}."
            )

    def _check_feedback_blocks(self, blocks: list[str]) -> None:
        """`feedback_blocks`: a {receiving block: sending block} dict of the diffeed head, each sending block later
        in the network than its receiving block."""
        if self.head_type != "diffeed":
            raise ValueError(
                f"feedback_blocks configures the 'diffeed' head; head_type is {self.head_type!r}. Drop "
                "feedback_blocks or set head_type='diffeed'."
            )
        if not isinstance(self.feedback_blocks, dict) or not self.feedback_blocks:
            raise ValueError(
                f"feedback_blocks must be a non-empty dict {{receiving block: sending block}}, got "
                f"{self.feedback_blocks!r}; or None for the default pairs."
            )
        check_block_names("feedback_blocks", list(self.feedback_blocks), self.backbone_type, self.backbone_config)
        check_block_names("feedback_blocks", list(self.feedback_blocks.values()), self.backbone_type,
                          self.backbone_config)
        for receiver, sender in self.feedback_blocks.items():
            if blocks.index(sender) <= blocks.index(receiver):
                raise ValueError(
                    f"feedback_blocks feeds {sender!r} back into {receiver!r}, which does not run before it: the "
                    f"sending block must come later in the network (its blocks in order: {blocks})."
                )

    def to_dict(self) -> dict:
        """The config as saved: every field, plus `auto_map` and `custom_pipelines` for transformers' remote code."""
        return {**super().to_dict(), "custom_pipelines": CUSTOM_PIPELINES}

    def _resolve_probability_path(self, legacy_path: str | None) -> None:
        """Set `probability_path` from itself, else from the `path` entry of configs saved before the rename,
        else to `DEFAULT_PROBABILITY_PATH`; the two names given with different values raise a ValueError."""
        if legacy_path is not None:
            if self.probability_path is not None and self.probability_path != legacy_path:
                raise ValueError(
                    f"probability_path = {self.probability_path!r} and path = {legacy_path!r} disagree; `path` is "
                    "the former name of probability_path: give probability_path only."
                )
            self.probability_path = legacy_path
        if self.probability_path is None:
            self.probability_path = DEFAULT_PROBABILITY_PATH

    def _resolve_image_shape(self) -> None:
        """Make image_size, num_channels and backbone_config agree, filling in whichever is missing."""
        given = dict(self.backbone_config or {})
        if self.image_size is None:
            self.image_size = given.get("sample_size", 32)
        if self.num_channels is None:
            self.num_channels = given.get("in_channels", 3)
        for name in ("image_size", "num_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}.")
        if not given:
            given = backbone_preset(self.backbone_type, DEFAULT_BACKBONE_PRESET, self.image_size, self.num_channels)
        expected = {"sample_size": self.image_size, "in_channels": self.num_channels}
        for key, value in expected.items():
            if given.setdefault(key, value) != value:
                raise ValueError(
                    f"backbone_config[{key!r}] = {given[key]} disagrees with the config's "
                    f"{'image_size' if key == 'sample_size' else 'num_channels'} = {value}; make them equal."
                )
        out_channels = given.get("out_channels") or self.num_channels
        if out_channels != self.num_channels:
            raise ValueError(
                f"A velocity network must output as many channels as it takes: backbone_config['out_channels'] = "
                f"{out_channels} but num_channels = {self.num_channels}."
            )
        self.backbone_config = given
