"""Fused anomaly scoring vs the naive pipeline (cosine -> upsample -> sum -> blur)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch
import torch.nn.functional as F

from cncad import scoring
from cncad.scoring import (
    BORDER_MODES,
    anomaly_map,
    axis_operator,
    clear_operator_cache,
    gaussian_blur_matrix,
    image_score,
    interpolation_matrix,
)

ATOL = 1e-5


# ------------------------------------------------------------------------ references


def _layer_distance(e: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """1 - cosine similarity of one layer, computed in fp32, as a (B, 1, h, w) map."""
    e, d = e.float(), d.float()
    if e.ndim == 3:
        b, length, _ = e.shape
        side = math.isqrt(length)
        return (1 - F.cosine_similarity(e, d, dim=-1)).reshape(b, 1, side, side)
    return (1 - F.cosine_similarity(e, d, dim=1)).unsqueeze(1)


def naive_unblurred(enc, dec, out_size, *, align_corners=False, reduction="sum"):
    size = (out_size, out_size) if isinstance(out_size, int) else tuple(out_size)
    total = 0
    for e, d in zip(enc, dec, strict=True):
        m = _layer_distance(e, d)
        total = total + F.interpolate(m, size=size, mode="bilinear", align_corners=align_corners)
    if reduction == "mean":
        total = total / len(enc)
    return total[:, 0]


def naive_map(
    enc, dec, out_size, sigma=4.0, *, align_corners=False, reduction="sum", border="reflect"
):
    """The defining pipeline; the blur is scipy.ndimage.gaussian_filter per image."""
    m = naive_unblurred(enc, dec, out_size, align_corners=align_corners, reduction=reduction)
    if sigma == 0:
        return m.double()
    x = m.double().numpy()
    blurred = np.stack([ndi.gaussian_filter(img, sigma, mode=border) for img in x])
    return torch.from_numpy(blurred)


def torch_blur(x: torch.Tensor, sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """Differentiable separable Gaussian blur of (B, H, W) with scipy's reflect border."""
    radius = int(truncate * sigma + 0.5)
    k = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=x.dtype) / sigma) ** 2)
    k = k / k.sum()

    def reflect(n):
        j = torch.remainder(torch.arange(-radius, n + radius), 2 * n)
        return torch.where(j >= n, 2 * n - 1 - j, j)

    x = x.unsqueeze(1)
    x = F.conv2d(x.index_select(2, reflect(x.shape[2])), k.view(1, 1, -1, 1))
    x = F.conv2d(x.index_select(3, reflect(x.shape[3])), k.view(1, 1, 1, -1))
    return x[:, 0]


def _pair(shapes, batch, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    enc, dec = [], []
    for shape in shapes:
        e = torch.randn((batch, *shape), generator=g)
        d = 0.7 * e + torch.randn((batch, *shape), generator=g)
        enc.append(e.to(dtype))
        dec.append(d.to(dtype))
    return enc, dec


VIT = [(16, 8)] * 3  # (L, C) tokens on a 4x4 grid, three layers
PYRAMID = [(4, 8, 8), (6, 4, 4), (8, 2, 2)]  # (C, h, w) maps, CNN-style
MIXED = [(9, 5), (3, 4, 6), (5, 3, 5), (25, 4)]  # tokens and non-square maps


# ---------------------------------------------------------------------- equality tests


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("shapes", [VIT, PYRAMID, MIXED], ids=["tokens", "pyramid", "mixed"])
@pytest.mark.parametrize("align_corners", [False, True])
def test_matches_naive(batch, shapes, align_corners):
    enc, dec = _pair(shapes, batch)
    out = anomaly_map(enc, dec, (37, 53), sigma=4.0, align_corners=align_corners)
    assert out.shape == (batch, 37, 53) and out.dtype == torch.float32
    ref = naive_map(enc, dec, (37, 53), 4.0, align_corners=align_corners)
    torch.testing.assert_close(out.double(), ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("align_corners", [False, True])
def test_sigma_zero_is_plain_upsampling(align_corners):
    enc, dec = _pair(MIXED, 2)
    out = anomaly_map(enc, dec, 21, sigma=0, align_corners=align_corners)
    ref = naive_unblurred(enc, dec, 21, align_corners=align_corners)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    # ... and the blur does change the map
    assert (anomaly_map(enc, dec, 21, sigma=2.0) - out).abs().max() > 1e-3


def test_reduction_mean():
    enc, dec = _pair(PYRAMID, 3)
    out = anomaly_map(enc, dec, 16, sigma=1.5, reduction="mean")
    torch.testing.assert_close(
        out.double(), naive_map(enc, dec, 16, 1.5, reduction="mean"), atol=ATOL, rtol=0
    )
    summed = anomaly_map(enc, dec, 16, sigma=1.5, reduction="sum")
    torch.testing.assert_close(out * 3, summed, atol=ATOL, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kernel", ["elementwise", "gemm"])
def test_low_precision_inputs_accumulate_in_fp32(dtype, kernel):
    enc, dec = _pair(MIXED, 4, dtype=dtype)
    out = anomaly_map(enc, dec, (19, 23), sigma=2.0, cosine_kernel=kernel)
    assert out.dtype == torch.float32
    # reference computed in fp32 from the same low-precision inputs
    ref = naive_map(enc, dec, (19, 23), 2.0)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=0)


def test_mixed_dtypes_and_float64():
    enc, dec = _pair(VIT, 2, dtype=torch.float64)
    enc[1] = enc[1].float()
    dec[2] = dec[2].half()
    out = anomaly_map(enc, dec, 12, sigma=1.0)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), naive_map(enc, dec, 12, 1.0), atol=ATOL, rtol=0)


@pytest.mark.parametrize("kernel", ["auto", "elementwise", "gemm"])
def test_cosine_kernels_and_strided_inputs(kernel):
    base_e, base_d = _pair([(17, 8)], 3)  # 1 class token + 16 patch tokens
    enc = [base_e[0][:, 1:], torch.randn(3, 16, 8).transpose(0, 1).contiguous().transpose(0, 1)]
    dec = [base_d[0][:, 1:], torch.randn(3, 16, 8)]
    enc.append(torch.randn(3, 8, 4, 4).to(memory_format=torch.channels_last))  # NHWC map
    dec.append(torch.randn(3, 8, 4, 4))
    out = anomaly_map(enc, dec, 10, sigma=1.0, cosine_kernel=kernel)
    torch.testing.assert_close(out.double(), naive_map(enc, dec, 10, 1.0), atol=ATOL, rtol=0)


@pytest.mark.parametrize("budget", [8, 40, 100])
def test_chunked_reduction_matches(monkeypatch, budget):
    # Tiny chunk budgets force many row chunks, partial chunks and multi-image chunks.
    monkeypatch.setattr(scoring, "_CHUNK_ELEMS_CPU", budget)
    enc, dec = _pair([*PYRAMID, (25, 6)], 5)
    enc[0], dec[0] = enc[0].half(), dec[0].half()
    out = anomaly_map(enc, dec, (13, 9), sigma=1.0, cosine_kernel="elementwise")
    torch.testing.assert_close(out.double(), naive_map(enc, dec, (13, 9), 1.0), atol=ATOL, rtol=0)
    gemm = anomaly_map(enc, dec, (13, 9), sigma=1.0, cosine_kernel="gemm")
    torch.testing.assert_close(gemm, out, atol=ATOL, rtol=0)


def test_zero_vectors_follow_cosine_similarity_eps():
    enc, dec = _pair([(4, 3, 3)], 2)
    enc[0][0, :, 1, 1] = 0  # |e| = 0 -> cos = 0 (eps clamp), distance 1
    dec[0][1] = 0
    out = anomaly_map(enc, dec, 3, sigma=0)
    torch.testing.assert_close(out, naive_unblurred(enc, dec, 3), atol=ATOL, rtol=0)
    assert out[0, 1, 1] == pytest.approx(1.0) and torch.allclose(out[1], torch.ones(3, 3))


@pytest.mark.parametrize("layout", ["tokens", "maps"])
def test_tiny_norms_follow_cosine_similarity_eps(layout):
    enc, dec = _pair([(9, 4)] if layout == "tokens" else [(4, 3, 3)], 2)
    scale = torch.logspace(-12, 0, 9).view(1, 9, 1)  # norms around and below eps=1e-8
    if layout == "tokens":
        enc[0] = enc[0] * scale
        dec[0] = dec[0] * scale.flip(1)
    else:
        enc[0] = enc[0] * scale.view(1, 1, 3, 3)
        dec[0] = dec[0] * scale.flip(1).view(1, 1, 3, 3)
    for kernel in ("elementwise", "gemm"):
        out = anomaly_map(enc, dec, 3, sigma=0, cosine_kernel=kernel)
        torch.testing.assert_close(out, naive_unblurred(enc, dec, 3), atol=ATOL, rtol=0)


def test_same_size_output_is_scipy_gaussian_filter_for_every_border():
    enc, dec = _pair([(3, 11, 7)], 2)
    dist = _layer_distance(enc[0], dec[0])[:, 0].double().numpy()
    for border in BORDER_MODES:
        out = anomaly_map(enc, dec, (11, 7), sigma=1.7, border=border)
        ref = np.stack([ndi.gaussian_filter(x, 1.7, mode=border) for x in dist])
        np.testing.assert_allclose(out.numpy(), ref, atol=ATOL, err_msg=border)


@pytest.mark.parametrize("border", BORDER_MODES)
@pytest.mark.parametrize("n", [1, 2, 5, 40])
@pytest.mark.parametrize("sigma", [0.6, 4.0])
def test_blur_matrix_is_scipy_gaussian_filter1d(border, n, sigma):
    x = np.random.default_rng(n).standard_normal(n)
    g = gaussian_blur_matrix(n, sigma, border=border).numpy()
    ref = ndi.gaussian_filter1d(x, sigma, mode=border, truncate=4.0)
    np.testing.assert_allclose(g @ x, ref, atol=1e-12)
    if border != "constant":
        np.testing.assert_allclose(g.sum(axis=1), 1.0, atol=1e-12)  # rows are averages


def test_blur_truncate():
    x = np.random.default_rng(0).standard_normal(30)
    g = gaussian_blur_matrix(30, 2.0, truncate=1.3).numpy()
    np.testing.assert_allclose(g @ x, ndi.gaussian_filter1d(x, 2.0, truncate=1.3), atol=1e-12)
    assert np.count_nonzero(g[15]) == 2 * int(1.3 * 2.0 + 0.5) + 1


@pytest.mark.parametrize("align_corners", [False, True])
def test_interpolation_matrix_is_separable_bilinear(align_corners):
    x = torch.randn(2, 1, 5, 7, dtype=torch.float64)
    ref = F.interpolate(x, size=(13, 4), mode="bilinear", align_corners=align_corners)
    u_h = interpolation_matrix(5, 13, align_corners=align_corners)
    u_w = interpolation_matrix(7, 4, align_corners=align_corners)
    torch.testing.assert_close(u_h @ x[:, 0] @ u_w.T, ref[:, 0], atol=1e-12, rtol=0)


def test_operator_cache():
    clear_operator_cache()
    a = axis_operator(4, 9, 1.0)
    assert axis_operator(4, 9, 1.0) is a  # cached constant
    assert axis_operator(4, 9, 1.0, align_corners=True) is not a
    assert a.shape == (9, 4) and a.dtype == torch.float32
    clear_operator_cache()
    b = axis_operator(4, 9, 1.0)
    assert b is not a and torch.equal(a, b)


def test_autograd_matches_naive_and_inference_mode_cache():
    clear_operator_cache()
    enc, dec = _pair(MIXED, 2, dtype=torch.float64)
    with torch.inference_mode():  # builds the cached operators inside inference mode
        anomaly_map(enc, dec, 9, sigma=1.0)
    e1 = [t.clone().requires_grad_() for t in enc]
    e2 = [t.clone().requires_grad_() for t in enc]
    out = anomaly_map(e1, dec, 9, sigma=1.0)
    ref = torch_blur(naive_unblurred(e2, dec, 9).double(), 1.0)
    torch.testing.assert_close(out.double(), ref, atol=ATOL, rtol=0)
    w = torch.randn(out.shape, dtype=torch.float64)
    (out.double() * w).sum().backward()
    (ref * w).sum().backward()
    for a, b in zip(e1, e2, strict=True):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4)


def test_torch_blur_reference_is_scipy():
    # the differentiable reference used above is itself scipy's reflect filter
    x = torch.randn(2, 20, 9, dtype=torch.float64)
    ref = np.stack([ndi.gaussian_filter(a, 1.5) for a in x.numpy()])
    np.testing.assert_allclose(torch_blur(x, 1.5).numpy(), ref, atol=1e-12)


# ------------------------------------------------------------------------- error paths


def _ok():
    return _pair(VIT, 2)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda e, d: ([], []), "at least one layer"),
        (lambda e, d: (e, d[:2]), "3 encoded but 2 decoded"),
        (lambda e, d: (e, [d[0], d[1], d[2][:, :, :4]]), "layer 2: encoded shape"),
        (lambda e, d: ([e[0], e[1][:1]], [d[0], d[1][:1]]), "batch size 1 != 2"),
        (lambda e, d: ([torch.randn(2, 17, 8)], [torch.randn(2, 17, 8)]), "class"),
        (lambda e, d: ([torch.randn(2, 1, 4, 4, 4)], [torch.randn(2, 1, 4, 4, 4)]), "expected"),
        (lambda e, d: (e[0], d[0]), "sequences"),
        (lambda e, d: ([torch.randn(2, 0, 8)], [torch.randn(2, 0, 8)]), "empty"),
        (lambda e, d: ([torch.randn(2, 3, 0, 4)], [torch.randn(2, 3, 0, 4)]), "empty"),
    ],
)
def test_input_errors(make, match):
    enc, dec = make(*_ok())
    with pytest.raises(ValueError, match=match):
        anomaly_map(enc, dec, 8)


@pytest.mark.parametrize("out_size", [0, -3, (4,), (4, 0), (2.5, 3), True, "8", None])
def test_bad_out_size(out_size):
    with pytest.raises(ValueError, match="out_size"):
        anomaly_map(*_ok(), out_size)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sigma": -1.0}, "sigma"),
        ({"sigma": float("nan")}, "sigma"),
        ({"truncate": 0.0}, "truncate"),
        ({"reduction": "max"}, "reduction"),
        ({"border": "zeros"}, "border"),
        ({"cosine_kernel": "triton"}, "cosine_kernel"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        anomaly_map(*_ok(), 8, **kwargs)


def test_non_float_features():
    e = torch.ones(2, 4, 3, dtype=torch.int64)
    with pytest.raises(TypeError, match="floating"):
        anomaly_map([e], [e], 4)


# ------------------------------------------------------------------------- image score


def test_image_score_modes():
    amap = torch.rand(3, 6, 5)
    amap[1, 2, 3] = 7.0
    torch.testing.assert_close(image_score(amap), amap.flatten(1).amax(1))
    assert image_score(amap, "max")[1] == 7.0
    top3 = amap.flatten(1).sort(dim=1, descending=True).values[:, :3].mean(1)
    torch.testing.assert_close(image_score(amap, "topk_mean", k=3), top3)
    torch.testing.assert_close(image_score(amap, "topk_mean", k=0.1), top3)  # int(0.1*30) = 3
    torch.testing.assert_close(image_score(amap, "topk_mean", k=1), image_score(amap))
    torch.testing.assert_close(image_score(amap, "topk_mean", k=1.0), amap.flatten(1).mean(1))
    torch.testing.assert_close(image_score(amap, "topk_mean", k=1e-4), image_score(amap))
    top4 = amap.flatten(1).sort(dim=1, descending=True).values[:, :4].mean(1)
    torch.testing.assert_close(image_score(amap, "topk_mean", k=0.15), top4)  # int(4.5) = 4


@pytest.mark.parametrize(
    "args, match",
    [
        (("topk_mean", 0), "between 1"),
        (("topk_mean", 31), "between 1"),
        (("topk_mean", 0.0), r"\(0, 1\]"),
        (("topk_mean", 1.5), r"\(0, 1\]"),
        (("topk_mean", True), "int count"),
        (("median", 3), "mode"),
    ],
)
def test_image_score_errors(args, match):
    with pytest.raises(ValueError, match=match):
        image_score(torch.rand(2, 6, 5), *args)
    with pytest.raises(ValueError, match="shape"):
        image_score(torch.rand(5))


# ------------------------------------------------------------------------ tracing


def _traceable(out_size, sigma, reduction, mode):
    def score(e0, d0, e1, d1):
        amap = anomaly_map([e0, e1], [d0, d1], out_size, sigma=sigma, reduction=reduction)
        return amap, image_score(amap, mode, k=0.05)

    return score


@pytest.mark.parametrize(("reduction", "mode"), [("sum", "max"), ("mean", "topk_mean")])
def test_traced_anomaly_map_has_a_free_batch_and_keeps_the_numbers(reduction, mode):
    def features(batch, seed):
        g = torch.Generator().manual_seed(seed)
        e = [torch.randn(batch, 16, 8, 8, generator=g), torch.randn(batch, 16, 12, generator=g)]
        return [t for x in e for t in (x, x + 0.5 * torch.randn(x.shape, generator=g))]

    fn = _traceable((32, 24), 2.0, reduction, mode)
    for n in (8, 4):  # operators built before tracing: constants in the graph
        axis_operator(n, 32, 2.0), axis_operator(n, 24, 2.0)
    with torch.no_grad():
        traced = torch.jit.trace(fn, tuple(features(2, 0)), check_trace=False)
        for batch in (1, 3):
            inputs = features(batch, batch)
            for got, want in zip(traced(*inputs), fn(*inputs), strict=True):
                assert got.shape[0] == batch
                torch.testing.assert_close(got, want, rtol=0, atol=ATOL)


def test_tracing_refuses_an_operator_built_inside_the_trace():
    clear_operator_cache()
    e = torch.randn(2, 8, 4, 4)
    with torch.no_grad(), pytest.raises(RuntimeError, match="before tracing"):
        torch.jit.trace(_traceable(16, 1.0, "sum", "max"), (e, e + 1, e, e - 1))
