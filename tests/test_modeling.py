"""PRGModel, PRGForImageClassification and PRGForFlowMatching: outputs, losses, generation, wrapping, saving and
Auto loading."""

import json
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from diffusers import DiTTransformer2DModel, UNet2DModel
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModel, AutoModelForImageClassification, AutoModelForPreTraining
from transformers.models.auto.image_processing_auto import AutoImageProcessor  # see prg_hub/__init__.py

from prg_hub import (
    FlowMatchingOutput,
    PRGConfig,
    PRGForFlowMatching,
    PRGForImageClassification,
    PRGImageProcessor,
    PRGModel,
)
from prg_hub.paths import GVPPath, ICFMPath, OTCFMPath
from prg_hub.remote_code import remote_code_files

LABELS = {0: "cat", 1: "dog", 2: "frog"}
MINI_UNET = {  # a fast UNet2DModel for 8×8 images, for optimisation tests
    "block_out_channels": [16, 32],
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D"],
    "norm_num_groups": 8,
}


def tiny_classifier(backbone_type="unet2d", **overrides):
    torch.manual_seed(0)
    config = PRGConfig(backbone_type=backbone_type, num_steps=2, id2label=LABELS, **overrides)
    return PRGForImageClassification(config).eval()


def images(batch=2, size=32, seed=0):
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("backbone_type", ["unet2d", "dit"])
def test_save_and_load_round_trip_is_exact(tmp_path, backbone_type):
    model = tiny_classifier(backbone_type)
    model.save_pretrained(tmp_path)
    code = [path.name for path in remote_code_files()]  # for transformers' remote code (tests/test_remote_code.py)
    assert sorted(os.listdir(tmp_path)) == sorted(["config.json", "model.safetensors", *code])

    reloaded = PRGForImageClassification.from_pretrained(tmp_path).eval()
    saved = load_file(tmp_path / "model.safetensors")
    assert set(saved) == set(model.state_dict())
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name
    for (name, buffer), (_, reloaded_buffer) in zip(model.named_buffers(), reloaded.named_buffers()):
        assert torch.equal(buffer, reloaded_buffer), name  # DiT's recomputed positional embedding included
    x = images()
    with torch.no_grad():
        assert (model(x).logits - reloaded(x).logits).abs().max().item() == 0.0
    assert reloaded.config.to_dict() | {"_name_or_path": ""} == model.config.to_dict() | {"_name_or_path": ""}


def test_auto_classes_load_prg_checkpoints(tmp_path):
    model = tiny_classifier()
    model.save_pretrained(tmp_path)
    PRGImageProcessor().save_pretrained(tmp_path)

    assert isinstance(AutoConfig.from_pretrained(tmp_path), PRGConfig)
    assert isinstance(AutoImageProcessor.from_pretrained(tmp_path), PRGImageProcessor)
    classifier = AutoModelForImageClassification.from_pretrained(tmp_path)
    assert isinstance(classifier, PRGForImageClassification)
    base = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(base, PRGModel)
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(base(x).last_hidden_state, model.prg(x).last_hidden_state, rtol=0, atol=0)


def test_feature_output_shapes_and_trajectory():
    model = PRGModel(PRGConfig(num_steps=3)).eval()
    x = images(batch=2)
    with torch.no_grad():
        output = model(x, output_hidden_states=True)
    assert output.last_hidden_state.shape == (2, 3, 32, 32)
    assert output.pooler_output.shape == (2, 3 * 16 * 16)
    assert len(output.hidden_states) == 4
    assert torch.equal(output.hidden_states[0], x)
    assert torch.equal(output.hidden_states[-1], output.last_hidden_state)
    torch.testing.assert_close(output.pooler_output, F.avg_pool2d(output.last_hidden_state, 2).flatten(1))
    with torch.no_grad():
        assert model(x).hidden_states is None
        assert not torch.equal(model(x, feature_t=0.5).last_hidden_state, output.last_hidden_state)


def test_feature_is_one_euler_step_of_the_network_velocity():
    model = PRGModel(PRGConfig(num_steps=1, feature_t=0.25)).eval()
    x = images()
    with torch.no_grad():
        expected = x + 0.25 * model.velocity.network(x, torch.zeros(2)).sample
        torch.testing.assert_close(model(x).last_hidden_state, expected)


@pytest.mark.parametrize("path", ["gvp", "icfm", "otcfm"])
def test_flow_matching_loss_goes_down_when_overfitting_a_tiny_batch(path):
    torch.manual_seed(0)
    model = PRGModel(PRGConfig(probability_path=path, image_size=8, backbone_config=dict(MINI_UNET)))
    batch = images(batch=4, size=8, seed=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)

    def evaluation_loss():  # averaged over 16 fixed draws of (t, ε) per image
        with torch.no_grad():
            return model.flow_matching_loss(batch.repeat(16, 1, 1, 1), torch.Generator().manual_seed(7)).item()

    before = evaluation_loss()
    for _ in range(40):
        optimizer.zero_grad()
        model.flow_matching_loss(batch.repeat(4, 1, 1, 1)).backward()
        optimizer.step()
    assert evaluation_loss() < 0.75 * before


@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_classifier_loss_adds_beta_times_flow_matching_loss_exactly_when_beta_positive(beta):
    model = tiny_classifier(fm_loss_weight=beta, label_smoothing=0.1)
    x, labels = images(), torch.tensor([0, 2])
    torch.manual_seed(123)
    loss = model(x, labels=labels).loss
    torch.manual_seed(123)
    cross_entropy = F.cross_entropy(model(x).logits, labels, label_smoothing=0.1)
    flow_matching = model.prg.flow_matching_loss(x)
    if beta > 0:
        torch.testing.assert_close(loss, cross_entropy + beta * flow_matching, rtol=0, atol=1e-6)
    else:
        torch.testing.assert_close(loss, cross_entropy, rtol=0, atol=0)
        assert flow_matching.item() > 1e-3  # so the β > 0 case really adds something


def test_a_classifier_training_step_checks_its_pixel_values_once(monkeypatch):
    """The check reads the batch back to the host; with β > 0 the flow-matching term must not read it again."""
    model = tiny_classifier(fm_loss_weight=0.5).train()
    checked = []
    original = PRGModel.check_pixel_values
    monkeypatch.setattr(PRGModel, "check_pixel_values", lambda self, x: checked.append(x) or original(self, x))
    model(images(), labels=torch.tensor([0, 2])).loss.backward()
    assert len(checked) == 1


def as_0_to_255(pixel_values: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] given as [0, 255] values, the mistake the value check exists for."""
    scaled = (pixel_values + 1) * 127.5
    scaled[0, 0, 0, 0] = 255.0
    return scaled


def no_host_read(tensor, *args):
    raise AssertionError("the pixel values were read back to the host")


def test_training_checks_pixel_values_on_the_first_batch_only(monkeypatch):
    """A systematic mistake fails at the first training batch; after a good one, no training step waits for the
    device to read the values back."""
    model = PRGModel(PRGConfig(num_steps=2)).train()
    with pytest.raises(ValueError, match=r"pixel_values reach \|x\| = 255, .*\[0, 255\] values"):
        model(as_0_to_255(images()))
    with pytest.raises(ValueError, match=r"pixel_values reach \|x\| = 255"):  # no batch has passed yet
        model.flow_matching_loss(as_0_to_255(images()))
    model.flow_matching_loss(images())  # the first training batch that passes

    with monkeypatch.context() as patch:
        patch.setattr(torch.Tensor, "item", no_host_read)
        model(as_0_to_255(images(seed=1)))  # not read back, so not refused
        model.flow_matching_loss(as_0_to_255(images(seed=1)))
    with pytest.raises(ValueError, match=r"shape \(B, 3, H, W\)"):  # the free checks stay on every call
        model(images()[:, :1])
    with pytest.raises(ValueError, match="floating-point"):
        model(as_0_to_255(images()).to(torch.uint8))


def test_eval_mode_checks_pixel_values_on_every_call():
    model = PRGModel(PRGConfig(num_steps=2))
    model.train().flow_matching_loss(images())  # a training batch passed: eval mode still checks
    model.eval()
    not_finite = images()
    not_finite[1, 2, 3, 4] = float("nan")
    for _ in range(2):
        with pytest.raises(ValueError, match=r"pixel_values reach \|x\| = 255"):
            model(as_0_to_255(images()))
        with pytest.raises(ValueError, match="pixel_values contains NaN or Inf values"):
            model(not_finite)
        model(images())


def test_generate_returns_images_in_range():
    model = PRGModel(PRGConfig(num_steps=2)).eval()
    first = model.generate(num_images=3, generator=torch.Generator().manual_seed(0))
    second = model.generate(num_images=3, generator=torch.Generator().manual_seed(0))
    assert first.shape == (3, 3, 32, 32)
    assert first.min() >= -1 and first.max() <= 1
    assert torch.equal(first, second)


def test_generate_integrates_noise_to_data_with_the_network():
    model = PRGModel(PRGConfig(num_steps=1, solver="euler")).eval()
    noise = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = (noise - model.velocity.network(noise, torch.full((2,), 1000.0)).sample).clamp(-1, 1)
    torch.testing.assert_close(model.generate(2, generator=torch.Generator().manual_seed(5)), expected)


def test_from_diffusers_wraps_an_existing_unet_with_its_weights():
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=16, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8,
    ).eval()
    model = PRGModel.from_diffusers(unet, probability_path="icfm", num_steps=4).eval()
    assert model.config.backbone_type == "unet2d" and model.config.image_size == 16
    assert model.config.probability_path == "icfm" and isinstance(model.probability_path, ICFMPath)
    x, t = images(size=16), torch.tensor([0.1, 0.9])
    with torch.no_grad():
        torch.testing.assert_close(model.velocity(x, t), unet(x, t * 1000).sample, rtol=0, atol=0)


def test_from_diffusers_wraps_a_dit_into_a_classifier(tmp_path):
    torch.manual_seed(0)
    dit = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=3, out_channels=3, num_layers=1, sample_size=16,
        patch_size=4, num_embeds_ada_norm=1,
    ).eval()
    classifier = PRGForImageClassification.from_diffusers(dit, probability_path="gvp", num_labels=4).eval()
    x, t = images(size=16), torch.tensor([0.3, 0.6])
    with torch.no_grad():
        expected = dit(x, t * 1000, class_labels=torch.tensor([1, 1])).sample
        torch.testing.assert_close(classifier.prg.velocity(x, t), expected, rtol=0, atol=0)
    classifier.save_pretrained(tmp_path)
    reloaded = PRGForImageClassification.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, classifier(x).logits)


def test_classifier_starts_from_a_flow_checkpoint(tmp_path):
    flow = PRGModel(PRGConfig()).eval()
    flow.save_pretrained(tmp_path)
    classifier = PRGForImageClassification.from_pretrained(tmp_path, num_labels=5).eval()
    for name, tensor in flow.state_dict().items():
        assert torch.equal(classifier.prg.state_dict()[name], tensor), name
    assert classifier.head.classifier.weight.shape == (5, 768)
    # The new head is initialised as a fresh classifier's: N(0, 0.02) weights, zero biases, identity LayerNorm.
    for layer in (classifier.head.hidden, classifier.head.classifier):
        assert torch.isfinite(layer.weight).all()
        assert layer.weight.std().item() == pytest.approx(0.02, rel=0.1)
        assert torch.equal(layer.bias, torch.zeros_like(layer.bias))
    assert torch.equal(classifier.head.norm.weight, torch.ones(768))
    assert torch.equal(classifier.head.norm.bias, torch.zeros(768))
    logits = classifier(images()).logits
    assert torch.isfinite(logits).all() and logits.abs().max() < 10


def test_per_step_checkpointing_keeps_gradients_and_is_not_saved(tmp_path):
    gradients = []
    for enabled in (False, True):
        model = tiny_classifier().train()
        model.prg.gradient_checkpointing = enabled
        model(images(), labels=torch.tensor([1, 2])).loss.backward()
        gradients.append({n: p.grad for n, p in model.named_parameters()})
    for name, plain in gradients[0].items():
        torch.testing.assert_close(gradients[1][name], plain, rtol=1e-5, atol=1e-7)

    model = tiny_classifier()
    with warnings.catch_warnings():  # newer transformers name it activation_checkpointing_enable
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable()  # transformers' switch turns on PRG's per-step checkpointing only
    assert model.prg.gradient_checkpointing is True
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model.prg.velocity.modules())
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "gradient_checkpointing" not in saved  # a training switch, not part of the model
    assert PRGForImageClassification.from_pretrained(tmp_path).prg.gradient_checkpointing is False


def _saved_activation_bytes(num_steps, gradient_checkpointing):
    """Bytes autograd keeps for the backward pass of one forward through `num_steps` Euler steps."""
    torch.manual_seed(0)
    config = PRGConfig(image_size=8, backbone_config=dict(MINI_UNET), num_steps=num_steps)
    model = PRGModel(config)
    model.gradient_checkpointing = gradient_checkpointing
    saved = []

    def pack(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(images(batch=4, size=8)).last_hidden_state.sum()
    return sum(saved)


def test_per_step_checkpointing_keeps_memory_from_growing_with_the_steps():
    state_bytes = 4 * 3 * 8 * 8 * 4  # one (B, C, H, W) float32 state
    plain = [_saved_activation_bytes(steps, False) for steps in (4, 8)]
    checkpointed = [_saved_activation_bytes(steps, True) for steps in (4, 8)]
    plain_per_step = (plain[1] - plain[0]) / 4
    checkpointed_per_step = (checkpointed[1] - checkpointed[0]) / 4
    assert plain_per_step > 100 * state_bytes  # every network activation of every step is kept
    assert checkpointed_per_step <= 1.5 * state_bytes  # only the state at each grid point is kept


def _network_input_dtypes(model):
    """The dtypes of the images the diffusers network reads, recorded call by call."""
    seen = []
    model.base_model.velocity.network.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    return seen


@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float16])
def test_the_network_computes_in_its_weights_dtype_and_everything_else_in_float32(weight_dtype):
    model = tiny_classifier().to(weight_dtype)
    network_inputs = _network_input_dtypes(model)
    for pixel_dtype in (torch.float32, torch.bfloat16, torch.float16):
        output = model.prg(images().to(pixel_dtype), output_hidden_states=True)
        assert output.last_hidden_state.dtype == output.pooler_output.dtype == torch.float32
        assert {state.dtype for state in output.hidden_states} == {torch.float32}  # the ODE state, every step
        classified = model(images().to(pixel_dtype), labels=torch.tensor([1, 2]))
        assert classified.logits.dtype == classified.loss.dtype == torch.float32
        assert torch.isfinite(classified.logits).all()
    assert set(network_inputs) == {weight_dtype}  # while v_θ runs in the weights' dtype
    assert model.prg.flow_matching_loss(images()).dtype == torch.float32
    assert model.prg.generate(2).dtype == torch.float32
    assert model.dtype == weight_dtype  # weights untouched


def test_a_float64_input_or_model_integrates_in_float64():
    model = tiny_classifier()
    network_inputs = _network_input_dtypes(model)
    output = model.prg(images().double())
    assert output.last_hidden_state.dtype == torch.float64 and set(network_inputs) == {torch.float32}
    reference = model.prg(images()).last_hidden_state  # the same float32 network: only the state's rounding differs
    torch.testing.assert_close(output.last_hidden_state.float(), reference, rtol=1e-5, atol=1e-5)
    model = tiny_classifier().double()
    assert model(images()).logits.dtype == torch.float64 and model.prg.generate(1).dtype == torch.float64


def test_autocast_training_keeps_float32_weights_state_logits_and_gradients():
    model = tiny_classifier().train()
    network_outputs = []
    model.prg.velocity.network.register_forward_hook(lambda module, args, out: network_outputs.append(out.sample.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = model(images(), labels=torch.tensor([1, 2]), output_hidden_states=True)
    assert set(network_outputs) == {torch.bfloat16}  # autocast runs the network in bfloat16
    assert {state.dtype for state in output.hidden_states} == {torch.float32}
    assert output.logits.dtype == output.loss.dtype == torch.float32
    output.loss.backward()
    assert all(p.dtype == p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None)


def test_random_draws_come_from_the_generator_alone():
    model = PRGModel(PRGConfig(image_size=8, backbone_config=dict(MINI_UNET), num_steps=2))
    global_state = torch.random.get_rng_state()
    losses = [model.flow_matching_loss(images(size=8), generator=torch.Generator().manual_seed(5)) for _ in range(2)]
    samples = [model.generate(2, generator=torch.Generator().manual_seed(5)) for _ in range(2)]
    assert torch.equal(torch.random.get_rng_state(), global_state)  # the global stream is untouched
    assert torch.equal(losses[0], losses[1]) and torch.equal(samples[0], samples[1])


def test_flow_matching_model_returns_the_flow_matching_loss_of_prg_model():
    model = PRGForFlowMatching(PRGConfig(image_size=8, backbone_config=dict(MINI_UNET)))
    x = images(batch=4, size=8)
    output = model(x, generator=torch.Generator().manual_seed(3))
    expected = model.prg.flow_matching_loss(x, generator=torch.Generator().manual_seed(3))
    assert isinstance(output, FlowMatchingOutput) and output.loss.shape == ()
    assert torch.equal(output.loss, expected)
    assert torch.equal(model(x, generator=torch.Generator().manual_seed(3), return_dict=False)[0], expected)
    output.loss.backward()  # the training step of the pretraining script: every weight of the network gets a gradient
    assert all(parameter.grad is not None for parameter in model.parameters())


def _assert_same_network(model, reference):
    weights = reference.base_model.state_dict()
    assert weights.keys() == model.base_model.state_dict().keys()
    for name, tensor in weights.items():
        assert torch.equal(model.base_model.state_dict()[name], tensor), name


def test_flow_matching_checkpoints_load_into_every_prg_class_and_back(tmp_path):
    torch.manual_seed(0)
    pretrained = PRGForFlowMatching(PRGConfig(image_size=16, num_steps=2)).eval()
    pretrained.save_pretrained(tmp_path / "flow-matching")
    saved = load_file(tmp_path / "flow-matching" / "model.safetensors")
    assert saved.keys() == pretrained.state_dict().keys()
    assert all(name.startswith("prg.velocity.network.") for name in saved)

    base, info = PRGModel.from_pretrained(tmp_path / "flow-matching", output_loading_info=True)
    _assert_same_network(base, pretrained)
    assert not info["missing_keys"] and not info["unexpected_keys"]

    classifier, info = PRGForImageClassification.from_pretrained(
        tmp_path / "flow-matching", num_labels=3, output_loading_info=True
    )
    _assert_same_network(classifier, pretrained)
    assert info["missing_keys"] == {f"head.{name}" for name in classifier.head.state_dict()}  # the new head only
    assert torch.equal(classifier.head.classifier.bias, torch.zeros(3))

    base.save_pretrained(tmp_path / "prg-model")  # an existing PRGModel checkpoint starts a pretraining run
    resumed, info = PRGForFlowMatching.from_pretrained(tmp_path / "prg-model", output_loading_info=True)
    _assert_same_network(resumed, pretrained)
    assert not info["missing_keys"] and not info["unexpected_keys"]

    auto = AutoModelForPreTraining.from_pretrained(tmp_path / "flow-matching")
    assert type(auto) is PRGForFlowMatching
    x = images(size=16)
    torch.testing.assert_close(auto(x, generator=torch.Generator().manual_seed(1)).loss,
                               pretrained(x, generator=torch.Generator().manual_seed(1)).loss, rtol=0, atol=0)


@pytest.mark.parametrize("model_class", [PRGModel, PRGForImageClassification, PRGForFlowMatching])
def test_return_dict_false_returns_the_output_as_a_tuple(model_class):
    torch.manual_seed(0)
    model = model_class(PRGConfig(image_size=16, num_steps=1)).eval()
    x = images(size=16)
    outputs = []
    with torch.no_grad():
        for call in (lambda: model(x).to_tuple(), lambda: model(x, return_dict=False)):
            torch.manual_seed(1)  # PRGForFlowMatching draws t and ε
            outputs.append(call())
        model.config.return_dict = False
        torch.manual_seed(1)
        outputs.append(model(x))
    for output in outputs[1:]:
        assert type(output) is tuple and len(output) == len(outputs[0])
        assert all(torch.equal(a, b) for a, b in zip(output, outputs[0]))


def test_a_config_saved_with_the_former_name_path_loads_its_probability_path(tmp_path):
    model = PRGModel(PRGConfig(image_size=16, probability_path="icfm"))
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["probability_path"] == "icfm" and "path" not in saved
    saved["path"] = saved.pop("probability_path")  # a config.json written before the rename
    (tmp_path / "config.json").write_text(json.dumps(saved))

    reloaded = PRGModel.from_pretrained(tmp_path)
    assert reloaded.config.probability_path == "icfm" and isinstance(reloaded.probability_path, ICFMPath)
    _assert_same_network(reloaded, model)
    reloaded.save_pretrained(tmp_path / "again")
    resaved = json.loads((tmp_path / "again" / "config.json").read_text())
    assert resaved["probability_path"] == "icfm" and "path" not in resaved
    assert PRGConfig(path="gvp", probability_path="gvp").probability_path == "gvp"
    assert isinstance(PRGModel(PRGConfig(image_size=16)).probability_path, OTCFMPath)  # the default
    assert isinstance(PRGModel(PRGConfig(image_size=16, probability_path="gvp")).probability_path, GVPPath)


@pytest.mark.parametrize("initializer_range", [0.02, 0.1])
def test_head_weights_are_drawn_with_the_configured_initializer_range(tmp_path, initializer_range):
    torch.manual_seed(0)
    fresh = PRGForImageClassification(PRGConfig(num_labels=10, initializer_range=initializer_range))
    PRGModel(PRGConfig()).save_pretrained(tmp_path)
    from_flow = PRGForImageClassification.from_pretrained(tmp_path, num_labels=10, initializer_range=initializer_range)
    for classifier in (fresh, from_flow):
        for layer in (classifier.head.hidden, classifier.head.classifier):  # 768 × 768 and 10 × 768 weights
            assert layer.weight.std().item() == pytest.approx(initializer_range, rel=0.05)
            assert layer.weight.mean().abs().item() < 0.05 * initializer_range


def test_classifier_without_head_bias_round_trips_exactly(tmp_path):
    model = tiny_classifier(head_bias=False)
    assert model.head.classifier.bias is None and model.head.hidden.bias is not None
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    assert "head.classifier.bias" not in saved and "head.classifier.weight" in saved
    assert set(saved) == set(model.state_dict())
    reloaded = PRGForImageClassification.from_pretrained(tmp_path).eval()
    assert reloaded.config.head_bias is False and reloaded.head.classifier.bias is None
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name
    x = images()
    with torch.no_grad():
        assert (model(x).logits - reloaded(x).logits).abs().max().item() == 0.0
    assert "head.classifier.bias" in tiny_classifier().state_dict()  # the default keeps the bias


def test_flow_checkpoint_loads_into_a_classifier_without_head_bias(tmp_path):
    flow = PRGModel(PRGConfig()).eval()
    flow.save_pretrained(tmp_path)
    classifier = PRGForImageClassification.from_pretrained(tmp_path, num_labels=5, head_bias=False).eval()
    for name, tensor in flow.state_dict().items():
        assert torch.equal(classifier.prg.state_dict()[name], tensor), name
    assert classifier.head.classifier.bias is None and classifier.head.classifier.weight.shape == (5, 768)
    for layer in (classifier.head.hidden, classifier.head.classifier):  # initialised afresh, N(0, 0.02)
        assert layer.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert torch.equal(classifier.head.hidden.bias, torch.zeros(768))
    logits = classifier(images()).logits
    assert logits.shape == (2, 5) and torch.isfinite(logits).all()
