"""Reproduce the paper's Table 1 (MVTec AD) or Table 3 (VisA) layout with cncad.

Trains one multi-class CNC model on every category under ``--data`` with the paper's
settings (ViT-L/14@336 CLIP with OpenAI weights, 224 px, batch 8, Adam lr 1e-3,
tau 0.001, 5 experts top-2, theta 5, 250 epochs for MVTec AD and 200 for VisA), evaluates
each category on its test split and prints I-AUROC/P-AUROC/AUPRO/I-AP/P-AP per category
and their mean next to the paper's "CND (Ours)" figures, with wall time and peak GPU
memory.

With real weights and a GPU, this is the command that checks our numbers::

    python benchmarks/reproduce.py --data /data/mvtec_ad --device cuda
    python benchmarks/reproduce.py --data /data/visa_1cls --device cuda   # VisA, 200 epochs
    # offline: a local checkpoint instead of the hub download
    python benchmarks/reproduce.py --data /data/mvtec_ad --device cuda \\
        --pretrained /models/ViT-L-14-336px-openai.bin

Without weights (the CI machine, the development VM) it runs the same pipeline with the
tiny random backbone, which measures the code path, not the method::

    python benchmarks/reproduce.py --tiny            # ../shared/data, 112 px, 3 epochs

VisA must be in the MVTec-style layout (``<category>/train/good``, ``test/...``,
``ground_truth/...``; e.g. the "1cls" split). Metrics follow ``docs/metrics.md``
(exact AUPRO over all regions of a category, maps compared at ``--eval-size``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from cncad import CNCDetector
from cncad.data import find_categories

TABLE_METRICS = ("I-AUROC", "P-AUROC", "AUPRO", "I-AP", "P-AP")

# "CND (Ours)" columns of the paper's Table 1 (MVTec AD) and Table 3 (VisA), in percent.
PAPER_MVTEC = {
    "bottle": (100.0, 99.0, 97.1, 100.0, 81.8),
    "cable": (98.9, 98.2, 92.5, 99.3, 64.1),
    "capsule": (98.0, 98.2, 93.8, 99.3, 36.9),
    "hazelnut": (100.0, 98.8, 94.9, 100.0, 53.3),
    "metal_nut": (100.0, 95.5, 89.2, 100.0, 68.4),
    "pill": (96.8, 98.8, 96.1, 99.5, 80.2),
    "screw": (93.8, 99.0, 94.7, 98.3, 26.2),
    "toothbrush": (99.5, 99.0, 93.0, 99.8, 49.7),
    "transistor": (96.0, 94.5, 74.1, 94.4, 57.3),
    "zipper": (99.1, 97.6, 93.8, 99.8, 45.1),
    "carpet": (99.9, 99.3, 97.0, 99.9, 70.7),
    "grid": (99.1, 98.4, 95.0, 99.7, 25.8),
    "leather": (100.0, 99.5, 98.7, 100.0, 50.1),
    "tile": (100.0, 97.7, 94.1, 100.0, 73.4),
    "wood": (98.3, 96.4, 91.4, 99.5, 63.3),
    "Mean": (98.6, 98.0, 93.0, 99.3, 56.4),
}
PAPER_VISA = {
    "pcb1": (94.1, 99.5, 92.6, 91.7, 70.7),
    "pcb2": (95.9, 98.4, 88.8, 92.2, 18.1),
    "pcb3": (92.0, 98.6, 93.7, 93.9, 21.7),
    "pcb4": (99.9, 99.0, 90.5, 99.8, 40.5),
    "macaroni1": (86.7, 98.6, 90.5, 84.4, 7.8),
    "macaroni2": (84.4, 98.1, 93.6, 81.3, 12.7),
    "capsules": (83.4, 98.4, 88.6, 89.2, 33.6),
    "candle": (93.7, 98.4, 91.9, 90.0, 16.7),
    "cashew": (94.1, 98.1, 87.4, 92.8, 62.9),
    "chewinggum": (98.7, 99.1, 89.4, 99.2, 61.3),
    "fryum": (96.4, 97.0, 92.1, 97.9, 47.3),
    "pipe_fryum": (98.9, 98.4, 97.5, 99.0, 61.4),
    "Mean": (93.2, 98.5, 91.4, 92.6, 37.8),
}
PAPER_EPOCHS = {"mvtec": 250, "visa": 200}


def detect_benchmark(categories: list[str]) -> str | None:
    """'mvtec' or 'visa' when every category belongs to that benchmark, else None."""
    for name, table in (("mvtec", PAPER_MVTEC), ("visa", PAPER_VISA)):
        if categories and all(c.replace("-", "_") in table for c in categories):
            return name
    return None


def format_row(name: str, ours: dict[str, float] | None, paper: tuple | None) -> str:
    def cells(values: list[float] | None) -> str:
        if values is None:
            return f"{'-':>29}"
        return "/".join(f"{v:5.1f}" for v in values).rjust(29)

    our_values = None if ours is None else [100 * ours[m] for m in TABLE_METRICS]
    return f"{name:<20}{cells(our_values)}   {cells(None if paper is None else list(paper))}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--data", default="../shared/data", help="root of the categories")
    parser.add_argument("--backbone", default="ViT-L-14-336-quickgelu")
    parser.add_argument(
        "--pretrained", default="openai", help="open_clip tag or a local checkpoint path"
    )
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument(
        "--epochs", type=int, default=None, help="default: the paper's (250 MVTec AD, 200 VisA)"
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-size", type=int, default=256)
    parser.add_argument("--no-cache", action="store_true", help="recompute the encoder each epoch")
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="tiny random backbone, 112 px, 3 epochs: checks the pipeline, not the method",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    root = Path(args.data)
    categories = list(find_categories(root))
    benchmark = detect_benchmark(categories)
    epochs = args.epochs or PAPER_EPOCHS.get(benchmark or "mvtec", 250)
    options = dict(
        backbone=args.backbone,
        pretrained=args.pretrained,
        image_size=args.image_size,
        batch_size=args.batch_size,
        lr=args.lr,
        device=args.device,
        seed=args.seed,
        epochs=epochs,
    )
    if args.tiny:
        options.update(backbone="tiny", pretrained=None, image_size=112, theta=1, sigma=2.0)
        options["epochs"] = args.epochs or 3
    print(f"data: {root} ({len(categories)} categories: {', '.join(categories)})")
    print("settings: " + ", ".join(f"{k}={v}" for k, v in options.items()))

    detector = CNCDetector(**options)
    if detector.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(detector.device)
    start = time.perf_counter()
    detector.fit(root, cache=not args.no_cache)
    fit_seconds = time.perf_counter() - start
    results = detector.evaluate(root, eval_size=args.eval_size)
    total_seconds = time.perf_counter() - start

    paper = {"mvtec": PAPER_MVTEC, "visa": PAPER_VISA}.get(benchmark or "", {})
    title = {"mvtec": "Table 1 (MVTec AD)", "visa": "Table 3 (VisA)"}.get(benchmark or "")
    print()
    print(f"{'':<20}{'cncad (this run)':>29}   {'paper, CND (Ours)':>29}")
    print(f"{'category':<20}{'/'.join(m for m in TABLE_METRICS):>29}")
    for name, values in results["per_category"].items():
        print(format_row(name, values, paper.get(name.replace("-", "_"))))
    print(format_row("Mean", results["mean"], paper.get("Mean")))
    ours_total = sum(100 * results["mean"][m] for m in TABLE_METRICS) / len(TABLE_METRICS)
    paper_total = sum(paper["Mean"]) / len(TABLE_METRICS) if paper else None
    print(
        f"{'mTotal':<20}{ours_total:>29.1f}   "
        f"{'-' if paper_total is None else f'{paper_total:.1f}':>29}"
    )
    if title:
        print(f"paper figures: {title} of Wang et al., AAAI 2025")
    else:
        print("paper figures: none (the categories are neither MVTec AD nor VisA)")
    print(f"wall time: fit {fit_seconds:.1f} s, fit + evaluate {total_seconds:.1f} s")
    if detector.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(detector.device) / 2**30
        print(f"peak GPU memory: {peak:.2f} GiB")
    if args.json:
        payload = {
            "settings": options,
            "results": results,
            "fit_seconds": fit_seconds,
            "total_seconds": total_seconds,
        }
        args.json.write_text(json.dumps(payload, indent=2, default=str))


if __name__ == "__main__":
    main()
