"""What the torch and the torch-free detector share: thresholds, decisions, batching.

[`CNCDetector`][cncad.detector.CNCDetector] and [`ONNXDetector`][cncad.deploy.ONNXDetector]
run different engines (torch, onnxruntime) on different arrays (tensors, numpy),
but decide alike: the same validated thresholds, the same choice of thresholds and
calibration for a category, the same labels, masks and normalised values from scores and
maps, the same batching of a decoded stream and the same joining of batches into one
prediction. That logic lives here once; the array operations it needs are passed in or
used by duck typing (``>=``, ``.shape``, and
[`Calibration.image`][cncad.calibration.Calibration.image] take both kinds). The number
checks serve [`cncad.visualize`][cncad.visualize] too. Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, ClassVar, NamedTuple, Protocol, TypeVar

from cncad._decode import DecodeFailure
from cncad.calibration import Calibration

__all__ = [
    "Decision",
    "Thresholds",
    "check_count",
    "check_optional_finite",
    "join_batches",
    "progress_bar",
    "scored_batch",
    "scored_stream",
    "stream_length",
]

_Made = TypeVar("_Made")
_Item = TypeVar("_Item", bound="_DecodedItem")


class _DecodedItem(Protocol):
    """What both detectors' decoded items have: their place, file and kept image."""

    @property
    def index(self) -> int: ...

    @property
    def source(self) -> str | None: ...

    @property
    def image(self) -> Any: ...


class _Bar(Protocol):
    def update(self, count: int) -> Any: ...

    def close(self) -> Any: ...


class Decision(NamedTuple):
    """Thresholds and normalisation applied to one prediction stream.

    Attributes:
        threshold: Image score from which an image is anomalous, or None (no labels).
        pixel_threshold: Map value from which a pixel is anomalous, or None (no masks).
        calibration: The normalisation of scores and maps, or None (no normalised values).
    """

    threshold: float | None
    pixel_threshold: float | None
    calibration: Calibration | None


def check_count(value: Any, name: str, minimum: int) -> int:
    """``value`` checked to be an integer (not a bool) of at least ``minimum``.

    Args:
        value: The value given.
        name: Its name, for the error message.
        minimum: The smallest value allowed.

    Returns:
        ``value``.

    Raises:
        TypeError: Not an integer.
        ValueError: Below ``minimum``.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
    return value


def check_optional_finite(value: Any, name: str) -> float | None:
    """``value`` as a float, checked to be a finite real number, or None.

    Args:
        value: The value given.
        name: Its name, for the error message.

    Returns:
        ``float(value)``, or None when ``value`` is None.

    Raises:
        TypeError: Not a real number (a bool is not one).
        ValueError: NaN or infinite.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number or None, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number or None, got {value!r}")
    return float(value)


class Thresholds:
    """The thresholds and calibration of a detector, and the decision they make.

    Attributes:
        calibration: The detector's [`Calibration`][cncad.calibration.Calibration], or None.
    """

    _CALIBRATE_HINT: ClassVar[str] = "calibrate it with per_category=True"
    """How to get a detector that ``category=`` can be used with, for the error message."""

    calibration: Calibration | None
    _threshold: float | None
    _pixel_threshold: float | None

    @property
    def threshold(self) -> float | None:
        """Image score from which an image is anomalous, or None (no labels)."""
        return self._threshold

    @threshold.setter
    def threshold(self, value: float | None) -> None:
        self._threshold = check_optional_finite(value, "threshold")

    @property
    def pixel_threshold(self) -> float | None:
        """Map value from which a pixel is anomalous, or None (then ``threshold``)."""
        return self._pixel_threshold

    @pixel_threshold.setter
    def pixel_threshold(self, value: float | None) -> None:
        self._pixel_threshold = check_optional_finite(value, "pixel_threshold")

    def _decision(self, category: str | None) -> Decision:
        """The thresholds and normalisation that predictions for ``category`` use."""
        if category is None:
            pixel = self.pixel_threshold if self.pixel_threshold is not None else self.threshold
            return Decision(self.threshold, pixel, self.calibration)
        if self.calibration is None:
            raise ValueError(
                f"category={category!r} needs a calibrated detector: "
                f"{self._CALIBRATE_HINT}, or omit category"
            )
        calibration = self.calibration.for_category(category)
        return Decision(calibration.threshold, calibration.pixel_threshold, calibration)


def scored_batch(
    make: Callable[..., _Made],
    decoded: Sequence[_DecodedItem],
    failures: list[DecodeFailure],
    pred_score: Any,
    maps: list[Any],
    decision: Decision,
) -> _Made:
    """One batch of a ``predict_iter`` stream, labelled and normalised by ``decision``.

    Args:
        make: The detector's ``PredictionBatch`` class.
        decoded: The ``b`` decoded items scored, in order.
        failures: The inputs of this stretch of the stream that could not be read.
        pred_score: ``(b,)`` image scores (a tensor or an array).
        maps: ``b`` maps ``(H_i, W_i)``, each at its input's own size.
        decision: The thresholds and calibration to apply.

    Returns:
        ``make(...)`` with every field of a ``PredictionBatch``.
    """
    threshold, pixel_threshold, calibration = decision
    pred_label = pred_score >= threshold if threshold is not None else None
    pred_mask = None if pixel_threshold is None else [m >= pixel_threshold for m in maps]
    norm_score = norm_map = None
    if calibration is not None:
        norm_score = calibration.image(pred_score)
        norm_map = [calibration.pixel(m) for m in maps]
    return make(
        indices=[item.index for item in decoded],
        paths=[item.source for item in decoded],
        pred_score=pred_score,
        anomaly_map=maps,
        pred_label=pred_label,
        pred_mask=pred_mask,
        images=[item.image for item in decoded]
        if decoded and decoded[0].image is not None
        else None,
        failures=failures,
        norm_score=norm_score,
        norm_map=norm_map,
    )


def scored_stream(
    stream: Iterable[_Item | DecodeFailure],
    batch_size: int,
    score: Callable[[list[_Item], list[DecodeFailure]], _Made],
    *,
    total: int | None,
    progress: bool,
) -> Iterator[_Made]:
    """Score a decoded stream in batches of ``batch_size`` decoded items.

    The failures met on the way travel with the batch they fell in; the last batch may be
    smaller, or hold only failures. A progress bar (tqdm, when asked for and installed)
    counts the inputs of each batch before it is yielded, and is closed when the stream
    ends or the caller stops.

    Args:
        stream: Decoded items and failures, in input order.
        batch_size: Decoded items per batch.
        score: Scores one batch: ``score(decoded, failures)``.
        total: The number of inputs, when known (``stream_length(images)``).
        progress: Show the progress bar.

    Yields:
        ``score(decoded, failures)`` per batch, in input order.
    """
    with contextlib.closing(progress_bar(total, progress)) as bar:
        decoded: list[_Item] = []
        failures: list[DecodeFailure] = []
        for item in stream:
            if isinstance(item, DecodeFailure):
                failures.append(item)
            else:
                decoded.append(item)
            if len(decoded) == batch_size:
                bar.update(len(decoded) + len(failures))
                yield score(decoded, failures)
                decoded, failures = [], []
        if decoded or failures:
            bar.update(len(decoded) + len(failures))
            yield score(decoded, failures)


def stream_length(images: Any) -> int | None:
    """The number of inputs when ``images`` is a list or tuple (a progress bar's total)."""
    return len(images) if isinstance(images, (list, tuple)) else None


class _NoBar:
    def update(self, count: int) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int | None, progress: bool) -> _Bar:
    """A tqdm bar over ``total`` images, or one that shows nothing.

    Args:
        total: The number of images, when known.
        progress: Show the bar; without tqdm installed nothing is shown either way.

    Returns:
        An object with ``update(n)`` and ``close()``.
    """
    if not progress:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc="predict", unit="img")


def join_batches(
    make: Callable[..., _Made],
    batches: list[Any],
    concatenate: Callable[[list[Any]], Any],
    stack: Callable[[list[Any]], Any],
) -> _Made:
    """One ``Prediction`` from the ``PredictionBatch`` es of a stream.

    Args:
        make: The detector's ``Prediction`` class.
        batches: The batches, in order.
        concatenate: Joins ``(b,)`` vectors (``torch.cat``, ``np.concatenate``).
        stack: Stacks maps of one size into ``(B, H, W)`` (``torch.stack``, ``np.stack``);
            maps of different sizes stay a list.

    Returns:
        ``make(pred_score, anomaly_map, pred_label, pred_mask, norm_score, norm_map)``.

    Raises:
        ValueError: The batches hold no images.
    """
    maps = [amap for batch in batches for amap in batch.anomaly_map]
    if not maps:
        raise ValueError("predict got no images")
    same_size = len({m.shape for m in maps}) == 1

    def together(arrays: list[Any]) -> Any:
        return stack(arrays) if same_size else arrays

    first = batches[0]
    pred_label = pred_mask = norm_score = norm_map = None
    if first.pred_label is not None:
        pred_label = concatenate([batch.pred_label for batch in batches])
    if first.pred_mask is not None:
        pred_mask = together([mask for batch in batches for mask in batch.pred_mask])
    if first.norm_score is not None:
        norm_score = concatenate([batch.norm_score for batch in batches])
        norm_map = together([amap for batch in batches for amap in batch.norm_map])
    pred_score = concatenate([batch.pred_score for batch in batches])
    return make(pred_score, together(maps), pred_label, pred_mask, norm_score, norm_map)
