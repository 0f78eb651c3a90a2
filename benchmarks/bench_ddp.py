"""Benchmark: one training process against several under torchrun (CPU, gloo).

Trains the tiny random CLIP backbone with the feature cache on the real images of
``--data`` (MVTec layout; all categories into one model) and reports, per setting, the
caching pass (the slowest process's, since all wait for it) and the mean epoch time over
the epochs after the first. The settings run one after the other, each in fresh processes:

* ``1 proc x T thr``: one process, ``torch.set_num_threads(T)``;
* ``W procs x 1 thr``: ``torchrun --standalone --nproc_per_node W``, one thread each.

It also prints the size of one all-reduce of the gradients (the trainable parameters in
float32), which is what each step adds on top of the single-process work.

The figures in ``docs/guide.md`` ("Many GPUs") come from::

    python benchmarks/bench_ddp.py --json /tmp/bench_ddp.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def worker(args: argparse.Namespace) -> None:
    """One training process: fit, then rank 0 writes the timings to ``args.result``."""
    import torch
    import torch.distributed as dist

    from cncad import CNCDetector
    from cncad.data import AnomalyFolder

    torch.set_num_threads(args.threads)
    detector = CNCDetector(
        backbone="tiny",
        pretrained=None,
        image_size=args.image_size,
        batch_size=args.batch_size,
        epochs=args.epochs,
        device="cpu",
        seed=0,
    )
    data = AnomalyFolder(args.data, split="train", image_size=args.image_size)
    if args.max_images and args.max_images < len(data):
        data = torch.utils.data.Subset(data, range(args.max_images))
    start = time.perf_counter()
    detector.fit(data, progress=False)
    wall = time.perf_counter() - start
    stats = detector.cache_stats or {}
    build = torch.tensor([float(stats.get("build_seconds", 0.0)), float(stats.get("images", 0))])
    if dist.is_initialized():
        slowest = build.clone()
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        build[0] = slowest[0]
    if detector.trainer.group.is_main:
        parameters = sum(p.numel() for p in detector.model.trainable_parameters())
        result = {
            "processes": detector.trainer.group.world_size,
            "threads": args.threads,
            "images": len(data),
            "cache_seconds": float(build[0]),
            "cached_by_rank_0": int(build[1]),
            "epoch_seconds": [row["seconds"] for row in detector.history],
            "fit_seconds": wall,
            "allreduce_bytes": parameters * 4,
        }
        Path(args.result).write_text(json.dumps(result))


def run_setting(args: argparse.Namespace, processes: int, threads: int, result: Path) -> dict:
    worker_args = [
        __file__, "--worker", "--result", str(result), "--threads", str(threads),
        "--data", str(args.data), "--image-size", str(args.image_size),
        "--batch-size", str(args.batch_size), "--epochs", str(args.epochs),
        "--max-images", str(args.max_images),
    ]  # fmt: skip
    if processes == 1:
        command = [sys.executable, *worker_args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   "--nproc_per_node", str(processes), *worker_args]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = str(threads)
    subprocess.run(command, check=True, env=env)
    return json.loads(result.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--max-images", type=int, default=0, help="0: all")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    settings = [(1, 1), (1, 2), (2, 1)]
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for processes, threads in settings:
            rows.append(run_setting(args, processes, threads, Path(folder) / "result.json"))
    print(
        f"cpu: {os.cpu_count()} cores; data {args.data}: {rows[0]['images']} images, "
        f"{args.image_size} px, batch {args.batch_size}, {args.epochs} epochs, tiny backbone"
    )
    print(f"one gradient all-reduce: {rows[0]['allreduce_bytes'] / 2**20:.2f} MiB per step")
    print("| setting | images cached by rank 0 | caching s | epoch s (after the first) |")
    print("|---|---:|---:|---:|")
    for row in rows:
        later = row["epoch_seconds"][1:] or row["epoch_seconds"]
        name = f"{row['processes']} proc x {row['threads']} thr"
        print(f"| {name} | {row['cached_by_rank_0']} | {row['cache_seconds']:.1f} | "
              f"{sum(later) / len(later):.2f} |")  # fmt: skip
    if args.json is not None:
        from cncad.files import write_text_atomic

        write_text_atomic(args.json, json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
