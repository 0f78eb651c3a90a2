"""Batch-wise accumulation of a test set and the per-category metric table.

[`AnomalyEvaluator`][cncad.evaluation.AnomalyEvaluator] keeps, per category, the image scores and
labels and the anomaly maps and masks at the evaluation resolution chosen by the caller (256 x 256
in the usual protocol: 0.25 MiB per image as float32, half that as float16), then computes
the seven metrics of [`cncad.metrics`][cncad.metrics] per category and their mean over categories,
the "Mean" row of the paper's tables.

A metric that is undefined for a category (a single class present) is reported as NaN
and left out of the mean; see
[`AnomalyEvaluator.compute`][cncad.evaluation.AnomalyEvaluator.compute].
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cncad.metrics import (
    ArrayLike,
    _as_image_labels,
    _as_masks,
    _as_scores,
    _check_aupro_options,
    image_metrics,
    pixel_metrics,
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


@dataclass
class _CategoryBuffer:
    """What one category has accumulated so far (lists of per-batch arrays)."""

    map_shape: tuple[int, int]
    scores: list[np.ndarray] = field(default_factory=list)
    labels: list[np.ndarray] = field(default_factory=list)
    maps: list[np.ndarray] = field(default_factory=list)
    masks: list[np.ndarray] = field(default_factory=list)

    @staticmethod
    def _merge(chunks: list[np.ndarray]) -> np.ndarray:
        # Keep the merged array as the only chunk so that later calls do not copy again.
        if len(chunks) > 1:
            chunks[:] = [np.concatenate(chunks)]
        return chunks[0]

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        return (
            self._merge(self.scores),
            self._merge(self.labels),
            self._merge(self.maps),
            self._merge(self.masks),
        )


class AnomalyEvaluator:
    """Accumulate test batches and compute the seven metrics per category.

    Maps and masks must already be at the evaluation resolution (the caller resizes;
    masks are binarised as ``mask > 0``). Maps are stored as ``map_dtype`` (float32 by
    default; float16 halves the memory but rounds the scores, which can create ties and
    change the pixel metrics slightly), masks as bool, scores as float64.

    Args:
        aupro_fpr_limit: FPR limit of the AUPRO integral, in (0, 1].
        aupro_num_thresholds: None for the exact AUPRO, or the number of evenly spaced
            thresholds of the RD4AD-style approximation (see [`aupro`][cncad.metrics.aupro]).
        map_dtype: ``np.float32`` or ``np.float16``, the storage type of the maps.

    Example:
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
    ) -> None:
        """Add one batch.

        Args:
            scores: ``(B,)`` image anomaly scores, higher meaning more anomalous.
            labels: ``(B,)`` image labels, ``1``/``True`` for anomalous images.
            maps: ``(B, h, w)`` anomaly maps at the evaluation resolution.
            masks: ``(B, h, w)`` ground-truth masks at the same resolution; anomalous
                where ``mask > 0``.
            categories: ``B`` category names, one per image.

        Raises:
            ValueError: On inconsistent batch sizes or shapes, NaN or infinite values
                (also after the cast to ``map_dtype``), non-binary labels, or a map size
                that differs from earlier batches of the same category.
        """
        scores_np = _as_scores(scores, "scores", ndim=1).astype(np.float64, copy=False)
        labels_np = _as_image_labels(labels, "labels")
        maps_np = _as_scores(maps, "maps", ndim=3)
        masks_np = _as_masks(masks, "masks")
        batch_size = scores_np.shape[0]
        names = [categories] if isinstance(categories, str) else list(categories)
        sizes = {
            "labels": labels_np.shape[0],
            "maps": maps_np.shape[0],
            "masks": masks_np.shape[0],
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

        names_np = np.asarray(names, dtype=object)
        for name in dict.fromkeys(names):
            if not isinstance(name, str):
                raise ValueError(f"categories must be strings, got {name!r}")
            rows = np.flatnonzero(names_np == name)
            buffer = self._buffers.get(name)
            if buffer is None:
                buffer = self._buffers[name] = _CategoryBuffer(map_shape=maps_np.shape[1:])
            elif buffer.map_shape != maps_np.shape[1:]:
                raise ValueError(
                    f"category {name!r}: maps of size {maps_np.shape[1:]} after earlier "
                    f"batches of size {buffer.map_shape}"
                )
            buffer.scores.append(scores_np[rows])
            buffer.labels.append(labels_np[rows])
            buffer.maps.append(maps_np[rows])  # fancy indexing copies: no view on the input
            buffer.masks.append(masks_np[rows])

    def compute(self) -> dict[str, Any]:
        """Compute the metrics of every category and their mean over categories.

        NaN rule: the image metrics of a category are NaN when its images are all normal
        or all anomalous; its pixel metrics are NaN when its masks have no anomalous
        pixel or no normal pixel. The ``"mean"`` row averages each metric over the
        categories where it is defined (NaN only if it is defined nowhere).

        Returns:
            ``{"per_category": {category: {metric: float, ..., "n_images": int}},
            "mean": {metric: float, ..., "n_images": int}}`` with the metrics named by
            [`METRIC_NAMES`][cncad.evaluation.METRIC_NAMES], as fractions in [0, 1], categories in
            order of first appearance and ``"mean"["n_images"]`` the total number of images.

        Raises:
            ValueError: If nothing was accumulated.
        """
        if not self._buffers:
            raise ValueError("no data: call update() before compute()")
        per_category: dict[str, dict[str, float | int]] = {}
        for name, buffer in self._buffers.items():
            scores, labels, maps, masks = buffer.arrays()
            row: dict[str, float | int] = dict.fromkeys(METRIC_NAMES, math.nan)
            if 0 < np.count_nonzero(labels) < labels.size:
                image = image_metrics(scores, labels)
                row.update({I_AUROC: image.auroc, I_AP: image.ap, I_F1_MAX: image.f1_max})
            if 0 < np.count_nonzero(masks) < masks.size:
                pixel = pixel_metrics(
                    maps,
                    masks,
                    aupro_fpr_limit=self.aupro_fpr_limit,
                    aupro_num_thresholds=self.aupro_num_thresholds,
                )
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

        mean: dict[str, float | int] = {}
        for metric in METRIC_NAMES:
            defined = [row[metric] for row in per_category.values() if not math.isnan(row[metric])]
            mean[metric] = math.fsum(defined) / len(defined) if defined else math.nan
        mean[N_IMAGES] = sum(int(row[N_IMAGES]) for row in per_category.values())
        return {"per_category": per_category, "mean": mean}


def format_table(results: Mapping[str, Any], metrics: Sequence[str] = METRIC_NAMES) -> str:
    """Render evaluation results as a plain-text table.

    The results are those of
    [`AnomalyEvaluator.compute`][cncad.evaluation.AnomalyEvaluator.compute].

    One row per category plus a final "Mean" row; metrics in percent with one decimal
    (as in the paper's tables), undefined (NaN) values as ``-``.

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


def _percent(value: float) -> str:
    return "-" if math.isnan(value) else f"{100.0 * value:.1f}"
