"""Exact image- and pixel-level anomaly detection metrics.

The seven numbers reported for MVTec AD / VisA style benchmarks, computed exactly from
one sort of the scores (no threshold grid, no binning):

* **I-AUROC, I-AP, I-F1max** from one score and one binary label per image.
* **P-AUROC, P-AP, P-F1max** from anomaly maps and ground-truth masks, with every pixel
  of the test set treated as one sample (masks binarised as ``mask > 0``).
* **AUPRO**: the per-region overlap (PRO) averaged over every connected ground-truth
  region of the test set (8-connectivity, regions never span two images), as a function
  of the false positive rate (FPR) on all normal pixels, integrated with the trapezoid
  rule from FPR 0 up to ``fpr_limit`` (the curve is interpolated linearly at exactly
  ``fpr_limit``) and divided by ``fpr_limit``.

Ties are handled exactly: a threshold ``t`` predicts "anomalous" for every score ``>= t``
and the curves are evaluated at every distinct score, so pixels or images with equal
scores always move together. AUROC and AP agree with `sklearn.metrics.roc_auc_score`
and `sklearn.metrics.average_precision_score`; F1max is the maximum of
``2 * precision * recall / (precision + recall)`` over all thresholds.

``aupro(..., num_thresholds=200)`` instead reproduces the 200-threshold protocol of the
RD4AD evaluation code used by many published tables (see [`aupro`][cncad.metrics.aupro]), so that
numbers can be compared with papers. ``docs/metrics.md`` details every definition and how it
differs from other public implementations.

Inputs may be NumPy arrays or PyTorch tensors on any device. Half-precision inputs are
widened to float32 (exactly); float32 and float64 are used as given, never rounded.
For several pixel metrics of the same maps, [`pixel_metrics`][cncad.metrics.pixel_metrics] computes
all four for the price of one (the sort of all pixel scores dominates the cost).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple, TypeAlias

import numpy as np
from scipy import ndimage

if TYPE_CHECKING:
    import torch

__all__ = [
    "ArrayLike",
    "ImageMetrics",
    "PixelMetrics",
    "aupro",
    "image_ap",
    "image_auroc",
    "image_f1_max",
    "image_metrics",
    "pixel_ap",
    "pixel_auroc",
    "pixel_f1_max",
    "pixel_metrics",
]

ArrayLike: TypeAlias = "np.ndarray | torch.Tensor"

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)  # ground-truth regions: 8-connectivity


class ImageMetrics(NamedTuple):
    """Image-level metrics returned by [`image_metrics`][cncad.metrics.image_metrics].

    Attributes:
        auroc: Area under the ROC curve (I-AUROC).
        ap: Average precision (I-AP).
        f1_max: Maximum F1 score over all thresholds (I-F1max).
    """

    auroc: float
    ap: float
    f1_max: float


class PixelMetrics(NamedTuple):
    """Pixel-level metrics returned by [`pixel_metrics`][cncad.metrics.pixel_metrics].

    Attributes:
        auroc: Area under the ROC curve over all pixels (P-AUROC).
        ap: Average precision over all pixels (P-AP).
        f1_max: Maximum F1 score over all thresholds (P-F1max).
        aupro: Normalised area under the PRO curve up to the FPR limit (AUPRO).
    """

    auroc: float
    ap: float
    f1_max: float
    aupro: float


# ----------------------------------------------------------------------------- inputs
def _to_numpy(array: ArrayLike) -> np.ndarray:
    """NumPy view or copy of an array or a tensor (any device), without importing torch."""
    if hasattr(array, "detach") and hasattr(array, "cpu"):
        tensor = array.detach().cpu()
        if tensor.is_floating_point() and tensor.element_size() < 4:
            tensor = tensor.float()  # NumPy has no bfloat16; the widening is exact
        return tensor.numpy()
    return np.asarray(array)


def _as_scores(array: ArrayLike, name: str, ndim: int) -> np.ndarray:
    """Validated real-valued scores: right ndim, finite, float32 or float64."""
    values = _to_numpy(array)
    _check_ndim(values, name, ndim)
    if values.dtype == np.float16:
        values = values.astype(np.float32)
    elif values.dtype.kind in "biu":
        values = values.astype(np.float64)
    elif values.dtype.kind != "f":
        raise ValueError(f"{name} must be real numbers, got dtype {values.dtype}")
    # min/max propagate NaN and expose +-inf without a full-size boolean temporary.
    if values.size and not (np.isfinite(values.min()) and np.isfinite(values.max())):
        raise ValueError(f"{name} contain NaN or infinite values")
    return values


def _as_image_labels(array: ArrayLike, name: str) -> np.ndarray:
    """Validated boolean image labels from bool or 0/1 values."""
    values = _to_numpy(array)
    _check_ndim(values, name, 1)
    if values.dtype == bool:
        return values
    if values.dtype.kind not in "biuf":
        raise ValueError(f"{name} must be binary (bool or 0/1), got dtype {values.dtype}")
    invalid = ~np.isin(values, (0, 1))
    if invalid.any():
        examples = np.unique(values[invalid])[:5]
        raise ValueError(f"{name} must be binary (bool or 0/1), got values such as {examples}")
    return values == 1


def _as_masks(array: ArrayLike, name: str) -> np.ndarray:
    """Boolean masks, ``True`` where ``mask > 0``."""
    values = _to_numpy(array)
    _check_ndim(values, name, 3)
    if values.dtype == bool:
        return values
    if values.dtype.kind not in "biuf":
        raise ValueError(f"{name} must be numeric or bool, got dtype {values.dtype}")
    return values > 0


def _check_ndim(values: np.ndarray, name: str, ndim: int) -> None:
    if values.ndim != ndim:
        expected = "(N,)" if ndim == 1 else "(N, H, W)"
        raise ValueError(f"{name} must have shape {expected}, got shape {values.shape}")


def _check_pair(scores: np.ndarray, labels: np.ndarray, names: tuple[str, str]) -> None:
    if scores.shape != labels.shape:
        raise ValueError(
            f"{names[0]} and {names[1]} must have the same shape, "
            f"got {scores.shape} and {labels.shape}"
        )


def _check_both_classes(n_positive: int, n_negative: int, what: str) -> None:
    if n_positive == 0:
        raise ValueError(f"no anomalous {what}: the metric is undefined without positives")
    if n_negative == 0:
        raise ValueError(f"no normal {what}: the metric is undefined without negatives")


def _image_inputs(scores: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    scores_np = _as_scores(scores, "scores", ndim=1)
    labels_np = _as_image_labels(labels, "labels")
    _check_pair(scores_np, labels_np, ("scores", "labels"))
    n_positive = int(np.count_nonzero(labels_np))
    _check_both_classes(n_positive, labels_np.size - n_positive, "image (label 1)")
    return scores_np, labels_np


def _pixel_inputs(maps: ArrayLike, masks: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    maps_np = _as_scores(maps, "maps", ndim=3)
    masks_np = _as_masks(masks, "masks")
    _check_pair(maps_np, masks_np, ("maps", "masks"))
    n_positive = int(np.count_nonzero(masks_np))
    _check_both_classes(n_positive, masks_np.size - n_positive, "pixel (mask > 0)")
    return maps_np, masks_np


# ------------------------------------------------------------------------ the ranking
def _cast_down(thresholds: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Largest values of ``dtype`` that are <= each float64 threshold.

    For scores ``s`` of ``dtype``, ``s > t`` then holds exactly when ``s > cast(t)``, so
    comparisons against float64 thresholds can run in the scores' own precision.
    """
    cast = thresholds.astype(dtype)
    too_high = cast.astype(np.float64) > thresholds
    cast[too_high] = np.nextafter(cast[too_high], dtype.type(-np.inf))
    return cast


class _Ranking:
    """Order statistics of positive vs negative scores shared by all metrics.

    With ``u_1 < ... < u_U`` the distinct positive scores, it holds per ``u_j`` the
    number of positives ``>= u_j`` and the numbers of negatives ``< u_j`` and ``== u_j``,
    and (for AUPRO) the PRO at threshold ``u_j``. Every metric here is a function of
    these plus, for AUPRO, a few order statistics of the negatives. Negative counts are
    all-minus-positive counts, so the (huge) negative set is never extracted.

    Args:
        ordered: ``(M,)`` all scores (positive and negative), sorted ascending.
        positives: ``(P,)`` positive scores, sorted ascending.
        region_weights: ``(P,)`` per positive, aligned with ``positives``:
            ``1 / (size of its ground-truth region)``, or None when AUPRO is not needed.
        n_regions: Number of ground-truth regions.
    """

    def __init__(
        self,
        ordered: np.ndarray,
        positives: np.ndarray,
        region_weights: np.ndarray | None = None,
        n_regions: int = 0,
    ) -> None:
        self.ordered = ordered
        self.positives = positives
        self.n_pos = positives.size
        self.n_neg = ordered.size - positives.size
        is_first = np.empty(self.n_pos, dtype=bool)
        is_first[0] = True
        np.not_equal(positives[1:], positives[:-1], out=is_first[1:])
        first = np.flatnonzero(is_first)
        del is_first
        self.values = positives[first]
        self.pos_equal = np.diff(first, append=self.n_pos)
        self.pos_at_least = self.n_pos - first
        all_below = np.searchsorted(ordered, self.values, side="left")
        self.neg_below = all_below - first
        # A negative ties with u_j only if the element after u_j's positives equals u_j.
        after = all_below + self.pos_equal
        maybe_tied = np.flatnonzero(after < ordered.size)
        maybe_tied = maybe_tied[ordered[after[maybe_tied]] == self.values[maybe_tied]]
        self.neg_equal = np.zeros_like(self.neg_below)
        self.neg_equal[maybe_tied] = (
            np.searchsorted(ordered, self.values[maybe_tied], side="right") - after[maybe_tied]
        )
        self.pro_at_least: np.ndarray | None = None
        if region_weights is not None:
            # PRO(>= u_j) = sum of 1/|region| over positives >= u_j, divided by #regions;
            # suffix sums taken from the top so that small terms are added first.
            suffix = np.cumsum(region_weights[::-1])[::-1]
            self.pro_at_least = np.append(suffix[first] / n_regions, 0.0)

    def _neg_at_most(self, value: Any) -> int:
        """Number of negatives ``<= value``."""
        return int(
            np.searchsorted(self.ordered, value, side="right")
            - np.searchsorted(self.positives, value, side="right")
        )

    def _neg_below(self, value: Any) -> int:
        """Number of negatives ``< value``."""
        return int(
            np.searchsorted(self.ordered, value, side="left")
            - np.searchsorted(self.positives, value, side="left")
        )

    def _negative_of_rank(self, rank: int) -> Any:
        """The negative score of 0-based ascending ``rank`` among negatives.

        Bisection over ``ordered`` for the first element with more than ``rank``
        negatives at or below it; that element is always a negative score.
        """
        low, high = 0, self.ordered.size - 1
        while low < high:
            middle = (low + high) // 2
            if self._neg_at_most(self.ordered[middle]) > rank:
                high = middle
            else:
                low = middle + 1
        return self.ordered[low]

    def auroc(self) -> float:
        """P(score_pos > score_neg) + P(score_pos == score_neg) / 2 (Mann-Whitney)."""
        wins = np.dot(self.pos_equal, self.neg_below.astype(np.float64))
        ties = np.dot(self.pos_equal, self.neg_equal.astype(np.float64))
        return float((wins + 0.5 * ties) / (float(self.n_pos) * float(self.n_neg)))

    def ap(self) -> float:
        """Sum over distinct positive scores of recall increment times precision."""
        tp = self.pos_at_least
        precision = tp / (tp + (self.n_neg - self.neg_below))
        return float(np.dot(self.pos_equal, precision) / self.n_pos)

    def f1_max(self) -> float:
        """Max over thresholds of 2TP / (2TP + FP + FN) = 2TP / (TP + FP + N_pos).

        Between two consecutive distinct positive scores TP is constant and FP only
        grows as the threshold falls, so the maximum sits at a positive score.
        """
        tp = self.pos_at_least
        f1 = 2.0 * tp / (tp + (self.n_neg - self.neg_below) + self.n_pos)
        return float(f1.max())

    def _pro(self, value: Any, side: str) -> float:
        """PRO at threshold ``value``: positives ``>= value`` (left) or ``> value`` (right)."""
        assert self.pro_at_least is not None
        return float(self.pro_at_least[np.searchsorted(self.values, value, side=side)])

    def aupro_exact(self, fpr_limit: float) -> float:
        """Exact normalised area under the PRO curve up to ``fpr_limit``.

        The curve passes through (FPR, PRO) at every distinct score, starting at (0, 0).
        Only negatives move FPR, so the area is a sum over negatives: a group of ``c``
        tied negatives at score ``v`` spans FPR ``c / N_neg`` along a straight segment
        from PRO(> v) to PRO(>= v), i.e. each contributes the mean of the two. Between
        two distinct positive scores PRO is constant, so negatives are counted per gap
        instead of one by one.
        """
        assert self.pro_at_least is not None
        n_neg = self.n_neg
        fp_at_limit = fpr_limit * n_neg
        crossing = None
        n_ignored = 0  # negatives at or below the crossing score: not integrated fully
        if fpr_limit < 1.0:
            # The (floor(fp_at_limit) + 1)-th highest negative is the first to push the
            # FPR past the limit; its tie group is integrated only up to the limit.
            crossing = self._negative_of_rank(n_neg - 1 - int(np.floor(fp_at_limit)))
            n_ignored = self._neg_at_most(crossing)
        n_full = n_neg - n_ignored  # negatives strictly above the crossing score

        below = np.maximum(self.neg_below - n_ignored, 0)  # counted negatives < u_j
        at_most = np.maximum(self.neg_below + self.neg_equal - n_ignored, 0)  # <= u_j
        in_gap = below - np.concatenate(([0], at_most[:-1]))  # strictly in (u_{j-1}, u_j)
        pro = self.pro_at_least
        area = np.dot(in_gap, pro[:-1]) + np.dot(at_most - below, 0.5 * (pro[:-1] + pro[1:]))
        area /= n_neg

        if crossing is not None and fp_at_limit > n_full:
            n_tied = n_ignored - self._neg_below(crossing)
            pro_strict, pro_at_least = self._pro(crossing, "right"), self._pro(crossing, "left")
            fraction = (fp_at_limit - n_full) / n_tied
            pro_at_limit = pro_strict + (pro_at_least - pro_strict) * fraction
            area += (fp_at_limit - n_full) / n_neg * 0.5 * (pro_strict + pro_at_limit)
        return float(area / fpr_limit)

    def aupro_grid(self, fpr_limit: float, num_thresholds: int) -> float:
        """AUPRO on ``num_thresholds`` evenly spaced thresholds, RD4AD-style.

        Thresholds ``t_k = lo + k (hi - lo) / num_thresholds`` for ``k < num_thresholds``
        (``lo``, ``hi``: extreme scores), "anomalous" meaning ``score > t_k``; points with
        FPR < ``fpr_limit`` are kept, their FPR divided by the largest kept FPR, and the
        trapezoid area returned.
        """
        assert self.pro_at_least is not None
        lo, hi = float(self.ordered[0]), float(self.ordered[-1])
        step = (hi - lo) / num_thresholds
        thresholds = lo + np.arange(num_thresholds, dtype=np.float64) * step
        cut = _cast_down(thresholds, self.ordered.dtype)
        neg_at_most = np.searchsorted(self.ordered, cut, side="right") - np.searchsorted(
            self.positives, cut, side="right"
        )
        fpr = (self.n_neg - neg_at_most) / self.n_neg
        pro = self.pro_at_least[np.searchsorted(self.values, cut, side="right")]
        keep = fpr < fpr_limit
        fpr, pro = fpr[keep][::-1], pro[keep][::-1]  # ascending FPR
        if fpr.size < 2 or fpr[-1] <= 0.0:
            raise ValueError(
                f"the {num_thresholds}-threshold PRO curve has fewer than two points with "
                f"0 < FPR < {fpr_limit}; use the exact AUPRO (num_thresholds=None)"
            )
        fpr = fpr / fpr[-1]
        return float(np.sum(np.diff(fpr) * 0.5 * (pro[1:] + pro[:-1])))


def _rank_images(scores: np.ndarray, labels: np.ndarray) -> _Ranking:
    return _Ranking(np.sort(scores), np.sort(scores[labels]))


def _sortable_keys(values: np.ndarray) -> np.ndarray:
    """uint64 keys ordered like the float32 ``values`` (shifted into the high 32 bits).

    -0.0 gets a smaller key than +0.0; both decode back to values that compare equal,
    so they still form one tie group once sorted.
    """
    bits = values.view(np.uint32).astype(np.uint64)
    negative = bits >= 0x80000000
    bits[negative] ^= 0xFFFFFFFF
    bits[~negative] |= 0x80000000
    return bits << np.uint64(32)


def _float32_from_keys(keys: np.ndarray) -> np.ndarray:
    bits = (keys >> np.uint64(32)).astype(np.uint32)
    was_negative = bits < 0x80000000
    bits[was_negative] ^= 0xFFFFFFFF
    bits[~was_negative] &= 0x7FFFFFFF
    return bits.view(np.float32)


def _defect_pixels(
    maps: np.ndarray, masks: np.ndarray, first_region: int = 0
) -> tuple[np.ndarray, np.ndarray, int]:
    """Defect-pixel scores and region ids of ``(N, H, W)`` maps and masks, image by image.

    Args:
        maps: ``(N, H, W)`` anomaly maps.
        masks: ``(N, H, W)`` bool ground truth.
        first_region: Id given to the first region found, so that calls on consecutive
            chunks of a test set number the regions as one call on the whole set would.

    Returns:
        ``(scores, region_ids, n_found)``: the ``(P,)`` defect-pixel scores (dtype of
        ``maps``) and ``(P,)`` uint32 region ids, in image order (unsorted), and the
        number of 8-connected regions found.
    """
    scores, region_ids = [], []
    n_regions = first_region
    rows_hit, cols_hit = masks.any(axis=2), masks.any(axis=1)
    for index in np.flatnonzero(rows_hit.any(axis=1)):
        # Label only the bounding box of the defects: most of each image is background.
        rows, cols = np.flatnonzero(rows_hit[index]), np.flatnonzero(cols_hit[index])
        box = (index, slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
        mask = masks[box]
        labelled, n_found = ndimage.label(mask, structure=_EIGHT_CONNECTED)
        scores.append(maps[box][mask])
        region_ids.append(labelled[mask] + (n_regions - 1))
        n_regions += n_found
    if not scores:
        return np.empty(0, dtype=maps.dtype), np.empty(0, dtype=np.uint32), 0
    return (
        np.concatenate(scores),
        np.concatenate(region_ids).astype(np.uint32),
        n_regions - first_region,
    )


def _sort_defect_pixels(
    scores: np.ndarray, region: np.ndarray, n_regions: int
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted defect-pixel scores and their ``1 / region size`` weights.

    Args:
        scores: ``(P,)`` defect-pixel scores from ``_defect_pixels``.
        region: ``(P,)`` uint32 region ids in ``[0, n_regions)``.
        n_regions: Number of regions.

    Returns:
        ``(positives, weights)``: ``(P,)`` scores ascending (ties ordered by region id for
        float32) and ``(P,)`` float64 weights aligned with them.
    """
    region_size = np.bincount(region, minlength=n_regions)
    if scores.dtype == np.float32:
        # Sorting packed (score, region) keys is faster than an argsort plus gathers.
        keys = _sortable_keys(scores)
        keys |= region.astype(np.uint64)
        keys.sort()
        positives = _float32_from_keys(keys)
        order = (keys & np.uint64(0xFFFFFFFF)).astype(np.intp)
        del keys
        weights = 1.0 / region_size[order]
    else:
        order = np.argsort(scores)
        positives = scores[order]
        weights = 1.0 / region_size[region[order]]
    return positives, weights


def _positives_with_regions(
    maps: np.ndarray, masks: np.ndarray
) -> tuple[np.ndarray, np.ndarray, int]:
    """Sorted defect-pixel scores, their ``1 / region size`` weights, and #regions."""
    scores, region, n_regions = _defect_pixels(maps, masks)
    positives, weights = _sort_defect_pixels(scores, region, n_regions)
    return positives, weights, n_regions


def _rank_pixels(maps: np.ndarray, masks: np.ndarray, with_regions: bool) -> _Ranking:
    ordered = np.sort(maps, axis=None)  # one sorted copy of every pixel score
    if not with_regions:
        return _Ranking(ordered, np.sort(maps[masks]))
    positives, weights, n_regions = _positives_with_regions(maps, masks)
    return _Ranking(ordered, positives, weights, n_regions)


def _exact_aupro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float) -> float:
    """Exact AUPRO without sorting every pixel (same value as ``_Ranking.aupro_exact``).

    Only the normal pixels scoring above the FPR-limit crossing enter the integral, so
    the crossing is found by a linear-time selection and only those ``fpr_limit * N_neg``
    scores are sorted. Between two distinct defect-pixel scores the PRO is constant,
    so the sorted normal scores are counted per gap (two binary searches per distinct
    defect score) rather than visited one by one.
    """
    positives, weights, n_regions = _positives_with_regions(maps, masks)
    # PRO(>= positives[i]) for the first index i of each value; PRO beyond the top is 0.
    pro_from = np.append(np.cumsum(weights[::-1])[::-1], 0.0) / n_regions
    del weights
    negatives = maps[~masks]  # a copy, reordered in place below
    n_neg = negatives.size
    fp_at_limit = fpr_limit * n_neg
    n_above = int(np.floor(fp_at_limit))  # negatives above the crossing, at most
    crossing = None
    if n_above < n_neg:
        # The (n_above + 1)-th highest negative is the first to push the FPR past the
        # limit; its whole tie group is integrated only up to the limit.
        rank = n_neg - 1 - n_above
        negatives.partition(rank)
        crossing = negatives[rank]
        n_tied = int(np.count_nonzero(negatives == crossing))
        top = negatives[rank + 1 :]
        top = top[top > crossing]
    else:
        top = negatives
    top = np.sort(top)
    n_full = top.size

    first = np.flatnonzero(np.append(True, positives[1:] != positives[:-1]))
    values = positives[first]
    pro = np.append(pro_from[first], 0.0)  # pro[j] = PRO(>= u_j), pro[U] = 0
    below = np.searchsorted(top, values, side="left")  # counted negatives < u_j
    at_most = np.searchsorted(top, values, side="right")  # <= u_j
    in_gap = below - np.concatenate(([0], at_most[:-1]))  # strictly in (u_{j-1}, u_j)
    # Negatives above every defect pixel have PRO 0 and add nothing.
    area = np.dot(in_gap, pro[:-1]) + np.dot(at_most - below, 0.5 * (pro[:-1] + pro[1:]))
    area /= n_neg

    if crossing is not None and fp_at_limit > n_full:
        pro_strict = pro_from[np.searchsorted(positives, crossing, side="right")]
        pro_at_least = pro_from[np.searchsorted(positives, crossing, side="left")]
        fraction = (fp_at_limit - n_full) / n_tied
        pro_at_limit = pro_strict + (pro_at_least - pro_strict) * fraction
        area += (fp_at_limit - n_full) / n_neg * 0.5 * (pro_strict + pro_at_limit)
    return float(area / fpr_limit)


def _check_aupro_options(fpr_limit: float, num_thresholds: int | None) -> None:
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    if num_thresholds is not None and (
        isinstance(num_thresholds, bool) or not isinstance(num_thresholds, (int, np.integer))
    ):
        raise ValueError(f"num_thresholds must be an int or None, got {num_thresholds!r}")
    if num_thresholds is not None and num_thresholds < 2:
        raise ValueError(f"num_thresholds must be at least 2, got {num_thresholds}")


def _aupro_from_ranking(ranking: _Ranking, fpr_limit: float, num_thresholds: int | None) -> float:
    if num_thresholds is None:
        value = ranking.aupro_exact(fpr_limit)
    else:
        value = ranking.aupro_grid(fpr_limit, int(num_thresholds))
    return float(np.clip(value, 0.0, 1.0))


# ------------------------------------------------------------------------ image level
def image_metrics(scores: ArrayLike, labels: ArrayLike) -> ImageMetrics:
    """I-AUROC, I-AP and I-F1max from one shared sort.

    Args:
        scores: ``(N,)`` image anomaly scores, higher meaning more anomalous.
        labels: ``(N,)`` ground truth, ``1``/``True`` for anomalous images and
            ``0``/``False`` for normal ones; other values are rejected.

    Returns:
        The three metrics, each a float in [0, 1].

    Raises:
        ValueError: On a shape mismatch, a wrong ndim, NaN or infinite scores,
            non-binary labels, or when only one class is present.
    """
    ranking = _rank_images(*_image_inputs(scores, labels))
    return ImageMetrics(ranking.auroc(), ranking.ap(), ranking.f1_max())


def image_auroc(scores: ArrayLike, labels: ArrayLike) -> float:
    """Image-level area under the ROC curve (I-AUROC).

    Equal to `sklearn.metrics.roc_auc_score`; tied scores count one half.

    Args:
        scores: ``(N,)`` image anomaly scores, higher meaning more anomalous.
        labels: ``(N,)`` binary ground truth (``1``/``True`` = anomalous).

    Returns:
        I-AUROC in [0, 1].

    Raises:
        ValueError: See [`image_metrics`][cncad.metrics.image_metrics].
    """
    return _rank_images(*_image_inputs(scores, labels)).auroc()


def image_ap(scores: ArrayLike, labels: ArrayLike) -> float:
    """Image-level average precision (I-AP).

    ``sum_k (R_k - R_{k-1}) P_k`` over the distinct scores ``k`` in decreasing order,
    as `sklearn.metrics.average_precision_score` (no interpolation).

    Args:
        scores: ``(N,)`` image anomaly scores, higher meaning more anomalous.
        labels: ``(N,)`` binary ground truth (``1``/``True`` = anomalous).

    Returns:
        I-AP in [0, 1].

    Raises:
        ValueError: See [`image_metrics`][cncad.metrics.image_metrics].
    """
    return _rank_images(*_image_inputs(scores, labels)).ap()


def image_f1_max(scores: ArrayLike, labels: ArrayLike) -> float:
    """Image-level maximum F1 score over all thresholds (I-F1max).

    Every distinct score is tried as a threshold (``score >= t`` is anomalous); ties
    never split. No epsilon is added to the denominator.

    Args:
        scores: ``(N,)`` image anomaly scores, higher meaning more anomalous.
        labels: ``(N,)`` binary ground truth (``1``/``True`` = anomalous).

    Returns:
        I-F1max in [0, 1].

    Raises:
        ValueError: See [`image_metrics`][cncad.metrics.image_metrics].
    """
    return _rank_images(*_image_inputs(scores, labels)).f1_max()


# ------------------------------------------------------------------------ pixel level
def pixel_metrics(
    maps: ArrayLike,
    masks: ArrayLike,
    *,
    aupro_fpr_limit: float = 0.3,
    aupro_num_thresholds: int | None = None,
) -> PixelMetrics:
    """P-AUROC, P-AP, P-F1max and AUPRO from one shared sort of all pixels.

    Computing the four together costs about as much as any one of them alone: the
    normal-pixel scores are sorted once and every metric is read off that order.

    Args:
        maps: ``(N, H, W)`` anomaly maps, higher meaning more anomalous.
        masks: ``(N, H, W)`` ground truth; a pixel is anomalous where ``mask > 0``.
        aupro_fpr_limit: Upper FPR limit of the AUPRO integral, in (0, 1].
        aupro_num_thresholds: None for the exact AUPRO, or a number of evenly spaced
            thresholds for the RD4AD-style approximation (see [`aupro`][cncad.metrics.aupro]).

    Returns:
        The four metrics, each a float in [0, 1].

    Raises:
        ValueError: On a shape mismatch, a wrong ndim, NaN or infinite map values,
            invalid AUPRO options, masks with no anomalous or no normal pixel, or
            (grid AUPRO only) a degenerate PRO curve.
    """
    _check_aupro_options(aupro_fpr_limit, aupro_num_thresholds)
    maps_np, masks_np = _pixel_inputs(maps, masks)
    ranking = _rank_pixels(maps_np, masks_np, with_regions=True)
    return _pixel_metrics_from_ranking(ranking, aupro_fpr_limit, aupro_num_thresholds)


def _pixel_metrics_from_ranking(
    ranking: _Ranking, fpr_limit: float, num_thresholds: int | None
) -> PixelMetrics:
    """The four pixel metrics of a ranking built with region weights."""
    return PixelMetrics(
        auroc=ranking.auroc(),
        ap=ranking.ap(),
        f1_max=ranking.f1_max(),
        aupro=_aupro_from_ranking(ranking, fpr_limit, num_thresholds),
    )


def pixel_auroc(maps: ArrayLike, masks: ArrayLike) -> float:
    """Pixel-level area under the ROC curve over all pixels of all images (P-AUROC).

    Equal to `sklearn.metrics.roc_auc_score` on the flattened pixels.

    Args:
        maps: ``(N, H, W)`` anomaly maps, higher meaning more anomalous.
        masks: ``(N, H, W)`` ground truth; a pixel is anomalous where ``mask > 0``.

    Returns:
        P-AUROC in [0, 1].

    Raises:
        ValueError: See [`pixel_metrics`][cncad.metrics.pixel_metrics].
    """
    return _rank_pixels(*_pixel_inputs(maps, masks), with_regions=False).auroc()


def pixel_ap(maps: ArrayLike, masks: ArrayLike) -> float:
    """Pixel-level average precision over all pixels of all images (P-AP).

    Equal to `sklearn.metrics.average_precision_score` on the flattened pixels.

    Args:
        maps: ``(N, H, W)`` anomaly maps, higher meaning more anomalous.
        masks: ``(N, H, W)`` ground truth; a pixel is anomalous where ``mask > 0``.

    Returns:
        P-AP in [0, 1].

    Raises:
        ValueError: See [`pixel_metrics`][cncad.metrics.pixel_metrics].
    """
    return _rank_pixels(*_pixel_inputs(maps, masks), with_regions=False).ap()


def pixel_f1_max(maps: ArrayLike, masks: ArrayLike) -> float:
    """Pixel-level maximum F1 score over all thresholds (P-F1max).

    Every distinct pixel score is tried as a threshold (``score >= t`` is anomalous).

    Args:
        maps: ``(N, H, W)`` anomaly maps, higher meaning more anomalous.
        masks: ``(N, H, W)`` ground truth; a pixel is anomalous where ``mask > 0``.

    Returns:
        P-F1max in [0, 1].

    Raises:
        ValueError: See [`pixel_metrics`][cncad.metrics.pixel_metrics].
    """
    return _rank_pixels(*_pixel_inputs(maps, masks), with_regions=False).f1_max()


def aupro(
    maps: ArrayLike,
    masks: ArrayLike,
    fpr_limit: float = 0.3,
    num_thresholds: int | None = None,
) -> float:
    """Normalised area under the per-region-overlap curve (AUPRO).

    Ground-truth regions are the 8-connected components of each mask (regions never
    span two images). At a threshold ``t`` the PRO is the mean over *all regions of the
    test set* of the fraction of the region's pixels scoring ``>= t``; the FPR is the
    fraction of all normal pixels scoring ``>= t``.

    * ``num_thresholds=None`` (default, exact): the curve goes through (0, 0) and the
      point of every distinct score; it is integrated with the trapezoid rule from
      FPR 0 to ``fpr_limit``, interpolating linearly at exactly ``fpr_limit``, and the
      area is divided by ``fpr_limit``. Only the normal scores above the FPR limit are
      sorted (found by linear-time selection), so this is faster than a full sort.
    * ``num_thresholds=n`` reproduces the RD4AD protocol: thresholds
      ``t_k = min + k (max - min) / n`` for ``k = 0..n-1`` (min/max over all maps),
      anomalous meaning ``score > t_k``; points with FPR < ``fpr_limit`` are kept, their
      FPRs divided by the largest kept FPR, and the trapezoid area is returned. It
      approximates the exact value and is meant only for comparing with papers.

    Args:
        maps: ``(N, H, W)`` anomaly maps, higher meaning more anomalous.
        masks: ``(N, H, W)`` ground truth; a pixel is anomalous where ``mask > 0``.
        fpr_limit: Upper FPR limit of the integral, in (0, 1].
        num_thresholds: None for the exact value, or the number of grid thresholds.

    Returns:
        AUPRO in [0, 1].

    Raises:
        ValueError: See [`pixel_metrics`][cncad.metrics.pixel_metrics].
    """
    _check_aupro_options(fpr_limit, num_thresholds)
    maps_np, masks_np = _pixel_inputs(maps, masks)
    if num_thresholds is None:
        return float(np.clip(_exact_aupro(maps_np, masks_np, fpr_limit), 0.0, 1.0))
    ranking = _rank_pixels(maps_np, masks_np, with_regions=True)
    return _aupro_from_ranking(ranking, fpr_limit, num_thresholds)
