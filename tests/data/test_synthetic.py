from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cncad.data.folder import AnomalyFolder
from cncad.data.synthetic import (
    DEFECT_TYPES,
    SYNTHETIC_CATEGORIES,
    make_synthetic_dataset,
    synthetic_sample,
)
from cncad.data.transforms import load_mask

SMALL = {"n_train": 3, "n_test_good": 2, "n_test_defect": 4, "image_size": 32}


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


# --------------------------------------------------------------------- synthetic_sample


@pytest.mark.parametrize("category", SYNTHETIC_CATEGORIES)
def test_sample_shapes_and_masks(category: str) -> None:
    image, mask = synthetic_sample(category, None, size=32, rng=0)
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    assert mask.shape == (32, 32) and mask.dtype == bool and not mask.any()
    for seed in range(3):
        for defect in DEFECT_TYPES:
            _, mask = synthetic_sample(category, defect, size=32, rng=seed)
            assert mask.any(), (category, defect, seed)
            assert mask.mean() < 0.25  # a local defect, not the whole image


def test_defect_changes_the_pixels_under_its_mask() -> None:
    for defect in DEFECT_TYPES:
        normal, _ = synthetic_sample("bolt_like", None, 48, rng=np.random.default_rng(5))
        broken, mask = synthetic_sample("bolt_like", defect, 48, rng=np.random.default_rng(5))
        difference = np.abs(normal.astype(int) - broken.astype(int)).max(axis=-1)
        # The renderer consumes the same random numbers up to the defect, so pixels outside
        # the mask differ only by sensor noise drawn afterwards.
        assert difference[mask].mean() > 3 * difference[~mask].mean()


def test_sample_is_deterministic_and_normal_images_vary() -> None:
    first, _ = synthetic_sample("carpet_like", rng=7)
    again, _ = synthetic_sample("carpet_like", rng=np.random.default_rng(7))
    other, _ = synthetic_sample("carpet_like", rng=8)
    assert np.array_equal(first, again)
    assert np.abs(first.astype(int) - other.astype(int)).mean() > 2


def test_sample_errors() -> None:
    with pytest.raises(ValueError, match="unknown category"):
        synthetic_sample("cable_like")
    with pytest.raises(ValueError, match="unknown defect"):
        synthetic_sample("sand_like", "crack")
    with pytest.raises(ValueError, match="at least 16"):
        synthetic_sample("sand_like", size=8)


# ---------------------------------------------------------------- make_synthetic_dataset


def test_layout_and_counts(tmp_path: Path) -> None:
    root = make_synthetic_dataset(tmp_path / "synth", categories=("sand_like",), **SMALL)
    assert root == tmp_path / "synth"
    base = root / "sand_like"
    assert len(list((base / "train" / "good").glob("*.png"))) == 3
    assert len(list((base / "test" / "good").glob("*.png"))) == 2
    # 4 defective images cycle through the 3 kinds: 2 scratches, 1 stain, 1 missing piece.
    per_defect = {d: len(list((base / "test" / d).glob("*.png"))) for d in DEFECT_TYPES}
    assert per_defect == {"scratch": 2, "stain": 1, "missing": 1}
    for defect, count in per_defect.items():
        masks = sorted((base / "ground_truth" / defect).glob("*_mask.png"))
        assert len(masks) == count


def test_same_seed_gives_identical_bytes(tmp_path: Path) -> None:
    first = make_synthetic_dataset(tmp_path / "a", seed=3, **SMALL)
    second = make_synthetic_dataset(tmp_path / "b", seed=3, **SMALL)
    third = make_synthetic_dataset(tmp_path / "c", seed=4, **SMALL)
    assert _tree_bytes(first) == _tree_bytes(second)
    assert _tree_bytes(first) != _tree_bytes(third)


def test_categories_are_independent_of_each_other(tmp_path: Path) -> None:
    alone = make_synthetic_dataset(tmp_path / "a", categories=("bolt_like",), **SMALL)
    together = make_synthetic_dataset(
        tmp_path / "b", categories=("carpet_like", "bolt_like"), **SMALL
    )
    assert _tree_bytes(alone / "bolt_like") == _tree_bytes(together / "bolt_like")


def test_masks_non_empty_exactly_for_defective_images(tmp_path: Path) -> None:
    root = make_synthetic_dataset(tmp_path, categories=SYNTHETIC_CATEGORIES, **SMALL)
    test = AnomalyFolder(root, split="test", image_size=32)
    assert test.categories == sorted(SYNTHETIC_CATEGORIES)
    assert test.labels.count(0) == 3 * 2 and test.labels.count(1) == 3 * 4
    for sample in test.samples:
        if sample.label:
            assert load_mask(sample.mask_path).any(), sample.path
        else:
            assert sample.mask_path is None
    item = test[test.labels.index(1)]
    assert item["mask"].sum() > 0 and item["image"].shape == (3, 32, 32)
    assert len(AnomalyFolder(root, split="train", image_size=32)) == 3 * 3


def test_existing_output_needs_overwrite(tmp_path: Path) -> None:
    make_synthetic_dataset(tmp_path, categories=("sand_like",), **SMALL)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        make_synthetic_dataset(tmp_path, categories=("sand_like",), **SMALL)
    stale = tmp_path / "sand_like" / "test" / "stain" / "099.png"
    stale.write_bytes(b"left over")
    make_synthetic_dataset(tmp_path, categories=("sand_like",), overwrite=True, **SMALL)
    assert not stale.exists()


def test_dataset_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown names"):
        make_synthetic_dataset(tmp_path, categories=("nope",))
    with pytest.raises(ValueError, match="unknown names"):
        make_synthetic_dataset(tmp_path, categories="sand_like")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown names"):
        make_synthetic_dataset(tmp_path, defect_types=("crack",))
    with pytest.raises(ValueError, match="negative"):
        make_synthetic_dataset(tmp_path, n_train=-1)
    with pytest.raises(ValueError, match="at least 16"):
        make_synthetic_dataset(tmp_path, image_size=8)
