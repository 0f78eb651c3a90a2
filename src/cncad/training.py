"""The training engine: epochs over cached or freshly encoded features, with safe steps.

[`Trainer`][cncad.training.Trainer] trains the trainable parts of a
[`CNCModel`][cncad.model.CNCModel] (prompts, fusion, MoE, decoder) with Adam. It is what
[`CNCDetector.fit`][cncad.detector.CNCDetector.fit] runs, and it can be driven directly:

* **Data.** A Dataset or DataLoader of images. With the feature cache (default) the frozen
  encoder runs once per image ([`FeatureCache`][cncad.data.cache.FeatureCache]); without it,
  on every batch. Both visit the images in the global batches of
  [`epoch_batches`][cncad.data.sampling.epoch_batches] (``config.batch_size`` images each).
* **Many processes.** Under ``torchrun`` the same code trains one model with
  ``DistributedDataParallel`` over the trainable parts (the frozen encoder is never
  wrapped or synchronised). ``batch_size`` stays the *global* batch: each process takes
  its lanes of every batch ([`positions_of_rank`][cncad.data.sampling.positions_of_rank]) and caches
  only its shard of the images. Every loss means what it means in one process: the mean
  terms are weighted by each process's share of the batch, and the MoE importance loss
  (eq. 15) is computed on the global batch's gate mass. Only rank 0 shows progress; the
  caller writes files on rank 0 only (see [`cncad.distributed`][cncad.distributed]).
* **Exact resume.** The global random generator (feature noise, dropout) is re-seeded at
  the start of every epoch from ``(config.seed, epoch)`` (and the rank) by
  [`epoch_seed`][cncad.training.epoch_seed], and the data order is a function of the same
  pair, so every random state that training uses at an epoch boundary is determined by the
  seed and the number of epochs done. Together with the weights and Adam's state (saved in
  a checkpoint), ``k`` epochs, a stop, and ``N - k`` more give the same weights, bit for
  bit, as ``N`` epochs in one go. The caller's own random state is left as it was.
* **Safe steps.** A loss or gradient that is NaN or infinite stops training *before* the
  optimizer step: the weights and Adam's moments stay those after the last good batch, and
  [`NonFiniteError`][cncad.errors.NonFiniteError] names the epoch, the batch and the loss
  terms. Optional gradient clipping (``config.grad_clip_norm``).
* **Interruption.** The feature-cache files are deleted whatever stops the run (an
  exception, Ctrl-C, or SIGTERM, which is turned into ``SystemExit(143)`` while training
  runs in the main thread of a process that has not set its own handler). Checkpoints are
  written by a callback after complete epochs, atomically, so a stop leaves the last one
  intact.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from cncad.data.cache import FeatureCache
from cncad.data.sampling import (
    dataset_size,
    derive_seed,
    epoch_batches,
    owned_by,
    positions_of_rank,
    shard_indices,
)
from cncad.data.transforms import check_model_batch
from cncad.distributed import ProcessGroup
from cncad.errors import DatasetError, NonFiniteError
from cncad.model import CNCModel

__all__ = [
    "CacheStats",
    "Trainer",
    "TrainingState",
    "autocast_for",
    "epoch_seed",
    "model_input",
    "split_batch",
]

_NO_NORMAL_IMAGES = "the training data holds no normal images (label 0)"
_EPOCH_TAG = 0x434E43


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """Seed of the global random generator at the start of ``epoch`` in process ``rank``.

    Feature noise and dropout draw from the global generator; seeding it per epoch makes
    the random state at every epoch boundary a function of ``(seed, epoch)`` only, which is
    what makes a resumed run exact. Each process of a multi-process run gets its own
    stream (rank 0's is the single-process one).

    Examples:
        >>> epoch_seed(0, 3) == epoch_seed(0, 3) != epoch_seed(0, 4)
        True

    Args:
        seed: The configuration's seed (any int, negative or larger than 64 bits too).
        epoch: 0-based epoch.
        rank: The process's rank.

    Returns:
        A seed in ``[0, 2**63)``.
    """
    return derive_seed(seed, epoch, _EPOCH_TAG, *([rank] if rank else []))


def autocast_for(device: torch.device, bf16: bool) -> torch.autocast:
    """The autocast context of training and inference: bfloat16 on CUDA when ``bf16``.

    Args:
        device: The model's device.
        bf16: ``config.bf16``.

    Returns:
        A ``torch.autocast`` context, disabled on the CPU or when ``bf16`` is False.
    """
    enabled = bf16 and device.type == "cuda"
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def model_input(images: Tensor, image_size: int, device: torch.device) -> Tensor:
    """Normalised images as the model takes them: float32 on ``device``, ``image_size`` square.

    Args:
        images: ``(B, 3, H, W)`` normalised images; resized (bilinear, antialiased) when
            ``(H, W) != (image_size, image_size)``.
        image_size: The model's input side.
        device: Where the model is.

    Returns:
        ``(B, 3, image_size, image_size)`` float32 tensor on ``device``.
    """
    images = images.to(device, torch.float32)
    if images.shape[-2:] != (image_size, image_size):
        images = F.interpolate(
            images, size=(image_size, image_size), mode="bilinear", antialias=True
        )
    return images


def split_batch(batch: Any) -> tuple[Tensor, Tensor]:
    """The images of a training batch and which of them are normal.

    Args:
        batch: A dict with ``"image"`` (and optionally ``"label"``), an ``(image, label,
            ...)`` tuple or list, or an image tensor; images ``(B, 3, H, W)``.

    Returns:
        ``(images, normal)``: the ``(B, 3, H, W)`` images and a ``(B,)`` bool mask, True
        where the label is 0 (everywhere when there are no labels).

    Raises:
        ValueError: The batch has no images of shape ``(B, 3, H, W)``, or images with NaN,
            infinite or out-of-range values (see
            [`check_model_batch`][cncad.data.transforms.check_model_batch]).
        TypeError: The images are not floating point.
    """
    labels = None
    if isinstance(batch, dict):
        if "image" not in batch:
            raise ValueError("training batches given as dicts need an 'image' entry")
        images, labels = batch["image"], batch.get("label")
    elif isinstance(batch, (list, tuple)):
        images = batch[0]
        if len(batch) > 1 and isinstance(batch[1], Tensor) and batch[1].ndim == 1:
            labels = batch[1]
    else:
        images = batch
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"expected image batches of shape (B, 3, H, W), got {shape}")
    check_model_batch(images, "a training batch")
    if labels is None:
        return images, torch.ones(len(images), dtype=torch.bool)
    return images, torch.as_tensor(labels).reshape(-1) == 0


@dataclass
class TrainingState:
    """Where a training run stands; with the weights, all that a resumed run needs.

    Attributes:
        epochs_trained: Complete epochs so far, over all runs.
        history: One dict per epoch: ``epoch``, the mean loss terms, ``grad_norm`` (mean
            gradient norm before clipping) and ``seconds`` (wall time of the epoch).
        optimizer_state: Adam's ``state_dict`` to restore, or None for a fresh optimizer.
    """

    epochs_trained: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    optimizer_state: dict[str, Any] | None = None


@dataclass
class CacheStats:
    """How the feature cache of the last run was built.

    Attributes:
        images: Images cached.
        bytes_per_image: Storage bytes per image.
        in_memory: Whether it was held in memory (else memory-mapped files).
        build_seconds: Wall time of the caching pass.
    """

    images: int
    bytes_per_image: int
    in_memory: bool
    build_seconds: float


class Trainer:
    """Trains a [`CNCModel`][cncad.model.CNCModel]'s trainable parts with Adam.

    Examples:
        >>> trainer = Trainer(model, torch.device("cpu"))  # doctest: +SKIP
        >>> trainer.fit(dataset, epochs=5)  # doctest: +SKIP
        >>> trainer.state.epochs_trained  # doctest: +SKIP
        5

    Args:
        model: The model; already on ``device``. Its config sets the optimisation (lr,
            weight decay, batch size, seed, gradient clipping, bf16).
        device: The model's device.
        state: A run to continue (e.g. from a checkpoint); default: a fresh run.

    Attributes:
        state: The [`TrainingState`][cncad.training.TrainingState] (epochs, history).
        optimizer: The Adam optimizer.
        group: The [`ProcessGroup`][cncad.distributed.ProcessGroup] of the last
            [`fit`][cncad.training.Trainer.fit] (one process until then).
        cached_indices: Dataset indices (stream positions for a DataLoader) of the images
            whose features the last ``fit`` cached in this process, in cache order; None
            without a cache.
        normal_statistics: After a ``fit`` with the cache, what the trained model gives
            on (up to 64 of) its own normal training images: quantiles of the anomaly-map
            values (``map_p50``, ``map_p99``, ``map_p999``, ``map_max``) and of the image
            scores (``score_p50``, ``score_max``), and ``images``. None until then.

    Raises:
        ValueError: ``state.optimizer_state`` does not fit the model's trainable
            parameters.
    """

    def __init__(
        self, model: CNCModel, device: torch.device, state: TrainingState | None = None
    ) -> None:
        self.model = model
        self.device = device
        self.state = state or TrainingState()
        self.parameters = model.trainable_parameters()
        config = model.config
        self.optimizer = torch.optim.Adam(
            self.parameters, lr=config.lr, weight_decay=config.weight_decay
        )
        if self.state.optimizer_state is not None:
            self._restore_optimizer(self.state.optimizer_state)
            self.state.optimizer_state = None  # the optimizer holds it from now on
        self.group = ProcessGroup()
        self.cached_indices: Tensor | None = None
        self.normal_statistics: dict[str, float] | None = None
        self._slot_of = torch.zeros(0, dtype=torch.long)  # dataset index -> cache slot, or -1
        self._student: nn.Module = _Student(model)  # in DistributedDataParallel with many
        self._spare: Any = None  # features for a process whose part of a batch is empty

    @property
    def config(self) -> Any:
        """The model's [`CNCConfig`][cncad.config.CNCConfig]."""
        return self.model.config

    def _restore_optimizer(self, optimizer_state: dict[str, Any]) -> None:
        groups = optimizer_state.get("param_groups")
        moments = optimizer_state.get("state")
        if not isinstance(groups, list) or len(groups) != 1 or not isinstance(moments, dict):
            raise ValueError("the optimizer state is not that of one Adam parameter group")
        if list(groups[0].get("params", [])) != list(range(len(self.parameters))):
            raise ValueError(
                f"the optimizer state covers {len(groups[0].get('params', []))} tensors, "
                f"the model trains {len(self.parameters)}"
            )
        for index, entry in moments.items():
            parameter = self.parameters[index] if 0 <= index < len(self.parameters) else None
            for name in ("exp_avg", "exp_avg_sq"):
                moment = entry.get(name) if isinstance(entry, dict) else None
                if parameter is None or not isinstance(moment, Tensor):
                    raise ValueError(f"the optimizer state of tensor {index} is malformed")
                if moment.shape != parameter.shape:
                    raise ValueError(
                        f"the optimizer state of tensor {index} is {tuple(moment.shape)}, "
                        f"the parameter {tuple(parameter.shape)}"
                    )
        self.optimizer.load_state_dict(optimizer_state)

    def optimizer_state_dict(self) -> dict[str, Any]:
        """Adam's state, for a checkpoint."""
        return self.optimizer.state_dict()

    # ------------------------------------------------------------------ the run
    def fit(
        self,
        data: DataLoader | Dataset,
        epochs: int,
        *,
        progress: bool = True,
        cache: bool = True,
        cache_dir: str | os.PathLike | None = None,
        cache_memory_gib: float = 4.0,
        cache_dtype: torch.dtype = torch.float16,
        on_epoch_end: Callable[[int], None] | None = None,
    ) -> CacheStats | None:
        """Run ``epochs`` more epochs (see [`CNCDetector.fit`][cncad.detector.CNCDetector.fit]).

        Args:
            data: A Dataset (map-style) or DataLoader of images, as
                [`split_batch`][cncad.training.split_batch] reads its batches.
            epochs: Epochs to run now; the epoch count (eq. 11's schedule, the seeds and
                the data order) continues from ``state.epochs_trained``.
            progress: Show progress bars (rank 0 only).
            cache: Train from a feature cache built once for this call.
            cache_dir: Folder for the cache files when they do not fit in memory.
            cache_memory_gib: Largest cache kept in memory (per process).
            cache_dtype: ``torch.float16`` or ``torch.float32``.
            on_epoch_end: Called on every process with the number of complete epochs
                after each epoch, in training mode (e.g. to write a checkpoint on rank 0).

        Returns:
            The feature cache's statistics (this process's shard), or None without a cache.

        Raises:
            NonFiniteError: A loss or gradient was not finite; no step was taken with it.
            DatasetError: ``data`` holds no normal image (in this process's shard).
            ValueError: Under ``torchrun``, more processes than ``batch_size``, or a
                DataLoader without the cache (pass a Dataset so each process can load
                its own part).
        """
        self.group = ProcessGroup.from_environment(self.device)
        progress = progress and self.group.is_main
        if self.group.is_distributed:
            shard_indices(0, self.config.batch_size, *self._rank_pair())  # checks W <= B
            if isinstance(data, DataLoader) and not cache:
                raise ValueError(
                    "with several processes, fit(cache=False) needs a Dataset, not a "
                    "DataLoader, so that each process can load its own part of each batch"
                )
            self._wrap_for_processes()
        feature_cache = None
        stats = None
        self._spare = None
        with _sigterm_as_exit():
            try:
                if cache and epochs > 0:
                    start = time.perf_counter()
                    feature_cache = self._build_cache(
                        data, cache_dir, cache_memory_gib, cache_dtype, progress
                    )
                    stats = CacheStats(
                        len(feature_cache),
                        feature_cache.bytes_per_image,
                        feature_cache.in_memory,
                        time.perf_counter() - start,
                    )
                devices = [self.device.index or 0] if self.device.type == "cuda" else []
                with torch.random.fork_rng(devices=devices):
                    self.model.train()
                    self._run_epochs(data, feature_cache, epochs, progress, on_epoch_end)
                if feature_cache is not None and len(feature_cache):
                    self.normal_statistics = self._normal_statistics(feature_cache)
            finally:
                self.model.eval()
                self._spare = None
                if feature_cache is not None:
                    feature_cache.close()
        return stats

    @torch.no_grad()
    def _normal_statistics(self, cache: FeatureCache, most: int = 64) -> dict[str, float]:
        """Map and score quantiles of the trained model on up to ``most`` cached images."""
        self.model.eval()
        slots = torch.linspace(0, len(cache) - 1, min(most, len(cache))).round().long()
        maps, scores = [], []
        for start in range(0, len(slots), self.config.batch_size):
            features = cache.get(slots[start : start + self.config.batch_size], self.device)
            with autocast_for(self.device, self.config.bf16):
                batch_maps, batch_scores = self.model.predict_features(features)
            maps.append(batch_maps.float().flatten().cpu())
            scores.append(batch_scores.float().cpu())
        values, score = torch.cat(maps), torch.cat(scores)
        # torch.quantile takes at most 2**24 values; 64 maps of 512 x 512 would exceed it
        step = max(1, math.ceil(len(values) / 2**24))
        quantiles = torch.quantile(values[::step], torch.tensor([0.5, 0.99, 0.999]))
        return {
            "map_p50": float(quantiles[0]),
            "map_p99": float(quantiles[1]),
            "map_p999": float(quantiles[2]),
            "map_max": float(values.max()),
            "score_p50": float(score.median()),
            "score_max": float(score.max()),
            "images": float(len(slots)),
        }

    def _run_epochs(
        self,
        data: DataLoader | Dataset,
        feature_cache: FeatureCache | None,
        epochs: int,
        progress: bool,
        on_epoch_end: Callable[[int], None] | None,
    ) -> None:
        config = self.config
        first = self.state.epochs_trained
        bar = tqdm(range(first, first + epochs), desc="fit", unit="epoch", disable=not progress)
        for epoch in bar:
            torch.manual_seed(epoch_seed(config.seed, epoch, self.group.rank))
            if feature_cache is not None:
                batches: Iterable = self._cached_batches(feature_cache, epoch)
                total = _batch_count(self._num_images, config.batch_size)
            else:
                batches = self._encoded_batches(data, epoch)
                total = (
                    _own_length(data)
                    if isinstance(data, DataLoader)
                    else _batch_count(len(data), config.batch_size)
                )
            start = time.perf_counter()
            means = self._train_epoch(batches, epoch, progress, total)
            seconds = time.perf_counter() - start
            self.state.history.append({"epoch": float(epoch), **means, "seconds": seconds})
            self.state.epochs_trained = epoch + 1
            bar.set_postfix({k: f"{v:.4f}" for k, v in means.items()})
            if on_epoch_end is not None:
                on_epoch_end(epoch + 1)

    def _train_epoch(
        self, batches: Iterable[tuple[Any, int]], epoch: int, progress: bool, total: int | None
    ) -> dict[str, float]:
        """One pass over ``(features, images in this process)`` pairs; the mean logged values."""
        sums: dict[str, float] = {}
        steps = 0
        bar = tqdm(batches, desc=f"epoch {epoch}", leave=False, disable=not progress, total=total)
        for index, (features, count) in enumerate(bar):
            global_count = int(self.group.sum(torch.tensor(count)))
            if global_count == 0:
                continue  # no process has a normal image in this batch
            values = self.step(features, epoch, index, count=count, total=global_count)
            for key, value in values.items():
                sums[key] = sums.get(key, 0.0) + value
            steps += 1
            bar.set_postfix(loss=f"{values['total']:.4f}")
        if steps == 0:
            raise DatasetError(_NO_NORMAL_IMAGES)
        return {key: value / steps for key, value in sums.items()}

    def step(
        self,
        features: Any,
        epoch: int,
        batch_index: int = 0,
        *,
        count: int | None = None,
        total: int | None = None,
    ) -> dict[str, float]:
        """One optimisation step on a batch of encoder features, or none at all.

        The step is taken only when the loss and every gradient are finite; otherwise the
        weights and the optimizer state stay as they were and
        [`NonFiniteError`][cncad.errors.NonFiniteError] is raised (on every process).

        With several processes, this process holds ``count`` of the batch's ``total``
        images (``features`` may stand in for none when ``count`` is 0: its loss then
        weighs nothing). The objective each process differentiates is
        ``W · ((count / total) · (L_distill + L_constraint) + L_moe)``, with L_moe on the
        global gate mass: ``DistributedDataParallel`` averages the gradients over the W
        processes, which leaves the gradient of the global batch's loss.

        Args:
            features: Encoder features of this process's part of the batch, on the device.
            epoch: The 0-based epoch.
            batch_index: Position of the batch in the epoch, for the message.
            count: Images of the batch in this process (several processes only).
            total: Images of the batch in all processes (several processes only).

        Returns:
            The loss terms of the whole batch as floats, and ``grad_norm``: the gradient's
            global L2 norm before clipping.
        """
        split = self.group.is_distributed and count is not None and total is not None
        reduce = None
        if split:
            reduce = self.group.sum_with_local_gradient
            if count == 0:
                reduce = self._sum_without_local
        with autocast_for(self.device, self.config.bf16):
            output = self._student(features)
            terms = self.model.loss(output, epoch, importance_reduce=reduce)
        if split:
            share = count / total
            values = self._batch_values(terms, share)
            objective = self.group.world_size * (
                share * (terms.distill + terms.constraint) + terms.moe
            )
        else:
            values = terms.as_floats()
            objective = terms.total
        where = f"epoch {epoch}, batch {batch_index}"
        if not all(math.isfinite(value) for value in values.values()):
            raise NonFiniteError(
                f"the loss is not finite at {where} ({_format_terms(values)}); no step was "
                "taken, the weights are those after the previous batch. Lower lr, or set "
                "grad_clip_norm"
            )
        self.optimizer.zero_grad(set_to_none=True)
        objective.backward()
        grads = [p.grad for p in self.parameters if p.grad is not None]
        norm = _global_norm(grads)
        if not math.isfinite(norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteError(
                f"the gradient is not finite at {where} (norm {norm}; loss "
                f"{_format_terms(values)}); no step was taken, the weights are those after "
                "the previous batch. Lower lr, or set grad_clip_norm"
            )
        clip = self.config.grad_clip_norm
        if clip is not None and norm > clip:
            scale = clip / (norm + 1e-6)
            for grad in grads:
                grad.mul_(scale)
        self.optimizer.step()
        return {**values, "grad_norm": norm}

    def _batch_values(self, terms: Any, share: float) -> dict[str, float]:
        """The loss terms of the whole batch: mean terms weighted by share, L_moe as is."""
        names = ("distill", "constraint", "align_encoder", "align_decoder")
        local = torch.stack([getattr(terms, name).detach().float() * share for name in names])
        summed = self.group.sum(local).tolist()
        values = dict(zip(names, summed, strict=True))
        values["moe"] = float(terms.moe.detach())  # already the global batch's
        values["total"] = values["distill"] + values["constraint"] + values["moe"]
        return {name: values[name] for name in terms._fields}

    def _sum_without_local(self, local: Tensor) -> Tensor:
        """The global importance when this process's batch part is a stand-in."""
        return self.group.sum_with_local_gradient(local * 0.0)

    def _wrap_for_processes(self) -> None:
        """Wrap the trainable part in DistributedDataParallel (once per trainer)."""
        if isinstance(self._student, DistributedDataParallel):
            return
        student = self._student
        # Only the trainable parameters take part: the frozen encoder is neither
        # broadcast at construction nor all-reduced, and no buffer is ever synchronised
        # (all are ignored, so DDP's buffer broadcast has nothing to send).
        frozen = [name for name, p in student.named_parameters() if not p.requires_grad]
        frozen += [name for name, _ in student.named_buffers()]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(student, frozen)
        self._student = DistributedDataParallel(
            student,
            device_ids=[self.device] if self.device.type == "cuda" else None,
            find_unused_parameters=True,  # top-K routing leaves some experts idle
        )

    # ------------------------------------------------------------------ data
    @property
    def _num_images(self) -> int:
        return len(self._slot_of)

    def _local_part(self, batch: Tensor) -> Tensor:
        return batch[positions_of_rank(len(batch), self.config.batch_size, *self._rank_pair())]

    def _cached_batches(self, cache: FeatureCache, epoch: int) -> Iterator[tuple[Any, int]]:
        """This process's part of every global batch, from the cache, with its size."""
        config = self.config
        for batch in epoch_batches(self._num_images, config.batch_size, config.seed, epoch):
            slots = self._slot_of[self._local_part(batch)]
            slots = slots[slots >= 0]  # defective images and other processes' images
            if len(slots):
                yield cache.get(slots, self.device), len(slots)
            else:  # a stand-in that weighs nothing, so that every process steps
                yield cache.get([0], self.device), 0

    def _encoded_batches(self, data: DataLoader | Dataset, epoch: int) -> Iterator[Any]:
        """This process's part of every global batch, encoded now (no cache), with its size."""
        if isinstance(data, DataLoader):  # one process: the loader's own batches and order
            for batch in data:
                images, normal = split_batch(batch)
                count = int(normal.sum())
                yield (self._encode(self._to_model(images[normal])) if count else None), count
            return
        config = self.config
        parts = [
            self._local_part(batch).tolist()
            for batch in epoch_batches(len(data), config.batch_size, config.seed, epoch)
        ]
        loaded = iter(self._loader(data, [part for part in parts if part]))
        for part in parts:
            features, count = None, 0
            if part:
                images, normal = split_batch(next(loaded))
                count = int(normal.sum())
                if count:
                    features = self._encode(self._to_model(images[normal]))
                    self._spare = features
            if count == 0 and self.group.is_distributed:
                features = self._spare_features(data)  # a stand-in that weighs nothing
            yield features, count

    def _spare_features(self, data: Dataset) -> Any:
        """Features to run the model on when this process has no image in a batch."""
        if self._spare is None:
            index = int(shard_indices(len(data), self.config.batch_size, *self._rank_pair())[0])
            images, _ = split_batch(next(iter(self._loader(data, [[index]]))))
            self._spare = self._encode(self._to_model(images))
        return self._spare

    def _rank_pair(self) -> tuple[int, int]:
        return self.group.world_size, self.group.rank

    def _loader(self, data: Dataset, batches: list[list[int]]) -> DataLoader:
        return DataLoader(
            data,
            batch_sampler=batches,
            num_workers=self.config.num_workers,
            # Its own generator: worker seeds drawn from the global one would shift the
            # training-noise stream between the cached and uncached paths.
            generator=torch.Generator().manual_seed(self.config.seed),
        )

    def _to_model(self, images: Tensor) -> Tensor:
        return model_input(images, self.config.image_size, self.device)

    def _encode(self, images: Tensor) -> Any:
        with autocast_for(self.device, self.config.bf16):
            return self.model.encode(images)

    def _shard_stream(self, data: DataLoader | Dataset) -> Iterator[Tensor]:
        """The normal images of this process's shard, model-ready, in index order.

        Records their indices in ``cached_indices`` and the number of images (or stream
        positions) in ``_slot_of``'s length as it goes.
        """
        config = self.config
        kept: list[Tensor] = []
        if isinstance(data, DataLoader):
            seen = 0
            for batch in data:
                images, normal = split_batch(batch)
                positions = torch.arange(seen, seen + len(images))
                seen += len(images)
                mine = normal & owned_by(positions, config.batch_size, *self._rank_pair())
                if mine.any():
                    kept.append(positions[mine])
                    yield self._to_model(images[mine])
            total = seen
        else:
            total = len(data)
            owned = shard_indices(total, config.batch_size, *self._rank_pair()).tolist()
            chunks = [
                owned[i : i + config.batch_size] for i in range(0, len(owned), config.batch_size)
            ]
            for chunk, batch in zip(chunks, self._loader(data, chunks), strict=True):
                images, normal = split_batch(batch)
                if normal.any():
                    kept.append(torch.tensor(chunk)[normal])
                    yield self._to_model(images[normal])
        indices = torch.cat(kept) if kept else torch.zeros(0, dtype=torch.long)
        self.cached_indices = indices
        self._slot_of = torch.full((total,), -1, dtype=torch.long)
        self._slot_of[indices] = torch.arange(len(indices))

    def _build_cache(
        self,
        data: DataLoader | Dataset,
        directory: str | os.PathLike | None,
        memory_gib: float,
        dtype: torch.dtype,
        progress: bool,
    ) -> FeatureCache:
        max_images = dataset_size(data)
        if max_images is not None:  # this process's shard, an upper bound for DataLoaders too
            max_images = len(shard_indices(max_images, self.config.batch_size, *self._rank_pair()))
        try:
            return FeatureCache.build(
                self._encode,
                self._shard_stream(data),
                max_images,
                dtype=dtype,
                memory_limit_gib=memory_gib,
                directory=directory,
                progress=progress,
            )
        except DatasetError:
            where = (
                f" in the shard of process {self.group.rank}" if self.group.is_distributed else ""
            )
            raise DatasetError(_NO_NORMAL_IMAGES + where) from None


class _Student(nn.Module):
    """The part of the model that trains, as the module DistributedDataParallel wraps."""

    def __init__(self, model: CNCModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, features: Any) -> Any:
        return self.model.forward_features(features)


def _global_norm(grads: list[Tensor]) -> float:
    if not grads:
        return 0.0
    norms = torch.stack([torch.linalg.vector_norm(g.detach().float()) for g in grads])
    return float(torch.linalg.vector_norm(norms))


def _format_terms(values: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:.4g}" for name, value in values.items())


@contextlib.contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """Turn SIGTERM into ``SystemExit(143)`` while training, so cleanup code runs.

    Only in the main thread (where Python delivers signals) and only when the process has
    no SIGTERM handler of its own; the previous handler is restored afterwards.
    """
    install = threading.current_thread() is threading.main_thread()
    try:
        install = install and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    except (AttributeError, ValueError):  # platforms without SIGTERM handling
        install = False
    if not install:
        yield
        return

    def terminate(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _batch_count(n: int | None, batch_size: int) -> int | None:
    """Batches of an epoch of n images (see ``epoch_batches``); None when n is unknown."""
    if n is None:
        return None
    return max(1, n // batch_size) if n else 0


def _own_length(loader: DataLoader) -> int | None:
    try:
        return len(loader)
    except TypeError:  # iterable-style data without a length
        return None
