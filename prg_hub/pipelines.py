"""`PRGFeatureExtractor`, the `image-feature-extraction` pipeline for PRG checkpoints.

After `import prg_hub`, `pipeline("image-feature-extraction", model=...)` returns a `PRGFeatureExtractor`.
It is transformers' `ImageFeatureExtractionPipeline` plus two per-call options of the reversed ODE:

    extractor(images, feature_t=0.5, num_steps=10, pool=True)

* `feature_t` in (0, 1]: where along the path x_t is read (1 is noise); defaults to the checkpoint's config.
* `num_steps`: solver steps from t = 0 to `feature_t`; defaults to the checkpoint's config.
* `pool`: `False` returns x_t, shape (C, H, W) per image; `True` returns the pooled vector (C·p²) the PRG head reads.

For models other than PRG it behaves exactly like `ImageFeatureExtractionPipeline`, which it subclasses.
"""

from __future__ import annotations

from transformers.pipelines import PIPELINE_REGISTRY
from transformers.pipelines.image_feature_extraction import ImageFeatureExtractionPipeline

from .modeling_prg import PRGPreTrainedModel

TASK = "image-feature-extraction"


class PRGFeatureExtractor(ImageFeatureExtractionPipeline):
    """Image feature extraction through the reversed flow; see the module docstring for the call options."""

    def _sanitize_parameters(self, image_processor_kwargs=None, return_tensors=None, pool=None, feature_t=None,
                             num_steps=None, **kwargs):
        preprocess_params, _, postprocess_params = super()._sanitize_parameters(
            image_processor_kwargs=image_processor_kwargs, return_tensors=return_tensors, pool=pool, **kwargs
        )
        forward_params = {name: value for name, value in (("feature_t", feature_t), ("num_steps", num_steps))
                          if value is not None}
        if forward_params and not isinstance(self.model, PRGPreTrainedModel):
            raise ValueError(
                f"{sorted(forward_params)} only apply to PRG models; {type(self.model).__name__} does not take them."
            )
        return preprocess_params, forward_params, postprocess_params

    def _forward(self, model_inputs, **forward_params):
        return self.model(**model_inputs, **forward_params)


def register_feature_extraction_pipeline() -> None:
    """Serve the `image-feature-extraction` task with `PRGFeatureExtractor`, keeping the task's other settings."""
    PIPELINE_REGISTRY.supported_tasks[TASK] = {**PIPELINE_REGISTRY.supported_tasks[TASK], "impl": PRGFeatureExtractor}
