"""PRG models: a flow-matching velocity network used in reverse as a feature extractor and classifier.

`PRGModel` holds the velocity network v_θ(x, t) (a diffusers UNet2D or DiT behind `backbones.VelocityBackbone`).

* Features: integrate dx/dt = v_θ(x, t) from the image at t = 0 to t = `feature_t` (1 is noise) and return
  x_{feature_t}, shape (B, C, H, W), as `last_hidden_state`; `pooler_output` is x_{feature_t} average-pooled to
  `head_pool_size`² per channel and flattened, shape (B, C · head_pool_size²), which is what the PRG head reads.
* Block features: integrate from t = 0 through the increasing `feature_times` τ_1 < … < τ_K (each segment
  continuing from the last state, `solvers.segment_steps` intervals: `num_steps` over [0, τ_K], uniform where the
  times allow) and at each τ_k evaluate v_θ(x_{τ_k}, τ_k) once with forward hooks on `feature_blocks`, for that call
  only (`block_features.py`): `forward(..., output_block_features=True)`, `feature_states`, `read_blocks`.
* Pretraining: `flow_matching_loss` (GVP, ICFM or OT-CFM, see `paths.py`).
* Generation: `generate` integrates from noise at t = 1 to data at t = 0.

`PRGForImageClassification` puts the head of `config.head_type` (`heads.py`) on the features: the PRG head
LayerNorm(C·p²) → Linear(C·p², hidden) → Tanh → Linear(hidden, num_labels) on `pooler_output` ("prg", the
default), or a linear, attention, DifFormer or DifFeed head on the block features. It is trained with
L = CE(logits, y; label smoothing) + β · L_FM(x), β = `fm_loss_weight`, the L_FM term only when β > 0.

`PRGForFlowMatching` is the pretraining model: its forward returns L_FM of a batch, so that distributed wrappers
(DDP, FSDP) synchronise the gradients of the pretraining loss.

All three hold the velocity network under the same names (`prg.velocity.network.*`, with `base_model_prefix`
"prg"), so a checkpoint of any of them loads into the others; a classifier's head is initialised afresh, or
dropped. Heads are held as `head` (prg) or `<head_type>_head` (the others), so a head loads only into its own type.

Precision. Each network computes in its weights' dtype w; everything between network evaluations (the ODE state
x_t, the time grid, the flow-matching interpolants, targets and loss) is kept in the state dtype s =
`backbones.state_dtype`: float32 for bfloat16, float16 or float32 weights and inputs, float64 when the weights or
the inputs are float64. An Euler step of a bfloat16 model is therefore x_{k+1} = x_k + h·float32(v_θ(bf16(x_k),
t_k)): the state is rounded to bfloat16 only where the network reads it, so its error at t = `feature_t` is that
of the network's own rounding and does not grow with `num_steps`. The dtypes of the outputs follow:

| output                                              | dtype                                             |
|-----------------------------------------------------|---------------------------------------------------|
| last_hidden_state, hidden_states, pooler_output     | s (the features are the ODE state)                |
| block_features                                      | w (the network's activations)                     |
| logits                                              | s: the head reads its features cast to its        |
|                                                     | weights' dtype and its output is cast back to s   |
| loss, flow-matching loss                            | s                                                 |
| `generate` images                                   | s                                                 |

Under autocast (fp32 weights, the training scripts' mixed precision) s is float32 and the network's matrix
products run in bfloat16 as autocast decides; the solver and the losses compute in float32.

Speed. `enable_fast_inference(dtype=..., compile=..., channels_last=...)` casts the weights, compiles the velocity
network in place and puts the 4-D weights in channels-last memory format; see `FastInferenceOptions`. The hooked
evaluations that read blocks run the network eagerly (hooks and compiled graphs do not mix); the solver steps
between them use the compiled network.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import PatchEmbed, get_2d_sincos_pos_embed
from diffusers.utils.torch_utils import randn_tensor
from torch import nn
from torch._inductor import list_mode_options
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling, ImageClassifierOutput
from transformers.utils import ModelOutput
from typing_extensions import Self  # typing.Self from Python 3.11; torch depends on typing_extensions

from .backbones import backbone_type_of, build_backbone, state_dtype
from .block_features import adding_to_blocks, block_feature_key, check_block_names, reading_blocks
from .checks import check_feature_t, check_feature_times
from .configuration_prg import PRGConfig
from .finiteness import check_finite_output, check_finite_weights
from .heads import DifFeedHead, FeedbackPath, build_head, head_attribute, initialize_head_module
from .hub_upload import push_model_to_hub
from .paths import get_path
from .remote_code import write_remote_code
from .solvers import integrate, segment_steps

# |pixel value| above which an input cannot have come from an image processor: [0, 255] images or unnormalised
# data. PRGImageProcessor gives [-1, 1]; mean/std normalisations of natural images stay well within ±10.
MAX_ABS_PIXEL_VALUE = 20.0


@dataclass
class FlowMatchingOutput(ModelOutput):
    """Output of `PRGForFlowMatching`.

    Args:
        loss (`torch.FloatTensor` of shape `()`): the flow-matching loss L_FM of the batch, the mean over all
            elements of (v_θ(x_t, t) − u_t)² (see `paths.py`).
    """

    loss: torch.FloatTensor | None = None


@dataclass
class PRGModelOutput(BaseModelOutputWithPooling):
    """Output of `PRGModel`: `BaseModelOutputWithPooling` (last_hidden_state: x at feature_t, (B, C, H, W);
    pooler_output: it pooled, (B, C·p²); hidden_states: the trajectory, if asked) and

    Args:
        block_features (`dict[str, torch.Tensor]`, *optional*): with `output_block_features=True`,
            {`block_features.block_feature_key(name, t)` ("up_blocks.0@t=0.5"): the output of block `name` in
            v_θ(x_t, t)}, for each block and time read: (B, C, h, w) for UNet2D blocks, (B, N, D) for DiT blocks.
    """

    block_features: dict[str, torch.Tensor] | None = None


def ode_state_key(t: float) -> str:
    """The key of the ODE state x_t among a DifFeed head's frozen features: "x@t=t"."""
    return f"x@t={float(t)}"


WEIGHT_DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
    "float32": torch.float32, "fp32": torch.float32,
}


def resolve_weight_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """The torch dtype that `dtype` names: torch.bfloat16, torch.float16 or torch.float32, or one of the names of
    `WEIGHT_DTYPES` ("bfloat16"/"bf16", "float16"/"fp16", "float32"/"fp32"); a ValueError lists them otherwise."""
    if isinstance(dtype, str) and dtype in WEIGHT_DTYPES:
        return WEIGHT_DTYPES[dtype]
    if isinstance(dtype, torch.dtype) and dtype in WEIGHT_DTYPES.values():
        return dtype
    raise ValueError(
        f"dtype must be torch.bfloat16, torch.float16 or torch.float32, or one of the names {list(WEIGHT_DTYPES)}; "
        f"got {dtype!r}."
    )


@dataclass(frozen=True)
class FastInferenceOptions:
    """The speed options in effect on a PRG model, set by `PRGPreTrainedModel.enable_fast_inference`.

    A runtime state of the model, never saved: `save_pretrained` writes the same config.json and weight names with
    or without them (the weights in the dtype they have).

    Args:
        dtype: the weights' dtype after the last call.
        compile: the velocity network is compiled (`torch.compile`, fullgraph, in place).
        compile_mode: `torch.compile`'s mode of that compilation; None when not compiled.
        channels_last: the 4-D weights are in channels-last memory format.
    """

    dtype: torch.dtype
    compile: bool = False
    compile_mode: str | None = None
    channels_last: bool = False


# Inductor settings for a network compiled on the CPU. torch 2.13's C++ backend, with its convolution layout
# optimisation, schedules the read of nearest upsampling's input gradient (the UNet's `Upsample2D`) before the
# kernel that accumulates it: every weight below the first upsampler gets a zero or wrong gradient, while the
# forward pass is right. Keeping the layouts as they are gives exact gradients.
CPU_COMPILE_SETTINGS: dict[str, bool] = {"layout_optimization": False}


def strict_forward(forward):
    """Decorate the `forward` of a PRG model, whose body returns a `ModelOutput`:

    * a keyword argument that `forward` does not take raises a TypeError naming it and the arguments it takes,
      so that a misspelt option (`feature_T=0.5`) is never ignored;
    * `return_dict` (the argument, else `config.return_dict`) picks the `ModelOutput` or its `to_tuple()`.
    """
    signature = inspect.signature(forward)
    accepted = [name for name in signature.parameters if name != "self"]

    @functools.wraps(forward)
    def checked_forward(self, *args, **kwargs):
        unknown = [name for name in kwargs if name not in accepted]
        if unknown:
            raise TypeError(
                f"{type(self).__name__}.forward() got unexpected keyword arguments {unknown}; it takes {accepted}."
            )
        return_dict = signature.bind(self, *args, **kwargs).arguments.get("return_dict")
        output = forward(self, *args, **kwargs)
        return_dict = self.config.return_dict if return_dict is None else return_dict
        return output if return_dict else output.to_tuple()

    return checked_forward


class PRGPreTrainedModel(PreTrainedModel):
    """Shared loading, initialisation and checkpointing behaviour of the PRG models."""

    config_class = PRGConfig
    base_model_prefix = "prg"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True

    def _init_weights(self, module: nn.Module) -> None:
        """Initialise only PRG's own layers (the head's modules, which `from_pretrained` hands over one by one when
        a checkpoint has no head of this type), with `heads.initialize_head_module`: Linear and Conv weights ~
        N(0, initializer_range²), zero biases (the PRG head's last Linear has none when `config.head_bias` is
        False), identity LayerNorm and BatchNorm, tokens ~ N(0, initializer_range²). The diffusers network keeps
        its own initialisation.

        DiT's sin-cos positional embedding is a non-persistent buffer, absent from checkpoints, so it is recomputed
        here: `from_pretrained` builds the model on the meta device and would otherwise leave it undefined.
        """
        head = getattr(self, "head", None)
        if head is not None and any(module is part for part in head.modules()):
            initialize_head_module(module, self.config.initializer_range)
        elif isinstance(module, PatchEmbed) and module.pos_embed is not None:
            pos_embed = get_2d_sincos_pos_embed(
                module.pos_embed.shape[-1],
                (module.height, module.width),
                base_size=module.base_size,
                interpolation_scale=module.interpolation_scale,
                output_type="pt",
            )
            init.copy_(module.pos_embed, pos_embed.float().unsqueeze(0))

    fast_inference_options: FastInferenceOptions | None = None  # set by enable_fast_inference

    def enable_fast_inference(
        self,
        dtype: torch.dtype | str | None = None,
        compile: bool = False,
        channels_last: bool = False,
        compile_mode: str = "default",
    ) -> Self:
        """Turn on the speed options of inference (and finetuning) in place; return the model, for chaining:

            model = PRGForImageClassification.from_pretrained(path).enable_fast_inference(dtype="bf16", compile=True)

        Args:
            dtype: cast every weight to torch.bfloat16, torch.float16 or torch.float32 (or "bfloat16"/"bf16",
                "float16"/"fp16", "float32"/"fp32"); None keeps the weights' dtype. The ODE state stays float32
                (module docstring): with bfloat16 weights the features differ from float32 ones by the error of one
                bfloat16 evaluation of the network (bfloat16 rounds to 2⁻⁹ relative), whatever the number of steps.
            compile: compile the velocity network v_θ(x, t) (`base_model.velocity`, which casts x to the weights'
                dtype and v back) with `torch.compile(fullgraph=True, mode=compile_mode)`, in place
                (`nn.Module.compile`): the state dict, `save_pretrained` and `push_to_hub` keep the same weight
                names. fullgraph makes a graph break an error rather than a silent return to eager code. The graph
                is compiled at the first call, for its input shape (B, C, H, W), and serves every solver step and
                every later call of that shape without recompiling; at the first other shape, torch compiles one
                graph with symbolic sizes that serves the later ones (its automatic dynamic shapes). Per-step
                gradient checkpointing recomputes the compiled network in the backward pass. On the CPU, inductor's
                layout optimisation is left off (`CPU_COMPILE_SETTINGS`), and compile with channels_last is refused
                there (channels-last weights bring the wrong gradients back).
            channels_last: put the 4-D weights (the convolutions') in channels-last memory format.
            compile_mode: `torch.compile`'s mode, one of `torch._inductor.list_mode_options()` ("default",
                "reduce-overhead" for CUDA graphs, "max-autotune", …). CUDA graphs reuse the network's output
                buffer from call to call, which the fixed-grid solvers (euler, heun, midpoint) allow and
                torchdiffeq's methods do not (`solvers`).

        A later call adds to the earlier ones: compile=False or channels_last=False undo nothing, and compiling again
        with the same mode keeps the compiled network (a new mode compiles anew, never wrapping it twice). Neither
        train/eval mode nor the config changes. The options in effect are `self.fast_inference_options`.

        Raises:
            ValueError naming the allowed values for any other dtype or compile_mode, and for compile with
            channels_last on the CPU.
        """
        weight_dtype = None if dtype is None else resolve_weight_dtype(dtype)
        modes = list(list_mode_options())
        if compile_mode not in modes:
            raise ValueError(f"compile_mode must be one of {modes}; got {compile_mode!r}.")
        previous = self.fast_inference_options or FastInferenceOptions(dtype=self.dtype)
        on_cpu = self.device.type == "cpu"
        if on_cpu and (compile or previous.compile) and (channels_last or previous.channels_last):
            raise ValueError(
                "compile with channels_last is refused on the CPU: torch's inductor gives such a network wrong "
                "gradients there (its forward pass is right); use one of them."
            )
        if weight_dtype is not None:
            self.to(weight_dtype)
        if channels_last:
            self.to(memory_format=torch.channels_last)
        compiled_mode = previous.compile_mode
        if compile and compile_mode != compiled_mode:
            velocity = self.base_model.velocity
            if on_cpu:
                settings = {"options": {**list_mode_options(compile_mode), **CPU_COMPILE_SETTINGS}}
            else:
                settings = {"mode": compile_mode}
            velocity.compile(fullgraph=True, **settings)
            compiled_mode = compile_mode
        self.fast_inference_options = FastInferenceOptions(
            dtype=self.dtype,
            compile=compiled_mode is not None,
            compile_mode=compiled_mode,
            channels_last=previous.channels_last or channels_last,
        )
        return self

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func=None, every_n_layers=1):
        """`activation_checkpointing_enable()` (or `gradient_checkpointing_enable()`) turns on PRG's per-solver-step
        checkpointing, `PRGModel.gradient_checkpointing`; the diffusers network's own block checkpointing stays off.
        A training switch: it is not saved in the config."""
        self.base_model.gradient_checkpointing = enable

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`, plus the code that loads the checkpoint without prg_hub
        (`prg_hub.remote_code`). Every weight is checked first: a model holding NaN or Inf raises
        `prg_hub.finiteness.NonFiniteError` and nothing is written."""
        check_finite_weights(self, f"The model being saved to {str(save_directory)!r}")
        result = super().save_pretrained(save_directory, *args, **kwargs)
        write_remote_code(save_directory)
        return result

    def push_to_hub(self, repo_id: str, *, image_processor=None, card=None, **kwargs):
        """Upload config.json, the weights, preprocessor_config.json, the remote code and a PRG model card in one
        commit: `prg_hub.hub_upload.push_model_to_hub(self, repo_id, ...)`.

        Args:
            repo_id: the repo to push to ("org/name"), created if needed.
            image_processor: saved beside the weights; defaults to a `PRGImageProcessor` for `config.image_size`.
            card: the `README.md`; defaults to `prg_hub.model_card.render_model_card`, which records no results.
            kwargs: the keyword arguments of `PreTrainedModel.push_to_hub` (commit_message, private, token,
                revision, create_pr, max_shard_size, tags, …).

        Returns the commit's `CommitInfo`.
        """
        return push_model_to_hub(self, repo_id, image_processor=image_processor, card=card, **kwargs)

    @classmethod
    def from_diffusers(cls, network: nn.Module, probability_path: str = "otcfm", **config_kwargs) -> PRGPreTrainedModel:
        """Wrap an existing diffusers `UNet2DModel` or `DiTTransformer2DModel`, weights included.

        Args:
            network: the velocity network; its config becomes `backbone_config` (private `_` keys dropped).
            probability_path: the flow-matching path it was (or will be) trained with.
            config_kwargs: any other `PRGConfig` field (num_steps, feature_t, num_labels, …).
        """
        backbone_type = backbone_type_of(network)
        backbone_config = {k: v for k, v in network.config.items() if not k.startswith("_")}
        backbone_config = json.loads(json.dumps(backbone_config))  # tuples -> lists, as a saved config holds them
        config = PRGConfig(
            backbone_type=backbone_type, backbone_config=backbone_config, probability_path=probability_path,
            **config_kwargs,
        )
        model = cls(config)
        model.base_model.velocity.network.load_state_dict(network.state_dict())
        return model


# The weights of a classifier's head, whatever its type (`heads.head_attribute`).
HEAD_WEIGHTS = r"^(\w+_)?head\."


class PRGModel(PRGPreTrainedModel):
    """The velocity network v_θ and the reversed-ODE feature extractor. See the module docstring."""

    # A classifier checkpoint loads into PRGModel without its head, silently (as ViTModel from a ViT classifier).
    _keys_to_ignore_on_load_unexpected = [HEAD_WEIGHTS]

    def __init__(self, config: PRGConfig):
        super().__init__(config)
        self.velocity = build_backbone(config.backbone_type, config.backbone_config, config.time_scale)
        self.probability_path = get_path(config.probability_path)
        self.pool = nn.AdaptiveAvgPool2d(config.head_pool_size)
        self.gradient_checkpointing = False  # recompute each solver step in the backward pass (training switch)
        self.post_init()

    _passed_a_training_batch = False  # True once a training batch's values passed check_pixel_values

    def check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        """Raise a ValueError naming the problem if `pixel_values` is not a (B, C, H, W) batch it can take.

        The dtype and shape are checked on every call, at no cost. The values, finite with |x| <=
        `MAX_ABS_PIXEL_VALUE`, are read back from the device: that costs one host synchronisation in eval mode, on
        every call (inference reads its output anyway); in training mode only on the first batch, until one has
        passed, so that a systematic mistake ([0, 255] images, no normalisation) fails at once while the later
        training steps of this model never wait for the device.
        """
        if not isinstance(pixel_values, torch.Tensor) or not pixel_values.is_floating_point():
            got = getattr(pixel_values, "dtype", type(pixel_values).__name__)
            raise ValueError(
                f"pixel_values must be a floating-point torch.Tensor of shape (B, C, H, W) in [-1, 1], got {got}. "
                "Use PRGImageProcessor to convert images."
            )
        channels = self.config.num_channels
        if pixel_values.dim() != 4 or pixel_values.shape[1] != channels:
            raise ValueError(
                f"pixel_values must have shape (B, {channels}, H, W) for this {channels}-channel model, got "
                f"{tuple(pixel_values.shape)}. Use PRGImageProcessor, which converts images to RGB."
            )
        self.velocity.check_spatial_size(*pixel_values.shape[-2:])
        if not pixel_values.numel() or (self.training and self._passed_a_training_batch):
            return
        largest = pixel_values.detach().abs().amax().item()  # NaN if any value is NaN
        if not math.isfinite(largest):
            raise ValueError(
                "pixel_values contains NaN or Inf values; the reversed ODE needs finite inputs in [-1, 1]. "
                "Check the image decoding and normalisation."
            )
        if largest > MAX_ABS_PIXEL_VALUE:
            raise ValueError(
                f"pixel_values reach |x| = {largest:g}, far outside the [-1, 1] this model was trained on; were the "
                "images passed as [0, 255] values or without normalisation? Use PRGImageProcessor to convert them."
            )
        if self.training:
            self._passed_a_training_batch = True

    def ode_state(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`pixel_values` (B, C, H, W) as an ODE state: cast to `backbones.state_dtype` of the weights and the input
        (float32, or float64 for float64 weights or input)."""
        return pixel_values.to(state_dtype(self.velocity.weight_dtype, pixel_values.dtype))

    def integrate_from(
        self, x: torch.Tensor, t_start: float, t_end: float, num_steps: int, return_trajectory: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Integrate dx/dt = v_θ(x, t) from x at t_start to t_end with the config's solver (and its per-step
        checkpointing, adjoint and tolerances); see `solvers.integrate`. The state keeps the dtype of x."""
        return integrate(
            self.velocity,
            x,
            t_start,
            t_end,
            num_steps,
            solver=self.config.solver,
            checkpoint=self.gradient_checkpointing,
            adjoint=self.config.adjoint,
            rtol=self.config.ode_rtol,
            atol=self.config.ode_atol,
            return_trajectory=return_trajectory,
        )

    def encode(
        self, pixel_values: torch.Tensor, feature_t: float, num_steps: int, return_trajectory: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Integrate from the images x_0 = pixel_values (t = 0) to x_{feature_t}; see `solvers.integrate`. The state
        keeps the dtype of `pixel_values` (pass `ode_state(pixel_values)`)."""
        return self.integrate_from(pixel_values, 0.0, feature_t, num_steps, return_trajectory)

    def feature_states(self, x: torch.Tensor, feature_times: list[float], num_steps: int) -> tuple[torch.Tensor, ...]:
        """(x_{τ_1}, …, x_{τ_K}), each (B, C, H, W): the reversed ODE integrated from x = x_0 (t = 0) through the
        increasing `feature_times`, each segment continuing from the state the previous one reached, with
        `solvers.segment_steps(feature_times, num_steps)` intervals (num_steps over [0, τ_K], uniform where the times
        allow; one time τ gives exactly `encode(x, τ, num_steps)`)."""
        states, start = [], 0.0
        for end, steps in zip(feature_times, segment_steps(feature_times, num_steps), strict=True):
            x = self.integrate_from(x, start, end, steps)
            states.append(x)
            start = end
        return tuple(states)

    def read_blocks(
        self,
        states: tuple[torch.Tensor, ...],
        feature_times: list[float],
        feature_blocks: list[str],
        feedback: FeedbackPath | None = None,
        sent: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """{`block_feature_key(name, τ_k)`: the output of block `name` in v_θ(x_{τ_k}, τ_k)} for the states at
        `feature_times` (`feature_states`) and each of `feature_blocks`: one evaluation of the network per time, with
        forward hooks on the blocks for that call only, which stops once the last of them has run
        (`block_features.reading_blocks`).

        With `feedback` (a DifFeed head's `heads.FeedbackPath`), `feedback(outputs of its sending blocks)` is added
        to its receiving blocks in that evaluation. The sending blocks' outputs come from a first evaluation at the
        same (x_t, t), made here, or from `sent` ({`block_feature_key(sender, τ_k)`: output}) when given.

        The evaluations call the velocity adapter's `forward`, so a compiled network runs them eagerly. Gradients
        flow to the network, the states and the feedback as the caller's grad mode allows.
        """
        network = self.velocity.network
        features = {}
        for x, t in zip(states, feature_times, strict=True):
            time = torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)
            additions = {}
            if feedback is not None:
                if sent is None:
                    with reading_blocks(network, feedback.senders, stop_when_read=True) as sent_now:
                        self.velocity.forward(x, time)
                else:
                    sent_now = {name: sent[block_feature_key(name, t)] for name in feedback.senders}
                additions = feedback(sent_now)
            with adding_to_blocks(network, additions), reading_blocks(network, feature_blocks, True) as outputs:
                self.velocity.forward(x, time)
            features.update({block_feature_key(name, t): outputs[name] for name in feature_blocks})
        return features

    def block_reading(
        self, feature_blocks: list[str] | None, feature_times: list[float] | None, feature_t: float
    ) -> tuple[list[str], list[float]]:
        """The blocks and times a call with `output_block_features=True` reads: the arguments, else the config's
        `feature_blocks` and `feature_times`, else [feature_t]; checked, with a ValueError naming the fix."""
        blocks = self.config.feature_blocks if feature_blocks is None else feature_blocks
        if not blocks:
            names = self.velocity.block_names(self.config.backbone_config)
            raise ValueError(
                "output_block_features=True reads blocks of the velocity network, and none are given: pass "
                f"feature_blocks=[...] or set config.feature_blocks (this {self.config.backbone_type} network's blocks "
                f"are {names})."
            )
        check_block_names("feature_blocks", blocks, self.config.backbone_type, self.config.backbone_config)
        times = feature_times if feature_times is not None else self.config.feature_times or [feature_t]
        check_feature_times(times)
        return list(blocks), [float(t) for t in times]

    @strict_forward
    def forward(
        self,
        pixel_values: torch.Tensor,
        feature_t: float | None = None,
        num_steps: int | None = None,
        output_hidden_states: bool | None = None,
        output_block_features: bool | None = None,
        feature_blocks: list[str] | None = None,
        feature_times: list[float] | None = None,
        return_dict: bool | None = None,
    ) -> PRGModelOutput | tuple:
        """Reverse the flow from the images to `feature_t`.

        Args:
            pixel_values: images in [-1, 1], shape (B, C, H, W), any floating dtype; the ODE starts from them cast to
                the state dtype (`ode_state`: float32, or float64 for float64 weights or input).
            feature_t, num_steps: override the config's values for this call.
            output_hidden_states: also return the trajectory x_{t_0}, …, x_{t_num_steps} (num_steps + 1 tensors of
                shape (B, C, H, W), t_0 = 0 and the last = feature_t).
            output_block_features: also return `block_features`: the outputs of `feature_blocks` in v_θ(x_t, t) at
                each of `feature_times` (`feature_states`, `read_blocks`). They come from an integration of their
                own, unless the times are [feature_t]: then one integration serves both.
            feature_blocks, feature_times: what `output_block_features` reads; default: the config's
                `feature_blocks`, and its `feature_times` or [feature_t].
            return_dict: return a `PRGModelOutput` (default: `config.return_dict`) or its tuple.

        Returns:
            `PRGModelOutput` with last_hidden_state (B, C, H, W), pooler_output (B, C·p²) and, if asked,
            hidden_states (in the state dtype) and block_features (in the network's dtype). In eval mode, features
            holding NaN or Inf raise `prg_hub.finiteness.NonFiniteError`.
        """
        # The values this call uses are checked, config values included (`from_pretrained(..., num_steps=...)` sets
        # config fields after the config has checked itself): feature_t here, num_steps and the solver by integrate.
        feature_t = self.config.feature_t if feature_t is None else feature_t
        num_steps = self.config.num_steps if num_steps is None else num_steps
        check_feature_t(feature_t)
        output_hidden_states = (
            self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        )
        if not output_block_features and (feature_blocks is not None or feature_times is not None):
            raise ValueError(
                "feature_blocks and feature_times choose what output_block_features=True reads; pass "
                "output_block_features=True with them."
            )
        self.check_pixel_values(pixel_values)
        x = self.ode_state(pixel_values)

        block_features, trajectory = None, None
        if output_block_features:
            blocks, times = self.block_reading(feature_blocks, feature_times, feature_t)
            states = self.feature_states(x, times, num_steps)
            block_features = self.read_blocks(states, times, blocks)
            if times == [feature_t] and not output_hidden_states:
                trajectory = states[-1]
        if trajectory is None:
            trajectory = self.encode(x, feature_t, num_steps, return_trajectory=output_hidden_states)
        features = trajectory[-1] if output_hidden_states else trajectory
        if not self.training:
            check_finite_output(features, "features")
            for key, value in (block_features or {}).items():
                check_finite_output(value, f"block features {key}")
        return PRGModelOutput(
            last_hidden_state=features,
            pooler_output=self.pool(features).flatten(1),
            hidden_states=trajectory if output_hidden_states else None,
            block_features=block_features,
        )

    def flow_matching_loss(
        self, pixel_values: torch.Tensor, generator: torch.Generator | None = None, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        """L_FM on a batch of images in [-1, 1], shape (B, C, H, W): mean over all elements of (v_θ(x_t, t) − u_t)².

        `noise`: ε of the same shape, already coupled with the images (`prg_hub.noise_pairing`); else drawn here.
        x, ε, x_t, u_t and the loss are in the state dtype (`ode_state`); the network computes in its own.
        """
        self.check_pixel_values(pixel_values)
        pixel_values = self.ode_state(pixel_values)
        if noise is not None:
            noise = noise.to(pixel_values.dtype)
        return self.probability_path.flow_matching_loss(self.velocity, pixel_values, generator, noise)

    @torch.no_grad()
    def generate(
        self,
        num_images: int = 1,
        num_steps: int | None = None,
        generator: torch.Generator | None = None,
        solver: str | None = None,
    ) -> torch.Tensor:
        """Sample images: draw ε ~ N(0, I) at t = 1 and integrate to t = 0 with `num_steps` steps of `solver`
        (default: the config's).

        Returns a tensor of shape (num_images, C, H, W) clamped to [-1, 1], in the state dtype (float32, or float64
        for float64 weights): the noise is drawn and integrated in it, as `forward` integrates.
        """
        if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
            raise ValueError(f"num_images must be an integer >= 1, got {num_images!r}.")
        num_steps = self.config.num_steps if num_steps is None else num_steps
        solver = self.config.solver if solver is None else solver
        shape = (num_images, self.config.num_channels, self.config.image_size, self.config.image_size)
        dtype = state_dtype(self.velocity.weight_dtype)
        noise = randn_tensor(shape, generator=generator, device=self.device, dtype=dtype)
        images = integrate(
            self.velocity,
            noise,
            1.0,
            0.0,
            num_steps,
            solver=solver,
            rtol=self.config.ode_rtol,
            atol=self.config.ode_atol,
        )
        return images.clamp(-1.0, 1.0)


class PRGForImageClassification(PRGPreTrainedModel):
    """`PRGModel` plus a classifier head (`heads.HEADS[config.head_type]`), trained end to end through the ODE
    solver, or on a frozen velocity network.

    The forward pass is two stages, so that a frozen network's part can be computed once per image and cached:

        frozen = model.frozen_features(pixel_values)   # no head parameter involved
        logits = model.head_logits(frozen)             # equals model(pixel_values).logits
    """

    def __init__(self, config: PRGConfig):
        super().__init__(config)
        config.check_head()  # again: from_pretrained sets config fields after the config checked itself
        self.prg = PRGModel(config)
        self.add_module(head_attribute(config.head_type), build_head(config))
        self.post_init()

    @property
    def head(self) -> nn.Module:
        """The classifier head, held as `head` for the prg head and as `<head_type>_head` for the others
        (`heads.head_attribute`): a checkpoint's head weights load only into a head of the same type, and another
        type's head starts from a fresh initialisation (its weights reported as unused)."""
        name = head_attribute(self.config.head_type)
        if name not in self._modules:  # while __init__ registers it
            raise AttributeError(f"{type(self).__name__} has no {name} yet")
        return self._modules[name]

    def frozen_features(self, pixel_values: torch.Tensor, num_steps: int | None = None) -> dict[str, torch.Tensor]:
        """What the head reads, computed with none of its parameters: the part of the forward pass that a frozen
        velocity network lets one compute once per image and cache.

        * prg: {"pooled": x at feature_t, pooled, (B, C·p²)};
        * linear, attention, difformer: `head.reduce` of the block features at the head's times (averages (B, D)
          or pooled tokens (B, n, D) per `block_feature_key`);
        * diffeed: the ODE states {`ode_state_key(t)`: x_t (B, C, H, W)} at its times and the outputs of its
          sending blocks there (the first of its two passes); the second pass depends on its feedback.
        """
        if not self.head.reads_blocks:
            return {"pooled": self.prg(pixel_values, num_steps=num_steps, return_dict=True).pooler_output}
        return self._read_for_head(pixel_values, num_steps)[0]

    def frozen_blocks(self) -> list[str]:
        """The blocks whose outputs a block head's `frozen_features` are made of, at each of its times: its
        `feature_blocks`, or a DifFeed head's sending blocks."""
        head = self.head
        return list(dict.fromkeys(head.feedback.senders)) if isinstance(head, DifFeedHead) else head.feature_blocks

    def frozen_features_of_pass(
        self, states: dict[float, torch.Tensor], block_features: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """`frozen_features` from a reversed-ODE pass already made (one pass can serve several heads): `states`
        {t: x_t} holding the head's times (the prg head: `feature_t`), and `block_features` holding the outputs of
        `frozen_blocks()` at them."""
        head = self.head
        if not head.reads_blocks:
            return {"pooled": self.prg.pool(states[self.config.feature_t]).flatten(1)}
        if not isinstance(head, DifFeedHead):
            return head.reduce(block_features)
        frozen = {ode_state_key(t): states[t] for t in head.feature_times}
        frozen.update({block_feature_key(name, t): block_features[block_feature_key(name, t)]
                       for t in head.feature_times for name in self.frozen_blocks()})
        return frozen

    def head_logits(self, frozen_features: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits (B, num_labels) in the state dtype of the weights from `frozen_features`; a diffeed head runs its
        second network pass per time here (`PRGModel.read_blocks` with its feedback)."""
        head = self.head
        if not head.reads_blocks:
            return head(frozen_features["pooled"])
        if isinstance(head, DifFeedHead):
            states = [frozen_features[ode_state_key(t)] for t in head.feature_times]
            block_features = self.prg.read_blocks(states, head.feature_times, head.feature_blocks, head.feedback,
                                                  sent=frozen_features)
            frozen_features = head.reduce(block_features)
        return head.classify(frozen_features).to(state_dtype(self.prg.velocity.weight_dtype))

    def _read_for_head(
        self, pixel_values: torch.Tensor, num_steps: int | None
    ) -> tuple[dict[str, torch.Tensor], tuple[torch.Tensor, ...]]:
        """(`frozen_features` of a block head, the ODE states (x_0, x_{τ_1}, …, x_{τ_K}) they were read at)."""
        num_steps = self.config.num_steps if num_steps is None else num_steps
        self.prg.check_pixel_values(pixel_values)
        x = self.prg.ode_state(pixel_values)
        times = self.head.feature_times
        states = self.prg.feature_states(x, times, num_steps)
        block_features = self.prg.read_blocks(states, times, self.frozen_blocks())
        return self.frozen_features_of_pass(dict(zip(times, states, strict=True)), block_features), (x, *states)

    @strict_forward
    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        feature_t: float | None = None,
        num_steps: int | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> ImageClassifierOutput | tuple:
        """Classify images in [-1, 1], shape (B, C, H, W).

        With `labels` (B,) of class indices, `loss` = CE(logits, labels; label_smoothing) + β·L_FM(pixel_values)
        where the L_FM term is added only when β = `config.fm_loss_weight` > 0.

        `num_steps` overrides the config's. The prg head reads x at `feature_t` (overridable here), and
        `output_hidden_states` returns the trajectory, as `PRGModel.forward`. The block heads read at the times they
        were built for (`config.feature_times`): `feature_t` is refused, and `output_hidden_states` returns the
        ODE states (x_0, x_{τ_1}, …, x_{τ_K}) they read.
        Returns `ImageClassifierOutput` with logits (B, num_labels) in the state dtype (float32 for bfloat16, float16
        or float32 weights; see the module docstring) (or its tuple, see `PRGModel.forward`). In eval mode, logits
        holding NaN or Inf raise `prg_hub.finiteness.NonFiniteError` rather than scoring a class.
        """
        if self.head.reads_blocks:
            if feature_t is not None:
                raise ValueError(
                    f"feature_t is the time the prg head reads; this model's {self.config.head_type!r} head reads "
                    f"its blocks at feature_times {self.head.feature_times}, fixed when it was built. Pass num_steps "
                    "only."
                )
            output_hidden_states = (
                self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
            )
            frozen, states = self._read_for_head(pixel_values, num_steps)
            hidden_states = states if output_hidden_states else None
        else:
            features = self.prg(
                pixel_values,
                feature_t=feature_t,
                num_steps=num_steps,
                output_hidden_states=output_hidden_states,
                return_dict=True,
            )
            frozen, hidden_states = {"pooled": features.pooler_output}, features.hidden_states
        logits = self.head_logits(frozen)
        if not self.training:
            check_finite_output(logits, "logits")

        loss = None
        if labels is not None:
            self._check_labels(labels, pixel_values.shape[0])
            loss = F.cross_entropy(logits, labels, label_smoothing=self.config.label_smoothing)
            if self.config.fm_loss_weight > 0:
                # pixel_values went through self.prg's check above: L_FM straight from the path, not checked again
                fm_loss = self.prg.probability_path.flow_matching_loss(
                    self.prg.velocity, self.prg.ode_state(pixel_values)
                )
                loss = loss + self.config.fm_loss_weight * fm_loss

        return ImageClassifierOutput(loss=loss, logits=logits, hidden_states=hidden_states)

    _labels_passed_in_training = False  # True once a training batch's labels passed _check_labels

    def _check_labels(self, labels: torch.Tensor, batch_size: int) -> None:
        """Raise a ValueError unless `labels` are integer class indices (B,) in [0, num_labels).

        As for the pixel values (`PRGModel.check_pixel_values`), the range is read back from the device on every
        call in eval mode, and in training mode only until one batch has passed.
        """
        num_labels = self.config.num_labels
        if labels.shape != (batch_size,) or labels.is_floating_point():
            raise ValueError(
                f"labels must be integer class indices of shape ({batch_size},), got {labels.dtype} of shape "
                f"{tuple(labels.shape)}."
            )
        if not labels.numel() or (self.training and self._labels_passed_in_training):
            return
        if labels.min() < 0 or labels.max() >= num_labels:
            raise ValueError(
                f"labels must be in [0, {num_labels}) for this {num_labels}-label model, got values from "
                f"{labels.min().item()} to {labels.max().item()}. Set num_labels/id2label in the config to match "
                "the data set."
            )
        if self.training:
            self._labels_passed_in_training = True


class PRGForFlowMatching(PRGPreTrainedModel):
    """`PRGModel` trained from scratch with flow matching: the forward pass returns the pretraining loss

        L_FM = mean over batch, channels and pixels of (v_θ(x_t, t) − u_t)²,   t ~ U[0, 1], ε ~ N(0, I),

    with x_t = α_t·x + σ_t·ε and u_t = α'_t·x + σ'_t·ε on `config.probability_path` (`paths.py`).

        model = PRGForFlowMatching(config)
        loss = model(pixel_values).loss  # under DDP too: the loss is computed inside forward
        model.save_pretrained(folder)  # loads as PRGModel, PRGForImageClassification (new head) or itself
        samples = model.prg.generate(16)  # as for every PRG model
    """

    # A classifier checkpoint loads into PRGForFlowMatching without its head, silently, as into PRGModel.
    _keys_to_ignore_on_load_unexpected = [HEAD_WEIGHTS]

    def __init__(self, config: PRGConfig):
        super().__init__(config)
        self.prg = PRGModel(config)
        self.post_init()

    @strict_forward
    def forward(
        self,
        pixel_values: torch.Tensor,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
        return_dict: bool | None = None,
    ) -> FlowMatchingOutput | tuple:
        """The flow-matching loss of a batch of images in [-1, 1], shape (B, C, H, W) (`PRGModel.flow_matching_loss`):

            L_FM = mean over all elements of (v_θ(x_t, t) − u_t)², a scalar.

        Args:
            pixel_values: the data x, shape (B, C, H, W); cast to the state dtype (`PRGModel.ode_state`).
            generator: the source of t and ε (default: torch's global generator).
            noise: ε (B, C, H, W) already coupled with the images (`prg_hub.noise_pairing.NoisePairing`, which
                pairs OT-CFM batches off the training step); drawn and coupled here when None.
            return_dict: return a `FlowMatchingOutput` (default: `config.return_dict`) or the tuple (loss,).
        """
        return FlowMatchingOutput(loss=self.prg.flow_matching_loss(pixel_values, generator, noise))
