import dataclasses

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
