"""The ``cncad`` command line."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]

_TINY_NOTE = (
    "note: the 'tiny' backbone is a small randomly initialised CLIP. These figures measure "
    "the pipeline end to end, not CNC's accuracy; real use needs pretrained CLIP weights "
    "(backbone 'ViT-L-14-336-quickgelu', pretrained 'openai' or a local checkpoint)."
)


def _demo(args: argparse.Namespace) -> int:
    import numpy as np

    from cncad.data import AnomalyFolder, load_image, load_mask, make_synthetic_dataset
    from cncad.detector import CNCDetector
    from cncad.evaluation import format_table
    from cncad.visualize import save_panel

    out = Path(args.out)
    start = time.perf_counter()
    data_root = make_synthetic_dataset(
        out / "data",
        n_train=args.train_images,
        image_size=args.data_size,
        seed=args.seed,
        overwrite=True,
    )
    print(f"generated synthetic defect images in {data_root}")
    detector = CNCDetector(
        backbone="tiny",
        pretrained=None,
        image_size=args.image_size,
        epochs=args.epochs,
        theta=min(5, max(args.epochs - 1, 0)),
        sigma=args.sigma,
        seed=args.seed,
        device=args.device,
    )
    print(detector)
    detector.fit(data_root, progress=not args.quiet)
    history = detector.history
    if history:
        print(
            f"training loss: first epoch {history[0]['total']:.4f}, "
            f"last epoch {history[-1]['total']:.4f}"
        )
    results = detector.evaluate(data_root, progress=not args.quiet)
    print(format_table(results))
    model_path = detector.save(out / "model.cnc")
    print(f"saved the trained detector to {model_path}")

    test_set = AnomalyFolder(data_root, split="test", image_size=args.image_size)
    defective = [s for s in test_set.samples if s.label == 1][: args.heatmaps]
    normal = [s for s in test_set.samples if s.label == 0][:1]
    chosen = defective + normal
    prediction = detector.predict([str(s.path) for s in chosen])
    maps = prediction.anomaly_map
    scale = (float(min(m.min() for m in maps)), float(max(m.max() for m in maps)))
    for sample, amap, score in zip(chosen, maps, prediction.pred_score, strict=True):
        image = np.asarray(load_image(sample.path))
        mask = load_mask(sample.mask_path) if sample.mask_path else np.zeros(image.shape[:2])
        name = f"{sample.category}_{sample.defect_type}_{Path(sample.path).stem}.png"
        panel = save_panel(
            out / "heatmaps" / name,
            image,
            amap.numpy(),
            mask,
            title=f"score {float(score):.3f}",
            vmin=scale[0],
            vmax=scale[1],
        )
        print(f"wrote {panel}")
    print(f"done in {time.perf_counter() - start:.1f} s")
    print(_TINY_NOTE)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``cncad`` command."""
    parser = argparse.ArgumentParser(
        prog="cncad",
        description="CNC multi-class anomaly detection (Wang et al., AAAI 2025).",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo",
        help="offline end-to-end run: synthetic defects, tiny backbone, metrics and heatmaps",
        description=(
            "Generate a small synthetic defect dataset (two categories), train one "
            "multi-class CNC model with the tiny random backbone, print the seven metrics "
            "per category and write heatmap panels. Runs offline on a CPU in about a minute."
        ),
    )
    demo.add_argument("--out", default="cncad_demo_output", help="output folder")
    demo.add_argument("--epochs", type=int, default=15, help="training epochs (default 15)")
    demo.add_argument("--image-size", type=int, default=112, help="model input side (x14)")
    demo.add_argument("--data-size", type=int, default=128, help="generated image side")
    demo.add_argument("--train-images", type=int, default=32, help="normal images per class")
    demo.add_argument("--sigma", type=float, default=2.0, help="map smoothing, pixels")
    demo.add_argument("--heatmaps", type=int, default=4, help="defective images to draw")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(handler=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cncad`` console script.

    Args:
        argv: Arguments without the program name (default: ``sys.argv[1:]``).

    Returns:
        The process exit status.
    """
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (FileNotFoundError, ValueError, RuntimeError) as error:
        print(f"cncad {args.command}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
