from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from cncad.data.folder import AnomalyFolder, ImageFolderDataset, find_categories
from cncad.data.transforms import load_mask

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


def test_missing_mask_fails_at_construction_naming_the_image(tmp_path: Path) -> None:
    base = _category(tmp_path)
    orphan = _image(base / "test" / "scratch" / "007.png")
    with pytest.raises(FileNotFoundError) as info:
        AnomalyFolder(base, split="test")
    message = str(info.value)
    assert str(orphan) in message and "007_mask.png" in message and "007.bmp" in message
    # The train split never needs masks.
    assert len(AnomalyFolder(base, split="train", image_size=8)) == 3


def test_missing_ground_truth_folder(tmp_path: Path) -> None:
    base = _category(tmp_path)
    _image(base / "test" / "hole" / "000.png")
    with pytest.raises(FileNotFoundError, match="folder does not exist"):
        AnomalyFolder(base, split="test")


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
    assert set(good) == {"image", "label", "mask", "category", "path", "original_size"}
    assert good["image"].shape == (3, 16, 16) and good["image"].dtype == torch.float32
    assert good["mask"].shape == (1, 8, 8) and good["mask"].dtype == torch.float32
    assert good["label"] == 0 and good["mask"].sum() == 0
    assert good["category"] == "widget" and good["path"].endswith("000.jpg")
    assert good["original_size"].tolist() == [14, 20]
    defect = dataset[1]
    assert defect["label"] == 1
    # Left half of the mask is on: it stays exactly the left half after resizing.
    assert defect["mask"][0, :, :4].eq(1).all() and defect["mask"][0, :, 4:].eq(0).all()


def test_mask_of_another_size_than_its_image(tmp_path: Path) -> None:
    base = _category(tmp_path)
    _image(base / "test" / "scratch" / "000.png", size=(40, 40))
    _mask(base / "ground_truth" / "scratch" / "000_mask.png", size=(10, 10), box=(0, 5, 10, 10))
    item = AnomalyFolder(base, split="test", image_size=8)[1]
    assert item["original_size"].tolist() == [40, 40]
    assert item["mask"].shape == (1, 8, 8)
    assert item["mask"][0, 4:].eq(1).all() and item["mask"][0, :4].eq(0).all()


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
