"""`enable_fast_inference`: bfloat16/float16 weights with a float32 ODE state, channels-last weights, and the velocity
network compiled in place (fullgraph) for inference and for finetuning with per-step gradient checkpointing."""

import copy
import json

import pytest
import torch

from prg_hub import PRGConfig, PRGForImageClassification, PRGModel
from prg_hub.modeling_prg import FastInferenceOptions
from prg_hub.presets import backbone_preset
from prg_hub.solvers import time_grid

LABELS = {0: "cat", 1: "dog", 2: "frog"}
# The smallest networks of each backbone that keep what compiling must get right, so that CPU compiles stay short:
# the UNet keeps a down- and an upsampler (its mid block, which adds nothing new, is dropped), DiT one block.
SMALLEST_BACKBONES = {
    "unet2d": {**backbone_preset("unet2d", "tiny", 8), "mid_block_type": None},
    "dit": {**backbone_preset("dit", "tiny", 8), "num_layers": 1},
}


@pytest.fixture(autouse=True)
def fresh_compile_caches():
    """Each test compiles from scratch: what it compiles, and its recompiles, are its own."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def images(batch=2, size=8, seed=0):
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def smallest_classifier(backbone_type="unet2d", **overrides):
    torch.manual_seed(0)
    config = PRGConfig(backbone_type=backbone_type, image_size=8, backbone_config=SMALLEST_BACKBONES[backbone_type],
                       num_steps=2, id2label=LABELS, **overrides)
    return PRGForImageClassification(config).eval()


def relative_error(value, reference):
    return ((value.double() - reference.double()).norm() / reference.double().norm()).item()


def integrate_with_bfloat16_state(velocity, x, num_steps):
    """Euler from t = 0 to 1 with the state itself in bfloat16, as when the state took the weights' dtype:
    x_{k+1} = bf16(x_k + h·v(x_k, t_k)), every sum rounded to bfloat16."""
    x = x.to(torch.bfloat16)
    grid = time_grid(0.0, 1.0, num_steps)
    for t0, t1 in zip(grid[:-1], grid[1:]):
        x = (x + (t1 - t0) * velocity(x, t0.expand(x.shape[0]))).to(torch.bfloat16)
    return x


def test_bfloat16_features_keep_the_error_of_one_network_evaluation_whatever_the_number_of_steps():
    """x(t = 1) of a bfloat16 network against float32: with the float32 state the error does not grow from 20 to
    100 Euler steps and stays below the network's own rounding integrated along the path; a bfloat16 state (the
    rounding of every step accumulating) is clearly worse and grows with the steps."""
    torch.manual_seed(0)
    reference = PRGModel(PRGConfig(image_size=16, backbone_config=backbone_preset("unet2d", "tiny", 16))).eval()
    fast = copy.deepcopy(reference).enable_fast_inference(dtype="bf16")
    x0 = images(batch=4, size=16, seed=1)
    error, bfloat16_state_error = {}, {}
    with torch.no_grad():
        for num_steps in (20, 100):
            exact = reference(x0, feature_t=1.0, num_steps=num_steps).last_hidden_state
            error[num_steps] = relative_error(fast(x0, feature_t=1.0, num_steps=num_steps).last_hidden_state, exact)
            bfloat16_state_error[num_steps] = relative_error(
                integrate_with_bfloat16_state(fast.velocity, x0, num_steps), exact
            )
        t = torch.zeros(4)
        network_error = relative_error(fast.velocity(x0, t), reference.velocity(x0, t))
    # ‖Δx(1)‖ ≤ ∫‖Δv‖dt ≈ network_error·‖x(1) − x(0)‖ when each evaluation is off by the network's own error
    network_scale = network_error * ((exact - x0).norm() / exact.norm()).item()

    assert error[100] <= 1.5 * error[20]
    assert error[100] <= network_scale
    assert bfloat16_state_error[100] > 5 * error[100]
    assert bfloat16_state_error[100] > 3 * bfloat16_state_error[20]
    assert bfloat16_state_error[100] > network_scale


@pytest.mark.parametrize(
    ("name", "dtype"),
    [("bfloat16", torch.bfloat16), ("bf16", torch.bfloat16), (torch.bfloat16, torch.bfloat16),
     ("float16", torch.float16), ("fp16", torch.float16), (torch.float16, torch.float16),
     ("float32", torch.float32), ("fp32", torch.float32), (torch.float32, torch.float32)],
)
def test_enable_fast_inference_casts_every_weight_to_the_named_dtype(name, dtype):
    model = smallest_classifier().to(torch.float64 if dtype == torch.float32 else torch.float32)
    assert model.enable_fast_inference(dtype=name) is model
    assert {parameter.dtype for parameter in model.parameters()} == {dtype}
    assert model.fast_inference_options == FastInferenceOptions(dtype=dtype)
    assert model.enable_fast_inference().dtype == dtype  # dtype=None keeps the weights' dtype


@pytest.mark.parametrize("dtype", ["int8", torch.int8, torch.float64, "half"])
def test_enable_fast_inference_refuses_other_dtypes_and_leaves_the_model_as_it_was(dtype):
    model = smallest_classifier()
    allowed = r"torch.bfloat16, torch.float16 or torch.float32, or one of the names \['bfloat16', 'bf16', 'float16'"
    with pytest.raises(ValueError, match=allowed + r".*got " + repr(dtype).replace(".", r"\.")):
        model.enable_fast_inference(dtype=dtype, compile=True)
    with pytest.raises(ValueError, match=r"compile_mode must be one of \['default', .*'reduce-overhead'.*got 'fast'"):
        model.enable_fast_inference(dtype="bf16", compile_mode="fast")
    assert model.dtype == torch.float32 and model.fast_inference_options is None
    assert model.prg.velocity._compiled_call_impl is None  # nothing was compiled


def test_a_bfloat16_model_takes_pixel_values_of_every_floating_dtype():
    model = smallest_classifier().enable_fast_inference(dtype="bf16")
    x = images()
    with torch.no_grad():
        reference = model.prg(x).last_hidden_state
        for pixel_dtype in (torch.bfloat16, torch.float16, torch.float64):
            features = model.prg(x.to(pixel_dtype)).last_hidden_state
            assert features.dtype == (torch.float64 if pixel_dtype == torch.float64 else torch.float32)
            # only the rounding of the input (bfloat16: 2⁻⁹ relative) separates them
            assert relative_error(features, reference) < 2e-2


def test_options_accumulate_and_are_never_saved(tmp_path):
    model = smallest_classifier()
    model.save_pretrained(tmp_path / "plain")
    assert model.fast_inference_options is None
    model.enable_fast_inference(dtype="bf16", compile=True, compile_mode="max-autotune-no-cudagraphs")
    compiled = FastInferenceOptions(dtype=torch.bfloat16, compile=True, compile_mode="max-autotune-no-cudagraphs")
    assert model.fast_inference_options == compiled
    # channels-last weights give a compiled network wrong gradients on the CPU: refused, and nothing changes
    with pytest.raises(ValueError, match="compile with channels_last is refused on the CPU: torch's inductor"):
        model.enable_fast_inference(channels_last=True)
    assert model.fast_inference_options == compiled and model.dtype == torch.bfloat16
    assert not any(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
                   for p in model.parameters() if p.dim() == 4)
    model.enable_fast_inference(dtype="fp16")  # a later call keeps the earlier compilation
    assert model.fast_inference_options == FastInferenceOptions(
        dtype=torch.float16, compile=True, compile_mode="max-autotune-no-cudagraphs"
    )
    model.save_pretrained(tmp_path / "fast")
    plain = json.loads((tmp_path / "plain" / "config.json").read_text())
    fast = json.loads((tmp_path / "fast" / "config.json").read_text())
    assert fast == plain | {"dtype": "float16"}  # the weights' dtype, as transformers records it; nothing else
    assert PRGForImageClassification.from_pretrained(tmp_path / "fast").fast_inference_options is None


def test_compiling_in_place_keeps_the_weight_names_and_saves_the_same_weights(tmp_path):
    model = smallest_classifier()
    names = list(model.state_dict())
    model.enable_fast_inference(compile=True)
    compiled_call = model.prg.velocity._compiled_call_impl
    model.enable_fast_inference(compile=True)  # the same mode: the same compiled network, not a second wrapper
    assert model.prg.velocity._compiled_call_impl is compiled_call
    model.enable_fast_inference(compile=True, compile_mode="max-autotune-no-cudagraphs")
    assert model.prg.velocity._compiled_call_impl is not compiled_call
    assert list(model.state_dict()) == names and not any("_orig_mod" in name for name in names)

    model.save_pretrained(tmp_path)
    reloaded = PRGForImageClassification.from_pretrained(tmp_path)
    assert list(reloaded.state_dict()) == names
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name


def test_channels_last_puts_every_convolution_weight_in_channels_last_format():
    model = smallest_classifier()
    with torch.no_grad():
        reference = model(images()).logits
        model.enable_fast_inference(channels_last=True)
        logits = model(images()).logits
    four_dimensional = [p for p in model.parameters() if p.dim() == 4]
    assert four_dimensional and all(p.is_contiguous(memory_format=torch.channels_last) for p in four_dimensional)
    assert model.fast_inference_options == FastInferenceOptions(dtype=torch.float32, channels_last=True)
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-5)


def test_compiling_refuses_a_graph_break_instead_of_running_eager_code(monkeypatch):
    model = smallest_classifier("dit").enable_fast_inference(compile=True)
    network_velocity = model.prg.velocity.network_velocity

    def velocity_with_a_graph_break(x, timestep):
        torch._dynamo.graph_break()
        return network_velocity(x, timestep)

    monkeypatch.setattr(model.prg.velocity, "network_velocity", velocity_with_a_graph_break)
    with pytest.raises(torch._dynamo.exc.Unsupported, match="graph_break"):
        model(images())


@pytest.mark.parametrize("backbone_type", ["unet2d", "dit"])
def test_compiled_network_gives_the_eager_features_compiling_once_per_shape(tmp_path, backbone_type):
    model = smallest_classifier(backbone_type)
    x = images()
    with torch.no_grad():
        eager = [model.prg(x, num_steps=3).last_hidden_state, model.prg(x, feature_t=0.5, num_steps=5)]
        model.enable_fast_inference(compile=True)
        with torch._dynamo.config.patch(error_on_recompile=True):  # one graph serves every step and every call
            compiled = [model.prg(x, num_steps=3).last_hidden_state, model.prg(x, feature_t=0.5, num_steps=5)]
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(compiled[1].pooler_output, eager[1].pooler_output, rtol=1e-4, atol=1e-5)

    model.save_pretrained(tmp_path)
    with torch.no_grad():
        reloaded = PRGForImageClassification.from_pretrained(tmp_path).eval().prg(x, num_steps=3).last_hidden_state
    torch.testing.assert_close(reloaded, compiled[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backbone_type", ["unet2d", "dit"])
def test_compiled_finetuning_with_per_step_checkpointing_gives_the_exact_gradients(backbone_type):
    """The finetuning step (CE + β·L_FM through the solver) compiled and recomputing each step in the backward pass
    against plain eager autograd: every parameter's gradient within 1e-3 relative error (relative to the largest
    gradients for the attention key biases, whose exact gradient is 0 and which get rounding noise)."""
    labels = torch.tensor([1, 2])
    gradients = []
    for fast in (False, True):
        model = smallest_classifier(backbone_type, fm_loss_weight=0.5).train()
        if fast:
            model.prg.gradient_checkpointing = True
            model.enable_fast_inference(compile=True)
        torch.manual_seed(1)  # the flow-matching term's draws of t and ε
        model(images(), labels=labels).loss.backward()
        gradients.append({name: parameter.grad for name, parameter in model.named_parameters()})
    eager, compiled = gradients
    largest = torch.stack([gradient.norm() for gradient in eager.values()]).max()
    for name, gradient in eager.items():
        assert (compiled[name] - gradient).norm() <= 1e-3 * gradient.norm() + 1e-6 * largest, name
