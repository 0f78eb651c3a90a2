"""The ``cncad`` command line: ``fit``, ``predict``, ``evaluate`` and ``demo``.

Results go to stdout, progress bars and errors to stderr. An error about the user's
inputs (a missing folder, a folder without images, an unreadable image, a file that is not
a cncad model) is one line, ``cncad: error: ...``, with exit status 1; a malformed command
line exits with status 2 (argparse's usage message). ``--debug`` shows the full traceback
instead. See ``docs/cli.md``.
"""

from __future__ import annotations

# Only modules that leave torch, open_clip and timm unimported belong at the top, so that
# --help and argument errors answer at once; tests/test_startup.py checks this. The
# commands import the rest when they run.
import argparse
import contextlib
import csv
import gc
import io
import json
import math
import os
import re
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cncad.config import CNCConfig
from cncad.errors import CNCADError, DatasetError
from cncad.files import atomic_write, check_output_dir, check_output_file, save_image_atomic

if TYPE_CHECKING:
    import numpy as np
    from torch.utils.data import Dataset

__all__ = ["build_parser", "main"]

_DEFAULTS = CNCConfig()

#: ``cncad.checkpoint.CHECKPOINT_NAME``, copied because that module imports torch.
_CHECKPOINT_NAME = "last.ckpt"

_TINY_NOTE = (
    "note: the 'tiny' backbone is a small randomly initialised CLIP. These figures measure "
    "the pipeline end to end, not CNC's accuracy; real use needs pretrained CLIP weights "
    "(backbone 'ViT-L-14-336-quickgelu', pretrained 'openai' or a local checkpoint)."
)

#: Errors reported as one line (they are about the inputs, not bugs in cncad).
_USER_ERRORS: tuple[type[BaseException], ...] = (
    CNCADError,
    OSError,
    ValueError,
    RuntimeError,
    FloatingPointError,
)

_SCORES_FILE = "scores.csv"


# --------------------------------------------------------------------------------------
# Argument types
# --------------------------------------------------------------------------------------


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    parse.__name__ = "int"
    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value:g}")
    return value


def _pretrained(text: str) -> str | None:
    return None if text.lower() == "none" else text


# --------------------------------------------------------------------------------------
# Helpers shared by the subcommands
# --------------------------------------------------------------------------------------


def _existing_dir(path: Path, what: str) -> Path:
    """Check that ``path`` is an existing directory; ``what`` names it in the message."""
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    if not path.is_dir():
        raise DatasetError(f"{what} is not a folder: {path}")
    return path


def _check_not_a_split_folder(root: Path) -> None:
    """Refuse a folder that looks like the ``test/`` split of an MVTec-style category.

    Read as a plain folder, its defect subfolders would be taken as normal images.
    """
    from cncad.data import NORMAL_FOLDER_NAMES

    subdirs = [p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    normal = [name for name in subdirs if name.lower() in NORMAL_FOLDER_NAMES]
    others = [name for name in subdirs if name.lower() not in NORMAL_FOLDER_NAMES]
    if (normal and others) or "ground_truth" in subdirs:
        raise DatasetError(
            f"{root} looks like part of an MVTec-style dataset (it has the folders "
            f"{', '.join(sorted(subdirs))}); pass the category folder, the one that holds "
            "train/ and test/, or a folder of normal images only"
        )


def _training_data(root: Path, image_size: int) -> tuple[Dataset, str]:
    """The training dataset for ``cncad fit DATA`` and a one-line description of it.

    ``DATA`` is read as an MVTec-style tree when it, or one of its immediate subfolders,
    holds a ``train/`` or ``test/`` folder ([`find_categories`][cncad.data.folder.find_categories]);
    then the normal images of every category's ``train/good`` are used. Otherwise it is a plain
    folder: every image file under it, searched recursively, is a normal image.
    """
    from cncad.data import AnomalyFolder, ImageFolderDataset, find_categories

    _existing_dir(root, "data folder")
    try:
        find_categories(root)
    except DatasetError:
        _check_not_a_split_folder(root)
        try:
            plain = ImageFolderDataset(root, image_size=image_size)
        except DatasetError as error:
            raise DatasetError(
                f"{error}; nor is {root} an MVTec-style dataset (no train/ or test/ "
                "folder in it or in a folder directly inside it)"
            ) from error
        return plain, f"plain image folder {root}: {len(plain)} images, all taken as normal"
    tree = AnomalyFolder(root, split="train", image_size=image_size)
    return tree, (
        f"MVTec-style dataset {root}: {len(tree)} normal training images in "
        f"{len(tree.categories)} categor{'y' if len(tree.categories) == 1 else 'ies'} "
        f"({', '.join(tree.categories)})"
    )


def _load_detector(path: str, **overrides: Any) -> Any:
    from cncad.detector import CNCDetector

    detector = CNCDetector.load(path, **overrides)
    print(
        f"loaded {path}: backbone {detector.config.backbone!r}, image size "
        f"{detector.config.image_size}, trained {detector.epochs_trained} "
        f"epoch{'' if detector.epochs_trained == 1 else 's'}, "
        f"threshold {detector.threshold}"
    )
    return detector


def _print_training_loss(history: list[dict[str, float]]) -> None:
    if history:
        print(
            f"training loss: first epoch {history[0]['total']:.4f}, "
            f"last epoch {history[-1]['total']:.4f}"
        )


def _one_line(error: BaseException) -> str:
    """A one-line message for ``error``.

    Errors raised inside DataLoader worker processes carry the worker's traceback in their
    message; only its last line, the original message, is kept.
    """
    text = str(error).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1]
        text = re.sub(r"^[\w.]+: ", "", text)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    return lines[0]


# --------------------------------------------------------------------------------------
# cncad fit
# --------------------------------------------------------------------------------------


#: Settings a resumed run keeps from its checkpoint: changing them would change the run.
_FIXED_ON_RESUME = ("backbone", "pretrained", "image_size", "batch_size", "lr", "seed")


def _fit(args: argparse.Namespace) -> int:
    from cncad.detector import CNCDetector

    fields = {
        "backbone": args.backbone,
        "image_size": args.image_size,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "num_workers": args.num_workers,
        "device": args.device,
        "seed": args.seed,
    }
    overrides = {name: value for name, value in fields.items() if value is not None}
    if args.pretrained is not None:
        overrides["pretrained"] = _pretrained(args.pretrained)
    elif args.backbone == "tiny" and args.resume is None:
        overrides["pretrained"] = None
    # The model and checkpoint files are no images, so they may go inside DATA; only the
    # checkpoint being resumed must not be overwritten.
    resumed = [args.resume] if args.resume is not None else []
    out = check_output_file(args.out, inputs=resumed, what="--out")
    if args.checkpoint_dir is not None:
        check_output_dir(args.checkpoint_dir, what="--checkpoint-dir")
        if out.parent == Path(args.checkpoint_dir).resolve() and out.name == _CHECKPOINT_NAME:
            raise ValueError(f"--out must not be the checkpoint file {out}")

    start = time.perf_counter()
    if args.resume is not None:
        fixed = sorted(name for name in overrides if name in _FIXED_ON_RESUME)
        if fixed:
            options = ", ".join("--" + name.replace("_", "-") for name in fixed)
            raise ValueError(
                f"--resume continues the run with the settings stored in its checkpoint; "
                f"drop {options} (only --epochs, --device, --num-workers and --threshold "
                "may change)"
            )
        detector = CNCDetector.load(args.resume, **overrides)
        print(
            f"resuming {args.resume}: {detector.epochs_trained} of "
            f"{detector.config.epochs} epochs done"
        )
    else:
        detector = CNCDetector(_DEFAULTS.replace(**overrides))
    data, description = _training_data(Path(args.data), detector.config.image_size)
    print(f"training data: {description}")
    if args.threshold is not None:
        detector.threshold = args.threshold
    print(detector)
    detector.fit(
        data,
        progress=not args.quiet,
        cache=not args.no_cache,
        cache_dir=args.cache_dir,
        checkpoint_dir=args.checkpoint_dir,
        checkpoint_every=args.checkpoint_every,
    )
    if detector.cache_stats is not None:
        stats = detector.cache_stats
        where = "memory" if stats["in_memory"] else "memory-mapped files"
        print(
            f"feature cache: {stats['images']} images, "
            f"{stats['bytes_per_image'] / 2**10:.0f} KiB each, in {where}, "
            f"filled in {stats['build_seconds']:.1f} s"
        )
    _print_training_loss(detector.history)
    if args.checkpoint_dir is not None:
        print(f"checkpoint: {Path(args.checkpoint_dir) / _CHECKPOINT_NAME}")
    path = detector.save(out)
    print(f"saved the trained detector to {path} ({time.perf_counter() - start:.1f} s)")
    return 0


# --------------------------------------------------------------------------------------
# cncad predict
# --------------------------------------------------------------------------------------


def _image_list(inputs: Sequence[str]) -> list[tuple[Path, Path]]:
    """Expand files and folders into ``(image file, heatmap path relative to --out)``.

    A file keeps its name; a folder's images (searched recursively) keep their path
    relative to it, under a folder named like it. Names that would clash get ``-2``,
    ``-3``, ... appended.
    """
    from cncad.data import ImageFolderDataset

    pairs: list[tuple[Path, Path]] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            base = Path(path.resolve().name)
            found = ImageFolderDataset(path, image_size=1).paths
            pairs.extend((image, base / image.relative_to(path)) for image in found)
        elif path.is_file():
            pairs.append((path, Path(path.name)))
        else:
            raise FileNotFoundError(f"image file or folder not found: {path}")
    used: set[str] = set()
    result = []
    for image, relative in pairs:
        target = relative.with_suffix(".png")
        count = 1
        while target.as_posix().lower() in used:
            count += 1
            target = relative.with_name(f"{relative.stem}-{count}.png")
        used.add(target.as_posix().lower())
        result.append((image, target))
    return result


def _check_predict_outputs(out: Path, images: list[tuple[Path, Path]], model: Path) -> None:
    """Refuse a run whose heatmaps or ``scores.csv`` would overwrite an image or the model.

    ``check_output_dir`` already keeps ``--out`` apart from the images; this also catches
    an image reached through a symbolic link into ``--out``, and the model file.
    """
    sources = {image.resolve() for image, _ in images} | {model.resolve()}
    targets = [out / relative for _, relative in images] + [out / _SCORES_FILE]
    for target in targets:
        if target.resolve() in sources:
            raise ValueError(f"--out: writing {target} would overwrite an input file")


def _write_overlay(
    path: Path, picture: np.ndarray, amap: np.ndarray, alpha: float, vmin: float, vmax: float
) -> None:
    """Save the heatmap overlay of ``amap`` ``(H, W)`` on ``picture`` ``(H, W, 3)`` uint8."""
    import numpy as np
    from PIL import Image

    from cncad.visualize import overlay

    heatmap = Image.fromarray(overlay(picture, amap.astype(np.float32), alpha, vmin, vmax))
    save_image_atomic(heatmap, path)


def _write_scores(
    path: Path, images: list[tuple[Path, Path]], scores: list[float], labels: list[bool]
) -> None:
    """Write ``scores.csv`` (``path,score[,is_anomalous]``) atomically."""
    with atomic_write(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "score", *(["is_anomalous"] if labels else [])])
        for index, ((image, _), score) in enumerate(zip(images, scores, strict=True)):
            flag = ["true" if labels[index] else "false"] if labels else []
            writer.writerow([str(image), f"{score:.8g}", *flag])


def _colour_scale(args: argparse.Namespace, detector: Any) -> tuple[float, float] | None:
    """``(vmin, vmax)`` fixed before the first image, or None to take it from the first batch.

    ``--vmin``/``--vmax`` win; the rest comes from the detector's statistics on its own
    normal training images: blue at their median map value, their 99.9th percentile half
    way up, red from as far again above it.
    """
    stats = detector.normal_statistics
    low = args.vmin
    high = args.vmax
    if stats is not None:
        spread = stats["map_p999"] - stats["map_p50"]
        low = stats["map_p50"] if low is None else low
        high = stats["map_p999"] + spread if high is None else high
    if low is None or high is None:
        return None
    if low >= high:
        raise ValueError(
            f"the colour scale would run from {low:.6g} to {high:.6g}; give both --vmin and --vmax"
        )
    return low, high


def _predict(args: argparse.Namespace) -> int:

    if args.vmin is not None and args.vmax is not None and args.vmin >= args.vmax:
        raise ValueError(f"--vmin ({args.vmin:g}) must be below --vmax ({args.vmax:g})")
    check_output_dir(args.out, inputs=args.images, what="--out")
    out = Path(args.out)
    images = _image_list(args.images)
    _check_predict_outputs(out, images, Path(args.model))
    overrides: dict[str, Any] = {"device": args.device}
    if args.batch_size is not None:
        overrides["batch_size"] = args.batch_size
    detector = _load_detector(args.model, **overrides)
    if args.threshold is not None:
        detector.threshold = args.threshold
    pixel_threshold = detector.pixel_threshold
    if pixel_threshold is None:
        pixel_threshold = detector.threshold
    if args.save_masks and pixel_threshold is None:
        raise ValueError("--save-masks needs a threshold: pass --threshold or calibrate the model")
    scale = _colour_scale(args, detector)
    scale_source = "fixed" if scale is not None else "first batch"
    map_range = 2.0 * len(detector.model.layers)  # each layer adds 1 - cos in [0, 2]
    scores: list[float] = []
    labels: list[bool] = []
    batches = detector.predict_iter(
        [image for image, _ in images],
        num_workers=args.num_workers,
        progress=not args.quiet,
        keep_images=True,
    )
    # Drawing and PNG-encoding a heatmap costs more than scoring it, so the writes run on
    # their own threads too (zlib releases the GIL); at most two batches wait for them.
    writers = ThreadPoolExecutor(max_workers=args.num_workers) if args.num_workers else None
    pending: deque[Future] = deque()
    try:
        for batch in batches:
            scores.extend(float(score) for score in batch.pred_score)
            if batch.pred_label is not None:
                labels.extend(bool(flag) for flag in batch.pred_label)
            if scale is None:  # a model without statistics: the first batch fills in
                low = min(float(m.min()) for m in batch.anomaly_map)
                high = max(float(m.max()) for m in batch.anomaly_map)
                low = low if args.vmin is None else args.vmin
                high = high if args.vmax is None else args.vmax
                scale = (low, high) if low < high else (low, low + 1.0)
            for position, index in enumerate(batch.indices):
                job = (
                    out / images[index][1],
                    batch.images[position],
                    batch.anomaly_map[position].numpy(),
                    args,
                    scale,
                    map_range,
                    pixel_threshold,
                )
                if writers is None:
                    _write_outputs(*job)
                else:
                    pending.append(writers.submit(_write_outputs, *job))
            while len(pending) > 2 * len(batch.indices):
                pending.popleft().result()
        while pending:
            pending.popleft().result()
    finally:
        if writers is not None:
            for future in pending:
                future.cancel()
            writers.shutdown(wait=True)

    table = out / _SCORES_FILE
    _write_scores(table, images, scores, labels)
    vmin, vmax = scale if scale is not None else (math.nan, math.nan)
    print(f"scored {len(images)} images: heatmap overlays in {out}, scores in {table}")
    print(
        f"heatmap colour scale ({scale_source}): {vmin:.6g} (blue) to {vmax:.6g} (red); "
        f"pass --vmin {vmin:.6g} --vmax {vmax:.6g} to draw other runs on the same scale"
    )
    if labels:
        print(f"{sum(labels)} of {len(labels)} images have a score >= {detector.threshold:.6g}")
    return 0


def _write_outputs(
    target: Path,
    image: Any,
    values: np.ndarray,
    args: argparse.Namespace,
    scale: tuple[float, float],
    map_range: float,
    pixel_threshold: float | None,
) -> None:
    """Write one image's overlay and the optional map and mask files next to it."""
    import numpy as np
    import torch

    picture = image.permute(1, 2, 0).mul(255).round().to(torch.uint8).numpy()
    _write_overlay(target, picture, values, args.alpha, *scale)
    if args.save_maps == "npy":
        with atomic_write(target.with_suffix(".map.npy"), "wb") as handle:
            np.save(handle, values.astype(np.float32))
    elif args.save_maps == "png16":
        _save_png16(target.with_suffix(".map.png"), values, map_range)
    if args.save_masks:
        _save_mask(target.with_suffix(".mask.png"), values >= pixel_threshold)


def _save_png16(path: Path, values: Any, map_range: float) -> None:
    """The raw map as a 16-bit grey PNG: value ``v`` stands for ``v * map_range / 65535``."""
    import numpy as np
    from PIL import Image

    levels = np.clip(np.round(values / map_range * 65535), 0, 65535).astype(np.uint16)
    save_image_atomic(Image.fromarray(levels), path)


def _save_mask(path: Path, mask: Any) -> None:
    """A binary mask as an 8-bit PNG, 255 where anomalous (the MVTec convention)."""
    import numpy as np
    from PIL import Image

    save_image_atomic(Image.fromarray(mask.astype(np.uint8) * 255), path)


# --------------------------------------------------------------------------------------
# cncad evaluate
# --------------------------------------------------------------------------------------


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _json_results(results: dict[str, Any], model: str, data: str) -> dict[str, Any]:
    def clean(row: dict[str, Any]) -> dict[str, Any]:
        return {
            key: _finite_or_none(float(v) if key != "n_images" else int(v))
            for key, v in row.items()
        }

    return {
        "model": model,
        "data": data,
        "per_category": {name: clean(row) for name, row in results["per_category"].items()},
        "mean": clean(results["mean"]),
    }


def _evaluate(args: argparse.Namespace) -> int:
    from cncad.data import AnomalyFolder, find_categories
    from cncad.evaluation import format_table

    if args.json is not None:
        check_output_file(args.json, inputs=[args.model, args.data], what="--json")
    data = _existing_dir(Path(args.data), "data folder")
    find_categories(data)
    overrides: dict[str, Any] = {"device": args.device}
    if args.batch_size is not None:
        overrides["batch_size"] = args.batch_size
    if args.num_workers is not None:
        overrides["num_workers"] = args.num_workers
    detector = _load_detector(args.model, **overrides)
    test_set = AnomalyFolder(
        data, split="test", image_size=detector.config.image_size, mask_size=args.eval_size
    )
    print(f"test data: {test_set}")
    results = detector.evaluate(test_set, eval_size=args.eval_size, progress=not args.quiet)
    print(format_table(results))
    if args.json is not None:
        path = Path(args.json)
        payload = _json_results(results, args.model, str(data))
        with atomic_write(path, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, indent=2)
            handle.write("\n")
        print(f"wrote {path}")
    return 0


# --------------------------------------------------------------------------------------
# cncad demo
# --------------------------------------------------------------------------------------


def _demo(args: argparse.Namespace) -> int:
    import numpy as np

    from cncad.data import AnomalyFolder, load_image, load_mask, make_synthetic_dataset
    from cncad.detector import CNCDetector
    from cncad.evaluation import format_table
    from cncad.visualize import save_panel

    check_output_dir(args.out, what="--out")
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
    _print_training_loss(detector.history)
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


# --------------------------------------------------------------------------------------
# Parser
# --------------------------------------------------------------------------------------

_MAIN_EPILOG = """\
typical use:
  cncad fit mvtec_ad --out model.cnc                 train one model on all categories
  cncad evaluate model.cnc mvtec_ad --json eval.json  seven metrics per category
  cncad predict model.cnc new_parts/ --out results    heatmaps and scores.csv
  cncad demo                                          offline try-out, about a minute

'cncad COMMAND --help' explains each command."""

_FIT_DESCRIPTION = """\
Train one CNC detector on normal (defect-free) images and save it to a file.

DATA is either
  * an MVTec AD-style dataset: a category folder holding train/ and test/, or a folder
    of such category folders (MVTec AD, VisA 1cls, MPDD, BTAD). All categories are
    trained together into one multi-class model, on their train/good images only; or
  * a plain folder of normal images: if neither DATA nor any folder directly inside it
    has a train/ or test/ folder, every image under DATA (subfolders included) is used.
    A folder with good/ next to other folders (an MVTec test/ split) is refused.

The frozen CLIP backbone is downloaded by open_clip on first use unless --pretrained
names a local checkpoint. Defaults are the paper's settings (250 epochs: use a GPU)."""

_FIT_EPILOG = """\
examples:
  cncad fit mvtec_ad --out mvtec.cnc
  cncad fit mvtec_ad/bottle --out bottle.cnc --epochs 100 --device cuda
  cncad fit line_3/accepted --out line3.cnc --pretrained ~/clip/ViT-L-14-336px.pt
  cncad fit data --out quick.cnc --backbone tiny --image-size 112 --epochs 5  # smoke test
  cncad fit mvtec_ad --out mvtec.cnc --checkpoint-dir runs/mvtec       # keeps runs/mvtec/last.ckpt
  cncad fit mvtec_ad --out mvtec.cnc --checkpoint-dir runs/mvtec --resume runs/mvtec/last.ckpt"""

_PREDICT_DESCRIPTION = """\
Score images with a trained detector and draw where the anomalies are.

IMAGES are image files and/or folders (searched recursively). Written under --out:
  * one PNG per image: the anomaly map coloured blue (normal) to red (anomalous),
    blended over the image. Files keep their name; a folder's images keep their path
    inside it, under a folder with the folder's name;
  * scores.csv with the columns path,score (higher is more anomalous) and, when the
    detector has a threshold (fit --threshold or --threshold here), is_anomalous.

Images are read by --num-workers threads while the model runs, and every heatmap is
drawn and written (by as many threads) as soon as its batch is scored: memory does not
grow with the number of images.
All heatmaps share one colour scale, fixed before the first image: from the model's
median map value on its own normal training images (blue) to as far above their 99.9th
percentile again (red), so normal parts look cool and defects hot. --vmin and --vmax
override either end; a model saved without these statistics takes the range of the
first batch. The scale is printed, to draw other runs alike.

--out may not be an input, lie inside an input folder or contain an input image, and no
file written may be the model: a run never writes over its own inputs."""

_PREDICT_EPILOG = """\
examples:
  cncad predict model.cnc part_001.png part_002.png --out results
  cncad predict model.cnc new_parts/ --out results --threshold 0.8
  cncad predict model.cnc new_parts/ --out results --vmin 0.1 --vmax 1.2"""

_EVALUATE_DESCRIPTION = """\
Measure a trained detector on the test split of an MVTec AD-style dataset.

DATA is a category folder or a folder of category folders, as for 'cncad fit'; its
test/good images are normal, the other test/ folders are defect types whose masks are
read from ground_truth/. Prints I-AUROC, P-AUROC, AUPRO, I-AP, P-AP, I-F1max and
P-F1max in percent, per category and their mean over categories (metrics that are
undefined for a category are shown as '-' and left out of the mean)."""

_EVALUATE_EPILOG = """\
examples:
  cncad evaluate model.cnc mvtec_ad
  cncad evaluate model.cnc mvtec_ad/bottle --json bottle.json --device cuda

The JSON file holds {"model", "data", "per_category": {name: {metric: value,
"n_images": n}}, "mean": {...}} with values in [0, 1] and null for undefined ones."""

_DEMO_DESCRIPTION = """\
Generate a small synthetic defect dataset (two categories), train one multi-class CNC
model with the tiny random backbone, print the seven metrics per category and write
heatmap panels. Runs offline on a CPU in about a minute."""

_DEMO_EPILOG = """\
examples:
  cncad demo
  cncad demo --out /tmp/cnc --epochs 5 --quiet"""


def _subparser(
    commands: Any, name: str, help_text: str, description: str, epilog: str
) -> argparse.ArgumentParser:
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument(
        "--debug", action="store_true", help="show the full traceback when an error occurs"
    )
    return commands.add_parser(
        name,
        help=help_text,
        description=description,
        epilog=epilog,
        parents=[debug],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def _add_runtime_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        default="auto",
        help="auto (CUDA when available), cpu, cuda, cuda:1, ... (default: auto)",
    )
    parser.add_argument(
        "--batch-size",
        type=_positive_int,
        metavar="N",
        help="images per forward pass (default: the one stored in the model)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_fit(commands: Any) -> None:
    fit = _subparser(
        commands,
        "fit",
        "train a detector on normal images and save it",
        _FIT_DESCRIPTION,
        _FIT_EPILOG,
    )
    fit.add_argument("data", metavar="DATA", help="MVTec-style dataset or folder of images")
    fit.add_argument(
        "--out",
        default="model.cnc",
        metavar="FILE",
        help="model file to write (default: model.cnc)",
    )
    fit.add_argument(
        "--backbone",
        metavar="NAME",
        help=f"open_clip model name, 'tiny' (small random model for tests) or a .pt "
        f"checkpoint (default: {_DEFAULTS.backbone})",
    )
    fit.add_argument(
        "--pretrained",
        metavar="WEIGHTS",
        help=f"open_clip pretrained tag, a local weights file, or 'none' for random "
        f"weights (default: {_DEFAULTS.pretrained}; none with --backbone tiny)",
    )
    fit.add_argument(
        "--image-size",
        type=_positive_int,
        metavar="N",
        help=f"side of the square model input in pixels (default: {_DEFAULTS.image_size})",
    )
    fit.add_argument(
        "--epochs",
        type=_non_negative_int,
        metavar="N",
        help=f"training epochs (default: {_DEFAULTS.epochs})",
    )
    fit.add_argument(
        "--batch-size",
        type=_positive_int,
        metavar="N",
        help=f"training batch size (default: {_DEFAULTS.batch_size})",
    )
    fit.add_argument(
        "--lr", type=float, metavar="RATE", help=f"Adam learning rate (default: {_DEFAULTS.lr:g})"
    )
    fit.add_argument(
        "--num-workers",
        type=_non_negative_int,
        metavar="N",
        help=f"image loading processes (default: {_DEFAULTS.num_workers})",
    )
    fit.add_argument("--device", help=f"auto, cpu, cuda, cuda:1, ... (default: {_DEFAULTS.device})")
    fit.add_argument(
        "--seed",
        type=int,
        metavar="N",
        help=f"seed of weights, data order, noise (default: {_DEFAULTS.seed})",
    )
    fit.add_argument(
        "--threshold",
        type=float,
        metavar="SCORE",
        help="image score from which 'predict' reports an image as anomalous; stored "
        "in the model file (default: none)",
    )
    fit.add_argument(
        "--no-cache",
        action="store_true",
        help="run the frozen encoder on every batch of every epoch instead of once per "
        "image (slower; only useful with random augmentation)",
    )
    fit.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="folder for the feature cache when it does not fit in memory (default: the "
        "system's temporary folder; the files are deleted at the end)",
    )
    fit.add_argument(
        "--checkpoint-dir",
        metavar="DIR",
        help=f"keep a checkpoint of the run in DIR/{_CHECKPOINT_NAME}, replaced atomically "
        "after every --checkpoint-every epochs (default: none)",
    )
    fit.add_argument(
        "--checkpoint-every",
        type=_positive_int,
        default=1,
        metavar="N",
        help="epochs between checkpoints (default: 1)",
    )
    fit.add_argument(
        "--resume",
        metavar="CKPT",
        help="continue the run saved in this checkpoint up to its --epochs (or a new "
        "--epochs total), with its own settings",
    )
    fit.add_argument("--quiet", action="store_true", help="no progress bars")
    fit.set_defaults(handler=_fit)


def _add_predict(commands: Any) -> None:
    predict = _subparser(
        commands,
        "predict",
        "score images and write heatmap overlays and a CSV of scores",
        _PREDICT_DESCRIPTION,
        _PREDICT_EPILOG,
    )
    predict.add_argument("model", metavar="MODEL", help="model file written by 'cncad fit'")
    predict.add_argument("images", metavar="IMAGES", nargs="+", help="image files or folders")
    predict.add_argument(
        "--out",
        default="predictions",
        metavar="DIR",
        help="output folder (default: predictions)",
    )
    predict.add_argument(
        "--threshold",
        type=float,
        metavar="SCORE",
        help="image score threshold for is_anomalous (default: the model's, if any)",
    )
    predict.add_argument(
        "--alpha",
        type=_fraction,
        default=0.5,
        metavar="A",
        help="weight of the heatmap over the image, 0 to 1 (default: 0.5)",
    )
    predict.add_argument(
        "--vmin", type=float, metavar="V", help="map value drawn blue (default: see above)"
    )
    predict.add_argument(
        "--vmax", type=float, metavar="V", help="map value drawn red (default: see above)"
    )
    predict.add_argument(
        "--num-workers",
        type=_non_negative_int,
        default=2,
        metavar="N",
        help="threads that read images ahead of the model, and as many that write the "
        "heatmaps (default: 2)",
    )
    predict.add_argument(
        "--save-maps",
        choices=("npy", "png16"),
        help="also write each raw anomaly map: NAME.map.npy (float32) or NAME.map.png "
        "(16-bit grey, value v = map * 65535 / (2 * layers))",
    )
    predict.add_argument(
        "--save-masks",
        action="store_true",
        help="also write NAME.mask.png, 255 where the map reaches the pixel threshold",
    )
    _add_runtime_options(predict)
    predict.set_defaults(handler=_predict)


def _add_evaluate(commands: Any) -> None:
    evaluate = _subparser(
        commands,
        "evaluate",
        "compute the seven anomaly detection metrics on a labelled test set",
        _EVALUATE_DESCRIPTION,
        _EVALUATE_EPILOG,
    )
    evaluate.add_argument("model", metavar="MODEL", help="model file written by 'cncad fit'")
    evaluate.add_argument("data", metavar="DATA", help="MVTec-style dataset with test/")
    evaluate.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    evaluate.add_argument(
        "--eval-size",
        type=_positive_int,
        default=256,
        metavar="N",
        help="side of the grid on which maps and masks are compared (default: 256)",
    )
    evaluate.add_argument(
        "--num-workers",
        type=_non_negative_int,
        metavar="N",
        help="image loading processes (default: the one stored in the model)",
    )
    _add_runtime_options(evaluate)
    evaluate.set_defaults(handler=_evaluate)


def _add_demo(commands: Any) -> None:
    demo = _subparser(
        commands,
        "demo",
        "offline end-to-end run: synthetic defects, tiny backbone, metrics and heatmaps",
        _DEMO_DESCRIPTION,
        _DEMO_EPILOG,
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


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser of the ``cncad`` command.

    Returns:
        The parser; each subcommand stores its function as ``handler``.
    """
    parser = argparse.ArgumentParser(
        prog="cncad",
        description="CNC multi-class anomaly detection (Wang et al., AAAI 2025).",
        epilog=_MAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_fit(commands)
    _add_predict(commands)
    _add_evaluate(commands)
    _add_demo(commands)
    return parser


def _is_main_process() -> bool:
    """Whether this process reports on stdout: rank 0 under ``torchrun``, or the only one.

    ``torchrun`` sets ``RANK`` in every process. ``cncad.distributed`` is asked only when
    torch.distributed is loaded already (a process group may be running), since importing
    it imports torch.
    """
    if "torch.distributed" in sys.modules:
        from cncad.distributed import is_main_process

        return is_main_process()
    return os.environ.get("RANK", "0") == "0"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cncad`` console script.

    Args:
        argv: Arguments without the program name (default: ``sys.argv[1:]``).

    Returns:
        The process exit status: 0 on success, 1 when the command failed (one line on
        stderr), 2 for a malformed command line, 130 when interrupted.
    """
    args = build_parser().parse_args(argv)
    try:
        if not _is_main_process():  # under torchrun, rank 0 reports; errors still print
            with contextlib.redirect_stdout(io.StringIO()):
                return args.handler(args)
        return args.handler(args)
    except KeyboardInterrupt:
        message, status = "interrupted", 130
    except _USER_ERRORS as error:
        if args.debug:
            raise
        message, status = f"error: {_one_line(error)}", 1
    # Progress bars left open by the failed call close, and end their line, when its
    # frames are freed: at the end of the except block, or here for frames caught in
    # reference cycles. The message then gets a line of its own.
    gc.collect()
    print(f"cncad: {message}", file=sys.stderr)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
