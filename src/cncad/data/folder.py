"""Datasets over image folders: MVTec-style anomaly detection trees and plain image folders.

[`AnomalyFolder`][cncad.data.folder.AnomalyFolder] reads the layout shared by MVTec AD, MPDD, VisA
(its MVTec-style ``1cls`` copy) and BTAD::

    <category>/train/good/*.png                     normal training images
    <category>/test/good/*.png                      normal test images
    <category>/test/<defect>/*.png                  defective test images
    <category>/ground_truth/<defect>/<stem>_mask.png

``ok`` is accepted as the name of the normal folders (BTAD), and masks may also be named
``<stem>.<ext>`` with any image extension (VisA, BTAD).
[`ImageFolderDataset`][cncad.data.folder.ImageFolderDataset] reads any folder or list of image
files, for fitting on one's own normal images or predicting over a folder.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor
from torch.utils.data import Dataset

from cncad.data.transforms import (
    IMAGE_EXTENSIONS,
    is_image_file,
    load_mask,
    preprocess,
    resize_mask,
    to_image_tensor,
)
from cncad.errors import DatasetError

__all__ = [
    "MASK_EXTENSIONS",
    "NORMAL_FOLDER_NAMES",
    "AnomalyFolder",
    "AnomalySample",
    "ImageFolderDataset",
    "find_categories",
]

NORMAL_FOLDER_NAMES: tuple[str, ...] = ("good", "ok")
"""Folder names holding defect-free images (``ok`` is BTAD's name), case-insensitive."""

MASK_EXTENSIONS: tuple[str, ...] = (".png", ".bmp", ".tif", ".tiff", ".jpg", ".jpeg")
"""Mask file extensions tried, in order of preference."""

_SPLITS = ("train", "test")


@dataclass(frozen=True)
class AnomalySample:
    """One image of an [`AnomalyFolder`][cncad.data.folder.AnomalyFolder].

    Attributes:
        path: The image file.
        label: ``0`` for a normal image, ``1`` for a defective one.
        mask_path: The ground-truth mask file; ``None`` for normal images.
        category: The category (object or texture) name, e.g. ``"bottle"``.
        defect_type: The folder name under ``test/``: ``"good"`` for normal images, the
            defect name (e.g. ``"crack"``) otherwise.
    """

    path: Path
    label: int
    mask_path: Path | None
    category: str
    defect_type: str


def _is_category_dir(path: Path) -> bool:
    return any((path / split).is_dir() for split in _SPLITS)


def _subdirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p))


def _is_normal(folder_name: str) -> bool:
    return folder_name.lower() in NORMAL_FOLDER_NAMES


def _load_model_input(path: Path, image_size: int) -> tuple[Tensor, Tensor]:
    """Read an image file; return its ``(3, S, S)`` model input and ``(2,)`` original (H, W)."""
    pixels = to_image_tensor(path)[0]
    original_size = torch.tensor(pixels.shape[-2:], dtype=torch.int64)
    return preprocess(pixels, image_size)[0], original_size


def find_categories(root: str | os.PathLike) -> dict[str, Path]:
    """Locate the category folders of an MVTec-style tree.

    Detection rule: ``root`` is itself a single category when it contains a ``train`` or a
    ``test`` directory. Otherwise every immediate, non-hidden subdirectory of ``root`` that
    contains ``train`` or ``test`` is a category, and other subdirectories (``split_csv``,
    licence folders, ...) are ignored.

    Args:
        root: A category folder or a folder of category folders.

    Returns:
        Category name (the folder name) -> category folder, sorted by name.

    Raises:
        FileNotFoundError: If ``root`` is not an existing directory.
        DatasetError: (a ``ValueError``) If ``root`` is neither a category nor holds any
            category.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root is not a directory: {root}")
    if _is_category_dir(root):
        return {root.resolve().name: root}
    found = {sub.name: sub for sub in _subdirs(root) if _is_category_dir(sub)}
    if not found:
        raise DatasetError(
            f"{root} is not an anomaly detection dataset: it has no 'train'/'test' folder "
            "(single category) and no subfolder that has one (several categories)"
        )
    return found


class _MaskIndex:
    """Case-insensitive lookup of mask files, listing each ground-truth folder once."""

    def __init__(self) -> None:
        self._listings: dict[Path, dict[str, Path]] = {}

    def _listing(self, folder: Path) -> dict[str, Path]:
        if folder not in self._listings:
            files = sorted(folder.iterdir()) if folder.is_dir() else []
            self._listings[folder] = {p.name.lower(): p for p in files if p.is_file()}
        return self._listings[folder]

    def find(self, category_dir: Path, defect_type: str, image_path: Path) -> Path:
        folder = category_dir / "ground_truth" / defect_type
        stem = image_path.stem
        candidates = [f"{stem}{suffix}{ext}" for ext in MASK_EXTENSIONS for suffix in ("_mask", "")]
        listing = self._listing(folder)
        for name in candidates:
            if name.lower() in listing:
                return listing[name.lower()]
        where = "looked" if folder.is_dir() else "the folder does not exist; looked"
        raise FileNotFoundError(
            f"no ground-truth mask for defective image {image_path}: {where} in {folder} "
            f"for {', '.join(candidates)}"
        )


class AnomalyFolder(Dataset):
    """Torch dataset over an MVTec-style anomaly detection folder.

    ``root`` is either one category folder or a folder of category folders; see
    [`find_categories`][cncad.data.folder.find_categories] for the rule. With ``split="train"`` only
    the normal images of ``train/good`` (or ``train/ok``) are listed, since the detector fits on
    normal images only. With ``split="test"`` every subfolder of ``test/`` is listed:
    ``good``/``ok`` as normal (label 0), any other as a defect type (label 1) whose masks are looked
    up in ``ground_truth/<defect>/`` as ``<stem>_mask.<ext>`` then ``<stem>.<ext>``, for ``ext``
    in [`MASK_EXTENSIONS`][cncad.data.folder.MASK_EXTENSIONS], case-insensitively.

    All files are listed and all masks located when the dataset is built, so a missing
    mask fails at once and not later inside a DataLoader worker. Images are then read
    lazily in `__getitem__`. Samples are ordered by category, defect folder and file
    name.

    Each item is a dict that `torch.utils.data.default_collate` batches:

    * ``"image"``: ``(3, S, S)`` float32, resized and CLIP-normalised by
      [`preprocess`][cncad.data.transforms.preprocess], ``S = image_size``;
    * ``"label"``: ``int``, 0 normal, 1 defective;
    * ``"mask"``: ``(1, M, M)`` float32 in ``{0, 1}``, ``M = mask_size or image_size``;
      all zeros for normal images; resized with nearest-neighbour sampling from the mask
      file's own resolution (which may differ from the image's);
    * ``"category"``: ``str``;
    * ``"path"``: ``str``, the image file;
    * ``"original_size"``: ``(2,)`` int64 tensor, the image file's ``(H, W)``.

    Images and masks are squashed to a square without keeping the aspect ratio, both in
    the same way, so they stay aligned.

    Args:
        root: A category folder (it has ``train/`` or ``test/``) or a folder of them.
        split: ``"train"`` (normal images of ``train/good``) or ``"test"`` (all of
            ``test/``).
        image_size: Side ``S`` of the square model input.
        mask_size: Side ``M`` of the returned masks; defaults to ``image_size``.
        categories: Keep only these category names, or this one name (default: all found).
        mask_threshold: Mask pixels with 8-bit value ``> mask_threshold`` are defective;
            see [`load_mask`][cncad.data.transforms.load_mask].

    Attributes:
        root: The dataset root as given.
        split: The split.
        categories: Names of the categories included, sorted.
        samples: One [`AnomalySample`][cncad.data.folder.AnomalySample] per item, in item order.

    Raises:
        FileNotFoundError: If ``root`` does not exist, a category lacks the ``split``
            folder, or a defective test image has no mask (the message names the image and
            every path tried).
        ValueError: If the layout is not recognised, ``split`` is invalid, a requested
            category does not exist, or a category has no image in the split (the first
            and the last as [`DatasetError`][cncad.errors.DatasetError], a ``ValueError``).

    Example:
        >>> from torch.utils.data import DataLoader
        >>> train = AnomalyFolder("mvtec_ad", split="train", image_size=224)
        >>> batch = next(iter(DataLoader(train, batch_size=8)))
        >>> batch["image"].shape, batch["mask"].shape
        (torch.Size([8, 3, 224, 224]), torch.Size([8, 1, 224, 224]))
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: Literal["train", "test"] = "train",
        image_size: int = 224,
        mask_size: int | None = None,
        categories: Sequence[str] | None = None,
        mask_threshold: int = 0,
    ) -> None:
        if split not in _SPLITS:
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if image_size <= 0 or (mask_size is not None and mask_size <= 0):
            raise ValueError(f"sizes must be positive, got {image_size=} and {mask_size=}")
        if not 0 <= mask_threshold <= 254:
            raise ValueError(f"mask_threshold must be in [0, 254], got {mask_threshold}")
        self.root = Path(root)
        self.split = split
        self.image_size = image_size
        self.mask_size = mask_size if mask_size is not None else image_size
        self.mask_threshold = mask_threshold

        found = find_categories(self.root)
        if categories is not None:
            if isinstance(categories, str):
                categories = [categories]
            unknown = sorted(set(categories) - set(found))
            if unknown:
                raise ValueError(
                    f"unknown categories {unknown} in {self.root}; available: {sorted(found)}"
                )
            found = {name: found[name] for name in sorted(set(categories))}
        self.categories: list[str] = list(found)

        masks = _MaskIndex()
        self.samples: list[AnomalySample] = []
        for name, category_dir in found.items():
            self.samples.extend(self._scan_category(name, category_dir, masks))

    def _scan_category(
        self, name: str, category_dir: Path, masks: _MaskIndex
    ) -> list[AnomalySample]:
        split_dir = category_dir / self.split
        if not split_dir.is_dir():
            raise FileNotFoundError(f"category {name!r} has no {self.split}/ folder: {split_dir}")
        folders = [sub for sub in _subdirs(split_dir)]
        if self.split == "train":
            folders = [sub for sub in folders if _is_normal(sub.name)]
        samples = []
        for folder in folders:
            normal = _is_normal(folder.name)
            for image_path in _list_images(folder):
                mask_path = None if normal else masks.find(category_dir, folder.name, image_path)
                samples.append(
                    AnomalySample(
                        path=image_path,
                        label=0 if normal else 1,
                        mask_path=mask_path,
                        category=name,
                        defect_type=folder.name,
                    )
                )
        if not samples:
            expected = "/".join(NORMAL_FOLDER_NAMES) if self.split == "train" else "<defect>"
            raise DatasetError(
                f"category {name!r} has no images in {split_dir} (expected image files "
                f"with extensions {', '.join(IMAGE_EXTENSIONS)} in {self.split}/{expected}/)"
            )
        return samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Tensor | int | str]:
        sample = self.samples[index]
        image, original_size = _load_model_input(sample.path, self.image_size)
        if sample.mask_path is None:
            mask = torch.zeros(1, self.mask_size, self.mask_size)
        else:
            mask_array = load_mask(sample.mask_path, threshold=self.mask_threshold)
            mask = torch.from_numpy(mask_array).unsqueeze(0)
            mask = resize_mask(mask, self.mask_size).float()  # type: ignore[union-attr]
        return {
            "image": image,
            "label": sample.label,
            "mask": mask,
            "category": sample.category,
            "path": str(sample.path),
            "original_size": original_size,
        }

    @property
    def labels(self) -> list[int]:
        """Labels of all samples (0 normal, 1 defective), in item order, without loading."""
        return [sample.label for sample in self.samples]

    def __repr__(self) -> str:
        defective = sum(self.labels)
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, "
            f"categories={self.categories}, images={len(self)}, normal={len(self) - defective}, "
            f"defective={defective}, image_size={self.image_size}, mask_size={self.mask_size})"
        )


class ImageFolderDataset(Dataset):
    """Torch dataset over plain image files, without labels or masks.

    Meant for fitting on one's own folder of normal images and for predicting over a
    folder. A directory is searched recursively (sorted by relative path, hidden files and
    folders skipped) unless ``recursive=False``; files are recognised by their extension
    ([`IMAGE_EXTENSIONS`][cncad.data.transforms.IMAGE_EXTENSIONS], case-insensitive).

    Each item is a dict that `torch.utils.data.default_collate` batches:

    * ``"image"``: ``(3, S, S)`` float32, resized and CLIP-normalised, ``S = image_size``;
    * ``"path"``: ``str``;
    * ``"original_size"``: ``(2,)`` int64 tensor, the file's ``(H, W)``; anomaly maps can
      be resized back to it.

    Args:
        root_or_paths: A directory, a single image file, or a sequence of image files
            (kept in the given order).
        image_size: Side ``S`` of the square model input.
        recursive: Whether to search subdirectories of a directory.

    Attributes:
        paths: The image files, in item order.

    Raises:
        FileNotFoundError: If a given path does not exist.
        DatasetError: (a ``ValueError``) If no image file is found.
    """

    def __init__(
        self,
        root_or_paths: str | os.PathLike | Sequence[str | os.PathLike],
        image_size: int = 224,
        recursive: bool = True,
    ) -> None:
        if image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.image_size = image_size
        if isinstance(root_or_paths, (str, os.PathLike)):
            root = Path(root_or_paths)
            if root.is_dir():
                self.paths = self._search(root, recursive)
                source = f"directory {root}"
            elif root.is_file():
                self.paths = [root]
                source = f"file {root}"
            else:
                raise FileNotFoundError(f"no such file or directory: {root}")
        else:
            self.paths = [Path(p) for p in root_or_paths]
            missing = [str(p) for p in self.paths if not p.is_file()]
            if missing:
                raise FileNotFoundError(f"image files not found: {', '.join(missing[:5])}")
            source = "the given list"
        if not self.paths:
            raise DatasetError(
                f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found in {source}"
                + ("" if recursive else " (recursive=False)")
            )

    @staticmethod
    def _search(root: Path, recursive: bool) -> list[Path]:
        if not recursive:
            return _list_images(root)
        found = []
        for directory, subdirs, files in os.walk(root):
            subdirs[:] = [d for d in subdirs if not d.startswith(".")]
            found.extend(Path(directory) / f for f in files if is_image_file(f))
        return sorted(found, key=lambda p: p.relative_to(root).parts)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Tensor | str]:
        path = self.paths[index]
        image, original_size = _load_model_input(path, self.image_size)
        return {"image": image, "path": str(path), "original_size": original_size}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(images={len(self)}, image_size={self.image_size})"
