"""`PRGConfig`: everything needed to rebuild a PRG model (backbone, path, solver, head and loss settings)."""

from __future__ import annotations

import math

from transformers import PreTrainedConfig

from .backbones import BACKBONES, check_backbone_type
from .paths import PATHS
from .solvers import check_num_steps, check_solver

# transformers' remote-code entries. With them a saved PRG checkpoint loads through transformers alone
# (`trust_remote_code=True`), from the modules that `prg_hub.remote_code` copies beside the weights.
AUTO_MAP = {
    "AutoConfig": "configuration_prg.PRGConfig",
    "AutoModel": "modeling_prg.PRGModel",
    "AutoModelForImageClassification": "modeling_prg.PRGForImageClassification",
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


class PRGConfig(PreTrainedConfig):
    r"""Configuration of `PRGModel` and `PRGForImageClassification`.

    Args:
        backbone_type (`str`, defaults to `"unet2d"`): `"unet2d"` (`diffusers.UNet2DModel`) or `"dit"`
            (`diffusers.DiTTransformer2DModel`).
        backbone_config (`dict`, *optional*): the diffusers config of the velocity network. Defaults to a small
            working network of `backbone_type` for `image_size`×`image_size` images with `num_channels` channels.
        image_size (`int`, *optional*): side of the square input images. Taken from `backbone_config["sample_size"]`
            when that is given, else 32.
        num_channels (`int`, *optional*): image channels. Taken from `backbone_config["in_channels"]`, else 3.
        path (`str`, defaults to `"otcfm"`): the flow-matching path, `"gvp"`, `"icfm"` or `"otcfm"`.
        num_steps (`int`, defaults to 20): solver grid intervals between t = 0 and `feature_t` (and for generation).
        solver (`str`, defaults to `"euler"`): `"euler"`, `"heun"`, `"midpoint"` (fixed-grid, exact backprop) or any
            torchdiffeq method (e.g. `"dopri5"`).
        feature_t (`float`, defaults to 1.0): the time in (0, 1] at which x_t is the representation (1 is noise).
        adjoint (`bool`, defaults to `False`): solve with torchdiffeq's adjoint method (approximate gradients).
        ode_rtol, ode_atol (`float`, defaults to 1e-5): tolerances of adaptive solvers.
        time_scale (`float`, defaults to 1000): the network sees timestep `time_scale · t`.
        head_pool_size (`int`, defaults to 16): the PRG head pools x_t to `head_pool_size`² per channel.
        head_hidden_size (`int`, *optional*): width of the head's hidden layer; defaults to its input size
            `num_channels · head_pool_size²` (768 for RGB), as in the paper.
        fm_loss_weight (`float`, defaults to 0.0): β in L = CE + β·L_FM.
        label_smoothing (`float`, defaults to 0.0): label smoothing of the cross-entropy, in [0, 1).
        num_labels, id2label, label2id: as in every transformers classifier.
    """

    model_type = "prg"

    backbone_type: str = "unet2d"
    backbone_config: dict | None = None
    image_size: int | None = None
    num_channels: int | None = None
    path: str = "otcfm"
    num_steps: int = 20
    solver: str = "euler"
    feature_t: float | int = 1.0
    adjoint: bool = False
    ode_rtol: float = 1e-5
    ode_atol: float = 1e-5
    time_scale: float | int = 1000.0
    head_pool_size: int = 16
    head_hidden_size: int | None = None
    fm_loss_weight: float | int = 0.0
    label_smoothing: float | int = 0.0

    def __post_init__(self, **kwargs):
        check_backbone_type(self.backbone_type)
        if self.path not in PATHS:
            raise ValueError(f"Unknown path {self.path!r}: allowed paths are {sorted(PATHS)}.")
        check_solver(self.solver)
        check_num_steps(self.num_steps)
        check_feature_t(self.feature_t)
        self._resolve_image_shape()
        for name in ("image_size", "num_channels", "head_pool_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}.")
        if self.head_hidden_size is None:
            self.head_hidden_size = self.num_channels * self.head_pool_size**2
        if not (self.fm_loss_weight >= 0 and math.isfinite(self.fm_loss_weight)):
            raise ValueError(f"fm_loss_weight (β) must be a finite number >= 0, got {self.fm_loss_weight}.")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}.")
        if not self.time_scale > 0:
            raise ValueError(f"time_scale must be > 0, got {self.time_scale}.")
        for name in TRAINING_SWITCHES:
            kwargs.pop(name, None)
        kwargs.pop("auto_map", None)
        self.auto_map = dict(AUTO_MAP)
        custom_pipelines = kwargs.pop("custom_pipelines", None)
        if not IMPORTED_FROM_PACKAGE and custom_pipelines is not None:
            self.custom_pipelines = custom_pipelines
        super().__post_init__(**kwargs)

    def to_dict(self) -> dict:
        """The config as saved: every field, plus `auto_map` and `custom_pipelines` for transformers' remote code."""
        return {**super().to_dict(), "custom_pipelines": CUSTOM_PIPELINES}

    def _resolve_image_shape(self) -> None:
        """Make image_size, num_channels and backbone_config agree, filling in whichever is missing."""
        given = dict(self.backbone_config or {})
        if self.image_size is None:
            self.image_size = given.get("sample_size", 32)
        if self.num_channels is None:
            self.num_channels = given.get("in_channels", 3)
        if not given:
            given = BACKBONES[self.backbone_type].default_config(self.image_size, self.num_channels)
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


def check_feature_t(feature_t: float) -> None:
    """Raise a ValueError unless 0 < feature_t <= 1."""
    if isinstance(feature_t, bool) or not isinstance(feature_t, (int, float)) or not 0 < feature_t <= 1:
        raise ValueError(f"feature_t must be in (0, 1] (t = 0 is data, t = 1 is noise), got {feature_t!r}.")
