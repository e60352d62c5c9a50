"""Classifier heads over block features (`head_type`): configuration errors, block reading through hooks, shapes,
exact save/load, DifFeed's feedback, hook removal and memory, gradients in frozen and finetuned modes."""

import gc

import pytest
import torch
import torch.nn.functional as F

from prg_hub import PRGConfig, PRGForFlowMatching, PRGForImageClassification, PRGModel
from prg_hub.backbones import BACKBONES, build_backbone
from prg_hub.block_features import block_feature_key, block_output_shapes, reading_blocks
from prg_hub.heads import HEADS
from prg_hub.presets import backbone_preset
from prg_hub.solvers import segment_steps

IMAGE_SIZE = 16
LABELS = {0: "cat", 1: "dog", 2: "frog"}
HEAD_SIZES = {"head_width": 32, "head_depth": 1, "head_attention_heads": 2, "head_token_grid": 4}
# Three levels, so that a decoder block (up_blocks.0, 8×8) matches an encoder block (down_blocks.0) for DifFeed.
THREE_LEVEL_UNET = {
    "block_out_channels": [16, 32, 32],
    "down_block_types": ["DownBlock2D"] * 3,
    "up_block_types": ["UpBlock2D"] * 3,
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "add_attention": False,
}
BACKBONE_CONFIGS = {"unet2d": THREE_LEVEL_UNET, "dit": backbone_preset("dit", "tiny", IMAGE_SIZE)}
# Per backbone, the blocks a head reads: one, or two for DifFormer.
BLOCKS = {"unet2d": ["mid_block", "up_blocks.0"], "dit": ["transformer_blocks.0", "transformer_blocks.1"]}
BLOCK_HEADS = ["linear", "attention", "difformer", "diffeed"]


def head_config(backbone_type: str, head_type: str, **overrides) -> PRGConfig:
    blocks = BLOCKS[backbone_type] if head_type == "difformer" else BLOCKS[backbone_type][1:]
    reading = {} if head_type == "prg" else {"feature_blocks": blocks, "feature_times": [0.25, 0.5]}
    settings = {"backbone_type": backbone_type, "backbone_config": dict(BACKBONE_CONFIGS[backbone_type]),
                "image_size": IMAGE_SIZE,
                "head_type": head_type, "num_steps": 2, "id2label": LABELS, **reading, **HEAD_SIZES, **overrides}
    return PRGConfig(**settings)


def classifier(backbone_type: str, head_type: str, seed: int = 0, **overrides) -> PRGForImageClassification:
    torch.manual_seed(seed)
    return PRGForImageClassification(head_config(backbone_type, head_type, **overrides)).eval()


def images(batch=4, seed=0):
    return torch.rand(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def hook_count(model: torch.nn.Module) -> int:
    return sum(len(module._forward_hooks) + len(module._forward_pre_hooks) for module in model.modules())


# ------------------------------------------------------------------------------------------------ configuration


@pytest.mark.parametrize("settings, message", [
    ({"head_type": "mlp"}, r"Unknown head_type 'mlp': allowed heads are \['prg', 'linear', 'attention', "
                           r"'difformer', 'diffeed'\]"),
    ({"head_type": "attention"}, r"head_type 'attention' reads outputs of blocks .* feature_blocks names none: give "
                                 r"feature_blocks, e.g. feature_blocks=\['mid_block'\] \(the blocks of this unet2d "
                                 r"network are \['down_blocks.0', 'down_blocks.1', 'mid_block', 'up_blocks.0', "
                                 r"'up_blocks.1'\]\)"),
    ({"head_type": "linear", "feature_blocks": ["up_blocks.7"]},
     r"Unknown feature_blocks entry 'up_blocks.7' for this unet2d network: its blocks are \['down_blocks.0', "),
    ({"head_type": "linear", "feature_blocks": "mid_block"},
     r"feature_blocks must be a list of block names, got 'mid_block'; e.g. feature_blocks=\['up_blocks.1'\]"),
    ({"head_type": "linear", "feature_blocks": ["mid_block", "mid_block"]},
     r"feature_blocks lists \['mid_block'\] more than once"),
    ({"feature_times": [0.5, 0.25]},
     r"feature_times must be a list of increasing times in \(0, 1\].*got \[0.5, 0.25\]"),
    ({"feature_times": [0.0, 0.5]}, r"feature_times must be a list of increasing times in \(0, 1\].*got \[0.0, 0.5\]"),
    ({"feature_times": [0.5, 1.5]}, r"feature_times must be a list of increasing times in \(0, 1\]"),
    ({"feature_times": []}, r"feature_times must be a list of increasing times in \(0, 1\]"),
    ({"head_type": "attention", "feature_blocks": ["mid_block"], "head_width": 30},
     r"head_attention_heads = 4 must divide head_width = 30"),
    ({"head_type": "attention", "feature_blocks": ["mid_block"], "head_depth": 0},
     r"head_depth must be a positive integer, got 0"),
    ({"head_type": "attention", "feature_blocks": ["mid_block"], "feedback_blocks": {"down_blocks.0": "up_blocks.0"}},
     r"feedback_blocks configures the 'diffeed' head; head_type is 'attention'"),
    ({"head_type": "diffeed", "feature_blocks": ["mid_block"], "feedback_blocks": {"up_blocks.0": "down_blocks.0"}},
     r"feedback_blocks feeds 'down_blocks.0' back into 'up_blocks.0', which does not run before it"),
])
def test_bad_head_settings_are_refused_with_the_fix(settings, message):
    with pytest.raises(ValueError, match=message):
        PRGConfig(**settings)


def test_head_settings_given_to_from_pretrained_are_checked_when_the_model_is_built(tmp_path):
    PRGForFlowMatching(PRGConfig(image_size=IMAGE_SIZE)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"Unknown feature_blocks entry 'up_blocks.5'"):
        PRGForImageClassification.from_pretrained(tmp_path, head_type="linear", feature_blocks=["up_blocks.5"])
    with pytest.raises(ValueError, match=r"head_type 'difformer' reads outputs of blocks"):
        PRGForImageClassification.from_pretrained(tmp_path, head_type="difformer")


def test_diffeed_on_a_unet_whose_decoder_matches_no_encoder_block_names_the_fix():
    config = PRGConfig(image_size=IMAGE_SIZE, head_type="diffeed", feature_blocks=["mid_block"], **HEAD_SIZES)
    with pytest.raises(ValueError, match=r"head_type 'diffeed' found no block to feed back.*Give feedback_blocks="
                                         r"\{receiving block: sending block\} of equal sizes"):
        PRGForImageClassification(config)
    config = head_config("unet2d", "diffeed", feedback_blocks={"down_blocks.1": "up_blocks.1"})
    with pytest.raises(ValueError, match=r"pairs 'down_blocks.1' \(output \(32, 4, 4\)\) with 'up_blocks.1' \(output "
                                         r"\(32, 16, 16\)\): the sending block's output must have the receiving"):
        PRGForImageClassification(config)


# ------------------------------------------------------------------------------------------------ block reading


@pytest.mark.parametrize("backbone_type, preset", [("unet2d", "tiny"), ("unet2d", "small"), ("unet2d", "paper"),
                                                    ("dit", "tiny"), ("dit", "small")])
def test_block_names_and_shapes_are_those_of_the_network(backbone_type, preset):
    config = backbone_preset(backbone_type, preset, 32)
    names = BACKBONES[backbone_type].block_names(config)
    with torch.device("meta"):
        network = build_backbone(backbone_type, config, 1000.0).network
    top_level = [f"{name}.{index}" if isinstance(child, torch.nn.ModuleList) else name
                 for name, child in network.named_children() if name.endswith(("blocks", "block"))
                 for index in range(len(child) if isinstance(child, torch.nn.ModuleList) else 1)]
    assert sorted(names) == sorted(top_level)
    shapes = block_output_shapes(backbone_type, config, 32, 3)
    if preset == "tiny":  # the meta-device shapes are those of a real forward, whose blocks run in the listed order
        velocity = build_backbone(backbone_type, config, 1000.0)
        with torch.no_grad(), reading_blocks(velocity.network, names) as outputs:
            velocity(images(batch=1).repeat(1, 1, 2, 2), torch.zeros(1))
        assert list(outputs) == names
        assert {name: tuple(output.shape[1:]) for name, output in outputs.items()} == shapes
    if backbone_type == "dit":
        width = config["num_attention_heads"] * config["attention_head_dim"]
        assert set(shapes.values()) == {((32 // config["patch_size"]) ** 2, width)}


def test_default_feedback_pairs_match_decoder_to_encoder_sizes():
    def pairs(backbone_type, preset):
        config = backbone_preset(backbone_type, preset, 32)
        return BACKBONES[backbone_type].default_feedback_pairs(block_output_shapes(backbone_type, config, 32, 3))

    assert pairs("unet2d", "tiny") == {}
    assert pairs("unet2d", "small") == {"down_blocks.0": "up_blocks.0"}
    assert pairs("unet2d", "paper") == {"down_blocks.0": "up_blocks.1", "down_blocks.1": "up_blocks.0"}
    assert pairs("dit", "small") == {f"transformer_blocks.{i}": f"transformer_blocks.{5 - i}" for i in range(3)}


def test_segment_steps_keep_the_grid_spacing_of_num_steps_over_the_last_time():
    assert segment_steps([0.011], 20) == [20]
    assert segment_steps([0.25, 1.0], 4) == [1, 3]
    assert segment_steps([0.011, 1.0], 4) == [1, 4]  # a short first segment gets one step
    assert segment_steps([0.25, 0.5, 0.75], 6) == [2, 2, 2]


def test_feature_states_on_the_grid_are_the_states_of_the_trajectory():
    model = PRGModel(head_config("unet2d", "prg")).eval()
    x = images()
    with torch.no_grad():
        trajectory = model(x, feature_t=1.0, num_steps=4, output_hidden_states=True).hidden_states
        states = model.feature_states(x, [0.25, 0.5], num_steps=2)
        alone = model.feature_states(x, [0.5], num_steps=3)
    torch.testing.assert_close(states[0], trajectory[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(states[1], trajectory[2], rtol=0, atol=1e-6)
    with torch.no_grad():  # one time τ: exactly the feature pass to feature_t = τ
        assert torch.equal(alone[0], model(x, feature_t=0.5, num_steps=3).last_hidden_state)


@pytest.mark.parametrize("backbone_type", ["unet2d", "dit"])
def test_model_output_carries_the_block_features_at_each_time(backbone_type):
    model = PRGModel(head_config(backbone_type, "prg")).eval()
    x = images()
    blocks = BLOCKS[backbone_type]
    with torch.no_grad():
        output = model(x, output_block_features=True, feature_blocks=blocks, feature_times=[0.25, 0.5], num_steps=2)
        plain = model(x, num_steps=2)
        states = model.feature_states(model.ode_state(x), [0.25, 0.5], num_steps=2)
        velocity = model.velocity
        with reading_blocks(velocity.network, blocks) as expected:
            velocity(states[1], torch.full((4,), 0.5))
    assert list(output.block_features) == [block_feature_key(name, t) for t in (0.25, 0.5) for name in blocks]
    assert list(output.block_features)[-1] == f"{blocks[-1]}@t=0.5"
    for name in blocks:
        assert torch.equal(output.block_features[f"{name}@t=0.5"], expected[name])
    shapes = {tuple(value.shape) for value in output.block_features.values()}
    assert shapes == ({(4, 32, 4, 4), (4, 32, 8, 8)} if backbone_type == "unet2d" else {(4, 16, 32)})
    assert torch.equal(output.last_hidden_state, plain.last_hidden_state)  # x at feature_t, as without blocks


def test_reading_blocks_stops_the_network_after_the_last_block_read(monkeypatch):
    model = PRGModel(head_config("unet2d", "prg")).eval()
    x = model.ode_state(images())
    with torch.no_grad():
        full = model.read_blocks((x,), [0.5], ["mid_block"])

    def unreachable(*args, **kwargs):
        raise AssertionError("a layer after the last block read ran")

    monkeypatch.setattr(model.velocity.network.up_blocks[0], "forward", unreachable)
    with torch.no_grad():
        assert torch.equal(model.read_blocks((x,), [0.5], ["mid_block"])["mid_block@t=0.5"], full["mid_block@t=0.5"])
    assert hook_count(model) == 0


def test_block_reading_errors_name_the_fix():
    model = PRGModel(head_config("unet2d", "prg")).eval()
    with pytest.raises(ValueError, match=r"output_block_features=True reads blocks .* pass feature_blocks=\[...\] or "
                                         r"set config.feature_blocks \(this unet2d network's blocks are \["):
        model(images(), output_block_features=True)
    with pytest.raises(ValueError, match=r"feature_blocks and feature_times choose what output_block_features=True "
                                         r"reads; pass output_block_features=True with them"):
        model(images(), feature_blocks=["mid_block"])
    with pytest.raises(ValueError, match=r"feature_times must be a list of increasing times"):
        model(images(), output_block_features=True, feature_blocks=["mid_block"], feature_times=[0.5, 0.5])
    block_head = classifier("unet2d", "attention")
    with pytest.raises(ValueError, match=r"feature_t is the time the prg head reads; this model's 'attention' head "
                                         r"reads its blocks at feature_times \[0.25, 0.5\]"):
        block_head(images(), feature_t=0.5)


# ------------------------------------------------------------------------------------------------------- heads


@pytest.mark.parametrize("backbone_type", ["unet2d", "dit"])
@pytest.mark.parametrize("head_type", list(HEADS))
def test_every_head_gives_logits_and_round_trips_exactly(tmp_path, backbone_type, head_type):
    model = classifier(backbone_type, head_type)
    x = images()
    with torch.no_grad():
        logits = model(x).logits
    assert logits.shape == (4, 3) and logits.dtype == torch.float32 and torch.isfinite(logits).all()

    model.save_pretrained(tmp_path)
    reloaded = PRGForImageClassification.from_pretrained(tmp_path).eval()
    assert type(reloaded.head) is type(model.head) is HEADS[head_type]
    assert reloaded.state_dict().keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, logits)
    assert reloaded.config.to_dict() | {"_name_or_path": ""} == model.config.to_dict() | {"_name_or_path": ""}


def test_the_prg_head_keeps_its_weight_names():
    names = [name for name in classifier("unet2d", "prg").state_dict() if not name.startswith("prg.")]
    assert names == ["head.norm.weight", "head.norm.bias", "head.hidden.weight", "head.hidden.bias",
                     "head.classifier.weight", "head.classifier.bias"]


def test_frozen_features_then_head_logits_equal_the_forward_pass():
    for head_type in HEADS:
        model = classifier("unet2d", head_type)
        x = images()
        with torch.no_grad():
            assert torch.equal(model.head_logits(model.frozen_features(x)), model(x).logits), head_type


def test_one_pass_serves_every_head_as_its_own_frozen_features_would():
    """A pass through the union of the heads' times and blocks gives each head exactly its own frozen features."""
    models = {head_type: classifier("unet2d", head_type) for head_type in HEADS}
    flow = models["prg"].prg
    x = images()
    times = [0.25, 0.5, 1.0]
    with torch.no_grad():
        states = dict(zip(times, flow.feature_states(flow.ode_state(x), times, num_steps=4), strict=True))
        blocks = sorted({name for model in models.values() if model.head.reads_blocks
                         for name in model.frozen_blocks()})
        block_features = flow.read_blocks([states[0.25], states[0.5]], [0.25, 0.5], blocks)
        for head_type, model in models.items():
            if head_type == "prg":
                continue  # x_1 of this pass: 1 + 1 + 2 steps, the grid of 4 steps to 1 (0.25, 0.5, 0.75, 1)
            own = model.frozen_features(x)
            shared = model.frozen_features_of_pass(states, block_features)
            assert own.keys() == shared.keys(), head_type
            for key, value in own.items():
                torch.testing.assert_close(shared[key], value, rtol=0, atol=1e-6, msg=f"{head_type} {key}")
        pooled = models["prg"].frozen_features_of_pass(states, block_features)["pooled"]
        torch.testing.assert_close(pooled, models["prg"].frozen_features(x, num_steps=4)["pooled"], rtol=0,
                                   atol=1e-6)
    assert set(models["diffeed"].frozen_features(x)) == {"x@t=0.25", "x@t=0.5", "up_blocks.0@t=0.25",
                                                         "up_blocks.0@t=0.5"}  # states and the sending block


def test_linear_head_is_ddae_probe_on_the_block_output_at_x_tau():
    """One block, one time τ: Linear(BatchNorm(mean over positions of the block's output in v_θ(x_τ, τ))) with
    x_τ = the reversed ODE's state at τ, exactly."""
    model = classifier("unet2d", "linear", feature_blocks=["up_blocks.0"], feature_times=[0.2])
    head = model.head
    head.norm.running_mean.normal_()
    head.norm.running_var.uniform_(0.5, 2)
    x = images()
    with torch.no_grad():
        x_tau = model.prg(x, feature_t=0.2, num_steps=2).last_hidden_state
        with reading_blocks(model.prg.velocity.network, ["up_blocks.0"]) as outputs:
            model.prg.velocity(x_tau, torch.full((4,), 0.2))
        pooled = outputs["up_blocks.0"].mean(dim=(2, 3))
        standardised = (pooled - head.norm.running_mean) / torch.sqrt(head.norm.running_var + head.norm.eps)
        expected = F.linear(standardised, head.classifier.weight, head.classifier.bias)
        torch.testing.assert_close(model(x).logits, expected, rtol=1e-5, atol=1e-6)


def test_difformer_shares_tokenizers_across_times_and_has_a_transformer_per_time():
    head = classifier("unet2d", "difformer").head
    assert len(head.tokenizers) == 2 and len(head.transformers) == 2  # 2 blocks, 2 times
    assert head.classifier.in_features == 2 * HEAD_SIZES["head_width"]
    assert head.tokenizers[0].position_embedding.shape == (1, 4 * 4, 32)  # mid_block's 4×4 map: 16 tokens
    assert head.tokenizers[1].position_embedding.shape == (1, 4 * 4, 32)  # up_blocks.0's 8×8 map pooled to 4×4


@pytest.mark.parametrize("backbone_type", ["unet2d", "dit"])
def test_diffeed_feedback_changes_the_second_pass_and_vanishes_with_a_zero_map(backbone_type):
    model = classifier(backbone_type, "diffeed")
    head = model.head
    receiver = "down_blocks.0" if backbone_type == "unet2d" else "transformer_blocks.0"
    assert head.feedback.receivers == [receiver]
    x = model.prg.ode_state(images())
    states = model.prg.feature_states(x, [0.5], num_steps=2)
    with torch.no_grad():
        plain = model.prg.read_blocks(states, [0.5], head.feature_blocks)
        fed_back = model.prg.read_blocks(states, [0.5], head.feature_blocks, head.feedback)
        key = head.keys[-1]
        assert (plain[key] - fed_back[key]).abs().max() > 1e-3
        head.feedback.maps[0][1].weight.zero_()  # BatchNorm scale 0 (UNet) / LayerNorm scale 0 (DiT): no feedback
        head.feedback.maps[0][1].bias.zero_()
        assert torch.equal(model.prg.read_blocks(states, [0.5], head.feature_blocks, head.feedback)[key], plain[key])


def test_a_flow_checkpoint_gives_every_head_a_fresh_initialisation(tmp_path):
    PRGForFlowMatching(head_config("unet2d", "prg")).save_pretrained(tmp_path / "flow")
    classifier("unet2d", "prg").save_pretrained(tmp_path / "prg-classifier")
    for head_type in BLOCK_HEADS:
        reading = head_config("unet2d", head_type).to_diff_dict()
        settings = {key: reading[key] for key in ("head_type", "feature_blocks", "feature_times", *HEAD_SIZES)}
        for source in ("flow", "prg-classifier"):  # a prg head's weights never load into another head
            model = PRGForImageClassification.from_pretrained(tmp_path / source, **settings).eval()
            weights = dict(model.head.named_parameters())
            assert all(torch.isfinite(value).all() for value in weights.values()), (head_type, source)
            linear_weights = [value for name, value in weights.items() if name.endswith("classifier.weight")]
            assert 0.01 < linear_weights[0].std() < 0.03  # N(0, initializer_range²)
            with torch.no_grad():
                assert torch.isfinite(model(images()).logits).all()


# --------------------------------------------------------------------------------------------- hooks and memory


def test_no_hook_remains_after_a_forward_or_an_exception_inside_it(monkeypatch):
    for head_type in BLOCK_HEADS:
        model = classifier("unet2d", head_type)
        assert hook_count(model) == 0
        with torch.no_grad():
            model(images())
        assert hook_count(model) == 0, head_type

        def broken(*args, **kwargs):
            raise RuntimeError("the block failed")

        monkeypatch.setattr(model.prg.velocity.network.up_blocks[1], "forward", broken)
        with pytest.raises(RuntimeError, match="the block failed"), torch.no_grad():
            model(images())
        assert hook_count(model) == 0, head_type
        monkeypatch.undo()


def test_a_hundred_calls_leave_no_hooks_and_no_memory_behind():
    """Hooks hold the tensors they capture: one left behind per call would keep tensors (and the objects around
    them) alive. After 100 calls, no hook, no more live tensors and no more Python objects than after the first."""
    model = classifier("dit", "diffeed", num_steps=1, feature_times=[0.5])  # reading, feeding back: 3 hooks a call
    x = images(batch=1)

    def live_objects() -> tuple[int, int]:
        gc.collect()
        objects = gc.get_objects()
        return sum(1 for item in objects if isinstance(item, torch.Tensor)), len(objects)

    with torch.no_grad():
        model(x)
        tensors, objects = live_objects()
        for _ in range(100):
            model(x)
    assert hook_count(model) == 0
    tensors_after, objects_after = live_objects()
    assert tensors_after == tensors
    assert objects_after - objects < 50, f"{objects_after - objects} more live objects after 100 calls"


# -------------------------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("backbone_type", ["unet2d", "dit"])
@pytest.mark.parametrize("head_type", list(HEADS))
def test_gradients_reach_every_head_parameter_and_the_network_only_when_unfrozen(backbone_type, head_type):
    model = classifier(backbone_type, head_type).train()
    labels = torch.tensor([0, 1, 2, 0])
    model.prg.requires_grad_(False)
    model(images(), labels=labels).loss.backward()
    for name, parameter in model.head.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert all(parameter.grad is None for parameter in model.prg.parameters())

    model.zero_grad(set_to_none=True)
    model.prg.requires_grad_(True)
    model(images(), labels=labels).loss.backward()
    network = model.prg.velocity.network
    first_layer = network.conv_in if backbone_type == "unet2d" else network.pos_embed.proj
    assert first_layer.weight.grad.abs().sum() > 0  # through the ODE states and the blocks read
    with_gradient = [p.grad is not None and p.grad.abs().sum() > 0 for p in network.parameters()]
    assert sum(with_gradient) >= 0.9 * len(with_gradient)
