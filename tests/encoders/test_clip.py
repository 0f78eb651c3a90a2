import open_clip
import pytest
import torch
import torch.nn.functional as F

from cncad.encoders.clip import (
    CLIPEncoder,
    build_tiny_clip,
    clip_bpe_tokenizer,
    default_layers,
    load_clip,
)
from cncad.errors import CNCADError, WeightsUnavailableError


def test_default_layers_are_evenly_spaced_and_end_at_the_last_block():
    assert default_layers(24, 3) == (8, 16, 24)
    assert default_layers(12, 3) == (4, 8, 12)
    assert default_layers(6, 3) == (2, 4, 6)
    assert default_layers(5, 1) == (5,)
    with pytest.raises(ValueError):
        default_layers(2, 3)


def test_tiny_clip_is_deterministic_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a, b = build_tiny_clip(), build_tiny_clip()
    assert torch.equal(torch.rand(1), expected_next)
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(pa, pb), name


def test_tapped_features_match_open_clip_image_embedding_at_native_size():
    model = build_tiny_clip()
    encoder = CLIPEncoder(model, image_size=224)
    images = torch.randn(2, 3, 224, 224)
    features = encoder(images)
    assert encoder.layers == (2, 4, 6)
    assert [t.shape for t in features.patch_tokens] == [(2, 256, 64)] * 3
    assert [t.shape for t in features.class_tokens] == [(2, 64)] * 3
    # The last tapped block's class token through ln_post/proj is CLIP's image embedding.
    expected = F.normalize(model.encode_image(images), dim=-1)
    assert torch.allclose(encoder.global_feature(features.class_tokens[-1]), expected, atol=1e-5)


def test_position_embedding_is_resized_for_smaller_inputs():
    encoder = CLIPEncoder(build_tiny_clip(), image_size=56, layers=(1, 6))
    assert encoder.grid_size == (4, 4)
    assert encoder.visual.positional_embedding.shape == (17, 64)
    features = encoder(torch.randn(1, 3, 56, 56))
    assert [t.shape for t in features.patch_tokens] == [(1, 16, 64)] * 2
    with pytest.raises(ValueError, match="expects 56x56"):
        encoder(torch.randn(1, 3, 224, 224))


def test_encoder_is_frozen_and_stays_in_eval_mode():
    encoder = CLIPEncoder(build_tiny_clip(), image_size=56)
    encoder.train()
    assert not encoder.training
    assert not any(p.requires_grad for p in encoder.parameters())


def test_projection_passes_gradients_to_its_input_only():
    encoder = CLIPEncoder(build_tiny_clip(), image_size=56)
    tokens = torch.randn(2, 5, encoder.width, requires_grad=True)
    encoder.project(tokens).sum().backward()
    assert tokens.grad is not None and tokens.grad.abs().sum() > 0
    assert all(p.grad is None for p in encoder.parameters())


def test_text_tower_reproduces_encode_text():
    model, tokenizer = load_clip("tiny")
    encoder = CLIPEncoder(model, image_size=56)
    ids = tokenizer(["a photo of a damaged object", "object"])
    out = encoder.text(encoder.text.embed(ids), ids)
    assert torch.allclose(out, model.encode_text(ids), atol=1e-5)


def test_text_tower_skips_positions_after_the_last_end_of_text_exactly():
    model, tokenizer = load_clip("tiny")
    text = CLIPEncoder(model, image_size=56).text
    ids = tokenizer(["a photo of a damaged object", "object"])
    embeddings = text.embed(ids).requires_grad_(True)
    lengths = []
    hook = text.transformer.register_forward_pre_hook(
        lambda module, args: lengths.append(args[0].shape[1])
    )
    short = text(embeddings, ids)
    (grad_short,) = torch.autograd.grad(short.sum(), embeddings)
    text.truncate_after_eos = False
    full = text(embeddings, ids)
    (grad_full,) = torch.autograd.grad(full.sum(), embeddings)
    hook.remove()
    assert lengths == [int(ids.argmax(dim=-1).max()) + 1, ids.shape[1]]
    assert lengths[0] < lengths[1]
    torch.testing.assert_close(short, full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_short, grad_full, rtol=1e-4, atol=1e-4)  # fp32 sums


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="multiple of the patch size"):
        CLIPEncoder(build_tiny_clip(), image_size=50)
    with pytest.raises(ValueError, match="out of range"):
        CLIPEncoder(build_tiny_clip(), image_size=56, layers=(2, 7))
    with pytest.raises(TypeError):
        CLIPEncoder(torch.nn.Linear(2, 2))


def test_openai_format_checkpoint_file_loads_offline(tmp_path):
    source = build_tiny_clip()
    path = tmp_path / "tiny-openai.pt"
    torch.save(source.state_dict(), path)
    model, tokenizer = load_clip(str(path))
    # OpenAI checkpoints are stored in fp16: the weights round-trip through half precision
    assert torch.allclose(model.visual.proj, source.visual.proj, atol=1e-3)
    assert tokenizer(["object"]).shape == (1, 77)


def test_unavailable_pretrained_weights_explain_the_offline_way_out():
    with pytest.raises(RuntimeError, match="local checkpoint") as info:
        load_clip("ViT-B-32", pretrained="/nonexistent/open_clip_weights.bin")
    assert "ViT-B-32" in str(info.value)


def test_projection_and_global_feature_under_bf16_autocast_equal_float32():
    encoder = CLIPEncoder(build_tiny_clip(), image_size=56)
    features = encoder(torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(0)))
    cls, tokens = features.class_tokens[-1], features.patch_tokens[-1]
    expected_global, expected_projected = encoder.global_feature(cls), encoder.project(tokens)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = tokens @ encoder.visual.proj  # a matmul outside the helper: bf16
        global_feature, projected = encoder.global_feature(cls), encoder.project(tokens)
        from_bf16 = encoder.project(tokens.bfloat16())
    assert reference.dtype == torch.bfloat16  # autocast was active
    assert global_feature.dtype == projected.dtype == torch.float32
    assert torch.equal(global_feature, expected_global)
    assert torch.equal(projected, expected_projected)
    # half-precision inputs are upcast, not computed in half precision
    assert torch.equal(from_bf16, encoder.project(tokens.bfloat16().float()))


def test_text_tower_under_bf16_autocast_equals_float32():
    model, tokenizer = load_clip("tiny")
    text = CLIPEncoder(model, image_size=56).text
    ids = tokenizer(["a photo of a damaged object", "object"])
    expected = text(text.embed(ids), ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = text(text.embed(ids), ids)
    assert out.dtype == torch.float32 and torch.equal(out, expected)


def test_projection_gradient_reaches_half_precision_tokens():
    encoder = CLIPEncoder(build_tiny_clip(), image_size=56)
    tokens = torch.randn(2, 5, encoder.width).bfloat16().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        encoder.global_feature(tokens[:, 0]).sum().backward()
    assert tokens.grad is not None and tokens.grad.dtype == torch.bfloat16
    assert tokens.grad.abs().sum() > 0


# --- pretrained weights when the hub cannot be used -------------------------------------


@pytest.fixture
def offline_empty_cache(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE set and an empty hub cache; no open_clip model may be built."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    built = []

    def create_model(*args, **kwargs):
        built.append((args, kwargs))
        return build_tiny_clip()

    monkeypatch.setattr(open_clip, "create_model", create_model)
    monkeypatch.setattr(open_clip, "get_tokenizer", lambda name: clip_bpe_tokenizer())
    return tmp_path, built


def _cache_file(cache, repo, filename, revision="abc123"):
    folder = cache / ("models--" + repo.replace("/", "--"))
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(revision)
    path = folder / "snapshots" / revision / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"weights")
    return path


def test_default_backbone_offline_fails_at_once_saying_how_to_pass_a_checkpoint(
    offline_empty_cache,
):
    _, built = offline_empty_cache
    with pytest.raises(WeightsUnavailableError) as info:
        load_clip("ViT-L-14-336-quickgelu", "openai")
    message = str(info.value)
    assert "\n" not in message and "HF_HUB_OFFLINE is set" in message
    assert "pretrained='/path/to/open_clip_pytorch_model.bin'" in message
    assert "--pretrained PATH" in message and "ViT-L-14-336px.pt" in message
    assert "timm/vit_large_patch14_clip_336.openai" in message
    assert built == []  # refused before the architecture was built
    assert isinstance(info.value, CNCADError) and isinstance(info.value, OSError)
    assert isinstance(info.value, RuntimeError)  # what load_clip raised before


def test_default_detector_offline_raises_the_same_error(offline_empty_cache):
    from cncad import CNCDetector

    with pytest.raises(WeightsUnavailableError, match="local checkpoint"):
        CNCDetector()


def test_cached_weights_are_loaded_without_the_hub(offline_empty_cache):
    cache, built = offline_empty_cache
    repo = "timm/vit_base_patch32_clip_224.openai"
    cached = _cache_file(cache, repo, "open_clip_pytorch_model.bin")
    load_clip("ViT-B-32-quickgelu", "openai")
    assert built[-1][0] == ("ViT-B-32-quickgelu",)
    assert built[-1][1]["pretrained"] == str(cached)  # the file, not the tag
    safe = _cache_file(cache, repo, "open_clip_model.safetensors")
    load_clip("ViT-B-32-quickgelu", "openai")
    assert built[-1][1]["pretrained"] == str(safe)  # open_clip's preference


def test_hf_hub_backbone_offline_uses_the_cached_folder_or_fails(offline_empty_cache):
    cache, built = offline_empty_cache
    with pytest.raises(WeightsUnavailableError, match="org/clip-model"):
        load_clip("hf-hub:org/clip-model")
    config = _cache_file(cache, "org/clip-model", "open_clip_config.json")
    with pytest.raises(WeightsUnavailableError):  # the config alone is not enough
        load_clip("hf-hub:org/clip-model")
    _cache_file(cache, "org/clip-model", "open_clip_pytorch_model.bin")
    load_clip("hf-hub:org/clip-model")
    assert built[-1][0] == (f"local-dir:{config.parent}",)


def test_reachable_hub_and_local_sources_are_left_to_open_clip(offline_empty_cache, monkeypatch):
    import cncad.encoders.clip as clip_module

    _, built = offline_empty_cache
    load_clip("ViT-B-32", None)  # random weights: nothing to download
    assert built[-1][1]["pretrained"] is None
    monkeypatch.setattr(clip_module, "hub_unreachable_reason", lambda: None)
    load_clip("ViT-B-32-quickgelu", "openai")
    assert built[-1][1]["pretrained"] == "openai"
