"""Time cncad.metrics on a synthetic test set the size of MVTec AD's, on one CPU core.

Run from the repository root (single-threaded BLAS/OpenMP and pinned to one core):

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 \\
        PYTHONPATH=src python benchmarks/bench_metrics.py

The data set mimics MVTec AD's test split: 1725 anomaly maps of 256 x 256 (113M pixels),
1258 defective images with 1-5 elliptic defects each (radii 2-40 px) and 467 all-normal
images. Maps are smooth float32 noise plus a blurred response over each defect.

Printed per metric: the best wall time over ``--repeats`` runs and the peak memory it
allocated on top of the inputs (tracemalloc, which sees NumPy's buffers). Also timed:
the literal 200-threshold AUPRO loop (binarise all maps per threshold, per-region
overlap from precomputed region labels) against the exact AUPRO and against the
200-threshold option, and scikit-learn on a subset for P-AUROC / P-AP.
"""

from __future__ import annotations

import os

for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

import argparse  # noqa: E402
import resource  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from scipy import ndimage  # noqa: E402
from sklearn.metrics import auc, average_precision_score, roc_auc_score  # noqa: E402

from cncad import metrics  # noqa: E402

N_IMAGES, N_DEFECTIVE, SIZE = 1725, 1258, 256


def make_dataset(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Maps ``(1725, 256, 256)`` float32 and masks of the same shape (bool)."""
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    maps = np.empty((N_IMAGES, SIZE, SIZE), dtype=np.float32)
    for start in range(0, N_IMAGES, 128):
        stop = min(start + 128, N_IMAGES)
        coarse = torch.randn(stop - start, 1, 32, 32, generator=generator)
        smooth = F.interpolate(coarse, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
        fine = torch.randn(stop - start, 1, SIZE, SIZE, generator=generator)
        maps[start:stop] = (0.2 + 0.05 * smooth + 0.01 * fine)[:, 0].numpy()
    masks = np.zeros(maps.shape, dtype=bool)
    rows, cols = np.mgrid[0:SIZE, 0:SIZE]
    for index in rng.permutation(N_IMAGES)[:N_DEFECTIVE]:
        response = np.zeros((SIZE, SIZE), dtype=np.float32)
        for _ in range(rng.integers(1, 6)):
            radius_r, radius_c = rng.uniform(2, 40, 2)
            center_r, center_c = rng.uniform(0, SIZE, 2)
            distance = ((rows - center_r) / radius_r) ** 2 + ((cols - center_c) / radius_c) ** 2
            masks[index] |= distance <= 1.0
            strength = rng.uniform(0.02, 0.3)
            np.maximum(response, strength * np.exp(-0.5 * distance), out=response)
        maps[index] += ndimage.gaussian_filter(response, sigma=2.0)
    return maps, masks


def measure(function: Callable[[], Any], repeats: int) -> tuple[Any, float, float]:
    """(result, best seconds, peak MiB allocated during one call)."""
    best = float("inf")
    result = None
    peak = 0.0
    for _ in range(repeats):
        tracemalloc.start()
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
        peak = max(peak, tracemalloc.get_traced_memory()[1] / 2**20)
        tracemalloc.stop()
    return result, best, peak


def naive_grid_aupro(maps: np.ndarray, masks: np.ndarray, num_thresholds: int = 200) -> float:
    """The usual 200-threshold loop, written efficiently but without any sorting."""
    structure = np.ones((3, 3), dtype=int)
    region_labels = np.zeros(maps.shape, dtype=np.int32)
    n_regions = 0
    for index in range(len(masks)):
        labelled, count = ndimage.label(masks[index], structure=structure)
        region_labels[index] = np.where(labelled > 0, labelled + n_regions, 0)
        n_regions += count
    region_sizes = np.bincount(region_labels.ravel(), minlength=n_regions + 1)[1:]
    normal = ~masks
    n_normal = np.count_nonzero(normal)
    low, high = float(maps.min()), float(maps.max())
    step = (high - low) / num_thresholds
    fprs, pros = [], []
    for k in range(num_thresholds):
        threshold = low + k * step
        # float32 maps > float64 threshold, as RD4AD's float64 maps compare (NumPy would
        # otherwise round the Python float threshold to float32 to the nearest).
        cut = np.float32(threshold)
        if float(cut) > threshold:
            cut = np.nextafter(cut, np.float32(-np.inf))
        predicted = maps > cut
        fprs.append(np.count_nonzero(predicted & normal) / n_normal)
        hits = np.bincount(region_labels[predicted], minlength=n_regions + 1)[1:]
        pros.append(np.mean(hits / region_sizes))
    fprs_np, pros_np = np.array(fprs), np.array(pros)
    keep = fprs_np < 0.3
    return float(auc(fprs_np[keep] / fprs_np[keep].max(), pros_np[keep]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2, help="best-of runs per metric")
    parser.add_argument("--sklearn-images", type=int, default=172, help="subset for sklearn")
    parser.add_argument("--skip-naive", action="store_true", help="skip the slow grid loop")
    args = parser.parse_args()

    torch.set_num_threads(1)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

    start = time.perf_counter()
    maps, masks = make_dataset(args.seed)
    scores = maps.max(axis=(1, 2))
    labels = masks.any(axis=(1, 2))
    n_regions = sum(ndimage.label(m, structure=np.ones((3, 3)))[1] for m in masks)
    print(
        f"data: {maps.shape[0]} maps {maps.shape[1]}x{maps.shape[2]} float32 "
        f"({maps.size / 1e6:.0f}M pixels, {100 * masks.mean():.2f}% defective, "
        f"{labels.sum()} defective images, {n_regions} regions), "
        f"generated in {time.perf_counter() - start:.1f} s"
    )
    print(
        f"threads: torch {torch.get_num_threads()}, OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"
    )

    exact_name, grid_name = "AUPRO    aupro (exact)", "AUPRO    aupro(num_thresholds=200)"
    runs: list[tuple[str, Callable[[], Any]]] = [
        ("I-AUROC  image_auroc", lambda: metrics.image_auroc(scores, labels)),
        ("I-AP     image_ap", lambda: metrics.image_ap(scores, labels)),
        ("I-F1max  image_f1_max", lambda: metrics.image_f1_max(scores, labels)),
        ("P-AUROC  pixel_auroc", lambda: metrics.pixel_auroc(maps, masks)),
        ("P-AP     pixel_ap", lambda: metrics.pixel_ap(maps, masks)),
        ("P-F1max  pixel_f1_max", lambda: metrics.pixel_f1_max(maps, masks)),
        (exact_name, lambda: metrics.aupro(maps, masks)),
        (grid_name, lambda: metrics.aupro(maps, masks, num_thresholds=200)),
        ("image_metrics (3 image metrics)", lambda: metrics.image_metrics(scores, labels)),
        ("pixel_metrics (4 pixel metrics)", lambda: metrics.pixel_metrics(maps, masks)),
    ]
    print(f"\n{'metric':<40}{'value':>10}{'best s':>10}{'peak MiB':>10}")
    timings: dict[str, float] = {}
    values: dict[str, Any] = {}
    for name, function in runs:
        value, seconds, peak = measure(function, args.repeats)
        timings[name], values[name] = seconds, value
        shown = f"{value:.6f}" if isinstance(value, float) else "-"
        print(f"{name:<40}{shown:>10}{seconds:>10.3f}{peak:>10.0f}")
    seven_separately = sum(seconds for name, seconds in list(timings.items())[:7])
    seven_shared = timings[runs[-2][0]] + timings[runs[-1][0]]
    print(f"\nall seven, one function each            {seven_separately:>10.3f} s")
    print(f"all seven, image_metrics + pixel_metrics {seven_shared:>9.3f} s")
    print(f"  {values[runs[-1][0]]}")

    subset = slice(0, args.sklearn_images)
    sub_maps, sub_masks = maps[subset], masks[subset]
    flat_scores, flat_labels = sub_maps.ravel(), sub_masks.ravel()
    megapixels = flat_scores.size / 1e6
    print(f"\nscikit-learn vs cncad on {args.sklearn_images} images ({megapixels:.1f}M px)")
    for label, ours, theirs in [
        ("P-AUROC", metrics.pixel_auroc, roc_auc_score),
        ("P-AP", metrics.pixel_ap, average_precision_score),
    ]:
        ours_value, ours_s, _ = measure(lambda f=ours: f(sub_maps, sub_masks), args.repeats)
        sk_value, sk_s, _ = measure(lambda f=theirs: f(flat_labels, flat_scores), 1)
        print(
            f"  {label:<8} sklearn {sk_s:7.3f} s  cncad {ours_s:7.3f} s  "
            f"x{sk_s / ours_s:5.1f}  |difference| {abs(ours_value - sk_value):.1e}"
        )

    if not args.skip_naive:
        print("\nreference: literal 200-threshold AUPRO loop (one run)")
        naive_value, naive_s, naive_peak = measure(lambda: naive_grid_aupro(maps, masks), 1)
        print(f"  loop value {naive_value:.6f} in {naive_s:.1f} s, peak {naive_peak:.0f} MiB")
        grid_value, grid_gain = values[grid_name], naive_s / timings[grid_name]
        print(
            f"  aupro(num_thresholds=200) = {grid_value:.6f}, |difference| "
            f"{abs(grid_value - naive_value):.1e}, x{grid_gain:.1f} faster"
        )
        exact_value, exact_gain = values[exact_name], naive_s / timings[exact_name]
        print(f"  exact aupro = {exact_value:.6f}, x{exact_gain:.1f} faster than the loop")
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    print(
        f"\nprocess peak RSS {max_rss:.0f} MiB (inputs: maps {maps.nbytes / 2**20:.0f} MiB, "
        f"masks {masks.nbytes / 2**20:.0f} MiB)"
    )


if __name__ == "__main__":
    main()
