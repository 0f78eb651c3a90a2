"""Exceptions that cncad raises for problems with the user's files, not with the code.

They all derive from [`CNCADError`][cncad.errors.CNCADError], and each also derives from the
built-in exception that was raised at the same place before it existed (``ValueError``), so
``except ValueError`` keeps working. The command line turns them into one-line messages.

The exception for an image file that cannot be decoded,
[`ImageReadError`][cncad.data.transforms.ImageReadError], lives with the image decoding code and
also derives from [`CNCADError`][cncad.errors.CNCADError].
"""

from __future__ import annotations

__all__ = [
    "CNCADError",
    "DatasetError",
    "ModelFileError",
    "ModelVersionError",
    "NonFiniteError",
    "TrainingBusyError",
]


class CNCADError(Exception):
    """Base class of the errors about the user's inputs (data folders, model files)."""


class DatasetError(CNCADError, ValueError):
    """A data folder has no usable images, or its layout is not recognised."""


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
