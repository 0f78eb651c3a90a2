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
