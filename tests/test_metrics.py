"""cncad.metrics against scikit-learn and slow, obviously correct reference implementations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_auc_score

from cncad.metrics import (
    aupro,
    image_ap,
    image_auroc,
    image_f1_max,
    image_metrics,
    pixel_ap,
    pixel_auroc,
    pixel_f1_max,
    pixel_metrics,
)

EIGHT_CONNECTED = np.ones((3, 3), dtype=int)


# --------------------------------------------------------------------------- references
def brute_force_f1_max(scores: np.ndarray, labels: np.ndarray) -> float:
    """Max F1 over every distinct score used as threshold (score >= t is anomalous)."""
    labels = labels.astype(bool)
    best = 0.0
    for threshold in np.unique(scores):
        predicted = scores >= threshold
        tp = np.sum(predicted & labels)
        fp = np.sum(predicted & ~labels)
        fn = np.sum(~predicted & labels)
        best = max(best, 2 * tp / (2 * tp + fp + fn))
    return best


def regions_of(masks: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """(image index, boolean region mask) for every 8-connected ground-truth region."""
    regions = []
    for index, mask in enumerate(masks > 0):
        labelled, count = ndimage.label(mask, structure=EIGHT_CONNECTED)
        regions.extend((index, labelled == k) for k in range(1, count + 1))
    return regions


def integrate_up_to(fprs: list[float], pros: list[float], limit: float) -> float:
    """Trapezoid area under a curve sorted by FPR, cut at ``limit`` by interpolation."""
    area = 0.0
    for x0, x1, y0, y1 in zip(fprs[:-1], fprs[1:], pros[:-1], pros[1:], strict=True):
        if x0 >= limit:
            break
        if x1 <= limit:
            area += (x1 - x0) * (y0 + y1) / 2
        else:
            y_limit = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            area += (limit - x0) * (y0 + y_limit) / 2
            break
    return area


def reference_aupro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float) -> float:
    """Every distinct score as a threshold, PRO = mean over regions of the overlap."""
    regions = regions_of(masks)
    normal = masks <= 0
    fprs, pros = [0.0], [0.0]
    for threshold in np.unique(maps)[::-1]:
        predicted = maps >= threshold
        fprs.append(np.sum(predicted & normal) / np.sum(normal))
        pros.append(np.mean([predicted[i][region].mean() for i, region in regions]))
    return integrate_up_to(fprs, pros, fpr_limit) / fpr_limit


def reference_grid_aupro(
    maps: np.ndarray, masks: np.ndarray, fpr_limit: float, num_thresholds: int
) -> float:
    """The literal RD4AD loop: binarise all maps per threshold, overlap per region."""
    maps = maps.astype(np.float64)
    regions = regions_of(masks)
    normal = masks <= 0
    low, high = maps.min(), maps.max()
    step = (high - low) / num_thresholds
    fprs, pros = [], []
    for k in range(num_thresholds):
        predicted = maps > low + k * step
        pros.append(np.mean([predicted[i][region].sum() / region.sum() for i, region in regions]))
        fprs.append(np.sum(predicted & normal) / np.sum(normal))
    fprs, pros = np.array(fprs), np.array(pros)
    keep = fprs < fpr_limit
    return auc(fprs[keep] / fprs[keep].max(), pros[keep])


# ------------------------------------------------------------------------------ data
def tied_scores(rng: np.random.Generator, labels: np.ndarray, levels: int = 12) -> np.ndarray:
    """Integer-valued scores (many ties), shifted upwards for positives."""
    scores = rng.integers(0, levels, labels.shape) + 3 * labels
    return scores.astype(np.float32)


def random_pixel_set(
    rng: np.random.Generator, n_images: int = 6, size: int = 24, levels: int = 40
) -> tuple[np.ndarray, np.ndarray]:
    """Maps with ties and masks with several blobs per image and all-normal images."""
    masks = np.zeros((n_images, size, size), dtype=np.uint8)
    for index in range(n_images):
        if index % 3 == 0:
            continue  # all-normal image
        for _ in range(rng.integers(1, 5)):
            row, col = rng.integers(0, size - 5, 2)
            height, width = rng.integers(1, 6, 2)
            masks[index, row : row + height, col : col + width] = 255
        masks[index, 0, 0] = masks[index, 1, 1] = 1  # diagonal neighbours: one region
    maps = rng.integers(0, levels, masks.shape) + rng.integers(0, levels // 2) * (masks > 0)
    return maps.astype(np.float32), masks


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


# ------------------------------------------------------------------------- image level
@pytest.mark.parametrize("seed", range(5))
def test_image_metrics_match_sklearn_and_brute_force_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.random(300) < 0.4
    scores = tied_scores(rng, labels)
    assert image_auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert image_ap(scores, labels) == pytest.approx(
        average_precision_score(labels, scores), abs=1e-12
    )
    assert image_f1_max(scores, labels) == pytest.approx(
        brute_force_f1_max(scores, labels), abs=1e-12
    )
    combined = image_metrics(scores, labels)
    assert combined.auroc == image_auroc(scores, labels)
    assert combined.ap == image_ap(scores, labels)
    assert combined.f1_max == image_f1_max(scores, labels)


def test_image_f1_max_matches_precision_recall_curve() -> None:
    rng = np.random.default_rng(7)
    labels = rng.random(500) < 0.3
    scores = tied_scores(rng, labels, levels=6)
    precision, recall, _ = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall))
    assert image_f1_max(scores, labels) == pytest.approx(f1.max(), abs=1e-12)


def test_image_metrics_known_values() -> None:
    labels = np.array([0, 0, 1, 1])
    assert image_auroc([0.1, 0.2, 0.3, 0.4], labels) == 1.0
    assert image_auroc([0.4, 0.3, 0.2, 0.1], labels) == 0.0
    assert image_auroc([0.5, 0.5, 0.5, 0.5], labels) == 0.5  # all tied: one half
    assert image_ap([0.5, 0.5, 0.5, 0.5], labels) == 0.5  # one threshold: precision 1/2
    # Scores 0.1 0.2 | 0.2 0.4: at t=0.2 TP=2 FP=1 -> F1 = 0.8; at t=0.4 F1 = 2/3.
    assert image_f1_max([0.1, 0.2, 0.2, 0.4], labels) == pytest.approx(0.8)


def test_image_inputs_accept_bool_float_labels_and_integer_scores() -> None:
    scores = np.array([1, 3, 2, 5])
    assert image_auroc(scores, np.array([False, True, False, True])) == 1.0
    assert image_auroc(scores, np.array([0.0, 1.0, 0.0, 1.0])) == 1.0


# ------------------------------------------------------------------------- pixel level
@pytest.mark.parametrize("seed", range(4))
def test_pixel_auroc_ap_match_sklearn_with_ties(seed: int) -> None:
    maps, masks = random_pixel_set(np.random.default_rng(seed))
    flat_labels, flat_scores = (masks > 0).ravel(), maps.ravel()
    assert pixel_auroc(maps, masks) == pytest.approx(
        roc_auc_score(flat_labels, flat_scores), abs=1e-6
    )
    assert pixel_ap(maps, masks) == pytest.approx(
        average_precision_score(flat_labels, flat_scores), abs=1e-6
    )
    assert pixel_f1_max(maps, masks) == pytest.approx(
        brute_force_f1_max(flat_scores, flat_labels), abs=1e-12
    )


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("fpr_limit", [0.05, 0.3, 1.0])
def test_exact_aupro_matches_reference(seed: int, fpr_limit: float) -> None:
    maps, masks = random_pixel_set(np.random.default_rng(seed))
    expected = reference_aupro(maps, masks, fpr_limit)
    assert aupro(maps, masks, fpr_limit=fpr_limit) == pytest.approx(expected, abs=1e-9)


def test_exact_aupro_matches_reference_without_ties(rng: np.random.Generator) -> None:
    _, masks = random_pixel_set(rng, n_images=4, size=16)
    maps = rng.random(masks.shape) + 0.3 * (masks > 0)
    assert aupro(maps, masks) == pytest.approx(reference_aupro(maps, masks, 0.3), abs=1e-9)


@pytest.mark.parametrize("fpr_limit", [0.01, 0.13, 0.3, 0.77])
def test_exact_aupro_with_tie_groups_at_the_crossing(fpr_limit: float) -> None:
    # Scores from five levels: the FPR limit falls inside a group of tied normal pixels
    # that also ties with defect pixels, the case where the crossing is interpolated.
    rng = np.random.default_rng(11)
    _, masks = random_pixel_set(rng, n_images=5, size=12)
    maps = rng.integers(0, 5, size=masks.shape).astype(np.float32) + (masks > 0)
    expected = reference_aupro(maps, masks, fpr_limit)
    assert aupro(maps, masks, fpr_limit=fpr_limit) == pytest.approx(expected, abs=1e-9)
    shared_sort = pixel_metrics(maps, masks, aupro_fpr_limit=fpr_limit).aupro
    assert shared_sort == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("num_thresholds", [200, 17])
def test_grid_aupro_matches_literal_threshold_loop(seed: int, num_thresholds: int) -> None:
    rng = np.random.default_rng(seed)
    _, masks = random_pixel_set(rng, size=20)
    maps = (rng.random(masks.shape) + 0.5 * (masks > 0)).astype(np.float32)
    expected = reference_grid_aupro(maps, masks, 0.3, num_thresholds)
    assert aupro(maps, masks, num_thresholds=num_thresholds) == pytest.approx(expected, abs=1e-9)


def test_aupro_uses_8_connectivity() -> None:
    # One region {(0,0), (1,1), (1,2)} under 8-connectivity (two under 4-connectivity).
    masks = np.array([[[1, 0, 0], [0, 1, 1], [0, 0, 0]]])
    maps = np.array([[[9.0, 1, 2], [3, 0, 0], [4, 5, 6]]])
    # PRO = 1/3 from FPR 0 up to FPR 1, then jumps to 1 at FPR 1: the area is 1/3.
    assert aupro(maps, masks, fpr_limit=1.0) == pytest.approx(1 / 3)
    assert aupro(maps, masks, fpr_limit=0.5) == pytest.approx(1 / 3)


def test_aupro_known_curves() -> None:
    masks = np.zeros((2, 4, 4), dtype=bool)
    masks[0, 1:3, 1:3] = True
    # Constant maps: the curve is the diagonal, area L^2 / 2, normalised L / 2.
    constant = np.ones(masks.shape)
    assert aupro(constant, masks, fpr_limit=0.3) == pytest.approx(0.15)
    assert aupro(constant, masks, fpr_limit=1.0) == pytest.approx(0.5)
    # Perfect separation: PRO is 1 from FPR 0 on.
    assert aupro(masks.astype(float), masks) == pytest.approx(1.0)


def test_pixel_metrics_equals_individual_functions(rng: np.random.Generator) -> None:
    maps, masks = random_pixel_set(rng)
    result = pixel_metrics(maps, masks, aupro_fpr_limit=0.2)
    assert result.auroc == pixel_auroc(maps, masks)
    assert result.ap == pixel_ap(maps, masks)
    assert result.f1_max == pixel_f1_max(maps, masks)
    assert result.aupro == aupro(maps, masks, fpr_limit=0.2)
    grid = pixel_metrics(maps, masks, aupro_num_thresholds=50)
    assert grid.aupro == aupro(maps, masks, num_thresholds=50)


def test_float32_and_float64_maps_give_identical_results(rng: np.random.Generator) -> None:
    maps, masks = random_pixel_set(rng)
    maps = maps - 20  # negative scores too
    zeros = np.flatnonzero(maps == 0)
    maps.flat[zeros[::2]] = -0.0  # -0.0 ties with 0.0
    assert np.signbit(maps).any() and (maps == 0).sum() > 1
    assert pixel_metrics(maps, masks) == pixel_metrics(maps.astype(np.float64), masks)


def test_larger_inputs_with_rounding_ties_match_sklearn() -> None:
    rng = np.random.default_rng(3)
    masks = np.zeros((6, 128, 128), dtype=bool)
    masks[:, 20:60, 30:90] = True
    maps = np.round(rng.normal(size=masks.shape) + masks, 3).astype(np.float32)
    flat_labels, flat_scores = masks.ravel(), maps.ravel()
    assert pixel_auroc(maps, masks) == pytest.approx(
        roc_auc_score(flat_labels, flat_scores), abs=1e-9
    )
    assert pixel_ap(maps, masks) == pytest.approx(
        average_precision_score(flat_labels, flat_scores), abs=1e-9
    )


# ---------------------------------------------------------------------------- tensors
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_torch_inputs(dtype: torch.dtype, rng: np.random.Generator) -> None:
    maps, masks = random_pixel_set(rng, levels=30)  # small integers: exact in every dtype
    labels = (masks > 0).any(axis=(1, 2))
    scores = maps.max(axis=(1, 2))
    maps_t = torch.from_numpy(maps).to(dtype).requires_grad_(dtype != torch.bfloat16)
    masks_t = torch.from_numpy(masks > 0)
    assert pixel_metrics(maps_t, masks_t) == pixel_metrics(maps, masks)
    scores_t = torch.from_numpy(scores).to(dtype)
    assert image_metrics(scores_t, torch.from_numpy(labels)) == image_metrics(scores, labels)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tensor_inputs(rng: np.random.Generator) -> None:
    maps, masks = random_pixel_set(rng)
    result = pixel_metrics(torch.from_numpy(maps).cuda(), torch.from_numpy(masks).cuda())
    assert result == pixel_metrics(maps, masks)


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("scores", "labels", "message"),
    [
        ([0.1, 0.2, 0.3], [0, 1], "same shape"),
        ([0.1, 0.2], [0, 0], "no anomalous"),
        ([0.1, 0.2], [1, 1], "no normal"),
        ([0.1, np.nan], [0, 1], "NaN or infinite"),
        ([0.1, np.inf], [0, 1], "NaN or infinite"),
        ([-np.inf, 0.1], [0, 1], "NaN or infinite"),
        ([[0.1, 0.2]], [0, 1], r"shape \(N,\)"),
        ([0.1, 0.2], [[0, 1]], r"shape \(N,\)"),
        ([0.1, 0.2], [0, 2], "binary"),
        (["a", "b"], [0, 1], "real numbers"),
    ],
)
@pytest.mark.parametrize("function", [image_auroc, image_ap, image_f1_max, image_metrics])
def test_image_errors(function, scores, labels, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        function(np.asarray(scores), np.asarray(labels))


def test_pixel_errors() -> None:
    maps = np.random.default_rng(0).random((2, 4, 4))
    masks = np.zeros((2, 4, 4))
    masks[0, 1, 1] = 1
    cases = [
        (maps, masks[:1], "same shape"),
        (maps[0], masks[0], r"shape \(N, H, W\)"),
        (maps, masks[..., None], r"shape \(N, H, W\)"),
        (np.where(masks > 0, np.nan, maps), masks, "NaN or infinite"),
        (maps, np.zeros_like(masks), "no anomalous pixel"),
        (maps, np.ones_like(masks), "no normal pixel"),
    ]
    for function in (pixel_auroc, pixel_ap, pixel_f1_max, aupro, pixel_metrics):
        for bad_maps, bad_masks, message in cases:
            with pytest.raises(ValueError, match=message):
                function(bad_maps, bad_masks)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"fpr_limit": 0.0}, "fpr_limit"),
        ({"fpr_limit": 1.5}, "fpr_limit"),
        ({"num_thresholds": 1}, "at least 2"),
        ({"num_thresholds": 2.5}, "int or None"),
        ({"num_thresholds": True}, "int or None"),
    ],
)
def test_aupro_option_errors(options: dict, message: str) -> None:
    maps, masks = random_pixel_set(np.random.default_rng(0))
    with pytest.raises(ValueError, match=message):
        aupro(maps, masks, **options)


def test_grid_aupro_rejects_degenerate_curve() -> None:
    masks = np.zeros((1, 4, 4), dtype=bool)
    masks[0, 0, 0] = True
    with pytest.raises(ValueError, match="fewer than two points"):
        aupro(np.ones((1, 4, 4)), masks, num_thresholds=200)


def test_masks_are_binarised_as_positive() -> None:
    maps, masks = random_pixel_set(np.random.default_rng(5))
    soft = masks.astype(np.float32) / 255.0 * 0.7  # e.g. resized masks: any value > 0
    soft[masks == 0] = -0.2  # non-positive values are normal
    assert pixel_metrics(maps, soft) == pixel_metrics(maps, masks > 0)


def test_grid_aupro_keeps_only_fpr_strictly_below_limit() -> None:
    # Normal pixels 0..9 and two one-pixel regions scoring 10 and 6.5 (one per image):
    # on the grid 0, 1, ..., 9 the threshold 6 has FPR exactly 0.3 and is dropped
    # (RD4AD keeps FPR < limit); keeping it would give 0.583 instead of 0.5.
    maps = np.array([[[0, 1, 2], [3, 4, 10]], [[5, 6, 7], [8, 9, 6.5]]])
    masks = np.zeros(maps.shape, dtype=bool)
    masks[:, 1, 2] = True
    assert reference_grid_aupro(maps, masks, 0.3, 10) == pytest.approx(0.5)
    assert aupro(maps, masks, num_thresholds=10) == pytest.approx(0.5, abs=1e-12)


def test_grid_thresholds_compare_in_float64() -> None:
    # Normal pixels planted at float32(t_k): about half of them round above t_k and so
    # are false positives at t_k when compared in float64, as the literal loop does.
    rng = np.random.default_rng(11)
    _, masks = random_pixel_set(rng, size=20)
    maps = (rng.random(masks.shape) * 0.8 + 0.2 * (masks > 0)).astype(np.float32)
    maps.flat[0], maps.flat[1] = 0.0, 1.0
    normal = np.flatnonzero(masks.ravel() == 0)[2:]
    planted = np.float32(np.arange(150, 200) / 200)
    maps.flat[normal[: planted.size * 4]] = np.repeat(planted, 4)
    expected = reference_grid_aupro(maps, masks, 0.3, 200)
    assert maps.dtype == np.float32
    assert aupro(maps, masks, num_thresholds=200) == pytest.approx(expected, abs=1e-12)
