"""Export a detector's whole inference path as one ONNX graph.

The graph takes a ``(N, 3, S, S)`` float32 batch in ``[0, 1]`` (``S`` = the model's
``image_size``, ``N`` free) and returns what
[`CNCDetector.predict`][cncad.detector.CNCDetector.predict] computes at the model size:

* ``pred_score`` ``(N,)`` and ``anomaly_map`` ``(N, S, S)`` (raw), always;
* ``pred_label`` ``(N,)`` bool and ``pred_mask`` ``(N, S, S)`` bool when the detector has a
  ``threshold`` (``pixel_threshold``, else ``threshold``, for the mask);
* ``norm_score`` ``(N,)`` and ``norm_map`` ``(N, S, S)`` in ``[0, 1]`` when it is
  [calibrated][cncad.detector.CNCDetector.calibrate] (the global calibration).

Inside the graph: the CLIP mean/std normalisation, the frozen encoder, fusion, MoE (with
its dense routing, see [`GatedMoE`][cncad.modules.moe.GatedMoE]), decoder, the normality
promotion with the prompts' text features stored as constants (the text tower is not in
the graph), and the scoring of eq. 17 with the Gaussian blur as two constant matrices.

The file's ``metadata_props`` say how to use it without cncad's Python code (all values are
strings, JSON where structured): ``cncad.format``, ``cncad.version``, ``cncad.config``,
``cncad.image_size``, ``cncad.mean``, ``cncad.std``, ``cncad.outputs``,
``cncad.threshold``, ``cncad.pixel_threshold``, ``cncad.calibration`` (``null`` until
calibrated) and ``cncad.normal_statistics``.
[`ONNXDetector`][cncad.deploy.ONNXDetector] reads them.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

import cncad
from cncad.data.transforms import CLIP_MEAN, CLIP_STD
from cncad.deploy import FORMAT_TAG
from cncad.encoders.base import _resampling_matrices
from cncad.files import atomic_write, check_output_file
from cncad.scoring import axis_operator

if TYPE_CHECKING:
    from cncad.calibration import Calibration
    from cncad.detector import CNCDetector
    from cncad.model import CNCModel

__all__ = [
    "DEFAULT_OPSET",
    "EXPORT_FORMATS",
    "InferenceGraph",
    "export",
    "export_onnx",
]

EXPORT_FORMATS: tuple[str, ...] = ("onnx",)
"""The formats [`export`][cncad.export.export] writes (OpenVINO reads the ONNX file)."""

DEFAULT_OPSET = 17
"""ONNX opset of the exported graph (onnxruntime >= 1.16 and OpenVINO 2024 run it)."""


class InferenceGraph(nn.Module):
    """The inference path of a [`CNCModel`][cncad.model.CNCModel] as one traceable module.

    Args:
        model: The model (its weights are shared, not copied). Put in eval mode.
        threshold: Image-score threshold for ``pred_label``; None: no label outputs.
        pixel_threshold: Map threshold for ``pred_mask`` (None: ``threshold``).
        calibration: Adds ``norm_score`` and ``norm_map`` from its global normalisation.
        mean: Per-channel mean the graph subtracts (CLIP's, as
            [`preprocess`][cncad.data.transforms.preprocess]).
        std: Per-channel standard deviation it divides by.

    Attributes:
        output_names: Names of the outputs, in order.

    Shapes:
        forward: ``(N, 3, S, S)`` float images in ``[0, 1]`` -> a tuple of the outputs
        named in ``output_names``: ``(N,)`` scores and ``(N, S, S)`` maps (labels and masks
        bool).
    """

    def __init__(
        self,
        model: CNCModel,
        *,
        threshold: float | None = None,
        pixel_threshold: float | None = None,
        calibration: Calibration | None = None,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
    ) -> None:
        super().__init__()
        self.model = model.eval()
        config = model.config
        self.image_size = config.image_size
        self.register_buffer("mean", _channel_vector(mean, "mean"), persistent=False)
        self.register_buffer("std", _channel_vector(std, "std"), persistent=False)
        if float(self.std.min()) <= 0:
            raise ValueError(f"std must be positive, got {tuple(std)}")
        self.threshold = threshold
        self.pixel_threshold = pixel_threshold if pixel_threshold is not None else threshold
        self.calibration = calibration
        names = ["pred_score", "anomaly_map"]
        if threshold is not None:
            names += ["pred_label", "pred_mask"]
        if calibration is not None:
            names += ["norm_score", "norm_map"]
        self.output_names: tuple[str, ...] = tuple(names)

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        """Score ``(N, 3, S, S)`` images in ``[0, 1]``; see ``output_names``."""
        normalised = (images - self.mean) / self.std
        maps, scores = self.model.predict_features(self.model.encode(normalised))
        outputs = [scores, maps]
        if self.threshold is not None:
            outputs += [scores >= self.threshold, maps >= self.pixel_threshold]
        if self.calibration is not None:
            outputs += [self.calibration.image(scores), self.calibration.pixel(maps)]
        return tuple(outputs)


def _channel_vector(values: Sequence[float], name: str) -> Tensor:
    try:
        vector = torch.tensor([float(v) for v in values], dtype=torch.float32)
    except (TypeError, ValueError) as error:
        raise TypeError(f"{name} must be three numbers, got {values!r}") from error
    if vector.numel() != 3 or not bool(torch.isfinite(vector).all()):
        raise ValueError(f"{name} must be three finite numbers, got {tuple(values)}")
    return vector.view(1, 3, 1, 1)


@contextlib.contextmanager
def _export_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode, constants built, no fused attention kernels, quiet tracer.

    The constants are the prompts' text features and the matrices that
    [`resample_tokens`][cncad.encoders.base.resample_tokens] and
    [`anomaly_map`][cncad.scoring.anomaly_map] apply while tracing: built here, the graph
    holds them rather than a record of their construction (which has no faithful ONNX form).
    """
    config = model.config
    grids = tuple(tuple(grid) for grid in model.encoder.grids)
    common = tuple(model.common_grid)
    for grid in grids:
        if grid != common:
            _resampling_matrices(grid, common)
            _resampling_matrices(common, grid)
    compared = grids if config.compare_grid == "native" else (common,)
    for size in {n for grid in compared for n in grid}:
        axis_operator(size, config.image_size, config.sigma)
    was_training = model.training
    model.eval()
    prompt_learner = getattr(model, "prompt_learner", None)
    if prompt_learner is not None:
        with torch.no_grad():
            prompt_learner()  # fills the cache, so the graph holds features, not the tower
    fastpath = getattr(torch.backends, "mha", None)
    previous = fastpath.get_fastpath_enabled() if fastpath is not None else None
    try:
        if fastpath is not None:
            # nn.MultiheadAttention's fused inference kernel has no ONNX form
            fastpath.set_fastpath_enabled(False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
            yield
    finally:
        if fastpath is not None and previous is not None:
            fastpath.set_fastpath_enabled(previous)
        model.train(was_training)


def _metadata(detector: CNCDetector, graph: InferenceGraph) -> dict[str, str]:
    config = detector.config
    calibration = detector.calibration
    return {
        "cncad.format": FORMAT_TAG,
        "cncad.version": cncad.__version__,
        "cncad.config": json.dumps(config.to_dict(), sort_keys=True),
        "cncad.image_size": str(config.image_size),
        "cncad.mean": json.dumps([float(v) for v in graph.mean.flatten()]),
        "cncad.std": json.dumps([float(v) for v in graph.std.flatten()]),
        "cncad.outputs": json.dumps(list(graph.output_names)),
        "cncad.layers": json.dumps(list(detector.model.layers)),
        "cncad.threshold": json.dumps(detector.threshold),
        "cncad.pixel_threshold": json.dumps(detector.pixel_threshold),
        "cncad.calibration": json.dumps(None if calibration is None else calibration.to_dict()),
        "cncad.normal_statistics": json.dumps(detector.normal_statistics),
    }


def export_onnx(
    detector: CNCDetector,
    path: str | os.PathLike,
    *,
    opset: int = DEFAULT_OPSET,
    check: bool = True,
) -> Path:
    """Write the detector's inference path as one ONNX file.

    The graph is traced on the CPU in float32 (whatever ``config.device`` and
    ``config.bf16``), with a dynamic batch axis. See the module docstring for its inputs,
    outputs and metadata. The file is written atomically; ``path`` is checked before the
    (slow) tracing starts.

    Examples:
        >>> detector.export("model.onnx")  # doctest: +SKIP
        >>> from cncad.deploy import ONNXDetector  # doctest: +SKIP
        >>> ONNXDetector("model.onnx").predict("part.png").pred_score  # doctest: +SKIP

    Args:
        detector: A trained (or loaded) [`CNCDetector`][cncad.detector.CNCDetector].
        path: The ``.onnx`` file to write (replaced if it exists).
        opset: ONNX opset version, 17 or later.
        check: Run ``onnx.checker.check_model`` on the result before writing it.

    Returns:
        The path written, absolute.

    Raises:
        ImportError: The ``onnx`` package is missing (``pip install cncad[deploy]``).
        NotTrainedError: The detector has not been trained (see ``allow_untrained``).
        ValueError: ``path`` is a folder, or ``opset`` is below 17.
        PermissionError: ``path``'s folder cannot be written.
    """
    if isinstance(opset, bool) or not isinstance(opset, int):
        raise TypeError(f"opset must be an integer, got {opset!r}")
    if opset < DEFAULT_OPSET:
        raise ValueError(f"opset must be at least {DEFAULT_OPSET}, got {opset}")
    target = check_output_file(path, what="export path")
    onnx = _import_onnx()
    detector._require_trained("export")
    model = detector.model
    device = next(model.parameters()).device
    model.cpu()
    try:
        graph = InferenceGraph(
            model,
            threshold=detector.threshold,
            pixel_threshold=detector.pixel_threshold,
            calibration=detector.calibration,
        )
        size = detector.config.image_size
        example = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
        names = list(graph.output_names)
        axes = {name: {0: "batch"} for name in ["images", *names]}
        buffer = io.BytesIO()
        with _export_mode(model), torch.no_grad():
            torch.onnx.export(
                graph,
                (example,),
                buffer,
                input_names=["images"],
                output_names=names,
                dynamic_axes=axes,
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
        proto = onnx.load_from_string(buffer.getvalue())
        for key, value in _metadata(detector, graph).items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        proto.producer_name = "cncad"
        proto.producer_version = cncad.__version__
        proto.doc_string = (
            "cncad anomaly detector: images (N, 3, S, S) float in [0, 1] -> " + ", ".join(names)
        )
        if check:
            onnx.checker.check_model(proto)
        data = proto.SerializeToString()
    finally:
        model.to(device)
    with atomic_write(target, "wb") as handle:
        handle.write(data)
    return target


def export(
    detector: CNCDetector, path: str | os.PathLike, format: str = "onnx", **options: Any
) -> Path:
    """Export ``detector`` in ``format``; see [`export_onnx`][cncad.export.export_onnx].

    Args:
        detector: The detector.
        path: The file to write.
        format: One of [`EXPORT_FORMATS`][cncad.export.EXPORT_FORMATS]. For OpenVINO,
            export ONNX: OpenVINO's runtime reads it directly.
        **options: Passed to the format's exporter (``opset``, ``check``).

    Returns:
        The path written.

    Raises:
        ValueError: An unknown ``format``.
    """
    if format not in EXPORT_FORMATS:
        raise ValueError(
            f"format must be one of {', '.join(map(repr, EXPORT_FORMATS))}, got {format!r} "
            "(OpenVINO reads the ONNX file)"
        )
    return export_onnx(detector, path, **options)


def _import_onnx() -> Any:
    try:
        import onnx
    except ImportError as error:
        raise ImportError(
            "exporting to ONNX needs the onnx package: pip install cncad[deploy]"
        ) from error
    return onnx
