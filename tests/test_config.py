import math

import pytest

from fastexit import PRESETS, AlphaSchedule, UniversalConfig, get_preset

# The seed's table, typed from its text: (L1, L2, L3) weights and routing threshold.
SEED_TABLE = {
    "standard_llm": ((0, 0, 1), 0),
    "lpt": ((1 / 3, 1 / 3, 1 / 3), 0),
    "standard_routing": ((0.5, 0, 0.5), 0.95),
    "asymmetric_best": ((0.7, 0, 0.3), 0.95),
    "lpt_routing": ((1 / 3, 1 / 3, 1 / 3), 0.7),
    "asymmetric_with_l2": ((0.7, 1, 0.3), 0.95),
}


def test_presets_are_exactly_the_seeds_six():
    assert set(PRESETS) == set(SEED_TABLE)
    for name, ((w1, w2, w3), threshold) in SEED_TABLE.items():
        cfg = PRESETS[name]
        assert cfg.layer_weights == {1: w1, 2: w2, 3: w3}, name
        assert cfg.routing_threshold == threshold, name
        assert cfg.exit_layer == 1


@pytest.mark.parametrize("name", sorted(SEED_TABLE))
def test_preset_generalises_to_other_depths(name):
    (w1, w2, w3), threshold = SEED_TABLE[name]
    cfg = get_preset(name, n_layers=6, exit_layer=2)
    assert cfg.layer_weights[1] == 0
    assert cfg.layer_weights[2] == w1 and cfg.layer_weights[6] == w3
    assert [cfg.layer_weights[i] for i in (3, 4, 5)] == pytest.approx([w2 / 3] * 3)
    assert cfg.exit_layer == 2 and cfg.routing_threshold == threshold
    assert get_preset(name).layer_weights == PRESETS[name].layer_weights


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match="unknown preset 'asym'.*asymmetric_best"):
        get_preset("asym")


@pytest.mark.parametrize("kind, expected", [
    ("linear", {0: 0.9, 0.25: 0.8, 0.5: 0.7, 1: 0.5}),
    ("cosine", {0: 0.9, 0.25: 0.5 + 0.4 * (1 + math.cos(math.pi / 4)) / 2, 0.5: 0.7, 1: 0.5}),
    ("constant", {0: 0.9, 0.5: 0.9, 1: 0.9}),
])
def test_alpha_schedule_values(kind, expected):
    schedule = AlphaSchedule(kind, start=0.9, end=0.5)
    for p, alpha in expected.items():
        assert schedule(p) == pytest.approx(alpha, abs=1e-12), (kind, p)


def test_schedule_sets_exit_and_final_weights_only():
    cfg = UniversalConfig({1: 0.9, 2: 0.25, 3: 0.1}, alpha_schedule=AlphaSchedule("linear", 0.9, 0.5))
    assert cfg.weights_at(0.5, 3) == pytest.approx({1: 0.7, 2: 0.25, 3: 0.3})
    assert cfg.weights_at(1.0, 4) == pytest.approx({1: 0.5, 2: 0.25, 3: 0.1, 4: 0.5})


@pytest.mark.parametrize("kwargs, match", [
    (dict(layer_weights={1: -0.1, 3: 1}), r"layer_weights\[1\].*-0.1"),
    (dict(layer_weights={1: float("nan"), 3: 1}), r"layer_weights\[1\].*nan"),
    (dict(layer_weights={1: float("inf")}), r"layer_weights\[1\].*inf"),
    (dict(layer_weights={1: 0, 3: 0}), "at least one weight > 0"),
    (dict(layer_weights={}), "layer_weights must be a non-empty dict"),
    (dict(layer_weights={0: 1.0}), "layer_weights keys.*0"),
    (dict(layer_weights={1: 1}, exit_layer=0), "exit_layer.*0"),
    (dict(layer_weights={1: 1}, routing_threshold=1.5), "routing_threshold.*1.5"),
    (dict(layer_weights={1: 1}, routing_threshold=-0.1), "routing_threshold.*-0.1"),
    (dict(layer_weights={1: 1}, layer_lr_scales={2: 0}), r"layer_lr_scales\[2\].*0"),
    (dict(layer_weights={1: 1}, layer_lr_scales={2: float("nan")}), r"layer_lr_scales\[2\].*nan"),
    (dict(layer_weights={1: 1}, alpha_schedule="linear"), "alpha_schedule must be an AlphaSchedule"),
])
def test_config_validation(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        UniversalConfig(**kwargs)


@pytest.mark.parametrize("args, match", [
    (("quadratic", 0.9, 0.5), "AlphaSchedule.kind.*quadratic"),
    (("linear", 1.2, 0.5), "AlphaSchedule.start.*1.2"),
    (("linear", 0.9, -0.5), "AlphaSchedule.end.*-0.5"),
])
def test_schedule_validation(args, match):
    with pytest.raises(ValueError, match=match):
        AlphaSchedule(*args)


def test_schedule_progress_out_of_range():
    with pytest.raises(ValueError, match="progress.*1.5"):
        AlphaSchedule("linear", 0.9, 0.5)(1.5)


@pytest.mark.parametrize("cfg, match", [
    (UniversalConfig({1: 1, 4: 1}), "layer_weights has layer 4"),
    (UniversalConfig({1: 1}, layer_lr_scales={5: 0.5}), "layer_lr_scales has layer 5"),
    (UniversalConfig({1: 1, 3: 1}, exit_layer=3, routing_threshold=0.9), "exit_layer.*3"),
    (UniversalConfig({3: 1}, exit_layer=3, routing_threshold=0,
                     alpha_schedule=AlphaSchedule("linear", 0.9, 0.5)), "alpha_schedule needs exit_layer"),
])
def test_depth_dependent_validation(cfg, match):
    with pytest.raises(ValueError, match=match):
        cfg.validate_for(3)


def test_routing_off_allows_exit_at_final_layer():
    UniversalConfig({3: 1}, exit_layer=3, routing_threshold=0).validate_for(3)


@pytest.mark.parametrize("fraction", [0, -0.5, 1.5, math.nan, "0.5"])
def test_train_fraction_out_of_range_is_an_error_naming_it(fraction):
    from fastexit.config import DataConfig
    with pytest.raises(ValueError, match="train_fraction"):
        DataConfig(train_fraction=fraction)
