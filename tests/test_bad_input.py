"""Bad input gets a ValueError (a TypeError for an argument that does not exist) that names the value and what is
allowed."""

import pytest
import torch

from prg_hub import PRGConfig, PRGForFlowMatching, PRGForImageClassification, PRGModel, get_path, integrate
from prg_hub.backbones import build_backbone


@pytest.fixture(scope="module")
def unet_model():
    return PRGModel(PRGConfig(num_steps=1)).eval()


@pytest.fixture(scope="module")
def dit_model():
    return PRGModel(PRGConfig(backbone_type="dit", num_steps=1)).eval()


def test_wrong_channel_count(unet_model):
    with pytest.raises(ValueError, match=r"shape \(B, 3, H, W\).*got \(2, 1, 32, 32\).*PRGImageProcessor"):
        unet_model(torch.zeros(2, 1, 32, 32))


def test_missing_batch_dimension(unet_model):
    with pytest.raises(ValueError, match=r"shape \(B, 3, H, W\).*got \(3, 32, 32\)"):
        unet_model(torch.zeros(3, 32, 32))


def test_integer_pixels_are_refused(unet_model):
    with pytest.raises(ValueError, match=r"floating-point.*got torch.uint8"):
        unet_model(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


def test_spatial_size_the_unet_cannot_take(unet_model):
    with pytest.raises(ValueError, match=r"multiples of 2; got 31x32"):
        unet_model(torch.zeros(1, 3, 31, 32))


@pytest.mark.parametrize("shape, problem", [((1, 3, 32, 30), "got 32x30"), ((1, 3, 30, 30), "got 30x30")])
def test_spatial_size_the_dit_cannot_take(dit_model, shape, problem):
    with pytest.raises(ValueError, match=rf"square images whose side is a multiple of its patch size 4; {problem}"):
        dit_model(torch.zeros(shape))


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), -float("inf")])
def test_nan_or_inf_pixels(unet_model, bad_value):
    pixels = torch.zeros(2, 3, 32, 32)
    pixels[1, 2, 5, 7] = bad_value
    with pytest.raises(ValueError, match="NaN or Inf"):
        unet_model(pixels)
    with pytest.raises(ValueError, match="NaN or Inf"):
        unet_model.flow_matching_loss(pixels)


@pytest.mark.parametrize("feature_t", [0, 0.0, -0.5, 1.01, 2])
def test_feature_t_outside_zero_one(unet_model, feature_t):
    with pytest.raises(ValueError, match=rf"feature_t must be in \(0, 1\].*got {feature_t}"):
        PRGConfig(feature_t=feature_t)
    with pytest.raises(ValueError, match=rf"feature_t must be in \(0, 1\].*got {feature_t}"):
        unet_model(torch.zeros(1, 3, 32, 32), feature_t=feature_t)


@pytest.mark.parametrize("num_steps", [0, -3])
def test_num_steps_below_one(unet_model, num_steps):
    with pytest.raises(ValueError, match=rf"num_steps must be an integer >= 1, got {num_steps}"):
        PRGConfig(num_steps=num_steps)
    with pytest.raises(ValueError, match=rf"num_steps must be an integer >= 1, got {num_steps}"):
        unet_model(torch.zeros(1, 3, 32, 32), num_steps=num_steps)
    with pytest.raises(ValueError, match=rf"num_steps must be an integer >= 1, got {num_steps}"):
        unet_model.generate(1, num_steps=num_steps)


@pytest.mark.parametrize(
    "field, value, allowed",
    [
        ("probability_path", "ddpm", r"allowed probability paths are \['gvp', 'icfm', 'otcfm'\]"),
        ("backbone_type", "resnet", r"allowed backbones are \['dit', 'unet2d'\]"),
        ("solver", "rk45", r"allowed solvers are \['euler', 'heun', 'midpoint', .*'dopri5'"),
    ],
)
def test_unknown_path_backbone_or_solver(field, value, allowed):
    with pytest.raises(ValueError, match=rf"Unknown {field} '{value}': {allowed}"):
        PRGConfig(**{field: value})


def test_unknown_solver_for_one_generation(unet_model):
    with pytest.raises(ValueError, match=r"Unknown solver 'rk45': allowed solvers are \['euler', 'heun', 'midpoint'"):
        unet_model.generate(1, solver="rk45")


def test_the_building_blocks_check_what_they_are_given():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match=r"num_steps must be an integer >= 1, got 0"):
        integrate(lambda x, t: x, x, 0.0, 1.0, 0)
    with pytest.raises(ValueError, match=r"Unknown solver 'explicit_adams': allowed solvers are \['euler'"):
        integrate(lambda x, t: x, x, 0.0, 1.0, 4, solver="explicit_adams")
    with pytest.raises(ValueError, match=r"Unknown probability_path 'rectified': allowed probability paths"):
        get_path("rectified")
    with pytest.raises(ValueError, match=r"Unknown backbone_type 'vit': allowed backbones are \['dit', 'unet2d'\]"):
        build_backbone("vit", {}, 1000.0)


def test_values_set_on_a_loaded_config_are_checked_when_used(tmp_path):
    PRGModel(PRGConfig(num_steps=1)).save_pretrained(tmp_path)
    model = PRGModel.from_pretrained(tmp_path, num_steps=0, solver="rk45")  # set after the config checked itself
    with pytest.raises(ValueError, match=r"num_steps must be an integer >= 1, got 0"):
        model(torch.zeros(1, 3, 32, 32))
    model.config.num_steps = 1
    with pytest.raises(ValueError, match=r"Unknown solver 'rk45'"):
        model(torch.zeros(1, 3, 32, 32))


def test_path_and_probability_path_that_disagree():
    with pytest.raises(ValueError, match=r"probability_path = 'gvp' and path = 'icfm' disagree"):
        PRGConfig(probability_path="gvp", path="icfm")


@pytest.mark.parametrize("model_class", [PRGModel, PRGForImageClassification, PRGForFlowMatching])
def test_unknown_forward_argument_is_named_with_the_accepted_ones(model_class):
    model = model_class(PRGConfig(num_steps=1, image_size=16)).eval()
    message = (rf"{model_class.__name__}\.forward\(\) got unexpected keyword arguments \['feature_T'\]; "
               r"it takes \['pixel_values', .*'return_dict'\]\.")
    with pytest.raises(TypeError, match=message):
        model(torch.zeros(1, 3, 16, 16), feature_T=0.5)


def test_prg_model_lists_its_forward_options():
    model = PRGModel(PRGConfig(num_steps=1, image_size=16)).eval()
    with pytest.raises(TypeError) as error:
        model(torch.zeros(1, 3, 16, 16), feature_T=0.5, numsteps=2)
    assert str(error.value) == (
        "PRGModel.forward() got unexpected keyword arguments ['feature_T', 'numsteps']; it takes ['pixel_values', "
        "'feature_t', 'num_steps', 'output_hidden_states', 'output_block_features', 'feature_blocks', "
        "'feature_times', 'return_dict']."
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"label_smoothing": 1.0}, r"label_smoothing must be in \[0, 1\), got 1.0"),
        ({"initializer_range": 0.0}, r"initializer_range must be a finite number > 0, got 0.0"),
        ({"fm_loss_weight": -0.1}, r"fm_loss_weight \(β\) must be a finite number >= 0, got -0.1"),
        ({"image_size": 64, "backbone_config": {"sample_size": 32}}, r"backbone_config\['sample_size'\] = 32 .* image_size = 64"),
        ({"backbone_config": {"in_channels": 3, "out_channels": 1}}, r"out_channels'\] = 1 but num_channels = 3"),
    ],
)
def test_out_of_range_config_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PRGConfig(**kwargs)


def test_labels_outside_the_label_set():
    model = PRGForImageClassification(PRGConfig(num_steps=1, num_labels=3)).eval()
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\).*got values from 0 to 7"):
        model(torch.zeros(2, 3, 32, 32), labels=torch.tensor([0, 7]))


def test_labels_are_range_checked_in_training_until_a_batch_passed(monkeypatch):
    """A training step reads the labels back only until one batch passed: later steps never wait for the device."""
    model = PRGForImageClassification(PRGConfig(num_steps=1, num_labels=3)).train()
    pixels = torch.zeros(2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\).*got values from 0 to 7"):
        model(pixels, labels=torch.tensor([0, 7]))  # the first batch is checked
    model(pixels, labels=torch.tensor([0, 2]))

    def no_read_back(self):
        raise AssertionError("a training step read a tensor back to the host")

    monkeypatch.setattr(torch.Tensor, "__bool__", no_read_back)
    monkeypatch.setattr(torch.Tensor, "item", no_read_back)
    loss = model(pixels, labels=torch.tensor([1, 2])).loss
    monkeypatch.undo()
    assert torch.isfinite(loss)
    model.eval()
    with pytest.raises(ValueError, match="labels must be in"):  # eval mode checks every call
        model(pixels, labels=torch.tensor([0, 3]))


def test_generate_needs_a_positive_image_count(unet_model):
    with pytest.raises(ValueError, match="num_images must be an integer >= 1, got 0"):
        unet_model.generate(num_images=0)


def test_wrapping_an_unsupported_network():
    with pytest.raises(ValueError, match=r"Cannot wrap a Linear: supported networks are UNet2DModel, DiTTransformer2DModel"):
        PRGModel.from_diffusers(torch.nn.Linear(2, 2))
