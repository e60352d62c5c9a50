"""Model cards and pushes of PRG checkpoints to the Hugging Face Hub.

A PRG repo holds `config.json`, `model.safetensors`, `preprocessor_config.json` and `README.md`, the model card.
Cards are rendered through `huggingface_hub.ModelCard` from the template `model_cards/model_card.md` (shipped as
`prg_hub/templates/model_card.md`, a link to it; documented in `model_cards/README.md`). Their YAML metadata holds `library_name: transformers` (with the `custom_code` and `prg_hub` tags), the `pipeline_tag`
(`image-classification` for `PRGForImageClassification`, `image-feature-extraction` for `PRGModel`), tags, the
data set, the license, `base_model` when the model was finetuned from a Hub checkpoint, and a `model-index` with
the measured evaluation results. Every number comes from the metrics passed in, which come from the training run
itself; without them the card says "not evaluated" and the metadata has no `model-index`.

    push_model_to_hub(model, "org/name")                  # a model in memory, one commit
    push_training_output("runs/finetune-c10", "org/name")  # a saved folder as stored; card from its records

Cards of published checkpoints add what the records cannot say (hardware, commands, limits) as `CardDetails`.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import CommitInfo, EvalResult, HfApi, ModelCard, ModelCardData
from huggingface_hub.errors import EntryNotFoundError
from transformers import AutoConfig

from .configuration_prg import PRGConfig
from .finiteness import check_finite_weights
from .image_processing_prg import PRGImageProcessor, PRGImageProcessorPil, default_image_processor
from .modeling_prg import PRGForImageClassification, PRGModel, PRGPreTrainedModel
from .remote_code import write_remote_code

CARD_TEMPLATE = Path(__file__).parent / "templates" / "model_card.md"
# The Hub knows transformers; `custom_code` marks checkpoints that carry their own modeling code (remote code),
# and the `prg_hub` tag lets people find PRG checkpoints.
LIBRARY_NAME = "transformers"
BASE_TAGS = ["prg_hub", "custom_code", "prg", "pretrained-reversible-generation", "flow-matching"]
DEFAULT_LICENSE = "apache-2.0"
PIPELINE_TAGS = {PRGModel: "image-feature-extraction", PRGForImageClassification: "image-classification"}
ROLES = {PRGModel: "image feature extractor", PRGForImageClassification: "image classifier"}
TASK_NAMES = {"image-classification": "Image Classification", "image-feature-extraction": "Image Feature Extraction"}

# The files a training run leaves in its output_dir beside the saved model (see `push_training_output`).
RUN_ARGS_FILE = "args.json"
RUN_METRICS_FILE = "metrics.json"
# metrics.json entries that score the saved (final) weights on the evaluation split: entry -> (model-index
# metric type, metric name). `examples/finetune.py` writes final_top1, the top-1 accuracy as a fraction in [0, 1].
EVALUATION_METRICS = {"final_top1": ("accuracy", "top-1 accuracy")}
# Run arguments that are not part of the recipe: where the run wrote and pushed, and any credential.
NOT_RECIPE_ARGS = ("output_dir", "push_to_hub", "hub_model_id")
# Run arguments that may hold a local path (`public_name` shortens them in cards).
LOCAL_PATH_ARGS = ("dataset", "model_name_or_path", "cache_dir", "config", "resume_from_checkpoint")
# Weight files: removed from the repo by each push unless the push writes them again, so that a checkpoint
# saved in one file does not sit beside stale shards of an earlier, sharded one (and vice versa).
WEIGHT_FILE_PATTERNS = ["*.safetensors", "*.safetensors.index.json"]
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


def architecture_of(config: PRGConfig) -> type[PRGPreTrainedModel]:
    """The PRG class a saved config was written by (`config.architectures`), `PRGModel` when it names none."""
    names = config.architectures or [PRGModel.__name__]
    classes = {cls.__name__: cls for cls in PIPELINE_TAGS}
    if names[0] not in classes:
        raise ValueError(f"Unknown PRG architecture {names[0]!r}: expected one of {sorted(classes)}.")
    return classes[names[0]]


def load_prg_config(model_id_or_dir: str, **hub_kwargs) -> PRGConfig:
    """Load the config of a PRG checkpoint (local folder or Hub id), raising a ValueError if it is not PRG's."""
    config = AutoConfig.from_pretrained(model_id_or_dir, **hub_kwargs)
    if not isinstance(config, PRGConfig):
        raise ValueError(
            f"{model_id_or_dir!r} is a {config.model_type!r} checkpoint, not a PRG one (model_type 'prg')."
        )
    return config


def load_prg_model(model_id_or_dir: str, **hub_kwargs) -> PRGPreTrainedModel:
    """Load a PRG checkpoint with the class that saved it: `PRGModel` or `PRGForImageClassification`."""
    config = load_prg_config(model_id_or_dir, **hub_kwargs)
    return architecture_of(config).from_pretrained(model_id_or_dir, config=config, **hub_kwargs)


def count_parameters(config: PRGConfig) -> int:
    """Number of parameters of the model `config` describes, counted on the meta device (no memory, no weights)."""
    with torch.device("meta"):
        model = architecture_of(config)(config)
    return sum(parameter.numel() for parameter in model.parameters())


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
    model: PRGPreTrainedModel,
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
        model: a `PRGModel` or `PRGForImageClassification`; the card describes its config and parameter count.
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
    architecture = type(model)
    if architecture not in PIPELINE_TAGS:
        raise TypeError(
            f"render_model_card takes a PRGModel or PRGForImageClassification, got {architecture.__name__}."
        )
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
        tags=[*BASE_TAGS, config.path, config.backbone_type],
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
        architecture=architecture.__name__,
        role=ROLES[architecture],
        is_classifier=architecture is PRGForImageClassification,
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


def push_model_to_hub(
    model: PRGPreTrainedModel,
    repo_id: str,
    *,
    image_processor: PRGImageProcessor | PRGImageProcessorPil | None = None,
    card: ModelCard | None = None,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: bool | str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    max_shard_size: int | str = "50GB",
    tags: list[str] | None = None,
) -> CommitInfo:
    """Upload a PRG model in one commit: config.json, model.safetensors, preprocessor_config.json and README.md.

    Creates the repo (and the branch `revision`) if needed. `image_processor` defaults to `default_image_processor`
    for the model's image size; `card` defaults to `render_model_card(model, repo_id)`, which records no results;
    `tags` are added to the card's tags. The other arguments are those of `PreTrainedModel.push_to_hub`.
    Returns the `CommitInfo` (its `oid` is the commit to pin with `revision=`).
    """
    check_finite_weights(model, f"The model to push to {repo_id!r}")  # before the repo is created
    api = HfApi(token=token)
    repo_id = _create_repo(api, repo_id, private, revision)
    image_processor = image_processor or default_image_processor(model.config.image_size)
    card = card or render_model_card(model, repo_id)
    if tags:
        card.data.tags = list(dict.fromkeys([*(card.data.tags or []), *tags]))
    with tempfile.TemporaryDirectory(prefix="prg-push-") as folder:
        model.save_pretrained(folder, max_shard_size=max_shard_size)
        image_processor.save_pretrained(folder)  # save_pretrained wrote the code, the processor its auto_map
        card.save(Path(folder) / "README.md")
        return _upload_model_folder(api, folder, repo_id, commit_message or f"Upload {type(model).__name__}",
                                    commit_description=commit_description, revision=revision, create_pr=create_pr)


def _create_repo(api: HfApi, repo_id: str, private: bool | None, revision: str | None) -> str:
    """Create the repo (and the branch `revision`) unless they exist; return the repo id as the Hub spells it."""
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if revision is not None and not revision.startswith("refs/pr/"):
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    return repo_id


def _upload_model_folder(api: HfApi, folder: str | Path, repo_id: str, commit_message: str, *,
                         commit_description: str | None = None, revision: str | None = None,
                         create_pr: bool = False) -> CommitInfo:
    """Upload every file of `folder` in one commit, replacing the repo's previous weight files."""
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        commit_message=commit_message,
        commit_description=commit_description,
        revision=revision,
        create_pr=create_pr,
        delete_patterns=WEIGHT_FILE_PATTERNS,
    )


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


def read_training_output(output_dir: str | Path) -> tuple[dict, dict]:
    """The run records in `output_dir`: (`args.json`, `metrics.json`) as dicts, each `{}` when the file is absent."""
    records = []
    for name in (RUN_ARGS_FILE, RUN_METRICS_FILE):
        path = Path(output_dir) / name
        records.append(json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {})
    return records[0], records[1]


def push_training_output(
    output_dir: str | Path,
    repo_id: str,
    *,
    commit_message: str | None = None,
    private: bool | None = None,
    token: bool | str | None = None,
    revision: str | None = None,
    license: str = DEFAULT_LICENSE,  # noqa: A002 - the model-card field's name
) -> CommitInfo:
    """Push the model saved in `output_dir` as it is stored, with its own card or one made from the run's records.

    The weights are uploaded byte for byte (a checkpoint stored in float16 stays float16), after the model was
    loaded once to check them; `config.json` and `preprocessor_config.json` as stored, plus the remote-code
    entries and files of `prg_hub.remote_code.write_remote_code` when they lack them. Nothing else of the folder
    (checkpoints, samples, `best/`) is uploaded.

    Expected in `output_dir` (as `examples/pretrain.py` and `examples/finetune.py` leave it):
        - the model, saved with `save_pretrained` (config.json + model.safetensors or shards) by `PRGModel` or
          `PRGForImageClassification`;
        - `preprocessor_config.json` (optional; `default_image_processor` for the model's image size otherwise);
        - `README.md` (optional): a model card the checkpoint already carries (such as `prg_hub.DEFAULT_MODEL`'s);
          it is uploaded as it is, and the run records below are then not read;
        - `args.json` (optional): the run's arguments, shown as the card's hyper-parameter table. `dataset` names
          the training data; `model_name_or_path` the checkpoint it was finetuned from (unless `from_scratch`
          is true), which becomes `base_model` when it is a Hub id;
        - `metrics.json` (optional): the run's measured numbers. The `EVALUATION_METRICS` entries (`final_top1`)
          become the model-index, on the split named by its `eval_split` entry when there is one; every other
          numeric top-level entry (`steps`, `final_fm_loss`, `best_top1`, ...) is listed as a training result.
    A folder with no card and neither JSON file is pushed with a card that says "not evaluated".
    """
    source = Path(output_dir)
    model = load_prg_model(str(source))
    check_finite_weights(model, f"The model saved in {str(source)!r}")  # before the repo is created
    api = HfApi(token=token)
    repo_id = _create_repo(api, repo_id, private, revision)
    with tempfile.TemporaryDirectory(prefix="prg-push-") as folder:
        staged = Path(folder)
        for file in [source / "config.json", *saved_weight_files(source)]:
            shutil.copyfile(file, staged / file.name)
        if (source / "preprocessor_config.json").is_file():
            shutil.copyfile(source / "preprocessor_config.json", staged / "preprocessor_config.json")
        else:
            default_image_processor(model.config.image_size).save_pretrained(staged)
        write_remote_code(staged)
        if (source / "README.md").is_file():
            shutil.copyfile(source / "README.md", staged / "README.md")
        else:
            args, metrics = read_training_output(source)
            render_model_card(
                model,
                repo_id,
                dataset=args.get("dataset"),
                base_model=None if args.get("from_scratch") else args.get("model_name_or_path"),
                hyperparameters=args,
                metrics=metrics,
                eval_split=metrics.get("eval_split"),
                license=license,
            ).save(staged / "README.md")
        return _upload_model_folder(api, staged, repo_id, commit_message or f"Upload {type(model).__name__}")


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
