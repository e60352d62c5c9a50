"""Loading PRG checkpoints with the class that saved them.

A saved `config.json` names its class in `architectures`; `load_prg_model` builds that class, so a classifier
comes back as `PRGForImageClassification`, a pretraining checkpoint as `PRGForFlowMatching` and a feature
extractor as `PRGModel`, from a local folder or a Hub id alike.

    config = load_prg_config("org/name")      # ValueError unless model_type is "prg"
    model = load_prg_model("org/name")        # the class of config.architectures[0]
    count_parameters(config)                  # without building any weight
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoConfig

from .configuration_prg import PRGConfig
from .modeling_prg import PRGForFlowMatching, PRGForImageClassification, PRGModel, PRGPreTrainedModel

# The classes a PRG checkpoint may name in `config.architectures`.
ARCHITECTURES = {cls.__name__: cls for cls in (PRGModel, PRGForImageClassification, PRGForFlowMatching)}


def architecture_of(config: PRGConfig) -> type[PRGPreTrainedModel]:
    """The PRG class a saved config was written by (`config.architectures`), `PRGModel` when it names none."""
    names = config.architectures or [PRGModel.__name__]
    if names[0] not in ARCHITECTURES:
        raise ValueError(f"Unknown PRG architecture {names[0]!r}: expected one of {sorted(ARCHITECTURES)}.")
    return ARCHITECTURES[names[0]]


def load_prg_config(model_id_or_dir: str, **hub_kwargs) -> PRGConfig:
    """Load the config of a PRG checkpoint (local folder or Hub id), raising a ValueError if it is not PRG's."""
    config = AutoConfig.from_pretrained(model_id_or_dir, **hub_kwargs)
    if not isinstance(config, PRGConfig):
        raise ValueError(
            f"{model_id_or_dir!r} is a {config.model_type!r} checkpoint, not a PRG one (model_type 'prg')."
        )
    return config


def load_prg_model(model_id_or_dir: str, **hub_kwargs) -> PRGPreTrainedModel:
    """Load a PRG checkpoint with the class that saved it (`architecture_of` its config)."""
    config = load_prg_config(model_id_or_dir, **hub_kwargs)
    return architecture_of(config).from_pretrained(model_id_or_dir, config=config, **hub_kwargs)


def count_parameters(config: PRGConfig) -> int:
    """Number of parameters of the model `config` describes, counted on the meta device (no memory, no weights)."""
    with torch.device("meta"):
        model = architecture_of(config)(config)
    return sum(parameter.numel() for parameter in model.parameters())


def saved_weight_files(folder: str | Path) -> list[Path]:
    """The safetensors files of a `save_pretrained` folder: `model.safetensors`, or the index and its shards.

    Raises a ValueError naming the folder when it holds neither.
    """
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        return [index, *(folder / shard for shard in shards)]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    raise ValueError(
        f"{str(folder)!r} holds no safetensors weights (model.safetensors or model.safetensors.index.json); "
        "save the model with save_pretrained."
    )
