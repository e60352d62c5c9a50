"""prg_hub: Pretrained Reversible Generation (PRG) models for the Hugging Face ecosystem.

Importing the package registers PRG with transformers: `AutoConfig`, `AutoModel`,
`AutoModelForImageClassification`, `AutoModelForPreTraining`, `AutoImageProcessor` and `pipeline(...)` then load
PRG checkpoints.

`DEFAULT_MODEL` is the folder of the checkpoint installed with the package, a CIFAR-10 classifier (see its
README.md): `pipeline("image-classification", model=prg_hub.DEFAULT_MODEL)` works offline.
"""

from pathlib import Path

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForPreTraining,
)

# From its module: without torchvision, transformers 5.17 exports a placeholder as `transformers.AutoImageProcessor`.
from transformers.models.auto.image_processing_auto import AutoImageProcessor

from .backbones import BACKBONES
from .configuration_prg import PRGConfig
from .heads import HEADS
from .image_processing_prg import (
    PRGImageProcessor,
    PRGImageProcessorPil,
    default_image_processor,
    default_image_processor_class,
)
from .modeling_prg import (
    FastInferenceOptions,
    FlowMatchingOutput,
    PRGForFlowMatching,
    PRGForImageClassification,
    PRGModel,
    PRGModelOutput,
    PRGPreTrainedModel,
)
from .paths import PATHS, get_path
from .pipelines import PRGFeatureExtractor, PRGImageClassificationPipeline, register_pipelines
from .solvers import SOLVERS, integrate

__version__ = "0.1.0"

# A PRGForImageClassification stored in float16 (loaded in float32 unless another dtype is asked for).
DEFAULT_MODEL = str(Path(__file__).parent / "pretrained" / "prg-otcfm-cifar10-small")

AutoConfig.register(PRGConfig.model_type, PRGConfig, exist_ok=True)
AutoModel.register(PRGConfig, PRGModel, exist_ok=True)
AutoModelForImageClassification.register(PRGConfig, PRGForImageClassification, exist_ok=True)
AutoModelForPreTraining.register(PRGConfig, PRGForFlowMatching, exist_ok=True)
AutoImageProcessor.register(
    PRGConfig, image_processor_classes={"pil": PRGImageProcessorPil, "torchvision": PRGImageProcessor}, exist_ok=True
)
# Without torchvision, `prg_hub.PRGImageProcessor` is the PIL backend, as `transformers.ViTImageProcessor` is.
PRGImageProcessor = default_image_processor_class()
register_pipelines()

__all__ = [
    "BACKBONES",
    "DEFAULT_MODEL",
    "HEADS",
    "PATHS",
    "SOLVERS",
    "FastInferenceOptions",
    "FlowMatchingOutput",
    "PRGConfig",
    "PRGFeatureExtractor",
    "PRGForFlowMatching",
    "PRGForImageClassification",
    "PRGImageClassificationPipeline",
    "PRGImageProcessor",
    "PRGImageProcessorPil",
    "PRGModel",
    "PRGModelOutput",
    "PRGPreTrainedModel",
    "default_image_processor",
    "get_path",
    "integrate",
]
