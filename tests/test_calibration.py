"""Calibration: threshold math against brute force, normalisation, and the detector's use."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.utils.data import Subset

from cncad import CNCDetector
from cncad.calibration import (
    Calibration,
    CalibrationError,
    PixelHistogram,
    ScoreNormalization,
    calibrate_arrays,
    check_target_fpr,
    f1_threshold,
    fpr_threshold,
    required_normal_images,
)
from cncad.checkpoint import content_checksum, read_detector_file, write_detector_file
from cncad.data import AnomalyFolder, make_synthetic_dataset
from cncad.errors import ModelFileError


# ---------------------------------------------------------------- brute-force transcriptions
def brute_fpr(values: np.ndarray, target_fpr: float) -> float:
    """The smallest observed value t with  #(values >= t) / n <= target_fpr, else above max."""
    n = len(values)
    for t in sorted(set(values.tolist())):
        if np.sum(values >= t) / n <= target_fpr:
            return t
    return math.inf


def brute_f1(values: np.ndarray, labels: np.ndarray) -> float:
    """The largest observed t among those with the best F1 of ``values >= t``."""
    best, best_t = -1.0, None
    for t in sorted(set(values.tolist())):
        pred = values >= t
        tp = np.sum(pred & (labels == 1))
        fp = np.sum(pred & (labels == 0))
        fn = np.sum(~pred & (labels == 1))
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn)
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        if f1 >= best - 1e-12:
            best, best_t = max(f1, best), t
    return best_t


def halfway_down(threshold: float, values: np.ndarray) -> float:
    """The float32 half way between ``threshold`` and the largest value below it."""
    below = [v for v in values.tolist() if v < threshold]
    if not below:
        return threshold
    return float(np.float32((max(below) + threshold) / 2))


def table(values: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    candidates, inverse = np.unique(values, return_inverse=True)
    neg = np.bincount(inverse[labels == 0], minlength=len(candidates))
    pos = np.bincount(inverse[labels == 1], minlength=len(candidates))
    return candidates, neg, pos


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("target_fpr", [0.05, 0.1, 0.25, 0.5])
def test_fpr_threshold_matches_brute_force_with_ties(seed: int, target_fpr: float) -> None:
    rng = np.random.default_rng(seed)
    values = rng.integers(0, 8, size=rng.integers(20, 40)).astype(np.float64)  # many ties
    candidates, neg, _ = table(values, np.zeros(len(values), dtype=int))
    got = fpr_threshold(candidates, neg, target_fpr, above=math.inf)
    assert got == brute_fpr(values, target_fpr)
    assert np.mean(values >= got) <= target_fpr


def test_fpr_threshold_ties_at_the_top_go_above_the_maximum() -> None:
    values = np.array([1.0, 2.0, 3.0, 3.0, 3.0])
    candidates, neg, _ = table(values, np.zeros(5, dtype=int))
    # 3 of 5 tie at the top: no observed value keeps the rate <= 0.2
    assert fpr_threshold(candidates, neg, 0.2, above=3.5) == 3.5


def test_fpr_threshold_exact_fraction_is_allowed() -> None:
    values = np.arange(10, dtype=np.float64)
    candidates, neg, _ = table(values, np.zeros(10, dtype=int))
    # 0.3 * 10 = 3 alarms allowed (7, 8, 9), despite 0.3 * 10 != 3 in floating point
    assert fpr_threshold(candidates, neg, 0.3, above=math.inf) == 7.0


@pytest.mark.parametrize("seed", range(10))
def test_f1_threshold_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(10, 30))
    labels = rng.integers(0, 2, size=n)
    labels[0] = 1
    values = (rng.integers(0, 6, size=n) + 2 * labels).astype(np.float64)  # ties, overlap
    candidates, neg, pos = table(values, labels)
    assert f1_threshold(candidates, neg, pos) == brute_f1(values, labels)


def test_f1_threshold_separable_data_picks_the_lowest_anomaly() -> None:
    values = np.array([0.1, 0.2, 0.3, 0.7, 0.9])
    labels = np.array([0, 0, 0, 1, 1])
    assert f1_threshold(*table(values, labels)) == 0.7


def test_threshold_functions_refuse_missing_classes() -> None:
    with pytest.raises(CalibrationError, match="no normal"):
        fpr_threshold(np.array([1.0]), np.array([0]), 0.1, above=2.0)
    with pytest.raises(CalibrationError, match="no anomalous"):
        f1_threshold(np.array([1.0]), np.array([3]), np.array([0]))


# ---------------------------------------------------------------- pixel histogram
def test_pixel_histogram_counts_are_exact_at_its_candidates() -> None:
    rng = np.random.default_rng(0)
    values = np.concatenate(
        [rng.normal(1.0, 0.5, 5000), -rng.random(200), [0.0, -0.0, 1e-30]]
    ).astype(np.float32)
    histogram = PixelHistogram()
    histogram.add(values[:3000], 0)
    histogram.add(values[3000:], 0)
    candidates, counts, above = histogram.table()
    assert np.all(np.diff(candidates) > 0)
    assert above > values.max()
    at_or_above = np.cumsum(counts[0][::-1])[::-1]
    for i in rng.integers(0, len(candidates), 50):
        assert at_or_above[i] == np.sum(values >= np.float32(candidates[i]))
    # every value lies at most 2**-11 (relative) above its bin's lower edge
    edges = candidates[np.searchsorted(candidates, values, side="right") - 1]
    assert np.all(edges <= values)
    slack = np.maximum(np.abs(values), np.abs(edges)) * 2**-11 + 1e-37
    assert np.all(values - edges <= slack)
    assert histogram.low == values.min() and histogram.high == values.max()


def test_pixel_fpr_threshold_is_close_to_the_exact_quantile() -> None:
    rng = np.random.default_rng(1)
    values = rng.gamma(2.0, 1.0, 100_000).astype(np.float32)
    histogram = PixelHistogram()
    histogram.add(values, 0)
    candidates, counts, above = histogram.table()
    t = fpr_threshold(candidates, counts[0], 0.01, above)
    assert np.mean(values >= np.float32(t)) <= 0.01
    exact = brute_fpr_sorted(values, 0.01)
    assert abs(t - exact) <= exact * 2**-11


def brute_fpr_sorted(values: np.ndarray, target_fpr: float) -> float:
    ordered = np.sort(values)[::-1]
    k = int(np.floor(len(values) * target_fpr))
    return float(ordered[k - 1]) if ordered[k] < ordered[k - 1] else math.nan


def test_pixel_histogram_merge_equals_one_histogram() -> None:
    rng = np.random.default_rng(2)
    a, b = rng.random(1000).astype(np.float32), (rng.random(500) * 50).astype(np.float32)
    one, left, right = PixelHistogram(), PixelHistogram(), PixelHistogram()
    one.add(a, 0)
    one.add(b, 2)
    left.add(a, 0)
    right.add(b, 2)
    left.merge(right)
    for x, y in zip(one.table(), left.table(), strict=True):
        np.testing.assert_array_equal(x, y)


def test_pixel_histogram_refuses_non_finite() -> None:
    with pytest.raises(ValueError, match="NaN"):
        PixelHistogram().add(np.array([1.0, np.nan]), 0)


# ---------------------------------------------------------------- normalisation
def test_normalisation_is_monotone_with_half_at_threshold() -> None:
    norm = ScoreNormalization(threshold=1.5, low=0.25, high=4.0)
    x = np.linspace(-10, 10, 2001)
    y = norm(x)
    assert np.all(np.diff(y) >= 0) and y.min() == 0.0 and y.max() == 1.0
    assert norm(1.5) == 0.5
    assert np.all(y[x > 1.5] > 0.5) and np.all(y[x < 1.5] < 0.5)
    # exactly the documented mapping
    np.testing.assert_allclose(y, np.clip((x - 1.5) / 3.75 + 0.5, 0, 1))


def test_normalisation_on_torch_keeps_type_and_values() -> None:
    norm = ScoreNormalization(threshold=2.0, low=1.0, high=5.0)
    values = torch.tensor([[0.0, 2.0], [3.0, 9.0]])
    out = norm(values)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), norm(values.numpy()))
    assert out[0, 1] == 0.5


def test_normalisation_degenerate_range_does_not_divide_by_zero() -> None:
    norm = ScoreNormalization(threshold=3.0, low=3.0, high=3.0)
    assert norm.scale == 1.0
    y = norm(np.array([2.0, 3.0, 3.25, 4.0]))
    assert np.all(np.isfinite(y))
    np.testing.assert_allclose(y, [0.0, 0.5, 0.75, 1.0])


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"threshold": math.nan, "low": 0.0, "high": 1.0}, ValueError),
        ({"threshold": 0.5, "low": 2.0, "high": 1.0}, ValueError),
        ({"threshold": "a", "low": 0.0, "high": 1.0}, TypeError),
    ],
)
def test_normalisation_validates(kwargs: dict, error: type) -> None:
    with pytest.raises(error):
        ScoreNormalization(**kwargs)


# ---------------------------------------------------------------- target_fpr and Calibration
@pytest.mark.parametrize("bad", [0, 0.0, 1, 1.0, -0.1, 1.5, math.nan, math.inf])
def test_target_fpr_out_of_range(bad: float) -> None:
    with pytest.raises(ValueError, match=r"target_fpr must be a number in \(0, 1\)"):
        check_target_fpr(bad)


@pytest.mark.parametrize("bad", ["0.1", None, True, [0.1]])
def test_target_fpr_not_a_number(bad: object) -> None:
    with pytest.raises(TypeError, match="target_fpr must be a number"):
        check_target_fpr(bad)


@pytest.mark.parametrize(("fpr", "needed"), [(0.01, 100), (0.1, 10), (0.3, 4), (0.5, 2), (0.9, 2)])
def test_required_normal_images(fpr: float, needed: int) -> None:
    assert required_normal_images(fpr) == needed
    assert 1 / needed <= fpr < 1 / (needed - 1)


def _histogram(*parts: tuple[np.ndarray, int]) -> PixelHistogram:
    histogram = PixelHistogram()
    for values, kind in parts:
        histogram.add(np.asarray(values, dtype=np.float32), kind)
    return histogram


def test_calibrate_arrays_needs_enough_normal_images() -> None:
    pixels = _histogram((np.random.rand(100), 0))
    with pytest.raises(CalibrationError, match=r"holds 9 normal images; .* needs at least 10"):
        calibrate_arrays(np.random.rand(9), np.zeros(9), pixels, 0.1)
    with pytest.raises(CalibrationError, match="only anomalous"):
        calibrate_arrays(np.random.rand(3), np.ones(3), pixels, 0.1)
    with pytest.raises(CalibrationError, match="no images"):
        calibrate_arrays(np.zeros(0), np.zeros(0), pixels, 0.1)
    # with anomalies, the F1 choice needs no minimum of normal images
    result = calibrate_arrays(np.array([0.1, 0.9]), np.array([0, 1]), pixels, 0.1)
    # the best F1 is at 0.9; the threshold lies half way down to 0.1, deciding alike
    assert result.method == "f1" and result.threshold == pytest.approx(0.5)


def test_calibrate_arrays_pixel_falls_back_to_fpr_without_masks() -> None:
    rng = np.random.default_rng(3)
    scores = np.r_[rng.random(20), rng.random(5) + 1]
    labels = np.r_[np.zeros(20), np.ones(5)]
    normal_pixels = rng.random(10_000)
    pixels = _histogram((normal_pixels, 0), (rng.random(1000) + 5, 3))
    result = calibrate_arrays(scores, labels, pixels, 0.05)
    assert (result.method, result.pixel_method) == ("f1", "fpr")
    assert np.mean(normal_pixels.astype(np.float32) >= result.pixel_threshold) <= 0.05
    assert result.pixel.high >= 5  # unlabelled pixels still set the range
    masked = _histogram((normal_pixels, 0), (rng.random(900), 1), (rng.random(100) + 1, 2))
    assert calibrate_arrays(scores, labels, masked, 0.05).pixel_method == "f1"


def test_calibration_dict_roundtrip_and_for_category() -> None:
    child = Calibration(
        image=ScoreNormalization(1.0, 0.0, 2.0),
        pixel=ScoreNormalization(0.5, 0.0, 1.0),
        method="fpr",
        target_fpr=0.1,
        normal_images=10,
        anomalous_images=0,
    )
    parent = Calibration(
        image=ScoreNormalization(1.5, 0.0, 3.0),
        pixel=ScoreNormalization(0.7, 0.0, 2.0),
        method="f1",
        target_fpr=0.1,
        normal_images=20,
        anomalous_images=4,
        per_category={"bottle": child},
        pixel_method="fpr",
        eval_size=64,
    )
    data = json.loads(json.dumps(parent.to_dict()))
    assert Calibration.from_dict(data) == parent
    assert parent.for_category("bottle") is child and parent.for_category(None) is parent
    with pytest.raises(CalibrationError, match="calibrated categories: bottle"):
        parent.for_category("screw")
    with pytest.raises(CalibrationError, match="all categories together"):
        child.for_category("bottle")
    with pytest.raises(ValueError, match="unknown keys"):
        Calibration.from_dict({**data, "extra": 1})
    with pytest.raises(ValueError):
        Calibration.from_dict({**data, "method": "magic"})


def test_import_is_torch_free() -> None:
    code = (
        "import sys; import cncad.calibration; "
        "bad = [m for m in sys.modules if m == 'torch' or m.startswith('torch.')]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------- with a detector
@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory):
    return make_synthetic_dataset(
        tmp_path_factory.mktemp("calib"), n_train=4, n_test_good=5, n_test_defect=3, seed=3
    )


@pytest.fixture(scope="module")
def detector() -> CNCDetector:
    # untrained weights score images just as well for calibration purposes, and save fast
    return CNCDetector(
        backbone="tiny",
        pretrained=None,
        image_size=56,
        batch_size=8,
        sigma=1.0,
        device="cpu",
        allow_untrained=True,
    )


def _normal_only(root) -> Subset:
    data = AnomalyFolder(root, split="test", image_size=56, mask_size=32)
    return Subset(data, [i for i, label in enumerate(data.labels) if label == 0])


def test_calibrate_normal_only_keeps_the_false_alarm_rate(detector, dataset_root) -> None:
    data = _normal_only(dataset_root)  # 10 normal images over two categories
    result = detector.calibrate(data, target_fpr=0.1, eval_size=32, progress=False)
    assert (result.method, result.pixel_method) == ("fpr", "fpr")
    assert (result.normal_images, result.anomalous_images) == (10, 0)
    assert detector.threshold == result.threshold and detector.calibration is result
    assert detector.pixel_threshold == result.pixel_threshold
    scores = detector.predict([data[i]["path"] for i in range(len(data))]).pred_score
    assert int((scores >= result.threshold).sum()) <= 1  # 10 % of 10
    values = scores.numpy().astype(np.float64)
    assert result.threshold == halfway_down(brute_fpr(values, 0.1), values)
    assert result.image.low == pytest.approx(float(scores.min()), abs=1e-5)
    with pytest.raises(CalibrationError, match=r"holds 10 normal images; .* needs at least 100"):
        detector.calibrate(data, target_fpr=0.01, eval_size=32, progress=False)


def test_calibrate_with_anomalies_is_f1_and_predict_carries_norms(detector, dataset_root) -> None:
    result = detector.calibrate(dataset_root, target_fpr=0.1, eval_size=32, progress=False)
    assert (result.method, result.pixel_method) == ("f1", "f1")
    assert (result.normal_images, result.anomalous_images) == (10, 6)
    test = AnomalyFolder(dataset_root, split="test", image_size=56)
    paths = [s.path for s in test.samples]
    prediction = detector.predict(paths)
    scores = prediction.pred_score.numpy().astype(np.float64)
    best = brute_f1(scores, np.array(test.labels))
    assert result.threshold == pytest.approx(halfway_down(best, scores), abs=1e-6)
    assert prediction.norm_score is not None and prediction.norm_map is not None
    assert torch.equal(prediction.pred_label, prediction.pred_score >= result.threshold)
    assert torch.all((prediction.norm_score >= 0.5) == prediction.pred_label)
    assert prediction.norm_map.shape == prediction.anomaly_map.shape
    assert float(prediction.norm_map.min()) >= 0 and float(prediction.norm_map.max()) <= 1


@pytest.fixture(scope="module")
def per_category(detector, dataset_root) -> tuple[CNCDetector, Calibration]:
    """A copy of the detector calibrated per category (tests must not recalibrate it)."""
    calibrated = copy.deepcopy(detector)
    result = calibrated.calibrate(
        dataset_root, target_fpr=0.2, per_category=True, eval_size=32, progress=False
    )
    return calibrated, result


def test_per_category_thresholds_and_unknown_category(detector, per_category, dataset_root) -> None:
    calibrated, result = per_category
    assert sorted(result.per_category) == ["bolt_like", "carpet_like"]
    assert all(
        c.normal_images == 5 and c.anomalous_images == 3 for c in result.per_category.values()
    )
    assert calibrated.threshold == result.threshold  # the global one
    paths = sorted(str(p) for p in (dataset_root / "bolt_like" / "test").rglob("*.png"))
    per_cat = result.per_category["bolt_like"]
    prediction = calibrated.predict(paths, category="bolt_like")
    assert torch.equal(prediction.pred_label, prediction.pred_score >= per_cat.threshold)
    torch.testing.assert_close(prediction.norm_score, per_cat.image(prediction.pred_score))
    torch.testing.assert_close(prediction.norm_map, per_cat.pixel(prediction.anomaly_map))
    batches = list(calibrated.predict_iter(paths, progress=False, category="bolt_like"))
    torch.testing.assert_close(torch.cat([b.norm_score for b in batches]), prediction.norm_score)
    with pytest.raises(CalibrationError, match="calibrated categories: bolt_like, carpet_like"):
        calibrated.predict(paths[:1], category="screw")
    # 10 normal images in all are enough for 0.1, but not the 5 of each category
    with pytest.raises(CalibrationError, match="category 'bolt_like' holds 5 normal images"):
        detector.calibrate(
            _normal_only(dataset_root),
            target_fpr=0.1,
            per_category=True,
            eval_size=32,
            progress=False,
        )


def test_calibrate_rejects_bad_inputs(detector, dataset_root) -> None:
    before = detector.calibration
    for bad in (0.0, 1.0, math.nan, -1):
        with pytest.raises(ValueError, match=r"target_fpr must be a number in \(0, 1\)"):
            detector.calibrate(dataset_root, target_fpr=bad, progress=False)
    with pytest.raises(TypeError, match="target_fpr"):
        detector.calibrate(dataset_root, target_fpr="0.1", progress=False)
    anomalies = AnomalyFolder(dataset_root, split="test", image_size=56, mask_size=32)
    only = Subset(anomalies, [i for i, label in enumerate(anomalies.labels) if label == 1])
    with pytest.raises(CalibrationError, match="only anomalous images"):
        detector.calibrate(only, target_fpr=0.1, eval_size=32, progress=False)
    with pytest.raises(CalibrationError, match="no images"):
        detector.calibrate(Subset(anomalies, []), eval_size=32, progress=False)
    assert detector.calibration is before  # a failed calibration changes nothing


def test_uncalibrated_predict_is_unchanged(dataset_root) -> None:
    model = CNCDetector(
        backbone="tiny",
        pretrained=None,
        image_size=56,
        sigma=1.0,
        device="cpu",
        allow_untrained=True,
    )
    paths = sorted((dataset_root / "bolt_like" / "test" / "good").glob("*.png"))[:2]
    prediction = model.predict(paths)
    assert prediction.norm_score is None and prediction.norm_map is None
    assert prediction.pred_label is None
    with pytest.raises(ValueError, match="needs a calibrated detector"):
        model.predict(paths, category="bolt_like")


def test_calibration_survives_save_and_load(per_category, dataset_root, tmp_path) -> None:
    detector, result = per_category
    path = detector.save(tmp_path / "model.cnc")
    loaded = CNCDetector.load(path)
    assert loaded.calibration == result
    assert loaded.threshold == result.threshold
    assert loaded.pixel_threshold == result.pixel_threshold
    paths = sorted((dataset_root / "carpet_like" / "test").rglob("*.png"))[:3]
    a = detector.predict(paths, category="carpet_like")
    b = loaded.predict(paths, category="carpet_like")
    torch.testing.assert_close(a.norm_score, b.norm_score)
    # a file written without calibration (as before this feature) loads as uncalibrated
    contents = read_detector_file(path)
    contents.calibration = None
    write_detector_file(tmp_path / "old.cnc", contents)
    assert "calibration" not in torch.load(tmp_path / "old.cnc", weights_only=True)
    assert CNCDetector.load(tmp_path / "old.cnc").calibration is None


def test_damaged_calibration_entry_is_a_model_file_error(per_category, tmp_path) -> None:
    path = per_category[0].save(tmp_path / "model.cnc")
    payload = torch.load(path, weights_only=True)
    payload["calibration"]["method"] = "magic"
    payload["checksum"] = content_checksum(payload)
    torch.save(payload, tmp_path / "bad.cnc")
    with pytest.raises(ModelFileError, match="'calibration' is invalid"):
        read_detector_file(tmp_path / "bad.cnc")


def test_docstring_examples_run() -> None:
    import doctest

    import cncad.calibration

    result = doctest.testmod(cncad.calibration)
    assert result.attempted >= 4 and result.failed == 0
