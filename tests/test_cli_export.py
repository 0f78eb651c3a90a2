"""``cncad export`` and ``cncad predict MODEL.onnx``: the same outputs as the .cnc model."""

from __future__ import annotations

import contextlib
import csv
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from _subprocess import run_without_torch
from cncad import CNCDetector
from cncad.cli import main

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("cli_export")
    detector = CNCDetector(
        backbone="tiny", pretrained=None, image_size=56, sigma=1.0, batch_size=2,
        allow_untrained=True,
    )  # fmt: skip
    model = detector.save(root / "model.cnc")
    rng = np.random.default_rng(0)
    images = root / "images"
    (images / "sub").mkdir(parents=True)
    for name, size in (("a.png", (56, 56)), ("b.png", (70, 90)), ("sub/c.png", (40, 40))):
        pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / name)
    onnx_file = root / "model.onnx"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["export", str(model), "--out", str(onnx_file)]) == 0
    return {"root": root, "model": model, "onnx": onnx_file, "images": images, "out": printed}


def _scores(folder: Path) -> list[dict[str, str]]:
    with (folder / "scores.csv").open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_export_writes_a_file_onnx_detector_reads(files):
    from cncad.deploy import ONNXDetector

    assert f"to {files['onnx']}" in files["out"].getvalue()
    deployed = ONNXDetector(files["onnx"])
    assert deployed.image_size == 56 and deployed.batch_size == 2


def test_predict_with_the_onnx_file_gives_the_same_outputs(files):
    root = files["root"]
    common = [str(files["images"]), "--threshold", "2.5", "--save-maps", "npy", "--save-masks"]
    common += ["--vmin", "0", "--vmax", "4", "--quiet", "--device", "cpu"]
    assert main(["predict", str(files["model"]), *common, "--out", str(root / "torch")]) == 0
    assert main(["predict", str(files["onnx"]), *common, "--out", str(root / "onnx")]) == 0
    torch_rows, onnx_rows = _scores(root / "torch"), _scores(root / "onnx")
    assert [r["path"] for r in onnx_rows] == [r["path"] for r in torch_rows]
    assert len(onnx_rows) == 3
    for got, want in zip(onnx_rows, torch_rows, strict=True):
        assert float(got["score"]) == pytest.approx(float(want["score"]), abs=1e-4)
        assert got["is_anomalous"] == want["is_anomalous"]
    written = sorted(p.relative_to(root / "torch") for p in (root / "torch").rglob("*.*"))
    assert sorted(p.relative_to(root / "onnx") for p in (root / "onnx").rglob("*.*")) == written
    for relative in written:
        if relative.name.endswith(".map.npy"):
            np.testing.assert_allclose(
                np.load(root / "onnx" / relative), np.load(root / "torch" / relative), atol=1e-3
            )
        elif relative.suffix == ".png":
            got = np.asarray(Image.open(root / "onnx" / relative), dtype=np.int16)
            want = np.asarray(Image.open(root / "torch" / relative), dtype=np.int16)
            assert got.shape == want.shape
            assert np.abs(got - want).max() <= 1  # a colour level at most, from rounding


def test_export_refuses_to_overwrite_the_model_and_bad_outputs(files, capsys):
    model = files["model"]
    before = model.read_bytes()
    assert main(["export", str(model), "--out", str(model)]) == 1
    assert "is also an input" in capsys.readouterr().err
    assert model.read_bytes() == before
    assert main(["export", str(model), "--out", str(files["root"])]) == 1
    assert "is a folder" in capsys.readouterr().err
    assert main(["export", str(files["root"] / "missing.cnc"), "--out", "x.onnx"]) == 1
    err = capsys.readouterr().err
    assert err.count("cncad: error:") == 1 and "Traceback" not in err


def test_predict_refuses_a_file_that_is_not_a_cncad_onnx_model(files, capsys):
    fake = files["root"] / "fake.onnx"
    fake.write_text("not a model")
    status = main(["predict", str(fake), str(files["images"]), "--out", str(files["root"] / "x")])
    assert status == 1
    assert "not a readable ONNX model" in capsys.readouterr().err


def test_predict_with_an_onnx_file_needs_no_torch(files, tmp_path):
    """``cncad predict MODEL.onnx`` in a process where importing torch fails."""
    out = tmp_path / "out"
    script = f"""
import json
from cncad.cli import main

status = main(["predict", {str(files["onnx"])!r}, {str(files["images"])!r},
               "--out", {str(out)!r}, "--quiet"])
print(json.dumps({{"status": status, "torch": "torch" in sys.modules}}))
"""
    assert json.loads(run_without_torch(script)) == {"status": 0, "torch": False}
    assert len(_scores(out)) == 3
    assert (out / "images" / "sub" / "c.png").is_file()
