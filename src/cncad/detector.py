"""CNCDetector: the notebook-facing facade (fit, predict, evaluate, save, load).

It composes the pieces and adds no logic of its own beyond argument checks: the model is
[`CNCModel`][cncad.model.CNCModel], training is [`Trainer`][cncad.training.Trainer], the file
format is [`cncad.checkpoint`][cncad.checkpoint], the metrics are
[`AnomalyEvaluator`][cncad.evaluation.AnomalyEvaluator].
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from cncad._inference import (
    Decision,
    Thresholds,
    check_count,
    check_optional_finite,
    join_batches,
    scored_batch,
    scored_stream,
    stream_length,
)
from cncad.calibration import (
    Calibration,
    CalibrationError,
    PixelHistogram,
    calibrate_arrays,
    check_target_fpr,
)
from cncad.checkpoint import (
    CHECKPOINT_NAME,
    DetectorFile,
    load_trainable_weights,
    read_detector_file,
    write_detector_file,
)
from cncad.config import CNCConfig
from cncad.data import check_model_batch, open_dataset, resize_mask
from cncad.data.sampling import dataset_size
from cncad.data.stream import DecodedImage, DecodeFailure, OnError, decode_stream
from cncad.distributed import is_main_process, local_device
from cncad.errors import ModelFileError, NotTrainedError, TrainingBusyError
from cncad.evaluation import AnomalyEvaluator
from cncad.files import check_output_dir, check_output_file
from cncad.model import CNCModel
from cncad.training import Trainer, TrainingState, autocast_for, model_input

__all__ = ["CNCDetector", "Prediction", "PredictionBatch"]

_CUSTOM_BACKBONE = "custom"


class Prediction(NamedTuple):
    """Predictions for a batch of images, with anomalib's field names.

    Attributes:
        pred_score: ``(B,)`` image anomaly scores (higher is more anomalous).
        anomaly_map: ``(B, H, W)`` float maps at the inputs' own resolution; a list of
            ``(H_i, W_i)`` maps when the inputs differ in size.
        pred_label: ``(B,)`` bool, ``pred_score >= detector.threshold``; None until a
            threshold is set.
        pred_mask: Like ``anomaly_map``, bool, ``anomaly_map >= detector.pixel_threshold``
            (which defaults to ``threshold``: with ``image_score="max"`` the two live on
            the same scale); None until a threshold is set.
        norm_score: ``(B,)`` image scores mapped to ``[0, 1]`` with 0.5 at the calibrated
            threshold ([`ScoreNormalization`][cncad.calibration.ScoreNormalization]); None
            until the detector is [calibrated][cncad.detector.CNCDetector.calibrate].
        norm_map: Like ``anomaly_map``, the maps mapped the same way with the pixel
            normalisation; None until calibrated.
    """

    pred_score: Tensor
    anomaly_map: Tensor | list[Tensor]
    pred_label: Tensor | None
    pred_mask: Tensor | list[Tensor] | None
    norm_score: Tensor | None = None
    norm_map: Tensor | list[Tensor] | None = None


class PredictionBatch(NamedTuple):
    """One batch of [`predict_iter`][cncad.detector.CNCDetector.predict_iter]'s stream.

    Attributes:
        indices: Position of each image in the input stream.
        paths: Each image's file path when the input was one, else None.
        pred_score: ``(b,)`` image anomaly scores.
        anomaly_map: ``b`` float maps ``(H_i, W_i)``, each at its input's own size.
        pred_label: ``(b,)`` bool, ``pred_score >= detector.threshold``, or None.
        pred_mask: ``b`` bool maps, ``anomaly_map >= detector.pixel_threshold`` (default:
            ``threshold``), or None.
        images: With ``keep_images=True``, each ``(3, H_i, W_i)`` image in ``[0, 1]``.
        failures: Inputs of this stretch of the stream that could not be read (with
            ``on_error="skip"``), in input order.
        norm_score: ``(b,)`` normalised image scores once calibrated, else None.
        norm_map: ``b`` normalised maps once calibrated, else None.
    """

    indices: list[int]
    paths: list[str | None]
    pred_score: Tensor
    anomaly_map: list[Tensor]
    pred_label: Tensor | None
    pred_mask: list[Tensor] | None
    images: list[Tensor] | None
    failures: list[DecodeFailure]
    norm_score: Tensor | None = None
    norm_map: list[Tensor] | None = None


class CNCDetector(Thresholds):
    """Train and run a CNC anomaly detector in a few lines.

    Examples:
        >>> detector = CNCDetector(backbone="tiny", image_size=112, epochs=2)  # doctest: +SKIP
        >>> detector.fit("path/to/mvtec_root", checkpoint_dir="runs/a")  # doctest: +SKIP
        >>> result = detector.predict("part.png")  # doctest: +SKIP
        >>> result.pred_score, result.anomaly_map.shape  # doctest: +SKIP
        >>> detector = CNCDetector.load("runs/a/last.ckpt")  # doctest: +SKIP
        >>> detector.fit("path/to/mvtec_root", checkpoint_dir="runs/a")  # doctest: +SKIP

    Args:
        config: Full configuration; defaults to the paper's settings.
        encoder: A custom frozen backbone object, used instead of ``config.backbone``
            (which becomes ``"custom"``): an open_clip CLIP model, a
            [`FrozenEncoder`][cncad.encoders.base.FrozenEncoder] such as
            [`TimmEncoder`][cncad.encoders.timm.TimmEncoder], or a timm model (wrapped with
            the config's ``image_size``, ``layers`` and ``num_taps``). Encoders without a
            text tower serve the visual-only model, so they need ``use_cnc=False``. Named
            models need no object: ``backbone="ViT-B-16"``, ``backbone="timm/<name>"``.
        tokenizer: The tokenizer of a CLIP ``encoder`` (default: the CLIP BPE tokenizer).
        clip_model: Deprecated spelling of ``encoder``; still accepted.
        allow_untrained: Let ``predict``, ``evaluate`` and ``save`` run before any ``fit``,
            with the random initial weights (for smoke tests and speed measurements);
            by default they raise [`NotTrainedError`][cncad.errors.NotTrainedError].
        **overrides: Fields of [`CNCConfig`][cncad.config.CNCConfig] to change, e.g. ``epochs=10``.

    Attributes:
        model: The [`CNCModel`][cncad.model.CNCModel].
        threshold: Image score from which [`predict`][cncad.detector.CNCDetector.predict] labels an
            image anomalous, or None.
        pixel_threshold: Map value from which a pixel is anomalous (default: ``threshold``).
        calibration: What [`calibrate`][cncad.detector.CNCDetector.calibrate] chose (the
            thresholds, the score normalisation, per-category ones), saved with the
            detector; None until calibrated.
        cache_stats: After a [`fit`][cncad.detector.CNCDetector.fit] with the feature cache:
            ``images``, ``bytes_per_image``, ``in_memory`` and ``build_seconds``; else None.
        normal_statistics: Quantiles of the anomaly-map values and image scores of the
            trained model on its own normal training images (``map_p50``, ``map_p99``,
            ``map_p999``, ``map_max``, ``score_p50``, ``score_max``, ``images``), measured
            at the end of a ``fit`` with the cache and saved with the detector; None
            before. ``cncad predict`` draws its default colour scale from them.

    Raises:
        ValueError: ``use_cnc=True`` with an encoder that has no text tower,
            ``backbone="custom"`` without the object, or both ``encoder`` and ``clip_model``.
        TypeError: ``config`` is not a [`CNCConfig`][cncad.config.CNCConfig], or a field
            has the wrong type.
    """

    def __init__(
        self,
        config: CNCConfig | None = None,
        *,
        encoder: nn.Module | None = None,
        tokenizer: Any = None,
        clip_model: nn.Module | None = None,
        allow_untrained: bool = False,
        **overrides: Any,
    ) -> None:
        if config is not None and not isinstance(config, CNCConfig):
            raise TypeError(f"config must be a CNCConfig or None, got {type(config).__name__}")
        if not isinstance(allow_untrained, bool):
            raise TypeError(f"allow_untrained must be True or False, got {allow_untrained!r}")
        config = config or CNCConfig()
        if overrides:
            config = config.replace(**overrides)
        encoder = _one_backbone(encoder, clip_model)
        if encoder is not None:
            config = config.replace(backbone=_CUSTOM_BACKBONE, pretrained=None)
        elif config.backbone == _CUSTOM_BACKBONE:
            raise ValueError("backbone='custom' needs the model object: pass encoder=...")
        self.config = config
        self.device = local_device(config.device)
        clip, frozen = _split_backbone(encoder)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.model = CNCModel(config, clip_model=clip, tokenizer=tokenizer, encoder=frozen)
        self.model.to(self.device).eval()
        self.threshold = None
        self.pixel_threshold = None
        self.calibration: Calibration | None = None
        self.allow_untrained = allow_untrained
        self._loaded = False
        self.cache_stats: dict[str, Any] | None = None
        self.normal_statistics: dict[str, float] | None = None
        self._trainer = Trainer(self.model, self.device)
        self._activity = _Activity()

    _CALIBRATE_HINT = "call calibrate(data, per_category=True) first"

    @property
    def is_trained(self) -> bool:
        """Whether the detector has trained weights: it has run ``fit`` or was loaded."""
        return self.epochs_trained > 0 or self._loaded

    def _require_trained(self, what: str) -> None:
        # Called inside ``_activity.reading``, which first reports a fit in another thread.
        if not self.is_trained and not self.allow_untrained:
            raise NotTrainedError(
                f"{what} needs a trained detector, and this one has not been trained: call "
                "fit(data) or CNCDetector.load(path) first (or build it with "
                "allow_untrained=True to run the untrained weights, e.g. for a smoke test)"
            )

    @property
    def epochs_trained(self) -> int:
        """Epochs run so far over all [`fit`][cncad.detector.CNCDetector.fit] calls (and runs)."""
        return self._trainer.state.epochs_trained

    @property
    def trainer(self) -> Trainer:
        """The training engine: its state, optimizer, process group and cached indices."""
        return self._trainer

    @property
    def history(self) -> list[dict[str, float]]:
        """One dict per epoch: ``epoch``, the mean loss terms, ``grad_norm`` and ``seconds``.

        ``seconds`` is the wall time of the epoch, without filling the feature cache.
        """
        return self._trainer.state.history

    # ------------------------------------------------------------------ training
    def fit(
        self,
        data: DataLoader | Dataset | str | os.PathLike,
        epochs: int | None = None,
        progress: bool = True,
        *,
        cache: bool = True,
        cache_dir: str | os.PathLike | None = None,
        cache_memory_gib: float = 4.0,
        cache_dtype: torch.dtype = torch.float16,
        checkpoint_dir: str | os.PathLike | None = None,
        checkpoint_every: int = 1,
    ) -> CNCDetector:
        """Train the prompts, fusion, MoE and decoder on normal images.

        With ``cache=True`` (default) the frozen encoder runs once per image and every
        epoch trains from the stored features ([`FeatureCache`][cncad.data.cache.FeatureCache]); the
        training noise is still drawn fresh at every step, so only the storage rounding
        differs from ``cache=False``. Turn the cache off when ``data`` applies random
        augmentation, which the cache would freeze.

        Both paths visit the images in the same global batches of ``config.batch_size``
        images for the same seed ([`epoch_batches`][cncad.data.sampling.epoch_batches]). A
        DataLoader you pass is used as it is without the cache; with the cache it is read
        once, in its own order, and the epochs then follow the same global batches.

        **Many processes.** Run the same script (or ``python -m cncad fit``) under
        ``torchrun`` to train one model with DistributedDataParallel; nothing else changes.
        ``batch_size`` is the global batch, split over the processes; each process caches
        only its shard of the images; only rank 0 writes checkpoints and shows progress.
        See the guide's "Many GPUs" section.

        **Checkpoints and resume.** With ``checkpoint_dir``, ``DIR/last.ckpt`` is replaced
        atomically after every ``checkpoint_every`` epochs and after the last one: the
        trainable weights, Adam's state, the epochs done, the history, the config and the
        thresholds (the random state needs no saving: see
        [`cncad.training`][cncad.training]). ``CNCDetector.load(DIR/last.ckpt).fit(data)``
        continues the run, and gives the same weights, bit for bit on the CPU, as a run
        that never stopped. A run stopped mid-epoch (an exception, Ctrl-C, SIGTERM) leaves
        the last checkpoint intact and no feature-cache files behind.

        Args:
            data: A DataLoader or Dataset of preprocessed images (items/batches as produced
                by [`AnomalyFolder`][cncad.data.folder.AnomalyFolder]: dicts with ``"image"`` and
                optionally ``"label"``; ``(image, label, ...)`` tuples; or image tensors;
                checked batch by batch by
                [`check_model_batch`][cncad.data.transforms.check_model_batch]), or a folder
                read by [`open_dataset`][cncad.data.folder.open_dataset], as ``cncad fit``
                reads it: an MVTec layout tree (one category root or a root of several
                categories, all trained together) or a plain folder of normal images. Only
                normal images (label 0) are used.
            epochs: Epochs to run now. Default: the rest of ``config.epochs``
                (``config.epochs - epochs_trained``), which finishes a resumed run. The epoch
                count (eq. 11's schedule, seeds, data order) carries on over calls.
            progress: Show tqdm progress bars with the loss terms.
            cache: Compute the frozen encoder's features once and train from them.
            cache_dir: Folder for the memory-mapped cache files when the cache does not
                fit in ``cache_memory_gib`` (default: the system's temporary folder).
                The files are deleted when ``fit`` returns or stops.
            cache_memory_gib: Largest cache kept in memory, in GiB.
            cache_dtype: Storage type of the cache, ``torch.float16`` or ``torch.float32``
                (computation is float32 either way).
            checkpoint_dir: Folder for ``last.ckpt`` (created if needed; checked before
                any work starts). None writes no checkpoint.
            checkpoint_every: Write the checkpoint after every this many epochs (counted
                over the whole run, so a resumed run keeps the cadence).

        Returns:
            ``self``.

        Raises:
            NonFiniteError: A loss or gradient became NaN or infinite; the weights are
                those after the last good step, and the last checkpoint is untouched.
            TrainingBusyError: The detector is in use by another thread.
        """
        cfg = self.config
        epochs = check_count(epochs, "epochs", 0) if epochs is not None else None
        checkpoint_every = check_count(checkpoint_every, "checkpoint_every", 1)
        if not isinstance(cache, bool):
            raise TypeError(f"cache must be True or False, got {cache!r}")
        memory = check_optional_finite(cache_memory_gib, "cache_memory_gib")
        if memory is None or memory < 0:
            raise ValueError(f"cache_memory_gib must be a number >= 0, got {cache_memory_gib!r}")
        if epochs is None:
            epochs = max(cfg.epochs - self.epochs_trained, 0)
            if epochs == 0 and self.epochs_trained > 0:
                warnings.warn(
                    f"the detector has already trained config.epochs={cfg.epochs} epochs; "
                    "pass epochs=N to train N more",
                    stacklevel=2,
                )
        checkpoint = None
        if checkpoint_dir is not None:
            folder = check_output_dir(checkpoint_dir, what="checkpoint_dir")
            checkpoint = folder / CHECKPOINT_NAME
        if isinstance(data, (str, os.PathLike)):
            data = open_dataset(data, "train", image_size=cfg.image_size)
        if not isinstance(data, (DataLoader, Dataset)):
            raise TypeError(
                f"fit expects a DataLoader, a Dataset or a folder path, got {type(data).__name__}"
            )

        def on_epoch_end(done: int) -> None:
            due = done % checkpoint_every == 0 or done == last
            if checkpoint is not None and due and self._trainer.group.is_main:
                self._write(checkpoint, kind="checkpoint")

        last = self.epochs_trained + epochs
        with self._activity.fitting():
            stats = self._trainer.fit(
                data,
                epochs,
                progress=progress,
                cache=cache,
                cache_dir=cache_dir,
                cache_memory_gib=cache_memory_gib,
                cache_dtype=cache_dtype,
                on_epoch_end=on_epoch_end,
            )
        if stats is not None:
            self.cache_stats = dataclasses.asdict(stats)
        if self._trainer.normal_statistics is not None:
            self.normal_statistics = self._trainer.normal_statistics
        return self

    # ------------------------------------------------------------------ inference
    def predict(
        self, images: Any, batch_size: int | None = None, *, category: str | None = None
    ) -> Prediction:
        """Score images and localise anomalies, all at once.

        The convenient call for a few images: it returns every map together, so its memory
        grows with the number of images (a 1024 x 1024 map is 4 MiB). For folders,
        archives or any long stream use [`predict_iter`][cncad.detector.CNCDetector.predict_iter],
        whose memory depends on the batch size only; ``predict`` is built on it and gives
        the same numbers.

        Args:
            images: A path, a PIL image, an ``HxWxC`` (or ``HxW``) uint8 array, a ``CxHxW``
                or ``BxCxHxW`` tensor (float in [0, 1] or uint8, 1 or 3 channels), a folder
                of images, or a list of these. Raw images, not normalised: resizing and
                CLIP normalisation happen here.
            batch_size: Images per forward pass (default ``config.batch_size``).
            category: Apply this category's thresholds and normalisation (a detector
                calibrated with ``per_category=True``); None: the detector's ``threshold``,
                ``pixel_threshold`` and global calibration.

        Returns:
            [`Prediction`][cncad.detector.Prediction] on the CPU. Maps are computed at the model
            resolution (``image_size``, where ``sigma`` applies) and resized bilinearly to each
            input's own size; the image score is taken before that resize.

        Raises:
            ValueError: No images, or ``category`` on a detector that is not calibrated.
            CalibrationError: (a ``ValueError``) ``category`` is not one of the calibrated
                categories (the message lists them).
            NotTrainedError: The detector has not been trained (see ``allow_untrained``).
            TrainingBusyError: ``fit`` is running on this detector in another thread.
        """
        batches = list(self.predict_iter(images, batch_size, progress=False, category=category))
        return join_batches(Prediction, batches, torch.cat, torch.stack)

    def predict_iter(
        self,
        images: Any,
        batch_size: int | None = None,
        *,
        num_workers: int = 0,
        progress: bool = True,
        keep_images: bool = False,
        on_error: OnError = "raise",
        category: str | None = None,
    ) -> Iterator[PredictionBatch]:
        """Score a stream of images batch by batch, with bounded memory.

        Images are read and preprocessed by ``num_workers`` threads while the model runs
        on the previous batch (on CUDA from pinned memory, copied without blocking). At
        most ``2 * batch_size`` images are decoded ahead, and nothing is kept between
        batches: peak memory depends on the batch size and the image size, not on the
        number of images. Results come in input order.

        Examples:
            >>> for batch in detector.predict_iter("shift_42/", num_workers=2):  # doctest: +SKIP
            ...     for path, score in zip(batch.paths, batch.pred_score):
            ...         print(path, float(score))

        Args:
            images: What [`predict`][cncad.detector.CNCDetector.predict] takes, including a
                folder (searched recursively) or any iterable, e.g. a generator of paths.
            batch_size: Images per forward pass (default ``config.batch_size``).
            num_workers: Decoding threads (0: decode on the calling thread).
            progress: Show a progress bar over images.
            keep_images: Also return each decoded ``(3, H, W)`` image in ``[0, 1]`` (to draw
                overlays without reading the file twice).
            on_error: ``"raise"`` (default): an input that cannot be read raises; ``"skip"``:
                it is reported in the batch's ``failures`` and the stream goes on.
            category: Apply this category's calibration, as in
                [`predict`][cncad.detector.CNCDetector.predict].

        Yields:
            [`PredictionBatch`][cncad.detector.PredictionBatch] on the CPU; the last may be
            smaller. A batch may hold only failures.

        Raises:
            NotTrainedError: The detector has not been trained (see ``allow_untrained``).
            TrainingBusyError: ``fit`` is running on this detector in another thread.
        """
        with self._activity.reading("predict"):
            self._require_trained("predict")
            batch_size = self.config.batch_size if batch_size is None else batch_size
            batch_size = check_count(batch_size, "batch_size", 1)
            num_workers = check_count(num_workers, "num_workers", 0)
            decision = self._decision(category)
            stream = decode_stream(
                images,
                self.config.image_size,
                workers=num_workers,
                window=2 * batch_size,
                keep_images=keep_images,
                on_error=on_error,
            )

            def score(
                decoded: list[DecodedImage], failures: list[DecodeFailure]
            ) -> PredictionBatch:
                return self._score(decoded, failures, decision)

            self.model.eval()
            yield from scored_stream(
                stream, batch_size, score, total=stream_length(images), progress=progress
            )

    @torch.no_grad()
    def _score(
        self, decoded: list[DecodedImage], failures: list[DecodeFailure], decision: Decision
    ) -> PredictionBatch:
        maps: list[Tensor] = []
        pred_score = torch.zeros(0)
        if decoded:
            batch = torch.stack([item.model_input for item in decoded])
            if self.device.type == "cuda" and batch.device.type == "cpu":
                batch = batch.pin_memory().to(self.device, non_blocking=True)
            else:
                batch = batch.to(self.device)
            with autocast_for(self.device, self.config.bf16):
                model_maps, scores = self.model.predict(batch)
            pred_score = scores.float().cpu()
            maps = [
                _resize_map(amap, item.size)
                for amap, item in zip(model_maps.float().cpu(), decoded, strict=True)
            ]
        return scored_batch(PredictionBatch, decoded, failures, pred_score, maps, decision)

    @torch.no_grad()
    def evaluate(
        self,
        data: DataLoader | Dataset | str | os.PathLike,
        eval_size: int = 256,
        progress: bool = True,
    ) -> dict[str, Any]:
        """Compute the seven metrics per category and their mean over categories.

        Args:
            data: An MVTec-layout test folder (one category or several, read by
                [`open_dataset`][cncad.data.folder.open_dataset]; defective images without
                a mask give their category image metrics only), or a Dataset / DataLoader
                whose items are dicts with ``"image"`` (preprocessed, see
                [`check_model_batch`][cncad.data.transforms.check_model_batch]),
                ``"label"``, ``"mask"`` and optionally ``"has_mask"`` and ``"category"``.
            eval_size: Side of the square grid on which maps and masks are compared
                (256 is the common protocol); memory does not grow with image size.
            progress: Show a progress bar over images.

        Returns:
            ``{"per_category": {name: {metric: value, "n_images": n}}, "mean": {...}}``
            (see [`AnomalyEvaluator`][cncad.evaluation.AnomalyEvaluator]). A detector with
            a ``threshold`` also gets ``"at_threshold"``:
            the false alarms, the defects found and their rates when images are labelled
            as [`predict`][cncad.detector.CNCDetector.predict] labels them (with the
            per-category thresholds where the detector has them)
            ([`decisions`][cncad.evaluation.AnomalyEvaluator.decisions]).

        Raises:
            NotTrainedError: The detector has not been trained (see ``allow_untrained``).
            TrainingBusyError: ``fit`` is running on this detector in another thread.
        """
        eval_size = check_count(eval_size, "eval_size", 1)
        evaluator = AnomalyEvaluator()
        with self._activity.reading("evaluate"):
            self._require_trained("evaluate")
            loader = self._test_loader(data, eval_size, "evaluate")
            batches = self._scored_batches(
                loader, eval_size, progress, "evaluate", ("image", "label", "mask")
            )
            for batch, scores, maps in batches:
                masks = batch["mask"]
                masks = masks.squeeze(1) if masks.ndim == 4 else masks
                masks = resize_mask(masks > 0, eval_size)
                categories = batch.get("category", ["all"] * len(scores))
                evaluator.update(
                    scores, batch["label"], maps, masks, categories, batch.get("has_mask")
                )
        results = evaluator.compute()
        if self.threshold is not None:
            own = self.calibration.per_category if self.calibration is not None else {}
            per_category = {name: child.threshold for name, child in own.items()}
            results["at_threshold"] = evaluator.decisions(self.threshold, per_category)
        return results

    def _test_loader(self, data: Any, eval_size: int, what: str) -> DataLoader:
        """``data`` of ``evaluate``/``calibrate`` as a DataLoader (a folder: its test split)."""
        cfg = self.config
        if isinstance(data, (str, os.PathLike)):
            data = open_dataset(data, "test", image_size=cfg.image_size, mask_size=eval_size)
        if isinstance(data, Dataset):
            data = DataLoader(data, batch_size=cfg.batch_size, num_workers=cfg.num_workers)
        if not isinstance(data, DataLoader):
            raise TypeError(f"{what} expects a DataLoader, Dataset or folder, got {type(data)}")
        return data

    @torch.no_grad()
    def _scored_batches(
        self,
        loader: DataLoader,
        eval_size: int,
        progress: bool,
        what: str,
        required: tuple[str, ...],
    ) -> Iterator[tuple[dict[str, Any], Tensor, Tensor]]:
        """Score test batches: ``(batch, scores (B,), maps (B, eval_size, eval_size))`` on the CPU.

        Shared by ``evaluate`` and ``calibrate``; the caller holds ``_activity.reading``.
        """
        cfg = self.config
        self.model.eval()
        bar = tqdm(desc=what, unit="img", disable=not progress, total=dataset_size(loader))
        for batch in loader:
            if not isinstance(batch, dict) or not set(required) <= set(batch):
                noun = "evaluation" if what == "evaluate" else what
                keys = ", ".join(required[:-1]) + " and " + required[-1]
                raise ValueError(f"{noun} batches must be dicts with {keys}")
            check_model_batch(batch["image"], f"a batch given to {what}")
            images = model_input(batch["image"], cfg.image_size, self.device)
            with autocast_for(self.device, cfg.bf16):
                maps, scores = self.model.predict(images)
            maps = F.interpolate(
                maps.float().unsqueeze(1), size=(eval_size, eval_size), mode="bilinear"
            ).squeeze(1)
            yield batch, scores.float().cpu(), maps.cpu()
            bar.update(len(images))
        bar.close()

    def calibrate(
        self,
        data: DataLoader | Dataset | str | os.PathLike,
        target_fpr: float = 0.01,
        *,
        per_category: bool = False,
        eval_size: int = 256,
        progress: bool = True,
    ) -> Calibration:
        """Choose the thresholds and the score normalisation from calibration data.

        With normal images only, the image threshold is the smallest observed score at
        which at most ``target_fpr`` of the normal images score ``>=`` it, and the pixel
        threshold likewise over the pixels of their maps. With labelled anomalies, the
        thresholds maximise the F1 score of ``score >= threshold`` over the images
        (labels) and over the pixels (masks); without any mask pixel on the anomalous
        images, the pixel threshold falls back to ``target_fpr`` on the normal images'
        pixels, and anomalous images without a mask never count at pixel level. The
        image threshold is then moved half way down to the next lower calibration score
        (no calibration image changes side). The exact definitions are in
        [`cncad.calibration`][cncad.calibration].

        Maps are compared on an ``eval_size`` grid, as in
        [`evaluate`][cncad.detector.CNCDetector.evaluate]; the pixels are counted in a
        fixed fine histogram, so memory does not grow with the number of images.

        Sets ``calibration``, ``threshold`` and ``pixel_threshold`` (the global ones, also
        with ``per_category=True``); [`save`][cncad.detector.CNCDetector.save] keeps them.
        From then on predictions carry ``norm_score`` and ``norm_map``.

        Args:
            data: As for ``evaluate``: an MVTec-layout folder (its test split), or a
                Dataset / DataLoader of dicts with ``"image"`` (preprocessed), ``"label"``,
                and optionally ``"mask"`` and ``"category"``. Use data the model was not
                trained on.
            target_fpr: Allowed false-alarm rate on normal images, in ``(0, 1)``.
            per_category: Also calibrate each category (the data's ``"category"`` field)
                on its own images, for ``predict(..., category=name)``.
            eval_size: Side of the grid on which maps and masks are compared.
            progress: Show a progress bar over images.

        Returns:
            The [`Calibration`][cncad.calibration.Calibration]: thresholds, normalisation,
            method and image counts (per category in ``per_category``).

        Raises:
            TypeError: ``target_fpr`` is not a number.
            ValueError: ``target_fpr`` is not in ``(0, 1)``, or a label is not 0 or 1.
            CalibrationError: (a ``ValueError``) No images, only anomalous images, or,
                without anomalies, fewer normal images than ``ceil(1 / target_fpr)`` (in
                any category with ``per_category=True``); one line says how many are
                needed.
            NotTrainedError: The detector has not been trained (see ``allow_untrained``).
            TrainingBusyError: ``fit`` is running on this detector in another thread.
        """
        target_fpr = check_target_fpr(target_fpr)
        if not isinstance(per_category, bool):
            raise TypeError(f"per_category must be True or False, got {per_category!r}")
        eval_size = check_count(eval_size, "eval_size", 1)
        scores: dict[str, list[Tensor]] = {}
        labels: dict[str, list[Tensor]] = {}
        pixels: dict[str, PixelHistogram] = {}
        with self._activity.reading("calibrate"):
            self._require_trained("calibrate")
            loader = self._test_loader(data, eval_size, "calibrate")
            batches = self._scored_batches(
                loader, eval_size, progress, "calibrate", ("image", "label")
            )
            for batch, batch_scores, maps in batches:
                batch_labels = torch.as_tensor(batch["label"]).reshape(-1).cpu()
                if batch_labels.numel() != len(batch_scores):
                    raise ValueError(
                        f"a calibration batch has {len(batch_scores)} images but "
                        f"{batch_labels.numel()} labels"
                    )
                masks = batch.get("mask")
                if masks is not None:
                    masks = masks.squeeze(1) if masks.ndim == 4 else masks
                    masks = resize_mask(masks > 0, eval_size).cpu().numpy()
                categories = batch.get("category", ["all"] * len(batch_scores))
                for index, (name, label) in enumerate(zip(categories, batch_labels, strict=True)):
                    scores.setdefault(name, []).append(batch_scores[index : index + 1])
                    labels.setdefault(name, []).append(batch_labels[index : index + 1])
                    values = maps[index].numpy()
                    histogram = pixels.setdefault(name, PixelHistogram())
                    if int(label) == 0:
                        histogram.add(values, 0)
                    elif masks is not None and masks[index].any():
                        histogram.add(values[~masks[index]], 1)
                        histogram.add(values[masks[index]], 2)
                    else:
                        histogram.add(values, 3)

        def arrays(names: list[str]) -> tuple[Any, Any, PixelHistogram]:
            merged = PixelHistogram()
            for name in names:
                merged.merge(pixels[name])
            return (
                torch.cat([s for name in names for s in scores[name]]).numpy(),
                torch.cat([lab for name in names for lab in labels[name]]).numpy(),
                merged,
            )

        names = sorted(scores)
        if not names:
            raise CalibrationError("the calibration data holds no images")
        calibration = calibrate_arrays(
            *arrays(names), target_fpr, eval_size=eval_size, what="the calibration data"
        )
        if per_category:
            children = {
                name: calibrate_arrays(
                    *arrays([name]), target_fpr, eval_size=eval_size, what=f"category {name!r}"
                )
                for name in names
            }
            calibration = dataclasses.replace(calibration, per_category=children)
        self.calibration = calibration
        self.threshold = calibration.threshold
        self.pixel_threshold = calibration.pixel_threshold
        return calibration

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> Path:
        """Save the configuration and the trained weights (not the frozen encoder weights).

        The file ([format][cncad.checkpoint]) holds only tensors and plain Python values,
        so it loads with ``torch.load(..., weights_only=True)``, and a checksum that
        [`load`][cncad.detector.CNCDetector.load] verifies. It is written atomically: a
        failing save leaves an existing file as it was. A checkpoint written by ``fit``
        holds the optimizer state as well; this file does not (load a checkpoint to
        continue a run exactly).

        Args:
            path: Destination file (conventionally ``*.cnc``).

        Under ``torchrun`` only rank 0 writes (call ``save`` on every process or on rank 0
        alone); the other processes return at once.

        Returns:
            The path written.

        Raises:
            ValueError: ``path`` is a folder.
            NonFiniteError: A weight is NaN or infinite (nothing is written).
            NotTrainedError: The detector has not been trained (see ``allow_untrained``).
            TrainingBusyError: ``fit`` is running on this detector in another thread.
        """
        with self._activity.reading("save"):
            self._require_trained("save")
            # Under torchrun only rank 0 writes. No barrier: the common pattern of calling
            # save on rank 0 alone would then wait forever.
            target = check_output_file(path, what="save path")
            if is_main_process():
                self._write(target, kind="detector")
            return Path(path)

    def export(self, path: str | os.PathLike, format: str = "onnx", **options: Any) -> Path:
        """Export the whole inference path as one ONNX graph, to run without torch.

        See [`cncad.export`][cncad.export] for the graph and its metadata, and
        [`ONNXDetector`][cncad.deploy.ONNXDetector] to run it (``pip install cncad[deploy]``).

        Args:
            path: The ``.onnx`` file to write (atomically; checked before any work).
            format: ``"onnx"`` (OpenVINO's runtime reads the same file).
            **options: Passed to [`export_onnx`][cncad.export.export_onnx] (``opset``,
                ``check``).

        Returns:
            The path written.

        Raises:
            ValueError: An unknown ``format``, or a ``path`` that cannot be written.
            NotTrainedError: The detector has not been trained (see ``allow_untrained``).
            TrainingBusyError: ``fit`` is running on this detector in another thread.
        """
        from cncad.export import export

        with self._activity.reading("export"):  # export_onnx checks that it is trained
            return export(self, path, format, **options)

    def _write(self, path: Path, kind: str) -> Path:
        optimizer_state = self._trainer.optimizer_state_dict() if kind == "checkpoint" else None
        contents = DetectorFile(
            config=self.config,
            state_dict=self.model.trainable_state_dict(),
            threshold=self.threshold,
            pixel_threshold=self.pixel_threshold,
            epochs_trained=self.epochs_trained,
            history=self.history,
            kind=kind,
            optimizer_state=optimizer_state,
            normal_statistics=self.normal_statistics,
            calibration=None if self.calibration is None else self.calibration.to_dict(),
        )
        return write_detector_file(path, contents)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        *,
        encoder: nn.Module | None = None,
        tokenizer: Any = None,
        clip_model: nn.Module | None = None,
        **overrides: Any,
    ) -> CNCDetector:
        """Load a detector file ([`save`][cncad.detector.CNCDetector.save]) or a checkpoint.

        The frozen backbone is rebuilt from the saved configuration (or taken from
        ``encoder`` for detectors trained on a custom model object). A checkpoint also
        restores the optimizer state, so that [`fit`][cncad.detector.CNCDetector.fit]
        continues the run exactly.

        Args:
            path: A file written by [`save`][cncad.detector.CNCDetector.save] or by ``fit``
                with ``checkpoint_dir``.
            encoder: The backbone object, required when the detector was built with one.
            tokenizer: Its tokenizer.
            clip_model: Deprecated spelling of ``encoder``.
            **overrides: Config fields to change on load that do not affect the weights,
                such as ``device`` or ``sigma``.

        Returns:
            The detector, in eval mode, predicting exactly as the saved one.

        Raises:
            FileNotFoundError: If ``path`` does not exist.
            ModelFileError: (a ``ValueError``) If the file is not a detector file, is
                damaged (its checksum does not match), or its weights do not fit its
                configuration; one line says which.
            ModelVersionError: (a ``ModelFileError``) If it was written in a file format
                or with a configuration that this version of cncad cannot read.
        """
        contents = read_detector_file(path)
        config = contents.config.replace(**overrides) if overrides else contents.config
        encoder = _one_backbone(encoder, clip_model)
        if config.backbone == _CUSTOM_BACKBONE and encoder is None:
            raise ValueError(f"{path} was trained on a custom backbone: pass encoder=...")
        detector = cls(config, encoder=encoder, tokenizer=tokenizer)
        load_trainable_weights(detector.model, contents.state_dict, path)
        detector.model.to(detector.device).eval()
        detector._loaded = True
        detector.threshold = contents.threshold
        detector.pixel_threshold = contents.pixel_threshold
        detector.normal_statistics = contents.normal_statistics
        if contents.calibration is not None:
            detector.calibration = Calibration.from_dict(contents.calibration)
        state = TrainingState(contents.epochs_trained, contents.history, contents.optimizer_state)
        try:
            detector._trainer = Trainer(detector.model, detector.device, state)
        except ValueError as error:
            raise ModelFileError(f"{path} is damaged: {error}") from error
        return detector

    def __repr__(self) -> str:
        return (
            f"CNCDetector(backbone={self.config.backbone!r}, layers={self.model.layers}, "
            f"device={self.device}, epochs_trained={self.epochs_trained}, "
            f"threshold={self.threshold})"
        )


class _Activity:
    """Keeps ``fit`` apart from ``predict``/``evaluate``/``save`` running in other threads.

    Any number of readers may run together; ``fit`` runs alone. Conflicts are errors, not
    waits: a caller who starts ``predict`` during a long ``fit`` should hear so at once.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._fitting = False
        self._readers = 0

    def __getstate__(self) -> dict[str, Any]:
        return {}  # a copy (copy.deepcopy, pickle) of a detector starts idle

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()

    @contextlib.contextmanager
    def fitting(self) -> Iterator[None]:
        with self._lock:
            if self._fitting:
                raise TrainingBusyError("fit is already running on this detector")
            if self._readers:
                raise TrainingBusyError(
                    "this detector is predicting, evaluating or saving in another thread; "
                    "call fit after that returns"
                )
            self._fitting = True
        try:
            yield
        finally:
            with self._lock:
                self._fitting = False

    @contextlib.contextmanager
    def reading(self, what: str) -> Iterator[None]:
        with self._lock:
            if self._fitting:
                raise TrainingBusyError(
                    f"{what} was called while fit is running on this detector in another "
                    f"thread; call it after fit returns, or {what} with a second detector "
                    "loaded from a checkpoint"
                )
            self._readers += 1
        try:
            yield
        finally:
            with self._lock:
                self._readers -= 1


def _one_backbone(encoder: nn.Module | None, clip_model: nn.Module | None) -> nn.Module | None:
    if clip_model is None:
        return encoder
    if encoder is not None:
        raise ValueError("pass the backbone once, as encoder=... (clip_model= is its old name)")
    warnings.warn(
        "clip_model= is deprecated; pass the same object as encoder=", DeprecationWarning, 3
    )
    return clip_model


def _split_backbone(encoder: nn.Module | None) -> tuple[nn.Module | None, nn.Module | None]:
    """``(clip_model, encoder)`` for CNCModel: open_clip models go to the first slot."""
    from cncad.encoders import FrozenEncoder

    is_clip = hasattr(encoder, "visual") and not isinstance(encoder, FrozenEncoder)
    return (encoder, None) if is_clip else (None, encoder)


def _resize_map(amap: Tensor, size: Sequence[int]) -> Tensor:
    if tuple(amap.shape[-2:]) == tuple(size):
        return amap
    return F.interpolate(amap[None, None], size=tuple(size), mode="bilinear").squeeze(0).squeeze(0)
