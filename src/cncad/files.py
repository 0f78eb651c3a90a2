"""Writing the user's files safely: atomic replacement and output checks made up front.

Every file cncad writes (detector and checkpoint files, JSON, CSV, images) goes through
[`atomic_write`][cncad.files.atomic_write]: the bytes go to a temporary file in the target's
folder, are flushed to disk, and the temporary file is renamed over the target. A write
that fails half way (a full disk, an exception in the caller, an interrupt) leaves the old
file exactly as it was and no temporary file behind.

[`check_output_file`][cncad.files.check_output_file] and
[`check_output_dir`][cncad.files.check_output_dir] are called before any training or
evaluation starts, so that a bad output path costs seconds, not the run.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

__all__ = [
    "atomic_write",
    "check_output_dir",
    "check_output_file",
    "save_image_atomic",
    "write_text_atomic",
]

_TEMP_SUFFIX = ".tmp"


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", **open_kwargs: Any) -> Iterator[IO]:
    """Open a temporary file next to ``path`` and rename it over ``path`` on success.

    The temporary file is named ``.<name>.<random>.tmp`` in the same folder (a rename
    within one file system is atomic), flushed and ``fsync``-ed before the rename. On an
    exception (``KeyboardInterrupt`` included) it is deleted and ``path`` is untouched. A
    new file gets the permissions ``open`` would give it; a replaced file keeps its own.

    Examples:
        >>> import json, tempfile, pathlib
        >>> target = pathlib.Path(tempfile.mkdtemp()) / "results.json"
        >>> with atomic_write(target, "w", encoding="utf-8") as handle:
        ...     json.dump({"I-AUROC": 0.98}, handle)
        >>> json.loads(target.read_text())
        {'I-AUROC': 0.98}

    Args:
        path: The file to create or replace. Its folder is created if needed.
        mode: ``"wb"`` or ``"w"``.
        **open_kwargs: Passed to ``open`` (``encoding``, ``newline``).

    Yields:
        The open temporary file.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write writes whole files: mode 'w' or 'wb', got {mode!r}")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    pending: list[Path] = []  # the temporary file, named before it exists
    try:
        # Created inside the try: a signal (SIGTERM, Ctrl-C) that lands just after the
        # file appears still finds its name here and removes it.
        descriptor = _create_temp(target, pending)
        temp = pending[0]
        with os.fdopen(descriptor, mode, **open_kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        _keep_permissions(target, temp)
        os.replace(temp, target)
    except BaseException:
        for temp in pending:
            temp.unlink(missing_ok=True)
        raise
    _sync_folder(target.parent)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    with atomic_write(path, "w", encoding="utf-8", newline="") as handle:
        handle.write(text)
    return Path(path)


def save_image_atomic(image: Any, path: str | os.PathLike) -> Path:
    """Save a PIL image atomically, in the format its file extension names.

    Args:
        image: A ``PIL.Image.Image``.
        path: The target; its extension (``.png``, ``.jpg``, ...) chooses the format.

    Returns:
        The path written.
    """
    from PIL import Image

    target = Path(path)
    image_format = Image.registered_extensions().get(target.suffix.lower())
    if image_format is None:
        raise ValueError(f"cannot tell the image format of {target} from its extension")
    with atomic_write(target, "wb") as handle:
        image.save(handle, format=image_format)
    return target


def check_output_file(
    path: str | os.PathLike, *, inputs: Iterable[str | os.PathLike] = (), what: str = "output"
) -> Path:
    """Check, before any work, that ``path`` can be written as a file.

    Args:
        path: The file to be written.
        inputs: Files and folders the same job reads; the output may be none of them, nor
            lie inside an input folder.
        what: How the message names the output (e.g. ``"--out"``).

    Returns:
        ``path`` made absolute.

    Raises:
        ValueError: ``path`` is a folder, an input, or inside an input folder.
        PermissionError: Its folder cannot be created or written.
    """
    target = Path(path).expanduser().resolve()
    if target.is_dir():
        raise ValueError(f"{what} must be a file name, but {path} is a folder")
    _check_not_an_input(target, inputs, what)
    _check_writable_folder(target.parent, what)
    return target


def check_output_dir(
    path: str | os.PathLike, *, inputs: Iterable[str | os.PathLike] = (), what: str = "output"
) -> Path:
    """Check, before any work, that ``path`` can be used as an output folder.

    Args:
        path: The folder to write into (created later if missing).
        inputs: Files and folders the same job reads; the folder may be none of them, nor
            lie inside an input folder, nor contain an input.
        what: How the message names the output.

    Returns:
        ``path`` made absolute.

    Raises:
        ValueError: ``path`` is a file, or overlaps an input.
        PermissionError: It cannot be created or written.
    """
    target = Path(path).expanduser().resolve()
    if target.exists() and not target.is_dir():
        raise ValueError(f"{what} must be a folder, but {path} is a file")
    _check_not_an_input(target, inputs, what, folder=True)
    _check_writable_folder(target, what)
    return target


def _check_not_an_input(
    target: Path, inputs: Iterable[str | os.PathLike], what: str, folder: bool = False
) -> None:
    for item in inputs:
        source = Path(item).expanduser().resolve()
        if target == source:
            raise ValueError(f"{what} {target} is also an input; choose another path")
        if source.is_dir() and source in target.parents:
            raise ValueError(f"{what} {target} lies inside the input folder {source}")
        if folder and target in source.parents:
            raise ValueError(f"{what} {target} contains the input {source}")


def _check_writable_folder(folder: Path, what: str) -> None:
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{what}: {existing} is a file, so {folder} cannot be created")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"{what}: cannot write in {existing}")


def _create_temp(target: Path, pending: list[Path]) -> int:
    """Create ``.<name>.<random>.tmp`` next to ``target``, open for writing.

    Its name is put in ``pending`` before the file is created, so that the caller can
    remove it whenever an exception interrupts this. ``tempfile.mkstemp`` would create it
    with mode 0o600. ``os.open`` with 0o666 lets the kernel apply the current umask (and
    any default ACL), as a plain ``open`` does; reading the umask instead would mean
    setting it, which is not thread-safe.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    flags |= getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        pending[:] = [target.parent / f".{target.name}.{secrets.token_hex(6)}{_TEMP_SUFFIX}"]
        try:
            return os.open(pending[0], flags, 0o666)
        except FileExistsError:  # another writer's file: not ours to remove
            pending.clear()
    raise FileExistsError(f"cannot create a temporary file next to {target}")


def _keep_permissions(target: Path, temp: Path) -> None:
    """Give ``temp`` the permission bits of ``target`` when it replaces an existing file."""
    try:
        mode = target.stat().st_mode & 0o7777
    except FileNotFoundError:
        return
    os.chmod(temp, mode)


def _sync_folder(folder: Path) -> None:
    """Make the rename durable (POSIX); a no-op where folders cannot be opened."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)
