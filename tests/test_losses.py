import math

import pytest
import torch

from cncad.losses import (
    LossTerms,
    alignment_loss,
    constraint_loss,
    distillation_loss,
    total_loss,
)


def test_distillation_loss_matches_eq_9():
    gen = torch.Generator().manual_seed(0)
    encoded = [torch.randn(3, 4, 5, generator=gen, dtype=torch.float64) for _ in range(3)]
    decoded = [torch.randn(3, 4, 5, generator=gen, dtype=torch.float64) for _ in range(3)]
    per_sample = []
    for b in range(3):
        total = 0.0
        for f, g in zip(encoded, decoded, strict=True):
            x, y = f[b].flatten(), g[b].flatten()
            total += 1 - float(x @ y) / (float(x.norm()) * float(y.norm()))
        per_sample.append(total)
    expected = sum(per_sample) / 3
    assert distillation_loss(encoded, decoded).item() == pytest.approx(expected, rel=1e-9)
    assert distillation_loss(encoded, encoded).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError):
        distillation_loss(encoded, decoded[:2])


def test_alignment_loss_matches_eqs_4_and_10():
    gen = torch.Generator().manual_seed(1)
    unit = lambda *s: torch.nn.functional.normalize(torch.randn(*s, generator=gen), dim=-1)  # noqa: E731
    e, g_n, g_a = unit(2, 3, 8), unit(3, 8), unit(3, 8)
    tau = 0.05
    expected = 0.0
    for b in range(2):
        for i in range(3):
            pos = math.exp(float(e[b, i] @ g_n[i]) / tau)
            neg = math.exp(float(e[b, i] @ g_a[i]) / tau)
            expected += -math.log(pos / (pos + neg))
    expected /= 2
    assert alignment_loss(e, g_n, g_a, tau).item() == pytest.approx(expected, rel=1e-5)


def test_alignment_loss_is_stable_at_the_paper_temperature():
    e = torch.nn.functional.normalize(torch.tensor([[[1.0, 0.0]]]), dim=-1)
    g_n, g_a = torch.tensor([[-1.0, 0.0]]), torch.tensor([[1.0, 0.0]])
    loss = alignment_loss(e, g_n, g_a, tau=0.001)  # exp(1000) would overflow naively
    assert torch.isfinite(loss) and loss.item() == pytest.approx(2000.0, rel=1e-6)


def test_constraint_loss_schedule_eq_11():
    l1, l2 = torch.tensor(2.0), torch.tensor(10.0)
    assert constraint_loss(l1, l2, epoch=4, gamma=0.1, theta=5).item() == 2.0
    assert constraint_loss(l1, l2, epoch=5, gamma=0.1, theta=5).item() == pytest.approx(3.0)
    assert constraint_loss(l1, l2, epoch=0, gamma=0.1, theta=0).item() == pytest.approx(3.0)


def eq_11(l1: float, l2: float, epoch: int, gamma: float, theta: int, ramp: int) -> float:
    """Eq. 11 as printed, with γ scaled by the ramp when ``ramp > 0``."""
    if epoch < theta:
        return l1
    weight = gamma if ramp == 0 else gamma * min(1.0, (epoch - theta + 1) / ramp)
    return l1 + weight * l2


@pytest.mark.parametrize("ramp", [0, 1, 4])
@pytest.mark.parametrize("offset", [-1, 0, 1, 2, 3, 4, 5])
def test_constraint_loss_matches_eq_11_with_and_without_ramp(ramp, offset):
    gen = torch.Generator().manual_seed(4)
    l1, l2 = torch.rand(2, generator=gen, dtype=torch.float64) * 5
    theta, gamma = 5, 0.1
    epoch = theta + offset
    loss = constraint_loss(l1, l2, epoch, gamma, theta, ramp_epochs=ramp)
    expected = eq_11(float(l1), float(l2), epoch, gamma, theta, ramp)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    if ramp == 0:  # the default is the paper's step, exactly
        assert torch.equal(loss, constraint_loss(l1, l2, epoch, gamma, theta))


def test_constraint_loss_ramp_values_and_gradient():
    l1, l2 = torch.tensor(1.0), torch.tensor(10.0, requires_grad=True)
    values = [
        constraint_loss(l1, l2, epoch, gamma=0.2, theta=3, ramp_epochs=4).item()
        for epoch in (2, 3, 4, 6, 7, 20)
    ]
    # before θ; θ: γ/4; θ+1: γ/2; θ+3 = θ+R-1: γ; then γ
    assert values == pytest.approx([1.0, 1.5, 2.0, 3.0, 3.0, 3.0])
    constraint_loss(l1, l2, epoch=3, gamma=0.2, theta=3, ramp_epochs=4).backward()
    assert l2.grad.item() == pytest.approx(0.05)
    with pytest.raises(ValueError, match="ramp_epochs"):
        constraint_loss(l1, l2, epoch=3, gamma=0.2, theta=3, ramp_epochs=-1)


def test_alignment_loss_upcasts_half_precision_inputs():
    gen = torch.Generator().manual_seed(5)
    unit = lambda *s: torch.nn.functional.normalize(torch.randn(*s, generator=gen), dim=-1)  # noqa: E731
    e, g_n, g_a = unit(2, 3, 8).bfloat16(), unit(3, 8), unit(3, 8)
    loss = alignment_loss(e, g_n, g_a)
    assert loss.dtype == torch.float32
    assert torch.equal(loss, alignment_loss(e.float(), g_n, g_a))


def test_alignment_from_tokens_under_bf16_autocast_equals_float32():
    """Eqs. 4/10 from CLIP class tokens: global features and loss run in float32."""
    from cncad.encoders.clip import CLIPEncoder, build_tiny_clip

    encoder = CLIPEncoder(build_tiny_clip(), image_size=56)
    gen = torch.Generator().manual_seed(6)
    tokens = torch.randn(2, 3, encoder.width, generator=gen)
    g_n = torch.nn.functional.normalize(torch.randn(3, encoder.embed_dim, generator=gen), dim=-1)
    g_a = torch.nn.functional.normalize(torch.randn(3, encoder.embed_dim, generator=gen), dim=-1)

    def loss() -> torch.Tensor:
        e = torch.stack([encoder.global_feature(tokens[:, i]) for i in range(3)], dim=1)
        return alignment_loss(e, g_n, g_a, tau=0.001)

    expected = loss()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (tokens @ encoder.visual.proj).dtype == torch.bfloat16  # autocast is active
        got = loss()
    assert got.dtype == torch.float32 and torch.equal(got, expected)


def test_total_loss_eq_16_and_terms_as_floats():
    total = total_loss(torch.tensor(1.0), torch.tensor(2.0), torch.tensor(0.5))
    assert total.item() == 3.5
    terms = LossTerms(total, *(torch.tensor(float(i)) for i in range(5)))
    assert terms.as_floats() == {
        "total": 3.5,
        "distill": 0.0,
        "constraint": 1.0,
        "align_encoder": 2.0,
        "align_decoder": 3.0,
        "moe": 4.0,
    }
