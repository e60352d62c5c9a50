"""PRG checkpoints through transformers' remote-code path, in processes where `import prg_hub` is impossible, and
pipelines that stay stock for other models."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import HfApi
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import pipeline
from transformers.models.vit import ViTConfig, ViTForImageClassification, ViTImageProcessorPil

from prg_hub import PRGConfig, PRGForFlowMatching, PRGForImageClassification, PRGModel, default_image_processor
from prg_hub.hub_upload import push_model_to_hub
from prg_hub.remote_code import remote_code_files

LABELS = {0: "cat", 1: "dog", 2: "bird"}

# Run first in every subprocess: any import of prg_hub fails, as on a machine where it is not installed.
BLOCK_PRG_HUB = """
import importlib.abc, sys

class NoPrgHub(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "prg_hub" or name.startswith("prg_hub."):
            raise ImportError(f"{name} is not installed here")

sys.meta_path.insert(0, NoPrgHub())
"""

REMOTE_USER = BLOCK_PRG_HUB + """
import json
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModel, AutoModelForImageClassification, pipeline
from transformers.models.auto.image_processing_auto import AutoImageProcessor

repo_id, image_path, output = sys.argv[1:4]
image = Image.open(image_path)
try:
    AutoModelForImageClassification.from_pretrained(repo_id)
    refused = ""
except ValueError as error:
    refused = str(error)
config = AutoConfig.from_pretrained(repo_id, trust_remote_code=True)
classifier = AutoModelForImageClassification.from_pretrained(repo_id, trust_remote_code=True).eval()
extractor = AutoModel.from_pretrained(repo_id, trust_remote_code=True).eval()
processor = AutoImageProcessor.from_pretrained(repo_id, trust_remote_code=True)
pixel_values = processor(image, return_tensors="pt")["pixel_values"]
with torch.no_grad():
    logits = classifier(pixel_values).logits
    features = extractor(pixel_values, feature_t=0.5, num_steps=3).pooler_output
labels = pipeline("image-classification", model=repo_id, trust_remote_code=True)(image_path, top_k=3)
piped = pipeline("image-feature-extraction", model=repo_id, trust_remote_code=True)(
    image_path, feature_t=0.5, num_steps=3, pool=True)
save_file({"pixel_values": pixel_values, "logits": logits, "features": features,
           "piped_features": torch.tensor(piped)}, output)
print(chr(10) + json.dumps({  # after transformers' "run the custom code? [y/N]" prompt, answered by no input
    "modules": sorted({type(o).__module__ for o in (config, classifier, extractor, processor)}),
    "prg_hub_imported": any(name.split(".")[0] == "prg_hub" for name in sys.modules),
    "labels": labels,
    "refused_without_trust": refused,
}))
"""

REMOTE_PRETRAINING = BLOCK_PRG_HUB + """
import json
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForPreTraining

folder, inputs, output = sys.argv[1:4]
model = AutoModelForPreTraining.from_pretrained(folder, trust_remote_code=True)
loss = model(load_file(inputs)["pixel_values"], generator=torch.Generator().manual_seed(0)).loss
save_file({"loss": loss.detach()}, output)
print(chr(10) + json.dumps({
    "class": type(model).__name__,
    "module": type(model).__module__,
    "prg_hub_imported": any(name.split(".")[0] == "prg_hub" for name in sys.modules),
}))
"""


def run_python(script: str, *args) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True,
                            stdin=subprocess.DEVNULL, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.fixture(scope="module")
def image_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("image") / "rgba.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (20, 24, 4), dtype=np.uint8), mode="RGBA").save(path)
    return path


@pytest.fixture(scope="module")
def pushed_classifier(hub_server) -> tuple[str, PRGForImageClassification]:
    torch.manual_seed(0)
    model = PRGForImageClassification(PRGConfig(image_size=16, num_steps=2, num_labels=3, id2label=LABELS)).eval()
    push_model_to_hub(model, "remote-org/prg-classifier")
    return "remote-org/prg-classifier", model


def test_a_saved_checkpoint_carries_its_code_and_auto_maps(tmp_path):
    PRGModel(PRGConfig(image_size=16)).save_pretrained(tmp_path)
    default_image_processor(16).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"]["AutoModelForImageClassification"] == "modeling_prg.PRGForImageClassification"
    assert config["custom_pipelines"]["image-feature-extraction"]["impl"] == "pipelines.PRGFeatureExtractor"
    processor = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert processor["auto_map"]["AutoImageProcessor"]["pil"] == "image_processing_prg.PRGImageProcessorPil"
    for source in remote_code_files():
        assert (tmp_path / source.name).read_bytes() == source.read_bytes()


def test_a_saved_pretraining_checkpoint_loads_through_transformers_alone(tmp_path):
    torch.manual_seed(0)
    model = PRGForFlowMatching(PRGConfig(image_size=16))
    model.save_pretrained(tmp_path / "checkpoint")
    pixel_values = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    save_file({"pixel_values": pixel_values}, tmp_path / "inputs.safetensors")

    report = json.loads(run_python(REMOTE_PRETRAINING, tmp_path / "checkpoint", tmp_path / "inputs.safetensors",
                                   tmp_path / "loss.safetensors").stdout.strip().splitlines()[-1])
    assert report["class"] == "PRGForFlowMatching" and report["module"].startswith("transformers_modules.")
    assert report["prg_hub_imported"] is False
    expected = model(pixel_values, generator=torch.Generator().manual_seed(0)).loss.detach()
    torch.testing.assert_close(load_file(tmp_path / "loss.safetensors")["loss"], expected, rtol=1e-5, atol=1e-6)


REMOTE_BLOCK_HEAD = BLOCK_PRG_HUB + """
import json
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageClassification, pipeline

folder, inputs, image_path, output = sys.argv[1:5]
model = AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True).eval()
with torch.no_grad():
    logits = model(load_file(inputs)["pixel_values"]).logits
piped = pipeline("image-feature-extraction", model=folder, trust_remote_code=True)(
    image_path, return_blocks=True, return_tensors=True)
save_file({"logits": logits, **{key: value.contiguous() for key, value in piped["blocks"].items()}}, output)
print(chr(10) + json.dumps({
    "head": type(model.head).__name__,
    "prg_hub_imported": any(name.split(".")[0] == "prg_hub" for name in sys.modules),
}))
"""


def test_a_block_head_checkpoint_works_through_transformers_alone(image_path, tmp_path):
    """A DifFeed classifier (two network passes with feedback hooks) and the blocks of its feature-extraction
    pipeline, from the code the checkpoint carries."""
    torch.manual_seed(0)
    config = PRGConfig(backbone_type="dit", image_size=16, num_steps=2, num_labels=3, id2label=LABELS,
                       head_type="diffeed", feature_blocks=["transformer_blocks.1"], feature_times=[0.5],
                       head_width=32, head_depth=1, head_attention_heads=2)
    model = PRGForImageClassification(config).eval()
    model.save_pretrained(tmp_path / "checkpoint")
    default_image_processor(16).save_pretrained(tmp_path / "checkpoint")
    pixel_values = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    save_file({"pixel_values": pixel_values}, tmp_path / "inputs.safetensors")

    report = json.loads(run_python(REMOTE_BLOCK_HEAD, tmp_path / "checkpoint", tmp_path / "inputs.safetensors",
                                   image_path, tmp_path / "remote.safetensors").stdout.strip().splitlines()[-1])
    assert report == {"head": "DifFeedHead", "prg_hub_imported": False}
    remote = load_file(tmp_path / "remote.safetensors")
    image_pixels = default_image_processor(16)(Image.open(image_path), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        torch.testing.assert_close(remote["logits"], model(pixel_values).logits, rtol=1e-5, atol=1e-6)
        blocks = model.prg(image_pixels, output_block_features=True).block_features
    torch.testing.assert_close(remote["transformer_blocks.1@t=0.5"], blocks["transformer_blocks.1@t=0.5"],
                               rtol=1e-5, atol=1e-6)


def test_a_pushed_checkpoint_works_through_transformers_alone(pushed_classifier, image_path, tmp_path):
    repo_id, model = pushed_classifier
    files = HfApi().list_repo_files(repo_id)
    assert {"modeling_prg.py", "configuration_prg.py", "image_processing_prg.py", "pipelines.py"} <= set(files)

    report = json.loads(run_python(REMOTE_USER, repo_id, image_path, tmp_path / "remote.safetensors").stdout
                        .strip().splitlines()[-1])
    assert report["prg_hub_imported"] is False
    assert all(module.startswith("transformers_modules.") for module in report["modules"]), report["modules"]
    assert "trust_remote_code=True" in report["refused_without_trust"]

    remote = load_file(tmp_path / "remote.safetensors")
    processor = default_image_processor(16)
    pixel_values = processor(Image.open(image_path), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(remote["pixel_values"], pixel_values, rtol=0, atol=0)
    with torch.no_grad():  # the same code and weights in another process: equal up to float summation order
        torch.testing.assert_close(remote["logits"], model(pixel_values).logits, rtol=1e-5, atol=1e-6)
        expected = model.prg(pixel_values, feature_t=0.5, num_steps=3).pooler_output
    torch.testing.assert_close(remote["features"], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(remote["piped_features"].reshape(expected.shape), expected, rtol=1e-5, atol=1e-6)
    local_labels = pipeline("image-classification", model=repo_id)(str(image_path), top_k=3)
    assert [entry["label"] for entry in report["labels"]] == [entry["label"] for entry in local_labels]
    np.testing.assert_allclose([e["score"] for e in report["labels"]], [e["score"] for e in local_labels], rtol=1e-6)


def test_with_prg_hub_imported_no_trust_remote_code_is_needed(pushed_classifier, image_path):
    repo_id, model = pushed_classifier
    features = pipeline("image-feature-extraction", model=repo_id)(str(image_path), feature_t=0.5, num_steps=3,
                                                                     pool=True)
    assert type(pipeline("image-classification", model=repo_id).model) is PRGForImageClassification
    pixel_values = default_image_processor(16)(Image.open(image_path), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = model.prg(pixel_values, feature_t=0.5, num_steps=3).pooler_output
    torch.testing.assert_close(torch.tensor(features).reshape(expected.shape), expected, rtol=1e-5, atol=1e-6)


VIT_OUTPUTS = """
import json, sys
import numpy as np
from transformers import pipeline
folder, image_path = sys.argv[1:3]
labels = pipeline("image-classification", model=folder)(image_path, top_k=2)
features = pipeline("image-feature-extraction", model=folder)(image_path)
print(json.dumps({"labels": labels, "features": np.asarray(features).tolist()}))
"""


def test_importing_prg_hub_leaves_other_models_pipelines_as_they_are(image_path, tmp_path):
    """A tiny ViT through both tasks: the same output in a process without prg_hub as with it imported."""
    config = ViTConfig(image_size=16, patch_size=8, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=16, num_labels=2)
    torch.manual_seed(0)
    ViTForImageClassification(config).save_pretrained(tmp_path / "vit")
    ViTImageProcessorPil(size={"height": 16, "width": 16}).save_pretrained(tmp_path / "vit")
    without = json.loads(run_python(BLOCK_PRG_HUB + VIT_OUTPUTS, tmp_path / "vit", image_path).stdout
                         .strip().splitlines()[-1])
    with_prg_hub = json.loads(run_python("import prg_hub\n" + VIT_OUTPUTS, tmp_path / "vit", image_path).stdout
                              .strip().splitlines()[-1])
    assert with_prg_hub == without
