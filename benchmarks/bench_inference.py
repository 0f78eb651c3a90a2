"""Benchmark: streaming inference over many large images, peak memory and throughput.

Trains once a tiny detector (random tiny backbone, ``--model-size`` px, one epoch with the
feature cache, so that the saved file has its ``normal_statistics``) on a small generated
dataset, and generates ``max(--counts)`` RGB ``--side`` x ``--side`` PNG images (smooth
low-frequency random fields plus a few shapes, different per image, seeded, written with
``compress_level=1``); runs on fewer images use the first ones. Then each setting runs in a
fresh process (``OMP_NUM_THREADS=1``, ``torch.set_num_threads(1)``), which reports its peak
resident set size (``ru_maxrss`` read at its end; the parent never imports torch, whose
peak the children would inherit) and the wall time of the prediction:

* ``predict_iter``: ``CNCDetector.predict_iter(paths, num_workers=W, progress=False)``
  over the list of paths, keeping only the scores of each batch, as a user would (after
  loading the model);
* ``cncad predict``: ``cncad predict MODEL FOLDER --out OUT --quiet --num-workers W``
  through ``cncad.cli.main`` (one heatmap overlay PNG written per image, then
  ``scores.csv``); its wall time includes loading the model file (not importing the
  modules); ``OUT`` is removed after each run.

Each for every image count of ``--counts`` and every ``W`` of ``--workers``. A baseline
process that only imports ``cncad`` and loads the detector gives the memory every run
starts from. Finally one process times, on one thread over the first ``--decode-images``
images, the decoding path of each image (``load_image``, ``to_image_tensor``,
``preprocess``), the model's forward pass on the preprocessed batches, the upsampling of
each map to the image's own size, and what ``cncad predict`` adds per image (the overlay
and its PNG encoding, in memory), to tell which part bounds the throughput.

The figures in ``docs/benchmarks.md`` ("Inference at scale") come from::

    python benchmarks/bench_inference.py --json /tmp/bench_inference.json
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MIB = 1024  # ru_maxrss is in KiB on Linux


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / MIB


def hwm_rss_mib() -> float:
    """``VmHWM`` of ``/proc/self/status`` (peak RSS of this address space), for a check."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / MIB
    return float("nan")


# --------------------------------------------------------------------------------------
# set-up. The parent never imports torch: on Linux a child's ru_maxrss starts from its
# parent's peak at the fork/exec, so a heavy parent would hide the children's own peaks.
# --------------------------------------------------------------------------------------


def train_model(folder: Path, model_size: int) -> Path:
    """Fit and save the tiny detector; returns the model file."""
    import torch

    from cncad import CNCDetector
    from cncad.data import make_synthetic_dataset

    torch.set_num_threads(1)
    data = make_synthetic_dataset(folder / "train_data", n_train=8, image_size=128)
    detector = CNCDetector(
        backbone="tiny", pretrained=None, image_size=model_size, epochs=1, device="cpu"
    )
    detector.fit(data, progress=False)
    if detector.normal_statistics is None:
        raise RuntimeError("the detector has no normal_statistics (feature cache not used?)")
    return detector.save(folder / "model.cnc")


def make_image(index: int, side: int, seed: int) -> Any:
    """One smooth RGB test image: two octaves of low-frequency noise plus a few shapes."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng([seed, index])
    coarse = Image.fromarray((rng.random((6, 6, 3)) * 255).astype(np.uint8))
    finer = Image.fromarray((rng.random((24, 24, 3)) * 255).astype(np.uint8))
    image = Image.blend(
        coarse.resize((side, side), Image.BICUBIC), finer.resize((side, side), Image.BICUBIC), 0.25
    )
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 7))):
        x, y = (int(v) for v in rng.integers(0, side, 2))
        r = int(rng.integers(side // 50, side // 7))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        box = [x - r, y - r, x + r, y + r]
        if rng.random() < 0.5:
            draw.ellipse(box, fill=colour)
        else:
            draw.rectangle(box, fill=colour)
    return image


def make_images(folder: Path, count: int, side: int, seed: int) -> list[Path]:
    folder.mkdir(parents=True)
    paths = []
    for index in range(count):
        path = folder / f"{index:05d}.png"
        make_image(index, side, seed).save(path, compress_level=1)
        paths.append(path)
    return paths


def subset_folder(folder: Path, paths: list[Path]) -> Path:
    """A folder holding hard links to ``paths`` (the CLI is given a folder)."""
    folder.mkdir(parents=True)
    for path in paths:
        os.link(path, folder / path.name)
    return folder


# --------------------------------------------------------------------------------------
# the measured processes
# --------------------------------------------------------------------------------------


def child(args: argparse.Namespace) -> None:
    """One fresh process: a baseline, one prediction run or the decode/model timing."""
    import torch

    torch.set_num_threads(1)
    import cncad  # noqa: F401

    result: dict[str, Any] = {"mode": args.mode, "import_rss_mib": peak_rss_mib()}
    if args.mode == "train":
        result["model"] = str(train_model(Path(args.out), args.model_size))
    elif args.mode == "cli":
        importlib.import_module("cncad.detector")  # its imports: not in the wall time
        from cncad.cli import main as cli_main

        command = ["predict", str(args.model), str(args.images), "--out", str(args.out),
                   "--quiet", "--num-workers", str(args.num_workers)]  # fmt: skip
        start = time.perf_counter()
        code = cli_main(command)
        result["wall_s"] = time.perf_counter() - start
        if code != 0:
            raise SystemExit(f"cncad predict returned {code}")
        result["overlays"] = sum(1 for _ in Path(args.out).rglob("*.png"))
    else:
        from cncad import CNCDetector

        start = time.perf_counter()
        detector = CNCDetector.load(args.model)
        result["load_s"] = time.perf_counter() - start
        result["loaded_rss_mib"] = peak_rss_mib()
        paths = sorted(Path(args.images).glob("*.png"))
        if args.mode == "iter":
            scores: list[float] = []
            start = time.perf_counter()
            for batch in detector.predict_iter(paths, num_workers=args.num_workers, progress=False):
                scores.extend(batch.pred_score.tolist())
            result["wall_s"] = time.perf_counter() - start
            result["scored"] = len(scores)
        elif args.mode == "timing":
            result.update(time_parts(detector, paths))
    result["peak_rss_mib"] = peak_rss_mib()
    result["vmhwm_mib"] = hwm_rss_mib()
    Path(args.result).write_text(json.dumps(result))


def time_parts(detector: Any, paths: list[Path]) -> dict[str, float]:
    """Seconds per image of each part of the pipeline, on the calling thread."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from PIL import Image

    from cncad.data.transforms import load_image, preprocess, to_image_tensor
    from cncad.visualize import overlay

    size = detector.config.image_size
    batch_size = detector.config.batch_size
    parts = {"png_decode": 0.0, "to_tensor": 0.0, "preprocess": 0.0}
    inputs, shapes = [], []
    for path in paths:
        t0 = time.perf_counter()
        picture = load_image(path)
        t1 = time.perf_counter()
        (image,) = to_image_tensor([picture])
        t2 = time.perf_counter()
        inputs.append(preprocess(image, size)[0])
        t3 = time.perf_counter()
        parts["png_decode"] += t1 - t0
        parts["to_tensor"] += t2 - t1
        parts["preprocess"] += t3 - t2
        shapes.append(tuple(image.shape[-2:]))
    detector.model.eval()
    batches = [torch.stack(inputs[i : i + batch_size]) for i in range(0, len(inputs), batch_size)]
    maps = []
    with torch.no_grad():
        detector.model.predict(batches[0])  # warm-up
        start = time.perf_counter()
        for batch in batches:
            maps.extend(detector.model.predict(batch)[0].float())
        parts["model_forward"] = time.perf_counter() - start
        start = time.perf_counter()
        full = [
            F.interpolate(amap[None, None], size=shape, mode="bilinear")[0, 0]
            for amap, shape in zip(maps, shapes, strict=True)
        ]
        parts["map_upsample"] = time.perf_counter() - start
    # What cncad predict adds per image: the overlay, then its PNG (Pillow's defaults).
    # The CLI's colour scale: blue at the normal median, its 99.9th percentile half way up.
    stats = detector.normal_statistics
    vmin = stats["map_p50"]
    vmax = vmin + 2 * (stats["map_p999"] - vmin)
    overlay_s = encode_s = 0.0
    count = min(len(paths), 20)
    for path, amap in zip(paths[:count], full[:count], strict=True):
        picture = np.asarray(load_image(path))
        t0 = time.perf_counter()
        drawn = Image.fromarray(overlay(picture, amap.numpy(), 0.5, vmin, vmax))
        t1 = time.perf_counter()
        drawn.save(io.BytesIO(), format="PNG")
        t2 = time.perf_counter()
        overlay_s += t1 - t0
        encode_s += t2 - t1
    per_image = {name: seconds / len(paths) for name, seconds in parts.items()}
    per_image["cli_overlay"] = overlay_s / count
    per_image["cli_png_encode"] = encode_s / count
    return {"images": len(paths), "batch_size": batch_size, "per_image_s": per_image}


def run_child(args: argparse.Namespace, mode: str, folder: Path, work: Path, **extra: Any) -> dict:
    result = work / "result.json"
    out = work / "out"
    out = extra.get("out", out)
    command = [sys.executable, __file__, "--child", mode, "--model", str(args.model_file),
               "--images", str(folder), "--out", str(out), "--result", str(result),
               "--num-workers", str(extra.get("workers", 0)),
               "--model-size", str(args.model_size)]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if mode != "train":
        shutil.rmtree(out, ignore_errors=True)
    if done.returncode != 0:
        sys.stderr.write(done.stdout + done.stderr)
        raise SystemExit(f"{mode} run failed ({done.returncode})")
    row = json.loads(result.read_text())
    row["process_s"] = elapsed
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", default="100,1000", help="image counts, comma-separated")
    parser.add_argument("--workers", default="0,2", help="num_workers values, comma-separated")
    parser.add_argument("--side", type=int, default=1024, help="side of the test images")
    parser.add_argument("--model-size", type=int, default=112, help="the model's input side")
    parser.add_argument("--decode-images", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--child", choices=("train", "baseline", "iter", "cli", "timing"),
                        help=argparse.SUPPRESS)  # fmt: skip
    for hidden in ("--model", "--images", "--out", "--result"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    parser.add_argument("--num-workers", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.mode = args.child
        child(args)
        return
    counts = [int(v) for v in args.counts.split(",")]
    workers = [int(v) for v in args.workers.split(",")]
    begin = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_inference_") as temp:
        work = Path(temp)
        start = time.perf_counter()
        args.model_file = None
        args.model_file = Path(run_child(args, "train", work, work, out=work)["model"])
        train_s = time.perf_counter() - start
        start = time.perf_counter()
        paths = make_images(work / "images" / "all", max(counts), args.side, args.seed)
        generate_s = time.perf_counter() - start
        size_mb = sum(p.stat().st_size for p in paths) / 1e6
        print(f"trained the tiny detector in {train_s:.1f} s; generated {len(paths)} "
              f"{args.side}x{args.side} PNGs in {generate_s:.1f} s ({size_mb:.0f} MB)",
              file=sys.stderr, flush=True)  # fmt: skip
        folders = {
            n: paths[0].parent if n == len(paths) else subset_folder(
                work / "images" / f"first_{n}", paths[:n])
            for n in counts
        }  # fmt: skip
        decode_n = min(args.decode_images, len(paths))
        decode_folder = folders.get(decode_n) or subset_folder(
            work / "images" / f"first_{decode_n}", paths[:decode_n]
        )
        baseline = run_child(args, "baseline", folders[counts[0]], work)
        rows = []
        for n in counts:
            for mode in ("iter", "cli"):
                for w in workers:
                    row = run_child(args, mode, folders[n], work, workers=w)
                    row.update(images=n, workers=w)
                    rows.append(row)
                    print(f"{mode} n={n} workers={w}: {row['wall_s']:.1f} s, peak "
                          f"{row['peak_rss_mib']:.0f} MiB (VmHWM {row['vmhwm_mib']:.0f})",
                          file=sys.stderr, flush=True)  # fmt: skip
        timing = run_child(args, "timing", decode_folder, work)
    total_s = time.perf_counter() - begin

    names = {"iter": "`predict_iter`", "cli": "`cncad predict`"}
    print(f"cpu: {os.cpu_count()} cores, 1 torch thread per process; images {args.side} x "
          f"{args.side} PNG ({size_mb / len(paths):.2f} MB each, generated in "
          f"{generate_s:.1f} s); tiny random backbone at {args.model_size} px, "
          f"batch {timing['batch_size']}")  # fmt: skip
    print(f"baseline (import cncad: {baseline['import_rss_mib']:.0f} MiB; + load the detector): "
          f"{baseline['peak_rss_mib']:.0f} MiB peak RSS; loading takes {baseline['load_s']:.1f} s "
          f"(in the wall time of `cncad predict`, not of `predict_iter`)")  # fmt: skip
    print()
    print("| setting | images | workers | peak RSS MiB | wall s | img/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {names[row['mode']]} | {row['images']} | {row['workers']} | "
              f"{row['peak_rss_mib']:.0f} | {row['wall_s']:.1f} | "
              f"{row['images'] / row['wall_s']:.1f} |")  # fmt: skip
    print()
    if len(counts) > 1:
        low, high = min(counts), max(counts)
        for mode in ("iter", "cli"):
            for w in workers:
                peak = {r["images"]: r["peak_rss_mib"] for r in rows
                        if r["mode"] == mode and r["workers"] == w}  # fmt: skip
                change = peak[high] / peak[low] - 1
                flat = "yes" if abs(change) <= 0.10 else "no"
                print(f"flat from {low} to {high} images, {names[mode]} workers={w}: {flat} "
                      f"({peak[low]:.0f} -> {peak[high]:.0f} MiB, {change:+.1%})")  # fmt: skip
        print()
    per = timing["per_image_s"]
    print(f"one thread, {timing['images']} images, ms per image:")
    print("| part | ms/img |")
    print("|---|---:|")
    for name, seconds in per.items():
        print(f"| {name} | {seconds * 1e3:.1f} |")
    decode = per["png_decode"] + per["to_tensor"] + per["preprocess"]
    model = per["model_forward"] + per["map_upsample"]
    print(f"| decoding path (sum) | {decode * 1e3:.1f} |")
    print(f"| model + map upsampling (sum) | {model * 1e3:.1f} |")
    print(f"\ntotal wall time {total_s:.0f} s")
    if args.json is not None:
        from cncad.files import write_text_atomic

        report = {"baseline": baseline, "runs": rows, "timing": timing,
                  "generate_s": generate_s, "train_s": train_s, "total_s": total_s,
                  "image_mb": size_mb / len(paths), "cpu_count": os.cpu_count()}  # fmt: skip
        write_text_atomic(args.json, json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
