"""The ``cncad`` command line, end to end on tiny synthetic data."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from cncad import CNCDetector
from cncad.cli import main
from cncad.data import make_synthetic_dataset
from cncad.evaluation import METRIC_NAMES

TINY = ["--backbone", "tiny", "--image-size", "56", "--epochs", "1", "--batch-size", "4"]
TINY += ["--device", "cpu", "--quiet"]
CATEGORIES = ("bolt_like", "carpet_like")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli_data")
    return make_synthetic_dataset(
        root, categories=CATEGORIES, n_train=4, n_test_good=2, n_test_defect=3, image_size=64
    )


@pytest.fixture(scope="module")
def model_file(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli_model") / "model.cnc"
    assert main(["fit", str(data_root), "--out", str(out), *TINY]) == 0
    return out


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _assert_one_line_error(capsys: pytest.CaptureFixture[str], status: int, *names: str) -> str:
    """The error is one line of its own, the last on stderr (after any progress bar)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 1
    assert "Traceback" not in err
    assert err.count("cncad: error: ") == 1, err
    assert lines[-1].startswith("cncad: error: "), err
    for name in names:
        assert name in lines[-1]
    return lines[-1]


# -------------------------------------------------------------------------------- fit


def test_fit_on_an_mvtec_tree_writes_a_loadable_model(model_file: Path) -> None:
    detector = CNCDetector.load(model_file)
    assert detector.config.backbone == "tiny"
    assert detector.config.pretrained is None
    assert detector.config.image_size == 56
    assert detector.config.batch_size == 4
    assert detector.epochs_trained == 1
    assert detector.threshold is None


def test_fit_on_a_plain_folder_uses_every_image_and_stores_the_threshold(
    data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plain = tmp_path / "accepted"
    shutil.copytree(data_root / "carpet_like" / "train" / "good", plain / "day_1")
    (plain / "loose.png").write_bytes((plain / "day_1" / "000.png").read_bytes())
    out = tmp_path / "sub" / "plain.cnc"

    status = main(["fit", str(plain), "--out", str(out), "--threshold", "0.25", *TINY])

    assert status == 0
    stdout = capsys.readouterr().out
    assert f"plain image folder {plain}: 5 images" in stdout
    assert "feature cache: 5 images" in stdout
    assert f"saved the trained detector to {out}" in stdout
    detector = CNCDetector.load(out)
    assert detector.threshold == 0.25
    assert detector.epochs_trained == 1


def test_fit_with_checkpoints_then_resume_equals_one_run(
    data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    two = [*TINY, "--epochs", "2"]  # argparse keeps the last --epochs
    assert main(["fit", str(data_root), "--out", str(tmp_path / "once.cnc"), *two]) == 0
    runs = tmp_path / "runs"
    first = ["fit", str(data_root), "--out", str(tmp_path / "half.cnc")]
    assert main([*first, *TINY, "--checkpoint-dir", str(runs)]) == 0
    assert f"checkpoint: {runs / 'last.ckpt'}" in capsys.readouterr().out
    assert CNCDetector.load(runs / "last.ckpt").epochs_trained == 1
    resume = ["fit", str(data_root), "--out", str(tmp_path / "resumed.cnc"), "--quiet"]
    resume += ["--resume", str(runs / "last.ckpt"), "--checkpoint-dir", str(runs)]
    resume += ["--epochs", "2", "--device", "cpu"]
    assert main(resume) == 0
    assert "1 of 2 epochs done" in capsys.readouterr().out
    once = CNCDetector.load(tmp_path / "once.cnc").model.trainable_state_dict()
    resumed = CNCDetector.load(tmp_path / "resumed.cnc")
    assert resumed.epochs_trained == 2
    for name, tensor in resumed.model.trainable_state_dict().items():
        assert torch.equal(tensor, once[name]), name


def test_resume_refuses_settings_that_would_change_the_run(
    data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = tmp_path / "runs"
    assert main(["fit", str(data_root), "--out", str(tmp_path / "m.cnc"), *TINY,
                 "--checkpoint-dir", str(runs)]) == 0  # fmt: skip
    capsys.readouterr()
    argv = ["fit", str(data_root), "--out", str(tmp_path / "m2.cnc"), "--resume"]
    status = main([*argv, str(runs / "last.ckpt"), "--lr", "0.01", "--seed", "3"])
    line = _assert_one_line_error(capsys, status, "--lr", "--seed")
    assert "--resume continues the run" in line
    assert not (tmp_path / "m2.cnc").exists()


@pytest.mark.parametrize("where", ["folder", "under_a_file", "the_checkpoint", "the_resumed"])
def test_fit_checks_its_outputs_before_training(
    data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch, where: str
) -> None:
    def no_training(*args, **kwargs):
        pytest.fail("training started although an output path is bad")

    monkeypatch.setattr(CNCDetector, "fit", no_training)
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "last.ckpt").write_bytes(b"old")
    extra: list[str] = []
    out = {
        "folder": tmp_path,
        "under_a_file": tmp_path / "a_file" / "m.cnc",
        "the_checkpoint": tmp_path / "runs" / "last.ckpt",
        "the_resumed": tmp_path / "runs" / "last.ckpt",
    }[where]
    if where == "the_checkpoint":
        extra = ["--checkpoint-dir", str(tmp_path / "runs")]
    if where == "the_resumed":
        extra = ["--resume", str(tmp_path / "runs" / "last.ckpt")]
    status = main(["fit", str(data_root), "--out", str(out), *TINY, *extra])
    _assert_one_line_error(capsys, status, "--out")
    assert (tmp_path / "runs" / "last.ckpt").read_bytes() == b"old"


def test_fit_without_the_cache_and_with_a_cache_folder(
    data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plain = data_root / "carpet_like" / "train" / "good"
    out = tmp_path / "model.cnc"
    assert main(["fit", str(plain), "--out", str(out), "--no-cache", *TINY]) == 0
    assert "feature cache" not in capsys.readouterr().out
    cache_dir = tmp_path / "cache"
    assert main(["fit", str(plain), "--out", str(out), "--cache-dir", str(cache_dir), *TINY]) == 0
    assert "feature cache: " in capsys.readouterr().out
    assert not any(cache_dir.iterdir()) if cache_dir.exists() else True


# -------------------------------------------------------------------------------- predict


def test_predict_writes_one_overlay_per_image_and_the_scores(
    model_file: Path, data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = data_root / "carpet_like" / "test"
    single = data_root / "bolt_like" / "test" / "good" / "000.png"
    out = tmp_path / "results"

    status = main(["predict", str(model_file), str(folder), str(single), "--out", str(out)])

    assert status == 0
    folder_images = sorted(folder.rglob("*.png"))
    expected = [out / "test" / p.relative_to(folder) for p in folder_images] + [out / "000.png"]
    for path in expected:
        with Image.open(path) as picture:
            assert picture.size == (64, 64) and picture.mode == "RGB"
    assert sorted(p for p in out.rglob("*.png")) == sorted(expected)

    rows = _read_csv(out / "scores.csv")
    assert list(rows[0]) == ["path", "score"]
    assert [row["path"] for row in rows] == [str(p) for p in [*folder_images, single]]
    reference = CNCDetector.load(model_file).predict([str(p) for p in [*folder_images, single]])
    scores = torch.tensor([float(row["score"]) for row in rows])
    torch.testing.assert_close(scores, reference.pred_score, rtol=1e-6, atol=1e-6)
    stdout = capsys.readouterr().out
    assert f"scored {len(rows)} images" in stdout
    assert "--vmin" in stdout


def test_predict_with_a_threshold_adds_is_anomalous(
    model_file: Path, data_root: Path, tmp_path: Path
) -> None:
    images = sorted((data_root / "carpet_like" / "test").rglob("*.png"))
    scores = CNCDetector.load(model_file).predict([str(p) for p in images]).pred_score
    threshold = float(scores.median())
    out = tmp_path / "results"

    argv = ["predict", str(model_file), *map(str, images), "--out", str(out)]
    assert main([*argv, "--threshold", str(threshold), "--quiet"]) == 0

    rows = _read_csv(out / "scores.csv")
    assert list(rows[0]) == ["path", "score", "is_anomalous"]
    flags = [row["is_anomalous"] for row in rows]
    assert flags == ["true" if float(s) >= threshold else "false" for s in scores]
    assert "true" in flags and "false" in flags


def test_predict_fixed_colour_scale_and_clashing_names(
    model_file: Path, data_root: Path, tmp_path: Path
) -> None:
    first = data_root / "carpet_like" / "test" / "good" / "000.png"
    second = data_root / "bolt_like" / "test" / "good" / "000.png"
    out = tmp_path / "results"
    argv = ["predict", str(model_file), str(first), str(second), "--out", str(out), "--quiet"]

    # Every map value lies below --vmin: the whole heatmap takes the coldest colour, and
    # with --alpha 1 the overlay is that colour alone.
    assert main([*argv, "--vmin", "1000", "--vmax", "1001", "--alpha", "1"]) == 0

    for name in ("000.png", "000-2.png"):
        pixels = np.asarray(Image.open(out / name))
        assert (pixels == np.array([0, 0, 96], dtype=np.uint8)).all()
    assert len(_read_csv(out / "scores.csv")) == 2


# -------------------------------------------------------------------------------- evaluate


def test_evaluate_prints_the_table_and_writes_json(
    model_file: Path, data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "reports" / "eval.json"

    status = main(["evaluate", str(model_file), str(data_root), "--json", str(target), "--quiet"])

    assert status == 0
    stdout = capsys.readouterr().out
    header = next(line for line in stdout.splitlines() if line.startswith("Category"))
    assert all(metric in header for metric in METRIC_NAMES)
    assert any(line.startswith("Mean") for line in stdout.splitlines())
    for category in CATEGORIES:
        assert any(line.startswith(category) for line in stdout.splitlines())

    report = json.loads(target.read_text(encoding="utf-8"))
    assert set(report) == {"model", "data", "per_category", "mean"}
    assert report["model"] == str(model_file)
    assert set(report["per_category"]) == set(CATEGORIES)
    for row in [*report["per_category"].values(), report["mean"]]:
        assert set(row) == {*METRIC_NAMES, "n_images"}
        assert all(row[m] is None or 0.0 <= row[m] <= 1.0 for m in METRIC_NAMES)
    assert report["per_category"]["bolt_like"]["n_images"] == 5
    assert report["mean"]["n_images"] == 10


# -------------------------------------------------------------------------------- demo


def test_demo_runs_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["demo", "--out", str(tmp_path), "--epochs", "1", "--image-size", "28"]
    argv += ["--data-size", "32", "--train-images", "2", "--heatmaps", "1", "--device", "cpu"]

    assert main([*argv, "--quiet"]) == 0

    assert (tmp_path / "model.cnc").is_file()
    assert len(list((tmp_path / "heatmaps").glob("*.png"))) == 2
    assert "Mean" in capsys.readouterr().out


# -------------------------------------------------------------------------------- output files


@pytest.fixture
def no_model_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if the command gets as far as loading the model."""

    def refuse(*args: object, **kwargs: object) -> None:
        pytest.fail("the model was loaded although the output path is bad")

    monkeypatch.setattr(CNCDetector, "load", refuse)


def _no_temporary_files(folder: Path) -> bool:
    return not list(folder.rglob(".*.tmp"))


def test_evaluate_keeps_the_old_json_when_writing_fails(
    model_file: Path,
    data_root: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    target = tmp_path / "old.json"
    old = b'{"model": "earlier.cnc", "mean": {"I-AUROC": 0.5}}\n'
    target.write_bytes(old)

    def dump_half_then_fail(payload: object, handle: Any, **kwargs: object) -> None:
        handle.write('{"model": ')
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(json, "dump", dump_half_then_fail)
    argv = ["evaluate", str(model_file), str(data_root), "--json", str(target), "--quiet"]

    _assert_one_line_error(capsys, main(argv), "No space left on device")
    assert target.read_bytes() == old
    assert json.loads(target.read_text(encoding="utf-8"))["model"] == "earlier.cnc"
    assert sorted(tmp_path.iterdir()) == [target]


@pytest.mark.parametrize("where", ["folder", "under_a_file", "inside_data", "the_model"])
def test_evaluate_checks_the_json_path_before_loading_the_model(
    model_file: Path,
    data_root: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    no_model_loading: None,
    where: str,
) -> None:
    blocker = tmp_path / "notes.txt"
    blocker.write_text("not a folder")
    target, message = {
        "folder": (tmp_path, "is a folder"),
        "under_a_file": (blocker / "eval.json", "is a file"),
        "inside_data": (data_root / "eval.json", "inside the input folder"),
        "the_model": (model_file, "is also an input"),
    }[where]
    model_bytes = model_file.read_bytes()

    status = main(["evaluate", str(model_file), str(data_root), "--json", str(target)])

    _assert_one_line_error(capsys, status, "--json", message)
    assert blocker.read_text() == "not a folder"
    assert model_file.read_bytes() == model_bytes
    assert not (data_root / "eval.json").exists()


@pytest.fixture
def parts(data_root: Path, tmp_path: Path) -> Path:
    """A folder holding one image, ``part.png``."""
    folder = tmp_path / "parts"
    folder.mkdir()
    shutil.copyfile(data_root / "carpet_like" / "test" / "good" / "000.png", folder / "part.png")
    return folder


@pytest.mark.parametrize("layout", ["image_folder", "input_folder", "dot", "inside_input"])
def test_predict_never_writes_over_its_inputs(
    model_file: Path,
    parts: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    no_model_loading: None,
    layout: str,
) -> None:
    image = parts / "part.png"
    before = image.read_bytes()
    images, out, message = {
        "image_folder": (str(image), str(parts), "contains the input"),
        "input_folder": (str(parts), str(parts), "is also an input"),
        "dot": ("part.png", ".", "contains the input"),
        "inside_input": (str(parts), str(parts / "heatmaps"), "inside the input folder"),
    }[layout]
    monkeypatch.chdir(parts)

    status = main(["predict", str(model_file), images, "--out", out])

    _assert_one_line_error(capsys, status, "--out", message)
    assert image.read_bytes() == before
    assert sorted(parts.iterdir()) == [image]


def test_predict_refuses_an_image_linked_from_its_output_folder(
    model_file: Path, parts: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # shots/part.png links to results/shots/part.png, which is where its heatmap would go.
    out = tmp_path / "results"
    (out / "shots").mkdir(parents=True)
    real = out / "shots" / "part.png"
    shutil.copyfile(parts / "part.png", real)
    before = real.read_bytes()
    shots = tmp_path / "shots"
    shots.mkdir()
    (shots / "part.png").symlink_to(real)

    status = main(["predict", str(model_file), str(shots), "--out", str(out)])

    _assert_one_line_error(capsys, status, "would overwrite an input file")
    assert real.read_bytes() == before
    assert not (out / "scores.csv").exists()


def test_predict_keeps_the_old_scores_when_writing_them_fails(
    model_file: Path,
    parts: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "results"
    out.mkdir()
    old = b"path,score\r\nearlier.png,0.25\r\n"
    (out / "scores.csv").write_bytes(old)
    real_writer = csv.writer

    class HeaderThenFail:
        def __init__(self, handle: Any) -> None:
            self.rows = 0
            self.writer = real_writer(handle)

        def writerow(self, row: list[str]) -> None:
            if self.rows == 1:
                raise OSError(28, "No space left on device")
            self.writer.writerow(row)
            self.rows += 1

    monkeypatch.setattr(csv, "writer", HeaderThenFail)
    argv = ["predict", str(model_file), str(parts / "part.png"), "--out", str(out), "--quiet"]

    _assert_one_line_error(capsys, main(argv), "No space left on device")
    assert (out / "scores.csv").read_bytes() == old
    assert (out / "part.png").is_file()  # the heatmap, written before the table
    assert _no_temporary_files(out)


def test_predict_keeps_an_old_heatmap_when_drawing_fails(
    model_file: Path,
    parts: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "results"
    out.mkdir()
    old = b"an earlier heatmap"
    (out / "part.png").write_bytes(old)

    def encode_half_then_fail(self: Image.Image, fp: Any, *args: object, **kwargs: object) -> None:
        fp.write(b"\x89PNG\r\n\x1a\n")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", encode_half_then_fail)
    argv = ["predict", str(model_file), str(parts / "part.png"), "--out", str(out), "--quiet"]

    _assert_one_line_error(capsys, main(argv), "No space left on device")
    assert (out / "part.png").read_bytes() == old
    # The image was scored before its heatmap failed: scores.csv says so, nothing else is new.
    assert sorted(out.iterdir()) == [out / "part.png", out / "scores.csv"]
    assert [row["path"] for row in _read_csv(out / "scores.csv")] == [str(parts / "part.png")]


def test_demo_refuses_a_file_as_its_output_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "demo_output"
    target.write_text("keep me")
    status = main(["demo", "--out", str(target), "--epochs", "1", "--device", "cpu"])
    _assert_one_line_error(capsys, status, "--out", "is a file")
    assert target.read_text() == "keep me"
    assert sorted(tmp_path.iterdir()) == [target]


# -------------------------------------------------------------------------------- help


@pytest.mark.parametrize("command", ["fit", "predict", "evaluate", "demo"])
def test_every_command_has_a_description_and_examples(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert f"usage: cncad {command}" in text
    assert "examples:" in text
    assert f"cncad {command} " in text.split("examples:")[1]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["fit", "data", "--epochs", "-1"], "--epochs: must be at least 0"),
        (["predict", "m.cnc", "a.png", "--alpha", "1.5"], "--alpha: must be between 0 and 1"),
        (["evaluate", "m.cnc"], "the following arguments are required: DATA"),
        (["train", "data"], "invalid choice: 'train'"),
    ],
)
def test_a_malformed_command_line_exits_with_status_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_predict_rejects_an_empty_colour_scale(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["predict", str(tmp_path / "m.cnc"), str(tmp_path), "--vmin", "2", "--vmax", "1"]
    _assert_one_line_error(capsys, main(argv), "--vmin (2) must be below --vmax (1)")


# -------------------------------------------------------------------------------- errors


def test_fit_on_a_missing_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no_such_data"
    status = main(["fit", str(missing), "--out", str(tmp_path / "m.cnc"), *TINY])
    _assert_one_line_error(capsys, status, str(missing), "not found")


def test_fit_on_a_folder_without_images(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"
    (empty / "notes").mkdir(parents=True)
    (empty / "notes" / "readme.txt").write_text("no pictures here")
    status = main(["fit", str(empty), "--out", str(tmp_path / "m.cnc"), *TINY])
    _assert_one_line_error(capsys, status, str(empty), "no image files")
    assert not (tmp_path / "m.cnc").exists()


def test_fit_refuses_the_test_split_of_a_category(
    data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    split = data_root / "carpet_like" / "test"
    status = main(["fit", str(split), "--out", str(tmp_path / "m.cnc"), *TINY])
    _assert_one_line_error(capsys, status, str(split), "MVTec-style")


@pytest.mark.parametrize(("workers", "quiet"), [("0", False), ("1", True)])
def test_fit_on_a_corrupt_image(
    data_root: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    workers: str,
    quiet: bool,
) -> None:
    # Read in a DataLoader worker, the error arrives with the worker's traceback in its
    # message; without --quiet, progress bars are open when it is raised.
    plain = tmp_path / "accepted"
    shutil.copytree(data_root / "carpet_like" / "train" / "good", plain)
    corrupt = plain / "001.png"
    corrupt.write_bytes(b"not a png at all")
    argv = ["fit", str(plain), "--out", str(tmp_path / "m.cnc"), "--num-workers", workers]
    options = TINY if quiet else [option for option in TINY if option != "--quiet"]
    status = main([*argv, *options])
    _assert_one_line_error(capsys, status, str(corrupt), "cannot read image file")


def test_predict_on_a_corrupt_image(
    model_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    corrupt = tmp_path / "broken.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    status = main(["predict", str(model_file), str(corrupt), "--out", str(tmp_path / "o")])
    assert status == 3
    err = capsys.readouterr().err
    skipped = [line for line in err.splitlines() if line.startswith("cncad: skipped")]
    assert len(skipped) == 1
    assert str(corrupt) in skipped[0] and "cannot read image file" in skipped[0]
    assert "1 of 1 images could not be read" in err
    assert _read_csv(tmp_path / "o" / "scores.csv") == []


def test_predict_carries_on_past_unreadable_images(
    model_file: Path, data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "shift"
    folder.mkdir()
    good = sorted((data_root / "carpet_like" / "test" / "good").glob("*.png"))[:2]
    for image in good:
        (folder / image.name).write_bytes(image.read_bytes())
    (folder / "a_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (folder / "b_empty.png").write_bytes(b"")
    before = {path.name: path.read_bytes() for path in folder.iterdir()}
    out = tmp_path / "out"

    status = main(["predict", str(model_file), str(folder), "--out", str(out), "--quiet"])

    assert status == 3
    captured = capsys.readouterr()
    skipped = [line for line in captured.err.splitlines() if line.startswith("cncad: skipped")]
    assert [line.split(": ")[1].split("/")[-1] for line in skipped] == [
        "a_broken.png",
        "b_empty.png",
    ]
    assert "2 of 4 images could not be read" in captured.err
    assert "scored 2 of 4 images" in captured.out
    rows = _read_csv(out / "scores.csv")
    assert [Path(row["path"]).name for row in rows] == [image.name for image in good]
    assert sorted(p.name for p in (out / "shift").iterdir()) == sorted(i.name for i in good)
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == before


def test_predict_on_a_missing_image(
    model_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "gone.png"
    status = main(["predict", str(model_file), str(missing), "--out", str(tmp_path / "o")])
    _assert_one_line_error(capsys, status, str(missing), "not found")


def test_predict_on_a_folder_without_images(
    model_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    status = main(["predict", str(model_file), str(empty), "--out", str(tmp_path / "o")])
    _assert_one_line_error(capsys, status, str(empty), "no image files")


def test_a_file_that_is_not_a_model(
    data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = data_root / "carpet_like" / "test" / "good" / "000.png"
    for content in (b"hello", b"", torch.zeros(3).numpy().tobytes()):
        fake = tmp_path / "fake.cnc"
        fake.write_bytes(content)
        status = main(["predict", str(fake), str(image), "--out", str(tmp_path / "o")])
        _assert_one_line_error(capsys, status, str(fake), "not a cncad detector file")
    torch.save({"weights": torch.zeros(2)}, fake)
    status = main(["evaluate", str(fake), str(data_root)])
    _assert_one_line_error(capsys, status, str(fake), "not a cncad detector file")


def test_a_model_file_from_another_version(
    model_file: Path, data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    payload = torch.load(model_file, weights_only=True)
    payload.update(format_version=99, cncad_version="9.0.0")
    future = tmp_path / "future.cnc"
    torch.save(payload, future)
    status = main(["evaluate", str(future), str(data_root)])
    line = _assert_one_line_error(capsys, status, str(future), "format version 99")
    assert "9.0.0" in line


def test_a_missing_model_file(
    data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nothing.cnc"
    status = main(["evaluate", str(missing), str(data_root)])
    _assert_one_line_error(capsys, status, str(missing), "not found")


@pytest.mark.parametrize("layout", ["missing", "plain"])
def test_evaluate_needs_an_mvtec_test_split(
    model_file: Path,
    data_root: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    layout: str,
) -> None:
    folder = tmp_path / "parts"
    if layout == "plain":
        shutil.copytree(data_root / "carpet_like" / "train" / "good", folder)
    status = main(["evaluate", str(model_file), str(folder)])
    expected = "not found" if layout == "missing" else "not an anomaly detection dataset"
    _assert_one_line_error(capsys, status, str(folder), expected)


def test_debug_shows_the_original_exception(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no_such_data"):
        main(["fit", str(tmp_path / "no_such_data"), "--debug", *TINY])


def test_predict_scale_comes_from_the_models_statistics_and_extra_outputs(
    model_file: Path, data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    detector = CNCDetector.load(model_file)
    stats = detector.normal_statistics
    low, high = stats["map_p50"], 2 * stats["map_p999"] - stats["map_p50"]
    image = data_root / "bolt_like" / "test" / "good" / "000.png"
    out = tmp_path / "results"
    argv = ["predict", str(model_file), str(image), "--out", str(out), "--quiet"]
    threshold = float(detector.predict(str(image)).anomaly_map.median())
    argv += ["--save-maps", "npy", "--save-masks", "--threshold", str(threshold)]
    assert main(argv) == 0
    assert f"colour scale (fixed): {low:.6g} (blue) to {high:.6g} (red)" in capsys.readouterr().out
    amap = np.load(out / "000.map.npy")
    expected = detector.predict(str(image)).anomaly_map[0].numpy()
    np.testing.assert_allclose(amap, expected, rtol=1e-6, atol=1e-6)
    mask = np.asarray(Image.open(out / "000.mask.png"))
    assert set(np.unique(mask)) <= {0, 255}
    assert ((mask == 255) == (amap >= threshold)).mean() > 0.999

    png16 = tmp_path / "png16"
    argv = ["predict", str(model_file), str(image), "--out", str(png16), "--quiet"]
    assert main([*argv, "--save-maps", "png16", "--num-workers", "0"]) == 0
    levels = np.asarray(Image.open(png16 / "000.map.png")).astype(np.float64)
    map_range = 2.0 * len(detector.model.layers)
    np.testing.assert_allclose(levels * map_range / 65535, expected, atol=map_range / 65535)


def test_predict_save_masks_needs_a_threshold(
    model_file: Path, data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = data_root / "bolt_like" / "test" / "good" / "000.png"
    argv = ["predict", str(model_file), str(image), "--out", str(tmp_path / "o"), "--save-masks"]
    _assert_one_line_error(capsys, main(argv), "--save-masks needs a threshold")


def test_predict_without_statistics_takes_the_first_batch_but_keeps_a_given_end(
    model_file: Path, data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    detector = CNCDetector.load(model_file)
    detector.normal_statistics = None  # as in a model file written before they existed
    old_model = detector.save(tmp_path / "old.cnc")
    image = data_root / "bolt_like" / "test" / "good" / "000.png"
    argv = ["predict", str(old_model), str(image), "--out", str(tmp_path / "o"), "--quiet"]
    assert main([*argv, "--vmin", "0.125"]) == 0
    stdout = capsys.readouterr().out
    high = float(detector.predict(str(image)).anomaly_map.max())
    assert f"colour scale (first batch): 0.125 (blue) to {high:.6g} (red)" in stdout
