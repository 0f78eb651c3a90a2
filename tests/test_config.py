import dataclasses

import numpy as np
import pytest

from cncad.config import CNCConfig


def test_defaults_are_the_papers_settings():
    cfg = CNCConfig()
    assert cfg.backbone == "ViT-L-14-336-quickgelu" and cfg.pretrained == "openai"
    assert cfg.image_size == 224 and cfg.prompt_length == 12
    assert (cfg.tau, cfg.gamma, cfg.theta) == (0.001, 0.1, 5)
    assert (cfg.num_experts, cfg.top_k) == (5, 2)
    assert (cfg.lr, cfg.batch_size, cfg.epochs) == (1e-3, 8, 250)
    assert cfg.sigma == 4.0 and cfg.image_score == "max"
    assert cfg.use_mlf and cfg.use_cnc and cfg.use_moe


def test_is_frozen_and_round_trips_through_a_dict():
    cfg = CNCConfig(layers=[4, 8, 12], epochs=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.epochs = 4
    assert cfg.layers == (4, 8, 12)
    assert CNCConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.to_dict()["layers"] == [4, 8, 12]


@pytest.mark.parametrize(
    "changes",
    [
        {"top_k": 6},
        {"top_k": 0},
        {"layers": (8, 4)},
        {"layers": (0, 4)},
        {"promotion_norm": "channel"},
        {"sigma": -1},
        {"tau": 0},
        {"image_score": "mean"},
        {"fusion_dropout": 1.0},
    ],
)
def test_invalid_settings_raise(changes):
    with pytest.raises(ValueError, match="CNCConfig"):
        CNCConfig(**changes)


def test_replace_and_from_dict_reject_unknown_fields():
    with pytest.raises(TypeError, match="learning_rate"):
        CNCConfig().replace(learning_rate=1)
    with pytest.raises(ValueError, match="learning_rate"):
        CNCConfig.from_dict({"learning_rate": 1})


def test_encoder_fields_round_trip_and_timm_resets_the_clip_tag():
    cfg = CNCConfig(
        backbone="timm/tf_efficientnet_lite0",
        use_cnc=False,
        weights="w.pth",
        weights_remap="by_order",
        feature_grid=12,
        compare_grid="native",
        decoder_width=96,
    )
    assert cfg.pretrained is None  # "openai" names CLIP weights, not timm ones
    assert CNCConfig.from_dict(cfg.to_dict()) == cfg
    assert CNCConfig().feature_grid == "coarsest" and CNCConfig().weights is None
    with pytest.raises(ValueError, match="text tower"):
        CNCConfig(backbone="timm/tf_efficientnet_lite0")


@pytest.mark.parametrize(
    "changes",
    [
        {"feature_grid": "middle"},
        {"feature_grid": 0},
        {"compare_grid": "both"},
        {"decoder_width": 0},
        {"decoder_heads": 0},
    ],
)
def test_invalid_encoder_settings_raise(changes):
    with pytest.raises(ValueError, match="CNCConfig"):
        CNCConfig(**changes)


NAN, INF = float("nan"), float("inf")

# (field, bad value, expected error type); every field appears at least once, every
# number field with a wrong type and a value out of range, every float field with NaN/inf.
BAD_VALUES = [
    ("backbone", None, TypeError),
    ("backbone", 3, TypeError),
    ("backbone", "", ValueError),
    ("pretrained", 1, TypeError),
    ("pretrained", "", ValueError),
    ("image_size", 56.0, TypeError),
    ("image_size", "56", TypeError),
    ("image_size", True, TypeError),
    ("image_size", 0, ValueError),
    ("layers", 4, TypeError),
    ("layers", "4,8", TypeError),
    ("layers", (4.0, 8), TypeError),
    ("layers", (True, 2), TypeError),
    ("layers", (), ValueError),
    ("layers", (0, 4), ValueError),
    ("layers", (8, 4), ValueError),
    ("layers", (4, 4), ValueError),
    ("num_taps", 2.5, TypeError),
    ("num_taps", 0, ValueError),
    ("weights", 1.0, TypeError),
    ("weights", " ", ValueError),
    ("weights_remap", ["by_order"], TypeError),
    ("weights_remap", "", ValueError),
    ("feature_grid", 2.0, TypeError),
    ("feature_grid", None, TypeError),
    ("feature_grid", "middle", ValueError),
    ("feature_grid", 0, ValueError),
    ("compare_grid", 1, TypeError),
    ("compare_grid", "both", ValueError),
    ("prompt_length", 12.0, TypeError),
    ("prompt_length", 0, ValueError),
    ("normal_prompt", None, TypeError),
    ("abnormal_prompt", 0, TypeError),
    ("promotion_norm", None, TypeError),
    ("promotion_norm", "channel", ValueError),
    ("promotion_mode", "Broadcast", ValueError),
    ("promotion_cosine", 1, TypeError),
    ("promotion_cosine", "yes", TypeError),
    ("noise_std", "0.1", TypeError),
    ("noise_std", -0.1, ValueError),
    ("noise_std", NAN, ValueError),
    ("noise_std", INF, ValueError),
    ("fusion_dropout", None, TypeError),
    ("fusion_dropout", 1.0, ValueError),
    ("fusion_dropout", -0.1, ValueError),
    ("fusion_dropout", NAN, ValueError),
    ("num_experts", 5.0, TypeError),
    ("num_experts", 0, ValueError),
    ("top_k", 2.0, TypeError),
    ("top_k", 0, ValueError),
    ("top_k", 6, ValueError),  # above num_experts=5
    ("expert_mlp_ratio", "1", TypeError),
    ("expert_mlp_ratio", 0, ValueError),
    ("expert_mlp_ratio", INF, ValueError),
    ("renormalize_gates", 0, TypeError),
    ("decoder_mlp_ratio", None, TypeError),
    ("decoder_mlp_ratio", -4.0, ValueError),
    ("decoder_mlp_ratio", NAN, ValueError),
    ("decoder_width", 96.0, TypeError),
    ("decoder_width", 0, ValueError),
    ("decoder_heads", "8", TypeError),
    ("decoder_heads", 0, ValueError),
    ("tau", "0.001", TypeError),
    ("tau", 0, ValueError),
    ("tau", NAN, ValueError),
    ("tau", -INF, ValueError),
    ("gamma", [0.1], TypeError),
    ("gamma", -0.1, ValueError),
    ("gamma", NAN, ValueError),
    ("theta", 5.0, TypeError),
    ("theta", -1, ValueError),
    ("gamma_ramp_epochs", 1.5, TypeError),
    ("gamma_ramp_epochs", -1, ValueError),
    ("detach_text_anchors", None, TypeError),
    ("moe_loss_weight", "1", TypeError),
    ("moe_loss_weight", -1.0, ValueError),
    ("moe_loss_weight", INF, ValueError),
    ("moe_loss_eps", None, TypeError),
    ("moe_loss_eps", -1e-10, ValueError),
    ("moe_loss_eps", NAN, ValueError),
    ("use_mlf", 1, TypeError),
    ("use_cnc", "False", TypeError),
    ("use_moe", None, TypeError),
    ("lr", "1e-4", TypeError),
    ("lr", None, TypeError),
    ("lr", 0, ValueError),
    ("lr", NAN, ValueError),
    ("lr", INF, ValueError),
    ("weight_decay", "0", TypeError),
    ("weight_decay", -1e-4, ValueError),
    ("weight_decay", NAN, ValueError),
    ("grad_clip_norm", "1", TypeError),
    ("grad_clip_norm", 0.0, ValueError),
    ("grad_clip_norm", INF, ValueError),
    ("batch_size", 8.0, TypeError),
    ("batch_size", True, TypeError),
    ("batch_size", 0, ValueError),
    ("epochs", 1.5, TypeError),
    ("epochs", -1, ValueError),
    ("num_workers", 2.0, TypeError),
    ("num_workers", -1, ValueError),
    ("sigma", "4", TypeError),
    ("sigma", -1, ValueError),
    ("sigma", NAN, ValueError),
    ("image_score", None, TypeError),
    ("image_score", "mean", ValueError),
    ("topk", "0.01", TypeError),
    ("topk", 0, ValueError),
    ("topk", 2.5, ValueError),  # a count must be whole
    ("topk", NAN, ValueError),
    ("topk", INF, ValueError),
    ("device", None, TypeError),
    ("device", "", ValueError),
    ("device", "cuda 1", ValueError),
    ("seed", 1.0, TypeError),
    ("seed", "0", TypeError),
    ("seed", -1, ValueError),
    ("seed", 2**63, ValueError),
    ("seed", 2**70, ValueError),
    ("bf16", "true", TypeError),
]


def _case_id(case):
    field, value, _ = case
    return f"{field}={value!r}"


@pytest.mark.parametrize("case", BAD_VALUES, ids=_case_id)
def test_every_bad_value_is_one_line_naming_the_field(case):
    field, value, error = case
    for make in (
        lambda: CNCConfig(**{field: value}),
        lambda: CNCConfig().replace(**{field: value}),
        lambda: CNCConfig.from_dict({**CNCConfig().to_dict(), field: value}),
    ):
        with pytest.raises(error) as info:
            make()
        assert type(info.value) is error  # TypeError for types, ValueError for ranges
        message = str(info.value)
        assert message.startswith(f"CNCConfig.{field} must be ")
        assert message.endswith(f", got {value!r}") and "\n" not in message


def test_the_bad_value_table_covers_every_field():
    assert {field for field, _, _ in BAD_VALUES} == {f.name for f in dataclasses.fields(CNCConfig)}


def test_choices_are_listed_in_the_message():
    with pytest.raises(ValueError, match="one of 'token', 'map', got 'channel'"):
        CNCConfig(promotion_norm="channel")
    with pytest.raises(ValueError, match="one of 'max', 'topk_mean'"):
        CNCConfig(image_score="mean")


def test_cross_field_rules_name_the_other_field():
    with pytest.raises(ValueError, match=r"top_k must be an int in \[1, num_experts=3\], got 4"):
        CNCConfig(num_experts=3, top_k=4)
    with pytest.raises(ValueError, match="decoder_heads must be a divisor of decoder_width=96"):
        CNCConfig(decoder_width=96, decoder_heads=5)
    assert CNCConfig(decoder_width=96, decoder_heads=6).decoder_heads == 6


def test_values_of_compatible_types_are_accepted_and_normalised(tmp_path):
    cfg = CNCConfig(
        image_size=np.int64(56),
        lr=1,
        sigma=np.float32(2.0),
        layers=[np.int32(1), 3],
        pretrained=tmp_path / "open_clip_model.bin",
        weights=tmp_path / "w.pth",
        topk=5,
        seed=2**63 - 1,
    )
    assert type(cfg.image_size) is int and cfg.image_size == 56
    assert type(cfg.lr) is float and cfg.lr == 1.0
    assert type(cfg.sigma) is float and type(cfg.topk) is float
    assert cfg.layers == (1, 3) and all(type(i) is int for i in cfg.layers)
    assert cfg.pretrained == str(tmp_path / "open_clip_model.bin")
    assert cfg.weights == str(tmp_path / "w.pth")
    assert CNCConfig.from_dict(cfg.to_dict()) == cfg
    assert CNCConfig(device="cuda:1").device == "cuda:1"
    assert CNCConfig(grad_clip_norm=1, decoder_width=None).grad_clip_norm == 1.0


def test_an_older_file_with_ints_for_floats_and_missing_fields_loads():
    saved = CNCConfig().to_dict()
    saved.update(lr=1, sigma=4, tau=1, topk=1, fusion_dropout=0)
    del saved["gamma_ramp_epochs"], saved["bf16"]
    cfg = CNCConfig.from_dict(saved)
    assert (cfg.lr, cfg.sigma, cfg.topk, cfg.fusion_dropout) == (1.0, 4.0, 1.0, 0.0)
    assert cfg.gamma_ramp_epochs == 0 and cfg.bf16 is False


def test_from_dict_needs_a_mapping():
    with pytest.raises(TypeError, match="needs a dict"):
        CNCConfig.from_dict([("epochs", 1)])
    with pytest.raises(ValueError, match="unknown CNCConfig field"):
        CNCConfig.from_dict({1: 2})


def test_every_field_has_a_validation_rule():
    from cncad.config import _RULES

    assert list(_RULES) == [f.name for f in dataclasses.fields(CNCConfig)]
