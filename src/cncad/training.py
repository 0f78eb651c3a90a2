"""The training engine: epochs over cached or freshly encoded features, with safe steps.

[`Trainer`][cncad.training.Trainer] trains the trainable parts of a
[`CNCModel`][cncad.model.CNCModel] (prompts, fusion, MoE, decoder) with Adam. It is what
[`CNCDetector.fit`][cncad.detector.CNCDetector.fit] runs, and it can be driven directly:

* **Data.** A Dataset or DataLoader of images. With the feature cache (default) the frozen
  encoder runs once per image ([`FeatureCache`][cncad.data.cache.FeatureCache]); without it,
  on every batch. Both visit the images in the order of
  [`epoch_permutation`][cncad.data.cache.epoch_permutation].
* **Exact resume.** The global random generator (feature noise, dropout) is re-seeded at
  the start of every epoch from ``(config.seed, epoch)`` by
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

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from cncad.data.cache import FeatureCache, epoch_permutation
from cncad.errors import DatasetError, NonFiniteError
from cncad.model import CNCModel

__all__ = [
    "CacheStats",
    "Trainer",
    "TrainingState",
    "autocast_for",
    "epoch_seed",
    "model_input",
    "normal_images",
]

_NO_NORMAL_IMAGES = "the training data holds no normal images (label 0)"


def epoch_seed(seed: int, epoch: int) -> int:
    """Seed of the global random generator at the start of ``epoch``.

    Feature noise and dropout draw from the global generator; seeding it per epoch makes
    the random state at every epoch boundary a function of ``(seed, epoch)`` only, which is
    what makes a resumed run exact.

    Example:
        >>> epoch_seed(0, 3) == epoch_seed(0, 3) != epoch_seed(0, 4)
        True

    Args:
        seed: The configuration's seed (any int, negative or larger than 64 bits too).
        epoch: 0-based epoch.

    Returns:
        A seed in ``[0, 2**63)``.
    """
    words = [abs(seed), int(seed < 0), epoch, 0x434E43]  # SeedSequence takes ints of any size
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] >> np.uint64(1))


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


def normal_images(batch: Any) -> Tensor | None:
    """The normal images of a training batch.

    Args:
        batch: A dict with ``"image"`` (and optionally ``"label"``), an ``(image, label,
            ...)`` tuple or list, or an image tensor; images ``(B, 3, H, W)``.

    Returns:
        ``(B', 3, H, W)``: the images whose label is 0 (all when there are no labels), or
        None when none is normal.

    Raises:
        ValueError: The batch has no images of shape ``(B, 3, H, W)``.
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
    if labels is not None:
        images = images[torch.as_tensor(labels).reshape(-1) == 0]
        if len(images) == 0:
            return None
    return images


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

    Example:
        >>> trainer = Trainer(model, torch.device("cpu"))  # doctest: +SKIP
        >>> trainer.fit(dataset, epochs=5)  # doctest: +SKIP
        >>> trainer.state.epochs_trained  # doctest: +SKIP
        5

    Args:
        model: The model; already on ``device``. Its config sets the optimisation (lr,
            weight decay, batch size, seed, gradient clipping, bf16).
        device: The model's device.
        state: A run to continue (e.g. from a checkpoint); default: a fresh run.

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
            data: Images as [`normal_images`][cncad.training.normal_images] reads them.
            epochs: Epochs to run now; the epoch count (eq. 11's schedule, the seeds and
                the data order) continues from ``state.epochs_trained``.
            progress: Show progress bars.
            cache: Train from a feature cache built once for this call.
            cache_dir: Folder for the cache files when they do not fit in memory.
            cache_memory_gib: Largest cache kept in memory.
            cache_dtype: ``torch.float16`` or ``torch.float32``.
            on_epoch_end: Called with the number of complete epochs after each epoch, in
                training mode (e.g. to write a checkpoint).

        Returns:
            The feature cache's statistics, or None without a cache.

        Raises:
            NonFiniteError: A loss or gradient was not finite; no step was taken with it.
            DatasetError: ``data`` holds no normal image.
        """
        feature_cache = None
        stats = None
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
            finally:
                self.model.eval()
                if feature_cache is not None:
                    feature_cache.close()
        return stats

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
            torch.manual_seed(epoch_seed(config.seed, epoch))
            if feature_cache is not None:
                order = epoch_permutation(len(feature_cache), config.seed, epoch)
                batches: Iterable = feature_cache.batches(config.batch_size, order, self.device)
                total = math.ceil(len(feature_cache) / config.batch_size)
            else:
                batches = self._encoded_batches(data, epoch)
                total = _num_batches(data, config.batch_size)
            start = time.perf_counter()
            means = self.train_epoch(batches, epoch, progress=progress, total=total)
            seconds = time.perf_counter() - start
            self.state.history.append({"epoch": float(epoch), **means, "seconds": seconds})
            self.state.epochs_trained = epoch + 1
            bar.set_postfix({k: f"{v:.4f}" for k, v in means.items()})
            if on_epoch_end is not None:
                on_epoch_end(epoch + 1)

    def train_epoch(
        self,
        batches: Iterable[Any],
        epoch: int,
        *,
        progress: bool = False,
        total: int | None = None,
    ) -> dict[str, float]:
        """One pass over ``batches`` of encoder features; returns the mean of each logged value.

        Args:
            batches: Encoder features per batch
                ([`EncoderFeatures`][cncad.encoders.base.EncoderFeatures] on the device).
            epoch: The 0-based epoch (eq. 11's schedule and the messages).
            progress: Show a progress bar over batches.
            total: Number of batches, for the bar.

        Returns:
            Means of the loss terms and of ``grad_norm`` over the epoch's steps.
        """
        sums: dict[str, float] = {}
        steps = 0
        bar = tqdm(batches, desc=f"epoch {epoch}", leave=False, disable=not progress, total=total)
        for index, features in enumerate(bar):
            values = self.step(features, epoch, index)
            for key, value in values.items():
                sums[key] = sums.get(key, 0.0) + value
            steps += 1
            bar.set_postfix(loss=f"{values['total']:.4f}")
        if steps == 0:
            raise DatasetError(_NO_NORMAL_IMAGES)
        return {key: value / steps for key, value in sums.items()}

    def step(self, features: Any, epoch: int, batch_index: int = 0) -> dict[str, float]:
        """One optimisation step on a batch of encoder features, or none at all.

        The step is taken only when the loss and every gradient are finite; otherwise the
        weights and the optimizer state stay as they were and
        [`NonFiniteError`][cncad.errors.NonFiniteError] is raised.

        Args:
            features: Encoder features of one batch, on the device.
            epoch: The 0-based epoch.
            batch_index: Position of the batch in the epoch, for the message.

        Returns:
            The loss terms as floats, and ``grad_norm``: the gradient's global L2 norm
            before clipping.
        """
        with autocast_for(self.device, self.config.bf16):
            terms = self.model.loss(self.model.forward_features(features), epoch)
        values = terms.as_floats()
        where = f"epoch {epoch}, batch {batch_index}"
        if not all(math.isfinite(value) for value in values.values()):
            raise NonFiniteError(
                f"the loss is not finite at {where} ({_format_terms(values)}); no step was "
                "taken, the weights are those after the previous batch. Lower lr, or set "
                "grad_clip_norm"
            )
        self.optimizer.zero_grad(set_to_none=True)
        terms.total.backward()
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

    # ------------------------------------------------------------------ data
    def _image_batches(self, data: DataLoader | Dataset, epoch: int | None) -> Iterator[Tensor]:
        """Normal images on the device, in the epoch's order (stored order if None)."""
        config = self.config
        loader = data
        if not isinstance(data, DataLoader):
            order = None
            if epoch is not None:
                order = epoch_permutation(len(data), config.seed, epoch).tolist()
            loader = DataLoader(
                data,
                batch_size=config.batch_size,
                sampler=order,
                num_workers=config.num_workers,
                # Its own generator: worker seeds drawn from the global one would shift the
                # training-noise stream between the cached and uncached paths.
                generator=torch.Generator().manual_seed(config.seed),
            )
        for batch in loader:
            images = normal_images(batch)
            if images is not None:
                yield model_input(images, config.image_size, self.device)

    def _encode(self, images: Tensor) -> Any:
        with autocast_for(self.device, self.config.bf16):
            return self.model.encode(images)

    def _encoded_batches(self, data: DataLoader | Dataset, epoch: int) -> Iterator[Any]:
        for images in self._image_batches(data, epoch):
            yield self._encode(images)

    def _build_cache(
        self,
        data: DataLoader | Dataset,
        directory: str | os.PathLike | None,
        memory_gib: float,
        dtype: torch.dtype,
        progress: bool,
    ) -> FeatureCache:
        max_images = _num_items(data)
        try:
            return FeatureCache.build(
                self._encode,
                self._image_batches(data, epoch=None),
                max_images,
                dtype=dtype,
                memory_limit_gib=memory_gib,
                directory=directory,
                progress=progress,
            )
        except DatasetError:
            raise DatasetError(_NO_NORMAL_IMAGES) from None


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


def _num_batches(data: DataLoader | Dataset, batch_size: int) -> int | None:
    try:
        if isinstance(data, DataLoader):
            return len(data)
        return math.ceil(len(data) / batch_size)  # type: ignore[arg-type]
    except TypeError:  # iterable-style data without a length
        return None


def _num_items(data: DataLoader | Dataset) -> int | None:
    try:
        return len(data.dataset if isinstance(data, DataLoader) else data)  # type: ignore[arg-type]
    except TypeError:
        return None
