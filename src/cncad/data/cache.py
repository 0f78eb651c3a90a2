"""Frozen-feature cache: run the frozen encoder once per image, train from the cache.

CNC's encoder is frozen, so its tapped features of a training image are the same in every
epoch. [`FeatureCache`][cncad.data.cache.FeatureCache] stores them once (float16 by default, in
memory when they fit under a budget, otherwise in memory-mapped files) and serves shuffled batches
back as float32, so an epoch costs only the trainable part of the model. The training noise of
eq. 12's input path is added after the cache, so training is unchanged apart from the
storage rounding (float16 keeps about three significant digits).

The cache is generic over what the encoder returns: a ``NamedTuple`` whose fields are each
``None`` or a list of tensors with the batch dimension first (e.g.
[`EncoderFeatures`][cncad.encoders.base.EncoderFeatures]). It must not be used with random
augmentation, which would be frozen into the stored features.

Cache files are named ``cncad-features-<host>-<pid>-<uuid>.f16`` (``.f32`` for float32
storage): ``<host>`` is this machine's host name with every character outside
``[A-Za-z0-9_.]`` replaced by ``_`` (so it holds no ``-`` and the name parses unambiguously),
``<pid>`` the id of the process that wrote the file and ``<uuid>`` 32 hex digits.
[`FeatureCache.close`][cncad.data.cache.FeatureCache.close] deletes a cache's files, and
[`FeatureCache.build`][cncad.data.cache.FeatureCache.build] deletes the files it created when it
fails, a ``KeyboardInterrupt`` included. Files of a process that never reached either (killed
with ``SIGKILL``, out of memory, power loss) are removed by
[`remove_stale_cache_files`][cncad.data.cache.remove_stale_cache_files], which ``build`` runs on
its folder before it writes files of its own.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import socket
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from cncad.errors import DatasetError

__all__ = ["FeatureCache", "remove_stale_cache_files"]

_NUMPY_DTYPES = {torch.float16: np.float16, torch.float32: np.float32}
_FILE_PREFIX = "cncad-features-"
_FILE_PATTERN = re.compile(
    re.escape(_FILE_PREFIX) + r"(?P<host>[A-Za-z0-9_.]+)-(?P<pid>[0-9]+)-[0-9a-f]{32}\.f(?:16|32)"
)


class _Layout(NamedTuple):
    """Where each stored tensor goes back: the feature type and per field its list length."""

    features_type: type
    field_lengths: tuple[int | None, ...]


def _flatten(features: Any) -> tuple[list[Tensor], _Layout]:
    if not (isinstance(features, tuple) and hasattr(features, "_fields")):
        raise TypeError(
            f"the encoder must return a NamedTuple of tensor lists, got {type(features).__name__}"
        )
    tensors: list[Tensor] = []
    lengths: list[int | None] = []
    for name, value in zip(features._fields, features, strict=True):
        if value is None:
            lengths.append(None)
            continue
        if not isinstance(value, (list, tuple)) or not all(isinstance(t, Tensor) for t in value):
            raise TypeError(f"encoder output field {name!r} must be None or a list of tensors")
        tensors.extend(value)
        lengths.append(len(value))
    return tensors, _Layout(type(features), tuple(lengths))


def _unflatten(tensors: Sequence[Tensor], layout: _Layout) -> Any:
    fields: list[list[Tensor] | None] = []
    position = 0
    for length in layout.field_lengths:
        if length is None:
            fields.append(None)
        else:
            fields.append(list(tensors[position : position + length]))
            position += length
    return layout.features_type(*fields)


class FeatureCache:
    """Encoder features of a set of images, stored once and served in batches.

    Build it with [`build`][cncad.data.cache.FeatureCache.build]; iterate epochs with
    [`batches`][cncad.data.cache.FeatureCache.batches].

    Args:
        slots: One storage array per stored tensor, ``(N, ...)`` each: torch tensors in
            memory or NumPy memory maps.
        layout: How the stored tensors map back onto the encoder's output type.
        directory: The folder of the memory-mapped files (None when in memory); files
            this cache created there (``cncad-features-<host>-<pid>-<uuid>.f16`` or ``.f32``)
            are deleted by [`close`][cncad.data.cache.FeatureCache.close].
    """

    def __init__(
        self,
        slots: list[Tensor | np.memmap],
        layout: _Layout,
        directory: Path | None = None,
    ) -> None:
        self._slots = slots
        self._layout = layout
        self.directory = directory

    # ------------------------------------------------------------------ building
    @classmethod
    @torch.no_grad()
    def build(
        cls,
        encode: Callable[[Tensor], Any],
        batches: Iterable[Tensor],
        max_images: int | None = None,
        *,
        dtype: torch.dtype = torch.float16,
        memory_limit_gib: float = 4.0,
        directory: str | os.PathLike | None = None,
        progress: bool = True,
    ) -> FeatureCache:
        """Encode every image once and store the features, in the order given.

        Args:
            encode: The frozen encoder, ``(B, 3, S, S)`` images -> NamedTuple of tensor lists
                (e.g. [`CNCModel.encode`][cncad.model.CNCModel.encode]).
            batches: ``(B, 3, S, S)`` image batches, already on the encoder's device.
            max_images: An upper bound on the number of images, used to allocate the
                storage up front and to choose memory or files. None (unknown) keeps the
                cache in memory.
            dtype: Storage type, ``torch.float16`` (default) or ``torch.float32``.
            memory_limit_gib: Keep the cache in memory when it needs at most this many GiB,
                otherwise write memory-mapped files.
            directory: Folder for the memory-mapped files (default: the system's temporary
                folder). Giving a folder does not force a file cache; set
                ``memory_limit_gib=0`` for that. Before writing its files, ``build`` runs
                [`remove_stale_cache_files`][cncad.data.cache.remove_stale_cache_files] on it.
            progress: Show a progress bar over images.

        Returns:
            The filled cache. If ``build`` raises instead (any exception, a
            ``KeyboardInterrupt`` included), the files it created are deleted first.

        Raises:
            DatasetError: (a ``ValueError``) If there are no images.
            ValueError: If there are more than ``max_images`` images, or a feature
                overflows the storage type.
        """
        if dtype not in _NUMPY_DTYPES:
            raise ValueError(f"cache dtype must be torch.float16 or torch.float32, got {dtype}")
        slots: list[Any] | None = None  # storage arrays, or lists of chunks when unsized
        layout: _Layout | None = None
        folder: Path | None = None
        created: list[Path] = []  # every file this call created, to delete if it fails
        filled = 0
        bar = tqdm(total=max_images, desc="caching features", unit="img", disable=not progress)
        try:
            for images in batches:
                tensors, batch_layout = _flatten(encode(images))
                if slots is None:
                    layout = batch_layout
                    shapes = [tuple(t.shape[1:]) for t in tensors]
                    per_image = sum(math.prod(s) for s in shapes) * dtype.itemsize
                    if max_images is None:
                        slots = [[] for _ in shapes]
                    elif per_image * max_images <= memory_limit_gib * 2**30:
                        slots = [torch.empty((max_images, *s), dtype=dtype) for s in shapes]
                    else:
                        folder = Path(directory or tempfile.gettempdir())
                        folder.mkdir(parents=True, exist_ok=True)
                        remove_stale_cache_files(folder)
                        slots = []
                        for shape in shapes:
                            path = folder / _new_file_name(dtype)
                            created.append(path)  # before opening: a failed open may leave it
                            slots.append(
                                np.memmap(
                                    path,
                                    dtype=_NUMPY_DTYPES[dtype],
                                    mode="w+",
                                    shape=(max_images, *shape),
                                )
                            )
                count = len(tensors[0])
                if max_images is not None and filled + count > max_images:
                    raise ValueError(
                        f"the batches hold more than the announced {max_images} images"
                    )
                _store(slots, tensors, filled, dtype)
                filled += count
                bar.update(count)
            if slots is None or layout is None or filled == 0:
                raise DatasetError("no images to cache features of")
            if max_images is None:
                slots = [torch.cat(chunks) for chunks in slots]
            elif filled < max_images:
                slots = [slot[:filled] for slot in slots]  # views: the tail is never read
        except BaseException:
            if slots is not None:
                slots.clear()  # unmap first: Windows cannot delete a mapped file
            _delete_files(created)
            raise
        finally:
            bar.close()
        return cls(slots, layout, folder)

    # ------------------------------------------------------------------ reading
    def __len__(self) -> int:
        return len(self._slots[0])

    @property
    def in_memory(self) -> bool:
        """Whether the features are held in memory (else memory-mapped files)."""
        return isinstance(self._slots[0], Tensor)

    @property
    def bytes_per_image(self) -> int:
        """Storage bytes of one image's features."""
        return sum(math.prod(s.shape[1:]) * s.itemsize for s in self._slots)

    @property
    def nbytes(self) -> int:
        """Storage bytes of the whole cache."""
        return self.bytes_per_image * len(self)

    def get(self, indices: Tensor | Sequence[int], device: torch.device | str = "cpu") -> Any:
        """The stored features of some images, as float32 on ``device``.

        Args:
            indices: ``(B,)`` image indices.
            device: Where to put the tensors.

        Returns:
            The encoder's NamedTuple with ``(B, ...)`` float32 tensors.
        """
        index = torch.as_tensor(indices, dtype=torch.long)
        if not self.in_memory:
            # Sorted reads are sequential on disk; the original order is restored after.
            order = torch.argsort(index)
            sorted_index = index[order].numpy()
        tensors = []
        for slot in self._slots:
            if isinstance(slot, Tensor):
                part = slot[index]
            else:
                rows = torch.from_numpy(np.ascontiguousarray(slot[sorted_index]))
                part = torch.empty_like(rows)
                part[order] = rows
            tensors.append(part.to(device=device, dtype=torch.float32, non_blocking=True))
        return _unflatten(tensors, self._layout)

    def batches(
        self,
        batch_size: int,
        order: Tensor | None = None,
        device: torch.device | str = "cpu",
    ) -> Iterator[Any]:
        """Batches of stored features in ``order`` (default: stored order).

        Args:
            batch_size: Images per batch; the last batch may be smaller.
            order: ``(N,)`` permutation of the image indices, e.g.
                the flattened [`epoch_batches`][cncad.data.sampling.epoch_batches].
            device: Where to put the tensors.

        Yields:
            The encoder's NamedTuple with float32 tensors of ``batch_size`` images.
        """
        order = torch.arange(len(self)) if order is None else order
        for start in range(0, len(order), batch_size):
            yield self.get(order[start : start + batch_size], device)

    def close(self) -> None:
        """Release the storage and delete the memory-mapped files this cache created.

        Files that a killed process could not delete this way are removed later by
        [`remove_stale_cache_files`][cncad.data.cache.remove_stale_cache_files].
        """
        files = [slot.filename for slot in self._slots if isinstance(slot, np.memmap)]
        self._slots = []  # dropping the last reference unmaps the files
        for filename in files:
            if filename is not None:
                Path(filename).unlink(missing_ok=True)

    def __repr__(self) -> str:
        where = "memory" if self.in_memory else f"memory-mapped files in {self.directory}"
        return (
            f"FeatureCache({len(self)} images, {self.bytes_per_image / 2**10:.1f} KiB each, "
            f"{self.nbytes / 2**20:.1f} MiB in {where})"
        )


def remove_stale_cache_files(directory: str | os.PathLike | None = None) -> list[Path]:
    """Delete the cache files that processes of this host left behind when they died.

    A process killed before [`FeatureCache.close`][cncad.data.cache.FeatureCache.close] (by
    ``SIGKILL``, the out-of-memory killer or a power loss) leaves its memory-mapped files
    behind. Their names, ``cncad-features-<host>-<pid>-<uuid>.f16`` or ``.f32``, tell who
    wrote them: a file is removed when ``<host>`` is this machine's (sanitised) host name and
    no process ``<pid>`` runs here any more. Files of running processes, files written by
    other hosts into a shared folder (their processes cannot be checked from here) and files
    whose names do not follow the pattern are left alone, as is a file that cannot be deleted
    (e.g. still mapped on Windows). A dead writer's pid reused by a new process keeps its
    files until that process ends as well. On Windows no process is checked, so nothing
    is removed there.

    [`FeatureCache.build`][cncad.data.cache.FeatureCache.build] calls this on its folder
    before it creates files, so a folder in use does not fill up with leftovers.

    Args:
        directory: The folder to clean (default: the system's temporary folder, the default
            folder of ``build``). A folder that does not exist holds nothing to remove.

    Returns:
        The paths of the removed files.
    """
    folder = Path(directory or tempfile.gettempdir())
    host = _host_name()
    removed: list[Path] = []
    try:
        candidates = sorted(folder.glob(_FILE_PREFIX + "*"))
    except OSError:  # folder missing or unreadable
        return removed
    for path in candidates:
        match = _FILE_PATTERN.fullmatch(path.name)
        if match is None or match["host"] != host or _process_running(int(match["pid"])):
            continue
        try:
            path.unlink()
        except OSError:  # gone already (another process cleaned up) or locked
            continue
        removed.append(path)
    return removed


def _host_name() -> str:
    """This machine's host name reduced to ``[A-Za-z0-9_.]`` (no ``-``), at most 64 characters."""
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())[:64] or "localhost"


def _new_file_name(dtype: torch.dtype) -> str:
    return f"{_FILE_PREFIX}{_host_name()}-{os.getpid()}-{uuid.uuid4().hex}.f{dtype.itemsize * 8}"


def _process_running(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine; True when that cannot be told."""
    if pid <= 0:  # never a writer's pid; os.kill would signal a process group
        return True
    if sys.platform == "win32":  # os.kill(pid, 0) would send CTRL_C_EVENT: leave files be
        return True
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # PermissionError: it runs under another user
        return True
    return True


def _store(slots: list[Any], tensors: list[Tensor], filled: int, dtype: torch.dtype) -> None:
    """Write one batch's ``(B, ...)`` tensors into the storage at rows ``filled:filled + B``."""
    stored = [tensor.detach().to("cpu", dtype) for tensor in tensors]
    for tensor in stored:
        if not torch.isfinite(tensor).all():
            raise ValueError(
                f"an encoder feature does not fit {dtype} (|x| > "
                f"{torch.finfo(dtype).max:.0f} or NaN); cache in torch.float32"
            )
    count = len(stored[0])
    for slot, tensor in zip(slots, stored, strict=True):
        if isinstance(slot, list):
            slot.append(tensor)
        elif isinstance(slot, Tensor):
            slot[filled : filled + count] = tensor
        else:
            slot[filled : filled + count] = tensor.numpy()


def _delete_files(paths: Iterable[Path]) -> None:
    for path in paths:
        # A file that cannot go now is left to remove_stale_cache_files once this process ends.
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)
