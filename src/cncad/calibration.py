"""Thresholds and normalised scores from calibration data, without torch.

[`CNCDetector.calibrate`][cncad.detector.CNCDetector.calibrate] scores a calibration set and
hands the raw values to this module, which chooses the thresholds and the normalisation:

- **Normal images only** (method ``"fpr"``): the image threshold is the smallest candidate
  ``t`` at which the fraction of normal images with ``score >= t`` is at most
  ``target_fpr``; the pixel threshold likewise over the pixels of the normal images.
- **Labelled anomalies present** (method ``"f1"``): the threshold that maximises the F1
  score of ``score >= t`` against the labels (images) or masks (pixels). Without any mask
  pixel on the anomalous images, the pixel threshold falls back to ``"fpr"`` on the pixels
  of the normal images.

The candidates are the observed image scores (exact; the chosen one is then moved half way
down to the next lower score, which changes no decision on the calibration images but
keeps a recomputed score from flipping), and for pixels the lower edges of
the bins of a fixed histogram with a relative width of ``2**-11`` (about 0.05 %); the
counts are exact for those candidates, and memory does not grow with the number of images
(see [`PixelHistogram`][cncad.calibration.PixelHistogram]).

[`ScoreNormalization`][cncad.calibration.ScoreNormalization] maps raw values monotonically
to ``[0, 1]`` with ``0.5`` at the threshold. This module imports only numpy and the
standard library, so the torch-free runtime uses it as well.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from cncad.errors import CNCADError

__all__ = [
    "METHODS",
    "Calibration",
    "CalibrationError",
    "PixelHistogram",
    "ScoreNormalization",
    "calibrate_arrays",
    "check_target_fpr",
    "f1_threshold",
    "fpr_threshold",
    "required_normal_images",
]

METHODS = ("fpr", "f1")
"""How a threshold was chosen: ``"fpr"`` (false-alarm rate on normal data) or ``"f1"``."""

_T = TypeVar("_T")


class CalibrationError(CNCADError, ValueError):
    """The calibration data cannot support the requested choice of thresholds."""


# ---------------------------------------------------------------------------- normalisation
@dataclass(frozen=True)
class ScoreNormalization:
    """A threshold and the monotone map of raw values to ``[0, 1]`` around it.

    The mapping is anomalib's min-max convention::

        norm(x) = clip((x - threshold) / (high - low) + 0.5, 0, 1)

    with ``low`` and ``high`` the smallest and largest raw values seen on the calibration
    data. It is non-decreasing, ``norm(threshold) == 0.5``, and ``norm(x) > 0.5`` exactly
    when ``x > threshold`` up to rounding. When ``high == low`` (every calibration value
    was the same) the scale ``high - low`` is replaced by ``1.0`` (raw units), so nothing
    divides by zero and the map keeps its properties.

    Decisions (``pred_label``, ``pred_mask``) always compare the raw value with
    ``threshold``; the normalised value is for display and for operators.

    Examples:
        >>> norm = ScoreNormalization(threshold=2.0, low=1.0, high=5.0)
        >>> float(norm(2.0)), float(norm(4.0)), float(norm(9.0))
        (0.5, 1.0, 1.0)
        >>> norm(np.array([0.0, 1.0, 3.0])).tolist()
        [0.0, 0.25, 0.75]

    Attributes:
        threshold: Raw value from which an image or pixel is anomalous.
        low: Smallest raw value of the calibration data.
        high: Largest raw value of the calibration data (``>= low``).
    """

    threshold: float
    low: float
    high: float

    def __post_init__(self) -> None:
        for name in ("threshold", "low", "high"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)):
                raise TypeError(f"ScoreNormalization.{name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"ScoreNormalization.{name} must be finite, got {value}")
            object.__setattr__(self, name, float(value))
        if self.high < self.low:
            raise ValueError(
                f"ScoreNormalization needs low <= high, got low={self.low}, high={self.high}"
            )

    @property
    def scale(self) -> float:
        """The divisor ``high - low``, or ``1.0`` when that is zero."""
        span = self.high - self.low
        return span if span > 0 else 1.0

    def __call__(self, values: _T) -> _T:
        """Normalise raw values.

        Uses only arithmetic and ``.clip(0, 1)``, so it works unchanged on numpy arrays,
        numpy scalars and torch tensors (also while tracing an export), and returns the
        same type. Python numbers give a float.

        Args:
            values: Raw scores or maps of any shape.

        Returns:
            The normalised values, same shape and type, in ``[0, 1]``.
        """
        if isinstance(values, (int, float)) and not isinstance(values, bool):
            return min(max((float(values) - self.threshold) / self.scale + 0.5, 0.0), 1.0)  # type: ignore[return-value]
        return ((values - self.threshold) / self.scale + 0.5).clip(0, 1)  # type: ignore[operator,attr-defined]

    def to_dict(self) -> dict[str, float]:
        """``{"threshold", "low", "high"}`` as plain floats (JSON-able)."""
        return {"threshold": self.threshold, "low": self.low, "high": self.high}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ScoreNormalization:
        """Rebuild from [`to_dict`][cncad.calibration.ScoreNormalization.to_dict]'s output.

        Args:
            data: A mapping with the numbers ``threshold``, ``low`` and ``high``.

        Returns:
            The normalisation.

        Raises:
            ValueError: A key is missing or extra, or a value is not a finite number.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"a score normalisation must be a dict, got {type(data).__name__}")
        keys = {"threshold", "low", "high"}
        if set(data) != keys:
            raise ValueError(
                f"a score normalisation needs exactly the keys {sorted(keys)}, got {sorted(data)}"
            )
        try:
            return cls(threshold=data["threshold"], low=data["low"], high=data["high"])
        except TypeError as error:
            raise ValueError(str(error)) from error


# ---------------------------------------------------------------------------- calibration
@dataclass(frozen=True)
class Calibration:
    """What [`CNCDetector.calibrate`][cncad.detector.CNCDetector.calibrate] chose, and from what.

    Attributes:
        image: Image-score threshold and normalisation.
        pixel: Anomaly-map threshold and normalisation.
        method: How the image threshold was chosen: ``"fpr"`` (normal images only) or
            ``"f1"`` (labelled anomalies present).
        target_fpr: The false-alarm rate asked for (used by every ``"fpr"`` choice).
        normal_images: Normal images in the calibration data.
        anomalous_images: Anomalous images in the calibration data.
        pixel_method: How the pixel threshold was chosen: ``"f1"`` when some anomalous
            image had a mask pixel, else ``"fpr"`` on the normal images' pixels.
        eval_size: Side of the square grid on which maps were compared (pixel values are
            counted there).
        per_category: One calibration per category (``calibrate(per_category=True)``),
            else empty.
    """

    image: ScoreNormalization
    pixel: ScoreNormalization
    method: str
    target_fpr: float | None
    normal_images: int
    anomalous_images: int
    per_category: dict[str, Calibration] = field(default_factory=dict)
    pixel_method: str | None = None
    eval_size: int | None = None

    def __post_init__(self) -> None:
        for name in ("image", "pixel"):
            if not isinstance(getattr(self, name), ScoreNormalization):
                raise TypeError(f"Calibration.{name} must be a ScoreNormalization")
        if self.method not in METHODS:
            raise ValueError(f"Calibration.method must be one of {METHODS}, got {self.method!r}")
        pixel_method = self.method if self.pixel_method is None else self.pixel_method
        if pixel_method not in METHODS:
            raise ValueError(
                f"Calibration.pixel_method must be one of {METHODS}, got {pixel_method!r}"
            )
        object.__setattr__(self, "pixel_method", pixel_method)
        if self.target_fpr is not None:
            object.__setattr__(self, "target_fpr", check_target_fpr(self.target_fpr))
        for name in ("normal_images", "anomalous_images"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                raise ValueError(f"Calibration.{name} must be a count >= 0, got {value!r}")
            object.__setattr__(self, name, int(value))
        if self.eval_size is not None and (
            isinstance(self.eval_size, bool)
            or not isinstance(self.eval_size, (int, np.integer))
            or self.eval_size < 1
        ):
            raise ValueError("Calibration.eval_size must be a positive integer or None")
        if not isinstance(self.per_category, Mapping):
            raise TypeError("Calibration.per_category must be a dict of name -> Calibration")
        for name, child in self.per_category.items():
            if not isinstance(name, str) or not isinstance(child, Calibration):
                raise TypeError("Calibration.per_category must be a dict of name -> Calibration")
            if child.per_category:
                raise ValueError("a per-category Calibration cannot hold categories itself")
        object.__setattr__(self, "per_category", dict(self.per_category))

    @property
    def threshold(self) -> float:
        """The image-score threshold (``image.threshold``)."""
        return self.image.threshold

    @property
    def pixel_threshold(self) -> float:
        """The anomaly-map threshold (``pixel.threshold``)."""
        return self.pixel.threshold

    @property
    def categories(self) -> list[str]:
        """The names in ``per_category``, sorted."""
        return sorted(self.per_category)

    def for_category(self, category: str | None) -> Calibration:
        """The calibration to apply to images of ``category``.

        Args:
            category: A category name, or None for this (global) calibration.

        Returns:
            ``per_category[category]``, or ``self`` when ``category`` is None.

        Raises:
            CalibrationError: ``category`` is not one of ``per_category`` (the message lists
                the known ones, or says that the calibration is not per category).
        """
        if category is None:
            return self
        if not isinstance(category, str):
            raise TypeError(f"category must be a string or None, got {category!r}")
        if category in self.per_category:
            return self.per_category[category]
        if not self.per_category:
            raise CalibrationError(
                f"no thresholds for category {category!r}: the detector was calibrated for "
                "all categories together (calibrate with per_category=True, or omit category)"
            )
        raise CalibrationError(
            f"no thresholds for category {category!r}; calibrated categories: "
            f"{', '.join(self.categories)}"
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (stored in detector files and ONNX metadata).

        Returns:
            ``{"image": {...}, "pixel": {...}, "method", "pixel_method", "target_fpr",
            "normal_images", "anomalous_images", "eval_size", "per_category": {name: {...}}}``.
        """
        return {
            "image": self.image.to_dict(),
            "pixel": self.pixel.to_dict(),
            "method": self.method,
            "pixel_method": self.pixel_method,
            "target_fpr": self.target_fpr,
            "normal_images": self.normal_images,
            "anomalous_images": self.anomalous_images,
            "eval_size": self.eval_size,
            "per_category": {name: child.to_dict() for name, child in self.per_category.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Calibration:
        """Rebuild from [`to_dict`][cncad.calibration.Calibration.to_dict]'s output.

        Args:
            data: The mapping; ``pixel_method``, ``eval_size`` and ``per_category`` may be
                missing.

        Returns:
            The calibration.

        Raises:
            ValueError: An entry is missing, unknown, or of the wrong type or value; one
                line says which.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"a calibration must be a dict, got {type(data).__name__}")
        required = {"image", "pixel", "method", "target_fpr", "normal_images", "anomalous_images"}
        optional = {"pixel_method", "eval_size", "per_category"}
        missing = required - set(data)
        unknown = set(data) - required - optional
        if missing or unknown:
            raise ValueError(
                f"a calibration dict lacks {sorted(missing)} or has unknown keys {sorted(unknown)}"
            )
        children = data.get("per_category") or {}
        if not isinstance(children, Mapping):
            raise ValueError("a calibration's 'per_category' must be a dict")
        try:
            return cls(
                image=ScoreNormalization.from_dict(data["image"]),
                pixel=ScoreNormalization.from_dict(data["pixel"]),
                method=data["method"],
                target_fpr=data["target_fpr"],
                normal_images=data["normal_images"],
                anomalous_images=data["anomalous_images"],
                per_category={str(k): cls.from_dict(v) for k, v in children.items()},
                pixel_method=data.get("pixel_method"),
                eval_size=data.get("eval_size"),
            )
        except TypeError as error:
            raise ValueError(str(error)) from error

    def summary(self) -> str:
        """One line: the method, the thresholds and the counts behind them."""
        fpr = f", target_fpr={self.target_fpr:g}" if self.target_fpr is not None else ""
        cats = f", {len(self.per_category)} categories" if self.per_category else ""
        return (
            f"threshold={self.threshold:.6g} ({self.method}), "
            f"pixel_threshold={self.pixel_threshold:.6g} ({self.pixel_method}){fpr}; "
            f"from {self.normal_images} normal and {self.anomalous_images} anomalous images"
            f"{cats}"
        )


# ---------------------------------------------------------------------------- threshold math
def check_target_fpr(target_fpr: Any) -> float:
    """Validate a false-alarm rate.

    Args:
        target_fpr: A number strictly between 0 and 1.

    Returns:
        It, as a float.

    Raises:
        TypeError: It is not a real number (bools included).
        ValueError: It is NaN or not in ``(0, 1)``.
    """
    if isinstance(target_fpr, bool) or not isinstance(
        target_fpr, (int, float, np.integer, np.floating)
    ):
        raise TypeError(f"target_fpr must be a number in (0, 1), got {target_fpr!r}")
    value = float(target_fpr)
    if not 0.0 < value < 1.0:  # also False for NaN
        raise ValueError(f"target_fpr must be a number in (0, 1), got {target_fpr!r}")
    return value


def _allowed_alarms(n: int, target_fpr: float) -> int:
    """The largest ``k`` with ``k / n <= target_fpr``."""
    k = math.floor(n * target_fpr)
    while k + 1 <= n and (k + 1) / n <= target_fpr:
        k += 1
    while k > 0 and k / n > target_fpr:
        k -= 1
    return k


def required_normal_images(target_fpr: float) -> int:
    """The fewest normal images that can measure ``target_fpr``.

    That is the smallest ``n`` with ``1 / n <= target_fpr``: one false alarm allowed.

    With fewer, not one false alarm would be allowed and the threshold would just sit
    above the largest score seen.

    Examples:
        >>> required_normal_images(0.01), required_normal_images(0.3)
        (100, 4)

    Args:
        target_fpr: A false-alarm rate in ``(0, 1)``.

    Returns:
        ``ceil(1 / target_fpr)`` (exactly, in floating point).
    """
    target_fpr = check_target_fpr(target_fpr)
    n = max(1, math.ceil(1.0 / target_fpr))
    while n > 1 and 1.0 / (n - 1) <= target_fpr:
        n -= 1
    while 1.0 / n > target_fpr:
        n += 1
    return n


def fpr_threshold(
    candidates: np.ndarray, negatives: np.ndarray, target_fpr: float, above: float
) -> float:
    """The smallest candidate keeping the false-alarm rate at or below ``target_fpr``.

    A value ``x`` is an alarm at threshold ``t`` when ``x >= t``. With ``n`` negatives and
    ``k`` the largest integer with ``k / n <= target_fpr``, this returns the smallest
    ``candidates[i]`` for which at most ``k`` negatives are ``>= candidates[i]``. Ties
    count together: a value shared by several negatives is above or below the threshold
    for all of them, so the achieved rate can be below ``target_fpr``. When no candidate
    qualifies (the largest values tie), it returns ``above``.

    Args:
        candidates: ``(m,)`` increasing candidate thresholds.
        negatives: ``(m,)`` counts: how many negatives fall at candidate ``i`` (at or
            above it and below candidate ``i + 1``).
        target_fpr: Allowed false-alarm rate in ``(0, 1)``.
        above: A threshold above every value, returned when no candidate qualifies.

    Returns:
        The threshold.

    Raises:
        CalibrationError: There are no negatives.
    """
    negatives = np.asarray(negatives, dtype=np.int64)
    n = int(negatives.sum())
    if n == 0:
        raise CalibrationError("no normal values to measure a false-alarm rate on")
    allowed = _allowed_alarms(n, target_fpr)
    alarms = np.cumsum(negatives[::-1])[::-1]  # alarms[i]: negatives >= candidates[i]
    ok = np.flatnonzero(alarms <= allowed)
    return float(candidates[ok[0]]) if ok.size else float(above)


def f1_threshold(candidates: np.ndarray, negatives: np.ndarray, positives: np.ndarray) -> float:
    """The candidate threshold with the largest F1 score of ``x >= t``.

    ``F1(t) = 2 TP / (2 TP + FP + FN)`` with ``TP``/``FP`` the positives/negatives at or
    above ``t`` and ``FN`` the positives below it. Among thresholds with equal F1 the
    largest is taken (the fewest alarms).

    Args:
        candidates: ``(m,)`` increasing candidate thresholds.
        negatives: ``(m,)`` negatives at each candidate (as in
            [`fpr_threshold`][cncad.calibration.fpr_threshold]).
        positives: ``(m,)`` positives at each candidate.

    Returns:
        The threshold.

    Raises:
        CalibrationError: There are no positives.
    """
    positives = np.asarray(positives, dtype=np.int64)
    negatives = np.asarray(negatives, dtype=np.int64)
    total = int(positives.sum())
    if total == 0:
        raise CalibrationError("no anomalous values to compute an F1 score on")
    tp = np.cumsum(positives[::-1])[::-1].astype(np.float64)
    fp = np.cumsum(negatives[::-1])[::-1].astype(np.float64)
    f1 = 2 * tp / (tp + fp + total)
    best = np.flatnonzero(f1 == f1.max())
    return float(candidates[best[-1]])


def _above_float32(value: float) -> float:
    return float(np.nextafter(np.float32(value), np.float32(np.inf)))


# ---------------------------------------------------------------------------- pixel histogram
_KEY_SHIFT = 12  # 32 - 12 = 20 key bits: sign, exponent and 11 bits of mantissa


def _ordered_keys(values: np.ndarray) -> np.ndarray:
    """uint32 keys whose order is the order of the float32 values (finite values)."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    negative = (bits >> 31).astype(bool)
    return np.where(negative, ~bits, bits | np.uint32(0x80000000))


def _key_floor(bins: np.ndarray) -> np.ndarray:
    """The smallest float32 value in each bin (the inverse of the key map at its lower edge)."""
    keys = (np.asarray(bins, dtype=np.int64) << _KEY_SHIFT).astype(np.uint32)
    positive = (keys >> 31).astype(bool)
    bits = np.where(positive, keys & np.uint32(0x7FFFFFFF), ~keys)
    return bits.astype(np.uint32).view(np.float32).astype(np.float64)


class PixelHistogram:
    """Exact counts of anomaly-map pixels in fine bins, with memory bounded by the bin range.

    Each float32 value falls in a bin made of all values sharing its sign, exponent and
    the top 11 bits of its mantissa, so a bin spans a relative width of at most
    ``2**-11``. Candidate thresholds are the bins' lower edges: for them, "value >= t" is
    decided by the bin alone, so the counts are exact. Only the range of bins seen is
    stored (at most ``2**20`` bins of four int64 counts, 32 MiB; typically a few
    thousand).

    Four counts are kept: pixels of normal images; background and mask pixels of
    anomalous images with a mask; pixels of anomalous images without any mask pixel
    (counted for ``low``/``high`` only: their labels are unknown).
    """

    def __init__(self) -> None:
        self._start = 0
        self._counts = np.zeros((4, 0), dtype=np.int64)  # normal, background, defect, unknown
        self.low = math.inf
        self.high = -math.inf

    @property
    def empty(self) -> bool:
        """Whether no pixel was added."""
        return self._counts.shape[1] == 0

    def add(self, values: np.ndarray, kind: int) -> None:
        """Count pixels.

        Args:
            values: Finite map values, any shape.
            kind: ``0`` pixels of normal images, ``1`` background pixels of anomalous
                images, ``2`` their mask pixels, ``3`` pixels of anomalous images without
                a mask.

        Raises:
            ValueError: A value is NaN or infinite.
        """
        values = np.asarray(values, dtype=np.float32).reshape(-1)
        if values.size == 0:
            return
        if not np.isfinite(values).all():
            raise ValueError("anomaly maps hold NaN or infinity; cannot calibrate on them")
        self.low = min(self.low, float(values.min()))
        self.high = max(self.high, float(values.max()))
        bins = (_ordered_keys(values) >> np.uint32(_KEY_SHIFT)).astype(np.int64)
        lo, hi = int(bins.min()), int(bins.max())
        self._cover(lo, hi)
        self._counts[kind] += np.bincount(bins - self._start, minlength=self._counts.shape[1])

    def _cover(self, lo: int, hi: int) -> None:
        if self.empty:
            self._start = lo
            self._counts = np.zeros((4, hi - lo + 1), dtype=np.int64)
            return
        start = min(self._start, lo)
        stop = max(self._start + self._counts.shape[1], hi + 1)
        if start == self._start and stop == self._start + self._counts.shape[1]:
            return
        grown = np.zeros((4, stop - start), dtype=np.int64)
        offset = self._start - start
        grown[:, offset : offset + self._counts.shape[1]] = self._counts
        self._start, self._counts = start, grown

    def merge(self, other: PixelHistogram) -> None:
        """Add another histogram's counts to this one.

        Args:
            other: A histogram (e.g. of one category).
        """
        if other.empty:
            return
        self._cover(other._start, other._start + other._counts.shape[1] - 1)
        offset = other._start - self._start
        self._counts[:, offset : offset + other._counts.shape[1]] += other._counts
        self.low = min(self.low, other.low)
        self.high = max(self.high, other.high)

    def count(self, kind: int) -> int:
        """Pixels of one kind (``0`` to ``3``, as in ``add``)."""
        return int(self._counts[kind].sum())

    def table(self) -> tuple[np.ndarray, np.ndarray, float]:
        """Candidate thresholds, counts, and a threshold above every pixel.

        Returns:
            ``(candidates (m,), counts (4, m), above)`` over the non-empty bins.
        """
        used = np.flatnonzero(self._counts.sum(axis=0))
        bins = used + self._start
        above = float(_key_floor(np.array([bins[-1] + 1]))[0])
        return _key_floor(bins), self._counts[:, used], above


# ---------------------------------------------------------------------------- choosing
def _image_threshold(
    scores: np.ndarray, labels: np.ndarray, target_fpr: float
) -> tuple[float, str]:
    candidates, inverse = np.unique(scores, return_inverse=True)
    negatives = np.bincount(inverse[labels == 0], minlength=len(candidates))
    positives = np.bincount(inverse[labels == 1], minlength=len(candidates))
    if positives.sum() > 0:
        threshold, method = f1_threshold(candidates, negatives, positives), "f1"
    else:
        above = _above_float32(float(candidates[-1]))
        threshold, method = fpr_threshold(candidates, negatives, target_fpr, above), "fpr"
    return _between_scores(threshold, candidates), method


def _between_scores(threshold: float, candidates: np.ndarray) -> float:
    """``threshold``, an observed score, moved half way down to the next lower one.

    Every calibration score falls on the same side of either, but a score that lands on
    the threshold itself is the one that flips when it is computed again with another
    batch size or on another runtime (float32 rounding, about 1e-7): half way, no score
    of the calibration set is that close. The result is a float32, so a float32 score
    equal to it normalises to exactly 0.5.
    """
    below = candidates[candidates < threshold]
    if below.size == 0:
        return threshold
    middle = float(np.float32((np.float64(below[-1]) + np.float64(threshold)) / 2))
    return middle if float(below[-1]) < middle < threshold else threshold


def calibrate_arrays(
    scores: np.ndarray,
    labels: np.ndarray,
    pixels: PixelHistogram,
    target_fpr: float,
    *,
    eval_size: int | None = None,
    what: str = "the calibration data",
) -> Calibration:
    """Choose thresholds and normalisations from scored calibration data.

    Args:
        scores: ``(N,)`` raw image scores.
        labels: ``(N,)`` 0 (normal) or 1 (anomalous).
        pixels: The counted map pixels of the same images.
        target_fpr: False-alarm rate for the ``"fpr"`` choices.
        eval_size: Grid side the pixels were counted at (recorded only).
        what: Names the data in error messages (e.g. ``"category 'bottle'"``).

    Returns:
        The [`Calibration`][cncad.calibration.Calibration] (without categories).

    Raises:
        CalibrationError: No images, no normal images, or fewer normal images than
            [`required_normal_images`][cncad.calibration.required_normal_images] when
            there are no anomalies.
    """
    target_fpr = check_target_fpr(target_fpr)
    scores = np.asarray(scores, dtype=np.float32).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    if scores.shape != labels.shape:
        raise ValueError(f"{scores.shape[0]} scores but {labels.shape[0]} labels")
    if scores.size == 0:
        raise CalibrationError(f"{what} holds no images")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f"labels must be 0 (normal) or 1 (anomalous) in {what}")
    if not np.isfinite(scores).all():
        raise ValueError(f"image scores in {what} hold NaN or infinity")
    labels = labels.astype(np.int64)
    normal = int((labels == 0).sum())
    anomalous = int(labels.size - normal)
    if normal == 0:
        raise CalibrationError(
            f"{what} holds only anomalous images ({anomalous}); calibration needs normal ones"
        )
    needed = required_normal_images(target_fpr)
    if anomalous == 0 and normal < needed:
        raise CalibrationError(
            f"{what} holds {normal} normal images; target_fpr={target_fpr:g} needs at least "
            f"{needed} (or labelled anomalies, or a larger target_fpr)"
        )
    threshold, method = _image_threshold(scores, labels, target_fpr)
    image = ScoreNormalization(threshold, float(scores.min()), float(scores.max()))

    if pixels.empty:
        raise CalibrationError(f"{what} gave no anomaly-map pixels")
    candidates, counts, above = pixels.table()
    if counts[2].sum() > 0:
        pixel_threshold = f1_threshold(candidates, counts[0] + counts[1], counts[2])
        pixel_method = "f1"
    else:
        pixel_threshold = fpr_threshold(candidates, counts[0], target_fpr, above)
        pixel_method = "fpr"
    pixel = ScoreNormalization(pixel_threshold, pixels.low, pixels.high)
    return Calibration(
        image=image,
        pixel=pixel,
        method=method,
        target_fpr=target_fpr,
        normal_images=normal,
        anomalous_images=anomalous,
        pixel_method=pixel_method,
        eval_size=eval_size,
    )
