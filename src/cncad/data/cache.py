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
"""

from __future__ import annotations

import math
import os
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

__all__ = ["FeatureCache", "epoch_permutation"]

_NUMPY_DTYPES = {torch.float16: np.float16, torch.float32: np.float32}


def epoch_permutation(n: int, seed: int, epoch: int) -> Tensor:
    """The order in which training visits ``n`` images in ``epoch``.

    Shared by the cached and the uncached training paths so that both see the same
    batches for the same seed.

    Args:
        n: Number of training images.
        seed: The configuration's seed.
        epoch: 0-based epoch.

    Returns:
        ``(n,)`` int64 permutation.
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator)


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
            this cache created there are deleted by [`close`][cncad.data.cache.FeatureCache.close].
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
                ``memory_limit_gib=0`` for that.
            progress: Show a progress bar over images.

        Returns:
            The filled cache.

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
        filled = 0
        bar = tqdm(total=max_images, desc="caching features", unit="img", disable=not progress)
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
                    slots = [_new_memmap(folder, (max_images, *s), dtype) for s in shapes]
            count = len(tensors[0])
            if max_images is not None and filled + count > max_images:
                raise ValueError(f"the batches hold more than the announced {max_images} images")
            for slot, tensor in zip(slots, tensors, strict=True):
                stored = tensor.detach().to("cpu", dtype)
                if not torch.isfinite(stored).all():
                    raise ValueError(
                        f"an encoder feature does not fit {dtype} (|x| > "
                        f"{torch.finfo(dtype).max:.0f} or NaN); cache in torch.float32"
                    )
                if isinstance(slot, list):
                    slot.append(stored)
                elif isinstance(slot, Tensor):
                    slot[filled : filled + count] = stored
                else:
                    slot[filled : filled + count] = stored.numpy()
            filled += count
            bar.update(count)
        bar.close()
        if slots is None or layout is None or filled == 0:
            raise DatasetError("no images to cache features of")
        if max_images is None:
            slots = [torch.cat(chunks) for chunks in slots]
        elif filled < max_images:
            slots = [slot[:filled] for slot in slots]  # views: the tail is never read
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
                [`epoch_permutation`][cncad.data.cache.epoch_permutation].
            device: Where to put the tensors.

        Yields:
            The encoder's NamedTuple with float32 tensors of ``batch_size`` images.
        """
        order = torch.arange(len(self)) if order is None else order
        for start in range(0, len(order), batch_size):
            yield self.get(order[start : start + batch_size], device)

    def close(self) -> None:
        """Release the storage and delete the memory-mapped files this cache created."""
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


def _new_memmap(folder: Path, shape: tuple[int, ...], dtype: torch.dtype) -> np.memmap:
    path = folder / f"cncad-features-{uuid.uuid4().hex}.f{dtype.itemsize * 8}"
    return np.memmap(path, dtype=_NUMPY_DTYPES[dtype], mode="w+", shape=shape)
