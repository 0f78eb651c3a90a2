"""Batch-wise accumulation of a test set and the per-category metric table.

[`AnomalyEvaluator`][cncad.evaluation.AnomalyEvaluator] keeps, per category, the image scores and
labels and the anomaly maps and masks at the evaluation resolution chosen by the caller (256 x 256
in the usual protocol), then computes the seven metrics of [`cncad.metrics`][cncad.metrics] per
category, exactly as those functions do on the concatenated arrays, and their mean over
categories, the "Mean" row of the paper's tables.

A metric that is undefined for a category (a single class present) is reported as NaN
and left out of the mean. A category with images whose ground-truth mask is unknown (a test
set without ``ground_truth`` masks) gets its image metrics and ``None`` for its pixel metrics,
and a warning says why; see
[`AnomalyEvaluator.compute`][cncad.evaluation.AnomalyEvaluator.compute].

Memory grows linearly with the number of test pixels (``docs/metrics.md``, "Memory"):

* ``update`` keeps each map in ``map_dtype`` and each mask bit-packed (1 bit per pixel):
  4.125 bytes per pixel for float32 maps, 264 KiB per 256 x 256 image (2.125 for float16).
* ``compute`` works category by category. It moves the category's maps, slab by slab, into
  one float32 array that it sorts in place and keeps for later calls (4 bytes per pixel,
  plus 8 per defect pixel), so no second copy of the maps is made. On top of the stored
  test set it needs about 100 bytes per defect pixel of the category at hand for the
  ranking (a float16 category also grows to float32 here).
* Measured for one category of 256 x 256 images with 2.6 % defect pixels: 4.1 bytes per
  pixel while accumulating, 5.8 at the peak of ``compute``, so about 62,000 images fit in
  24 GB (the earlier bool masks, concatenation and sorted copy needed 5.0 and 13.8).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cncad.metrics import (
    ArrayLike,
    PixelMetrics,
    _as_image_labels,
    _as_masks,
    _as_scores,
    _check_aupro_options,
    _defect_pixels,
    _pixel_metrics_from_ranking,
    _Ranking,
    _sort_defect_pixels,
    image_metrics,
)

__all__ = [
    "AUPRO",
    "IMAGE_METRICS",
    "I_AP",
    "I_AUROC",
    "I_F1_MAX",
    "METRIC_NAMES",
    "N_IMAGES",
    "PIXEL_METRICS",
    "P_AP",
    "P_AUROC",
    "P_F1_MAX",
    "AnomalyEvaluator",
    "format_table",
]

I_AUROC = "I-AUROC"
P_AUROC = "P-AUROC"
AUPRO = "AUPRO"
I_AP = "I-AP"
P_AP = "P-AP"
I_F1_MAX = "I-F1max"
P_F1_MAX = "P-F1max"
N_IMAGES = "n_images"

#: The seven metrics in table order.
METRIC_NAMES: tuple[str, ...] = (I_AUROC, P_AUROC, AUPRO, I_AP, P_AP, I_F1_MAX, P_F1_MAX)
#: Metrics computed from image scores and labels.
IMAGE_METRICS: tuple[str, ...] = (I_AUROC, I_AP, I_F1_MAX)
#: Metrics computed from anomaly maps and masks.
PIXEL_METRICS: tuple[str, ...] = (P_AUROC, P_AP, P_F1_MAX, AUPRO)

_MAP_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))

# Largest slab of stored maps. Above glibc's largest mmap threshold (32 MiB), so a slab is
# its own mapping and freeing it during compute() hands its pages back to the OS at once.
_SLAB_BYTES = 64 * 2**20


class _Rows:
    """Equal-shaped rows appended into a few large slabs instead of one array per batch.

    Slab capacities double from the first batch's size up to ``max_capacity`` rows, so two
    ``_Rows`` with the same ``max_capacity`` fed the same numbers of rows have aligned
    slabs. Pages of a slab are touched only as rows are written, so the unfilled end of
    the last slab costs address space, not memory.

    Args:
        row_shape: Shape of one row, e.g. ``(h, w)``.
        dtype: Storage dtype.
        max_capacity: Most rows in one slab.
    """

    def __init__(self, row_shape: tuple[int, ...], dtype: np.dtype, max_capacity: int) -> None:
        self.row_shape = row_shape
        self.dtype = dtype
        self._max_capacity = max_capacity
        self._slabs: list[np.ndarray] = []
        self._fill = 0  # rows written into the last slab

    def __len__(self) -> int:
        if not self._slabs:
            return 0
        return sum(len(slab) for slab in self._slabs[:-1]) + self._fill

    def append(self, rows: np.ndarray) -> None:
        """Copy ``(n, *row_shape)`` rows in (cast to the storage dtype)."""
        start = 0
        while start < len(rows):
            if not self._slabs or self._fill == len(self._slabs[-1]):
                last = len(self._slabs[-1]) if self._slabs else 0
                capacity = min(self._max_capacity, max(len(rows) - start, 2 * last))
                self._slabs.append(np.empty((capacity, *self.row_shape), dtype=self.dtype))
                self._fill = 0
            count = min(len(self._slabs[-1]) - self._fill, len(rows) - start)
            self._slabs[-1][self._fill : self._fill + count] = rows[start : start + count]
            self._fill += count
            start += count

    def first(self) -> np.ndarray:
        """The filled rows of the oldest slab, ``(n, *row_shape)``."""
        return self._slabs[0] if len(self._slabs) > 1 else self._slabs[0][: self._fill]

    def drop_first(self) -> None:
        """Forget the oldest slab (its memory is freed once no view of it is left)."""
        del self._slabs[0]
        if not self._slabs:
            self._fill = 0


@dataclass
class _CategoryBuffer:
    """What one category has accumulated so far.

    Image scores and labels are lists of per-batch arrays. Pixels of images not yet seen by
    ``compute()`` wait in ``maps`` (``map_dtype``) and ``masks`` (bit-packed, one row of
    ``ceil(h * w / 8)`` bytes per image). ``compute()`` folds them into ``ranked`` (every
    pixel score of the category, float32, sorted in place) and ``defect_scores`` /
    ``defect_regions`` (the defect pixels in image order with their region ids), and
    frees the slabs as it goes, so the maps are never held twice.
    """

    map_shape: tuple[int, int]
    maps: _Rows
    masks: _Rows
    scores: list[np.ndarray] = field(default_factory=list)
    labels: list[np.ndarray] = field(default_factory=list)
    n_pixels: int = 0
    n_defect_pixels: int = 0
    ranked: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.float32))
    n_ranked: int = 0  # ranked[:n_ranked] holds the pixels of the folded images
    ranked_is_sorted: bool = True
    defect_scores: list[np.ndarray] = field(default_factory=list)
    defect_regions: list[np.ndarray] = field(default_factory=list)
    n_regions: int = 0
    n_without_mask: int = 0  # images whose mask is unknown: no pixel metrics then

    @classmethod
    def create(cls, map_shape: tuple[int, int], map_dtype: np.dtype) -> _CategoryBuffer:
        n_pixels = math.prod(map_shape)
        # One slab of masks per slab of maps, so that compute() can free them pairwise.
        max_capacity = max(1, _SLAB_BYTES // max(1, n_pixels * map_dtype.itemsize))
        maps = _Rows(map_shape, map_dtype, max_capacity)
        masks = _Rows(((n_pixels + 7) // 8,), np.dtype(np.uint8), max_capacity)
        return cls(map_shape, maps, masks)

    @staticmethod
    def _merge(chunks: list[np.ndarray]) -> np.ndarray:
        # Keep the merged array as the only chunk so that later calls do not copy again.
        if len(chunks) > 1:
            chunks[:] = [np.concatenate(chunks)]
        return chunks[0]

    def image_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """``(n,)`` float64 scores and ``(n,)`` bool labels of the category."""
        return self._merge(self.scores), self._merge(self.labels)

    def add_pixels(self, maps: np.ndarray, masks: np.ndarray, n_without_mask: int) -> None:
        """Store ``(b, h, w)`` maps (already ``map_dtype``) and ``(b, h, w)`` bool masks.

        Once an image without a mask has come (``n_without_mask > 0`` now or before), the
        category has no pixel metrics: its stored pixels are freed and no more are kept.
        """
        self.n_without_mask += n_without_mask
        if self.n_without_mask:
            self.forget_pixels()
            return
        self.maps.append(maps)
        self.masks.append(np.packbits(masks.reshape(len(masks), -1), axis=1))
        self.n_pixels += masks.size
        self.n_defect_pixels += int(np.count_nonzero(masks))

    def forget_pixels(self) -> None:
        """Free every stored pixel (maps, masks and the ranking)."""
        empty = _CategoryBuffer.create(self.map_shape, self.maps.dtype)
        self.maps, self.masks = empty.maps, empty.masks
        self.n_pixels = self.n_defect_pixels = self.n_ranked = self.n_regions = 0
        self.ranked = np.empty(0, dtype=np.float32)
        self.ranked_is_sorted = True
        self.defect_scores.clear()
        self.defect_regions.clear()

    def pixel_metrics(self, fpr_limit: float, num_thresholds: int | None) -> PixelMetrics:
        """The four pixel metrics of the category (its ranking is freed on return)."""
        return _pixel_metrics_from_ranking(self.ranking(), fpr_limit, num_thresholds)

    def ranking(self) -> _Ranking:
        """The shared ranking of all pixels of the category (folds pending images first).

        The same arrays as ``cncad.metrics.pixel_metrics`` builds from the concatenated
        maps and masks (same sorted scores, same region ids), hence the same metrics.
        """
        self._fold()
        scores, regions = self._merge(self.defect_scores), self._merge(self.defect_regions)
        positives, weights = _sort_defect_pixels(scores, regions, self.n_regions)
        return _Ranking(self.ranked[: self.n_ranked], positives, weights, self.n_regions)

    def _fold(self) -> None:
        height, width = self.map_shape
        n_pending = len(self.maps) * height * width
        if self.ranked.size < self.n_ranked + n_pending:
            # Only a compute() after more update()s of a computed category gets here with
            # n_ranked > 0; that copy holds the category's ranked scores twice, briefly.
            grown = np.empty(self.n_ranked + n_pending, dtype=np.float32)
            grown[: self.n_ranked] = self.ranked[: self.n_ranked]
            self.ranked = grown
        while len(self.maps):
            maps, packed = self.maps.first(), self.masks.first()
            assert len(maps) == len(packed)
            block = self.ranked[self.n_ranked : self.n_ranked + maps.size].reshape(maps.shape)
            block[...] = maps  # float16 widens exactly, as pixel_metrics widens it
            masks = np.unpackbits(packed, axis=1, count=height * width)
            masks = masks.view(bool).reshape(maps.shape)
            scores, regions, n_found = _defect_pixels(block, masks, self.n_regions)
            n_block = block.size
            del maps, packed, masks, block
            # Commit: the slab's pixels now live in ranked[:n_ranked] and the defect lists.
            self.maps.drop_first()
            self.masks.drop_first()
            self.defect_scores.append(scores)
            self.defect_regions.append(regions)
            self.n_regions += n_found
            self.n_ranked += n_block
            self.ranked_is_sorted = False
        if not self.ranked_is_sorted:
            self.ranked[: self.n_ranked].sort()  # in place: no second copy of the pixels
            self.ranked_is_sorted = True


class AnomalyEvaluator:
    """Accumulate test batches and compute the seven metrics per category.

    Maps and masks must already be at the evaluation resolution (the caller resizes;
    masks are binarised as ``mask > 0``). Maps are stored as ``map_dtype`` (float32 by
    default; float16 halves their memory but rounds the scores, which can create ties and
    change the pixel metrics slightly), masks bit-packed (1 bit per pixel), scores as
    float64. The metrics are exactly those of [`cncad.metrics`][cncad.metrics] on the
    concatenated arrays of each category; see the module docstring for the memory used.

    Args:
        aupro_fpr_limit: FPR limit of the AUPRO integral, in (0, 1].
        aupro_num_thresholds: None for the exact AUPRO, or the number of evenly spaced
            thresholds of the RD4AD-style approximation (see [`aupro`][cncad.metrics.aupro]).
        map_dtype: ``np.float32`` or ``np.float16``, the storage type of the maps.

    Examples:
        >>> evaluator = AnomalyEvaluator()
        >>> for batch in loader:  # doctest: +SKIP
        ...     evaluator.update(scores, labels, maps, masks, batch["category"])
        >>> results = evaluator.compute()  # doctest: +SKIP
        >>> print(format_table(results))  # doctest: +SKIP
    """

    def __init__(
        self,
        *,
        aupro_fpr_limit: float = 0.3,
        aupro_num_thresholds: int | None = None,
        map_dtype: type[np.floating] | np.dtype = np.float32,
    ) -> None:
        _check_aupro_options(aupro_fpr_limit, aupro_num_thresholds)
        if np.dtype(map_dtype) not in _MAP_DTYPES:
            raise ValueError(f"map_dtype must be float32 or float16, got {np.dtype(map_dtype)}")
        self.aupro_fpr_limit = aupro_fpr_limit
        self.aupro_num_thresholds = aupro_num_thresholds
        self.map_dtype = np.dtype(map_dtype)
        self._buffers: dict[str, _CategoryBuffer] = {}

    @property
    def categories(self) -> tuple[str, ...]:
        """Categories seen so far, in order of first appearance."""
        return tuple(self._buffers)

    def __len__(self) -> int:
        """Number of images accumulated over all categories."""
        return sum(sum(chunk.size for chunk in buf.scores) for buf in self._buffers.values())

    def reset(self) -> None:
        """Forget everything accumulated."""
        self._buffers.clear()

    def update(
        self,
        scores: ArrayLike,
        labels: ArrayLike,
        maps: ArrayLike,
        masks: ArrayLike,
        categories: Sequence[str],
        has_mask: ArrayLike | None = None,
    ) -> None:
        """Add one batch.

        Args:
            scores: ``(B,)`` image anomaly scores, higher meaning more anomalous.
            labels: ``(B,)`` image labels, ``1``/``True`` for anomalous images.
            maps: ``(B, h, w)`` anomaly maps at the evaluation resolution.
            masks: ``(B, h, w)`` ground-truth masks at the same resolution; anomalous
                where ``mask > 0``.
            categories: ``B`` category names, one per image.
            has_mask: ``(B,)`` bool (or 0/1), False where an image's ground-truth mask is
                unknown (its ``masks`` entry is then ignored), as in the ``"has_mask"`` of
                [`AnomalyFolder`][cncad.data.folder.AnomalyFolder] items. A category with
                any such image gets no pixel metrics (``None``), and its pixels are not
                stored. None (default): every mask is known.

        Raises:
            ValueError: On inconsistent batch sizes or shapes, NaN or infinite values
                (also after the cast to ``map_dtype``), non-binary labels or ``has_mask``,
                or a map size that differs from earlier batches of the same category.
                Nothing of a rejected batch is kept.
        """
        scores_np = _as_scores(scores, "scores", ndim=1).astype(np.float64, copy=False)
        labels_np = _as_image_labels(labels, "labels")
        maps_np = _as_scores(maps, "maps", ndim=3)
        masks_np = _as_masks(masks, "masks")
        batch_size = scores_np.shape[0]
        if has_mask is None:
            known_np = np.ones(batch_size, dtype=bool)
        else:
            known_np = _as_image_labels(has_mask, "has_mask")
        names = [categories] if isinstance(categories, str) else list(categories)
        sizes = {
            "labels": labels_np.shape[0],
            "maps": maps_np.shape[0],
            "masks": masks_np.shape[0],
            "has_mask": known_np.shape[0],
            "categories": len(names),
        }
        mismatched = {key: size for key, size in sizes.items() if size != batch_size}
        if mismatched:
            raise ValueError(f"batch of {batch_size} scores but {mismatched}")
        if maps_np.shape != masks_np.shape:
            raise ValueError(
                f"maps and masks must have the same shape, got {maps_np.shape} and {masks_np.shape}"
            )
        with np.errstate(over="ignore"):
            maps_np = maps_np.astype(self.map_dtype, copy=False)
        if maps_np.size and not (np.isfinite(maps_np.min()) and np.isfinite(maps_np.max())):
            raise ValueError(f"maps overflow {self.map_dtype}; use map_dtype=np.float32")
        map_shape = (int(maps_np.shape[1]), int(maps_np.shape[2]))
        for name in dict.fromkeys(names):
            if not isinstance(name, str):
                raise ValueError(f"categories must be strings, got {name!r}")
            buffer = self._buffers.get(name)
            if buffer is not None and buffer.map_shape != map_shape:
                raise ValueError(
                    f"category {name!r}: maps of size {map_shape} after earlier "
                    f"batches of size {buffer.map_shape}"
                )

        names_np = np.asarray(names, dtype=object)
        for name in dict.fromkeys(names):
            rows = np.flatnonzero(names_np == name)
            buffer = self._buffers.get(name)
            if buffer is None:
                buffer = self._buffers[name] = _CategoryBuffer.create(map_shape, self.map_dtype)
            buffer.scores.append(scores_np[rows])  # fancy indexing copies: no view on the input
            buffer.labels.append(labels_np[rows])
            n_without_mask = int(rows.size - np.count_nonzero(known_np[rows]))
            if rows.size == batch_size:  # the usual one-category batch: no gather needed
                buffer.add_pixels(maps_np, masks_np, n_without_mask)
            else:
                buffer.add_pixels(maps_np[rows], masks_np[rows], n_without_mask)

    @property
    def images_without_mask(self) -> dict[str, int]:
        """Per category with any, the number of images whose ground-truth mask is unknown."""
        return {
            name: buffer.n_without_mask
            for name, buffer in self._buffers.items()
            if buffer.n_without_mask
        }

    def decisions(
        self, threshold: float, per_category: Mapping[str, float] | None = None
    ) -> dict[str, Any]:
        """What deciding ``score >= threshold`` does on the accumulated images.

        The image-level counterpart of the threshold-free metrics of
        [`compute`][cncad.evaluation.AnomalyEvaluator.compute], for a detector whose
        threshold is set (e.g. [calibrated][cncad.detector.CNCDetector.calibrate]): how many
        normal images it flags and how many defective ones it finds.

        Args:
            threshold: The image-score threshold.
            per_category: Thresholds of single categories, used instead of ``threshold``
                for them (a detector calibrated per category).

        Returns:
            ``{"per_category": {category: row}, "total": row}``, where a row holds
            ``threshold`` (None in the total when the categories' differ),
            ``normal_images``, ``false_alarms``, ``defective_images``, ``detected``, and
            the rates ``FPR`` (false alarms / normal images), ``recall`` (detected /
            defective images), ``precision`` (detected / flagged) and ``F1``; a rate
            whose denominator is 0 is NaN.

        Raises:
            ValueError: Nothing was accumulated, or a threshold is not a finite number.
        """
        if not self._buffers:
            raise ValueError("no data: call update() before decisions()")
        chosen = {name: threshold for name in self._buffers}
        chosen.update({k: v for k, v in (per_category or {}).items() if k in chosen})
        for name, value in chosen.items():
            if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)):
                raise ValueError(f"the threshold of {name!r} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"the threshold of {name!r} must be finite, got {value!r}")
        rows: dict[str, dict[str, float | int | None]] = {}
        counts = np.zeros(4, dtype=np.int64)
        for name, buffer in self._buffers.items():
            scores, labels = buffer.image_arrays()
            flagged = scores >= chosen[name]
            defective = labels.astype(bool)
            row_counts = np.array(
                [
                    np.count_nonzero(~defective),
                    np.count_nonzero(flagged & ~defective),
                    np.count_nonzero(defective),
                    np.count_nonzero(flagged & defective),
                ]
            )
            counts += row_counts
            rows[name] = {"threshold": float(chosen[name]), **_decision_rates(row_counts)}
        same = len(set(chosen.values())) == 1
        total = {"threshold": float(threshold) if same else None, **_decision_rates(counts)}
        return {"per_category": rows, "total": total}

    def compute(self) -> dict[str, Any]:
        """Compute the metrics of every category and their mean over categories.

        NaN rule: the image metrics of a category are NaN when its images are all normal
        or all anomalous; its pixel metrics are NaN when its masks have no anomalous
        pixel or no normal pixel. The ``"mean"`` row averages each metric over the
        categories where it is defined (NaN only if it is defined nowhere).

        None rule: the pixel metrics of a category are ``None`` when the mask of any of
        its images is unknown (``has_mask`` False in
        [`update`][cncad.evaluation.AnomalyEvaluator.update]), since its defect pixels
        cannot be counted; the mean pixel metrics are then ``None`` too, as a mean over
        fewer categories than the image metrics' would not be comparable. A
        ``UserWarning`` names those categories. Image metrics are computed as usual.

        Returns:
            ``{"per_category": {category: {metric: float | None, ..., "n_images": int}},
            "mean": {metric: float | None, ..., "n_images": int}}`` with the metrics named
            by [`METRIC_NAMES`][cncad.evaluation.METRIC_NAMES], as fractions in [0, 1],
            categories in order of first appearance and ``"mean"["n_images"]`` the total
            number of images.

        Raises:
            ValueError: If nothing was accumulated.
        """
        if not self._buffers:
            raise ValueError("no data: call update() before compute()")
        per_category: dict[str, dict[str, float | int | None]] = {}
        for name, buffer in self._buffers.items():
            scores, labels = buffer.image_arrays()
            row: dict[str, float | int | None] = dict.fromkeys(METRIC_NAMES, math.nan)
            if 0 < np.count_nonzero(labels) < labels.size:
                image = image_metrics(scores, labels)
                row.update({I_AUROC: image.auroc, I_AP: image.ap, I_F1_MAX: image.f1_max})
            if buffer.n_without_mask:
                row.update(dict.fromkeys(PIXEL_METRICS))
            elif 0 < buffer.n_defect_pixels < buffer.n_pixels:
                pixel = buffer.pixel_metrics(self.aupro_fpr_limit, self.aupro_num_thresholds)
                row.update(
                    {
                        P_AUROC: pixel.auroc,
                        P_AP: pixel.ap,
                        P_F1_MAX: pixel.f1_max,
                        AUPRO: pixel.aupro,
                    }
                )
            row[N_IMAGES] = int(scores.size)
            per_category[name] = row

        without_mask = self.images_without_mask
        mean: dict[str, float | int | None] = {}
        for metric in METRIC_NAMES:
            if metric in PIXEL_METRICS and without_mask:
                mean[metric] = None
                continue
            values = [row[metric] for row in per_category.values()]
            defined = [v for v in values if v is not None and not math.isnan(v)]
            mean[metric] = math.fsum(defined) / len(defined) if defined else math.nan
        mean[N_IMAGES] = sum(int(row[N_IMAGES]) for row in per_category.values())  # type: ignore[arg-type]
        if without_mask:
            warnings.warn(_missing_masks_message(without_mask, per_category), stacklevel=2)
        return {"per_category": per_category, "mean": mean}


def _decision_rates(counts: np.ndarray) -> dict[str, float | int]:
    """Counts ``(normal, false alarms, defective, detected)`` and their rates."""
    normal, false_alarms, defective, detected = (int(c) for c in counts)
    flagged = false_alarms + detected

    def ratio(numerator: int, denominator: int) -> float:
        return numerator / denominator if denominator else math.nan

    precision, recall = ratio(detected, flagged), ratio(detected, defective)
    f1 = 2 * detected / (flagged + defective) if flagged + defective else math.nan
    return {
        "normal_images": normal,
        "false_alarms": false_alarms,
        "defective_images": defective,
        "detected": detected,
        "FPR": ratio(false_alarms, normal),
        "recall": recall,
        "precision": precision,
        "F1": f1,
    }


def _missing_masks_message(
    without_mask: Mapping[str, int], per_category: Mapping[str, Mapping[str, Any]]
) -> str:
    """The one line saying which categories have no pixel metrics, and why."""
    counts = ", ".join(
        f"{name!r} ({count} of {per_category[name][N_IMAGES]} images)"
        for name, count in without_mask.items()
    )
    return (
        f"pixel metrics ({', '.join(PIXEL_METRICS)}) are None for the categories with test "
        f"images whose ground-truth mask is unknown: {counts}, and for the mean; image metrics "
        "are computed as usual (AnomalyFolder looks for the masks of test/<defect>/<name> in "
        "ground_truth/<defect>/<name>_mask.png or <name>.png)"
    )


def format_table(results: Mapping[str, Any], metrics: Sequence[str] = METRIC_NAMES) -> str:
    """Render evaluation results as a plain-text table.

    The results are those of
    [`AnomalyEvaluator.compute`][cncad.evaluation.AnomalyEvaluator.compute].

    One row per category plus a final "Mean" row; metrics in percent with one decimal
    (as in the paper's tables), undefined (NaN) values as ``-``, metrics not computed
    (``None``: no ground-truth masks) as ``n/a``.

    Args:
        results: The dict returned by
            [`AnomalyEvaluator.compute`][cncad.evaluation.AnomalyEvaluator.compute].
        metrics: Metric columns to show, in order.

    Returns:
        The table as one string of lines, without a trailing newline.
    """
    header = ["Category", *metrics, "Images"]
    rows = [
        [name, *(_percent(values[m]) for m in metrics), str(values[N_IMAGES])]
        for name, values in results["per_category"].items()
    ]
    mean = results["mean"]
    rows.append(["Mean", *(_percent(mean[m]) for m in metrics), str(mean[N_IMAGES])])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True))
        return "  ".join([first, *rest])

    rule = "-" * len(line(header))
    return "\n".join([line(header), rule, *map(line, rows[:-1]), rule, line(rows[-1])])


def _percent(value: float | None) -> str:
    if value is None:
        return "n/a"
    return "-" if math.isnan(value) else f"{100.0 * value:.1f}"
