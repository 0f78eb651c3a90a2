import pytest
import timm
import torch

from cncad import CNCDetector
from cncad.data import CLIP_MEAN, CLIP_STD, make_synthetic_dataset
from cncad.encoders import (
    CLIPEncoder,
    FrozenEncoder,
    TimmEncoder,
    create_timm_model,
    default_cnn_layers,
    resample_tokens,
    tokens_to_map,
)
from cncad.errors import WeightsUnavailableError

SIZE = 64


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic_timm")
    return make_synthetic_dataset(
        root, n_train=4, n_test_good=2, n_test_defect=2, image_size=SIZE, seed=0
    )


def test_default_cnn_layers_end_one_level_before_the_last():
    assert default_cnn_layers(5, 3) == (2, 3, 4)
    assert default_cnn_layers(4, 2) == (2, 3)
    assert default_cnn_layers(3, 3) == (1, 2, 3)
    with pytest.raises(ValueError):
        default_cnn_layers(2, 3)


def test_cnn_encoder_taps_the_pyramid_as_tokens(images):
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", pretrained=False).eval()
    reference = timm.create_model("test_efficientnet", pretrained=False).eval()
    reference.load_state_dict(model.state_dict())
    encoder = TimmEncoder(model, image_size=SIZE)
    assert isinstance(encoder, FrozenEncoder)
    assert encoder.layers == (2, 3, 4) and encoder.widths == (24, 32, 48)
    assert encoder.grids == ((16, 16), (8, 8), (4, 4))
    assert not encoder.has_text and not encoder.has_class_token and encoder.num_heads is None
    features = encoder(images)
    assert features.class_tokens is None
    # CLIP-normalised input is converted to the model's ImageNet normalisation
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    imagenet = reference.pretrained_cfg
    raw = images * std + mean
    converted = (raw - torch.tensor(imagenet["mean"]).view(1, 3, 1, 1)) / torch.tensor(
        imagenet["std"]
    ).view(1, 3, 1, 1)
    with torch.no_grad():
        maps = reference.forward_intermediates(
            converted, indices=[1, 2, 3], intermediates_only=True
        )
    for tokens, expected, grid in zip(features.patch_tokens, maps, encoder.grids, strict=True):
        assert torch.allclose(tokens_to_map(tokens, grid), expected, atol=1e-5)
    # frozen, and stays in eval mode
    encoder.train()
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
    with pytest.raises(ValueError, match="expects 64x64"):
        encoder(torch.zeros(1, 3, 32, 32))


def test_vit_encoder_returns_class_tokens_at_a_new_input_size():
    encoder = TimmEncoder("timm/test_vit", image_size=48, layers=(1, 6))
    assert encoder.widths == (64, 64) and encoder.grids == ((3, 3), (3, 3))
    assert encoder.has_class_token and encoder.num_heads == 2
    features = encoder(torch.randn(2, 3, 48, 48))
    assert [t.shape for t in features.class_tokens] == [(2, 64)] * 2
    assert [t.shape for t in features.patch_tokens] == [(2, 9, 64)] * 2


def test_resample_tokens():
    tokens = torch.randn(2, 16, 5)
    assert resample_tokens(tokens, (4, 4), (4, 4)) is tokens
    constant = torch.ones(1, 64, 3) * torch.tensor([1.0, 2.0, 3.0])
    shrunk = resample_tokens(constant, (8, 8), (2, 2))
    assert shrunk.shape == (1, 4, 3) and torch.allclose(shrunk, constant[:, :4])
    # 2x antialiased shrinking of an 8x8 grid averages each 2x2 block's neighbourhood
    ramp = torch.arange(64.0).view(1, 64, 1)
    assert resample_tokens(ramp, (8, 8), (4, 4)).shape == (1, 16, 1)
    assert torch.equal(tokens_to_map(ramp, (8, 8))[0, 0, 1], torch.arange(8.0, 16.0))
    with pytest.raises(ValueError, match="do not fill"):
        tokens_to_map(ramp, (4, 4))


def test_timm_encoder_through_the_whole_detector(dataset_root, tmp_path, images):
    common = {"image_size": SIZE, "batch_size": 4, "epochs": 1, "sigma": 1.0, "device": "cpu"}
    detector = CNCDetector(backbone="timm/test_efficientnet", use_cnc=False, **common)
    detector.fit(dataset_root, progress=False)
    assert detector.epochs_trained == 1 and detector.history[0]["moe"] > 0
    result = detector.predict(torch.rand(2, 3, 80, 80))
    assert result.anomaly_map.shape == (2, 80, 80) and result.pred_score.shape == (2,)
    metrics = detector.evaluate(dataset_root, eval_size=32, progress=False)
    assert set(metrics["per_category"]) == {"carpet_like", "bolt_like"}
    assert 0.0 <= metrics["mean"]["I-AUROC"] <= 1.0
    path = detector.save(tmp_path / "timm.cnc")
    loaded = CNCDetector.load(path)
    assert isinstance(loaded.model.encoder, TimmEncoder)
    assert torch.equal(
        loaded.predict(images.sigmoid()).anomaly_map, detector.predict(images.sigmoid()).anomaly_map
    )
    assert not any(k.startswith("encoder.") for k in detector.model.trainable_state_dict())


def test_detector_accepts_a_timm_model_object(tmp_path, images):
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False)
    detector = CNCDetector(
        encoder=model,
        use_cnc=False,
        use_mlf=False,
        image_size=SIZE,
        sigma=0.0,
        device="cpu",
        allow_untrained=True,
    )
    assert detector.config.backbone == "custom"
    assert detector.model.encoder.widths == (32, 48, 192)
    assert detector.model.input_proj is None  # decoder width = the widest, deepest level
    before = detector.predict(images.sigmoid()).pred_score
    path = detector.save(tmp_path / "custom.cnc")
    with pytest.raises(ValueError, match="encoder="):
        CNCDetector.load(path)
    reloaded = CNCDetector.load(path, encoder=model)
    assert torch.equal(reloaded.predict(images.sigmoid()).pred_score, before)


def test_cnc_without_a_text_tower_is_a_clear_error(tiny_config):
    with pytest.raises(ValueError, match="no text tower"):
        CNCDetector(backbone="timm/test_efficientnet", image_size=SIZE)
    model = timm.create_model("test_efficientnet", pretrained=False)
    with pytest.raises(ValueError, match="text tower"):
        CNCDetector(encoder=model, image_size=SIZE, device="cpu")
    from cncad.encoders import build_tiny_clip
    from cncad.model import CNCModel

    vision_only = CLIPEncoder(build_tiny_clip(), image_size=56, with_text=False)
    with pytest.raises(ValueError, match="use_cnc=False"):
        CNCModel(tiny_config, encoder=vision_only)
    assert CNCModel(tiny_config.replace(use_cnc=False), encoder=vision_only).prompt_learner is None


# --- pretrained weights when the hub cannot be used -------------------------------------


@pytest.fixture
def offline_empty_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    return tmp_path


def test_pretrained_timm_weights_offline_fail_at_once_before_the_model_is_built(
    offline_empty_cache, monkeypatch
):
    built = []
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: built.append(a))
    with pytest.raises(WeightsUnavailableError) as info:
        create_timm_model("timm/test_efficientnet", "default")
    message = str(info.value)
    assert "\n" not in message and "HF_HUB_OFFLINE is set" in message
    assert "timm/test_efficientnet.r160_in1k" in message
    assert "weights='/path/to/weights.pth'" in message and "pretrained=None" in message
    assert built == []
    with pytest.raises(WeightsUnavailableError):
        CNCDetector(
            backbone="timm/test_efficientnet", pretrained="default", use_cnc=False, device="cpu"
        )


def test_cached_timm_weights_load_without_the_hub(offline_empty_cache, monkeypatch):
    import timm.models._hub
    from safetensors.torch import save_file

    def no_hub(*args, **kwargs):
        raise AssertionError("the hub was asked")

    monkeypatch.setattr(timm.models._hub, "hf_hub_download", no_hub)

    source = timm.create_model("test_efficientnet", pretrained=False)
    with torch.no_grad():
        for parameter in source.parameters():
            parameter.add_(1.0)
    snapshot = offline_empty_cache / "models--timm--test_efficientnet.r160_in1k" / "snapshots"
    (snapshot / "abc").mkdir(parents=True)
    (snapshot.parent / "refs").mkdir()
    (snapshot.parent / "refs" / "main").write_text("abc")
    save_file(source.state_dict(), str(snapshot / "abc" / "model.safetensors"))
    model = create_timm_model("test_efficientnet", "default")
    for (name, expected), actual in zip(
        source.state_dict().items(), model.state_dict().values(), strict=True
    ):
        assert torch.equal(expected, actual), name
