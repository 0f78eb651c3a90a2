"""Bad inputs and faults against the Python API and the command line (issue 12).

Each case asserts the clear error (or the correct result) and that no input file changed:
the files under the test's data and model folders are hashed before and after.
The sections follow the issue: outputs never touch inputs, batch jobs survive a bad image,
values are validated where they enter, an untrained detector says so, one way to read
data, and errors that are bugs look like bugs.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cncad.cli import main
from cncad.data.synthetic import make_synthetic_dataset
from cncad.detector import CNCDetector
from cncad.errors import CNCADError, NotTrainedError

TINY = ["--backbone", "tiny", "--image-size", "56", "--epochs", "1", "--batch-size", "4"]
TINY += ["--device", "cpu", "--quiet"]


def _hashes(*roots: Path) -> dict[str, str]:
    """SHA-256 of every file under ``roots`` (or of the files themselves)."""
    found: dict[str, str] = {}
    for root in roots:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in files:
            found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bad_inputs_data")
    return make_synthetic_dataset(
        root, categories=("bolt_like",), n_train=4, n_test_good=2, n_test_defect=2, image_size=64
    )


@pytest.fixture(scope="module")
def model_file(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bad_inputs_model") / "model.cnc"
    assert main(["fit", str(data_root), "--out", str(out), *TINY]) == 0
    return out


@pytest.fixture(scope="module")
def detector(model_file: Path) -> CNCDetector:
    return CNCDetector.load(model_file)


@pytest.fixture
def untouched(data_root: Path, model_file: Path) -> Iterator[None]:
    """Fails the test if any data file or the model file changed."""
    before = _hashes(data_root, model_file)
    yield
    assert _hashes(data_root, model_file) == before


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines, "nothing on stderr"
    return lines[-1]


def _one_image(folder: Path, name: str = "part.png", size: int = 40) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    Image.fromarray(np.full((size, size, 3), 120, np.uint8)).save(path)
    return path


# ------------------------------------------------------------- outputs never touch inputs


@pytest.mark.parametrize("out", ["dot", "input_folder"])
def test_predict_never_writes_over_its_input_images(
    model_file: Path, tmp_path: Path, out: str, capsys: pytest.CaptureFixture[str], untouched: None
) -> None:
    image = _one_image(tmp_path / "parts")
    before = _hashes(tmp_path / "parts")
    cwd = Path.cwd()
    os.chdir(image.parent)
    try:
        target = "." if out == "dot" else str(image.parent)
        status = main(["predict", str(model_file), image.name, "--out", target, "--quiet"])
    finally:
        os.chdir(cwd)
    assert status == 1
    assert "--out" in _error_line(capsys)
    assert _hashes(tmp_path / "parts") == before


def test_a_failing_json_write_keeps_the_old_json(
    model_file: Path,
    data_root: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    untouched: None,
) -> None:
    old = tmp_path / "old.json"
    old.write_text('{"kept": true}\n')

    def dump_half_then_fail(payload: object, handle: object, **kwargs: object) -> None:
        handle.write('{"model": ')  # type: ignore[attr-defined]
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(json, "dump", dump_half_then_fail)
    argv = ["evaluate", str(model_file), str(data_root), "--json", str(old), "--quiet"]
    assert main([*argv, "--eval-size", "32"]) == 1
    assert "No space left on device" in _error_line(capsys)
    assert old.read_text() == '{"kept": true}\n'
    assert sorted(tmp_path.iterdir()) == [old]


def test_fit_refuses_an_out_that_is_a_folder_before_training(
    data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], untouched: None
) -> None:
    folder = tmp_path / "model.cnc"
    folder.mkdir()
    assert main(["fit", str(data_root), "--out", str(folder), *TINY]) == 1
    error = capsys.readouterr()
    assert "--out" in error.err and "training" not in error.out  # refused before any work


# ------------------------------------------------------------ batch jobs survive a bad image


def test_predict_over_a_folder_with_unreadable_images(
    model_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], untouched: None
) -> None:
    folder = tmp_path / "shift"
    _one_image(folder, "a.png")
    (folder / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    _one_image(folder, "c.png", size=50)
    before = _hashes(folder)
    out = tmp_path / "out"
    assert main(["predict", str(model_file), str(folder), "--out", str(out), "--quiet"]) == 3
    err = capsys.readouterr().err
    assert f"skipped {folder / 'b.png'}" in err
    with (out / "scores.csv").open(newline="") as handle:
        assert [Path(row["path"]).name for row in csv.DictReader(handle)] == ["a.png", "c.png"]
    assert _hashes(folder) == before


def test_predict_iter_skips_or_raises_as_asked(detector: CNCDetector, tmp_path: Path) -> None:
    folder = tmp_path / "shift"
    _one_image(folder, "a.png")
    (folder / "b.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"b\.png"):
        list(detector.predict_iter(folder, progress=False))
    batches = list(detector.predict_iter(folder, progress=False, on_error="skip"))
    assert [Path(f.source).name for b in batches for f in b.failures] == ["b.png"]
    assert sum(len(b.indices) for b in batches) == 1
    with pytest.raises(ValueError, match="on_error must be"):
        list(detector.predict_iter(folder, progress=False, on_error="ignore"))


# ---------------------------------------------------------- values validated where they enter


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["predict", "M", "x.png", "--threshold", "nan"], "finite number"),
        (["predict", "M", "x.png", "--vmin", "nan"], "finite number"),
        (["predict", "M", "x.png", "--vmax", "inf"], "finite number"),
        (["predict", "M", "x.png", "--threshold", "half"], "expected a number"),
        (["fit", "D", "--out", "m.cnc", "--threshold=-inf"], "finite number"),
        (["fit", "D", "--out", "m.cnc", "--lr", "0"], "must be above 0"),
        (["fit", "D", "--out", "m.cnc", "--epochs", "1.5"], "expected an integer"),
        (["fit", "D", "--out", "m.cnc", "--seed", "-1"], "at least 0"),
        (["demo", "--heatmaps", "-1"], "at least 0"),
        (["demo", "--sigma", "nan"], "finite number"),
        (["demo", "--image-size", "0"], "at least 1"),
    ],
)
def test_bad_command_line_values_are_refused_by_the_parser(
    argv: list[str], expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cwd = Path.cwd()
    os.chdir(tmp_path)
    try:
        with pytest.raises(SystemExit) as stop:
            main(argv)
    finally:
        os.chdir(cwd)
    assert stop.value.code == 2
    assert expected in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        ("0.5", TypeError, "threshold must be a number or None"),
        (True, TypeError, "threshold must be a number or None"),
        (math.nan, ValueError, "finite"),
        (math.inf, ValueError, "finite"),
    ],
)
def test_thresholds_are_numbers(
    detector: CNCDetector, value: object, error: type[Exception], message: str
) -> None:
    saved = detector.threshold
    with pytest.raises(error, match=message):
        detector.threshold = value  # type: ignore[assignment]
    with pytest.raises(error, match=message.replace("threshold", "pixel_threshold")):
        detector.pixel_threshold = value  # type: ignore[assignment]
    assert detector.threshold == saved
    detector.threshold = np.float32(0.25)
    assert detector.threshold == 0.25 and type(detector.threshold) is float
    detector.threshold = saved


@pytest.mark.parametrize(
    ("images", "options", "error", "message"),
    [
        (torch.rand(0, 3, 56, 56), {}, ValueError, "no images"),
        ([], {}, ValueError, "no images"),
        (torch.rand(1, 3, 56, 56), {"batch_size": 0}, ValueError, "batch_size must be at least"),
        (torch.rand(1, 3, 56, 56), {"batch_size": 2.0}, TypeError, "batch_size must be an int"),
        (torch.rand(1, 3, 56, 56) * 255, {}, ValueError, r"\[0, 1\]"),
        (torch.full((1, 3, 56, 56), math.nan), {}, ValueError, "finite|NaN"),
        (torch.rand(1, 5, 56, 56), {}, ValueError, "channel"),
        ("no/such/file.png", {}, FileNotFoundError, "file.png"),
        (12, {}, TypeError, "int"),
    ],
)
def test_predict_refuses_what_it_cannot_score(
    detector: CNCDetector,
    images: object,
    options: dict[str, object],
    error: type[Exception],
    message: str,
) -> None:
    with pytest.raises(error, match=message):
        detector.predict(images, **options)


def test_a_float_image_with_an_infinite_pixel_is_refused(
    detector: CNCDetector, tmp_path: Path
) -> None:
    values = np.full((40, 40), 0.5, np.float32)
    values[3, 4] = np.inf
    path = tmp_path / "float.tiff"
    Image.fromarray(values, mode="F").save(path)
    before = _hashes(path)
    with pytest.raises(ValueError, match=r"finite|inf"):
        detector.predict(Image.open(path))
    with pytest.raises(ValueError, match=r"finite|inf"):
        detector.predict(path)
    assert _hashes(path) == before


# ------------------------------------------------------------- an untrained detector says so


def test_an_untrained_detector_refuses_to_score_or_save(data_root: Path, tmp_path: Path) -> None:
    fresh = CNCDetector(backbone="tiny", pretrained=None, image_size=56, device="cpu")
    assert not fresh.is_trained
    for call in (
        lambda: fresh.predict(torch.rand(1, 3, 56, 56)),
        lambda: fresh.evaluate(data_root, eval_size=32, progress=False),
        lambda: fresh.save(tmp_path / "model.cnc"),
    ):
        with pytest.raises(NotTrainedError, match=r"fit\(data\) or CNCDetector\.load"):
            call()
    assert list(tmp_path.iterdir()) == []
    fresh.allow_untrained = True  # the explicit opt-in, e.g. for a smoke test
    assert fresh.predict(torch.rand(1, 3, 56, 56)).pred_score.shape == (1,)


def test_a_loaded_detector_counts_as_trained(detector: CNCDetector) -> None:
    assert detector.is_trained and detector.epochs_trained == 1


# ------------------------------------------------------- errors that are bugs look like bugs


def test_an_unexpected_failure_is_reported_as_a_bug(
    model_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    untouched: None,
) -> None:
    image = _one_image(tmp_path / "parts")
    from cncad.model import CNCModel

    def broken(self: CNCModel, images: torch.Tensor) -> object:
        return torch.ones(2, 3) @ torch.ones(4, 5)  # a shape error inside torch

    monkeypatch.setattr(CNCModel, "predict", broken)
    argv = ["predict", str(model_file), str(image), "--out", str(tmp_path / "o"), "--quiet"]
    assert main(argv) == 70
    err = capsys.readouterr().err
    assert "internal error, a bug in cncad: RuntimeError" in err
    assert "--debug" in err
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        main([*argv, "--debug"])


def test_cncad_errors_are_user_errors() -> None:
    from cncad.cli import _is_user_error

    assert _is_user_error(CNCADError("bad folder"))
    assert _is_user_error(FileNotFoundError("gone"))
    try:
        torch.ones(2, 3) @ torch.ones(4, 5)
    except RuntimeError as error:
        assert not _is_user_error(error)
    assert not _is_user_error(KeyError("x"))


# ------------------------------------------------------------------ values that enter as config


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [("image_size", 56.0, TypeError), ("epochs", 1.5, TypeError), ("seed", 2**70, ValueError)],
)
def test_config_values_name_the_field_and_what_it_takes(
    field: str, value: object, error: type[Exception]
) -> None:
    with pytest.raises(error, match=rf"^CNCConfig\.{field} must be an int") as info:
        CNCDetector(backbone="tiny", pretrained=None, device="cpu", **{field: value})
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------ files that are not as they seem


def test_a_mask_of_another_size_than_its_image_is_refused(
    data_root: Path, detector: CNCDetector, tmp_path: Path
) -> None:
    import shutil

    from cncad.errors import DatasetError

    copy = Path(shutil.copytree(data_root, tmp_path / "data"))
    mask = next((copy / "bolt_like" / "ground_truth").rglob("*.png"))
    Image.open(mask).resize((20, 30)).save(mask)
    before = _hashes(copy)
    with pytest.raises(DatasetError, match=r"mask .* is 20x30 pixels but its image .* is 64x64"):
        detector.evaluate(copy, eval_size=32, progress=False)
    assert _hashes(copy) == before


def test_a_decompression_bomb_is_one_clear_error(
    detector: CNCDetector, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cncad.errors import ImageReadError

    path = _one_image(tmp_path, "bomb.png", size=100)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 10,000 pixels: over twice the limit
    with pytest.raises(ImageReadError, match="MAX_IMAGE_PIXELS") as info:
        detector.predict(path)
    assert "\n" not in str(info.value)


def test_the_default_backbone_offline_fails_at_once_with_the_way_out(
    data_root: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    untouched: None,
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    out = tmp_path / "model.cnc"
    assert main(["fit", str(data_root), "--out", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.strip()] == [err.strip()]  # one line
    assert "--pretrained" in err and "HF_HUB_OFFLINE" in err
    assert not out.exists()
