"""The `image-classification` and `image-feature-extraction` pipelines, with PRG checkpoints' image handling.

`pipeline(task, model=...)` picks its class from the task before it loads the model, so a class meant for PRG
models alone cannot be chosen per model. After `import prg_hub` the two tasks are therefore served by
subclasses of transformers' pipelines that differ from them only for PRG models: `PRGImageClassificationPipeline`
and `PRGFeatureExtractor`. For any other model they run the stock code.

For PRG models the images reach the model exactly as `PRGImageProcessor` makes them from the same image:
* a path, URL or base64 string is read with `prg_hub.image_files.open_image`, in its stored mode. Transformers'
  `load_image` would convert it to RGB with PIL first, saturating 16-bit images and dropping the alpha channel.
* the image processor converts every image with `prg_hub.image_conversion.to_rgb`, which also applies the EXIF
  orientation, as `load_image` does.
* an image that cannot be read stops the call with `prg_hub.image_files.UnreadableImageError` (a ValueError)
  whose message names it: `PATH: cannot read image (REASON)`. A call returns one result per input, in order,
  so no input is skipped silently; to go on past bad files, catch the error per image or call `open_image` on
  the paths first. Images over PIL's decompression-bomb limit (`PIL.Image.MAX_IMAGE_PIXELS`) are refused the
  same way.

Both pipelines take the speed options of `PRGPreTrainedModel.enable_fast_inference` when they are built, and
apply them to the model once:

    pipeline("image-classification", model="org/name", dtype=torch.bfloat16, compile=True, channels_last=True)

* `dtype` (transformers' own option, or its older name `torch_dtype`): the dtype of the weights, in which the
  velocity network runs. `pipeline(model="org/name", dtype=...)` loads the weights in it (a torch dtype or its
  name, as transformers takes it); a model object passed in is cast to it by `enable_fast_inference`, which names
  the dtypes it takes when given another. Without it the weights keep the dtype they were loaded in. The ODE
  state, the pixel values the processor makes and the features stay float32.
* `compile`: `torch.compile` the velocity network (fullgraph); the first call compiles it, later calls reuse it.
* `channels_last`: the network's weights in the channels-last memory format (faster convolutions on GPUs).

Other models refuse `compile` and `channels_last` with a ValueError, and keep transformers' handling of `dtype`.

The feature extractor takes per-call options of the reversed ODE:

    extractor(images, feature_t=0.5, num_steps=10, pool=True)
    extractor(images, return_blocks=True, feature_blocks=["mid_block"], feature_times=[0.1, 0.5])

* `feature_t` in (0, 1]: where along the path x_t is read (1 is noise); defaults to the checkpoint's config.
* `num_steps`: solver steps from t = 0 to `feature_t`; defaults to the checkpoint's config.
* `pool`: `False` returns x_t, shape (1, C, H, W) per image; `True` returns the pooled vector (1, C·p²) the PRG head
  reads.
* `return_blocks`: also return the outputs of blocks of the velocity network (`PRGModel.forward` with
  `output_block_features=True`): each image then gives

      {"features": what the call returns without return_blocks,
       "blocks": {"up_blocks.0@t=0.5": the block's output in v_θ(x_t, t), ...}}

  with (1, C, h, w) UNet2D maps and (1, N, D) DiT tokens, or with `pool=True` their means over positions (1, D),
  the vectors the linear head reads. `feature_blocks` and `feature_times` choose the blocks and times; they default
  to the checkpoint's config (`feature_times`: its `feature_times`, else [feature_t]).

Without `return_tensors=True` every tensor comes back as nested lists, as transformers' pipeline returns them.
"""

from __future__ import annotations

from transformers.pipelines import PIPELINE_REGISTRY, Pipeline
from transformers.pipelines.image_classification import ImageClassificationPipeline
from transformers.pipelines.image_feature_extraction import ImageFeatureExtractionPipeline
from transformers.utils import ModelOutput

from .block_features import mean_token
from .image_files import open_image
from .modeling_prg import PRGPreTrainedModel

# Prefix of the block features in the pipeline's model outputs, one flat entry per block and time, so that
# transformers' batching splits them per image as it splits the other outputs.
BLOCK_OUTPUT_PREFIX = "block_features."


def is_prg_model(model) -> bool:
    """Whether `model` is a PRG model, by the class names along its MRO. Through remote code from a local folder,
    transformers imports the model's modules and the pipeline's under different hashes, so `PRGPreTrainedModel`
    exists twice there and `isinstance` would answer no."""
    return any(cls.__name__ == PRGPreTrainedModel.__name__ for cls in type(model).__mro__)


def prg_model_inputs(pipe: Pipeline, image, timeout: float | None = None, **image_processor_kwargs) -> dict:
    """Model inputs of a PRG pipeline for one image: a path, URL or base64 string is read in its stored mode and
    the image processor converts it; a PIL image, array or tensor goes to the processor as it is. The pixel values
    stay float32 whatever the weights' dtype: they are the initial state of the ODE, which is integrated in float32.
    """
    if isinstance(image, str):
        image = open_image(image, timeout=timeout)
    return pipe.image_processor(image, return_tensors="pt", **image_processor_kwargs)


def apply_speed_options(pipe: Pipeline, dtype, compile: bool, channels_last: bool) -> None:
    """Apply a pipeline's construction options (module docstring) to its model, once.

    A PRG model gets `enable_fast_inference(dtype=..., compile=..., channels_last=...)`, with `dtype` the one asked
    for (`None` or "auto": the dtype the weights were loaded in). Any other model refuses `compile` and
    `channels_last` with a ValueError.
    """
    if is_prg_model(pipe.model):
        weights_dtype = pipe.model.dtype if dtype is None or dtype == "auto" else dtype
        pipe.model.enable_fast_inference(dtype=weights_dtype, compile=compile, channels_last=channels_last)
    elif compile or channels_last:
        raise ValueError(
            f"compile and channels_last only apply to PRG models; {type(pipe.model).__name__} does not take them."
        )


def requested_dtype(kwargs: dict):
    """The weights' dtype asked of a pipeline: `dtype`, else its older name `torch_dtype`, else None."""
    dtype = kwargs.get("dtype")
    return kwargs.get("torch_dtype") if dtype is None or dtype == "auto" else dtype


class PRGImageClassificationPipeline(ImageClassificationPipeline):
    """`ImageClassificationPipeline` reading images as `PRGImageProcessor` does for PRG models (module docstring):
    `pipeline("image-classification", model=prg_checkpoint)(images, top_k=5)` → [{"label", "score"}, ...].
    `compile` and `channels_last` (and `dtype`): the speed options of the module docstring."""

    def __init__(self, *args, compile: bool = False, channels_last: bool = False, **kwargs):
        dtype = requested_dtype(kwargs)
        super().__init__(*args, **kwargs)
        apply_speed_options(self, dtype, compile, channels_last)

    def preprocess(self, image, **preprocess_params):
        if is_prg_model(self.model):
            return prg_model_inputs(self, image, **preprocess_params)
        return super().preprocess(image, **preprocess_params)


class PRGFeatureExtractor(ImageFeatureExtractionPipeline):
    """Image feature extraction through the reversed flow; see the module docstring for the speed options
    (`compile`, `channels_last`, `dtype`), the call options and how images are read."""

    def __init__(self, *args, compile: bool = False, channels_last: bool = False, **kwargs):
        dtype = requested_dtype(kwargs)
        super().__init__(*args, **kwargs)
        apply_speed_options(self, dtype, compile, channels_last)

    def _sanitize_parameters(self, image_processor_kwargs=None, return_tensors=None, pool=None, feature_t=None,
                             num_steps=None, return_blocks=None, feature_blocks=None, feature_times=None, **kwargs):
        preprocess_params, _, postprocess_params = super()._sanitize_parameters(
            image_processor_kwargs=image_processor_kwargs, return_tensors=return_tensors, pool=pool, **kwargs
        )
        options = {"feature_t": feature_t, "num_steps": num_steps, "return_blocks": return_blocks,
                   "feature_blocks": feature_blocks, "feature_times": feature_times}
        given = sorted(name for name, value in options.items() if value is not None)
        if given and not is_prg_model(self.model):
            raise ValueError(f"{given} only apply to PRG models; {type(self.model).__name__} does not take them.")
        if not return_blocks and (feature_blocks is not None or feature_times is not None):
            raise ValueError(
                "feature_blocks and feature_times choose the blocks that return_blocks=True returns; pass "
                "return_blocks=True with them."
            )
        forward_params = {name: options[name] for name in ("feature_t", "num_steps") if options[name] is not None}
        if return_blocks:
            forward_params.update(output_block_features=True, feature_blocks=feature_blocks,
                                  feature_times=feature_times)
            postprocess_params["return_blocks"] = True
        return preprocess_params, forward_params, postprocess_params

    def preprocess(self, image, **preprocess_params):
        if is_prg_model(self.model):
            return prg_model_inputs(self, image, **preprocess_params)
        return super().preprocess(image, **preprocess_params)

    def _forward(self, model_inputs, **forward_params):
        outputs = self.model(**model_inputs, **forward_params)
        if not forward_params.get("output_block_features"):
            return outputs
        flat = {"last_hidden_state": outputs.last_hidden_state, "pooler_output": outputs.pooler_output}
        flat.update({BLOCK_OUTPUT_PREFIX + key: value for key, value in outputs.block_features.items()})
        return ModelOutput(flat)

    def postprocess(self, model_outputs, pool=None, return_tensors=False, return_blocks=False):
        features = super().postprocess(model_outputs, pool=pool, return_tensors=return_tensors)
        if not return_blocks:
            return features
        blocks = {}
        for name, value in model_outputs.items():
            if name.startswith(BLOCK_OUTPUT_PREFIX):
                value = mean_token(value) if pool else value
                blocks[name[len(BLOCK_OUTPUT_PREFIX):]] = value if return_tensors else value.tolist()
        return {"features": features, "blocks": blocks}


PIPELINE_CLASSES = {
    "image-classification": PRGImageClassificationPipeline,
    "image-feature-extraction": PRGFeatureExtractor,
}


def register_pipelines() -> None:
    """Serve each task of `PIPELINE_CLASSES` with its class, keeping the task's other settings."""
    for task, pipeline_class in PIPELINE_CLASSES.items():
        PIPELINE_REGISTRY.supported_tasks[task] = {**PIPELINE_REGISTRY.supported_tasks[task], "impl": pipeline_class}
