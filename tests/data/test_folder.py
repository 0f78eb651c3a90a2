from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from cncad.data.folder import AnomalyFolder, ImageFolderDataset, find_categories, open_dataset
from cncad.data.transforms import load_mask
from cncad.errors import DatasetError

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def _image(
    path: Path, size: tuple[int, int] = (12, 10), mode: str = "RGB", value: int = 90
) -> Path:
    """Write an image of ``size`` = (width, height)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode in ("L", "I;16") else (value, value, value)).save(path)
    return path


def _mask(
    path: Path, size: tuple[int, int] = (12, 10), box: tuple[int, ...] = (0, 0, 6, 10)
) -> Path:
    """Write a 0/255 mask of ``size`` = (width, height), on inside ``box`` (x0, y0, x1, y1)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    values = np.zeros(size[::-1], dtype=np.uint8)
    values[box[1] : box[3], box[0] : box[2]] = 255
    Image.fromarray(values).save(path)
    return path


def _category(root: Path, name: str = "widget", n_train: int = 3) -> Path:
    """A small MVTec-style category with one 'scratch' defect and varying image formats."""
    base = root / name
    for index in range(n_train):
        _image(base / "train" / "good" / f"{index:03d}.png")
    _image(base / "test" / "good" / "000.jpg", size=(20, 14), mode="L")
    _image(base / "test" / "scratch" / "000.png")
    _mask(base / "ground_truth" / "scratch" / "000_mask.png")
    return base


def _hashes(root: Path) -> dict[str, str]:
    """SHA-256 of every file under ``root``, by relative path."""
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


# --------------------------------------------------------------------- layout detection


def test_single_category_root(tmp_path: Path) -> None:
    base = _category(tmp_path)
    assert list(find_categories(base)) == ["widget"]
    dataset = AnomalyFolder(base, split="train", image_size=8)
    assert dataset.categories == ["widget"] and len(dataset) == 3


def test_multi_category_root_ignores_other_folders(tmp_path: Path) -> None:
    _category(tmp_path, "b_part")
    _category(tmp_path, "a_part", n_train=2)
    (tmp_path / "split_csv").mkdir()
    (tmp_path / "LICENSE.txt").write_text("x")
    (tmp_path / ".cache" / "train").mkdir(parents=True)
    dataset = AnomalyFolder(tmp_path, split="train", image_size=8)
    assert dataset.categories == ["a_part", "b_part"]
    assert [s.category for s in dataset.samples] == ["a_part"] * 2 + ["b_part"] * 3


def test_unrecognised_root(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    with pytest.raises(ValueError, match="no 'train'/'test' folder"):
        AnomalyFolder(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        AnomalyFolder(tmp_path / "absent")


def test_category_filter(tmp_path: Path) -> None:
    _category(tmp_path, "one")
    _category(tmp_path, "two")
    assert AnomalyFolder(tmp_path, categories=["two"], image_size=8).categories == ["two"]
    assert AnomalyFolder(tmp_path, categories="one", image_size=8).categories == ["one"]
    with pytest.raises(ValueError, match=r"unknown categories \['three'\].*available"):
        AnomalyFolder(tmp_path, categories=["three"])


# ------------------------------------------------------------------------------- splits


def test_train_split_lists_only_normal_images(tmp_path: Path) -> None:
    base = _category(tmp_path)
    _image(base / "train" / "rejected" / "bad.png")  # not a normal folder: skipped
    dataset = AnomalyFolder(base, split="train", image_size=8)
    assert dataset.labels == [0, 0, 0]
    assert all(s.defect_type == "good" and s.mask_path is None for s in dataset.samples)


def test_test_split_samples_in_sorted_order(tmp_path: Path) -> None:
    base = _category(tmp_path)
    _image(base / "test" / "dent" / "b.PNG")
    _image(base / "test" / "dent" / "a.tif")
    _mask(base / "ground_truth" / "dent" / "a_mask.png")
    _mask(base / "ground_truth" / "dent" / "b_mask.png")
    (base / "test" / "dent" / "notes.txt").write_text("ignored")
    dataset = AnomalyFolder(base, split="test", image_size=8)
    assert [(s.defect_type, s.path.name, s.label) for s in dataset.samples] == [
        ("dent", "a.tif", 1),
        ("dent", "b.PNG", 1),
        ("good", "000.jpg", 0),
        ("scratch", "000.png", 1),
    ]
    assert dataset.samples[0].mask_path == base / "ground_truth" / "dent" / "a_mask.png"


def test_invalid_split_and_missing_split_folder(tmp_path: Path) -> None:
    base = _category(tmp_path)
    with pytest.raises(ValueError, match="split"):
        AnomalyFolder(base, split="val")  # type: ignore[arg-type]
    (base / "test").rename(base / "elsewhere")
    with pytest.raises(FileNotFoundError, match="no test/ folder"):
        AnomalyFolder(base, split="test")


def test_empty_folder_error(tmp_path: Path) -> None:
    (tmp_path / "empty" / "train" / "good").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images"):
        AnomalyFolder(tmp_path / "empty")


# -------------------------------------------------------------------------------- masks


def test_required_mask_fails_at_construction_naming_the_image(tmp_path: Path) -> None:
    base = _category(tmp_path)
    orphan = _image(base / "test" / "scratch" / "007.png")
    with pytest.raises(FileNotFoundError) as info:
        AnomalyFolder(base, split="test", masks="required")
    message = str(info.value)
    assert str(orphan) in message and "007_mask.png" in message and "007.bmp" in message
    # The train split never needs masks.
    assert len(AnomalyFolder(base, split="train", image_size=8, masks="required")) == 3


def test_required_masks_and_a_missing_ground_truth_folder(tmp_path: Path) -> None:
    base = _category(tmp_path)
    _image(base / "test" / "hole" / "000.png")
    with pytest.raises(FileNotFoundError, match="folder does not exist"):
        AnomalyFolder(base, split="test", masks="required")
    with pytest.raises(ValueError, match="'auto' or 'required'"):
        AnomalyFolder(base, split="test", masks="none")  # type: ignore[arg-type]


def test_defective_images_without_masks_are_kept_with_unknown_ground_truth(
    tmp_path: Path,
) -> None:
    base = _category(tmp_path)
    _image(base / "test" / "hole" / "000.png")  # no ground_truth/hole/ folder at all
    orphan = _image(base / "test" / "scratch" / "001.png")  # scratch/ has 000's mask only
    dataset = AnomalyFolder(base, split="test", image_size=8, mask_size=4)
    assert dataset.labels == [0, 1, 1, 1]
    assert [s.path for s in dataset.missing_masks] == [base / "test" / "hole" / "000.png", orphan]
    assert [dataset[i]["has_mask"] for i in range(4)] == [True, False, True, False]
    unknown = dataset[1]["mask"]
    assert unknown.shape == (1, 4, 4) and unknown.eq(-1).all()
    assert dataset[2]["mask"].max() == 1 and dataset[0]["mask"].eq(0).all()
    batch = next(iter(DataLoader(dataset, batch_size=4)))
    assert batch["has_mask"].tolist() == [True, False, True, False]
    assert "2 defective images have no ground-truth mask" in dataset.describe()


def test_btad_layout_ok_ko_and_bmp_masks(tmp_path: Path) -> None:
    base = tmp_path / "01"
    _image(base / "train" / "ok" / "0000.bmp")
    _image(base / "test" / "ok" / "0001.bmp")
    _image(base / "test" / "ko" / "0002.bmp")
    _mask(base / "ground_truth" / "ko" / "0002.bmp")
    train = AnomalyFolder(tmp_path, split="train", image_size=8)
    test = AnomalyFolder(tmp_path, split="test", image_size=8)
    assert train.categories == ["01"] and len(train) == 1
    assert test.labels == [1, 0]
    assert test.samples[0].mask_path == base / "ground_truth" / "ko" / "0002.bmp"


def test_visa_layout_uppercase_jpg_and_plain_mask_names(tmp_path: Path) -> None:
    base = tmp_path / "candle"
    _image(base / "train" / "good" / "0001.JPG")
    _image(base / "test" / "bad" / "0100.JPG")
    _mask(base / "ground_truth" / "bad" / "0100.png")
    test = AnomalyFolder(tmp_path, split="test", image_size=8)
    assert test.samples[0].mask_path == base / "ground_truth" / "bad" / "0100.png"


# -------------------------------------------------------------------------------- items


def test_items_shapes_and_values(tmp_path: Path) -> None:
    base = _category(tmp_path)
    dataset = AnomalyFolder(base, split="test", image_size=16, mask_size=8)
    good = dataset[0]
    assert set(good) == {
        "image",
        "label",
        "mask",
        "has_mask",
        "category",
        "path",
        "original_size",
    }
    assert good["has_mask"] is True
    assert good["image"].shape == (3, 16, 16) and good["image"].dtype == torch.float32
    assert good["mask"].shape == (1, 8, 8) and good["mask"].dtype == torch.float32
    assert good["label"] == 0 and good["mask"].sum() == 0
    assert good["category"] == "widget" and good["path"].endswith("000.jpg")
    assert good["original_size"].tolist() == [14, 20]
    defect = dataset[1]
    assert defect["label"] == 1
    # Left half of the mask is on: it stays exactly the left half after resizing.
    assert defect["mask"][0, :, :4].eq(1).all() and defect["mask"][0, :, 4:].eq(0).all()


def test_mask_of_another_size_than_its_image_is_refused_naming_both(tmp_path: Path) -> None:
    base = _category(tmp_path)
    image = _image(base / "test" / "scratch" / "000.png", size=(40, 30))
    mask = _mask(base / "ground_truth" / "scratch" / "000_mask.png", size=(10, 10))
    before = _hashes(base)
    dataset = AnomalyFolder(base, split="test", image_size=8)
    with pytest.raises(DatasetError) as info:
        dataset[1]
    message = str(info.value)
    assert str(mask) in message and str(image) in message
    assert "10x10" in message and "40x30" in message and "\n" not in message
    # Through DataLoader workers too: the error keeps its type and its message.
    with pytest.raises(DatasetError, match="40x30"):
        next(iter(DataLoader(dataset, batch_size=2, num_workers=1)))
    assert _hashes(base) == before


def test_grey_mask_threshold(tmp_path: Path) -> None:
    base = _category(tmp_path)
    values = np.zeros((10, 12), dtype=np.uint8)
    values[:, :6] = 255
    values[:, 6:8] = 60  # anti-aliased fringe
    Image.fromarray(values).save(base / "ground_truth" / "scratch" / "000_mask.png")
    loose = AnomalyFolder(base, split="test", image_size=12, mask_size=12)[1]["mask"]
    strict = AnomalyFolder(base, split="test", image_size=12, mask_threshold=127)[1]["mask"]
    assert loose.sum() == 8 * 12 and strict.sum() == 6 * 12
    assert set(strict.unique().tolist()) == {0.0, 1.0}


def test_grayscale_and_16_bit_images_load_as_rgb(tmp_path: Path) -> None:
    base = tmp_path / "deep"
    _image(base / "train" / "good" / "a.png", mode="I;16", value=65535)
    _image(base / "train" / "good" / "b.jpg", mode="L", value=255)
    dataset = AnomalyFolder(base, image_size=4)
    for item in (dataset[0], dataset[1]):
        assert item["image"].shape == (3, 4, 4)
        white = (1 - torch.tensor([0.48145466, 0.4578275, 0.40821073])) / torch.tensor(
            [0.26862954, 0.26130258, 0.27577711]
        )
        assert torch.allclose(item["image"][:, 0, 0], white, atol=0.02)


def test_default_collate_through_dataloader(tmp_path: Path) -> None:
    base = _category(tmp_path)
    loader = DataLoader(AnomalyFolder(base, split="test", image_size=8), batch_size=2)
    batch = next(iter(loader))
    assert batch["image"].shape == (2, 3, 8, 8)
    assert batch["mask"].shape == (2, 1, 8, 8)
    assert batch["label"].tolist() == [0, 1]
    assert batch["category"] == ["widget", "widget"]
    assert len(batch["path"]) == 2 and batch["original_size"].shape == (2, 2)


def test_repr(tmp_path: Path) -> None:
    text = repr(AnomalyFolder(_category(tmp_path), split="test", image_size=8))
    assert "images=2" in text and "defective=1" in text


# ------------------------------------------------------------------- ImageFolderDataset


def test_image_folder_recursive_and_flat(tmp_path: Path) -> None:
    _image(tmp_path / "b.png")
    _image(tmp_path / "sub" / "a.jpg", size=(7, 5))
    _image(tmp_path / ".hidden" / "c.png")
    _image(tmp_path / "._d.png")
    (tmp_path / "readme.md").write_text("x")
    deep = ImageFolderDataset(tmp_path, image_size=8)
    assert [p.name for p in deep.paths] == ["b.png", "a.jpg"]
    assert [p.name for p in ImageFolderDataset(tmp_path, recursive=False).paths] == ["b.png"]
    item = deep[1]
    assert set(item) == {"image", "path", "original_size"}
    assert item["image"].shape == (3, 8, 8) and item["original_size"].tolist() == [5, 7]
    batch = next(iter(DataLoader(deep, batch_size=2)))
    assert batch["image"].shape == (2, 3, 8, 8) and batch["original_size"].shape == (2, 2)


def test_image_folder_from_paths_and_single_file(tmp_path: Path) -> None:
    first, second = _image(tmp_path / "x.png"), _image(tmp_path / "y.bmp")
    assert ImageFolderDataset([second, str(first)]).paths == [second, first]
    assert len(ImageFolderDataset(first)) == 1


def test_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no image files"):
        ImageFolderDataset(tmp_path)
    with pytest.raises(FileNotFoundError, match="absent"):
        ImageFolderDataset(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match=r"gone\.png"):
        ImageFolderDataset([tmp_path / "gone.png"])


# -------------------------------------------------------------------------- real data


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"real datasets not present at {SHARED_DATA}")
def test_real_datasets_counts_and_empty_masks() -> None:
    train = AnomalyFolder(SHARED_DATA, split="train", image_size=32)
    test = AnomalyFolder(SHARED_DATA, split="test", image_size=32)
    assert train.categories == ["magnetic_tile", "mpdd_metal_plate"]

    def counts(dataset: AnomalyFolder, category: str) -> tuple[int, int]:
        labels = [s.label for s in dataset.samples if s.category == category]
        return labels.count(0), labels.count(1)

    assert counts(train, "magnetic_tile") == (761, 0)
    assert counts(test, "magnetic_tile") == (191, 392)
    assert counts(train, "mpdd_metal_plate") == (60, 0)
    assert counts(test, "mpdd_metal_plate") == (20, 81)

    uneven = [s for s in test.samples if s.defect_type == "uneven"]
    assert len(uneven) == 103
    assert sum(not load_mask(s.mask_path).any() for s in uneven) == 4

    # Varying sizes and grey JPEGs from one category, RGB PNGs from the other.
    tile = test[0]
    plate_index = next(
        i for i, s in enumerate(test.samples) if s.category == "mpdd_metal_plate" and s.label
    )
    plate = test[plate_index]
    assert tile["image"].shape == plate["image"].shape == (3, 32, 32)
    assert plate["original_size"].tolist() == [512, 512] and plate["label"] == 1
    assert plate["mask"].sum() > 0


# ------------------------------------------------------------------------- open_dataset


def test_open_dataset_reads_a_tree_or_a_plain_folder_as_fit_does(tmp_path: Path) -> None:
    base = _category(tmp_path / "tree")
    tree = open_dataset(tmp_path / "tree", "train", image_size=8)
    assert isinstance(tree, AnomalyFolder) and len(tree) == 3
    assert tree.describe() == (
        f"MVTec-style dataset {tmp_path / 'tree'}: 3 normal training images in 1 category (widget)"
    )
    plain_root = tmp_path / "plain"
    _image(plain_root / "day_1" / "a.png")
    _image(plain_root / "b.png")
    plain = open_dataset(plain_root, image_size=8)
    assert isinstance(plain, ImageFolderDataset) and len(plain) == 2
    assert plain.describe() == f"plain image folder {plain_root}: 2 images, all taken as normal"
    test = open_dataset(base, "test", image_size=8, mask_size=4)
    assert isinstance(test, AnomalyFolder) and test[1]["mask"].shape == (1, 4, 4)
    assert "2 test images (1 normal, 1 defective) in 1 category" in test.describe()


@pytest.mark.parametrize("layout", ["split", "ground_truth"])
def test_open_dataset_refuses_part_of_a_tree_for_training(tmp_path: Path, layout: str) -> None:
    base = _category(tmp_path)
    folder = base / "test" if layout == "split" else base / "ground_truth"
    if layout == "ground_truth":
        folder = tmp_path / "mixed"
        _image(folder / "a.png")
        _mask(folder / "ground_truth" / "x" / "a_mask.png")
    with pytest.raises(DatasetError, match="looks like part of an MVTec-style dataset"):
        open_dataset(folder, "train", image_size=8)


def test_open_dataset_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="data folder not found"):
        open_dataset(tmp_path / "absent")
    afile = _image(tmp_path / "one.png")
    with pytest.raises(DatasetError, match="is a file, not a folder"):
        open_dataset(afile)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"no image files.*nor is .* an MVTec-style dataset"):
        open_dataset(tmp_path / "empty")
    plain = tmp_path / "plain"
    _image(plain / "a.png")
    with pytest.raises(DatasetError, match="not an anomaly detection dataset"):
        open_dataset(plain, "test")
    with pytest.raises(ValueError, match="split must be"):
        open_dataset(plain, "val")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="image_size must be a positive int"):
        open_dataset(plain, image_size=56.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="must be a path"):
        open_dataset(3)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [56.0, "56", True, None])
def test_sizes_must_be_ints(tmp_path: Path, value: object) -> None:
    base = _category(tmp_path)
    with pytest.raises(TypeError, match="image_size must be a positive int"):
        AnomalyFolder(base, image_size=value)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="mask_size must be a positive int"):
        AnomalyFolder(base, mask_size=value if value is not None else 1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="image_size must be a positive int, got 0"):
        ImageFolderDataset(base, image_size=0)
