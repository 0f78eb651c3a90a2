"""CNCDetector: the notebook-facing facade (fit, predict, evaluate, save, load)."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from cncad import __version__
from cncad.config import CNCConfig
from cncad.data import AnomalyFolder, preprocess, resize_mask, to_image_tensor
from cncad.data.cache import FeatureCache, epoch_permutation
from cncad.errors import DatasetError, ModelFileError, ModelVersionError
from cncad.evaluation import AnomalyEvaluator
from cncad.model import CNCModel

__all__ = ["CNCDetector", "Prediction"]

_FILE_FORMAT = "cncad-detector"
_FILE_FORMAT_VERSION = 1
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
    """

    pred_score: Tensor
    anomaly_map: Tensor | list[Tensor]
    pred_label: Tensor | None
    pred_mask: Tensor | list[Tensor] | None


class CNCDetector:
    """Train and run a CNC anomaly detector in a few lines.

    Example:
        >>> detector = CNCDetector(backbone="tiny", image_size=112, epochs=2)  # doctest: +SKIP
        >>> detector.fit("path/to/mvtec_root")  # doctest: +SKIP
        >>> result = detector.predict("part.png")  # doctest: +SKIP
        >>> result.pred_score, result.anomaly_map.shape  # doctest: +SKIP

    Args:
        config: Full configuration; defaults to the paper's settings.
        clip_model: An open_clip model object to use as the frozen backbone (the config's
            ``backbone`` becomes ``"custom"``). A
            [`FrozenEncoder`][cncad.encoders.base.FrozenEncoder] or a timm model given here is taken
            as ``encoder`` (so that ``CNCDetector.load(path, clip_model=...)`` also restores custom
            encoders).
        tokenizer: The tokenizer of ``clip_model`` (default: the CLIP BPE tokenizer).
        encoder: A frozen encoder object without a text tower, e.g.
            ``TimmEncoder(timm_model, image_size=...)`` or a timm model (wrapped with the
            config's ``image_size``, ``layers`` and ``num_taps``); the backbone becomes
            ``"custom"``. Named timm models need no object: ``backbone="timm/<name>"``.
            Such encoders serve the visual-only model, so they need ``use_cnc=False``.
        **overrides: Fields of [`CNCConfig`][cncad.config.CNCConfig] to change, e.g. ``epochs=10``.

    Attributes:
        model: The [`CNCModel`][cncad.model.CNCModel].
        threshold: Image score from which [`predict`][cncad.detector.CNCDetector.predict] labels an
            image anomalous, or None.
        pixel_threshold: Map value from which a pixel is anomalous (default: ``threshold``).
        epochs_trained: Epochs run so far over all [`fit`][cncad.detector.CNCDetector.fit] calls.
        history: One dict per epoch: ``epoch``, the mean loss terms, and ``seconds`` (wall
            time of the epoch, without filling the feature cache).
        cache_stats: After a [`fit`][cncad.detector.CNCDetector.fit] with the feature cache:
            ``images``, ``bytes_per_image``, ``in_memory`` and ``build_seconds``; else None.

    Raises:
        ValueError: ``use_cnc=True`` with an encoder that has no text tower, or
            ``backbone="custom"`` without the object.
    """

    def __init__(
        self,
        config: CNCConfig | None = None,
        *,
        clip_model: nn.Module | None = None,
        tokenizer: Any = None,
        encoder: nn.Module | None = None,
        **overrides: Any,
    ) -> None:
        config = config or CNCConfig()
        if overrides:
            config = config.replace(**overrides)
        from cncad.encoders import FrozenEncoder

        is_clip = hasattr(clip_model, "visual") and not isinstance(clip_model, FrozenEncoder)
        if clip_model is not None and encoder is None and not is_clip:
            clip_model, encoder = None, clip_model  # an encoder or timm model, not CLIP
        if clip_model is not None or encoder is not None:
            config = config.replace(backbone=_CUSTOM_BACKBONE, pretrained=None)
        elif config.backbone == _CUSTOM_BACKBONE:
            raise ValueError(
                "backbone='custom' needs the model object: pass clip_model=... or encoder=..."
            )
        self.config = config
        self.device = _resolve_device(config.device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.model = CNCModel(
                config, clip_model=clip_model, tokenizer=tokenizer, encoder=encoder
            )
        self.model.to(self.device).eval()
        self.threshold: float | None = None
        self.pixel_threshold: float | None = None
        self.epochs_trained = 0
        self.history: list[dict[str, float]] = []
        self.cache_stats: dict[str, Any] | None = None
        self._optimizer: torch.optim.Optimizer | None = None

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
    ) -> CNCDetector:
        """Train the prompts, fusion, MoE and decoder on normal images.

        With ``cache=True`` (default) the frozen encoder runs once per image and every
        epoch trains from the stored features ([`FeatureCache`][cncad.data.cache.FeatureCache]); the
        training noise is still drawn fresh at every step, so only the storage rounding
        differs from ``cache=False``. Turn the cache off when ``data`` applies random
        augmentation, which the cache would freeze.

        Both paths visit the images in the same order for the same seed: a Dataset or
        folder is shuffled by [`epoch_permutation`][cncad.data.cache.epoch_permutation] in batches
        of ``config.batch_size``. A DataLoader you pass is used as it is without the cache;
        with the cache it is read once, in its own order, and the epochs then follow
        [`epoch_permutation`][cncad.data.cache.epoch_permutation] in batches of
        ``config.batch_size``.

        Args:
            data: A DataLoader or Dataset of preprocessed images (items/batches as produced
                by [`AnomalyFolder`][cncad.data.folder.AnomalyFolder]: dicts with ``"image"`` and
                optionally ``"label"``; ``(image, label, ...)`` tuples; or image tensors), or an
                MVTec layout folder: one category root or a root of several categories, all
                trained together. Only normal images (label 0) are used.
            epochs: Epochs to run now (default ``config.epochs``). A second call continues
                training; the epoch count used by eq. 11 carries on.
            progress: Show tqdm progress bars with the loss terms.
            cache: Compute the frozen encoder's features once and train from them.
            cache_dir: Folder for the memory-mapped cache files when the cache does not
                fit in ``cache_memory_gib`` (default: the system's temporary folder).
                The files are deleted when ``fit`` returns.
            cache_memory_gib: Largest cache kept in memory, in GiB.
            cache_dtype: Storage type of the cache, ``torch.float16`` or ``torch.float32``
                (computation is float32 either way).

        Returns:
            ``self``.
        """
        cfg = self.config
        epochs = cfg.epochs if epochs is None else epochs
        if epochs < 0:
            raise ValueError(f"epochs must be >= 0, got {epochs}")
        source = self._train_source(data)
        if self._optimizer is None:
            self._optimizer = torch.optim.Adam(
                self.model.trainable_parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay
            )
        feature_cache = None
        if cache and epochs > 0:
            start = time.perf_counter()
            feature_cache = self._build_cache(
                source, cache_dir, cache_memory_gib, cache_dtype, progress
            )
            self.cache_stats = {
                "images": len(feature_cache),
                "bytes_per_image": feature_cache.bytes_per_image,
                "in_memory": feature_cache.in_memory,
                "build_seconds": time.perf_counter() - start,
            }
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(cfg.seed + self.epochs_trained)
                self.model.train()
                epoch_bar = tqdm(
                    range(self.epochs_trained, self.epochs_trained + epochs),
                    desc="fit",
                    unit="epoch",
                    disable=not progress,
                )
                for epoch in epoch_bar:
                    if feature_cache is not None:
                        order = epoch_permutation(len(feature_cache), cfg.seed, epoch)
                        batches: Iterable = feature_cache.batches(
                            cfg.batch_size, order, self.device
                        )
                        total = math.ceil(len(feature_cache) / cfg.batch_size)
                    else:
                        batches = self._encoded_batches(source, epoch)
                        total = _num_batches(source, cfg.batch_size)
                    start = time.perf_counter()
                    means = self._train_epoch(batches, epoch, progress, total)
                    seconds = time.perf_counter() - start
                    self.history.append({"epoch": float(epoch), **means, "seconds": seconds})
                    self.epochs_trained = epoch + 1
                    epoch_bar.set_postfix({k: f"{v:.4f}" for k, v in means.items()})
        finally:
            self.model.eval()
            if feature_cache is not None:
                feature_cache.close()
        return self

    def _train_epoch(
        self, batches: Iterable, epoch: int, progress: bool, total: int | None
    ) -> dict[str, float]:
        totals: dict[str, float] = {}
        steps = 0
        bar = tqdm(batches, desc=f"epoch {epoch}", leave=False, disable=not progress, total=total)
        for features in bar:
            with self._autocast():
                terms = self.model.loss(self.model.forward_features(features), epoch)
            self._optimizer.zero_grad(set_to_none=True)
            terms.total.backward()
            self._optimizer.step()
            values = terms.as_floats()
            if not math.isfinite(values["total"]):
                raise FloatingPointError(f"training diverged at epoch {epoch}: {values}")
            for key, value in values.items():
                totals[key] = totals.get(key, 0.0) + value
            steps += 1
            bar.set_postfix(loss=f"{values['total']:.4f}")
        if steps == 0:
            raise ValueError("the training data holds no normal images (label 0)")
        return {key: value / steps for key, value in totals.items()}

    def _train_source(self, data: Any) -> DataLoader | Dataset:
        if isinstance(data, (str, os.PathLike)):
            data = AnomalyFolder(data, split="train", image_size=self.config.image_size)
        if isinstance(data, (DataLoader, Dataset)):
            return data
        raise TypeError(
            f"fit expects a DataLoader, a Dataset or a folder path, got {type(data).__name__}"
        )

    def _image_batches(self, source: DataLoader | Dataset, epoch: int | None) -> Iterator[Tensor]:
        """Normal images on the device, in the epoch's order (stored order if None)."""
        loader = source
        if isinstance(source, Dataset):
            order = None
            if epoch is not None:
                order = epoch_permutation(len(source), self.config.seed, epoch).tolist()
            loader = DataLoader(
                source,
                batch_size=self.config.batch_size,
                sampler=order,
                num_workers=self.config.num_workers,
                # Its own generator: drawing worker seeds from the global one would shift
                # the training-noise stream between the cached and uncached paths.
                generator=torch.Generator().manual_seed(self.config.seed),
            )
        for batch in loader:
            images = self._normal_images(batch)
            if images is not None:
                yield images

    def _encode(self, images: Tensor) -> Any:
        """The frozen encoder's features, under the same autocast as training."""
        with self._autocast():
            return self.model.encode(images)

    def _encoded_batches(self, source: DataLoader | Dataset, epoch: int) -> Iterator[Any]:
        for images in self._image_batches(source, epoch):
            yield self._encode(images)  # outside autocast: the consumer sets its own

    def _build_cache(
        self,
        source: DataLoader | Dataset,
        directory: str | os.PathLike | None,
        memory_gib: float,
        dtype: torch.dtype,
        progress: bool,
    ) -> FeatureCache:
        max_images = _num_items(source) if isinstance(source, DataLoader) else len(source)
        try:
            return FeatureCache.build(
                self._encode,
                self._image_batches(source, epoch=None),
                max_images,
                dtype=dtype,
                memory_limit_gib=memory_gib,
                directory=directory,
                progress=progress,
            )
        except DatasetError:
            raise DatasetError("the training data holds no normal images (label 0)") from None

    def _normal_images(self, batch: Any) -> Tensor | None:
        labels = None
        if isinstance(batch, dict):
            if "image" not in batch:
                raise KeyError("batches given as dicts need an 'image' entry")
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
        return self._to_model_size(images.to(self.device, torch.float32))

    def _to_model_size(self, images: Tensor) -> Tensor:
        size = self.config.image_size
        if images.shape[-2:] != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True)
        return images

    def _autocast(self) -> torch.autocast:
        enabled = self.config.bf16 and self.device.type == "cuda"
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=enabled)

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def predict(self, images: Any, batch_size: int | None = None) -> Prediction:
        """Score images and localise anomalies.

        Args:
            images: A path, a PIL image, an ``HxWxC`` (or ``HxW``) uint8 array, a ``CxHxW``
                or ``BxCxHxW`` tensor (float in [0, 1] or uint8, 1 or 3 channels), or a
                list of these. Raw images, not normalised: resizing and CLIP normalisation
                happen here.
            batch_size: Images per forward pass (default ``config.batch_size``).

        Returns:
            [`Prediction`][cncad.detector.Prediction] on the CPU. Maps are computed at the model
            resolution (``image_size``, where ``sigma`` applies) and resized bilinearly to each
            input's own size; the image score is taken before that resize.
        """
        self.model.eval()
        pictures = to_image_tensor(images)
        batch_size = batch_size or self.config.batch_size
        scores, maps = [], []
        for start in range(0, len(pictures), batch_size):
            chunk = pictures[start : start + batch_size]
            batch = preprocess(chunk, self.config.image_size).to(self.device)
            with self._autocast():
                chunk_maps, chunk_scores = self.model.predict(batch)
            scores.append(chunk_scores.float().cpu())
            for picture, amap in zip(chunk, chunk_maps.float().cpu(), strict=True):
                maps.append(_resize_map(amap, tuple(picture.shape[-2:])))
        pred_score = torch.cat(scores)
        same_size = len({m.shape for m in maps}) == 1
        anomaly_map: Tensor | list[Tensor] = torch.stack(maps) if same_size else maps
        pred_label = pred_score >= self.threshold if self.threshold is not None else None
        pred_mask = None
        pixel_threshold = (
            self.pixel_threshold if self.pixel_threshold is not None else self.threshold
        )
        if pixel_threshold is not None:
            pred_mask = (
                anomaly_map >= pixel_threshold
                if same_size
                else [m >= pixel_threshold for m in maps]
            )
        return Prediction(pred_score, anomaly_map, pred_label, pred_mask)

    @torch.no_grad()
    def evaluate(
        self,
        data: DataLoader | Dataset | str | os.PathLike,
        eval_size: int = 256,
        progress: bool = True,
    ) -> dict[str, Any]:
        """Compute the seven metrics per category and their mean over categories.

        Args:
            data: An MVTec-layout test folder (one category or several), or a Dataset /
                DataLoader whose items are dicts with ``"image"`` (preprocessed),
                ``"label"``, ``"mask"`` and optionally ``"category"``.
            eval_size: Side of the square grid on which maps and masks are compared
                (256 is the common protocol); memory does not grow with image size.
            progress: Show a progress bar over images.

        Returns:
            ``{"per_category": {name: {metric: value, "n_images": n}}, "mean": {...}}``
            (see [`AnomalyEvaluator`][cncad.evaluation.AnomalyEvaluator]).
        """
        cfg = self.config
        if isinstance(data, (str, os.PathLike)):
            data = AnomalyFolder(data, split="test", image_size=cfg.image_size, mask_size=eval_size)
        if isinstance(data, Dataset):
            data = DataLoader(data, batch_size=cfg.batch_size, num_workers=cfg.num_workers)
        if not isinstance(data, DataLoader):
            raise TypeError(f"evaluate expects a DataLoader, Dataset or folder, got {type(data)}")
        self.model.eval()
        evaluator = AnomalyEvaluator()
        bar = tqdm(desc="evaluate", unit="img", disable=not progress, total=_num_items(data))
        for batch in data:
            if not isinstance(batch, dict) or not {"image", "label", "mask"} <= set(batch):
                raise ValueError("evaluation batches must be dicts with image, label and mask")
            images = self._to_model_size(batch["image"].to(self.device, torch.float32))
            with self._autocast():
                maps, scores = self.model.predict(images)
            maps = F.interpolate(
                maps.float().unsqueeze(1), size=(eval_size, eval_size), mode="bilinear"
            ).squeeze(1)
            masks = batch["mask"]
            masks = masks.squeeze(1) if masks.ndim == 4 else masks
            masks = resize_mask(masks > 0, eval_size)
            categories = batch.get("category", ["all"] * len(images))
            evaluator.update(scores.float().cpu(), batch["label"], maps.cpu(), masks, categories)
            bar.update(len(images))
        bar.close()
        return evaluator.compute()

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> Path:
        """Save the configuration and the trained weights (not the frozen CLIP weights).

        The file holds only tensors and plain Python values, so it loads with
        ``torch.load(..., weights_only=True)``.

        Args:
            path: Destination file (conventionally ``*.cnc``).

        Returns:
            The path written.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "format": _FILE_FORMAT,
            "format_version": _FILE_FORMAT_VERSION,
            "cncad_version": __version__,
            "config": self.config.to_dict(),
            "state_dict": {
                k: v.detach().cpu() for k, v in self.model.trainable_state_dict().items()
            },
            "threshold": self.threshold,
            "pixel_threshold": self.pixel_threshold,
            "epochs_trained": self.epochs_trained,
            "history": self.history,
        }
        torch.save(payload, path)
        return path

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        *,
        clip_model: nn.Module | None = None,
        tokenizer: Any = None,
        **overrides: Any,
    ) -> CNCDetector:
        """Load a detector written by [`save`][cncad.detector.CNCDetector.save].

        The frozen backbone is rebuilt from the saved configuration (or taken from
        ``clip_model`` for detectors trained on a custom model object).

        Args:
            path: A file written by [`save`][cncad.detector.CNCDetector.save].
            clip_model: The backbone object, required when the detector was built with one.
            tokenizer: Its tokenizer.
            **overrides: Config fields to change on load that do not affect the weights,
                such as ``device`` or ``sigma``.

        Returns:
            The detector, in eval mode, predicting exactly as the saved one.

        Raises:
            FileNotFoundError: If ``path`` does not exist.
            ModelFileError: (a ``ValueError``) If the file is not a detector file.
            ModelVersionError: (a ``ModelFileError``) If it was written in a file format
                or with a configuration that this version of cncad cannot read.
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
        except Exception as error:  # torch.load fails in many ways on foreign files
            raise ModelFileError(
                f"{path} is not a cncad detector file (torch.load cannot read it as a "
                f"file of plain tensors: {type(error).__name__})"
            ) from error
        if not isinstance(payload, dict) or payload.get("format") != _FILE_FORMAT:
            raise ModelFileError(f"{path} is not a cncad detector file")
        if payload.get("format_version") != _FILE_FORMAT_VERSION:
            raise ModelVersionError(
                f"{path} has file format version {payload.get('format_version')} "
                f"(written by cncad {payload.get('cncad_version')}); this cncad "
                f"({__version__}) reads version {_FILE_FORMAT_VERSION}"
            )
        try:
            config = CNCConfig.from_dict(payload["config"])
        except (KeyError, TypeError, ValueError) as error:
            raise ModelVersionError(
                f"{path} holds a configuration this cncad ({__version__}) cannot read "
                f"(written by cncad {payload.get('cncad_version')}): {error}"
            ) from error
        if overrides:
            config = config.replace(**overrides)
        if config.backbone == _CUSTOM_BACKBONE and clip_model is None:
            raise ValueError(f"{path} was trained on a custom backbone: pass clip_model=...")
        detector = cls(config, clip_model=clip_model, tokenizer=tokenizer)
        detector.model.load_trainable_state_dict(payload["state_dict"])
        detector.model.to(detector.device).eval()
        detector.threshold = payload["threshold"]
        detector.pixel_threshold = payload["pixel_threshold"]
        detector.epochs_trained = payload["epochs_trained"]
        detector.history = list(payload["history"])
        return detector

    def __repr__(self) -> str:
        return (
            f"CNCDetector(backbone={self.config.backbone!r}, layers={self.model.layers}, "
            f"device={self.device}, epochs_trained={self.epochs_trained}, "
            f"threshold={self.threshold})"
        )


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but CUDA is not available")
    return device


def _resize_map(amap: Tensor, size: Sequence[int]) -> Tensor:
    if tuple(amap.shape[-2:]) == tuple(size):
        return amap
    return F.interpolate(amap[None, None], size=tuple(size), mode="bilinear").squeeze(0).squeeze(0)


def _num_batches(source: DataLoader | Dataset, batch_size: int) -> int | None:
    try:
        if isinstance(source, DataLoader):
            return len(source)
        return math.ceil(len(source) / batch_size)  # type: ignore[arg-type]
    except TypeError:  # iterable-style data without a length
        return None


def _num_items(loader: DataLoader) -> int | None:
    try:
        return len(loader.dataset)  # type: ignore[arg-type]
    except TypeError:
        return None
