"""Pushing PRG models to the Hub and pulling them back, with the real clients and the local hub (conftest.py)."""

import inspect
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from huggingface_hub import HfApi, ModelCard, metadata_eval_result
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForImageClassification, PreTrainedModel, pipeline

from prg_hub import (
    PRGConfig,
    PRGForFlowMatching,
    PRGForImageClassification,
    PRGImageProcessor,
    PRGModel,
    PRGPreTrainedModel,
)
from prg_hub.hub_upload import push_model_to_hub
from prg_hub.loading import ARCHITECTURES, architecture_of, count_parameters, load_prg_config, load_prg_model
from prg_hub.model_card import PIPELINE_TAGS, ROLES, render_model_card
from prg_hub.remote_code import remote_code_files
from prg_hub.run_records import push_training_output, read_training_output

LABELS = {0: "cat", 1: "dog", 2: "bird"}
# A pushed checkpoint: weights, configs, card, and the code that loads it without prg_hub (remote code).
REPO_FILES = sorted([".gitattributes", "README.md", "config.json", "model.safetensors", "preprocessor_config.json",
                     *(path.name for path in remote_code_files())])


def tiny_model(model_class: type, seed: int) -> PRGPreTrainedModel:
    torch.manual_seed(seed)
    return model_class(PRGConfig(image_size=16, num_steps=2, num_labels=3, id2label=LABELS)).eval()


def assert_same_weights(loaded: torch.nn.Module, expected: torch.nn.Module) -> None:
    loaded_state, expected_state = loaded.state_dict(), expected.state_dict()
    assert loaded_state.keys() == expected_state.keys()
    for name, tensor in expected_state.items():
        assert torch.equal(loaded_state[name], tensor), name


def random_image(seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(20, 24, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def pipeline_output(task: str, repo_id: str, image: Image.Image, **load_kwargs) -> np.ndarray:
    """What `pipeline(task, model=repo_id)` returns for one image: label scores in label order, or pooled features."""
    runner = pipeline(task, model=repo_id, **load_kwargs)
    if task == "image-classification":
        predictions = runner(image, top_k=len(LABELS))
        return np.array([next(p["score"] for p in predictions if p["label"] == label) for label in LABELS.values()])
    return np.asarray(runner(image, pool=True, return_tensors=True)).reshape(-1)


def direct_output(model: PRGPreTrainedModel, image: Image.Image) -> np.ndarray:
    """The same quantity computed with the model in memory."""
    pixel_values = PRGImageProcessor(size={"height": 16, "width": 16})(image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        if isinstance(model, PRGForImageClassification):
            return model(pixel_values).logits.softmax(-1)[0].numpy()
        return model(pixel_values).pooler_output[0].numpy()


TASKS = {PRGModel: "image-feature-extraction", PRGForImageClassification: "image-classification"}
AUTO_CLASSES = {PRGModel: AutoModel, PRGForImageClassification: AutoModelForImageClassification}


@pytest.mark.parametrize("model_class", [PRGModel, PRGForImageClassification])
def test_push_then_from_pretrained_and_pipeline_pull_the_same_model(hub_server, model_class):
    repo_id = f"org/round-trip-{model_class.__name__.lower()}"
    model = tiny_model(model_class, seed=0)
    commit = push_model_to_hub(model, repo_id)

    api = HfApi()
    assert sorted(api.list_repo_files(repo_id)) == REPO_FILES
    assert [c.commit_id for c in api.list_repo_commits(repo_id)][0] == commit.oid  # a single commit for it all

    loaded = model_class.from_pretrained(repo_id)
    assert type(loaded) is model_class
    assert_same_weights(loaded, model)
    assert type(AUTO_CLASSES[model_class].from_pretrained(repo_id)) is model_class
    assert PRGImageProcessor.from_pretrained(repo_id).size == {"height": 16, "width": 16}

    image = random_image(1)
    np.testing.assert_allclose(pipeline_output(TASKS[model_class], repo_id, image), direct_output(model, image),
                               rtol=1e-5, atol=1e-6)


def test_a_block_head_classifier_is_pushed_and_pulled_exactly(hub_server):
    torch.manual_seed(0)
    config = PRGConfig(image_size=16, num_steps=2, num_labels=3, id2label=LABELS, head_type="attention",
                       feature_blocks=["up_blocks.0"], feature_times=[0.25, 0.5], head_width=32, head_depth=1,
                       head_attention_heads=2)
    model = PRGForImageClassification(config).eval()
    repo_id = "org/prg-attention-head"
    push_model_to_hub(model, repo_id)

    loaded = PRGForImageClassification.from_pretrained(repo_id).eval()
    assert (loaded.config.head_type, loaded.config.feature_blocks, loaded.config.feature_times) == (
        "attention", ["up_blocks.0"], [0.25, 0.5])
    assert_same_weights(loaded, model)
    image = random_image(2)
    np.testing.assert_allclose(pipeline_output("image-classification", repo_id, image), direct_output(model, image),
                               rtol=1e-5, atol=1e-6)
    blocks = pipeline("image-feature-extraction", model=repo_id)(image, return_blocks=True, return_tensors=True)
    pixel_values = PRGImageProcessor(size={"height": 16, "width": 16})(image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = model.prg(pixel_values, output_block_features=True).block_features
    assert blocks["blocks"].keys() == expected.keys() == {"up_blocks.0@t=0.25", "up_blocks.0@t=0.5"}
    for key, value in expected.items():
        torch.testing.assert_close(blocks["blocks"][key], value, rtol=1e-5, atol=1e-6)


def test_model_push_to_hub_uploads_processor_and_prg_card(hub_server):
    model = tiny_model(PRGForImageClassification, seed=0)
    commit = model.push_to_hub("org/method-push", commit_message="first version", tags=["demo"])

    assert sorted(HfApi().list_repo_files("org/method-push")) == REPO_FILES
    assert HfApi().list_repo_commits("org/method-push")[0].title == "first version"
    card = ModelCard.load("org/method-push")
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "image-classification"
    assert {"prg_hub", "custom_code"} <= set(card.data.tags)
    assert {"prg", "demo"} <= set(card.data.tags)
    assert_same_weights(PRGForImageClassification.from_pretrained("org/method-push", revision=commit.oid), model)


def test_push_to_hub_forwards_the_commit_message_and_the_privacy(hub_server):
    api = HfApi()
    model = tiny_model(PRGModel, seed=0)
    model.push_to_hub("org/private-push", commit_message="x", private=True)
    assert api.list_repo_commits("org/private-push")[0].title == "x"
    assert api.model_info("org/private-push").private is True

    model.push_to_hub("org/public-push")
    assert api.list_repo_commits("org/public-push")[0].title == "Upload PRGModel"
    assert api.model_info("org/public-push").private is False


def test_push_takes_the_arguments_of_transformers_push_to_hub_and_no_other(hub_server):
    """The upload options are exactly those of `PreTrainedModel.push_to_hub`, with its defaults; an unknown one is
    refused by name before any repo is created."""
    ours = inspect.signature(push_model_to_hub).parameters
    theirs = inspect.signature(PreTrainedModel.push_to_hub).parameters
    options = {name: p.default for name, p in ours.items() if p.kind is p.KEYWORD_ONLY}
    assert options == {"image_processor": None, "card": None,
                       **{name: p.default for name, p in theirs.items() if p.kind is p.KEYWORD_ONLY}}

    model = tiny_model(PRGModel, seed=0)
    with pytest.raises(TypeError, match="bogus_arg"):
        push_model_to_hub(model, "org/refused-push", bogus_arg=1)
    with pytest.raises(TypeError, match="bogus_arg"):
        model.push_to_hub("org/refused-push", bogus_arg=1)
    assert not HfApi().repo_exists("org/refused-push")


def test_revision_pins_a_commit_and_a_branch(hub_server):
    repo_id = "org/pinned-prg"
    first, second = tiny_model(PRGForImageClassification, seed=1), tiny_model(PRGForImageClassification, seed=2)
    first_commit = push_model_to_hub(first, repo_id)
    second_commit = push_model_to_hub(second, repo_id)
    HfApi().create_branch(repo_id, branch="v1", revision=first_commit.oid)
    assert first_commit.oid != second_commit.oid

    assert_same_weights(PRGForImageClassification.from_pretrained(repo_id), second)
    assert_same_weights(PRGForImageClassification.from_pretrained(repo_id, revision=first_commit.oid), first)
    assert_same_weights(PRGForImageClassification.from_pretrained(repo_id, revision="v1"), first)
    image = random_image(2)
    np.testing.assert_allclose(pipeline_output("image-classification", repo_id, image, revision="v1"),
                               direct_output(first, image), rtol=1e-5, atol=1e-6)

    third = tiny_model(PRGForImageClassification, seed=3)
    push_model_to_hub(third, repo_id, revision="dev")  # a push to a new branch creates it and leaves main alone
    assert_same_weights(PRGForImageClassification.from_pretrained(repo_id, revision="dev"), third)
    assert HfApi().model_info(repo_id).sha == second_commit.oid


def test_a_push_replaces_the_weight_files_of_the_previous_one(hub_server):
    repo_id, api = "org/resharded", HfApi()
    sharded, single = tiny_model(PRGModel, seed=7), tiny_model(PRGModel, seed=8)
    push_model_to_hub(sharded, repo_id, max_shard_size="200KB")
    shards = [name for name in api.list_repo_files(repo_id) if name.startswith("model-")]
    assert len(shards) > 1 and api.file_exists(repo_id, "model.safetensors.index.json")
    assert_same_weights(PRGModel.from_pretrained(repo_id), sharded)

    push_model_to_hub(single, repo_id)
    assert sorted(api.list_repo_files(repo_id)) == REPO_FILES  # no stale shards or index beside the new file
    assert_same_weights(PRGModel.from_pretrained(repo_id), single)


def test_a_saved_folder_is_pushed_as_stored_and_nothing_else_of_it(hub_server, tmp_path):
    repo_id, api, folder = "org/as-stored", HfApi(), tmp_path / "run"
    model = tiny_model(PRGForImageClassification, seed=9)
    model.to(torch.float16).save_pretrained(folder, max_shard_size="100KB")  # float16 shards, kept as they are
    assert (folder / "model.safetensors.index.json").is_file()
    (folder / "checkpoints" / "checkpoint-1").mkdir(parents=True)
    (folder / "checkpoints" / "checkpoint-1" / "model.safetensors").write_bytes(b"training state, not the model")
    (folder / "README.md").write_text("---\nlicense: mit\n---\n# A card of its own\n")
    push_training_output(folder, repo_id)
    stored = sorted(path.name for path in folder.iterdir() if path.is_file())
    assert sorted(set(api.list_repo_files(repo_id)) - {".gitattributes", "preprocessor_config.json"}) == stored
    for name in stored:  # byte for byte: float16 shards, the index, config.json and the folder's own card
        pulled = Path(api.hf_hub_download(repo_id, name, cache_dir=tmp_path / "cache"))
        assert pulled.read_bytes() == (folder / name).read_bytes(), name
    assert_same_weights(PRGForImageClassification.from_pretrained(repo_id, dtype=torch.float16), model)


def write_run(folder, model: PRGPreTrainedModel, args: dict, metrics: dict) -> None:
    """A training run's output_dir as the example scripts leave it: model, processor, args.json, metrics.json."""
    model.save_pretrained(folder)
    PRGImageProcessor(size={"height": 16, "width": 16}).save_pretrained(folder)
    (folder / "args.json").write_text(json.dumps(args))
    (folder / "metrics.json").write_text(json.dumps(metrics))


def test_card_from_a_training_run_round_trips_through_the_hub(hub_server, tmp_path):
    model = tiny_model(PRGForImageClassification, seed=4)
    args = {"dataset": "uoft-cs/cifar10", "model_name_or_path": "org/prg-otcfm-c10", "from_scratch": False,
            "eval_split": "eval", "learning_rate": 1.25e-4, "label_smoothing": 0.1, "hub_token": "hf_secret",
            "output_dir": str(tmp_path), "max_train_samples": None}
    metrics = {"final_top1": 0.7132958984375, "best_top1": 0.72, "best_epoch": 3, "eval_split": "test",
               "eval_split_size": 10000, "steps": 1200, "history": [{"epoch": 0, "eval_top1": 0.5}],
               "global_batches_sha256": "ab12", "pretrained": "org/prg-otcfm-c10"}
    write_run(tmp_path, model, args, metrics)
    push_training_output(tmp_path, "org/carded")

    card = ModelCard.load("org/carded")
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "image-classification"
    assert card.data.base_model == "org/prg-otcfm-c10"
    assert card.data.datasets == ["uoft-cs/cifar10"]
    assert card.data.license == "apache-2.0"
    assert {"prg", "flow-matching", "otcfm", "unet2d"} <= set(card.data.tags)
    [accuracy] = card.data.eval_results  # only the final weights' score is a result of this checkpoint
    assert (accuracy.metric_type, accuracy.metric_value) == ("accuracy", 0.7132958984375)
    assert (accuracy.task_type, accuracy.dataset_type, accuracy.dataset_split) == (
        "image-classification", "uoft-cs/cifar10", "test")

    text = card.text
    assert 'pipeline("image-classification", model="org/carded")' in text
    assert "| uoft-cs/cifar10 | test | accuracy | 0.7132958984375 |" in text
    assert "| flow-matching path | `otcfm` |" in text and "- Path: `otcfm`; backbone: `unet2d`." in text
    assert "| steps | 1200 |" in text and "| best_top1 | 0.72 |" in text and "| eval_split_size | 10000 |" in text
    assert "| learning_rate | `0.000125` |" in text and "| label_smoothing | `0.1` |" in text
    assert "hf_secret" not in text and str(tmp_path) not in text and "max_train_samples" not in text
    assert "arXiv:2412.01787" in text and "## Limitations" in text
    assert_same_weights(PRGForImageClassification.from_pretrained("org/carded"), model)


def test_card_model_index_follows_the_hub_schema_in_full():
    """The model-index is exactly what huggingface_hub's own `metadata_eval_result` writes for the same result, and
    reads back through `ModelCard` unchanged."""
    model = tiny_model(PRGForImageClassification, seed=4)
    card = render_model_card(model, "org/schema", dataset="uoft-cs/cifar10", metrics={"final_top1": 0.625},
                             eval_split="test")
    metadata = yaml.safe_load(str(card).split("---")[1])
    expected = metadata_eval_result(
        model_pretty_name="schema", task_pretty_name="Image Classification", task_id="image-classification",
        metrics_pretty_name="top-1 accuracy", metrics_id="accuracy", metrics_value=0.625,
        dataset_pretty_name="uoft-cs/cifar10", dataset_id="uoft-cs/cifar10", dataset_split="test",
    )
    assert metadata["model-index"] == expected["model-index"]
    reread = ModelCard(str(card)).data.eval_results[0]
    assert (reread.task_name, reread.metric_name, reread.dataset_name, reread.dataset_type, reread.dataset_split) == (
        "Image Classification", "top-1 accuracy", "uoft-cs/cifar10", "uoft-cs/cifar10", "test")


def test_card_of_a_run_from_scratch_names_no_base_model(tmp_path):
    model = tiny_model(PRGForImageClassification, seed=4)
    write_run(tmp_path, model, {"dataset": "uoft-cs/cifar10", "model_name_or_path": "org/unused",
                                "from_scratch": True}, {"final_top1": 0.5})
    args, metrics = read_training_output(tmp_path)
    card = render_model_card(model, "org/scratch", dataset=args["dataset"], metrics=metrics,
                             base_model=None if args["from_scratch"] else args["model_name_or_path"])
    assert card.data.base_model is None and card.data.eval_results[0].dataset_split is None
    assert "| uoft-cs/cifar10 | not recorded | accuracy | 0.5 |" in card.text


def test_card_without_run_metrics_invents_no_results(hub_server, tmp_path):
    push_model_to_hub(tiny_model(PRGModel, seed=5), "org/uncarded")
    card = ModelCard.load("org/uncarded")
    assert card.data.pipeline_tag == "image-feature-extraction"
    metadata = yaml.safe_load(card.content.split("---")[1])
    assert "model-index" not in metadata and card.data.eval_results is None
    assert card.data.base_model is None and card.data.datasets is None
    assert "Not evaluated" in card.text
    assert 'pipeline("image-feature-extraction", model="org/uncarded")' in card.text

    local_base = tmp_path / "pretrained-flow"
    local_base.mkdir()
    card = render_model_card(tiny_model(PRGModel, seed=5), "org/x", base_model=str(local_base))
    assert card.data.base_model is None  # a folder on this machine is no Hub base model
    assert "the local checkpoint `pretrained-flow`" in card.text and str(tmp_path) not in card.text


def test_a_flow_matching_checkpoint_is_carded_and_loaded_as_what_it_is(hub_server, tmp_path):
    """A pretraining checkpoint's card serves image-feature-extraction; it loads back as `PRGForFlowMatching`."""
    model = tiny_model(PRGForFlowMatching, seed=10)
    write_run(tmp_path, model, {"dataset": "uoft-cs/cifar10"}, {"steps": 100, "final_fm_loss": 0.5})
    push_training_output(tmp_path, "org/flow-matching")

    card = ModelCard.load("org/flow-matching")
    assert card.data.pipeline_tag == "image-feature-extraction" and card.data.eval_results is None
    assert "flow-matching model (pretraining)" in card.text and "| architecture | `PRGForFlowMatching` |" in card.text
    assert 'pipeline("image-feature-extraction", model="org/flow-matching")' in card.text
    assert f"| parameters | {sum(p.numel() for p in model.parameters()):,} |" in card.text
    assert "| final_fm_loss | 0.5 |" in card.text
    loaded = load_prg_model("org/flow-matching")
    assert type(loaded) is PRGForFlowMatching
    assert_same_weights(loaded, model)


@pytest.mark.parametrize("model_class", [PRGModel, PRGForImageClassification, PRGForFlowMatching])
def test_each_loadable_architecture_has_a_card_and_counts_its_parameters(model_class, tmp_path):
    assert set(ARCHITECTURES) == set(PIPELINE_TAGS) == set(ROLES)
    model = tiny_model(model_class, seed=0)
    model.save_pretrained(tmp_path)
    config = load_prg_config(str(tmp_path))
    assert architecture_of(config) is model_class
    assert count_parameters(config) == sum(p.numel() for p in model.parameters())
    assert render_model_card(model, "org/x").data.pipeline_tag == PIPELINE_TAGS[model_class.__name__]


def test_eval_results_without_a_dataset_are_refused():
    with pytest.raises(ValueError, match=r"evaluation results \(\['final_top1'\]\) but no data set is named"):
        render_model_card(tiny_model(PRGForImageClassification, seed=0), "org/x", metrics={"final_top1": 0.5})


def test_pulled_model_loads_offline_with_no_server(hub_server, tmp_path):
    repo_id, weights_file = "org/offline-prg", tmp_path / "pulled.safetensors"
    model = tiny_model(PRGForImageClassification, seed=6)
    push_model_to_hub(model, repo_id)
    image = random_image(3)
    expected = pipeline_output("image-classification", repo_id, image)  # fills the cache: model and processor
    script = textwrap.dedent(f"""
        import json
        import numpy as np
        import huggingface_hub.constants
        import prg_hub
        from PIL import Image
        from transformers import pipeline
        from safetensors.torch import save_file
        assert huggingface_hub.constants.HF_HUB_OFFLINE
        pixels = np.random.default_rng(3).integers(0, 256, size=(20, 24, 3), dtype=np.uint8)
        classifier = pipeline("image-classification", model={repo_id!r})
        model = prg_hub.PRGForImageClassification.from_pretrained({repo_id!r})
        scores = {{p["label"]: p["score"] for p in classifier(Image.fromarray(pixels), top_k=3)}}
        save_file(model.state_dict(), {str(weights_file)!r})
        print(json.dumps(scores))
    """)
    with socket.socket() as probe:  # a port that nothing listens on: no hub server at all for the subprocess
        probe.bind(("127.0.0.1", 0))
        dead_endpoint = f"http://127.0.0.1:{probe.getsockname()[1]}"
    offline = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": dead_endpoint}  # same HF_HOME, same cache
    result = subprocess.run([sys.executable, "-c", script], env=offline, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    pulled = json.loads(result.stdout.splitlines()[-1])
    np.testing.assert_allclose([pulled[label] for label in LABELS.values()], expected, rtol=1e-5, atol=1e-6)
    pulled_weights = load_file(weights_file)
    assert pulled_weights.keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(pulled_weights[name], tensor), name
