import pytest
import torch

from cncad.modules import GatedMoE, importance_loss


def test_matches_direct_transcription_of_eqs_13_14():
    torch.manual_seed(0)
    moe = GatedMoE(dim=6, num_experts=5, top_k=2)
    tokens = torch.randn(2, 7, 6)
    out = moe(tokens)
    flat = tokens.reshape(-1, 6)
    for r in range(flat.shape[0]):
        scores = torch.softmax(moe.router(flat[r]), dim=-1)  # eq. 13
        top = torch.topk(scores, 2)
        expected = sum(
            top.values[k] * moe.experts[int(top.indices[k])](flat[r]) for k in range(2)
        )  # eq. 14
        assert torch.allclose(out.output.reshape(-1, 6)[r], expected, atol=1e-6)
    assert out.output.shape == tokens.shape
    assert out.gates.shape == (14, 5)
    assert torch.allclose(out.gates.sum(-1), torch.ones(14))


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_each_token_runs_exactly_k_distinct_experts(top_k):
    torch.manual_seed(0)
    moe = GatedMoE(dim=8, num_experts=4, top_k=top_k)
    seen = []
    for expert in moe.experts:
        expert.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape[0]))
    out = moe(torch.randn(3, 10, 8))
    assert sum(seen) == 30 * top_k
    assert out.expert_indices.shape == (30, top_k)
    assert all(len(set(row.tolist())) == top_k for row in out.expert_indices)


def test_renormalized_gates_sum_to_one():
    torch.manual_seed(0)
    moe = GatedMoE(dim=4, num_experts=3, top_k=3, renormalize=True)
    tokens = torch.randn(5, 4)
    # with K = T and renormalisation, z* is the softmax-weighted mix of all experts
    gates = torch.softmax(moe.router(tokens), -1)
    expected = sum(gates[:, t : t + 1] * moe.experts[t](tokens) for t in range(3))
    assert torch.allclose(moe(tokens).output, expected, atol=1e-6)


def test_importance_loss_is_the_squared_coefficient_of_variation():
    gates = torch.tensor([[0.7, 0.2, 0.1], [0.5, 0.3, 0.2]])
    importance = gates.sum(0)
    mean = importance.mean()
    expected = ((importance - mean) ** 2).mean() / (mean**2 + 1e-10)
    assert torch.allclose(importance_loss(gates), expected)


def test_importance_loss_falls_when_load_is_balanced():
    balanced = torch.full((8, 4), 0.25)
    skewed = torch.tensor([[0.97, 0.01, 0.01, 0.01]]).repeat(8, 1)
    assert importance_loss(balanced) == pytest.approx(0.0, abs=1e-12)
    assert importance_loss(skewed) > 1.0
    # balanced in total even though each token is peaked
    alternating = torch.eye(4).repeat(2, 1)
    assert importance_loss(alternating) == pytest.approx(0.0, abs=1e-12)


def test_importance_loss_does_not_grow_with_the_number_of_tokens():
    gates = torch.softmax(torch.randn(16, 5), -1)
    assert importance_loss(gates.repeat(10, 1)) == pytest.approx(float(importance_loss(gates)))


def test_gradients_reach_router_and_selected_experts_only():
    torch.manual_seed(0)
    moe = GatedMoE(dim=4, num_experts=6, top_k=1)
    tokens = torch.randn(1, 4)
    out = moe(tokens)
    (out.output.sum() + importance_loss(out.gates)).backward()
    chosen = int(out.expert_indices[0, 0])
    assert moe.router.weight.grad.abs().sum() > 0
    for t, expert in enumerate(moe.experts):
        touched = expert.fc1.weight.grad is not None
        assert touched == (t == chosen)


def test_invalid_top_k():
    with pytest.raises(ValueError):
        GatedMoE(dim=4, num_experts=2, top_k=3)


@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize(("dim", "experts", "top_k"), [(6, 4, 3), (64, 5, 2), (32, 5, 1)])
def test_dense_routing_equals_sparse_routing(renormalize, dim, experts, top_k):
    torch.manual_seed(1)
    moe = GatedMoE(dim, num_experts=experts, top_k=top_k, renormalize=renormalize)
    tokens = torch.randn(3, 17, dim) * 2
    sparse = moe(tokens)
    moe.dense = True
    dense = moe(tokens)
    # same experts, gates and mixture; only the GEMM blocking over rows can round differently
    assert torch.equal(dense.expert_indices, sparse.expert_indices)
    assert torch.equal(dense.gates, sparse.gates)
    assert torch.allclose(dense.output, sparse.output, rtol=0, atol=1e-6)
    # gradients agree as well (the dense path only adds exact zeros)
    sparse_grad = torch.autograd.grad(sparse.output.square().sum(), moe.router.weight)[0]
    dense_grad = torch.autograd.grad(dense.output.square().sum(), moe.router.weight)[0]
    assert torch.allclose(dense_grad, sparse_grad, rtol=1e-4, atol=1e-5)


def test_tracing_uses_the_dense_routing_and_keeps_the_numbers():
    torch.manual_seed(2)
    moe = GatedMoE(dim=16, num_experts=5, top_k=2).eval()
    calls = []
    for expert in moe.experts:
        expert.register_forward_hook(lambda m, inp, out: calls.append(inp[0].shape[0]))
    tokens = torch.randn(2, 9, 16)
    with torch.no_grad():
        traced = torch.jit.trace(_OutputOnly(moe), (tokens,), check_trace=False)
    assert calls == [18] * 5  # every expert saw every token while tracing
    other = torch.randn(4, 9, 16)  # another batch: the traced graph has no data-dependent shape
    with torch.no_grad():
        assert torch.allclose(traced(other), moe(other).output, rtol=0, atol=1e-6)


class _OutputOnly(torch.nn.Module):
    def __init__(self, moe: GatedMoE) -> None:
        super().__init__()
        self.moe = moe

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.moe(tokens).output
