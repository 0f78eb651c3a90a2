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
import torch.nn.functional as F
from torch import Tensor, nn

import cncad
from cncad.data.transforms import CLIP_MEAN, CLIP_STD
from cncad.deploy import FORMAT_TAG
from cncad.encoders.base import Grid, tokens_to_map
from cncad.files import atomic_write, check_output_file
from cncad.scoring import axis_operator, image_score

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

_EPS = 1e-8  # eps of F.cosine_similarity, as in cncad.scoring


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
        # The constant "upsample then blur" operators of each layer's grid, built here and
        # not while tracing (their construction has no faithful ONNX form; as constants it
        # needs none).
        native = config.compare_grid == "native"
        self.grids: tuple[tuple[int, int], ...] = tuple(
            tuple(grid) if native else tuple(model.common_grid) for grid in model.encoder.grids
        )
        for h, w in sorted(set(self.grids)):
            rows = axis_operator(h, self.image_size, config.sigma).clone()  # (S, h)
            cols = axis_operator(w, self.image_size, config.sigma).T.contiguous()  # (w, S)
            self.register_buffer(f"rows_{h}x{w}", rows, persistent=False)
            self.register_buffer(f"cols_{h}x{w}", cols, persistent=False)

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        """Score ``(N, 3, S, S)`` images in ``[0, 1]``; see ``output_names``."""
        model = self.model
        config = model.config
        normalised = (images - self.mean) / self.std
        output = model.forward_features(model.encode(normalised))
        maps = self._anomaly_map(output.encoded, output.decoded)
        k = config.topk
        scores = image_score(maps, mode=config.image_score, k=int(k) if k >= 1 else float(k))
        outputs = [scores, maps]
        if self.threshold is not None:
            outputs += [scores >= self.threshold, maps >= self.pixel_threshold]
        if self.calibration is not None:
            outputs += [self.calibration.image(scores), self.calibration.pixel(maps)]
        return tuple(outputs)

    def _anomaly_map(self, encoded: Sequence[Tensor], decoded: Sequence[Tensor]) -> Tensor:
        """Eq. 17 as [`anomaly_map`][cncad.scoring.anomaly_map] computes it, in traceable ops.

        The same formula (cosine as ``F.cosine_similarity``, summed per grid as
        ``count - sum cos``) and the same constant operators ``A_h @ S @ A_w.T``, without the
        chunked in-place kernels whose loops depend on the batch size; only the order of
        the float32 roundings differs (about 1e-6).
        """
        sums: dict[tuple[int, int], tuple[Tensor, int]] = {}
        for e, d, grid in zip(encoded, decoded, self.grids, strict=True):
            e, d = e.float(), d.float()
            dot = (e * d).sum(-1)
            norm_e = torch.linalg.vector_norm(e, dim=-1).clamp_min(_EPS)
            norm_d = torch.linalg.vector_norm(d, dim=-1).clamp_min(_EPS)
            cosine = dot / (norm_e * norm_d)  # (N, h * w)
            if grid in sums:
                total, count = sums[grid]
                sums[grid] = (total + cosine, count + 1)
            else:
                sums[grid] = (cosine, 1)
        result: Tensor | None = None
        for (h, w), (total, count) in sums.items():
            distance = (count - total).unflatten(1, (h, w))  # sum of 1 - cos: (N, h, w)
            rows = getattr(self, f"rows_{h}x{w}")
            cols = getattr(self, f"cols_{h}x{w}")
            part = torch.matmul(torch.matmul(rows, distance), cols)  # (N, S, S)
            result = part if result is None else result + part
        assert result is not None
        return result


def _channel_vector(values: Sequence[float], name: str) -> Tensor:
    try:
        vector = torch.tensor([float(v) for v in values], dtype=torch.float32)
    except (TypeError, ValueError) as error:
        raise TypeError(f"{name} must be three numbers, got {values!r}") from error
    if vector.numel() != 3 or not bool(torch.isfinite(vector).all()):
        raise ValueError(f"{name} must be three finite numbers, got {tuple(values)}")
    return vector.view(1, 3, 1, 1)


def _resampling_matrix(size_in: int, size_out: int, antialias: bool) -> Tensor:
    """The ``(size_out, size_in)`` float32 matrix of ``F.interpolate``'s 1-D bilinear resize.

    Obtained by resizing an identity image along one axis, in float64, so it follows
    PyTorch's own weights (with or without antialiasing) exactly.
    """
    eye = torch.eye(size_in, dtype=torch.float64)[None, None]
    resized = F.interpolate(
        eye, size=(size_out, size_in), mode="bilinear", align_corners=False, antialias=antialias
    )
    return resized[0, 0].float()


class _GridResampler:
    """[`resample_tokens`][cncad.encoders.base.resample_tokens] as two constant matrix products.

    ONNX has no form of ``F.interpolate``'s antialiased bilinear shrinking (CNN pyramids
    resampled to the coarsest grid). The resize is linear and separable, so it is exactly
    ``R_h @ X @ R_w.T`` with matrices built before tracing, which enter the graph as
    constants; the result equals the eager one up to float32 rounding.
    """

    def __init__(self, pairs: set[tuple[tuple[int, int], tuple[int, int]]]) -> None:
        self.matrices: dict[tuple[tuple[int, int], tuple[int, int]], tuple[Tensor, Tensor]] = {}
        for grid, target in pairs:
            if grid == target:
                continue
            shrink = target[0] < grid[0] or target[1] < grid[1]  # as resample_tokens
            rows = _resampling_matrix(grid[0], target[0], shrink)
            cols = _resampling_matrix(grid[1], target[1], shrink).T.contiguous()
            self.matrices[(grid, target)] = (rows, cols)

    def __call__(self, tokens: Tensor, grid: Grid, target: Grid) -> Tensor:
        grid, target = tuple(grid), tuple(target)
        if grid == target:
            return tokens
        rows, cols = self.matrices[(grid, target)]
        maps = tokens_to_map(tokens, grid)  # (B, C, h, w)
        resized = torch.matmul(torch.matmul(rows.to(maps.dtype), maps), cols.to(maps.dtype))
        return resized.flatten(2).transpose(1, 2)


@contextlib.contextmanager
def _export_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode, prompts' text features cached, no fused attention kernels, quiet tracer.

    ``cncad.model``'s grid resampling is swapped for its matrix form while tracing.
    """
    import cncad.model as model_module

    grids = tuple(tuple(grid) for grid in model.encoder.grids)
    common = tuple(model.common_grid)
    pairs = {(grid, common) for grid in grids} | {(common, grid) for grid in grids}
    resampler = _GridResampler(pairs)
    original_resample = model_module.resample_tokens
    was_training = model.training
    model.eval()
    prompt_learner = getattr(model, "prompt_learner", None)
    if prompt_learner is not None:
        with torch.no_grad():
            prompt_learner()  # fills the cache, so the graph holds features, not the tower
    fastpath = getattr(torch.backends, "mha", None)
    previous = fastpath.get_fastpath_enabled() if fastpath is not None else None
    try:
        model_module.resample_tokens = resampler
        if fastpath is not None:
            # nn.MultiheadAttention's fused inference kernel has no ONNX form
            fastpath.set_fastpath_enabled(False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
            yield
    finally:
        model_module.resample_tokens = original_resample
        if fastpath is not None and previous is not None:
            fastpath.set_fastpath_enabled(previous)
        model.train(was_training)


def _metadata(detector: CNCDetector, graph: InferenceGraph) -> dict[str, str]:
    config = detector.config
    calibration = getattr(detector, "calibration", None)
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
    require_trained = getattr(detector, "_require_trained", None)
    if require_trained is not None:
        require_trained("export")
    model = detector.model
    device = next(model.parameters()).device
    model.cpu()
    try:
        graph = InferenceGraph(
            model,
            threshold=detector.threshold,
            pixel_threshold=detector.pixel_threshold,
            calibration=getattr(detector, "calibration", None),
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
