import pytest
import torch
import torch.nn.functional as F

from cncad.encoders.clip import CLIPTextTower, load_clip
from cncad.modules import PromptLearner


@pytest.fixture(scope="module")
def clip_and_tokenizer():
    return load_clip("tiny")


def make_learner(clip_and_tokenizer, **kwargs):
    model, tokenizer = clip_and_tokenizer
    return PromptLearner(CLIPTextTower(model), tokenizer, **kwargs)


def test_shapes_and_unit_norm(clip_and_tokenizer):
    learner = make_learner(clip_and_tokenizer, num_layers=3, prompt_length=12)
    normal, abnormal = learner()
    assert normal.shape == abnormal.shape == (3, 64)
    assert torch.allclose(normal.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(abnormal.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert learner.context.shape == (3, 2, 12, 64)


def test_eqs_2_3_match_clip_encode_text_of_the_spelled_out_prompt(clip_and_tokenizer):
    """With context vectors set to the embeddings of real words, the learned prompt is
    exactly CLIP's text feature of "<words> object" / "<words> damaged object"."""
    model, tokenizer = clip_and_tokenizer
    learner = make_learner(clip_and_tokenizer, num_layers=2, prompt_length=4)
    words = ["a", "b", "c", "d"]
    word_ids = tokenizer([" ".join(words)])[0, 1:5]
    with torch.no_grad():
        learner.context.copy_(model.token_embedding(word_ids).expand(2, 2, 4, 64))
    normal, abnormal = learner()
    ids = tokenizer(["a b c d object", "a b c d damaged object"])
    expected = F.normalize(model.encode_text(ids), dim=-1)
    assert torch.allclose(normal, expected[0].expand(2, -1), atol=1e-5)
    assert torch.allclose(abnormal, expected[1].expand(2, -1), atol=1e-5)


def test_each_layer_and_state_has_its_own_prompt(clip_and_tokenizer):
    learner = make_learner(clip_and_tokenizer, num_layers=3, prompt_length=3)
    normal, abnormal = learner()
    assert not torch.allclose(normal[0], normal[1])
    assert not torch.allclose(normal[0], abnormal[0])


def test_gradients_reach_only_the_context(clip_and_tokenizer):
    learner = make_learner(clip_and_tokenizer, num_layers=2, prompt_length=3)
    normal, abnormal = learner()
    (normal.sum() - abnormal.sum()).backward()
    assert learner.context.grad is not None and learner.context.grad.abs().sum() > 0
    assert all(p.grad is None for p in learner.text_tower.parameters())


def test_eval_mode_caches_and_training_invalidates(clip_and_tokenizer, monkeypatch):
    learner = make_learner(clip_and_tokenizer, num_layers=2, prompt_length=3)
    calls = []
    original = learner.text_tower.forward
    monkeypatch.setattr(learner.text_tower, "forward", lambda *a: calls.append(1) or original(*a))
    learner.eval()
    first = learner()
    second = learner()
    assert len(calls) == 1 and torch.equal(first[0], second[0])
    learner.train()
    with torch.no_grad():
        learner.context.add_(1.0)
    learner.eval()
    third = learner()
    assert len(calls) == 2 and not torch.allclose(third[0], first[0])


def test_cache_travels_in_the_state_dict(clip_and_tokenizer, monkeypatch):
    trained = make_learner(clip_and_tokenizer, num_layers=2, prompt_length=3).eval()
    expected = trained()
    torch.manual_seed(1)  # a different random context, overwritten by the load
    fresh = make_learner(clip_and_tokenizer, num_layers=2, prompt_length=3)
    assert not torch.equal(fresh.context, trained.context)
    fresh.load_state_dict(trained.state_dict())
    fresh.eval()

    def must_not_run(*args):
        raise AssertionError("the text tower ran although the loaded cache is valid")

    monkeypatch.setattr(fresh.text_tower, "forward", must_not_run)
    normal, abnormal = fresh()
    assert torch.equal(normal, expected[0]) and torch.equal(abnormal, expected[1])


def test_in_place_context_update_invalidates_the_cache(clip_and_tokenizer):
    learner = make_learner(clip_and_tokenizer, num_layers=2, prompt_length=3).eval()
    before = learner()
    with torch.no_grad():  # what an optimiser step does
        learner.context.mul_(-1.5)
    after = learner()
    fresh = learner.encode()
    assert not torch.allclose(after[0], before[0])
    assert torch.equal(after[0], fresh[0]) and torch.equal(after[1], fresh[1])


def test_writes_through_data_invalidate_the_cache(clip_and_tokenizer):
    """``context.data.copy_`` bypasses the parameter's version counter."""
    learner = make_learner(clip_and_tokenizer, num_layers=2, prompt_length=3).eval()
    before = learner()
    version = learner.context._version
    learner.context.data.copy_(torch.randn_like(learner.context))
    assert learner.context._version == version
    after = learner()
    assert not torch.allclose(after[0], before[0])
    assert torch.equal(after[0], learner.encode()[0])


def test_optimizer_step_and_load_state_dict_invalidate_the_cache(clip_and_tokenizer):
    learner = make_learner(clip_and_tokenizer, num_layers=2, prompt_length=3)
    optimizer = torch.optim.Adam([learner.context], lr=0.1)
    first = learner.eval()()
    learner.train()
    normal, abnormal = learner()
    (normal.sum() - abnormal.sum()).backward()
    optimizer.step()
    stepped = learner.eval()()
    assert not torch.allclose(stepped[0], first[0])
    assert torch.equal(stepped[0], learner.encode()[0])
    torch.manual_seed(3)
    other = make_learner(clip_and_tokenizer, num_layers=2, prompt_length=3)
    learner.load_state_dict(other.state_dict())  # carries cache_valid=False
    loaded = learner()
    assert torch.equal(loaded[0], other.encode()[0])


def test_switching_modes_without_a_change_keeps_the_cache(clip_and_tokenizer, monkeypatch):
    learner = make_learner(clip_and_tokenizer, num_layers=2, prompt_length=3)
    calls = []
    original = learner.text_tower.forward
    monkeypatch.setattr(learner.text_tower, "forward", lambda *a: calls.append(1) or original(*a))
    learner.eval()()
    learner.train().eval()
    learner()
    assert len(calls) == 1


def test_cache_built_under_inference_mode_is_a_plain_tensor(clip_and_tokenizer):
    learner = make_learner(clip_and_tokenizer, num_layers=2, prompt_length=3).eval()
    with torch.inference_mode():
        cached, _ = learner()
    assert not learner.cached_features.is_inference()
    assert not learner.cached_context.is_inference() and not learner.cache_valid.is_inference()
    optimizer = torch.optim.Adam([learner.context], lr=0.1)
    learner.train()
    normal, abnormal = learner()
    (normal.sum() - abnormal.sum()).backward()
    optimizer.step()
    learner.eval()
    after, _ = learner()
    assert not learner.cached_features.is_inference()
    assert not torch.allclose(after, cached)
    learner.load_state_dict(learner.state_dict())  # in-place copies into the buffers


def test_text_features_under_bf16_autocast_equal_float32(clip_and_tokenizer):
    learner = make_learner(clip_and_tokenizer, num_layers=3, prompt_length=4)
    expected = learner.encode()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        normal, abnormal = learner.encode()
    assert normal.dtype == abnormal.dtype == torch.float32
    assert torch.equal(normal, expected[0]) and torch.equal(abnormal, expected[1])
