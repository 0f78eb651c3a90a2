"""Memory of AnomalyEvaluator against the number of test images (256 x 256 maps).

Run from the repository root:

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/bench_evaluate_memory.py

For each ``N`` (``--n``), a fresh process feeds ``N`` synthetic images to
``AnomalyEvaluator.update`` in batches of ``--batch-size``, as ``CNCDetector.evaluate``
does (float32 maps and bool masks at ``--size`` x ``--size``), then calls ``compute()``.
Maps are smooth noise plus a bump over each defect; half the images (on average) are
anomalous, with 1 to 4 elliptic defects of radii 4 to 40 px at 256 x 256 (scaled with
``--size``, so that the defective share of pixels does not depend on it). The images form
one category, or ``--categories K`` consecutive blocks of ``N / K`` images, as a loader
over an MVTec-layout folder yields them. Data are generated batch by batch from
``(seed, batch index)``, so every run and every evaluator sees the same images and the
whole test set never exists outside the evaluator.

Printed per ``N`` (memory in MiB on top of the process after its imports):

* ``held``: resident set size after the last ``update`` (what the evaluator holds, plus
  whatever the allocator kept of freed batches);
* ``update peak`` / ``compute peak``: peak resident set size (``ru_maxrss``) during the
  accumulation (including one generated batch) and during ``compute()``;
* ``kept``: resident set size after ``compute()`` (the evaluator keeps the sorted scores
  for a later ``compute()``);
* the seconds of the update loop (data generation included) and of ``compute()``.

Then the least-squares bytes per image of each column and the largest ``N`` whose compute
peak fits in ``--budget-gb``. ``--evaluator FILE`` measures the ``AnomalyEvaluator`` of
another copy of ``evaluation.py`` (e.g. an older version) on the same data, and the
metric values of every run are printed so that two versions can be compared.
"""

from __future__ import annotations

import os

for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

MIB = 2**20


def interpolation_matrix(size: int, coarse: int) -> np.ndarray:
    """``(size, coarse)`` float32 matrix of linear interpolation from a coarse grid."""
    positions = np.linspace(0, coarse - 1, size)
    low = np.minimum(np.floor(positions).astype(int), coarse - 2)
    fraction = (positions - low).astype(np.float32)
    matrix = np.zeros((size, coarse), dtype=np.float32)
    matrix[np.arange(size), low] = 1 - fraction
    matrix[np.arange(size), low + 1] = fraction
    return matrix


def make_batch(
    seed: int, index: int, batch_size: int, size: int, smooth: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Scores ``(B,)``, labels ``(B,)``, maps ``(B, size, size)`` float32, masks (bool)."""
    rng = np.random.default_rng([seed, index])
    coarse = rng.standard_normal((batch_size, smooth.shape[1], smooth.shape[1]), np.float32)
    maps = 0.2 + 0.05 * (smooth @ coarse @ smooth.T)
    maps += 0.01 * rng.standard_normal(maps.shape, np.float32)
    masks = np.zeros(maps.shape, dtype=bool)
    labels = rng.random(batch_size) < 0.5
    for image in np.flatnonzero(labels):
        for _ in range(rng.integers(1, 5)):
            radii = rng.uniform(4, 40, 2) * (size / 256)
            center = rng.uniform(0, size, 2)
            low = np.maximum((center - 3 * radii).astype(int), 0)
            high = np.minimum((center + 3 * radii).astype(int) + 1, size)
            rows = np.arange(low[0], high[0])[:, None]
            cols = np.arange(low[1], high[1])[None, :]
            distance = ((rows - center[0]) / radii[0]) ** 2 + ((cols - center[1]) / radii[1]) ** 2
            box = (image, slice(low[0], high[0]), slice(low[1], high[1]))
            masks[box] |= distance <= 1.0
            maps[box] += (rng.uniform(0.05, 0.3) * np.exp(-0.5 * distance)).astype(np.float32)
    return maps.max(axis=(1, 2)).astype(np.float64), labels, maps, masks


def current_rss() -> int:
    """Resident set size of this process in bytes (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def peak_rss() -> int:
    """Peak resident set size of this process so far, in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def load_evaluator(path: str | None) -> type:
    if path is None:
        from cncad.evaluation import AnomalyEvaluator

        return AnomalyEvaluator
    spec = importlib.util.spec_from_file_location("bench_evaluation", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.AnomalyEvaluator


def worker(n: int, args: argparse.Namespace) -> dict[str, Any]:
    """Feed ``n`` images to a fresh evaluator, then compute; one process per call."""
    evaluator_class = load_evaluator(args.evaluator)
    smooth = interpolation_matrix(args.size, 9)
    make_batch(args.seed + 1, 0, 2, args.size, smooth)  # warm up the generator's code paths
    baseline = current_rss()
    baseline_peak = peak_rss()
    evaluator = evaluator_class()
    n_defect = n_anomalous = 0
    start = time.perf_counter()
    for index, first in enumerate(range(0, n, args.batch_size)):
        count = min(args.batch_size, n - first)
        scores, labels, maps, masks = make_batch(args.seed, index, count, args.size, smooth)
        n_defect += int(np.count_nonzero(masks))
        n_anomalous += int(labels.sum())
        names = [f"category{i * args.categories // n}" for i in range(first, first + count)]
        evaluator.update(scores, labels, maps, masks, names)
        del scores, labels, maps, masks
    update_seconds = time.perf_counter() - start
    held = current_rss() - baseline
    update_peak = peak_rss()

    start = time.perf_counter()
    results = evaluator.compute()
    compute_seconds = time.perf_counter() - start
    compute_peak = peak_rss()
    kept = current_rss() - baseline
    return {
        "n": n,
        "pixels": n * args.size**2,
        "defect_fraction": n_defect / (n * args.size**2),
        "anomalous": n_anomalous,
        "baseline_rss": baseline,
        "baseline_peak": baseline_peak,
        "held": held,
        "update_peak": update_peak - baseline,
        "compute_peak": compute_peak - baseline,
        "kept_rss": kept,
        "update_seconds": update_seconds,
        "compute_seconds": compute_seconds,
        "metrics": results["mean"],
    }


def slope(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares ``(slope, intercept)`` of ``ys`` against ``xs``."""
    fitted = np.polyfit(np.asarray(xs, dtype=float), np.asarray(ys, dtype=float), 1)
    return float(fitted[0]), float(fitted[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[500, 1000, 2000, 4000])
    parser.add_argument("--size", type=int, default=256, help="evaluation resolution")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--categories", type=int, default=1, help="equal consecutive blocks")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--evaluator", help="evaluation.py file to take AnomalyEvaluator from")
    parser.add_argument("--budget-gb", type=float, default=24.0, help="memory for the limit")
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        print(json.dumps(worker(args.n[0], args)))
        return

    rows = []
    for n in args.n:
        command = [sys.executable, __file__, "--worker", "--n", str(n), "--size", str(args.size)]
        command += ["--batch-size", str(args.batch_size), "--seed", str(args.seed)]
        command += ["--categories", str(args.categories)]
        if args.evaluator:
            command += ["--evaluator", args.evaluator]
        done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
        row = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(
            f"N={n:5d}: {row['pixels'] / 1e6:6.0f}M px, {100 * row['defect_fraction']:.2f}% "
            f"defective, held {row['held'] / MIB:7.0f} MiB, update peak "
            f"{row['update_peak'] / MIB:7.0f} MiB, compute peak {row['compute_peak'] / MIB:7.0f}"
            f" MiB, kept {row['kept_rss'] / MIB:7.0f} MiB, update {row['update_seconds']:5.1f} s,"
            f" compute {row['compute_seconds']:5.1f} s (baseline RSS "
            f"{row['baseline_rss'] / MIB:.0f} MiB)",
            flush=True,
        )
        print("        " + json.dumps(row["metrics"]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))

    if len(rows) < 2:
        return
    ns = [row["n"] for row in rows]
    pixels = args.size**2
    print(f"\nleast-squares cost per image ({args.size} x {args.size} = {pixels} px):")
    for key in ("held", "update_peak", "compute_peak", "kept_rss"):
        per_image, intercept = slope(ns, [row[key] for row in rows])
        print(
            f"  {key:13s}: {per_image / 1024:7.1f} KiB/image = {per_image / pixels:5.2f} B/px "
            f"(intercept {intercept / MIB:6.0f} MiB)"
        )
    per_image, intercept = slope(ns, [row["compute_peak"] for row in rows])
    budget = args.budget_gb * 1e9 - rows[0]["baseline_rss"]
    largest = (budget - intercept) / per_image
    print(
        f"largest N with the compute peak in {args.budget_gb:g} GB (less the "
        f"{rows[0]['baseline_rss'] / MIB:.0f} MiB baseline): {largest:,.0f}"
    )


if __name__ == "__main__":
    main()
