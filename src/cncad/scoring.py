"""Fused cosine anomaly scoring for reverse-distillation style detectors.

Every RD-style model (CNC eq. 17, RD4AD, Dinomaly, ...) turns per-layer encoder features
``e_i`` and decoder reconstructions ``d_i`` into a pixel anomaly map the same way::

    M = blur( sum_i upsample( 1 - cos(e_i, d_i) ) )

The usual implementation calls `torch.nn.functional.cosine_similarity` per layer
(which makes normalised copies of both feature tensors), upsamples every layer to the
full output resolution, sums, then blurs with a 2-D kernel: several full-resolution
temporaries per layer and many kernel launches. [`anomaly_map`][cncad.scoring.anomaly_map] computes
the *same* map in plain PyTorch (no Triton, no ``torch.compile``; CPU, CUDA, MPS alike) with one
streaming pass over the features and two small matrix products per distinct grid size.

How it works (and why it is exact):

1. Cosine, one pass over memory. For every token the dot product ``e.d`` and the norms
   ``|e|``, ``|d|`` are reduced over channels chunk by chunk: each chunk is read from
   memory once and the other reductions re-read it from cache; no normalised copies,
   no full-size temporaries (``cosine_kernel="elementwise"``, the default on CPU/MPS).
   On CUDA the default ``"gemm"`` kernel gets the dot products from block-diagonal
   batched GEMMs and the norms from ``vector_norm`` (two reads, no temporaries). Sums
   accumulate in fp32 (fp16/bf16 inputs are widened to fp32, where their products are
   exact; fp64 inputs in fp64). The formula is the one of ``F.cosine_similarity``:
   ``e.d / (max(|e|, eps) * max(|d|, eps))`` with ``eps=1e-8``.
2. Everything after the cosine is linear. Bilinear upsampling to a given size is a
   tensor product of two 1-D interpolations, ``U_h @ S @ U_w.T``, and a separable
   Gaussian blur with an index-only border rule is ``G_H @ X @ G_W.T``. Hence the whole
   "upsample then blur" of a ``(h, w)`` grid is ``A_h @ S @ A_w.T`` with the fixed
   ``(H x h)`` matrix ``A_h = G_H @ U_h`` (and likewise ``A_w``). The matrices are built
   once in float64 and cached (see below).
3. Layers that share a grid size are summed (or averaged) *before* the products (as
   ``count - sum_i cos_i``, one subtraction per grid rather than per layer); the
   contributions of the different grid sizes are added inside one final GEMM
   ``[A_h1 S_1 | A_h2 S_2 | ...] @ [A_w1.T ; A_w2.T ; ...]`` that writes the output.
   No per-layer full-resolution tensor is ever formed: the only full-size tensor is
   the output.

Exactness conditions (the fused result equals the naive pipeline up to fp32 rounding,
about 1e-6 relative; the tests check 1e-5 absolute):

* Upsampling is ``F.interpolate(..., size=out_size, mode="bilinear",
  align_corners=align_corners)`` with ``antialias=False``, given by *size* (not by
  ``scale_factor``, whose ``recompute_scale_factor`` semantics differ). Both values of
  ``align_corners`` are exact: the interpolation matrices are obtained by running
  ``F.interpolate`` itself on an identity matrix (in float64).
* The blur is the separable Gaussian of `scipy.ndimage.gaussian_filter`: std
  ``sigma`` on both axes, 1-D kernel ``exp(-x^2 / (2 sigma^2))`` for
  ``|x| <= int(truncate * sigma + 0.5)``, normalised to sum 1, applied along H then W,
  at output resolution, with a border rule that depends only on indices: ``"reflect"``
  (scipy's default, ``d c b a | a b c d``), ``"mirror"`` (``d c b | a b c d``),
  ``"nearest"``, ``"wrap"`` or ``"constant"`` (zero padding, scipy's ``cval=0``). A
  non-zero ``cval`` would make the blur affine rather than linear and is not offered.
  Kernels wider than the image are handled as scipy does (repeated reflections).
  ``sigma=0`` means no blur.
* Summing layers before the products uses linearity, exact in real arithmetic; in
  floating point it only changes the rounding order.
* Matrix products follow PyTorch's precision settings. On CUDA with TF32 matmuls enabled
  (``torch.backends.cuda.matmul.allow_tf32`` / ``set_float32_matmul_precision`` below
  ``"highest"``, both off by default) the two small spatial products are rounded to
  TF32 (~1e-3 relative); the ``"gemm"`` cosine kernel is then not used by ``"auto"``.
  Autocast is disabled inside [`anomaly_map`][cncad.scoring.anomaly_map] so it never lowers the
  precision.

Cache: the per-axis operators ``A`` are cached in a small LRU cache (64 entries) keyed by
``(in_size, out_size, sigma, truncate, align_corners, border, device, dtype)``
([`clear_operator_cache`][cncad.scoring.clear_operator_cache] empties it). They are pure constants:
the cache never changes a result, it only avoids rebuilding the same matrices. The only other module
state is a memo of whether ``torch.bmm(..., out_dtype=)`` exists on CUDA, which selects
between two exact ways of computing the same products.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from functools import lru_cache
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from cncad._precision import autocast_disabled
from cncad._tracing import prebuilt, tracing

__all__ = [
    "BORDER_MODES",
    "anomaly_map",
    "axis_operator",
    "clear_operator_cache",
    "gaussian_blur_matrix",
    "image_score",
    "interpolation_matrix",
]

BorderMode = Literal["reflect", "mirror", "nearest", "wrap", "constant"]
BORDER_MODES: tuple[str, ...] = ("reflect", "mirror", "nearest", "wrap", "constant")

_EPS = 1e-8  # default eps of F.cosine_similarity
# Elements of one feature tensor processed per chunk by the elementwise cosine kernel.
# On CPU a chunk (with its product buffer) stays in L2/L3 cache, so the three reductions
# re-read it from cache rather than from memory. On accelerators bigger chunks mean
# fewer kernel launches; the chunk bounds the temporary memory.
_CHUNK_ELEMS_CPU = 1 << 19
_CHUNK_ELEMS_OTHER = 1 << 23
_LOW_PRECISION = (torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------
# Per-axis linear operators (constants, cached)
# --------------------------------------------------------------------------------------


def _border_index(idx: Tensor, n: int, border: str) -> Tensor:
    """Maps (possibly out-of-range) integer indices into ``[0, n)`` by a border rule.

    Returns -1 where the rule is ``"constant"`` and the index falls outside.
    """
    if border == "reflect":  # half-sample symmetric: d c b a | a b c d | d c b a
        period = 2 * n
        j = torch.remainder(idx, period)
        return torch.where(j >= n, period - 1 - j, j)
    if border == "mirror":  # whole-sample symmetric: d c b | a b c d | c b a
        if n == 1:
            return torch.zeros_like(idx)
        period = 2 * n - 2
        j = torch.remainder(idx, period)
        return torch.where(j >= n, period - j, j)
    if border == "nearest":
        return idx.clamp(0, n - 1)
    if border == "wrap":
        return torch.remainder(idx, n)
    if border == "constant":
        return torch.where((idx >= 0) & (idx < n), idx, torch.full_like(idx, -1))
    raise ValueError(f"border must be one of {BORDER_MODES}, got {border!r}")


def gaussian_blur_matrix(
    n: int, sigma: float, *, truncate: float = 4.0, border: BorderMode = "reflect"
) -> Tensor:
    """The ``(n, n)`` float64 matrix of a 1-D Gaussian blur with a border rule.

    ``G @ x`` equals ``scipy.ndimage.gaussian_filter1d(x, sigma, mode=border,
    truncate=truncate)`` (with ``cval=0`` for ``"constant"``): kernel
    ``exp(-k^2 / (2 sigma^2))`` for ``|k| <= int(truncate * sigma + 0.5)``, normalised to
    sum 1. ``sigma=0`` gives the identity.

    Args:
        n: Signal length (> 0).
        sigma: Standard deviation in samples (>= 0).
        truncate: Kernel radius in standard deviations (> 0).
        border: Border rule, one of [`BORDER_MODES`][cncad.scoring.BORDER_MODES].

    Returns:
        Tensor of shape ``(n, n)``, dtype float64, on CPU.
    """
    if border not in BORDER_MODES:
        raise ValueError(f"border must be one of {BORDER_MODES}, got {border!r}")
    if sigma == 0:
        return torch.eye(n, dtype=torch.float64)
    radius = int(truncate * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    weights = torch.exp(-0.5 / (sigma * sigma) * offsets**2)
    weights = weights / weights.sum()
    rows = torch.arange(n).unsqueeze(1)
    cols = _border_index(rows + torch.arange(-radius, radius + 1).unsqueeze(0), n, border)
    w = weights.unsqueeze(0).expand(n, -1)
    keep = cols >= 0  # only "constant" drops taps
    g = torch.zeros(n, n, dtype=torch.float64)
    g.index_put_((rows.expand_as(cols)[keep], cols[keep]), w[keep], accumulate=True)
    return g


def interpolation_matrix(in_size: int, out_size: int, *, align_corners: bool = False) -> Tensor:
    """The ``(out_size, in_size)`` float64 matrix of 1-D bilinear (linear) resampling.

    Built by running ``F.interpolate(mode="bilinear", antialias=False)`` on an identity,
    so it follows PyTorch's own index convention for both values of ``align_corners``.

    Args:
        in_size: Input length (> 0).
        out_size: Output length (> 0).
        align_corners: As in `torch.nn.functional.interpolate`.

    Returns:
        Tensor ``U`` of shape ``(out_size, in_size)``, float64 on CPU, such that the
        bilinear resize of an ``(h, w)`` image ``X`` is ``U_h @ X @ U_w.T``.
    """
    eye = torch.eye(in_size, dtype=torch.float64).reshape(in_size, 1, in_size, 1)
    out = F.interpolate(eye, size=(out_size, 1), mode="bilinear", align_corners=align_corners)
    return out[:, 0, :, 0].T.contiguous()


@lru_cache(maxsize=64)
def _cached_operator(
    in_size: int,
    out_size: int,
    sigma: float,
    truncate: float,
    align_corners: bool,
    border: str,
    device: torch.device,
    dtype: torch.dtype,
) -> Tensor:
    # Plain tensors (not inference tensors) even when first built under inference_mode,
    # so that they can later take part in autograd graphs.
    with torch.inference_mode(False), torch.no_grad():
        u = interpolation_matrix(in_size, out_size, align_corners=align_corners)
        g = gaussian_blur_matrix(out_size, sigma, truncate=truncate, border=border)  # type: ignore[arg-type]
        return (g @ u).to(dtype).to(device)


def axis_operator(
    in_size: int,
    out_size: int,
    sigma: float = 4.0,
    *,
    truncate: float = 4.0,
    align_corners: bool = False,
    border: BorderMode = "reflect",
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """The cached ``(out_size, in_size)`` "bilinear upsample then Gaussian blur" operator.

    ``A = G @ U`` with ``U`` from [`interpolation_matrix`][cncad.scoring.interpolation_matrix] and
    ``G`` from [`gaussian_blur_matrix`][cncad.scoring.gaussian_blur_matrix], computed in float64 and
    rounded once to ``dtype``. The returned tensor is shared by the cache: do not modify it in
    place.

    Args:
        in_size: Grid length along the axis.
        out_size: Output length along the axis.
        sigma: Gaussian std in output pixels (0: no blur).
        truncate: Kernel radius in standard deviations.
        align_corners: Bilinear convention, as in ``F.interpolate``.
        border: Blur border rule, one of [`BORDER_MODES`][cncad.scoring.BORDER_MODES].
        device: Device of the returned matrix.
        dtype: Dtype of the returned matrix.

    Returns:
        Tensor of shape ``(out_size, in_size)``.
    """
    return _cached_operator(
        *_operator_key(
            in_size,
            out_size,
            sigma,
            truncate=truncate,
            align_corners=align_corners,
            border=border,
            device=device,
            dtype=dtype,
        )
    )


def _operator_key(
    in_size: int,
    out_size: int,
    sigma: float,
    *,
    truncate: float = 4.0,
    align_corners: bool = False,
    border: str = "reflect",
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple:
    """The arguments of ``_cached_operator`` (its cache key) for those of `axis_operator`."""
    return (
        int(in_size),
        int(out_size),
        float(sigma),
        float(truncate),
        bool(align_corners),
        str(border),
        torch.device(device),
        dtype,
    )


def clear_operator_cache() -> None:
    """Empties the cache of per-axis operators (frees their memory)."""
    _cached_operator.cache_clear()


# --------------------------------------------------------------------------------------
# Cosine distance
# --------------------------------------------------------------------------------------


def _as_bnc(x: Tensor, where: str) -> tuple[Tensor, int, int]:
    """Views a layer as ``(B, N, C)`` (no copy for usual layouts); returns ``(view, h, w)``."""
    if x.ndim == 3:
        n = x.shape[1]
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(
                f"{where}: token input of shape {tuple(x.shape)} has L={n} tokens, which is "
                "not a perfect square; pass patch tokens only (strip the class/register "
                "tokens) or a (B, C, h, w) map"
            )
        return x, side, side
    if x.ndim == 4:
        h, w = x.shape[2:]
        return x.flatten(2).transpose(1, 2), h, w
    raise ValueError(
        f"{where}: expected (B, L, C) tokens or a (B, C, h, w) map, got shape {tuple(x.shape)}"
    )


def _chunks(b: int, n: int, c: int, budget: int) -> Iterator[tuple[slice, slice]]:
    """Splits the (B, N) rows into chunks of about ``budget`` elements of C channels."""
    rows = max(1, budget // max(c, 1))
    if n <= rows:
        step = max(1, rows // n)
        for b0 in range(0, b, step):
            yield slice(b0, min(b, b0 + step)), slice(0, n)
    else:
        if rows > 16:
            rows -= rows % 16
        for b0 in range(b):
            for n0 in range(0, n, rows):
                yield slice(b0, b0 + 1), slice(n0, min(n, n0 + rows))


def _empty_like_layout(shape: tuple[int, int, int], rowmajor: bool, dtype, device) -> Tensor:
    """A dense buffer of logical shape (bs, n, C) laid out like the input chunk."""
    bs, n, c = shape
    if rowmajor:
        return torch.empty(bs, n, c, dtype=dtype, device=device)
    return torch.empty(bs, c, n, dtype=dtype, device=device).transpose(1, 2)


def _cos_terms_elementwise(e: Tensor, d: Tensor, acc: torch.dtype, budget: int):
    """Returns ``dot, |e|, |d|`` of shape (B, N) via cache-sized chunks (no autograd)."""
    b, n, c = e.shape
    dev = e.device
    dot = torch.empty(b, n, dtype=acc, device=dev)
    ne = torch.empty(b, n, dtype=acc, device=dev)
    nd = torch.empty(b, n, dtype=acc, device=dev)
    # Channel-contiguous rows: norms via vector_norm (one fast inner reduction). Channels
    # strided (NCHW maps): squared sums via product buffer + outer reduction, which is
    # much faster on CPU than a strided vector_norm.
    rowmajor = e.stride(2) == 1 and d.stride(2) == 1
    bufs: dict[tuple[int, int], tuple[Tensor, Tensor | None, Tensor | None]] = {}
    for bsl, nsl in _chunks(b, n, c, budget):
        ec, dc = e[bsl, nsl], d[bsl, nsl]
        key = (ec.shape[0], ec.shape[1])
        if key not in bufs:
            shape = (key[0], key[1], c)
            prod = _empty_like_layout(shape, rowmajor, acc, dev)
            ebuf = _empty_like_layout(shape, rowmajor, acc, dev) if e.dtype != acc else None
            dbuf = _empty_like_layout(shape, rowmajor, acc, dev) if d.dtype != acc else None
            bufs[key] = (prod, ebuf, dbuf)
        prod, ebuf, dbuf = bufs[key]
        if ebuf is not None:
            ec = ebuf.copy_(ec)
        if dbuf is not None:
            dc = dbuf.copy_(dc)
        o_dot, o_ne, o_nd = dot[bsl, nsl], ne[bsl, nsl], nd[bsl, nsl]
        # The first reads of a chunk come from memory, the later ones from cache; the
        # cheap norm reductions go first so that the memory-bound part is fastest.
        if rowmajor:
            torch.linalg.vector_norm(ec, dim=-1, out=o_ne)
            torch.linalg.vector_norm(dc, dim=-1, out=o_nd)
        else:
            torch.sum(torch.mul(ec, ec, out=prod), dim=-1, out=o_ne)
            torch.sum(torch.mul(dc, dc, out=prod), dim=-1, out=o_nd)
        torch.sum(torch.mul(ec, dc, out=prod), dim=-1, out=o_dot)
    if not rowmajor:
        ne.sqrt_()
        nd.sqrt_()
    return dot, ne, nd


def _mergeable_rows(x: Tensor) -> bool:
    """Whether the (B, N) rows of a (B, N, C) view form one uniform stride (no copy)."""
    return x.stride(2) == 1 and (x.shape[0] == 1 or x.stride(0) == x.shape[1] * x.stride(1))


def _block_size(rows: int) -> int:
    for g in (16, 8, 4, 2):
        if rows % g == 0:
            return g
    return 1


_BMM_OUT_DTYPE_OK: dict[str, bool] = {}


def _cos_terms_gemm(e: Tensor, d: Tensor, acc: torch.dtype, budget: int):
    """Returns ``dot, |e|, |d|`` with the dot product as block-diagonal batched GEMMs.

    Rows are grouped in blocks of ``g``; ``bmm`` of the ``(g, C)`` blocks gives ``g x g``
    products whose diagonals are the dot products. Each feature tensor is read once by
    the GEMM and once by ``vector_norm``; no product temporary is written. Requires
    channel-contiguous rows with a uniform row stride (checked by the caller).
    """
    b, n, c = e.shape
    rows = b * n
    ef = e.as_strided((rows, c), (e.stride(1), 1))
    df = d.as_strided((rows, c), (d.stride(1), 1))
    g = _block_size(rows)
    eb = ef.unflatten(0, (rows // g, g))  # (rows / g, g, C), still a view
    db = df.unflatten(0, (rows // g, g))
    blocks = None
    if e.dtype == d.dtype == acc:
        blocks = torch.bmm(eb, db.transpose(1, 2))
    elif (
        e.dtype == d.dtype
        and e.dtype in _LOW_PRECISION
        and e.device.type == "cuda"
        and _BMM_OUT_DTYPE_OK.get(e.device.type, True)
    ):
        # fp16/bf16 GEMM with fp32 output: fp32 accumulation of exact products.
        try:
            blocks = torch.bmm(eb, db.transpose(1, 2), out_dtype=acc)
            _BMM_OUT_DTYPE_OK[e.device.type] = True
        except (TypeError, RuntimeError, NotImplementedError):
            _BMM_OUT_DTYPE_OK[e.device.type] = False
    if blocks is None:  # widen in chunks (keeps the temporaries small)
        parts = []
        step = max(g, (budget // max(c, 1)) // g * g)
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            ec = eb[r0 // g : r1 // g].to(acc)
            dc = db[r0 // g : r1 // g].to(acc)
            parts.append(torch.bmm(ec, dc.transpose(1, 2)))
        blocks = torch.cat(parts)
    dot = blocks.diagonal(dim1=1, dim2=2)  # (rows / g, g) strided view, no copy
    ne = torch.linalg.vector_norm(e, dim=-1, dtype=acc).view(rows // g, g)
    nd = torch.linalg.vector_norm(d, dim=-1, dtype=acc).view(rows // g, g)
    return dot, ne, nd


def _tf32_matmul_enabled() -> bool:
    try:
        if torch.backends.cuda.matmul.allow_tf32:
            return True
    except AttributeError:  # pragma: no cover - very old or exotic builds
        pass
    return torch.get_float32_matmul_precision() != "highest"


def _cosine(e: Tensor, d: Tensor, kernel: str, budget: int, whole: bool = False) -> Tensor:
    """Cosine similarity over the channel axis of two (B, N, C) views: (B, N), fp32 or fp64.

    ``whole``: use the whole-tensor branch (as under autograd), e.g. while tracing.
    """
    b, n, _ = e.shape
    acc = torch.float64 if torch.float64 in (e.dtype, d.dtype) else torch.float32
    if whole or (torch.is_grad_enabled() and (e.requires_grad or d.requires_grad)):
        # Differentiable and traceable path (same formula, whole tensors, no in-place
        # updates, no loops over the batch).
        ea, da = e.to(acc), d.to(acc)
        dot = (ea * da).sum(-1)
        ne = torch.linalg.vector_norm(ea, dim=-1)
        nd = torch.linalg.vector_norm(da, dim=-1)
        return dot / (ne.clamp_min(_EPS) * nd.clamp_min(_EPS))
    use_gemm = kernel == "gemm" or (
        kernel == "auto"
        and e.device.type == "cuda"
        and not (acc == torch.float32 and _tf32_matmul_enabled())
    )
    if use_gemm and _mergeable_rows(e) and _mergeable_rows(d):
        dot, ne, nd = _cos_terms_gemm(e, d, acc, budget)
    else:
        dot, ne, nd = _cos_terms_elementwise(e, d, acc, budget)
    # dot / (max(|e|, eps) * max(|d|, eps)), as F.cosine_similarity; few, in-place ops.
    denom = ne.clamp_min_(_EPS).mul_(nd.clamp_min_(_EPS))
    return torch.div(dot, denom, out=denom).view(b, n)


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------


def _parse_out_size(out_size: int | tuple[int, int]) -> tuple[int, int]:
    def ok(v: object) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v > 0

    if ok(out_size):
        return int(out_size), int(out_size)  # type: ignore[arg-type]
    if isinstance(out_size, (tuple, list)) and len(out_size) == 2 and all(map(ok, out_size)):
        return int(out_size[0]), int(out_size[1])
    raise ValueError(f"out_size must be a positive int or a pair (H, W) of them, got {out_size!r}")


def anomaly_map(
    encoded: Sequence[Tensor],
    decoded: Sequence[Tensor],
    out_size: int | tuple[int, int],
    sigma: float = 4.0,
    reduction: Literal["sum", "mean"] = "sum",
    *,
    align_corners: bool = False,
    truncate: float = 4.0,
    border: BorderMode = "reflect",
    cosine_kernel: Literal["auto", "elementwise", "gemm"] = "auto",
) -> Tensor:
    """Pixel anomaly map ``blur(sum_i upsample(1 - cos(e_i, d_i)))`` (CNC eq. 17).

    Equal (up to fp32 rounding) to the naive pipeline: per layer
    ``1 - F.cosine_similarity(e, d, dim=channel)``, then
    ``F.interpolate(size=out_size, mode="bilinear", align_corners=align_corners)``, sum
    (or mean) over layers, then ``scipy.ndimage.gaussian_filter(sigma, mode=border,
    truncate=truncate)`` on each image; but computed with one streaming pass over the
    features, no normalised copies and no per-layer full-resolution tensors. See the
    module docstring for the exactness conditions.

    Args:
        encoded: Per-layer encoder features, each ``(B, L, C)`` patch tokens on a square
            grid (``L = h * h``; strip class/register tokens first) or a ``(B, C, h, w)``
            map. Layers may differ in grid size, width and floating dtype; fp16/bf16 are
            accumulated in fp32.
        decoded: Per-layer reconstructions, same shapes as ``encoded`` (pairwise).
        out_size: Output size ``H`` (square) or ``(H, W)``.
        sigma: Gaussian std in output pixels; 0 disables the blur.
        reduction: ``"sum"`` (eq. 17) or ``"mean"`` over layers.
        align_corners: Bilinear convention, as in ``F.interpolate``.
        truncate: Blur radius ``int(truncate * sigma + 0.5)`` (scipy's default 4.0).
        border: Blur border rule: ``"reflect"`` (scipy's default, ``d c b a | a b c d``),
            ``"mirror"``, ``"nearest"``, ``"wrap"`` or ``"constant"`` (zeros).
        cosine_kernel: How the channel reductions run; a speed knob only. ``"elementwise"``:
            cache-sized chunks (best on CPU); ``"gemm"``: dot products as block-diagonal
            batched GEMMs plus ``vector_norm`` (fewest memory passes; for contiguous
            channel-last tokens, otherwise falls back; with TF32 matmuls enabled it rounds
            the dot products to TF32); ``"auto"``: ``"gemm"`` on CUDA unless TF32 matmuls
            are enabled, else ``"elementwise"``.

    Returns:
        Tensor of shape ``(B, H, W)``, float32, on the device of the inputs. Differentiable
        with respect to the features when autograd is on and they require grad. Traceable
        (``torch.jit.trace``, ``torch.onnx.export``) with a free batch size: while tracing
        it takes whole-tensor operations and applies ``A_h @ S @ A_w.T`` per grid; the
        operators must then already be in the cache (call
        [`axis_operator`][cncad.scoring.axis_operator] with the same arguments first).

    Raises:
        ValueError: On empty or unequal-length sequences, mismatched shapes or batch
            sizes, non-square token counts, bad ``out_size``, ``sigma``, ``truncate``,
            ``reduction``, ``border`` or ``cosine_kernel``.
        TypeError: On non-floating or complex features, or features on several devices.
        RuntimeError: While tracing, an operator that is not in the cache yet.

    Examples:
        A CNN reverse-distillation model with a 3-level pyramid at 256x256 input::

            enc = [torch.randn(8, 256, 64, 64), torch.randn(8, 512, 32, 32),
                   torch.randn(8, 1024, 16, 16)]            # teacher features
            dec = [f + 0.1 * torch.randn_like(f) for f in enc]  # student output
            amap = anomaly_map(enc, dec, out_size=256, sigma=4)  # (8, 256, 256)
            score = image_score(amap, "max")                     # (8,)

        A ViT model (CLS token stripped): ``anomaly_map([t[:, 1:] for t in enc_tokens],
        [t[:, 1:] for t in dec_tokens], 224)``.
    """
    if isinstance(encoded, Tensor) or isinstance(decoded, Tensor):
        raise ValueError("encoded and decoded must be sequences of per-layer tensors")
    encoded, decoded = list(encoded), list(decoded)
    if not encoded or not decoded:
        raise ValueError("encoded and decoded must contain at least one layer")
    if len(encoded) != len(decoded):
        raise ValueError(f"got {len(encoded)} encoded but {len(decoded)} decoded layers")
    height, width = _parse_out_size(out_size)
    sigma = float(sigma)
    if not math.isfinite(sigma) or sigma < 0:
        raise ValueError(f"sigma must be a finite number >= 0, got {sigma}")
    truncate = float(truncate)
    if not math.isfinite(truncate) or truncate <= 0:
        raise ValueError(f"truncate must be a finite number > 0, got {truncate}")
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    if border not in BORDER_MODES:
        raise ValueError(f"border must be one of {BORDER_MODES}, got {border!r}")
    if cosine_kernel not in ("auto", "elementwise", "gemm"):
        raise ValueError(
            f"cosine_kernel must be 'auto', 'elementwise' or 'gemm', got {cosine_kernel!r}"
        )

    device = encoded[0].device
    batch = None
    pairs = []
    for i, (e, d) in enumerate(zip(encoded, decoded, strict=True)):
        for name, t in (("encoded", e), ("decoded", d)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name}[{i}] is not a tensor")
            if not t.is_floating_point():
                raise TypeError(f"{name}[{i}] must be a real floating tensor, got {t.dtype}")
            if t.device != device:
                raise TypeError(f"all features must be on one device: {t.device} != {device}")
        if e.shape != d.shape:
            raise ValueError(
                f"layer {i}: encoded shape {tuple(e.shape)} != decoded shape {tuple(d.shape)}"
            )
        e3, h, w = _as_bnc(e, f"layer {i}")
        d3, _, _ = _as_bnc(d, f"layer {i}")
        if batch is None:
            batch = e3.shape[0]
        elif e3.shape[0] != batch:
            raise ValueError(f"layer {i}: batch size {e3.shape[0]} != {batch} of layer 0")
        if e3.numel() == 0:
            raise ValueError(f"layer {i}: empty batch, grid or channel dimension {tuple(e.shape)}")
        pairs.append((e3, d3, h, w))
    assert batch is not None

    budget = _CHUNK_ELEMS_CPU if device.type == "cpu" else _CHUNK_ELEMS_OTHER
    traced = tracing()
    with autocast_disabled(device):
        # 1) cosine similarity per layer, summed per grid size: (B, h, w) each.
        cos_sum: dict[tuple[int, int], Tensor] = {}
        count: dict[tuple[int, int], int] = {}
        for e3, d3, h, w in pairs:
            c = _cosine(e3, d3, cosine_kernel, budget, whole=traced)
            # (B, h, w); while tracing without the batch size as a constant
            c = c.unflatten(1, (h, w)) if traced else c.view(batch, h, w)
            if (h, w) not in cos_sum:
                cos_sum[(h, w)], count[(h, w)] = c, 1
            else:
                cos_sum[(h, w)] = cos_sum[(h, w)] + c
                count[(h, w)] += 1
        # distance map per grid: sum_i (1 - cos_i) = count - sum_i cos_i (or its mean)
        grids = {}
        for key, c in cos_sum.items():
            dist = torch.rsub(c, count[key])
            if reduction == "mean":
                dist = dist.mul_(1.0 / len(pairs))
            grids[key] = dist if dist.dtype == torch.float32 else dist.float()
        opts = {"truncate": truncate, "align_corners": align_corners, "border": border}
        if traced:
            return _traced_products(grids, height, width, sigma, device, opts)
        # 2) A_h @ S @ A_w^T for every grid. The H axis is applied first, on the small
        # (B, h, w) maps, as one plain GEMM (h, B*w) -> (H, B*w); then all grids go
        # through a single GEMM (B*H, sum w) @ (sum w, W) that writes the output.
        left, right = [], []
        for (h, w), s in grids.items():
            a_h = axis_operator(h, height, sigma, device=device, **opts)  # (H, h)
            a_w = axis_operator(w, width, sigma, device=device, **opts)  # (W, w)
            y = a_h @ s.transpose(0, 1).reshape(h, batch * w)  # (H, B*w)
            left.append(y.view(height, batch, w).transpose(0, 1))  # (B, H, w)
            right.append(a_w.T)  # (w, W)
        y = torch.cat(left, dim=2) if len(left) > 1 else left[0].contiguous()
        a = torch.cat(right, dim=0) if len(right) > 1 else right[0]
        return (y.view(batch * height, -1) @ a).view(batch, height, width)


def _traced_products(
    grids: dict[tuple[int, int], Tensor],
    height: int,
    width: int,
    sigma: float,
    device: torch.device,
    opts: dict,
) -> Tensor:
    """``sum_grids A_h @ S @ A_w.T`` of ``(B, h, w)`` maps as broadcast matmuls: ``(B, H, W)``.

    The traced form of the last step of [`anomaly_map`][cncad.scoring.anomaly_map]: no batch
    size in any shape, and the operators taken from the cache as constants.
    """
    result: Tensor | None = None
    for (h, w), s in grids.items():
        a_h, a_w = (
            prebuilt(
                _cached_operator,
                *_operator_key(n, size, sigma, device=device, **opts),
                what=f"axis_operator({n}, {size}, {sigma}, ...)",
            )
            for n, size in ((h, height), (w, width))
        )
        part = torch.matmul(torch.matmul(a_h, s), a_w.T)  # (H, h) @ (B, h, w) @ (w, W)
        result = part if result is None else result + part
    assert result is not None
    return result


def image_score(
    amap: Tensor, mode: Literal["max", "topk_mean"] = "max", k: int | float = 0.01
) -> Tensor:
    """Image-level anomaly score from a pixel anomaly map.

    Args:
        amap: Anomaly maps of shape ``(B, H, W)`` (any ``(B, ...)`` is flattened per image).
        mode: ``"max"``: maximum pixel (CNC's image score); ``"topk_mean"``: mean of the
            ``k`` highest pixels.
        k: For ``"topk_mean"``: a pixel count (int, ``1 <= k <= H*W``) or a fraction of
            the pixels (float in ``(0, 1]``, giving ``max(1, int(k * H * W))`` pixels, as
            in Dinomaly's ``max_ratio``). Ignored for ``"max"``.

    Returns:
        Tensor of shape ``(B,)`` with the dtype of ``amap``.

    Raises:
        ValueError: On a map with fewer than 2 dimensions or no pixels, an unknown mode or
            a bad ``k``.
    """
    if not isinstance(amap, Tensor) or amap.ndim < 2:
        raise ValueError("amap must be a tensor of shape (B, H, W)")
    flat = amap.flatten(1)
    npix = flat.shape[1]
    if npix == 0:
        raise ValueError("amap has no pixels")
    if mode == "max":
        return flat.amax(dim=1)
    if mode != "topk_mean":
        raise ValueError(f"mode must be 'max' or 'topk_mean', got {mode!r}")
    if isinstance(k, bool) or not isinstance(k, (int, float)):
        raise ValueError(f"k must be an int count or a float fraction, got {k!r}")
    if isinstance(k, int):
        if not 1 <= k <= npix:
            raise ValueError(f"k={k} must be between 1 and the number of pixels {npix}")
        count = k
    else:
        if not (0.0 < k <= 1.0):
            raise ValueError(f"fraction k={k} must be in (0, 1]")
        count = max(1, int(k * npix))
    return torch.topk(flat, count, dim=1, sorted=False).values.mean(dim=1)
