"""The two pipelines on PIL images, loaded from a PRG checkpoint folder by `pipeline(...)`; other models get
transformers' own behaviour."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import pipeline
from transformers.models.vit import ViTConfig, ViTForImageClassification, ViTImageProcessorPil
from transformers.pipelines import ImageClassificationPipeline, ImageFeatureExtractionPipeline

from prg_hub import (
    PRGConfig,
    PRGFeatureExtractor,
    PRGForFlowMatching,
    PRGForImageClassification,
    PRGImageClassificationPipeline,
    PRGImageProcessor,
    PRGModel,
)

LABELS = {0: "airplane", 1: "bird", 2: "ship"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("prg-classifier")
    PRGForImageClassification(PRGConfig(num_steps=2, id2label=LABELS)).save_pretrained(folder)
    PRGImageProcessor().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pil_images():
    generator = np.random.default_rng(0)
    return [
        Image.fromarray(generator.integers(0, 256, (48, 40, 3), dtype=np.uint8), "RGB"),
        Image.fromarray(generator.integers(0, 256, (20, 20), dtype=np.uint8), "L"),
    ]


def reference_features(checkpoint, image, **forward_kwargs):
    model = PRGForImageClassification.from_pretrained(checkpoint).eval()
    pixel_values = PRGImageProcessor.from_pretrained(checkpoint)(image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        return model.prg(pixel_values, **forward_kwargs)


def test_feature_extraction_pipeline_is_prg_and_returns_x_t(checkpoint, pil_images):
    extractor = pipeline("image-feature-extraction", model=str(checkpoint))
    assert isinstance(extractor, PRGFeatureExtractor)
    features = extractor(pil_images[0], return_tensors=True)
    assert features.shape == (1, 3, 32, 32)
    torch.testing.assert_close(features, reference_features(checkpoint, pil_images[0]).last_hidden_state)


def test_feature_extraction_options_per_call(checkpoint, pil_images):
    extractor = pipeline("image-feature-extraction", model=str(checkpoint))
    pooled = extractor(pil_images[0], pool=True, feature_t=0.5, num_steps=3, return_tensors=True)
    expected = reference_features(checkpoint, pil_images[0], feature_t=0.5, num_steps=3).pooler_output
    assert pooled.shape == (1, 768)
    torch.testing.assert_close(pooled, expected)
    default = extractor(pil_images[0], pool=True, return_tensors=True)
    assert not torch.allclose(default, pooled)


def test_feature_extraction_of_a_batch_of_mixed_modes(checkpoint, pil_images):
    extractor = pipeline("image-feature-extraction", model=str(checkpoint))
    outputs = extractor(pil_images, pool=True)
    assert [np.asarray(output).shape for output in outputs] == [(1, 768), (1, 768)]
    assert np.isfinite(np.asarray(outputs)).all()


def test_feature_extraction_refuses_a_bad_feature_t(checkpoint, pil_images):
    extractor = pipeline("image-feature-extraction", model=str(checkpoint))
    with pytest.raises(ValueError, match=r"feature_t must be in \(0, 1\].*got 2"):
        extractor(pil_images[0], feature_t=2)


def test_feature_extraction_pipeline_serves_a_flow_matching_checkpoint(tmp_path, pil_images):
    """A pretraining checkpoint (tagged image-feature-extraction on the Hub) gives the features of its network."""
    torch.manual_seed(0)
    PRGForFlowMatching(PRGConfig(num_steps=2)).save_pretrained(tmp_path)
    PRGImageProcessor().save_pretrained(tmp_path)
    extractor = pipeline("image-feature-extraction", model=str(tmp_path))
    assert type(extractor.model) is PRGModel
    features = extractor(pil_images[0], pool=True, feature_t=0.5, return_tensors=True)
    model = PRGModel.from_pretrained(tmp_path).eval()
    pixel_values = PRGImageProcessor.from_pretrained(tmp_path)(pil_images[0], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        torch.testing.assert_close(features, model(pixel_values, feature_t=0.5).pooler_output)


def test_image_classification_pipeline_returns_labels_from_id2label(checkpoint, pil_images):
    classifier = pipeline("image-classification", model=str(checkpoint))
    predictions = classifier(pil_images[0], top_k=3)
    assert {p["label"] for p in predictions} == set(LABELS.values())
    assert sum(p["score"] for p in predictions) == pytest.approx(1.0, abs=1e-5)
    model = PRGForImageClassification.from_pretrained(checkpoint).eval()
    pixel_values = PRGImageProcessor()(pil_images[0], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        probabilities = model(pixel_values).logits.softmax(-1)[0]
    assert predictions[0]["label"] == LABELS[int(probabilities.argmax())]
    assert predictions[0]["score"] == pytest.approx(probabilities.max().item(), abs=1e-5)


def test_image_classification_pipeline_is_the_prg_subclass(checkpoint):
    assert type(pipeline("image-classification", model=str(checkpoint))) is PRGImageClassificationPipeline


def model_input(pipe, image) -> torch.Tensor:
    """The pixel values that `pipe(image)` hands to its model."""
    captured = []
    hook = pipe.model.register_forward_pre_hook(
        lambda module, args, kwargs: captured.append(kwargs["pixel_values"]), with_kwargs=True
    )
    try:
        pipe(image)
    finally:
        hook.remove()
    [pixel_values] = captured
    return pixel_values


@pytest.mark.parametrize("task, stock_class", [("image-classification", ImageClassificationPipeline),
                                               ("image-feature-extraction", ImageFeatureExtractionPipeline)])
def test_other_models_get_the_stock_pipeline_behaviour(tmp_path, task, stock_class):
    """A ViT reads a 16-bit and an RGBA file exactly as transformers' own pipeline does (PIL's RGB conversion)."""
    config = ViTConfig(image_size=16, patch_size=8, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=8, num_labels=2)
    ViTForImageClassification(config).save_pretrained(tmp_path / "vit")
    ViTImageProcessorPil(size={"height": 16, "width": 16}).save_pretrained(tmp_path / "vit")
    registered = pipeline(task, model=str(tmp_path / "vit"))
    stock = pipeline(task, model=str(tmp_path / "vit"), pipeline_class=stock_class)
    assert isinstance(registered, stock_class) and type(stock) is stock_class
    gray = np.tile(np.arange(0, 65536, 4096, dtype=np.uint16), (16, 1))
    Image.fromarray(gray).save(tmp_path / "sixteen-bit.png")
    Image.fromarray(np.zeros((16, 16, 4), dtype=np.uint8), "RGBA").save(tmp_path / "transparent.png")
    for name in ("sixteen-bit.png", "transparent.png"):
        path = str(tmp_path / name)
        assert torch.equal(model_input(registered, path), model_input(stock, path)), name
