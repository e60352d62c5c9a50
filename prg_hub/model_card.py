"""Model cards of PRG checkpoints: the `README.md` of every repo prg_hub pushes.

Cards are rendered through `huggingface_hub.ModelCard` from the template `model_cards/model_card.md` (shipped as
`prg_hub/templates/model_card.md`, a link to it; documented in `model_cards/README.md`). Their YAML metadata holds
`library_name: transformers` (with the `custom_code` and `prg_hub` tags), the `pipeline_tag` of the model's
architecture (`PIPELINE_TAGS`), tags, the data set, the license, `base_model` when the model was finetuned from a
Hub checkpoint, and a `model-index` with the measured evaluation results. Every number comes from the metrics
passed in, which come from the training run itself; without them the card says "not evaluated" and the metadata
has no `model-index`.

    card = render_model_card(model, "org/name", dataset="uoft-cs/cifar10", metrics={"final_top1": 0.91})
    card = load_model_card("org/name")  # or a local checkpoint folder; None when it has no card

Cards of published checkpoints add what the run's records cannot say (hardware, commands, limits) as
`CardDetails`. Architectures are known by their class name (`type(model).__name__`, `config.architectures[0]`),
so this module needs no model class.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.errors import EntryNotFoundError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

CARD_TEMPLATE = Path(__file__).parent / "templates" / "model_card.md"
# The Hub knows transformers; `custom_code` marks checkpoints that carry their own modeling code (remote code),
# and the `prg_hub` tag lets people find PRG checkpoints.
LIBRARY_NAME = "transformers"
BASE_TAGS = ["prg_hub", "custom_code", "prg", "pretrained-reversible-generation", "flow-matching"]
DEFAULT_LICENSE = "apache-2.0"
# Per architecture (class name): the Hub task its checkpoints serve, and what the card calls the model.
PIPELINE_TAGS = {
    "PRGModel": "image-feature-extraction",
    "PRGForImageClassification": "image-classification",
    "PRGForFlowMatching": "image-feature-extraction",
}
ROLES = {
    "PRGModel": "image feature extractor",
    "PRGForImageClassification": "image classifier",
    "PRGForFlowMatching": "flow-matching model (pretraining)",
}
CLASSIFIER_ARCHITECTURE = "PRGForImageClassification"
TASK_NAMES = {"image-classification": "Image Classification", "image-feature-extraction": "Image Feature Extraction"}

# Run metrics that score the saved (final) weights on the evaluation split: entry -> (model-index metric type,
# metric name). `examples/finetune.py` writes final_top1, the top-1 accuracy as a fraction in [0, 1].
EVALUATION_METRICS = {"final_top1": ("accuracy", "top-1 accuracy")}
# Run arguments that are not part of the recipe: where the run wrote and pushed, and any credential.
NOT_RECIPE_ARGS = ("output_dir", "push_to_hub", "hub_model_id")
# Run arguments that may hold a local path (`public_name` shortens them in cards).
LOCAL_PATH_ARGS = ("dataset", "model_name_or_path", "cache_dir", "config", "resume_from_checkpoint")
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")


@dataclass(frozen=True)
class CardDetails:
    """What a card of a published checkpoint says beyond the run's own records (all optional).

    Attributes:
        hardware: where it was trained, e.g. "one NVIDIA H200".
        training_minutes: wall-clock minutes of training, all stages together.
        training_commands: the exact commands that trained it, shown as a shell block.
        training_commands_note: one line said of those commands (e.g. how their paths were made generic).
        evaluation_source: who measured the evaluation table and how (replaces "Measured by the training run").
        evaluation_notes: further measured facts, one bullet each, under the evaluation table.
        limitations: plain-words limits of this checkpoint, listed before the generic ones.
        shipped_default: the checkpoint is `prg_hub.DEFAULT_MODEL`; usage snippets then name it.
    """

    hardware: str | None = None
    training_minutes: float | None = None
    training_commands: Sequence[str] = ()
    training_commands_note: str | None = None
    evaluation_source: str | None = None
    evaluation_notes: Sequence[str] = ()
    limitations: Sequence[str] = ()
    shipped_default: bool = False


def is_hub_id(name: str) -> bool:
    """Whether `name` names a Hub repo ("name" or "org/name") rather than a folder on this machine.

    An existing local path wins, as it does for `from_pretrained` and `datasets.load_dataset`.
    """
    return not Path(name).exists() and _HUB_ID.fullmatch(name) is not None


def public_name(name: str | None) -> str | None:
    """What a card may say of a data set or checkpoint: a Hub id as it is, a local path by its last component
    ("/home/me/data/cifar10-jpeg" -> "cifar10-jpeg"), so that no card shows where files lie on a machine."""
    if not isinstance(name, str) or is_hub_id(name):
        return name
    return Path(name).name or name


def eval_results_from_metrics(
    metrics: Mapping, task_type: str, dataset: str | None, dataset_split: str | None = None
) -> list[EvalResult]:
    """One `EvalResult` per `EVALUATION_METRICS` entry present in `metrics`, with its exact value.

    Raises a ValueError if there are evaluation results but no `dataset` to say what they were measured on.
    """
    measured = {key: metrics[key] for key in EVALUATION_METRICS if _is_number(metrics.get(key))}
    if measured and not dataset:
        raise ValueError(
            f"The metrics hold evaluation results ({sorted(measured)}) but no data set is named; pass dataset= "
            "(the training run's `dataset` argument) so the card says what they were measured on."
        )
    return [
        EvalResult(task_type=task_type, task_name=TASK_NAMES[task_type], dataset_type=dataset, dataset_name=dataset,
                   dataset_split=dataset_split,
                   metric_type=EVALUATION_METRICS[key][0], metric_name=EVALUATION_METRICS[key][1], metric_value=value,
                   verified=False)  # measured by the run, not by the Hub's evaluation service
        for key, value in measured.items()
    ]


def render_model_card(
    model: PreTrainedModel,
    repo_id: str,
    *,
    dataset: str | None = None,
    base_model: str | None = None,
    hyperparameters: Mapping | None = None,
    metrics: Mapping | None = None,
    eval_split: str | None = None,
    license: str = DEFAULT_LICENSE,  # noqa: A002 - the model-card field's name
    details: CardDetails | None = None,
) -> ModelCard:
    """Render the PRG model card of `model` for the repo `repo_id` from `CARD_TEMPLATE`.

    Args:
        model: a PRG model of one of the `PIPELINE_TAGS` architectures (`PRGModel`, `PRGForImageClassification`,
            `PRGForFlowMatching`); the card describes its config and counts its parameters.
        repo_id: the repo the card is for ("org/name"); used in the title and the usage snippets.
        dataset: the training data: a Hub data set id (listed in the `datasets` metadata) or a local folder,
            which the card names by its last component only.
        base_model: the checkpoint this model was finetuned from; a Hub id becomes the `base_model` metadata.
        hyperparameters: the run's arguments, shown as the recipe's table; local paths among them
            (`LOCAL_PATH_ARGS`) are shown by their last component only.
        metrics: the run's measured numbers. `EVALUATION_METRICS` entries become the model-index (task = the
            pipeline tag, data set = `dataset`, split = `eval_split`); every other numeric top-level entry is
            shown as a training result. Without evaluation entries the card says "not evaluated".
        license: the license identifier of the weights.
        details: hardware, time, commands, evaluation notes and limitations beyond the run's records.
    """
    architecture = type(model).__name__
    if architecture not in PIPELINE_TAGS:
        raise TypeError(f"render_model_card takes a model of one of {sorted(PIPELINE_TAGS)}, got {architecture}.")
    config = model.config
    pipeline_tag = PIPELINE_TAGS[architecture]
    metrics = dict(metrics or {})
    dataset_on_hub = dataset is not None and is_hub_id(dataset)
    base_model_on_hub = base_model is not None and is_hub_id(base_model)
    dataset, base_model = public_name(dataset), public_name(base_model)
    eval_results = eval_results_from_metrics(metrics, pipeline_tag, dataset, eval_split)
    card_data = ModelCardData(
        library_name=LIBRARY_NAME,
        pipeline_tag=pipeline_tag,
        license=license,
        tags=[*BASE_TAGS, config.probability_path, config.backbone_type],
        datasets=[dataset] if dataset_on_hub else None,
        base_model=base_model if base_model_on_hub else None,
        # model-index entries are named after the model; the name is only written with results.
        model_name=repo_id.split("/")[-1] if eval_results else None,
        eval_results=eval_results or None,
    )
    return ModelCard.from_template(
        card_data,
        template_path=str(CARD_TEMPLATE),
        repo_id=repo_id,
        title=repo_id.split("/")[-1],
        architecture=architecture,
        role=ROLES[architecture],
        is_classifier=architecture == CLASSIFIER_ARCHITECTURE,
        config=config,
        num_parameters=sum(parameter.numel() for parameter in model.parameters()),
        dataset=dataset,
        dataset_on_hub=dataset_on_hub,
        base_model=base_model,
        base_model_on_hub=base_model_on_hub,
        hyperparameters={key: public_name(value) if key in LOCAL_PATH_ARGS else value
                         for key, value in (hyperparameters or {}).items()
                         if value is not None and key not in NOT_RECIPE_ARGS and "token" not in key},
        training_results={key: value for key, value in metrics.items()
                          if key not in EVALUATION_METRICS and _is_number(value)},
        eval_results=eval_results,
        details=details or CardDetails(),
    )


def load_model_card(model_id_or_dir: str, **hub_kwargs) -> ModelCard | None:
    """The model card of a local checkpoint folder (its README.md) or a Hub repo; None when it has none."""
    folder = Path(model_id_or_dir)
    if folder.is_dir():
        readme = folder / "README.md"
        return ModelCard.load(readme) if readme.is_file() else None
    try:
        return ModelCard.load(model_id_or_dir, **hub_kwargs)
    except EntryNotFoundError:
        return None


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
