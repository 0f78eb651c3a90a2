import pytest
import torch

from cncad.model import CNCModel


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(0))


def build(tiny_config, **changes):
    torch.manual_seed(0)
    return CNCModel(tiny_config.replace(**changes))


def test_forward_shapes(tiny_config, images):
    model = build(tiny_config).train()
    out = model(images)
    assert model.layers == (2, 4, 6)
    assert [f.shape for f in out.encoded] == [(2, 16, 64)] * 3
    assert [f.shape for f in out.decoded] == [(2, 16, 64)] * 3
    assert out.encoded_global.shape == out.decoded_global.shape == (2, 3, 64)
    assert out.text_normal.shape == out.text_abnormal.shape == (3, 64)
    assert out.gates.shape == (2 * 17, 5)


def test_decoder_blocks_map_deep_to_shallow(tiny_config, images):
    model = build(tiny_config, use_cnc=False).eval()
    outputs = []
    model.decoder.blocks[0].register_forward_hook(lambda m, i, o: outputs.append(o))
    out = model(images)
    # the first decoder block reconstructs the deepest tapped layer (the last in the list)
    assert torch.equal(out.decoded[-1], outputs[0][:, 1:])


def test_gradients_reach_exactly_the_trainable_parts(tiny_config, images):
    model = build(tiny_config, theta=0).train()
    model.loss(model(images), epoch=0).total.backward()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(
        name.startswith(("prompt_learner.context", "fusion.", "moe.", "decoder."))
        for name in trainable
    )
    assert {"prompt_learner.context", "fusion.proj.weight", "moe.router.weight"} <= trainable
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, name
        else:
            assert p.grad is None, name
    assert not any(p.requires_grad for p in model.encoder.parameters())


def test_constraint_on_decoder_starts_at_theta(tiny_config, images):
    model = build(tiny_config, theta=3).train()
    torch.manual_seed(1)
    out = model(images)
    before, after = model.loss(out, epoch=2), model.loss(out, epoch=3)
    assert torch.equal(before.constraint, before.align_encoder)
    expected = after.align_encoder + 0.1 * after.align_decoder
    assert torch.allclose(after.constraint, expected)
    assert torch.allclose(after.total, after.distill + after.constraint + after.moe)


@pytest.mark.parametrize(
    ("switches", "present"),
    [
        ({}, {"prompt_learner", "fusion", "moe"}),
        ({"use_mlf": False}, {"prompt_learner", "moe"}),
        ({"use_cnc": False}, {"fusion", "moe"}),
        ({"use_moe": False}, {"prompt_learner", "fusion"}),
        ({"use_mlf": False, "use_cnc": False, "use_moe": False}, set()),
    ],
)
def test_ablation_switches_table_2(tiny_config, images, switches, present):
    model = build(tiny_config, **switches).train()
    parts = {name for name in ("prompt_learner", "fusion", "moe") if getattr(model, name)}
    assert parts == present
    terms = model.loss(model(images), epoch=5)
    assert (terms.moe != 0) == ("moe" in present)
    assert (terms.constraint != 0) == ("prompt_learner" in present)
    assert model.encoder.text is None or "prompt_learner" in present


@pytest.mark.parametrize(("experts", "k"), [(1, 1), (3, 2), (6, 4)])
def test_moe_hyperparameters_table_4(tiny_config, images, experts, k):
    model = build(tiny_config, num_experts=experts, top_k=k).train()
    out = model(images)
    assert len(model.moe.experts) == experts and out.gates.shape[1] == experts


def test_predict_maps_and_scores(tiny_config, images):
    model = build(tiny_config).eval()
    maps, scores = model.predict(images)
    assert maps.shape == (2, 56, 56) and scores.shape == (2,)
    assert torch.allclose(scores, maps.flatten(1).max(dim=1).values)
    assert (maps >= 0).all()


def test_trainable_state_dict_leaves_out_clip_and_round_trips(tiny_config, images):
    model = build(tiny_config).eval()
    state = model.trainable_state_dict()
    assert not any(k.startswith(("encoder.", "prompt_learner.text_tower.")) for k in state)
    assert "prompt_learner.cached_features" in state
    torch.manual_seed(5)
    other = CNCModel(tiny_config)
    other.load_trainable_state_dict(state)
    other.eval()
    assert torch.equal(other.predict(images)[0], model.predict(images)[0])
    with pytest.raises(ValueError, match="missing"):
        other.load_trainable_state_dict({k: v for k, v in state.items() if "moe" not in k})
    reshaped = dict(state, **{"moe.router.weight": state["moe.router.weight"][:-1]})
    before = {k: v.clone() for k, v in other.trainable_state_dict().items()}
    with pytest.raises(ValueError, match=r"'moe\.router\.weight' is \(4, 64\)"):
        other.load_trainable_state_dict(reshaped)
    assert all(torch.equal(v, before[k]) for k, v in other.trainable_state_dict().items())


@pytest.fixture(scope="module")
def cnn_images():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def cnn_config(tiny_config, **changes):
    base = tiny_config.replace(backbone="timm/test_efficientnet", use_cnc=False, image_size=64)
    return base.replace(**changes)


def test_clip_models_get_no_grid_or_width_adapters(tiny_config):
    model = build(tiny_config)
    assert model.input_proj is None and model.output_heads is None
    assert model.common_grid == (4, 4)
    assert not any(k.startswith(("input_proj", "output_heads")) for k in model.state_dict())


@pytest.mark.parametrize(
    ("changes", "grid", "heads"),
    [
        ({}, (4, 4), 1),
        ({"feature_grid": "finest", "use_mlf": False}, (16, 16), 1),
        ({"feature_grid": 6, "decoder_width": 40, "decoder_heads": 4}, (6, 6), 4),
    ],
)
@pytest.mark.parametrize("compare", ["common", "native"])
def test_unequal_grids_end_to_end(tiny_config, cnn_images, changes, grid, heads, compare):
    model = build(cnn_config(tiny_config, compare_grid=compare, **changes)).train()
    encoder = model.encoder
    assert encoder.grids == ((16, 16), (8, 8), (4, 4)) and encoder.widths == (24, 32, 48)
    assert model.common_grid == grid
    assert model.decoder.blocks[0].attn.num_heads == heads
    width = changes.get("decoder_width", 48)
    assert model.decoder.blocks[0].norm1.normalized_shape == (width,)
    out = model(cnn_images)
    expected_grids = encoder.grids if compare == "native" else [grid] * 3
    for enc, dec, g, c in zip(
        out.encoded, out.decoded, expected_grids, encoder.widths, strict=True
    ):
        assert enc.shape == dec.shape == (2, g[0] * g[1], c)
    if compare == "native":  # the targets are the encoder's own features, untouched
        raw = model.encode(cnn_images).patch_tokens
        assert all(torch.equal(a, b) for a, b in zip(out.encoded, raw, strict=True))
    assert out.gates.shape == (2 * grid[0] * grid[1], 5)  # no class token with a CNN
    model.loss(out, epoch=0).total.backward()
    heads_and_decoder = [p for n, p in model.named_parameters() if n.startswith("decoder.")]
    assert all(p.grad is not None for p in heads_and_decoder)
    model.eval()
    maps, scores = model.predict(cnn_images)
    assert maps.shape == (2, 64, 64) and torch.isfinite(maps).all() and scores.shape == (2,)
    assert torch.equal(model.predict_features(model.encode(cnn_images))[0], maps)


def test_width_adapters_for_a_cnn_pyramid(tiny_config, cnn_images):
    fused = build(cnn_config(tiny_config))
    assert fused.input_proj is None  # fusion maps the concatenation to the decoder width
    assert [type(h).__name__ for h in fused.output_heads] == ["Linear", "Linear", "Identity"]
    assert fused.fusion.proj.in_features == 24 + 32 + 48
    plain = build(cnn_config(tiny_config, use_mlf=False, decoder_width=64))
    assert plain.input_proj.in_features == 48 and plain.input_proj.out_features == 64
    assert [h.out_features for h in plain.output_heads] == [24, 32, 48]
    state = plain.trainable_state_dict()
    assert "input_proj.weight" in state and not any(k.startswith("encoder.") for k in state)


def test_cnc_switched_on_with_a_timm_encoder_is_an_error(tiny_config):
    from cncad.encoders import TimmEncoder

    encoder = TimmEncoder("test_efficientnet", image_size=64)
    with pytest.raises(ValueError, match="needs an encoder with a text tower"):
        CNCModel(tiny_config.replace(image_size=64), encoder=encoder)
    with pytest.raises(ValueError, match="no text tower"):
        tiny_config.replace(backbone="timm/test_efficientnet")


def context_grad(model, loss):
    (grad,) = torch.autograd.grad(
        loss, model.prompt_learner.context, retain_graph=True, allow_unused=True
    )
    return grad


def test_detached_text_anchors_leave_the_prompts_to_eq_4(tiny_config, images):
    model = build(tiny_config, theta=0).train()
    assert model.config.detach_text_anchors  # the default
    terms = model.loss(model(images), epoch=0)
    anchored = context_grad(model, terms.distill + terms.align_decoder)
    assert anchored is None or not anchored.any()
    encoder_grad = context_grad(model, terms.align_encoder)
    assert encoder_grad is not None and encoder_grad.abs().sum() > 0
    # the total still trains the prompts, through eq. 4 alone
    total_grad = context_grad(model, terms.total)
    assert torch.allclose(total_grad, encoder_grad)


def test_undetached_text_anchors_let_every_loss_move_the_prompts(tiny_config, images):
    model = build(tiny_config, theta=0, detach_text_anchors=False).train()
    terms = model.loss(model(images), epoch=0)
    distill_grad = context_grad(model, terms.distill)
    decoder_grad = context_grad(model, terms.align_decoder)
    assert distill_grad is not None and distill_grad.abs().sum() > 0
    assert decoder_grad is not None and decoder_grad.abs().sum() > 0


def test_gamma_ramp_from_the_config(tiny_config, images):
    model = build(tiny_config, theta=3, gamma=0.2, gamma_ramp_epochs=4).train()
    out = model(images)
    for epoch, weight in [(2, 0.0), (3, 0.05), (4, 0.1), (6, 0.2), (7, 0.2)]:
        terms = model.loss(out, epoch=epoch)
        expected = terms.align_encoder + weight * terms.align_decoder
        assert torch.allclose(terms.constraint, expected), epoch


def test_encoder_alignment_under_bf16_autocast_equals_float32(tiny_config, images):
    model = build(tiny_config, noise_std=0.0, fusion_dropout=0.0).train()
    features = model.encode(images)
    expected = model.loss(model.forward_features(features), epoch=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.forward_features(features)
        terms = model.loss(out, epoch=0)
    assert out.decoded[0].dtype == torch.bfloat16  # the student did run in bf16
    assert out.encoded_global.dtype == out.text_normal.dtype == torch.float32
    assert torch.equal(out.text_normal, model.forward_features(features).text_normal)
    assert torch.equal(terms.align_encoder, expected.align_encoder)
    assert torch.isfinite(terms.total)


def test_predict_under_inference_mode_then_training_and_reloading(tiny_config, images):
    model = build(tiny_config).eval()
    with torch.inference_mode():
        before, _ = model.predict(images)
    assert not model.prompt_learner.cached_features.is_inference()
    model.train()
    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=1e-2)
    model.loss(model(images), epoch=0).total.backward()
    optimizer.step()
    model.eval()
    after, _ = model.predict(images)
    assert not torch.equal(after, before)
    model.load_trainable_state_dict(model.trainable_state_dict())
    assert torch.equal(model.predict(images)[0], after)
