import math

import pytest
import torch

from cncad.modules import FeatureNormalityPromotion, normality_coefficient


def transcription(f, p, g_n, g_a, norm, mode, cosine):
    """Eqs. 5-8, one token at a time."""
    out = torch.empty_like(f)
    batch, length, _ = f.shape
    for b in range(batch):
        map_norm = math.sqrt(sum(float(f[b, t] @ f[b, t]) for t in range(length)))
        for t in range(length):
            z = p[b, t] / p[b, t].norm() if cosine else p[b, t]
            alpha, beta = float(z @ g_n), float(z @ g_a)
            psi = 0.5 * (1 + math.tanh(alpha - beta))
            lam = 1 / (float(f[b, t].norm()) if norm == "token" else map_norm)
            out[b, t] = f[b, t] + lam * psi * (1 if mode == "broadcast" else f[b, t])
    return out


@pytest.mark.parametrize("norm", ["token", "map"])
@pytest.mark.parametrize("mode", ["broadcast", "direction"])
@pytest.mark.parametrize("cosine", [True, False])
def test_matches_direct_transcription_of_eqs_5_to_8(norm, mode, cosine):
    gen = torch.Generator().manual_seed(0)
    f = torch.randn(2, 5, 6, generator=gen, dtype=torch.float64)
    p = torch.randn(2, 5, 4, generator=gen, dtype=torch.float64)
    g_n = torch.nn.functional.normalize(torch.randn(4, generator=gen, dtype=torch.float64), dim=0)
    g_a = torch.nn.functional.normalize(torch.randn(4, generator=gen, dtype=torch.float64), dim=0)
    module = FeatureNormalityPromotion(norm=norm, mode=mode, cosine=cosine)
    expected = transcription(f, p, g_n, g_a, norm, mode, cosine)
    assert torch.allclose(module(f, p, g_n, g_a), expected, atol=1e-10)


def test_coefficient_is_high_for_tokens_aligned_with_normal_text():
    g_n, g_a = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    tokens = torch.tensor([[[3.0, 0.0], [0.0, 3.0], [1.0, 1.0]]])
    psi = normality_coefficient(tokens, g_n, g_a)
    assert psi[0, 0] > 0.5 > psi[0, 1]
    assert psi[0, 2] == pytest.approx(0.5)
    assert ((psi > 0) & (psi < 1)).all()


def test_shape_mismatch_and_bad_options_raise():
    module = FeatureNormalityPromotion()
    with pytest.raises(ValueError, match="share"):
        module(torch.randn(2, 5, 6), torch.randn(2, 4, 3), torch.randn(3), torch.randn(3))
    with pytest.raises(ValueError):
        FeatureNormalityPromotion(norm="channel")
    with pytest.raises(ValueError):
        FeatureNormalityPromotion(mode="concat")


def test_coefficient_under_bf16_autocast_equals_float32():
    gen = torch.Generator().manual_seed(2)
    projected = torch.randn(2, 16, 64, generator=gen)
    g_n = torch.nn.functional.normalize(torch.randn(64, generator=gen), dim=0)
    g_a = torch.nn.functional.normalize(torch.randn(64, generator=gen), dim=0)
    expected = normality_coefficient(projected, g_n, g_a)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (projected @ g_n).dtype == torch.bfloat16  # autocast is active here
        psi = normality_coefficient(projected, g_n, g_a)
        psi_raw = normality_coefficient(projected, g_n, g_a, cosine=False)
        from_bf16 = normality_coefficient(projected.bfloat16(), g_n, g_a)
    assert psi.dtype == torch.float32 and torch.equal(psi, expected)
    assert torch.equal(psi_raw, normality_coefficient(projected, g_n, g_a, cosine=False))
    assert torch.equal(from_bf16, normality_coefficient(projected.bfloat16().float(), g_n, g_a))


def test_promotion_keeps_the_feature_dtype_under_autocast():
    gen = torch.Generator().manual_seed(3)
    f = torch.randn(2, 5, 6, generator=gen).bfloat16()
    p = torch.randn(2, 5, 4, generator=gen)
    g_n = torch.nn.functional.normalize(torch.randn(4, generator=gen), dim=0)
    g_a = torch.nn.functional.normalize(torch.randn(4, generator=gen), dim=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = FeatureNormalityPromotion()(f, p, g_n, g_a)
    psi = normality_coefficient(p, g_n, g_a).unsqueeze(-1).bfloat16()
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, f + (1.0 / f.norm(dim=-1, keepdim=True).clamp_min(1e-6)) * psi)
