"""The order in which training visits the images, for one process or many.

Training batches are *global* batches of ``batch_size`` images (the paper's 8), the same
for every number of processes. They are built so that each process can own a fixed shard
of the images (and cache only that shard's features) and still take its part of every
batch from its own shard:

* Image ``i`` (its index in the dataset) sits in *lane* ``i % batch_size``: lane ``k``
  holds images ``k, k + B, k + 2B, ...``.
* In each epoch every lane is shuffled on its own, seeded by ``(seed, epoch, lane)``, and
  batch ``b`` takes the ``b``-th image of every lane, in lane order. A batch thus holds one
  image of each lane. When ``n`` is not a multiple of ``B``, the images left over (one
  from each of the first ``n % B`` lanes) join the last full batch instead of forming a
  small batch of their own, so every batch has at least ``B`` images (all of them when
  ``n < B``), and every process has a part in every batch.
* With ``W`` processes, process ``r`` takes the positions ``p`` of every batch whose lane
  ``p % B`` has ``(p % B) % W == r``: all from its shard, the images ``i`` with
  ``(i % B) % W == r``.

So the global batches depend on ``(n, batch_size, seed, epoch)`` only, never on ``W``,
and one process (``W = 1``) visits them whole.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

__all__ = [
    "dataset_size",
    "derive_seed",
    "epoch_batches",
    "owned_by",
    "positions_of_rank",
    "shard_indices",
]

_LANE_TAG = 0x4C414E45  # keeps the lane seeds apart from other uses of derive_seed


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[Tensor]:
    """The global batches of one epoch, as dataset indices; position ``p`` is from lane ``p % B``.

    Examples:
        >>> batches = epoch_batches(10, 4, seed=0, epoch=0)
        >>> tuple(len(b) for b in batches)  # the 2 left over join the last full batch
        (4, 6)
        >>> sorted(torch.cat(batches).tolist()) == list(range(10))
        True
        >>> tuple(int(i) % 4 for i in batches[1])  # the lane of each position
        (0, 1, 2, 3, 0, 1)

    Args:
        n: Number of images.
        batch_size: Images per global batch (B).
        seed: The configuration's seed.
        epoch: 0-based epoch.

    Returns:
        ``max(1, n // B)`` int64 tensors (none when ``n`` is 0): B images each, the last
        with the ``n % B`` left over as well.
    """
    if n < 0 or batch_size < 1:
        raise ValueError(f"need n >= 0 and batch_size >= 1, got {n} and {batch_size}")
    lanes = []
    for lane in range(min(batch_size, n)):
        members = torch.arange(lane, n, batch_size)
        generator = torch.Generator().manual_seed(derive_seed(seed, epoch, lane, _LANE_TAG))
        lanes.append(members[torch.randperm(len(members), generator=generator)])
    rows = [
        torch.stack([lane[b] for lane in lanes if b < len(lane)])
        for b in range(math.ceil(n / batch_size))
    ]
    if len(rows) > 1 and len(rows[-1]) < batch_size:
        rows[-2:] = [torch.cat(rows[-2:])]
    return rows


def owned_by(indices: Tensor, batch_size: int, world_size: int, rank: int) -> Tensor:
    """Which of ``indices`` (dataset indices, or positions in a batch) process ``rank`` owns.

    Index ``i`` sits in lane ``i % B``, and process ``r`` owns the lanes ``k`` with
    ``k % W == r``: the one rule behind [`shard_indices`][cncad.data.sampling.shard_indices]
    and [`positions_of_rank`][cncad.data.sampling.positions_of_rank].

    Examples:
        >>> owned_by(torch.arange(6), 4, world_size=2, rank=1).tolist()
        [False, True, False, True, False, True]

    Args:
        indices: ``(n,)`` int64 indices.
        batch_size: B.
        world_size: Number of processes, at most ``batch_size``.
        rank: This process, ``0 <= rank < world_size``.

    Returns:
        ``(n,)`` bool mask, True where ``(i % B) % W == rank``.
    """
    _check_rank(batch_size, world_size, rank)
    return (indices % batch_size) % world_size == rank


def positions_of_rank(length: int, batch_size: int, world_size: int, rank: int) -> Tensor:
    """The positions of a global batch of ``length`` images that process ``rank`` takes.

    Examples:
        >>> positions_of_rank(6, 4, world_size=2, rank=1).tolist()
        [1, 3, 5]

    Args:
        length: Images in the batch (as built by
            [`epoch_batches`][cncad.data.sampling.epoch_batches]).
        batch_size: B; position ``p`` holds an image of lane ``p % B``.
        world_size: Number of processes, at most ``batch_size``.
        rank: This process, ``0 <= rank < world_size``.

    Returns:
        Increasing int64 positions ``p < length`` with ``(p % B) % W == rank``.
    """
    positions = torch.arange(length)
    return positions[owned_by(positions, batch_size, world_size, rank)]


def shard_indices(n: int, batch_size: int, world_size: int, rank: int) -> Tensor:
    """The images whose features process ``rank`` caches: those of its lanes.

    Examples:
        >>> shard_indices(10, 4, world_size=2, rank=1).tolist()
        [1, 3, 5, 7, 9]

    Args:
        n: Number of images.
        batch_size: Images per global batch.
        world_size: Number of processes.
        rank: This process.

    Returns:
        Increasing int64 indices ``i < n`` with ``(i % batch_size) % world_size == rank``;
        the shards of all ranks are disjoint and cover ``range(n)``.
    """
    indices = torch.arange(n)
    return indices[owned_by(indices, batch_size, world_size, rank)]


def dataset_size(data: Any) -> int | None:
    """The number of items of a Dataset, or of a DataLoader's dataset; None if it has no length.

    Examples:
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> dataset_size(DataLoader(TensorDataset(torch.zeros(5, 1)), batch_size=2))
        5

    Args:
        data: A map-style or iterable Dataset, or a DataLoader.

    Returns:
        ``len`` of the dataset, or None for iterable data without a length.
    """
    try:
        return len(data.dataset if isinstance(data, DataLoader) else data)
    except TypeError:
        return None


def _check_rank(batch_size: int, world_size: int, rank: int) -> None:
    if not 1 <= world_size <= batch_size:
        raise ValueError(
            f"{world_size} processes cannot share global batches of {batch_size} images: "
            "batch_size is the global batch and must be at least the number of processes"
        )
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")


def derive_seed(seed: int, *labels: int) -> int:
    """A well-mixed 63-bit seed for one use of ``seed`` (an epoch, a lane, a process).

    Examples:
        >>> derive_seed(0, 1) == derive_seed(0, 1) != derive_seed(0, 2)
        True

    Args:
        seed: Any int (negative, or wider than 64 bits, too).
        *labels: Non-negative ints that name the use.

    Returns:
        A seed in ``[0, 2**63)``, from NumPy's ``SeedSequence`` of the arguments.
    """
    words = [abs(seed), int(seed < 0), *labels]  # SeedSequence takes ints of any size
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] >> np.uint64(1))
