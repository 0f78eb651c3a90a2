"""The file format of saved detectors and training checkpoints.

One format serves both. A file is a ``torch.save`` dict of tensors and plain Python values
only, so it loads with ``torch.load(..., weights_only=True)``:

| key | what |
|---|---|
| ``format``, ``format_version`` | ``"cncad-detector"``, ``2`` |
| ``kind`` | ``"detector"`` (written by ``save``) or ``"checkpoint"`` (by ``fit``) |
| ``cncad_version`` | the version that wrote it |
| ``config`` | [`CNCConfig.to_dict`][cncad.config.CNCConfig.to_dict] |
| ``state_dict`` | the trainable weights (never the frozen encoder) |
| ``threshold``, ``pixel_threshold`` | floats or None |
| ``epochs_trained``, ``history`` | the training progress and one dict of loss means per epoch |
| ``training`` | checkpoints only: ``{"optimizer": Adam's state_dict}`` |
| ``normal_statistics`` | map and score quantiles on normal training images, or None |
| ``calibration`` | optional: thresholds and score normalisation (see below) |
| ``checksum`` | ``"sha256:<hex>"`` of everything above |

The checksum is computed over the values, not the bytes of the pickle (see
[`content_checksum`][cncad.checkpoint.content_checksum]), and verified on every read: a
changed byte is a [`ModelFileError`][cncad.errors.ModelFileError], never a detector that
scores differently. Files are written atomically ([`atomic_write`][cncad.files.atomic_write])
and never with non-finite weights. Version 1 files (cncad 0.1, no checksum, no ``kind``)
are still read.

``calibration`` ([`Calibration.to_dict`][cncad.calibration.Calibration.to_dict]) is
written only by a calibrated detector; a file without it reads as uncalibrated. Being an
optional key, it needed no new format version: readers that predate it ignore it (and
the checksum covers it either way).
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from cncad import __version__
from cncad.calibration import Calibration
from cncad.config import CNCConfig
from cncad.errors import ModelFileError, ModelVersionError, NonFiniteError
from cncad.files import atomic_write

__all__ = [
    "CHECKPOINT_NAME",
    "FILE_FORMAT",
    "FILE_FORMAT_VERSION",
    "DetectorFile",
    "content_checksum",
    "load_trainable_weights",
    "read_detector_file",
    "write_detector_file",
]

CHECKPOINT_NAME = "last.ckpt"
"""File name of the checkpoint that ``fit(..., checkpoint_dir=DIR)`` keeps in ``DIR``."""

FILE_FORMAT = "cncad-detector"
"""The ``format`` entry of every detector and checkpoint file."""

FILE_FORMAT_VERSION = 2
"""The format version this cncad writes; it reads versions 1 and 2."""

_READABLE_VERSIONS = (1, 2)
_KINDS = ("detector", "checkpoint")
_CHECKSUM_PREFIX = "sha256:"


@dataclass
class DetectorFile:
    """The contents of a detector or checkpoint file, validated.

    Attributes:
        config: The configuration the weights belong to.
        state_dict: Trainable weights by name (CPU tensors).
        threshold: Image score threshold, or None.
        pixel_threshold: Pixel threshold, or None.
        epochs_trained: Epochs run so far.
        history: One dict of loss means per epoch.
        kind: ``"detector"`` or ``"checkpoint"``.
        optimizer_state: Adam's ``state_dict`` (checkpoints only), else None.
        cncad_version: The cncad version that wrote the file.
        normal_statistics: Map and score quantiles of the trained model on its normal
            training images (see [`Trainer`][cncad.training.Trainer]), or None.
        calibration: The detector's [`Calibration`][cncad.calibration.Calibration] as
            ``to_dict`` gives it, or None.
    """

    config: CNCConfig
    state_dict: dict[str, Tensor]
    threshold: float | None = None
    pixel_threshold: float | None = None
    epochs_trained: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    kind: str = "detector"
    optimizer_state: dict[str, Any] | None = None
    cncad_version: str = __version__
    normal_statistics: dict[str, float] | None = None
    calibration: dict[str, Any] | None = None


def content_checksum(payload: dict[str, Any]) -> str:
    """SHA-256 over the values of ``payload``, independent of how the pickle lays them out.

    Every value is fed to the hash with its type and size: tensors as dtype, shape and raw
    bytes; dicts in the order of their sorted keys; lists, strings and numbers as such. The
    ``checksum`` entry itself is left out.

    Examples:
        >>> content_checksum({"a": 1.0}) == content_checksum({"a": 1.0})
        True
        >>> content_checksum({"a": 1.0}) == content_checksum({"a": 1.0000001})
        False

    Args:
        payload: A file's dict of tensors and plain values.

    Returns:
        ``"sha256:<64 hex digits>"``.
    """
    hasher = hashlib.sha256()
    _feed(hasher, {key: value for key, value in payload.items() if key != "checksum"})
    return _CHECKSUM_PREFIX + hasher.hexdigest()


def _feed(hasher: Any, value: Any) -> None:
    if isinstance(value, Tensor):
        data = value.detach().to("cpu").contiguous().reshape(-1)
        hasher.update(f"T{data.dtype}{tuple(value.shape)};".encode())
        hasher.update(data.view(torch.uint8).numpy().tobytes())
    elif isinstance(value, dict):
        hasher.update(f"D{len(value)};".encode())
        for key in sorted(value, key=repr):
            _feed(hasher, key)
            _feed(hasher, value[key])
    elif isinstance(value, (list, tuple)):
        hasher.update(f"{type(value).__name__[0]}{len(value)};".encode())
        for item in value:
            _feed(hasher, item)
    elif isinstance(value, str):
        encoded = value.encode()
        hasher.update(f"S{len(encoded)};".encode() + encoded)
    elif value is None or isinstance(value, (bool, int, float)):
        hasher.update(f"P{type(value).__name__}:{value!r};".encode())
    else:
        raise TypeError(f"cannot checksum a {type(value).__name__}")


def write_detector_file(path: str | os.PathLike, contents: DetectorFile) -> Path:
    """Write a detector or checkpoint file atomically, with its checksum.

    Args:
        path: The file to create or replace; its folder is created if needed.
        contents: What to write.

    Returns:
        The path written.

    Raises:
        NonFiniteError: A weight (or an optimizer moment) is NaN or infinite; nothing is
            written and an existing file stays as it was.
    """
    state = {name: tensor.detach().to("cpu") for name, tensor in contents.state_dict.items()}
    _refuse_non_finite(state, "weights")
    payload: dict[str, Any] = {
        "format": FILE_FORMAT,
        "format_version": FILE_FORMAT_VERSION,
        "kind": contents.kind,
        "cncad_version": __version__,
        "config": contents.config.to_dict(),
        "state_dict": state,
        "threshold": contents.threshold,
        "pixel_threshold": contents.pixel_threshold,
        "epochs_trained": int(contents.epochs_trained),
        "history": [dict(row) for row in contents.history],
        "training": None,
        "normal_statistics": contents.normal_statistics,
    }
    if contents.calibration is not None:  # optional key: older cncad 0.2 readers ignore it
        payload["calibration"] = Calibration.from_dict(contents.calibration).to_dict()
    if contents.optimizer_state is not None:
        optimizer_state = _to_cpu(contents.optimizer_state)
        _refuse_non_finite(_tensors_of(optimizer_state), "optimizer moments")
        payload["training"] = {"optimizer": optimizer_state}
    payload["checksum"] = content_checksum(payload)
    with atomic_write(path, "wb") as handle:
        torch.save(payload, handle)
    return Path(path)


def read_detector_file(path: str | os.PathLike) -> DetectorFile:
    """Read and validate a detector or checkpoint file.

    Args:
        path: A detector or checkpoint file.

    Returns:
        The validated contents.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ModelFileError: (a ``ValueError``) It is not a cncad file, is damaged (checksum),
            or an entry is missing, of the wrong type or not finite; one line says which.
        ModelVersionError: (a ``ModelFileError``) It was written in a format version or
            with a configuration that this cncad cannot read.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model file not found: {path}")
    if path.is_dir():
        raise ModelFileError(f"{path} is a directory, not a cncad detector file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as error:  # torch.load fails in many ways on foreign or damaged files
        raise ModelFileError(
            f"{path} is not a cncad detector file, or is damaged (torch.load cannot read it "
            f"as a file of plain tensors: {type(error).__name__})"
        ) from error
    if not isinstance(payload, dict) or payload.get("format") != FILE_FORMAT:
        raise ModelFileError(f"{path} is not a cncad detector file")
    version = payload.get("format_version")
    if version not in _READABLE_VERSIONS:
        raise ModelVersionError(
            f"{path} has file format version {version} (written by cncad "
            f"{payload.get('cncad_version')}); this cncad ({__version__}) reads versions "
            f"{', '.join(map(str, _READABLE_VERSIONS))}"
        )
    if version >= 2:
        expected = payload.get("checksum")
        if not isinstance(expected, str) or content_checksum(payload) != expected:
            raise ModelFileError(
                f"{path} is damaged: its contents do not match the checksum stored in it"
            )
    return _validated(path, payload)


def _validated(path: Path, payload: dict[str, Any]) -> DetectorFile:
    def entry(name: str, types: tuple[type, ...], what: str) -> Any:
        if name not in payload:
            raise ModelFileError(f"{path} is damaged: the entry {name!r} is missing")
        value = payload[name]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise ModelFileError(
                f"{path} is damaged: {name!r} should be {what}, found {type(value).__name__}"
            )
        return value

    config_dict = entry("config", (dict,), "a dict")
    try:
        config = CNCConfig.from_dict(config_dict)
    except (TypeError, ValueError) as error:
        raise ModelVersionError(
            f"{path} holds a configuration this cncad ({__version__}) cannot read "
            f"(written by cncad {payload.get('cncad_version')}): {error}"
        ) from error
    state = entry("state_dict", (dict,), "a dict of tensors")
    for name, tensor in state.items():
        if not isinstance(name, str) or not isinstance(tensor, Tensor):
            raise ModelFileError(f"{path} is damaged: 'state_dict' holds a non-tensor entry")
    _refuse_non_finite(state, "weights", path)
    thresholds = []
    for name in ("threshold", "pixel_threshold"):
        value = entry(name, (int, float, type(None)), "a number or None")
        if value is not None and not math.isfinite(value):
            raise ModelFileError(f"{path} is damaged: {name!r} is {value}")
        thresholds.append(None if value is None else float(value))
    epochs = entry("epochs_trained", (int,), "an integer")
    if epochs < 0:
        raise ModelFileError(f"{path} is damaged: 'epochs_trained' is {epochs}")
    history = entry("history", (list,), "a list")
    if not all(
        isinstance(row, dict) and all(isinstance(v, (int, float)) for v in row.values())
        for row in history
    ):
        raise ModelFileError(f"{path} is damaged: 'history' should hold dicts of numbers")
    kind = payload.get("kind", "detector")
    if kind not in _KINDS:
        raise ModelFileError(f"{path} is damaged: 'kind' is {kind!r}")
    optimizer_state = None
    training = payload.get("training")
    if training is not None:
        if not isinstance(training, dict) or not isinstance(training.get("optimizer"), dict):
            raise ModelFileError(f"{path} is damaged: 'training' has no optimizer state")
        optimizer_state = training["optimizer"]
        _refuse_non_finite(_tensors_of(optimizer_state), "optimizer moments", path)
    statistics = payload.get("normal_statistics")
    if statistics is not None and not (
        isinstance(statistics, dict)
        and all(
            isinstance(k, str) and isinstance(v, (int, float)) and math.isfinite(v)
            for k, v in statistics.items()
        )
    ):
        raise ModelFileError(f"{path} is damaged: 'normal_statistics' should map names to numbers")
    calibration = payload.get("calibration")
    if calibration is not None:
        try:
            calibration = Calibration.from_dict(calibration).to_dict()
        except (TypeError, ValueError) as error:
            raise ModelFileError(f"{path} is damaged: 'calibration' is invalid: {error}") from error
    return DetectorFile(
        normal_statistics=None if statistics is None else dict(statistics),
        config=config,
        state_dict=state,
        threshold=thresholds[0],
        pixel_threshold=thresholds[1],
        epochs_trained=epochs,
        history=[dict(row) for row in history],
        kind=kind,
        optimizer_state=optimizer_state,
        cncad_version=str(payload.get("cncad_version")),
        calibration=calibration,
    )


def load_trainable_weights(
    model: nn.Module, state: dict[str, Tensor], source: str | os.PathLike = "the file"
) -> None:
    """Load trainable weights from a file into ``model``, a mismatch being the file's fault.

    Args:
        model: A [`CNCModel`][cncad.model.CNCModel]; its
            [`load_trainable_state_dict`][cncad.model.CNCModel.load_trainable_state_dict]
            checks every name, shape and dtype.
        state: Weights by name, as a file holds them.
        source: The file they came from, for the message.

    Raises:
        ModelFileError: A weight is missing, extra, or of another shape or dtype than the
            model's (the configuration in the file does not describe these weights).
    """
    try:
        model.load_trainable_state_dict(state)
    except ValueError as error:
        raise ModelFileError(f"{source}: {error}") from error


def _tensors_of(value: Any) -> dict[str, Tensor]:
    """Every tensor inside nested dicts and lists, by a readable path."""
    found: dict[str, Tensor] = {}

    def walk(item: Any, where: str) -> None:
        if isinstance(item, Tensor):
            found[where] = item
        elif isinstance(item, dict):
            for key, child in item.items():
                walk(child, f"{where}.{key}" if where else str(key))
        elif isinstance(item, (list, tuple)):
            for index, child in enumerate(item):
                walk(child, f"{where}[{index}]")

    walk(value, "")
    return found


def _to_cpu(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().to("cpu")
    if isinstance(value, dict):
        return {key: _to_cpu(child) for key, child in value.items()}
    if isinstance(value, list):
        return [_to_cpu(child) for child in value]
    return value


def _refuse_non_finite(
    tensors: dict[str, Tensor], what: str, path: str | os.PathLike | None = None
) -> None:
    bad = [
        name
        for name, tensor in tensors.items()
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
    ]
    if not bad:
        return
    listed = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
    if path is not None:
        raise ModelFileError(f"{path} is damaged: {what} hold NaN or infinity ({listed})")
    raise NonFiniteError(
        f"refusing to write {what} that hold NaN or infinity ({listed}); the training "
        "diverged: lower lr, or set grad_clip_norm"
    )
