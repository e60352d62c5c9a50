"""Uploads of PRG models to the Hugging Face Hub, one commit each.

A PRG repo holds `config.json`, the weights (`model.safetensors`, or an index and its shards),
`preprocessor_config.json`, the remote code (`prg_hub.remote_code`) and `README.md`, the model card
(`prg_hub.model_card`). Every upload replaces the repo's earlier weight files (`WEIGHT_FILE_PATTERNS`).

    push_model_to_hub(model, "org/name", commit_message="First weights", private=True)
    model.push_to_hub("org/name")  # the same, through `PRGPreTrainedModel.push_to_hub`

The model arrives as an object, so this module imports no model class.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from huggingface_hub import CommitInfo, HfApi, ModelCard

from .finiteness import check_finite_weights
from .image_processing_prg import PRGImageProcessor, PRGImageProcessorPil, default_image_processor
from .model_card import render_model_card

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# Weight files: removed from the repo by each push unless the push writes them again, so that a checkpoint
# saved in one file does not sit beside stale shards of an earlier, sharded one (and vice versa).
WEIGHT_FILE_PATTERNS = ["*.safetensors", "*.safetensors.index.json"]


def push_model_to_hub(
    model: PreTrainedModel,
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
    max_shard_size: int | str | None = "50GB",
    tags: list[str] | None = None,
) -> CommitInfo:
    """Upload a PRG model in one commit: config.json, the weights, preprocessor_config.json and README.md.

    Creates the repo (and the branch `revision`) if needed. `image_processor` defaults to `default_image_processor`
    for the model's image size; `card` defaults to `render_model_card(model, repo_id)`, which records no results;
    `tags` are added to the card's tags. The keyword arguments after `card` are exactly those of
    `transformers.PreTrainedModel.push_to_hub`, with its defaults; any other raises a TypeError naming it.
    Returns the `CommitInfo` (its `oid` is the commit to pin with `revision=`).
    """
    check_finite_weights(model, f"The model to push to {repo_id!r}")  # before the repo is created
    api = HfApi(token=token)
    repo_id = create_repo_and_branch(api, repo_id, private, revision)
    image_processor = image_processor or default_image_processor(model.config.image_size)
    card = card or render_model_card(model, repo_id)
    if tags:
        card.data.tags = list(dict.fromkeys([*(card.data.tags or []), *tags]))
    with tempfile.TemporaryDirectory(prefix="prg-push-") as folder:
        model.save_pretrained(folder, max_shard_size=max_shard_size)
        image_processor.save_pretrained(folder)  # save_pretrained wrote the code, the processor its auto_map
        card.save(Path(folder) / "README.md")
        return upload_model_folder(api, folder, repo_id, commit_message or f"Upload {type(model).__name__}",
                                   commit_description=commit_description, revision=revision, create_pr=create_pr)


def create_repo_and_branch(api: HfApi, repo_id: str, private: bool | None, revision: str | None) -> str:
    """Create the repo (and the branch `revision`) unless they exist; return the repo id as the Hub spells it.

    `private` applies to a repo created here; an existing repo keeps its visibility."""
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if revision is not None and not revision.startswith("refs/pr/"):
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    return repo_id


def upload_model_folder(api: HfApi, folder: str | Path, repo_id: str, commit_message: str, *,
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
