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
[`open_dataset`][cncad.data.folder.open_dataset] chooses between them the one way that both the
detector and the command line use.
"""

from __future__ import annotations

import operator
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor
from torch.utils.data import Dataset

from cncad._decode import find_image_files
from cncad.data.transforms import (
    IMAGE_EXTENSIONS,
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
    "MaskPolicy",
    "find_categories",
    "open_dataset",
]

NORMAL_FOLDER_NAMES: tuple[str, ...] = ("good", "ok")
"""Folder names holding defect-free images (``ok`` is BTAD's name), case-insensitive."""

MASK_EXTENSIONS: tuple[str, ...] = (".png", ".bmp", ".tif", ".tiff", ".jpg", ".jpeg")
"""Mask file extensions tried, in order of preference."""

_SPLITS = ("train", "test")

MaskPolicy = Literal["auto", "required"]
"""How [`AnomalyFolder`][cncad.data.folder.AnomalyFolder] treats a defective test image without a
mask file: ``"auto"`` lists it without a mask (``has_mask`` False), ``"required"`` refuses it."""

_MASK_POLICIES = ("auto", "required")

#: Fill value of the ``"mask"`` of an item whose ground truth is unknown.
_UNKNOWN_MASK = -1.0


@dataclass(frozen=True)
class AnomalySample:
    """One image of an [`AnomalyFolder`][cncad.data.folder.AnomalyFolder].

    Attributes:
        path: The image file.
        label: ``0`` for a normal image, ``1`` for a defective one.
        mask_path: The ground-truth mask file; ``None`` for normal images, and for a
            defective image that has no mask file (read with ``masks="auto"``).
        category: The category (object or texture) name, e.g. ``"bottle"``.
        defect_type: The folder name under ``test/``: ``"good"`` for normal images, the
            defect name (e.g. ``"crack"``) otherwise.
    """

    path: Path
    label: int
    mask_path: Path | None
    category: str
    defect_type: str

    @property
    def has_mask(self) -> bool:
        """Whether the ground truth is known: a normal image, or a mask file was found."""
        return self.label == 0 or self.mask_path is not None


def _is_category_dir(path: Path) -> bool:
    return any((path / split).is_dir() for split in _SPLITS)


def _subdirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _is_normal(folder_name: str) -> bool:
    return folder_name.lower() in NORMAL_FOLDER_NAMES


def _positive_int(value: object, name: str) -> int:
    """``value`` as an int >= 1; bools, floats and strings are refused."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a positive int, got {value!r}")
    try:
        number = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(
            f"{name} must be a positive int, got {type(value).__name__} {value!r}"
        ) from None
    if number <= 0:
        raise ValueError(f"{name} must be a positive int, got {number}")
    return number


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

    @staticmethod
    def _candidates(image_path: Path) -> list[str]:
        stem = image_path.stem
        return [f"{stem}{suffix}{ext}" for ext in MASK_EXTENSIONS for suffix in ("_mask", "")]

    def find(self, category_dir: Path, defect_type: str, image_path: Path) -> Path | None:
        """The mask file of a defective image, or None when there is none."""
        listing = self._listing(category_dir / "ground_truth" / defect_type)
        for name in self._candidates(image_path):
            if name.lower() in listing:
                return listing[name.lower()]
        return None

    def missing(self, category_dir: Path, defect_type: str, image_path: Path) -> str:
        """Why :meth:`find` found nothing: the folder and the names it looked for."""
        folder = category_dir / "ground_truth" / defect_type
        where = "looked" if folder.is_dir() else "the folder does not exist; looked"
        return (
            f"no ground-truth mask for defective image {image_path}: {where} in {folder} "
            f"for {', '.join(self._candidates(image_path))}"
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

    **Test sets without masks.** A defective image without a mask file (no ``ground_truth``
    folder at all, or a missing file) is listed with ``masks="auto"`` (the default): its
    ground truth is unknown, so its item has ``"has_mask"`` False and a mask of ``-1``
    everywhere; [`AnomalyEvaluator`][cncad.evaluation.AnomalyEvaluator] then reports the image
    metrics of its category and no pixel metrics (``None``), and says why. With
    ``masks="required"`` such an image is refused when the dataset is built. The defective
    images without a mask are [`missing_masks`][cncad.data.folder.AnomalyFolder.missing_masks].

    All files are listed and all masks located when the dataset is built, so a missing
    mask (with ``masks="required"``) fails at once and not later inside a DataLoader
    worker. Images are then read lazily in `__getitem__`. Samples are ordered by category,
    defect folder and file name.

    Each item is a dict that `torch.utils.data.default_collate` batches:

    * ``"image"``: ``(3, S, S)`` float32, resized and CLIP-normalised by
      [`preprocess`][cncad.data.transforms.preprocess], ``S = image_size``;
    * ``"label"``: ``int``, 0 normal, 1 defective;
    * ``"mask"``: ``(1, M, M)`` float32 in ``{0, 1}``, ``M = mask_size or image_size``;
      all zeros for normal images; ``-1`` everywhere when the ground truth is unknown;
      resized with nearest-neighbour sampling;
    * ``"has_mask"``: ``bool``, whether ``"mask"`` is the ground truth (True for normal
      images and for defective images with a mask file);
    * ``"category"``: ``str``;
    * ``"path"``: ``str``, the image file;
    * ``"original_size"``: ``(2,)`` int64 tensor, the image file's ``(H, W)``.

    A mask file must have its image's size: reading an item whose mask differs raises a
    [`DatasetError`][cncad.errors.DatasetError] naming both files and sizes (it is checked
    when the item is read, where both files are decoded anyway, not when the dataset is
    built). Images and masks are squashed to a square without keeping the aspect ratio,
    both in the same way, so they stay aligned.

    Args:
        root: A category folder (it has ``train/`` or ``test/``) or a folder of them.
        split: ``"train"`` (normal images of ``train/good``) or ``"test"`` (all of
            ``test/``).
        image_size: Side ``S`` of the square model input.
        mask_size: Side ``M`` of the returned masks; defaults to ``image_size``.
        categories: Keep only these category names, or this one name (default: all found).
        mask_threshold: Mask pixels with 8-bit value ``> mask_threshold`` are defective;
            see [`load_mask`][cncad.data.transforms.load_mask].
        masks: ``"auto"`` lists defective test images without a mask file (their ground
            truth unknown), ``"required"`` refuses them; see
            [`MaskPolicy`][cncad.data.folder.MaskPolicy].

    Attributes:
        root: The dataset root as given.
        split: The split.
        categories: Names of the categories included, sorted.
        samples: One [`AnomalySample`][cncad.data.folder.AnomalySample] per item, in item order.

    Raises:
        FileNotFoundError: If ``root`` does not exist, a category lacks the ``split``
            folder, or (``masks="required"``) a defective test image has no mask (the
            message names the image and every path tried).
        TypeError: If a size is not an int.
        ValueError: If the layout is not recognised, ``split`` or ``masks`` is invalid, a
            requested category does not exist, or a category has no image in the split
            (the first and the last as [`DatasetError`][cncad.errors.DatasetError], a
            ``ValueError``).

    Examples:
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
        masks: MaskPolicy = "auto",
    ) -> None:
        if split not in _SPLITS:
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if masks not in _MASK_POLICIES:
            raise ValueError(f"masks must be 'auto' or 'required', got {masks!r}")
        image_size = _positive_int(image_size, "image_size")
        mask_size = _positive_int(mask_size, "mask_size") if mask_size is not None else None
        if isinstance(mask_threshold, bool) or not isinstance(mask_threshold, int):
            raise TypeError(f"mask_threshold must be an int, got {mask_threshold!r}")
        if not 0 <= mask_threshold <= 254:
            raise ValueError(f"mask_threshold must be in [0, 254], got {mask_threshold}")
        self.root = Path(root)
        self.split = split
        self.image_size = image_size
        self.mask_size = mask_size if mask_size is not None else image_size
        self.mask_threshold = mask_threshold
        self.masks = masks

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

        index = _MaskIndex()
        self.samples: list[AnomalySample] = []
        for name, category_dir in found.items():
            self.samples.extend(self._scan_category(name, category_dir, index))

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
            for image_path in find_image_files(folder, recursive=False):
                mask_path = None
                if not normal:
                    mask_path = masks.find(category_dir, folder.name, image_path)
                    if mask_path is None and self.masks == "required":
                        raise FileNotFoundError(
                            masks.missing(category_dir, folder.name, image_path)
                            + " (masks='required'; masks='auto' reads it without one)"
                        )
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

    def __getitem__(self, index: int) -> dict[str, Tensor | int | str | bool]:
        sample = self.samples[index]
        image, original_size = _load_model_input(sample.path, self.image_size)
        if sample.label == 0:
            mask = torch.zeros(1, self.mask_size, self.mask_size)
        elif sample.mask_path is None:
            mask = torch.full((1, self.mask_size, self.mask_size), _UNKNOWN_MASK)
        else:
            mask_array = load_mask(sample.mask_path, threshold=self.mask_threshold)
            if mask_array.shape != tuple(original_size.tolist()):
                (mask_h, mask_w), (image_h, image_w) = mask_array.shape, original_size.tolist()
                raise DatasetError(
                    f"mask {sample.mask_path} is {mask_w}x{mask_h} pixels but its image "
                    f"{sample.path} is {image_w}x{image_h} (width x height); a mask must have "
                    "its image's size"
                )
            mask = torch.from_numpy(mask_array).unsqueeze(0)
            mask = resize_mask(mask, self.mask_size).float()  # type: ignore[union-attr]
        return {
            "image": image,
            "label": sample.label,
            "mask": mask,
            "has_mask": sample.has_mask,
            "category": sample.category,
            "path": str(sample.path),
            "original_size": original_size,
        }

    @property
    def labels(self) -> list[int]:
        """Labels of all samples (0 normal, 1 defective), in item order, without loading."""
        return [sample.label for sample in self.samples]

    @property
    def missing_masks(self) -> list[AnomalySample]:
        """The defective samples without a mask file (``masks="auto"``), in item order."""
        return [sample for sample in self.samples if not sample.has_mask]

    def describe(self) -> str:
        """One line saying what was found, as the command line prints it.

        Returns:
            For example ``"MVTec-style dataset data: 40 normal training images in 2
            categories (bottle, cable)"``; for the test split also the normal and defective
            counts and how many defective images have no mask.
        """
        count = len(self.categories)
        where = f"in {count} categor{'y' if count == 1 else 'ies'} ({', '.join(self.categories)})"
        if self.split == "train":
            return f"MVTec-style dataset {self.root}: {len(self)} normal training images {where}"
        defective = sum(self.labels)
        text = (
            f"MVTec-style dataset {self.root}: {len(self)} test images ({len(self) - defective} "
            f"normal, {defective} defective) {where}"
        )
        missing = len(self.missing_masks)
        if missing:
            text += f"; {missing} defective images have no ground-truth mask"
        return text

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
        root: The directory searched, or None when files were given.
        paths: The image files, in item order.

    Raises:
        FileNotFoundError: If a given path does not exist.
        TypeError: If ``image_size`` is not an int.
        DatasetError: (a ``ValueError``) If no image file is found.
    """

    def __init__(
        self,
        root_or_paths: str | os.PathLike | Sequence[str | os.PathLike],
        image_size: int = 224,
        recursive: bool = True,
    ) -> None:
        self.image_size = _positive_int(image_size, "image_size")
        self.root: Path | None = None
        if isinstance(root_or_paths, (str, os.PathLike)):
            root = Path(root_or_paths)
            if root.is_dir():
                self.root = root
                self.paths = find_image_files(root, recursive)
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

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Tensor | str]:
        path = self.paths[index]
        image, original_size = _load_model_input(path, self.image_size)
        return {"image": image, "path": str(path), "original_size": original_size}

    def describe(self) -> str:
        """One line saying what was found, as the command line prints it.

        Returns:
            For example ``"plain image folder parts: 5 images, all taken as normal"``.
        """
        source = f"plain image folder {self.root}" if self.root is not None else "image files"
        return f"{source}: {len(self)} images, all taken as normal"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(images={len(self)}, image_size={self.image_size})"


def _check_not_a_split_folder(root: Path) -> None:
    """Refuse a folder that looks like the ``test/`` split of an MVTec-style category.

    Read as a plain folder, its defect subfolders would be taken as normal images.
    """
    subdirs = [p.name for p in _subdirs(root)]
    normal = [name for name in subdirs if _is_normal(name)]
    others = [name for name in subdirs if not _is_normal(name)]
    if (normal and others) or "ground_truth" in subdirs:
        raise DatasetError(
            f"{root} looks like part of an MVTec-style dataset (it has the folders "
            f"{', '.join(sorted(subdirs))}); pass the category folder, the one that holds "
            "train/ and test/, or a folder of normal images only"
        )


def open_dataset(
    root: str | os.PathLike,
    split: Literal["train", "test"] = "train",
    *,
    image_size: int = 224,
    mask_size: int | None = None,
    categories: Sequence[str] | None = None,
    masks: MaskPolicy = "auto",
) -> AnomalyFolder | ImageFolderDataset:
    """Open a data folder the one way both the Python API and the command line read it.

    [`CNCDetector.fit`][cncad.detector.CNCDetector.fit] and
    [`evaluate`][cncad.detector.CNCDetector.evaluate] given a path, and ``cncad fit`` /
    ``cncad evaluate``, all call this function, so they accept exactly the same folders.

    * ``split="train"``: an MVTec-style tree (``root``, or a folder directly inside it, holds
      ``train/`` or ``test/``; see [`find_categories`][cncad.data.folder.find_categories])
      gives the normal images of every category's ``train/good`` as an
      [`AnomalyFolder`][cncad.data.folder.AnomalyFolder]. Any other folder is a plain folder:
      every image file under it, searched recursively, is a normal image
      ([`ImageFolderDataset`][cncad.data.folder.ImageFolderDataset]). A folder that looks like
      the ``test/`` split of a category (``good/`` beside defect folders) or holds
      ``ground_truth/`` is refused, since its defective images would be taken as normal.
    * ``split="test"``: an MVTec-style tree only (labels come from the folder names), read
      as an [`AnomalyFolder`][cncad.data.folder.AnomalyFolder] with ``mask_size`` and
      ``masks`` (by default defective images without a mask file are kept, and their
      category gets image metrics only).

    ``dataset.describe()`` gives the one line that the command line prints about it.

    Args:
        root: The data folder.
        split: ``"train"`` for fitting, ``"test"`` for evaluation.
        image_size: Side of the square model input.
        mask_size: Side of the masks of the test split (default: ``image_size``).
        categories: Keep only these categories of an MVTec-style tree (default: all).
        masks: What to do with a defective test image without a mask file; see
            [`MaskPolicy`][cncad.data.folder.MaskPolicy].

    Returns:
        An [`AnomalyFolder`][cncad.data.folder.AnomalyFolder], or for a plain training folder
        an [`ImageFolderDataset`][cncad.data.folder.ImageFolderDataset].

    Raises:
        FileNotFoundError: If ``root`` does not exist (or see
            [`AnomalyFolder`][cncad.data.folder.AnomalyFolder]).
        DatasetError: (a ``ValueError``) If ``root`` is a file, holds no usable image, looks
            like a split folder (``split="train"``), or is not an MVTec-style tree
            (``split="test"``).
        ValueError: If ``split`` or another argument is invalid.
        TypeError: If ``root`` is not a path or a size is not an int.
    """
    if split not in _SPLITS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if not isinstance(root, (str, os.PathLike)):
        raise TypeError(f"the data folder must be a path, got {type(root).__name__}")
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"data folder not found: {root}")
    if not root.is_dir():
        raise DatasetError(f"the data folder is a file, not a folder: {root}")
    options = {"image_size": image_size, "categories": categories}
    if split == "test":
        return AnomalyFolder(root, "test", mask_size=mask_size, masks=masks, **options)
    try:
        find_categories(root)
    except DatasetError:
        if categories is not None:
            raise
        _check_not_a_split_folder(root)
        try:
            return ImageFolderDataset(root, image_size=image_size)
        except DatasetError as error:
            raise DatasetError(
                f"{error}; nor is {root} an MVTec-style dataset (no train/ or test/ "
                "folder in it or in a folder directly inside it)"
            ) from error
    return AnomalyFolder(root, "train", **options)
