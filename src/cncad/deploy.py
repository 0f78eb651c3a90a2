"""Run an exported detector without torch: onnxruntime, numpy and PIL.

[`ONNXDetector`][cncad.deploy.ONNXDetector] loads a file written by
[`CNCDetector.export`][cncad.detector.CNCDetector.export] and predicts like
[`CNCDetector.predict`][cncad.detector.CNCDetector.predict]: the same inputs, the same
[`Prediction`][cncad.deploy.Prediction] fields (numpy arrays instead of tensors), maps at each
input's own size, labels, masks and normalised scores from the thresholds and calibration
stored in the file. This module imports neither torch nor open_clip; it needs
``pip install cncad[deploy]`` (onnxruntime).

How it differs from the torch path: images at the model's size go through unchanged, and
their scores and maps equal ``CNCDetector.predict``'s up to float32 rounding (the tests
hold them to 1e-4). Other sizes are resized with PIL's bilinear filter on float32 pixels
(antialiased when shrinking, like ``F.interpolate(..., antialias=True)``: the resized pixels
agree to about 1e-5), and the maps are resized back with the same bilinear formula as
``F.interpolate(mode="bilinear", align_corners=False)``, written in numpy.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
from PIL import Image

from cncad._decode import (
    DECODE_ERRORS,
    DecodeFailure,
    iter_inputs,
    map_in_order,
    to_float_images,
)
from cncad._inference import (
    Decision,
    Thresholds,
    check_count,
    join_batches,
    scored_batch,
    scored_stream,
    stream_length,
)
from cncad.calibration import Calibration
from cncad.errors import ModelFileError, ModelVersionError

__all__ = [
    "FORMAT_TAG",
    "DecodeFailure",
    "ONNXDetector",
    "Prediction",
    "PredictionBatch",
    "resize_image",
    "resize_map",
]

FORMAT_TAG = "cncad-onnx/1"
"""The ``cncad.format`` metadata value of the ONNX files this version writes and reads."""

OnError = Literal["raise", "skip"]

_DEPLOY_HINT = "pip install cncad[deploy]"


class Prediction(NamedTuple):
    """Predictions for a batch of images, as numpy arrays.

    The fields of [`cncad.detector.Prediction`][cncad.detector.Prediction].

    Attributes:
        pred_score: ``(B,)`` float32 image anomaly scores.
        anomaly_map: ``(B, H, W)`` float32 maps at the inputs' own resolution; a list of
            ``(H_i, W_i)`` maps when the inputs differ in size.
        pred_label: ``(B,)`` bool, ``pred_score >= threshold``; None without a threshold.
        pred_mask: Like ``anomaly_map``, bool, ``anomaly_map >= pixel_threshold`` (default:
            ``threshold``); None without a threshold.
        norm_score: ``(B,)`` scores mapped to ``[0, 1]`` with 0.5 at the calibrated
            threshold; None when the exported detector was not calibrated.
        norm_map: Like ``anomaly_map``, mapped with the pixel normalisation; or None.
    """

    pred_score: np.ndarray
    anomaly_map: np.ndarray | list[np.ndarray]
    pred_label: np.ndarray | None
    pred_mask: np.ndarray | list[np.ndarray] | None
    norm_score: np.ndarray | None = None
    norm_map: np.ndarray | list[np.ndarray] | None = None


class PredictionBatch(NamedTuple):
    """One batch of [`ONNXDetector.predict_iter`][cncad.deploy.ONNXDetector.predict_iter].

    The fields of [`cncad.detector.PredictionBatch`][cncad.detector.PredictionBatch], as numpy
    arrays.

    Attributes:
        indices: Position of each image in the input stream.
        paths: Each image's file path when the input was one, else None.
        pred_score: ``(b,)`` image anomaly scores.
        anomaly_map: ``b`` float32 maps ``(H_i, W_i)``, each at its input's own size.
        pred_label: ``(b,)`` bool, or None.
        pred_mask: ``b`` bool maps, or None.
        images: With ``keep_images=True``, each ``(3, H_i, W_i)`` float32 image in ``[0, 1]``.
        failures: Inputs of this stretch of the stream that could not be read.
        norm_score: ``(b,)`` normalised scores, or None.
        norm_map: ``b`` normalised maps, or None.
    """

    indices: list[int]
    paths: list[str | None]
    pred_score: np.ndarray
    anomaly_map: list[np.ndarray]
    pred_label: np.ndarray | None
    pred_mask: list[np.ndarray] | None
    images: list[np.ndarray] | None
    failures: list[DecodeFailure]
    norm_score: np.ndarray | None = None
    norm_map: list[np.ndarray] | None = None


class _Decoded(NamedTuple):
    index: int
    source: str | None
    model_input: np.ndarray  # (3, S, S) float32 in [0, 1]
    size: tuple[int, int]
    image: np.ndarray | None


class ONNXDetector(Thresholds):
    """A detector exported to ONNX, run with onnxruntime; no torch needed.

    Examples:
        >>> detector = ONNXDetector("model.onnx")  # doctest: +SKIP
        >>> result = detector.predict(["a.png", "b.png"])  # doctest: +SKIP
        >>> result.pred_score, result.pred_label  # doctest: +SKIP

    Args:
        path: An ``.onnx`` file written by
            [`CNCDetector.export`][cncad.detector.CNCDetector.export].
        providers: onnxruntime execution providers in order of preference, e.g.
            ``["CUDAExecutionProvider", "CPUExecutionProvider"]``; None: the CPU.
        session_options: An ``onnxruntime.SessionOptions`` (threads, optimisation level).

    Attributes:
        path: The model file.
        session: The ``onnxruntime.InferenceSession``.
        image_size: The model's input side S.
        config: The detector's configuration, as a dict.
        version: The cncad version that exported the file.
        threshold: Image score from which an image is labelled anomalous, or None; starts
            as the exported detector's, and may be changed.
        pixel_threshold: Map value from which a pixel is anomalous (None: ``threshold``).
        calibration: The exported detector's [`Calibration`][cncad.calibration.Calibration],
            or None.
        normal_statistics: Its statistics on its normal training images, or None.
        batch_size: Images per run of the graph when ``predict`` is not told (starts as
            the exported ``config["batch_size"]``).
        layers: Its tapped encoder layers.
        metadata: All ``metadata_props`` of the file.

    Raises:
        ImportError: onnxruntime is not installed (the message says ``pip install cncad[deploy]``).
        FileNotFoundError: ``path`` does not exist.
        ModelFileError: The file is not an ONNX model, or not one exported by cncad.
        ModelVersionError: It was exported in a format this version cannot read.
        ValueError: An unknown provider.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        providers: Sequence[str | tuple[str, dict[str, Any]]] | None = None,
        session_options: Any = None,
    ) -> None:
        ort = _import_onnxruntime()
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a file path, got {type(path).__name__}")
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"ONNX model file not found: {self.path}")
        providers = _check_providers(providers, ort.get_available_providers())
        try:
            self.session = ort.InferenceSession(
                str(self.path), sess_options=session_options, providers=providers
            )
        except Exception as error:  # onnxruntime raises its own types for bad files
            first = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise ModelFileError(
                f"{self.path} is not a readable ONNX model ({type(error).__name__}: {first})"
            ) from error
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)
        meta = _Metadata(self.metadata, self.path)
        self.version: str = meta.text("cncad.version")
        self.config: dict[str, Any] = meta.json("cncad.config", dict)
        self.image_size: int = meta.json("cncad.image_size", int)
        self.layers: tuple[int, ...] = tuple(meta.json("cncad.layers", list))
        self.output_names: tuple[str, ...] = tuple(meta.json("cncad.outputs", list))
        self.threshold = meta.json("cncad.threshold", (float, int, type(None)))
        self.pixel_threshold = meta.json("cncad.pixel_threshold", (float, int, type(None)))
        calibration = meta.json("cncad.calibration", (dict, type(None)))
        try:
            self.calibration = None if calibration is None else Calibration.from_dict(calibration)
        except ValueError as error:
            raise ModelFileError(f"{self.path}: its calibration is damaged: {error}") from error
        self.normal_statistics: dict[str, float] | None = meta.json(
            "cncad.normal_statistics", (dict, type(None))
        )
        self.batch_size: int = check_count(self.config.get("batch_size", 8), "batch_size", 1)
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or "pred_score" not in self.output_names:
            raise ModelFileError(f"{self.path} does not have the inputs and outputs cncad writes")
        self._input_name = inputs[0].name

    _CALIBRATE_HINT = "calibrate it with per_category=True before exporting"

    @property
    def providers(self) -> list[str]:
        """The execution providers the session uses."""
        return list(self.session.get_providers())

    # ------------------------------------------------------------------ inference
    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Run the graph on a batch at the model's size; no resizing, no thresholds.

        Args:
            images: ``(N, 3, S, S)`` float32 images in ``[0, 1]``.

        Returns:
            The graph's outputs by name: ``pred_score`` ``(N,)``, ``anomaly_map``
            ``(N, S, S)`` and, as exported, ``pred_label``, ``pred_mask``, ``norm_score``,
            ``norm_map``.

        Raises:
            ValueError: ``images`` is not such a batch.
        """
        size = self.image_size
        if not isinstance(images, np.ndarray) or images.shape[1:] != (3, size, size):
            shape = getattr(images, "shape", type(images).__name__)
            raise ValueError(f"run expects a (N, 3, {size}, {size}) numpy array, got {shape}")
        if images.shape[0] == 0:
            raise ValueError("run got an empty batch")
        batch = np.ascontiguousarray(images, dtype=np.float32)
        values = self.session.run(None, {self._input_name: batch})
        names = [output.name for output in self.session.get_outputs()]
        return dict(zip(names, values, strict=True))

    def predict(
        self, images: Any, batch_size: int | None = None, *, category: str | None = None
    ) -> Prediction:
        """Score images and localise anomalies, as ``CNCDetector.predict`` does.

        See [`CNCDetector.predict`][cncad.detector.CNCDetector.predict].

        Args:
            images: A path, a PIL image, an ``HxWxC`` (or ``HxW``) uint8/uint16/float array
                (channels last), a channels-first torch tensor, a folder of images, or a
                list of these. Raw images in ``[0, 1]`` (float) or 0-255 (uint8).
            batch_size: Images per run of the graph (default: ``self.batch_size``).
            category: Apply this category's calibration (a detector calibrated with
                ``per_category=True``); None: ``threshold``, ``pixel_threshold`` and the
                global calibration.

        Returns:
            [`Prediction`][cncad.deploy.Prediction] with numpy arrays.

        Raises:
            ValueError: No images, or a bad argument.
            CalibrationError: ``category`` has no calibration.
        """
        batches = list(self.predict_iter(images, batch_size, progress=False, category=category))
        return join_batches(Prediction, batches, np.concatenate, np.stack)

    def predict_iter(
        self,
        images: Any,
        batch_size: int | None = None,
        *,
        num_workers: int = 0,
        progress: bool = True,
        keep_images: bool = False,
        on_error: OnError = "raise",
        category: str | None = None,
    ) -> Iterator[PredictionBatch]:
        """Score a stream of images batch by batch, with bounded memory.

        As [`CNCDetector.predict_iter`][cncad.detector.CNCDetector.predict_iter]: inputs are
        decoded by ``num_workers`` threads ahead of the graph (at most ``2 * batch_size``
        images), results come in input order.

        Args:
            images: What [`predict`][cncad.deploy.ONNXDetector.predict] takes, or any
                iterable of it (e.g. a generator of paths).
            batch_size: Images per run of the graph.
            num_workers: Decoding threads (0: decode on the calling thread).
            progress: Show a progress bar over images (when tqdm is installed).
            keep_images: Also return each decoded ``(3, H, W)`` image in ``[0, 1]``.
            on_error: ``"raise"``: an input that cannot be read raises; ``"skip"``: it is
                reported in the batch's ``failures`` and the stream goes on.
            category: Apply this category's calibration.

        Yields:
            [`PredictionBatch`][cncad.deploy.PredictionBatch]; the last may be smaller. A
            batch may hold only failures.
        """
        batch_size = check_count(
            self.batch_size if batch_size is None else batch_size, "batch_size", 1
        )
        num_workers = check_count(num_workers, "num_workers", 0)
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        decision = self._decision(category)
        stream = self._decode_stream(images, num_workers, 2 * batch_size, keep_images, on_error)

        def score(decoded: list[_Decoded], failures: list[DecodeFailure]) -> PredictionBatch:
            return self._score(decoded, failures, decision)

        yield from scored_stream(
            stream, batch_size, score, total=stream_length(images), progress=progress
        )

    def _score(
        self, decoded: list[_Decoded], failures: list[DecodeFailure], decision: Decision
    ) -> PredictionBatch:
        maps: list[np.ndarray] = []
        pred_score = np.zeros(0, dtype=np.float32)
        if decoded:
            outputs = self.run(np.stack([item.model_input for item in decoded]))
            pred_score = outputs["pred_score"].astype(np.float32, copy=False)
            maps = [
                resize_map(amap, item.size)
                for amap, item in zip(outputs["anomaly_map"], decoded, strict=True)
            ]
        return scored_batch(PredictionBatch, decoded, failures, pred_score, maps, decision)

    def _decode_stream(
        self, images: Any, workers: int, window: int, keep_images: bool, on_error: OnError
    ) -> Iterator[_Decoded | DecodeFailure]:
        size = self.image_size

        def decode(index: int, item: Any) -> _Decoded | DecodeFailure:
            source = str(item) if isinstance(item, (str, os.PathLike)) else None
            try:
                (image,) = to_float_images(item)
                model_input = resize_image(image, size)
            except DECODE_ERRORS as error:
                if on_error == "raise":
                    raise
                return DecodeFailure(index, source, f"{type(error).__name__}: {error}")
            height, width = image.shape[-2:]
            kept = image if keep_images else None
            return _Decoded(index, source, model_input, (int(height), int(width)), kept)

        yield from map_in_order(decode, iter_inputs(images), workers, window)

    def __repr__(self) -> str:
        return (
            f"ONNXDetector({str(self.path)!r}, image_size={self.image_size}, "
            f"providers={self.providers}, threshold={self.threshold})"
        )


# --------------------------------------------------------------------------------------
# Resizing (numpy + PIL)
# --------------------------------------------------------------------------------------


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """Resize a ``(3, H, W)`` float32 image to ``(3, size, size)``, bilinearly.

    PIL's bilinear filter on float32 (mode ``"F"``) pixels, antialiased when shrinking:
    the torch path's ``F.interpolate(mode="bilinear", antialias=True)`` computes the same
    weights (the results agree to about 1e-5 on ``[0, 1]`` pixels). An image already at
    ``size`` is returned unchanged.

    Args:
        image: ``(3, H, W)`` float32 array.
        size: The side of the square output.

    Returns:
        ``(3, size, size)`` float32 array.
    """
    if image.shape[-2:] == (size, size):
        return image
    channels = [
        np.asarray(
            Image.fromarray(np.ascontiguousarray(channel, dtype=np.float32)).resize(
                (size, size), Image.Resampling.BILINEAR
            )
        )
        for channel in image
    ]
    return np.stack(channels).astype(np.float32, copy=False)


def _linear_taps(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of 1-D linear resampling, ``align_corners=False``.

    PyTorch's formula, in float32 as its CPU kernel computes it: source position
    ``max((i + 0.5) * in / out - 0.5, 0)``, its two neighbours (clamped at the end) and the
    distance to the first as the second's weight.
    """
    scale = np.float32(size_in) / np.float32(size_out)
    position = (np.arange(size_out, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    position = np.maximum(position, np.float32(0.0))
    first = position.astype(np.int64)
    second = np.minimum(first + 1, size_in - 1)
    weight = (position - first.astype(np.float32)).astype(np.float32)
    return first, second, weight


def resize_map(amap: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Resize an ``(h, w)`` map to ``size = (H, W)`` as ``F.interpolate`` does.

    Bilinear, ``align_corners=False``, no antialiasing (what
    [`CNCDetector.predict`][cncad.detector.CNCDetector.predict] uses to bring maps back to
    the inputs' sizes), in float32 numpy.

    Args:
        amap: ``(h, w)`` float array.
        size: ``(H, W)``.

    Returns:
        ``(H, W)`` float32 array (``amap`` itself when the size is already right).
    """
    height, width = (int(side) for side in size)
    if amap.shape == (height, width):
        return amap
    values = np.asarray(amap, dtype=np.float32)
    top, bottom, down = _linear_taps(values.shape[0], height)
    left, right, across = _linear_taps(values.shape[1], width)
    across = across[None, :]
    upper = values[top][:, left] * (np.float32(1.0) - across) + values[top][:, right] * across
    lower = values[bottom][:, left] * (np.float32(1.0) - across) + values[bottom][:, right] * across
    down = down[:, None]
    return (upper * (np.float32(1.0) - down) + lower * down).astype(np.float32, copy=False)


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


class _Metadata:
    """Typed access to a cncad ONNX file's ``metadata_props``, with one-line errors."""

    def __init__(self, values: dict[str, str], path: Path) -> None:
        self.values = values
        self.path = path
        tag = values.get("cncad.format")
        if tag is None:
            raise ModelFileError(
                f"{path} is an ONNX model but was not exported by cncad (it has no "
                "cncad.format metadata); export one with CNCDetector.export or cncad export"
            )
        if tag != FORMAT_TAG:
            raise ModelVersionError(
                f"{path} was exported as {tag!r}; this version of cncad reads {FORMAT_TAG!r}"
            )

    def text(self, key: str) -> str:
        if key not in self.values:
            raise ModelFileError(f"{self.path} lacks the metadata property {key!r}")
        return self.values[key]

    def json(self, key: str, kind: type | tuple[type, ...]) -> Any:
        try:
            value = json.loads(self.text(key))
        except json.JSONDecodeError as error:
            raise ModelFileError(f"{self.path}: metadata {key!r} is not JSON: {error}") from error
        if isinstance(value, bool) or not isinstance(value, kind):
            raise ModelFileError(f"{self.path}: metadata {key!r} has an unexpected value")
        return value


def _import_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError as error:
        raise ImportError(
            f"ONNXDetector needs onnxruntime, which is not installed: {_DEPLOY_HINT}"
        ) from error
    return onnxruntime


def _check_providers(
    providers: Sequence[str | tuple[str, dict[str, Any]]] | None, available: list[str]
) -> list[Any]:
    if providers is None:
        return ["CPUExecutionProvider"]
    if isinstance(providers, str) or not isinstance(providers, Sequence) or not providers:
        raise TypeError(f"providers must be a non-empty list of provider names, got {providers!r}")
    for provider in providers:
        name = provider[0] if isinstance(provider, tuple) else provider
        if not isinstance(name, str):
            raise TypeError(
                f"a provider must be a name or a (name, options) pair, got {provider!r}"
            )
        if name not in available:
            raise ValueError(
                f"onnxruntime provider {name!r} is not available here; available: "
                f"{', '.join(available)}"
            )
    return list(providers)
