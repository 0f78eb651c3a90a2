"""Sweep of bad inputs and faults against the Python API and the command line.

Runs each case once and sorts the outcome:

* ``clear``: a bad input was refused with a one-line message from cncad's own checks
  (a cncad error type, an ``OSError``, or a ``ValueError``/``TypeError``/``RuntimeError``
  raised by cncad's code, as ``cncad.cli`` judges it), or, on the command line, exit status
  1, 2 or 3 with the message on stderr;
* ``correct``: an input that is unusual but valid gave a result;
* ``silent``: a bad input was accepted;
* ``unclear``: the error came from deep inside torch, numpy or PIL, or was not one line,
  or the command line reported an internal error (exit 70);
* ``wrong``: a valid input failed.

Every file the cases read (data, images, the model) is hashed before and after the sweep;
any change is reported as ``lost``. The tiny random backbone is trained for one epoch on a
small generated dataset first, so the figures say nothing about detection quality.

Usage::

    python benchmarks/bad_input_sweep.py [--json results.json] [--verbose]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import math
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from cncad.cli import _is_user_error, main
from cncad.config import CNCConfig
from cncad.data.synthetic import make_synthetic_dataset
from cncad.detector import CNCDetector

TINY = {"backbone": "tiny", "pretrained": None, "image_size": 56, "device": "cpu"}
TINY_ARGS = ["--backbone", "tiny", "--image-size", "56", "--epochs", "1", "--batch-size", "4"]
TINY_ARGS += ["--device", "cpu", "--quiet"]


class Case:
    def __init__(self, name: str, run: Callable[[], Any], bad: bool = True) -> None:
        self.name, self.run, self.bad = name, run, bad


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _api_outcome(case: Case) -> tuple[str, str]:
    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            case.run()
    except Exception as error:
        message = str(error).strip()
        one_line = bool(message) and "\n" not in message
        if not case.bad:
            return "wrong", f"{type(error).__name__}: {message[:160]}"
        if _is_user_error(error) and one_line:
            return "clear", f"{type(error).__name__}: {message[:160]}"
        return "unclear", f"{type(error).__name__}: {message[:160]}"
    return ("silent", "accepted") if case.bad else ("correct", "ok")


def _cli_outcome(case: Case) -> tuple[str, str]:
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            status = case.run()
    except SystemExit as stop:
        status = stop.code
    except Exception as error:  # a traceback would reach the user
        return ("unclear" if case.bad else "wrong"), f"traceback: {type(error).__name__}"
    lines = [line for line in err.getvalue().splitlines() if line.startswith(("cncad", "usage"))]
    last = err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else ""
    if status == 70:
        return ("unclear" if case.bad else "wrong"), last[:160]
    if not case.bad:
        return ("correct" if status == 0 else "wrong"), f"exit {status}: {last[:120]}"
    if status in (1, 2, 3) and lines:
        return "clear", f"exit {status}: {last[:160]}"
    return "silent", f"exit {status}"


def _image(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path) if mode else Image.fromarray(array).save(path)
    return path


class _Items(Dataset):
    def __init__(self, items: list[Any]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Any:
        return self.items[index]


def build_cases(work: Path, detector: CNCDetector, model: Path, data: Path) -> list[Case]:
    rng = np.random.default_rng(0)
    pic = (rng.random((40, 40, 3)) * 255).astype(np.uint8)
    files = work / "inputs"
    good = _image(files / "good.png", pic)
    corrupt = files / "corrupt.png"
    corrupt.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    empty = files / "empty.png"
    empty.write_bytes(b"")
    text = files / "notes.png"
    text.write_text("not an image")
    float_inf = np.full((30, 30), 0.5, np.float32)
    float_inf[2, 3] = np.inf
    tiff_inf = files / "inf.tiff"
    Image.fromarray(float_inf, mode="F").save(tiff_inf)
    bomb = files / "bomb.png"
    Image.new("1", (20000, 20000)).save(bomb)
    sixteen = _image(files / "sixteen.png", (rng.random((30, 30)) * 65535).astype(np.uint16))
    palette = files / "palette.png"
    Image.fromarray(pic).convert("P").save(palette)
    cmyk = files / "cmyk.jpg"
    Image.fromarray(pic).convert("CMYK").save(cmyk)
    rgba = files / "rgba.png"
    Image.fromarray(np.dstack([pic, pic[..., :1]])).save(rgba)
    empty_folder = work / "empty_folder"
    empty_folder.mkdir()
    plain = work / "plain"
    for index in range(4):
        _image(plain / f"{index}.png", (rng.random((48, 48, 3)) * 255).astype(np.uint8))
    mixed = work / "mixed"
    for name in ("a.png", "c.png"):
        _image(mixed / name, pic)
    (mixed / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    not_model = work / "model.txt"
    not_model.write_text("hello")
    a_file = work / "a_file"
    a_file.write_text("keep me")
    norm = lambda t: (t - 0.45) / 0.27  # noqa: E731 - roughly CLIP-normalised
    det = detector
    x = torch.rand(2, 3, 56, 56)

    def fresh(**kw: Any) -> Callable[[], Any]:
        return lambda: CNCDetector(**{**TINY, **kw})

    def untrained() -> CNCDetector:
        return CNCDetector(**TINY)

    def setattr_(name: str, value: Any) -> Callable[[], Any]:
        def run() -> None:
            saved = getattr(det, name)
            try:
                setattr(det, name, value)
            finally:
                setattr(det, name, saved)

        return run

    cases = [
        # configuration values
        *(
            Case(f"config {k}={v!r}", fresh(**{k: v}))
            for k, v in [
                ("image_size", 56.0),
                ("image_size", 0),
                ("image_size", "56"),
                ("image_size", True),
                ("epochs", 1.5),
                ("epochs", -1),
                ("seed", 2**70),
                ("seed", -1),
                ("seed", 1.0),
                ("lr", math.nan),
                ("lr", -1e-3),
                ("lr", "1e-3"),
                ("batch_size", 0),
                ("batch_size", 2.5),
                ("sigma", math.nan),
                ("sigma", -1.0),
                ("theta", -1),
                ("gamma", math.inf),
                ("backbone", 3),
                ("device", "tpu"),
                ("image_score", "median"),
                ("layers", ()),
                ("layers", (1.5,)),
                ("num_experts", 0),
                ("top_k", 99),
                ("bf16", "yes"),
                ("topk", math.nan),
            ]
        ),
        Case("config from_dict with unknown key", lambda: CNCConfig.from_dict({"nope": 1})),
        Case("CNCDetector(config=dict)", lambda: CNCDetector({"image_size": 56})),
        # predict inputs
        Case("predict empty batch tensor", lambda: det.predict(torch.rand(0, 3, 56, 56))),
        Case("predict empty list", lambda: det.predict([])),
        Case("predict None", lambda: det.predict(None)),
        Case("predict int", lambda: det.predict(12)),
        Case("predict batch_size=0", lambda: det.predict(x, batch_size=0)),
        Case("predict batch_size=1.5", lambda: det.predict(x, batch_size=1.5)),
        Case("predict batch_size=True", lambda: det.predict(x, batch_size=True)),
        Case("predict_iter num_workers=-1", lambda: list(det.predict_iter(x, num_workers=-1))),
        Case("predict_iter on_error='ignore'", lambda: list(det.predict_iter(x, on_error="x"))),
        Case("predict 0-255 float tensor", lambda: det.predict(x * 255)),
        Case("predict NaN tensor", lambda: det.predict(torch.full((1, 3, 56, 56), math.nan))),
        Case("predict inf tensor", lambda: det.predict(torch.full((1, 3, 56, 56), math.inf))),
        Case("predict 5-channel tensor", lambda: det.predict(torch.rand(1, 5, 56, 56))),
        Case("predict 5-D tensor", lambda: det.predict(torch.rand(1, 1, 3, 56, 56))),
        Case("predict 0x10 array", lambda: det.predict(np.zeros((0, 10, 3), np.uint8))),
        Case("predict float64 array with NaN", lambda: det.predict(np.full((9, 9, 3), np.nan))),
        Case("predict bool array", lambda: det.predict(np.ones((9, 9), bool))),
        Case("predict PIL mode F with inf", lambda: det.predict(Image.open(tiff_inf))),
        Case("predict missing path", lambda: det.predict(str(work / "missing.png"))),
        Case("predict truncated PNG", lambda: det.predict(corrupt)),
        Case("predict empty file", lambda: det.predict(empty)),
        Case("predict text file named .png", lambda: det.predict(text)),
        Case("predict decompression bomb", lambda: det.predict(bomb)),
        Case("predict empty folder", lambda: det.predict(empty_folder)),
        Case("predict 1x1 image", lambda: det.predict(np.zeros((1, 1, 3), np.uint8)), bad=False),
        Case("predict 1x300 image", lambda: det.predict(np.zeros((1, 300), np.uint8)), bad=False),
        Case("predict 16-bit PNG", lambda: det.predict(sixteen), bad=False),
        Case("predict palette PNG", lambda: det.predict(palette), bad=False),
        Case("predict CMYK JPEG", lambda: det.predict(cmyk), bad=False),
        Case("predict RGBA PNG", lambda: det.predict(rgba), bad=False),
        Case("predict uint8 tensor", lambda: det.predict((x * 255).byte()), bad=False),
        Case("predict mixed sizes", lambda: det.predict([pic, pic[:20]]), bad=False),
        Case("predict with skip", lambda: list(det.predict_iter(mixed, on_error="skip")), False),
        # thresholds
        Case("threshold='0.5'", setattr_("threshold", "0.5")),
        Case("threshold=nan", setattr_("threshold", math.nan)),
        Case("threshold=inf", setattr_("threshold", math.inf)),
        Case("threshold=True", setattr_("threshold", True)),
        Case("pixel_threshold=nan", setattr_("pixel_threshold", math.nan)),
        Case("threshold=np.float32", setattr_("threshold", np.float32(0.3)), bad=False),
        # untrained detector
        Case("untrained predict", lambda: untrained().predict(x)),
        Case("untrained evaluate", lambda: untrained().evaluate(data, progress=False)),
        Case("untrained save", lambda: untrained().save(work / "untrained.cnc")),
        # fit
        Case("fit epochs=1.5", lambda: untrained().fit(data, epochs=1.5, progress=False)),
        Case("fit checkpoint_every=0", lambda: untrained().fit(data, checkpoint_every=0)),
        Case("fit data=12", lambda: untrained().fit(12, progress=False)),
        Case("fit missing folder", lambda: untrained().fit(work / "missing", progress=False)),
        Case("fit empty folder", lambda: untrained().fit(empty_folder, progress=False)),
        Case("fit checkpoint_dir is a file", lambda: untrained().fit(data, checkpoint_dir=a_file)),
        Case("fit cache_memory_gib=nan", lambda: untrained().fit(data, cache_memory_gib=math.nan)),
        Case("fit cache_dtype=int8", lambda: untrained().fit(data, cache_dtype=torch.int8)),
        Case('fit cache="no"', lambda: untrained().fit(data, cache="no", progress=False)),
        Case(
            "fit Dataset of 0-255 floats",
            lambda: untrained().fit(_Items([torch.rand(3, 56, 56) * 255] * 4), progress=False),
        ),
        Case(
            "fit Dataset with a NaN",
            lambda: untrained().fit(
                _Items([norm(torch.rand(3, 56, 56)), torch.full((3, 56, 56), math.nan)] * 2),
                progress=False,
            ),
        ),
        Case(
            "fit Dataset of strings",
            lambda: untrained().fit(_Items(["a", "b"]), progress=False),
        ),
        Case(
            "fit plain image folder",
            lambda: CNCDetector(**TINY, batch_size=2).fit(plain, epochs=1, progress=False),
            bad=False,
        ),
        # evaluate
        Case("evaluate eval_size=0", lambda: det.evaluate(data, eval_size=0, progress=False)),
        Case("evaluate eval_size=2.5", lambda: det.evaluate(data, eval_size=2.5, progress=False)),
        Case("evaluate plain folder", lambda: det.evaluate(plain, progress=False)),
        Case(
            "evaluate Dataset without masks",
            lambda: det.evaluate(_Items([{"image": norm(torch.rand(3, 56, 56))}]), progress=False),
        ),
        # save and load
        Case("save into a folder path", lambda: det.save(empty_folder)),
        Case("save creates missing folders", lambda: det.save(work / "no" / "m.cnc"), bad=False),
        Case("load missing file", lambda: CNCDetector.load(work / "missing.cnc")),
        Case("load a text file", lambda: CNCDetector.load(not_model)),
        Case("load a folder", lambda: CNCDetector.load(empty_folder)),
        Case("load an image", lambda: CNCDetector.load(good)),
    ]
    if hasattr(CNCDetector, "calibrate"):
        cases += [
            Case(f"calibrate target_fpr={v!r}", lambda v=v: det.calibrate(data, target_fpr=v))
            for v in (0.0, 1.5, math.nan, "0.01")
        ]
    return cases


def build_cli_cases(work: Path, model: Path, data: Path) -> list[Case]:
    parts = work / "cli_parts"
    part = _image(parts / "part.png", np.full((40, 40, 3), 90, np.uint8))
    mixed = work / "mixed"
    out = str(work / "cli_out")
    m = str(model)

    def cli(*argv: str) -> Callable[[], int]:
        return lambda: main(list(argv))

    predict = ("predict", m, str(part), "--out", out)
    fit = ("fit", str(data), "--out", str(work / "z.cnc"))
    empty = str(work / "empty_folder")
    return [
        Case("predict --out over the input folder", cli(*predict[:3], "--out", str(parts))),
        Case("predict --out is the model file", cli(*predict[:3], "--out", m)),
        Case("predict --threshold nan", cli(*predict, "--threshold", "nan")),
        Case("predict --vmin nan", cli(*predict, "--vmin", "nan")),
        Case("predict --vmin above --vmax", cli(*predict, "--vmin", "2", "--vmax", "1")),
        Case("predict --batch-size 0", cli(*predict, "--batch-size", "0")),
        Case("predict missing model", cli("predict", str(work / "nope.cnc"), *predict[2:])),
        Case("predict a text model", cli("predict", str(work / "model.txt"), *predict[2:])),
        Case("predict folder with a bad image", cli("predict", m, str(mixed), "--out", out)),
        Case("fit --out is a folder", cli(*fit[:3], empty, *TINY_ARGS)),
        Case("fit --out is the data", cli(*fit[:3], str(data), *TINY_ARGS)),
        Case("fit on an empty folder", cli("fit", empty, *fit[2:], *TINY_ARGS)),
        Case("fit on a test split", cli("fit", str(data / "bolt_like" / "test"), *fit[2:])),
        Case("fit --epochs 1.5", cli(*fit, "--epochs", "1.5")),
        Case("fit --image-size 0", cli(*fit, "--image-size", "0")),
        Case("fit --seed 2**70", cli(*fit, *TINY_ARGS, "--seed", str(2**70))),
        Case("fit --threshold inf", cli(*fit, "--threshold", "inf")),
        Case("evaluate --json is the model", cli("evaluate", m, str(data), "--json", m)),
        Case("evaluate a plain folder", cli("evaluate", m, str(work / "plain"), "--quiet")),
        Case("evaluate --eval-size 0", cli("evaluate", m, str(data), "--eval-size", "0")),
        Case("demo --heatmaps -1", cli("demo", "--heatmaps", "-1")),
        Case("demo --out is a file", cli("demo", "--out", str(work / "a_file"), "--epochs", "1")),
        Case("predict a good image", cli(*predict, "--quiet"), bad=False),
    ]


def main_sweep() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write every case and its outcome here")
    parser.add_argument("--verbose", action="store_true", help="print every case")
    args = parser.parse_args()
    torch.set_num_threads(2)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = make_synthetic_dataset(
            work / "data", categories=("bolt_like",), n_train=4, n_test_good=2,
            n_test_defect=2, image_size=64,
        )  # fmt: skip
        model = work / "model.cnc"
        with contextlib.redirect_stdout(io.StringIO()):
            assert main(["fit", str(data), "--out", str(model), *TINY_ARGS]) == 0
        detector = CNCDetector.load(model)
        api = build_cases(work, detector, model, data)
        cli = build_cli_cases(work, model, data)
        watched = [data, work / "inputs", work / "plain", work / "mixed", work / "cli_parts"]
        before = {k: v for root in watched for k, v in _hashes(root).items()}
        before[str(model)] = hashlib.sha256(model.read_bytes()).hexdigest()
        rows = []
        for kind, cases, judge in (("api", api, _api_outcome), ("cli", cli, _cli_outcome)):
            for case in cases:
                outcome, detail = judge(case)
                rows.append({"kind": kind, "case": case.name, "outcome": outcome, "detail": detail})
                if args.verbose or outcome in ("silent", "unclear", "wrong"):
                    print(f"{outcome:8s} {kind} {case.name}: {detail}")
        after = {k: v for root in watched for k, v in _hashes(root).items()}
        after[str(model)] = hashlib.sha256(model.read_bytes()).hexdigest()
        lost = sorted(k for k in before if after.get(k) != before[k])
    counts = Counter(row["outcome"] for row in rows)
    print(
        f"{len(rows)} cases in {time.perf_counter() - start:.0f} s: "
        + ", ".join(f"{counts[k]} {k}" for k in ("clear", "correct", "silent", "unclear", "wrong"))
        + f"; input files changed: {len(lost)}"
    )
    for path in lost:
        print(f"lost     {path}")
    if args.json is not None:
        args.json.write_text(json.dumps({"rows": rows, "lost": lost}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main_sweep())
