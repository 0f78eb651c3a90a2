"""AnomalyEvaluator and format_table."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cncad import evaluation
from cncad.evaluation import (
    AUPRO,
    I_AP,
    I_AUROC,
    I_F1_MAX,
    IMAGE_METRICS,
    METRIC_NAMES,
    N_IMAGES,
    P_AP,
    P_AUROC,
    P_F1_MAX,
    PIXEL_METRICS,
    AnomalyEvaluator,
    format_table,
)
from cncad.metrics import aupro, image_metrics, pixel_metrics

CATEGORIES = ("bottle", "cable", "screw")


def make_test_set(
    rng: np.random.Generator, n_images: int = 36, size: int = 16
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Scores, labels, maps, masks and shuffled categories of a small test set."""
    labels = rng.random(n_images) < 0.5
    labels[:6] = [True, False] * 3  # every category gets both classes
    masks = np.zeros((n_images, size, size), dtype=np.uint8)
    for index in np.flatnonzero(labels):
        row, col = rng.integers(0, size - 6, 2)
        masks[index, row : row + rng.integers(2, 6), col : col + rng.integers(2, 6)] = 1
    maps = (rng.integers(0, 25, masks.shape) + 6 * masks).astype(np.float32)
    scores = maps.max(axis=(1, 2)) + rng.integers(0, 3, n_images)
    categories = [CATEGORIES[i % 3] for i in range(n_images)]
    return scores, labels, maps, masks, categories


def feed(evaluator: AnomalyEvaluator, data: tuple, batch_size: int = 5) -> None:
    scores, labels, maps, masks, categories = data
    for start in range(0, len(scores), batch_size):
        batch = slice(start, start + batch_size)
        evaluator.update(scores[batch], labels[batch], maps[batch], masks[batch], categories[batch])


def expected_row(data: tuple, category: str, **pixel_options) -> dict[str, float]:
    scores, labels, maps, masks, categories = data
    rows = np.array(categories) == category
    image = image_metrics(scores[rows], labels[rows])
    pixel = pixel_metrics(maps[rows], masks[rows], **pixel_options)
    return {
        I_AUROC: image.auroc,
        I_AP: image.ap,
        I_F1_MAX: image.f1_max,
        P_AUROC: pixel.auroc,
        P_AP: pixel.ap,
        P_F1_MAX: pixel.f1_max,
        AUPRO: pixel.aupro,
        N_IMAGES: int(rows.sum()),
    }


def test_metric_name_constants() -> None:
    assert METRIC_NAMES == ("I-AUROC", "P-AUROC", "AUPRO", "I-AP", "P-AP", "I-F1max", "P-F1max")
    assert set(IMAGE_METRICS) | set(PIXEL_METRICS) == set(METRIC_NAMES)


def test_per_category_and_mean_equal_the_metric_functions() -> None:
    data = make_test_set(np.random.default_rng(0))
    evaluator = AnomalyEvaluator()
    feed(evaluator, data)
    results = evaluator.compute()

    assert list(results["per_category"]) == list(CATEGORIES)
    for category in CATEGORIES:
        assert results["per_category"][category] == expected_row(data, category)
    for metric in METRIC_NAMES:
        per_category = [results["per_category"][c][metric] for c in CATEGORIES]
        assert results["mean"][metric] == pytest.approx(np.mean(per_category), abs=1e-15)
    assert results["mean"][N_IMAGES] == len(data[0]) == len(evaluator)
    assert evaluator.categories == CATEGORIES


def test_results_do_not_depend_on_batching_or_repeated_compute() -> None:
    data = make_test_set(np.random.default_rng(1))
    one_by_one, all_at_once = AnomalyEvaluator(), AnomalyEvaluator()
    feed(one_by_one, data, batch_size=1)
    feed(all_at_once, data, batch_size=len(data[0]))
    first = one_by_one.compute()
    assert first == all_at_once.compute()
    assert one_by_one.compute() == first


def make_odd_test_set(
    rng: np.random.Generator, n_images: int, height: int, width: int, category: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Like ``make_test_set`` with ``height x width`` maps, tied scores, touching blobs."""
    labels = rng.random(n_images) < 0.5
    labels[:2] = [True, False]
    masks = np.zeros((n_images, height, width), dtype=bool)
    for index in np.flatnonzero(labels):
        for _ in range(rng.integers(1, 4)):
            row, col = rng.integers(0, height - 3), rng.integers(0, width - 3)
            masks[index, row : row + rng.integers(1, 9), col : col + rng.integers(1, 9)] = True
    masks[0, -2:, -2:] = True  # the last pixel sits in the padding byte of the packed row
    maps = (rng.integers(0, 40, masks.shape) + 9 * masks).astype(np.float32)
    scores = maps.max(axis=(1, 2)) + rng.integers(0, 3, n_images)
    return scores, labels, maps, masks, [category] * n_images


@pytest.mark.parametrize("map_dtype", [np.float32, np.float16])
def test_compact_storage_gives_bit_identical_metrics(
    monkeypatch: pytest.MonkeyPatch, map_dtype: type[np.floating]
) -> None:
    # Slabs of at most 5 odd-sized maps: batches straddle slabs, slabs grow 3, 5, 5, ...
    monkeypatch.setattr(evaluation, "_SLAB_BYTES", 5 * 37 * 53 * np.dtype(map_dtype).itemsize)
    rng = np.random.default_rng(10)
    odd = make_odd_test_set(rng, 23, 37, 53, "odd")
    square = make_test_set(rng, n_images=18, size=16)
    evaluator = AnomalyEvaluator(map_dtype=map_dtype)
    feed(evaluator, square, batch_size=3)
    feed(evaluator, odd, batch_size=3)
    results = evaluator.compute()

    for data, category in [(odd, "odd"), *((square, c) for c in CATEGORIES)]:
        scores, labels, maps, masks, categories = data
        reference = (scores, labels, maps.astype(map_dtype), masks, categories)
        assert results["per_category"][category] == expected_row(reference, category)
    assert evaluator.compute() == results


def test_update_after_compute_equals_one_pass() -> None:
    rng = np.random.default_rng(11)
    data = make_odd_test_set(rng, 30, 37, 53, "odd")
    in_two_parts, in_one = AnomalyEvaluator(), AnomalyEvaluator()
    scores, labels, maps, masks, categories = data
    in_two_parts.update(scores[:12], labels[:12], maps[:12], masks[:12], categories[:12])
    in_two_parts.compute()
    in_two_parts.update(scores[12:], labels[12:], maps[12:], masks[12:], categories[12:])
    feed(in_one, data, batch_size=7)
    results = in_two_parts.compute()
    assert results == in_one.compute()
    assert results["per_category"]["odd"] == expected_row(data, "odd")


def test_masks_are_stored_one_bit_per_pixel() -> None:
    rng = np.random.default_rng(12)
    scores, labels, maps, masks, categories = make_odd_test_set(rng, 6, 37, 53, "odd")
    evaluator = AnomalyEvaluator()
    evaluator.update(scores, labels, maps, masks, categories)
    stored = evaluator._buffers["odd"]
    packed, kept_maps = stored.masks.first(), stored.maps.first()
    assert packed.dtype == np.uint8 and packed.shape == (6, (37 * 53 + 7) // 8)
    unpacked = np.unpackbits(packed, axis=1, count=37 * 53).reshape(masks.shape)
    np.testing.assert_array_equal(unpacked.view(bool), masks)
    assert kept_maps.dtype == np.float32
    np.testing.assert_array_equal(kept_maps, maps)


def test_rejected_batch_is_not_kept() -> None:
    evaluator = AnomalyEvaluator()
    with pytest.raises(ValueError, match="strings"):
        evaluator.update(
            np.zeros(2), np.zeros(2), np.zeros((2, 4, 4)), np.zeros((2, 4, 4)), ["a", 3]
        )
    assert len(evaluator) == 0 and evaluator.categories == ()


def test_aupro_options_are_forwarded() -> None:
    data = make_test_set(np.random.default_rng(2))
    evaluator = AnomalyEvaluator(aupro_fpr_limit=0.1, aupro_num_thresholds=50)
    feed(evaluator, data)
    results = evaluator.compute()
    _, _, maps, masks, categories = data
    rows = np.array(categories) == "cable"
    expected = aupro(maps[rows], masks[rows], fpr_limit=0.1, num_thresholds=50)
    assert results["per_category"]["cable"][AUPRO] == expected
    assert expected != aupro(maps[rows], masks[rows])


def test_single_class_category_is_nan_and_left_out_of_the_mean() -> None:
    data = make_test_set(np.random.default_rng(3))
    evaluator = AnomalyEvaluator()
    feed(evaluator, data)
    rng = np.random.default_rng(4)
    evaluator.update(
        rng.random(4), np.zeros(4), rng.random((4, 16, 16)), np.zeros((4, 16, 16)), ["good"] * 4
    )
    results = evaluator.compute()

    good = results["per_category"]["good"]
    assert all(math.isnan(good[metric]) for metric in METRIC_NAMES)
    assert good[N_IMAGES] == 4
    for metric in METRIC_NAMES:
        defined = [results["per_category"][c][metric] for c in CATEGORIES]
        assert results["mean"][metric] == pytest.approx(np.mean(defined), abs=1e-15)
    assert results["mean"][N_IMAGES] == len(data[0]) + 4


def test_all_anomalous_category_keeps_pixel_metrics() -> None:
    rng = np.random.default_rng(5)
    maps = rng.random((3, 8, 8))
    masks = np.zeros((3, 8, 8), dtype=bool)
    masks[:, 2:4, 2:4] = True
    evaluator = AnomalyEvaluator()
    evaluator.update(rng.random(3), np.ones(3), maps, masks, ["pill"] * 3)
    row = evaluator.compute()["per_category"]["pill"]
    assert all(math.isnan(row[metric]) for metric in IMAGE_METRICS)
    assert row[P_AUROC] == pixel_metrics(maps, masks).auroc


def test_metric_undefined_everywhere_gives_nan_mean() -> None:
    evaluator = AnomalyEvaluator()
    evaluator.update(np.ones(2), np.zeros(2), np.ones((2, 4, 4)), np.zeros((2, 4, 4)), ["a", "b"])
    mean = evaluator.compute()["mean"]
    assert all(math.isnan(mean[metric]) for metric in METRIC_NAMES)
    assert mean[N_IMAGES] == 2


def test_torch_inputs_and_float16_storage() -> None:
    data = make_test_set(np.random.default_rng(6))
    scores, labels, maps, masks, categories = data
    evaluator = AnomalyEvaluator(map_dtype=np.float16)
    evaluator.update(
        torch.from_numpy(scores),
        torch.from_numpy(labels).long(),
        torch.from_numpy(maps).double(),
        torch.from_numpy(masks).bool(),
        categories,
    )
    results = evaluator.compute()
    half_maps = maps.astype(np.float16)
    for category in CATEGORIES:
        expected = expected_row((scores, labels, half_maps, masks, categories), category)
        assert results["per_category"][category] == expected


def test_reset_forgets_everything() -> None:
    evaluator = AnomalyEvaluator()
    feed(evaluator, make_test_set(np.random.default_rng(7)))
    evaluator.reset()
    assert len(evaluator) == 0 and evaluator.categories == ()
    with pytest.raises(ValueError, match="no data"):
        evaluator.compute()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"labels": np.zeros(3)}, "batch of 4"),
        ({"maps": np.zeros((3, 8, 8))}, "batch of 4"),
        ({"masks": np.zeros((4, 8, 9))}, "same shape"),
        ({"categories": ["a"] * 3}, "batch of 4"),
        ({"categories": ["a", "a", 3, "a"]}, "strings"),
        ({"scores": np.full(4, np.nan)}, "NaN"),
        ({"maps": np.full((4, 8, 8), np.inf)}, "NaN"),
        ({"labels": np.full(4, 2)}, "binary"),
        ({"maps": np.zeros((4, 8))}, r"\(N, H, W\)"),
    ],
)
def test_update_errors(change: dict, message: str) -> None:
    batch = {
        "scores": np.zeros(4),
        "labels": np.array([0, 1, 0, 1]),
        "maps": np.zeros((4, 8, 8)),
        "masks": np.zeros((4, 8, 8)),
        "categories": ["a"] * 4,
    }
    batch.update(change)
    with pytest.raises(ValueError, match=message):
        AnomalyEvaluator().update(**batch)


def test_map_size_must_stay_the_same_within_a_category() -> None:
    evaluator = AnomalyEvaluator()
    evaluator.update(np.zeros(1), np.zeros(1), np.zeros((1, 8, 8)), np.zeros((1, 8, 8)), ["a"])
    evaluator.update(np.zeros(1), np.zeros(1), np.zeros((1, 4, 4)), np.zeros((1, 4, 4)), ["b"])
    with pytest.raises(ValueError, match="size"):
        evaluator.update(np.zeros(1), np.zeros(1), np.zeros((1, 4, 4)), np.zeros((1, 4, 4)), ["a"])


def test_float16_overflow_is_reported() -> None:
    evaluator = AnomalyEvaluator(map_dtype=np.float16)
    with pytest.raises(ValueError, match="overflow"):
        evaluator.update(
            np.zeros(1), np.zeros(1), np.full((1, 2, 2), 1e6), np.zeros((1, 2, 2)), "a"
        )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"aupro_fpr_limit": 0.0}, "fpr_limit"),
        ({"aupro_num_thresholds": 1}, "at least 2"),
        ({"map_dtype": np.float64}, "map_dtype"),
    ],
)
def test_constructor_errors(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AnomalyEvaluator(**options)


def test_format_table() -> None:
    nan = float("nan")
    results = {
        "per_category": {
            "bottle": dict.fromkeys(METRIC_NAMES, 1.0) | {N_IMAGES: 83},
            "metal_nut": dict.fromkeys(METRIC_NAMES, 0.98765) | {I_AUROC: nan, N_IMAGES: 115},
        },
        "mean": dict.fromkeys(METRIC_NAMES, 0.993825) | {I_AUROC: 1.0, N_IMAGES: 198},
    }
    expected = "\n".join(
        [
            "Category   I-AUROC  P-AUROC  AUPRO   I-AP   P-AP  I-F1max  P-F1max  Images",
            "--------------------------------------------------------------------------",
            "bottle       100.0    100.0  100.0  100.0  100.0    100.0    100.0      83",
            "metal_nut        -     98.8   98.8   98.8   98.8     98.8     98.8     115",
            "--------------------------------------------------------------------------",
            "Mean         100.0     99.4   99.4   99.4   99.4     99.4     99.4     198",
        ]
    )
    assert format_table(results) == expected


def test_format_table_of_computed_results() -> None:
    evaluator = AnomalyEvaluator()
    feed(evaluator, make_test_set(np.random.default_rng(8)))
    results = evaluator.compute()
    table = format_table(results, metrics=(I_AUROC, AUPRO))
    lines = table.splitlines()
    assert lines[0].split() == ["Category", I_AUROC, AUPRO, "Images"]
    assert [line.split()[0] for line in lines[2:5]] == list(CATEGORIES)
    assert lines[-1].split()[2] == f"{100 * results['mean'][AUPRO]:.1f}"


# ------------------------------------------------------------------ unknown masks


def _feed_with_known(evaluator: AnomalyEvaluator, data: tuple, known: np.ndarray) -> None:
    scores, labels, maps, masks, categories = data
    for start in range(0, len(scores), 5):
        rows = slice(start, start + 5)
        evaluator.update(
            scores[rows], labels[rows], maps[rows], masks[rows], categories[rows], known[rows]
        )


def test_categories_with_unknown_masks_get_image_metrics_and_none_pixel_metrics() -> None:
    data = make_test_set(np.random.default_rng(4))
    scores, labels, _, _, categories = data
    # "cable" lacks the mask of one defective image; the others have all of theirs.
    known = np.ones(len(scores), dtype=bool)
    known[next(i for i in np.flatnonzero(labels) if categories[i] == "cable")] = False
    evaluator = AnomalyEvaluator()
    _feed_with_known(evaluator, data, known)
    with pytest.warns(UserWarning, match=r"are None .* 'cable' \(1 of 12 images\)") as caught:
        results = evaluator.compute()
    assert len(caught) == 1 and "\n" not in str(caught[0].message)
    cable = results["per_category"]["cable"]
    assert all(cable[m] is None for m in PIXEL_METRICS)
    assert {m: cable[m] for m in IMAGE_METRICS} == {
        m: expected_row(data, "cable")[m] for m in IMAGE_METRICS
    }
    # The categories with every mask keep their pixel metrics; the mean has none.
    assert results["per_category"]["bottle"] == expected_row(data, "bottle")
    assert all(results["mean"][m] is None for m in PIXEL_METRICS)
    image_mean = np.mean([results["per_category"][c][I_AUROC] for c in CATEGORIES])
    assert results["mean"][I_AUROC] == pytest.approx(image_mean, abs=1e-15)
    assert evaluator.images_without_mask == {"cable": 1}
    table = format_table(results)
    cable_line = next(line for line in table.splitlines() if line.startswith("cable"))
    cells = dict(zip(METRIC_NAMES, cable_line.split()[1:], strict=False))
    assert [metric for metric, cell in cells.items() if cell == "n/a"] == [
        P_AUROC,
        AUPRO,
        P_AP,
        P_F1_MAX,
    ]


def test_unknown_masks_free_the_stored_pixels_and_stay_unknown() -> None:
    data = make_test_set(np.random.default_rng(5))
    scores, labels, maps, masks, _ = data
    evaluator = AnomalyEvaluator()
    evaluator.update(scores[:4], labels[:4], maps[:4], masks[:4], ["a"] * 4)
    assert len(evaluator._buffers["a"].maps) == 4
    evaluator.update(scores[4:8], labels[4:8], maps[4:8], masks[4:8], ["a"] * 4, [0, 1, 1, 1])
    evaluator.update(scores[8:], labels[8:], maps[8:], masks[8:], ["a"] * (len(scores) - 8))
    assert len(evaluator._buffers["a"].maps) == 0 and evaluator._buffers["a"].n_pixels == 0
    with pytest.warns(UserWarning):
        row = evaluator.compute()["per_category"]["a"]
    assert row[P_AUROC] is None and row[N_IMAGES] == len(scores)
    assert row[I_AUROC] == pytest.approx(image_metrics(scores, labels).auroc)


def test_has_mask_is_validated() -> None:
    data = make_test_set(np.random.default_rng(6))
    scores, labels, maps, masks, categories = (item[:4] for item in data)
    evaluator = AnomalyEvaluator()
    with pytest.raises(ValueError, match="has_mask must be binary"):
        evaluator.update(scores, labels, maps, masks, categories, [0, 1, 2, 1])
    with pytest.raises(ValueError, match="'has_mask': 3"):
        evaluator.update(scores, labels, maps, masks, categories, [1, 1, 1])
    assert len(evaluator) == 0
    evaluator.update(scores, labels, maps, masks, categories, torch.ones(4, dtype=torch.bool))
    assert evaluator.images_without_mask == {}


def test_decisions_count_what_the_threshold_flags() -> None:
    data = make_test_set(np.random.default_rng(7))
    scores, labels, _, _, categories = data
    evaluator = AnomalyEvaluator()
    feed(evaluator, data)
    decided = evaluator.decisions(20.0, per_category={"screw": 25.0, "unknown": 1.0})
    total = np.zeros(4, dtype=int)
    for name in CATEGORIES:
        rows = np.array(categories) == name
        threshold = 25.0 if name == "screw" else 20.0
        flagged, defective = scores[rows] >= threshold, labels[rows]
        counts = [
            (~defective).sum(),
            (flagged & ~defective).sum(),
            defective.sum(),
            (flagged & defective).sum(),
        ]
        total += counts
        row = decided["per_category"][name]
        assert row["threshold"] == threshold
        assert [
            row[k] for k in ("normal_images", "false_alarms", "defective_images", "detected")
        ] == counts
        assert row["FPR"] == pytest.approx(counts[1] / counts[0])
        assert row["recall"] == pytest.approx(counts[3] / counts[2])
        precision = counts[3] / (counts[1] + counts[3]) if counts[1] + counts[3] else math.nan
        assert row["precision"] == pytest.approx(precision, nan_ok=True)
        f1 = 2 * counts[3] / (counts[1] + counts[3] + counts[2])
        assert row["F1"] == pytest.approx(f1)
    assert decided["total"]["threshold"] is None  # the categories' thresholds differ
    assert decided["total"]["false_alarms"] == total[1] and decided["total"]["detected"] == total[3]
    assert evaluator.decisions(20.0)["total"]["threshold"] == 20.0


def test_decisions_validate_and_handle_empty_classes() -> None:
    evaluator = AnomalyEvaluator()
    with pytest.raises(ValueError, match="no data"):
        evaluator.decisions(1.0)
    maps = np.zeros((2, 4, 4), dtype=np.float32)
    evaluator.update(np.array([0.2, 0.9]), np.array([0, 0]), maps, maps, ["all", "all"])
    row = evaluator.decisions(0.5)["total"]
    assert (row["false_alarms"], row["FPR"]) == (1, 0.5)
    assert math.isnan(row["recall"]) and row["precision"] == 0.0 and row["F1"] == 0.0
    for bad in (math.nan, "0.5", True):
        with pytest.raises(ValueError, match="threshold of 'all' must be"):
            evaluator.decisions(bad)  # type: ignore[arg-type]
