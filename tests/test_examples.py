"""Run every example as a user would: the scripts as subprocesses, the notebook in a kernel.

Each must finish within ``EXAMPLE_TIMEOUT_S`` (the CI budget per example). The processes
get ``OMP_NUM_THREADS=1``: on a shared or small CI machine, torch's default thread pool
oversubscribes the cores and runs several times slower, while one thread is plenty for
these tiny models.
"""

from __future__ import annotations

import math
import re
import sys
import time
from pathlib import Path

import pytest

from _subprocess import run_checked

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
EXAMPLE_TIMEOUT_S = 60


def _run_script(name: str, *args: str, cwd: Path) -> str:
    return run_checked(
        [sys.executable, str(EXAMPLES / name), *args], cwd=cwd, timeout=EXAMPLE_TIMEOUT_S
    )


def _number_after(label: str, text: str) -> float:
    match = re.search(rf"{re.escape(label)}\s+(-?[0-9.]+)", text)
    assert match, f"{label!r} not found in:\n{text}"
    return float(match.group(1))


def test_examples_folder_holds_what_is_tested() -> None:
    """A new example must get a test here (and then be added to this list)."""
    found = sorted(p.name for p in EXAMPLES.iterdir() if p.suffix in {".py", ".ipynb"})
    assert found == ["compose_rd.py", "quickstart.ipynb", "quickstart.py"]


def test_quickstart_script(tmp_path: Path) -> None:
    out = _run_script("quickstart.py", cwd=tmp_path)
    table = out.splitlines()
    header = next(line for line in table if line.startswith("Category"))
    assert header.split()[1:8] == [
        "I-AUROC",
        "P-AUROC",
        "AUPRO",
        "I-AP",
        "P-AP",
        "I-F1max",
        "P-F1max",
    ]
    for category in ("bolt_like", "carpet_like", "Mean"):
        row = next(line for line in table if line.startswith(category))
        values = [float(v) for v in row.split()[1:8]]
        assert all(0.0 <= v <= 100.0 for v in values), row
    assert re.search(r"000\.png: score \d+\.\d+, map \(1, 64, 64\)", out)
    assert "saved and reloaded model.cnc: identical scores" in out
    assert list(tmp_path.iterdir()) == [], "the example must clean up after itself"


def test_compose_rd_script(tmp_path: Path) -> None:
    out = _run_script("compose_rd.py", "--epochs", "2", cwd=tmp_path)
    losses = [float(v) for v in re.findall(r"epoch \d+: mean loss ([0-9.]+) \(4 steps\)", out)]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses), out
    assert "scored 24 test images, maps (24, 128, 128)" in out
    for metric in ("I-AUROC", "P-AUROC"):
        assert 0.0 <= _number_after(metric, out) <= 1.0
    trainable = int(re.search(r"trainable parameters: ([0-9,]+)", out).group(1).replace(",", ""))
    frozen = int(re.search(r"frozen: ([0-9,]+)", out).group(1).replace(",", ""))
    assert trainable > 0 and frozen > trainable  # the ResNet-18 teacher is frozen


def test_quickstart_notebook_is_stored_without_outputs() -> None:
    nbformat = pytest.importorskip("nbformat")
    notebook = nbformat.read(EXAMPLES / "quickstart.ipynb", as_version=4)
    nbformat.validate(notebook)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None


def test_quickstart_notebook_executes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("matplotlib")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the kernel inherits this environment
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the notebook's %matplotlib decides
    notebook = nbformat.read(EXAMPLES / "quickstart.ipynb", as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        timeout=EXAMPLE_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError on the first failing cell
    elapsed = time.perf_counter() - start
    assert elapsed < EXAMPLE_TIMEOUT_S, f"the notebook took {elapsed:.1f} s"

    def stream(cell: dict) -> str:
        return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")

    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    text = "\n".join(stream(cell) for cell in code)
    assert "Mean" in text and "I-AUROC" in text
    assert re.search(r"flagged \d+ of 16 defective test images", text)
    assert "same scores True" in text
    figures = [
        o
        for cell in code
        for o in cell.outputs
        if o.output_type == "display_data" and "image/png" in o.get("data", {})
    ]
    assert len(figures) == 1, "the heatmap figure is shown inline"
