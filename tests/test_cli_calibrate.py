"""``cncad calibrate`` and the calibrated ``cncad predict``, end to end on tiny data."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import torch

from cncad import CNCDetector
from cncad.checkpoint import read_detector_file
from cncad.cli import main
from cncad.data import make_synthetic_dataset

RUN = ["--device", "cpu", "--quiet", "--eval-size", "32"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("calib_cli_data")
    return make_synthetic_dataset(root, n_train=2, n_test_good=4, n_test_defect=3, image_size=64)


@pytest.fixture(scope="module")
def untrained_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # the scores of random weights serve calibration as well as trained ones, and faster
    detector = CNCDetector(
        backbone="tiny",
        pretrained=None,
        image_size=56,
        batch_size=8,
        sigma=1.0,
        device="cpu",
        allow_untrained=True,
    )
    return detector.save(tmp_path_factory.mktemp("calib_cli_model") / "model.cnc")


@pytest.fixture
def model_file(untrained_file: Path, tmp_path: Path) -> Path:
    return Path(shutil.copy(untrained_file, tmp_path / "model.cnc"))


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _last_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1].startswith("cncad: error: "), err
    return lines[-1]


def test_calibrate_in_place_then_predict_uses_the_thresholds(
    model_file: Path, data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = read_detector_file(model_file)
    assert main(["calibrate", str(model_file), str(data_root), "--target-fpr", "0.1", *RUN]) == 0
    assert "calibrated: threshold=" in capsys.readouterr().out
    after = read_detector_file(model_file)
    assert after.calibration is not None and after.calibration["method"] == "f1"
    assert after.threshold == after.calibration["image"]["threshold"]
    assert after.pixel_threshold == after.calibration["pixel"]["threshold"]
    assert after.config == before.config and after.kind == before.kind
    assert all(torch.equal(after.state_dict[k], v) for k, v in before.state_dict.items())
    assert not list(model_file.parent.glob("*.tmp*"))  # the atomic write left nothing

    images = sorted((data_root / "bolt_like" / "test").rglob("*.png"))
    out = tmp_path / "results"
    assert main(["predict", str(model_file), *map(str, images), "--out", str(out), "--quiet"]) == 0
    rows = _read_csv(out / "scores.csv")
    assert list(rows[0]) == ["path", "score", "is_anomalous", "norm_score"]
    # the threshold is an observed score, so compare unrounded scores, not the CSV's
    scores = CNCDetector.load(model_file).predict([str(p) for p in images]).pred_score
    for row, score in zip(rows, scores.tolist(), strict=True):
        anomalous = score >= after.threshold
        assert row["is_anomalous"] == ("true" if anomalous else "false")
        assert 0.0 <= float(row["norm_score"]) <= 1.0
        assert (float(row["norm_score"]) >= 0.5) == anomalous

    # --threshold replaces the calibrated one, and the norm scores centred on it go
    assert main(
        ["predict", str(model_file), *map(str, images[:2]), "--out", str(out), "--quiet",
         "--threshold", "0.5"]
    ) == 0  # fmt: skip
    assert list(_read_csv(out / "scores.csv")[0]) == ["path", "score", "is_anomalous"]


def test_calibrate_per_category_to_a_new_file(
    model_file: Path, data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    original = model_file.read_bytes()
    target = tmp_path / "calibrated.cnc"
    argv = ["calibrate", str(model_file), str(data_root), "--per-category", "--out", str(target)]
    assert main([*argv, "--target-fpr", "0.25", *RUN]) == 0
    assert model_file.read_bytes() == original
    detector = CNCDetector.load(target)
    assert sorted(detector.calibration.per_category) == ["bolt_like", "carpet_like"]
    chosen = detector.calibration.per_category["carpet_like"]

    images = sorted((data_root / "carpet_like" / "test").rglob("*.png"))
    out = tmp_path / "results"
    argv = ["predict", str(target), *map(str, images), "--out", str(out), "--quiet"]
    assert main([*argv, "--category", "carpet_like"]) == 0
    rows = _read_csv(out / "scores.csv")
    flags = [row["is_anomalous"] == "true" for row in rows]
    scores = detector.predict([str(p) for p in images]).pred_score
    assert flags == (scores >= chosen.threshold).tolist()
    assert flags != (scores >= detector.calibration.threshold).tolist()  # not the global one
    capsys.readouterr()
    assert main([*argv, "--category", "screw"]) == 1
    assert "calibrated categories: bolt_like, carpet_like" in _last_error(capsys)
    assert main([*argv, "--category", "carpet_like", "--threshold", "1"]) == 1
    assert "drop --threshold" in _last_error(capsys)


def test_predict_category_needs_a_calibrated_model(
    model_file: Path, data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = next((data_root / "bolt_like" / "test" / "good").glob("*.png"))
    argv = ["predict", str(model_file), str(image), "--out", str(tmp_path / "r"), "--quiet"]
    assert main([*argv, "--category", "bolt_like"]) == 1
    assert "cncad calibrate" in _last_error(capsys)


@pytest.mark.parametrize("bad", ["0", "1", "1.5", "-0.1", "nan", "abc"])
def test_bad_target_fpr_is_a_usage_error(
    model_file: Path, data_root: Path, bad: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["calibrate", str(model_file), str(data_root), f"--target-fpr={bad}"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "--target-fpr" in err and "Traceback" not in err


def test_too_few_normal_images_is_one_line_and_leaves_the_file(
    model_file: Path, data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    normal_only = tmp_path / "held_out" / "bolt_like" / "test" / "good"
    shutil.copytree(data_root / "bolt_like" / "test" / "good", normal_only)
    original = model_file.read_bytes()
    argv = ["calibrate", str(model_file), str(tmp_path / "held_out"), *RUN]
    assert main(argv) == 1  # 4 normal images, the default 0.01 needs 100
    line = _last_error(capsys)
    assert "4 normal images" in line and "needs at least 100" in line
    assert model_file.read_bytes() == original
    assert main([*argv, "--target-fpr", "0.25"]) == 0
    assert read_detector_file(model_file).calibration["method"] == "fpr"


def test_evaluate_reports_what_the_calibrated_thresholds_decide(
    model_file: Path, data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    argv = ["calibrate", str(model_file), str(data_root), "--per-category", "--target-fpr", "0.25"]
    assert main([*argv, *RUN]) == 0
    report = tmp_path / "eval.json"
    assert main(["evaluate", str(model_file), str(data_root), "--json", str(report), *RUN]) == 0
    out = capsys.readouterr().out
    assert "at the model's threshold:" in out and "  all: " in out
    decided = json.loads(report.read_text())["at_threshold"]
    detector = CNCDetector.load(model_file)
    for category, row in decided["per_category"].items():
        images = sorted((data_root / category / "test").rglob("*.png"))
        labels = [path.parent.name != "good" for path in images]
        flagged = detector.predict([str(p) for p in images], category=category).pred_label
        assert row["threshold"] == detector.calibration.per_category[category].threshold
        pairs = list(zip(flagged.tolist(), labels, strict=True))
        assert row["detected"] == sum(f and d for f, d in pairs)
        assert row["false_alarms"] == sum(f and not d for f, d in pairs)
    total = decided["total"]
    every = list(data_root.glob("*/test/*/*.png"))
    assert total["normal_images"] == sum(path.parent.name == "good" for path in every)
    assert total["normal_images"] + total["defective_images"] == len(every)
