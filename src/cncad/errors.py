"""Exceptions that cncad raises for problems with the user's files, not with the code.

They all derive from [`CNCADError`][cncad.errors.CNCADError], and each also derives from the
built-in exception that was raised at the same place before it existed (``ValueError``), so
``except ValueError`` keeps working. The command line turns them into one-line messages.

[`ImageReadError`][cncad.errors.ImageReadError], for an image file that cannot be decoded, is
also importable from [`cncad.data`][cncad.data] where the decoding code lives; it is defined
here so that the runtime without torch ([`cncad.deploy`][cncad.deploy]) raises the same class.
"""

from __future__ import annotations

__all__ = [
    "CNCADError",
    "DatasetError",
    "ImageReadError",
    "ModelFileError",
    "ModelVersionError",
    "NonFiniteError",
    "NotTrainedError",
    "TrainingBusyError",
    "WeightsUnavailableError",
]


class CNCADError(Exception):
    """Base class of the errors about the user's inputs (data folders, model files)."""


class DatasetError(CNCADError, ValueError):
    """A data folder has no usable images, or its layout is not recognised."""


class ImageReadError(CNCADError, ValueError):
    """An image or mask file exists but cannot be decoded (corrupt, truncated, unsupported)."""


class ModelFileError(CNCADError, ValueError):
    """A file is not a detector file, or is damaged.

    Detector files are written by [`CNCDetector.save`][cncad.detector.CNCDetector.save].
    """


class ModelVersionError(ModelFileError):
    """A detector file was written in a file format that this cncad cannot read."""


class NonFiniteError(CNCADError, FloatingPointError):
    """Training produced a NaN or infinite loss or gradient, or weights that are not finite.

    Raised before the optimizer step that would have written them, so the model keeps the
    weights it had after the last good step; files are never written with such weights.
    """


class TrainingBusyError(CNCADError, RuntimeError):
    """A detector was asked to predict, evaluate, save or fit while it is being trained.

    [`CNCDetector.fit`][cncad.detector.CNCDetector.fit] switches the model between training
    and eval mode; a call from another thread at the same time would silently change what
    either of them computes.
    """


class NotTrainedError(CNCADError, RuntimeError):
    """A detector that was never trained was asked to predict, evaluate, save or export.

    Its decoder and prompts hold their random initial values, so its scores mean nothing.
    [`CNCDetector`][cncad.detector.CNCDetector] counts as trained once ``fit`` has run an
    epoch or when it was loaded from a file; ``allow_untrained=True`` opts out (smoke
    tests, speed measurements).
    """


class WeightsUnavailableError(CNCADError, OSError, RuntimeError):
    """Pretrained weights are neither in the local cache nor downloadable now.

    Raised within seconds, before the model is built, when the weights of a pretrained tag
    (open_clip's ``"openai"``, a timm tag, an ``"hf-hub:"`` backbone) would have to come from
    the Hugging Face hub and ``HF_HUB_OFFLINE`` is set or the hub cannot be reached. The
    one-line message names the missing weights and how to pass a local checkpoint instead
    (``pretrained="/path/to/open_clip_pytorch_model.bin"``, CLI ``--pretrained PATH``).
    It is an ``OSError`` (the network), and a ``RuntimeError`` as raised there before.
    """
