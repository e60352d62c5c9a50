"""prg_hub: Pretrained Reversible Generation (PRG) models for the Hugging Face ecosystem.

Importing the package registers PRG with transformers: `AutoConfig`, `AutoModel`,
`AutoModelForImageClassification`, `AutoImageProcessor` and `pipeline(...)` then load PRG checkpoints.
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
)

from .backbones import BACKBONES
from .configuration_prg import PRGConfig
from .image_processing_prg import PRGImageProcessor
from .modeling_prg import PRGForImageClassification, PRGModel, PRGPreTrainedModel
from .paths import PATHS, get_path
from .pipelines import PRGFeatureExtractor, register_feature_extraction_pipeline
from .solvers import SOLVERS, integrate

__version__ = "0.1.0"

AutoConfig.register(PRGConfig.model_type, PRGConfig, exist_ok=True)
AutoModel.register(PRGConfig, PRGModel, exist_ok=True)
AutoModelForImageClassification.register(PRGConfig, PRGForImageClassification, exist_ok=True)
AutoImageProcessor.register(PRGConfig, image_processor_classes={"pil": PRGImageProcessor}, exist_ok=True)
register_feature_extraction_pipeline()

__all__ = [
    "BACKBONES",
    "PATHS",
    "SOLVERS",
    "PRGConfig",
    "PRGFeatureExtractor",
    "PRGForImageClassification",
    "PRGImageProcessor",
    "PRGModel",
    "PRGPreTrainedModel",
    "get_path",
    "integrate",
]
