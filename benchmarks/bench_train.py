"""Benchmark: training epochs with and without the frozen-feature cache, side by side.

For each backbone the same detector (same seed, same images, same settings) trains one
warm-up epoch and then ``--epochs`` timed epochs twice: recomputing the frozen encoder on
every batch (``fit(cache=False)``) and from the cache (``fit(cache=True)``), the two
variants taking turns epoch by epoch so that load from other processes hits both alike.
Printed: the best seconds per epoch of each (from ``detector.history``; the cache is
refilled by every ``fit`` call and that time is not part of the epoch), their ratio, the
one-time cost of filling the cache, and the cache's size per image (float16).

Backbones (random weights; the shapes, not the weights, set the cost):

* ``tiny``: the test backbone (width 64, 4 blocks).
* ``ViT-B-16``: open_clip's ViT-B/16 (12 blocks of width 768, 14 x 14 patches at 224 px)
  with its text tower, CNC on: the issue's "ViT-B/16 shapes".
* ``ViT-L-14-336-quickgelu``: the paper's backbone (24 blocks of width 1024, 24 x 24
  patches at 336 px), with ``--large`` (meant for a GPU).

Usage::

    python benchmarks/bench_train.py                      # tiny and ViT-B-16 on the CPU
    python benchmarks/bench_train.py --device cuda --large --images 64 --batch-size 8
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.data import TensorDataset

from cncad import CNCDetector

BACKBONES = {"tiny": 112, "ViT-B-16": 224}
LARGE = {"ViT-L-14-336-quickgelu": 336}


def make_detector(backbone: str, image_size: int, args: argparse.Namespace) -> CNCDetector:
    return CNCDetector(
        backbone=backbone,
        pretrained=None,
        image_size=image_size,
        batch_size=args.batch_size,
        device=args.device,
        bf16=args.device == "cuda",
        seed=0,
    )


def compare(
    backbone: str, image_size: int, data: TensorDataset, args: argparse.Namespace
) -> tuple[float, float, CNCDetector]:
    """Best seconds per epoch without and with the cache, the two taking turns."""
    plain = make_detector(backbone, image_size, args)
    cached = make_detector(backbone, image_size, args)
    for _ in range(args.epochs + 1):  # the first round is a warm-up
        plain.fit(data, epochs=1, progress=False, cache=False)
        cached.fit(data, epochs=1, progress=False, cache=True)
    best = [min(h["seconds"] for h in d.history[1:]) for d in (plain, cached)]
    return best[0], best[1], cached


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=16, help="training images")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per variant")
    parser.add_argument("--large", action="store_true", help="also ViT-L/14 at 336 px")
    parser.add_argument("--only", nargs="*", help="run only these backbones")
    args = parser.parse_args()

    backbones = dict(BACKBONES, **(LARGE if args.large else {}))
    if args.only:
        backbones = {name: size for name, size in backbones.items() if name in args.only}
    print(
        f"device {args.device}, torch threads {torch.get_num_threads()}, "
        f"{args.images} images, batch {args.batch_size}, {args.epochs} timed epochs each"
    )
    header = (
        f"{'backbone':<24}{'px':>5}{'no cache s/epoch':>18}{'cache s/epoch':>15}"
        f"{'ratio':>8}{'cache fill s':>14}{'KiB/image':>11}"
    )
    print(header)
    for backbone, size in backbones.items():
        generator = torch.Generator().manual_seed(0)
        images = torch.randn(args.images, 3, size, size, generator=generator)
        data = TensorDataset(images, torch.zeros(args.images, dtype=torch.long))
        start = time.perf_counter()
        plain, cached, detector = compare(backbone, size, data, args)
        stats = detector.cache_stats or {}
        print(
            f"{backbone:<24}{size:>5}{plain:>18.3f}{cached:>15.3f}{plain / cached:>8.1f}"
            f"{stats.get('build_seconds', float('nan')):>14.2f}"
            f"{stats.get('bytes_per_image', 0) / 2**10:>11.1f}"
            f"   ({time.perf_counter() - start:.0f} s)",
            flush=True,
        )


if __name__ == "__main__":
    main()
