"""The two pipelines on PIL images, loaded from a PRG checkpoint folder by `pipeline(...)`, with and without the
speed options (bf16 weights, torch.compile, channels-last); other models get transformers' own behaviour."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import pipeline
from transformers.models.vit import ViTConfig, ViTForImageClassification, ViTImageProcessorPil
from transformers.pipelines import ImageClassificationPipeline, ImageFeatureExtractionPipeline

import prg_hub
from prg_hub import (
    PRGConfig,
    PRGFeatureExtractor,
    PRGForFlowMatching,
    PRGForImageClassification,
    PRGImageClassificationPipeline,
    PRGImageProcessor,
    PRGModel,
)
from prg_hub.modeling_prg import FastInferenceOptions

LABELS = {0: "airplane", 1: "bird", 2: "ship"}
EXAMPLE_IMAGES = Path(__file__).resolve().parents[1] / "examples" / "images"


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


@pytest.fixture(scope="module")
def block_head_checkpoint(tmp_path_factory):
    """A DifFormer classifier over two blocks at two times."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("prg-difformer")
    config = PRGConfig(num_steps=2, id2label=LABELS, head_type="difformer", feature_blocks=["mid_block", "up_blocks.0"],
                       feature_times=[0.25, 0.5], head_width=32, head_depth=1, head_attention_heads=2)
    PRGForImageClassification(config).save_pretrained(folder)
    PRGImageProcessor().save_pretrained(folder)
    return folder


def test_image_classification_pipeline_serves_a_block_head(block_head_checkpoint, pil_images):
    predictions = pipeline("image-classification", model=str(block_head_checkpoint))(pil_images[0], top_k=3)
    model = PRGForImageClassification.from_pretrained(block_head_checkpoint).eval()
    pixel_values = PRGImageProcessor()(pil_images[0], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        probabilities = model(pixel_values).logits.softmax(-1)[0]
    label_indices = {label: index for index, label in LABELS.items()}
    for prediction in predictions:
        label_index = label_indices[prediction["label"]]
        assert prediction["score"] == pytest.approx(probabilities[label_index].item(), abs=1e-6)


def test_feature_extraction_returns_the_blocks_of_the_config(block_head_checkpoint, pil_images):
    extractor = pipeline("image-feature-extraction", model=str(block_head_checkpoint))
    output = extractor(pil_images[0], return_blocks=True, return_tensors=True)
    assert torch.equal(output["features"], extractor(pil_images[0], return_tensors=True))  # as without blocks
    expected = reference_features(block_head_checkpoint, pil_images[0], output_block_features=True).block_features
    assert list(output["blocks"]) == ["mid_block@t=0.25", "up_blocks.0@t=0.25", "mid_block@t=0.5",
                                      "up_blocks.0@t=0.5"]
    for key, value in expected.items():
        torch.testing.assert_close(output["blocks"][key], value, rtol=0, atol=0)
    pooled = extractor(pil_images[0], return_blocks=True, pool=True)
    assert np.asarray(pooled["features"]).shape == (1, 768)
    for key, value in expected.items():  # pooled: the mean over positions, as the linear head reads it
        np.testing.assert_allclose(pooled["blocks"][key], value.mean(dim=(2, 3)).numpy(), rtol=1e-6, atol=1e-6)
    batched = extractor(pil_images, return_blocks=True, return_tensors=True, batch_size=2)
    alone = extractor(pil_images[1], return_blocks=True, return_tensors=True)
    for key, value in alone["blocks"].items():  # each image gets its own blocks (up to batch-size rounding)
        torch.testing.assert_close(batched[1]["blocks"][key], value, rtol=1e-4, atol=1e-5)


def test_feature_extraction_reads_the_blocks_and_times_of_the_call(checkpoint, pil_images):
    extractor = pipeline("image-feature-extraction", model=str(checkpoint))
    output = extractor(pil_images[0], return_blocks=True, feature_blocks=["down_blocks.1"], feature_times=[0.5],
                       return_tensors=True)
    expected = reference_features(checkpoint, pil_images[0], output_block_features=True,
                                  feature_blocks=["down_blocks.1"], feature_times=[0.5]).block_features
    assert list(output["blocks"]) == ["down_blocks.1@t=0.5"]
    torch.testing.assert_close(output["blocks"]["down_blocks.1@t=0.5"], expected["down_blocks.1@t=0.5"])
    assert output["blocks"]["down_blocks.1@t=0.5"].shape == (1, 32, 16, 16)
    with pytest.raises(ValueError, match=r"output_block_features=True reads blocks .* pass feature_blocks"):
        extractor(pil_images[0], return_blocks=True)  # the PRG-head checkpoint names no blocks
    with pytest.raises(ValueError, match=r"feature_blocks and feature_times choose the blocks that return_blocks=True "
                                         r"returns; pass return_blocks=True with them"):
        extractor(pil_images[0], feature_blocks=["mid_block"])


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


@pytest.fixture(scope="module")
def example_image_paths() -> list[str]:
    """The CIFAR-10 example images, which the shipped classifier labels with clear margins."""
    return [str(path) for path in sorted(EXAMPLE_IMAGES.glob("*.png"))]


def test_bfloat16_pipelines_match_float32_with_float32_inputs_and_features(example_image_paths):
    """`dtype=torch.bfloat16` runs the network in bf16 on a float32 ODE state: the shipped classifier's scores
    stay within 0.02 of the float32 ones (measured: 0.003), so every example image that float32 labels with a
    margin over 0.04 keeps its label (all but a few near-ties); the features stay float32 and close."""
    float32 = pipeline("image-classification", model=prg_hub.DEFAULT_MODEL)
    bfloat16 = pipeline("image-classification", model=prg_hub.DEFAULT_MODEL, dtype=torch.bfloat16)
    assert bfloat16.model.dtype == torch.bfloat16 and float32.model.dtype == torch.float32
    assert model_input(bfloat16, example_image_paths[0]).dtype == torch.float32
    expected, predicted = float32(example_image_paths, top_k=10), bfloat16(example_image_paths, top_k=10)
    clear = [i for i, scores in enumerate(expected) if scores[0]["score"] - scores[1]["score"] > 0.04]
    assert len(clear) >= 15
    assert [predicted[i][0]["label"] for i in clear] == [expected[i][0]["label"] for i in clear]
    for fast, exact in zip(predicted, expected, strict=True):
        fast_scores = {p["label"]: p["score"] for p in fast}
        np.testing.assert_allclose([fast_scores[p["label"]] for p in exact], [p["score"] for p in exact], atol=0.02)

    extractors = [pipeline("image-feature-extraction", model=prg_hub.DEFAULT_MODEL, dtype=dtype)
                  for dtype in (torch.float32, torch.bfloat16)]
    exact, fast = (extractor(example_image_paths[:4], pool=True, return_tensors=True) for extractor in extractors)
    for fast_features, exact_features in zip(fast, exact, strict=True):
        assert fast_features.dtype == torch.float32
        torch.testing.assert_close(fast_features, exact_features, rtol=0.05, atol=0.02)


def test_compile_and_channels_last_options_reach_the_model(checkpoint, pil_images):
    """`compile=True` or `channels_last=True` at construction: the velocity network is compiled in place, or its
    convolutions hold channels-last weights; the features equal the eager float32 ones. Both at once are refused
    on the CPU (a compiled network with channels-last weights has wrong gradients there)."""
    compiled = pipeline("image-feature-extraction", model=str(checkpoint), compile=True)
    assert compiled.model.fast_inference_options == FastInferenceOptions(
        dtype=torch.float32, compile=True, compile_mode="default")
    assert compiled.model.velocity._compiled_call_impl is not None
    channels_last = pipeline("image-feature-extraction", model=str(checkpoint), channels_last=True)
    assert channels_last.model.fast_inference_options == FastInferenceOptions(dtype=torch.float32, channels_last=True)
    convolutions = [module for module in channels_last.model.velocity.modules() if isinstance(module, torch.nn.Conv2d)]
    assert convolutions and all(conv.weight.is_contiguous(memory_format=torch.channels_last) for conv in convolutions)
    reference = reference_features(checkpoint, pil_images[0]).last_hidden_state
    for extractor in (compiled, channels_last):
        torch.testing.assert_close(extractor(pil_images[0], return_tensors=True), reference, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="compile with channels_last is refused on the CPU"):
        pipeline("image-feature-extraction", model=str(checkpoint), compile=True, channels_last=True)


def test_a_bad_dtype_is_refused_with_the_names_it_takes(checkpoint):
    model = PRGForImageClassification.from_pretrained(checkpoint)
    with pytest.raises(ValueError, match=r"dtype must be torch.bfloat16, torch.float16 or torch.float32.*'float8'"):
        pipeline("image-classification", model=model, image_processor=PRGImageProcessor(), dtype="float8")


def test_speed_options_are_refused_for_other_models(tmp_path):
    config = ViTConfig(image_size=16, patch_size=8, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=8, num_labels=2)
    ViTForImageClassification(config).save_pretrained(tmp_path)
    ViTImageProcessorPil(size={"height": 16, "width": 16}).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="only apply to PRG models; ViTForImageClassification"):
        pipeline("image-classification", model=str(tmp_path), compile=True)
