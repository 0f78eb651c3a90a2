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
import warnings
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cncad.config import CNCConfig
from cncad.errors import CNCADError
from cncad.files import atomic_write, check_output_dir, check_output_file, save_image_atomic

if TYPE_CHECKING:
    import numpy as np

__all__ = ["build_parser", "main"]

_DEFAULTS = CNCConfig()

#: ``cncad.checkpoint.CHECKPOINT_NAME``, copied because that module imports torch.
_CHECKPOINT_NAME = "last.ckpt"

_TINY_NOTE = (
    "note: the 'tiny' backbone is a small randomly initialised CLIP. These figures measure "
    "the pipeline end to end, not CNC's accuracy; real use needs pretrained CLIP weights "
    "(backbone 'ViT-L-14-336-quickgelu', pretrained 'openai' or a local checkpoint)."
)

#: Errors that are always about the user's inputs or machine: reported as one line.
_USER_ERRORS: tuple[type[BaseException], ...] = (CNCADError, OSError)

#: Errors reported as one line when cncad's own code raised them (its checks); raised
#: inside torch, numpy or another library they are bugs in cncad.
_CHECK_ERRORS: tuple[type[BaseException], ...] = (ValueError, TypeError, RuntimeError)

#: Exit status for an unexpected failure, a bug (BSD's EX_SOFTWARE).
_INTERNAL_ERROR = 70

_PACKAGE_DIR = Path(__file__).resolve().parent

_SCORES_FILE = "scores.csv"

#: Exit status of ``cncad predict`` when it scored the readable images but skipped others.
_SOME_IMAGES_FAILED = 3


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


def _open_fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 < value < 1.0:  # NaN fails too
        raise argparse.ArgumentTypeError(f"must be above 0 and below 1, got {text}")
    return value


_open_fraction.__name__ = "float"


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    value = _finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {value:g}")
    return value


def _non_negative_float(text: str) -> float:
    value = _finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value:g}")
    return value


_finite_float.__name__ = _positive_float.__name__ = _non_negative_float.__name__ = "float"


def _pretrained(text: str) -> str | None:
    return None if text.lower() == "none" else text


# --------------------------------------------------------------------------------------
# Helpers shared by the subcommands
# --------------------------------------------------------------------------------------


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


def _is_user_error(error: BaseException) -> bool:
    """Whether ``error`` reports a problem with the inputs (one line) rather than a bug.

    cncad's own error types and ``OSError`` always do. A ``ValueError`` or ``TypeError``
    does when a ``raise`` in cncad's code made it, i.e. one of its argument checks; the
    same types raised deep inside torch or numpy mean cncad passed them something it
    should not have. Errors re-raised from DataLoader workers are judged by the worker's
    traceback, which they carry in their message.
    """
    if isinstance(error, _USER_ERRORS):
        return True
    if not isinstance(error, _CHECK_ERRORS):
        return False
    text = str(error)
    if "Original Traceback" in text:
        files = re.findall(r'File "([^"]+)"', text)
        return bool(files) and Path(files[-1]).resolve().is_relative_to(_PACKAGE_DIR)
    frame = error.__traceback__
    if frame is None:
        return False
    while frame.tb_next is not None:
        frame = frame.tb_next
    return Path(frame.tb_frame.f_code.co_filename).resolve().is_relative_to(_PACKAGE_DIR)


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
    from cncad.data import open_dataset
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
        data = open_dataset(args.data, "train", image_size=detector.config.image_size)
    else:
        config = _DEFAULTS.replace(**overrides)
        # The data folder is checked before the backbone, which may take minutes to load.
        data = open_dataset(args.data, "train", image_size=config.image_size)
        detector = CNCDetector(config)
    print(f"training data: {data.describe()}")
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
    from cncad._decode import iter_inputs  # torch-free, for ONNX models

    pairs: list[tuple[Path, Path]] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            base = Path(path.resolve().name)
            pairs.extend((image, base / image.relative_to(path)) for image in iter_inputs(path))
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


def _write_scores(path: Path, rows: list[tuple[str, float, bool | None, float | None]]) -> None:
    """Write ``scores.csv`` (``path,score[,is_anomalous][,norm_score]``) atomically, in order.

    ``rows`` holds ``(image path, score, label or None, normalised score or None)`` for
    every image that was scored.
    """
    labelled = any(row[2] is not None for row in rows)
    normalised = any(row[3] is not None for row in rows)
    with atomic_write(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            [
                "path",
                "score",
                *(["is_anomalous"] if labelled else []),
                *(["norm_score"] if normalised else []),
            ]
        )
        for image, score, label, norm in rows:
            flag = ["true" if label else "false"] if labelled else []
            extra = [f"{norm:.6f}"] if normalised else []
            writer.writerow([image, f"{score:.9g}", *flag, *extra])


def _predict_thresholds(args: argparse.Namespace, detector: Any) -> tuple[Any, Any]:
    """The image and pixel thresholds ``predict`` applies.

    ``--category``'s calibrated ones, ``--threshold``, or the model's.
    """
    if args.category is not None:
        if args.threshold is not None:
            raise ValueError(
                "--category applies the thresholds calibrated for that category; drop --threshold"
            )
        if detector.calibration is None:
            raise ValueError(
                f"--category needs a calibrated model: run 'cncad calibrate {args.model} DATA "
                "--per-category' first"
            )
    elif args.threshold is not None:
        detector.threshold = args.threshold
        # the normalised scores are centred on the calibrated threshold, not this one
        detector.calibration = None
    # the choice predict_iter(category=...) makes, shared by both kinds of detector
    decision = detector._decision(args.category)
    return decision.threshold, decision.pixel_threshold


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


def _is_onnx_file(path: str) -> bool:
    """Whether ``path`` names an exported ONNX model (by its extension)."""
    return Path(path).suffix.lower() == ".onnx"


def _load_onnx_detector(path: str, device: str, batch_size: int | None) -> Any:
    """An [`ONNXDetector`][cncad.deploy.ONNXDetector] for ``cncad predict MODEL.onnx``."""
    from cncad.deploy import ONNXDetector

    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda"):
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    elif device != "auto" and device != "cpu":
        raise ValueError(f"--device {device}: an ONNX model runs on 'auto', 'cpu' or 'cuda'")
    try:
        detector = ONNXDetector(path, providers=providers)
    except ImportError as error:
        raise CNCADError(str(error)) from error
    if batch_size is not None:
        detector.batch_size = batch_size
    print(
        f"loaded {path}: ONNX model exported by cncad {detector.version}, image size "
        f"{detector.image_size}, threshold {detector.threshold}, "
        f"on {', '.join(detector.providers)}"
    )
    return detector


def _predict(args: argparse.Namespace) -> int:
    import numpy as np
    from tqdm.auto import tqdm

    if args.vmin is not None and args.vmax is not None and args.vmin >= args.vmax:
        raise ValueError(f"--vmin ({args.vmin:g}) must be below --vmax ({args.vmax:g})")
    check_output_dir(args.out, inputs=args.images, what="--out")
    out = Path(args.out)
    images = _image_list(args.images)
    _check_predict_outputs(out, images, Path(args.model))
    overrides: dict[str, Any] = {"device": args.device}
    if args.batch_size is not None:
        overrides["batch_size"] = args.batch_size
    if _is_onnx_file(args.model):  # an exported model: the same outputs, run by onnxruntime
        detector = _load_onnx_detector(args.model, args.device, args.batch_size)
    else:
        detector = _load_detector(args.model, **overrides)
    threshold, pixel_threshold = _predict_thresholds(args, detector)
    if args.save_masks and pixel_threshold is None:
        raise ValueError("--save-masks needs a threshold: pass --threshold or calibrate the model")
    scale = _colour_scale(args, detector)
    scale_source = "fixed" if scale is not None else "first batch"
    layers = detector.layers if _is_onnx_file(args.model) else detector.model.layers
    map_range = 2.0 * len(layers)  # each layer adds 1 - cos in [0, 2]
    rows: dict[int, tuple[str, float, bool | None, float | None]] = {}
    failed: list[tuple[str, str]] = []
    batches = detector.predict_iter(
        [image for image, _ in images],
        num_workers=args.num_workers,
        progress=not args.quiet,
        keep_images=True,
        on_error="skip",
        category=args.category,
    )
    # Drawing and PNG-encoding a heatmap costs more than scoring it, so the writes run on
    # their own threads too (zlib releases the GIL); at most two batches wait for them.
    writers = ThreadPoolExecutor(max_workers=args.num_workers) if args.num_workers else None
    pending: deque[Future] = deque()
    table = out / _SCORES_FILE
    try:
        for batch in batches:
            for failure in batch.failures:
                failed.append((str(images[failure.index][0]), failure.reason))
                # tqdm.write keeps the line apart from the progress bar on the same stream.
                tqdm.write(
                    f"cncad: skipped {images[failure.index][0]}: {failure.reason}", file=sys.stderr
                )
            for position, index in enumerate(batch.indices):
                label = None if batch.pred_label is None else bool(batch.pred_label[position])
                norm = None if batch.norm_score is None else float(batch.norm_score[position])
                score = float(batch.pred_score[position])
                rows[index] = (str(images[index][0]), score, label, norm)
            if not batch.indices:
                continue
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
                    np.asarray(batch.anomaly_map[position]),  # a CPU tensor or an array
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
        # Written whatever happened, so that a stopped run still says what it scored.
        _write_scores(table, [rows[index] for index in sorted(rows)])

    vmin, vmax = scale if scale is not None else (math.nan, math.nan)
    counted = f"{len(rows)} of {len(images)}" if failed else f"{len(rows)}"
    print(f"scored {counted} images: heatmap overlays in {out}, scores in {table}")
    if rows:
        print(
            f"heatmap colour scale ({scale_source}): {vmin:.6g} (blue) to {vmax:.6g} (red); "
            f"pass --vmin {vmin:.6g} --vmax {vmax:.6g} to draw other runs on the same scale"
        )
    labels = [row[2] for row in rows.values() if row[2] is not None]
    if labels:
        print(f"{sum(labels)} of {len(labels)} images have a score >= {threshold:.6g}")
    if failed:
        print(
            f"cncad: {len(failed)} of {len(images)} images could not be read (listed above); "
            f"exit status {_SOME_IMAGES_FAILED}",
            file=sys.stderr,
        )
        return _SOME_IMAGES_FAILED
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

    # (3, H, W) float32 in [0, 1]: a CPU tensor from a torch model, an array from an ONNX one
    pixels = np.asarray(image, dtype=np.float32)
    picture = np.rint(pixels.transpose(1, 2, 0) * np.float32(255)).astype(np.uint8)
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
            key: None if v is None else _finite_or_none(float(v) if key != "n_images" else int(v))
            for key, v in row.items()
        }

    payload = {
        "model": model,
        "data": data,
        "per_category": {name: clean(row) for name, row in results["per_category"].items()},
        "mean": clean(results["mean"]),
    }
    if "at_threshold" in results:
        decided = results["at_threshold"]
        payload["at_threshold"] = {
            "per_category": {
                name: {key: _finite_or_none(value) for key, value in row.items()}
                for name, row in decided["per_category"].items()
            },
            "total": {key: _finite_or_none(value) for key, value in decided["total"].items()},
        }
    return payload


def _decision_lines(decided: dict[str, Any]) -> str:
    """What the model's threshold decides on the test set, a line per category and total."""

    def line(name: str, row: dict[str, Any]) -> str:
        where = (
            f"score >= {row['threshold']:.6g}"
            if row["threshold"] is not None
            else "per-category thresholds"
        )
        return (
            f"  {name}: {row['false_alarms']} of {row['normal_images']} normal images flagged, "
            f"{row['detected']} of {row['defective_images']} defective found ({where}; "
            f"F1 {_percent_or_dash(row['F1'])})"
        )

    rows = [line(name, row) for name, row in decided["per_category"].items()]
    return "\n".join(["at the model's threshold:", *rows, line("all", decided["total"])])


def _percent_or_dash(value: float) -> str:
    return "-" if math.isnan(value) else f"{100 * value:.1f} %"


def _detector_and_test_set(args: argparse.Namespace) -> tuple[Any, Any]:
    """The model of ``evaluate``/``calibrate`` and the test split of their ``DATA``.

    The folder is checked before the model loads (which may take minutes), and read at
    the model's image size after.
    """
    from cncad.data import open_dataset

    open_dataset(args.data, "test", mask_size=args.eval_size)
    overrides: dict[str, Any] = {"device": args.device}
    if args.batch_size is not None:
        overrides["batch_size"] = args.batch_size
    if getattr(args, "num_workers", None) is not None:
        overrides["num_workers"] = args.num_workers
    detector = _load_detector(args.model, **overrides)
    size = detector.config.image_size
    return detector, open_dataset(args.data, "test", image_size=size, mask_size=args.eval_size)


def _evaluate(args: argparse.Namespace) -> int:
    from cncad.evaluation import format_table

    if args.json is not None:
        check_output_file(args.json, inputs=[args.model, args.data], what="--json")
    data = Path(args.data)
    detector, test_set = _detector_and_test_set(args)
    print(f"test data: {test_set.describe()}")
    with warnings.catch_warnings(record=True) as caught:  # e.g. no masks: printed as one line
        results = detector.evaluate(test_set, eval_size=args.eval_size, progress=not args.quiet)
    for warning in caught:
        print(f"cncad: warning: {warning.message}", file=sys.stderr)
    print(format_table(results))
    if "at_threshold" in results:
        print(_decision_lines(results["at_threshold"]))
    if args.json is not None:
        path = Path(args.json)
        payload = _json_results(results, args.model, str(data))
        with atomic_write(path, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, indent=2)
            handle.write("\n")
        print(f"wrote {path}")
    return 0


# --------------------------------------------------------------------------------------
# cncad calibrate
# --------------------------------------------------------------------------------------


def _calibrate(args: argparse.Namespace) -> int:
    import dataclasses

    from cncad.checkpoint import read_detector_file, write_detector_file

    data = Path(args.data)
    out = Path(args.out) if args.out is not None else Path(args.model)
    in_place = out.resolve() == Path(args.model).resolve()
    check_output_file(out, inputs=[data] if in_place else [args.model, data], what="--out")
    contents = read_detector_file(args.model)
    detector, test_set = _detector_and_test_set(args)
    print(f"calibration data: {test_set.describe()}")
    result = detector.calibrate(
        test_set,
        target_fpr=args.target_fpr,
        per_category=args.per_category,
        eval_size=args.eval_size,
        progress=not args.quiet,
    )
    # Only the calibration changes: the weights, the stored settings (not this run's
    # --device/--batch-size) and a checkpoint's optimizer state are written back as read.
    updated = dataclasses.replace(
        contents,
        threshold=result.threshold,
        pixel_threshold=result.pixel_threshold,
        calibration=result.to_dict(),
    )
    write_detector_file(out, updated)  # atomic: a failure leaves the old file whole
    print(f"calibrated: {result.summary()}")
    for name, child in sorted(result.per_category.items()):
        print(f"  {name}: {child.summary()}")
    print(f"wrote {out}")
    return 0


# --------------------------------------------------------------------------------------
# cncad demo
# --------------------------------------------------------------------------------------


def _demo(args: argparse.Namespace) -> int:
    import itertools

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

    # Every category is drawn: defective images are taken in turn from each category
    # (and, within one, from each defect type), then one normal image from the next one.
    def interleave(groups: list[list[Any]]) -> list[Any]:
        return [item for row in itertools.zip_longest(*groups) for item in row if item is not None]

    test_set = AnomalyFolder(data_root, split="test", image_size=args.image_size)
    categories = list(dict.fromkeys(s.category for s in test_set.samples))
    by_category = []
    for category in categories:
        defects = [s for s in test_set.samples if s.category == category and s.label == 1]
        kinds = dict.fromkeys(s.defect_type for s in defects)
        by_category.append(interleave([[s for s in defects if s.defect_type == k] for k in kinds]))
    chosen = interleave(by_category)[: args.heatmaps]
    normal = [s for s in test_set.samples if s.label == 0]
    turn = len(chosen) % len(categories)
    normal.sort(key=lambda s: (categories.index(s.category) - turn) % len(categories))
    chosen += normal[:1]
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
            title=f"{sample.category} / {sample.defect_type}: image score {float(score):.3f}",
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
  cncad calibrate model.cnc held_out --target-fpr 0.01  thresholds into the model file
  cncad predict model.cnc new_parts/ --out results    heatmaps and scores.csv
  cncad export model.cnc --out model.onnx             one ONNX graph, runs without torch
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

_CALIBRATE_DESCRIPTION = """\
Choose the thresholds from which 'cncad predict' calls an image (and a pixel) anomalous,
and store them, with the score normalisation, in the model file.

DATA is an MVTec AD-style dataset, as for 'cncad evaluate'; its test/ split calibrates.
Use images the model was not trained on.
  * test/good images only: the image threshold lets --target-fpr of them be flagged
    (there must be at least 1 / F of them), the pixel threshold likewise on their pixels;
  * with defect folders too: the thresholds with the best F1 score on the images
    (and on the mask pixels; without masks the pixel threshold falls back to
    --target-fpr on the normal images' pixels).
With --per-category every category also gets its own thresholds, used by
'cncad predict --category NAME': a multi-class model's scores differ between products.

MODEL is replaced atomically (or --out is written); its weights, settings and training
state are kept as they were."""

_CALIBRATE_EPILOG = """\
examples:
  cncad calibrate model.cnc held_out_good --target-fpr 0.01
  cncad calibrate model.cnc mvtec_ad --per-category --out calibrated.cnc
  cncad predict calibrated.cnc new_bottles/ --out results --category bottle"""

_DEMO_DESCRIPTION = """\
Generate a small synthetic defect dataset (two categories), train one multi-class CNC
model with the tiny random backbone, print the seven metrics per category and write
heatmap panels. Runs offline on a CPU in about a minute."""

_DEMO_EPILOG = """\
examples:
  cncad demo
  cncad demo --out /tmp/cnc --epochs 5 --quiet"""


# --------------------------------------------------------------------------------------
# cncad export
# --------------------------------------------------------------------------------------

_EXPORT_DESCRIPTION = """\
Export a trained detector as one ONNX graph that runs without torch.

The graph takes (N, 3, S, S) float images in [0, 1] (S: the model's image size; CLIP
normalisation is inside) and returns pred_score (N,) and anomaly_map (N, S, S); a model
with a threshold also returns pred_label and pred_mask, a calibrated one norm_score and
norm_map. Its metadata holds the cncad version, the settings, the thresholds and the
calibration. Run it with cncad.deploy.ONNXDetector (pip install cncad[deploy]), with
'cncad predict MODEL.onnx ...', or with OpenVINO's runtime, which reads ONNX files.

--out is checked before any work and may not be the model file; an existing file is
replaced atomically."""

_EXPORT_EPILOG = """\
examples:
  cncad export model.cnc --out model.onnx
  cncad predict model.onnx new_parts/ --out results"""


def _export(args: argparse.Namespace) -> int:
    from cncad.export import export

    target = check_output_file(args.out, inputs=[args.model], what="--out")
    detector = _load_detector(args.model, device="cpu")
    start = time.perf_counter()
    try:
        path = export(detector, target, "onnx", opset=args.opset)
    except ImportError as error:
        raise CNCADError(str(error)) from error
    size = path.stat().st_size / 2**20
    print(
        f"exported {args.model} to {path} ({size:.1f} MiB, opset {args.opset}) in "
        f"{time.perf_counter() - start:.1f} s; run it with cncad.deploy.ONNXDetector or "
        f"'cncad predict {path} IMAGES --out DIR'"
    )
    return 0


def _add_export(commands: Any) -> None:
    export = _subparser(
        commands,
        "export",
        "export a trained detector to ONNX, to run without torch",
        _EXPORT_DESCRIPTION,
        _EXPORT_EPILOG,
    )
    export.add_argument("model", metavar="MODEL", help="model file written by 'cncad fit'")
    export.add_argument("--out", required=True, metavar="FILE", help="the .onnx file to write")
    export.add_argument(
        "--opset", type=_int_at_least(17), default=17, metavar="N", help="ONNX opset (default 17)"
    )
    export.set_defaults(handler=_export)


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
        "--lr",
        type=_positive_float,
        metavar="RATE",
        help=f"Adam learning rate (default: {_DEFAULTS.lr:g})",
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
        type=_non_negative_int,
        metavar="N",
        help=f"seed of weights, data order, noise (default: {_DEFAULTS.seed})",
    )
    fit.add_argument(
        "--threshold",
        type=_finite_float,
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
        type=_finite_float,
        metavar="SCORE",
        help="image score threshold for is_anomalous (default: the model's, if any)",
    )
    predict.add_argument(
        "--category",
        metavar="NAME",
        help="apply the thresholds calibrated for this category ('cncad calibrate "
        "--per-category'); default: the model's global ones",
    )
    predict.add_argument(
        "--alpha",
        type=_fraction,
        default=0.5,
        metavar="A",
        help="weight of the heatmap over the image, 0 to 1 (default: 0.5)",
    )
    predict.add_argument(
        "--vmin", type=_finite_float, metavar="V", help="map value drawn blue (default: see above)"
    )
    predict.add_argument(
        "--vmax", type=_finite_float, metavar="V", help="map value drawn red (default: see above)"
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


def _add_calibrate(commands: Any) -> None:
    calibrate = _subparser(
        commands,
        "calibrate",
        "choose the image and pixel thresholds and store them in the model file",
        _CALIBRATE_DESCRIPTION,
        _CALIBRATE_EPILOG,
    )
    calibrate.add_argument("model", metavar="MODEL", help="model file written by 'cncad fit'")
    calibrate.add_argument(
        "data", metavar="DATA", help="MVTec-style dataset whose test/ split calibrates"
    )
    calibrate.add_argument(
        "--target-fpr",
        type=_open_fraction,
        default=0.01,
        metavar="F",
        help="false-alarm rate allowed on normal images, above 0 and below 1 (default: 0.01)",
    )
    calibrate.add_argument(
        "--per-category",
        action="store_true",
        help="also calibrate every category on its own images (predict --category NAME)",
    )
    calibrate.add_argument(
        "--out",
        metavar="FILE",
        help="write the calibrated model here instead of replacing MODEL (atomically)",
    )
    calibrate.add_argument(
        "--eval-size",
        type=_positive_int,
        default=256,
        metavar="N",
        help="side of the grid on which maps and masks are compared (default: 256)",
    )
    _add_runtime_options(calibrate)
    calibrate.set_defaults(handler=_calibrate)


def _add_demo(commands: Any) -> None:
    demo = _subparser(
        commands,
        "demo",
        "offline end-to-end run: synthetic defects, tiny backbone, metrics and heatmaps",
        _DEMO_DESCRIPTION,
        _DEMO_EPILOG,
    )
    demo.add_argument("--out", default="cncad_demo_output", help="output folder")
    demo.add_argument(
        "--epochs", type=_positive_int, default=15, help="training epochs (default 15)"
    )
    demo.add_argument(
        "--image-size", type=_positive_int, default=112, help="model input side (x14)"
    )
    demo.add_argument("--data-size", type=_positive_int, default=128, help="generated image side")
    demo.add_argument(
        "--train-images", type=_positive_int, default=32, help="normal images per class"
    )
    demo.add_argument(
        "--sigma", type=_non_negative_float, default=2.0, help="map smoothing, pixels"
    )
    demo.add_argument(
        "--heatmaps", type=_non_negative_int, default=4, help="defective images to draw"
    )
    demo.add_argument("--seed", type=_non_negative_int, default=0)
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
    _add_calibrate(commands)
    _add_export(commands)
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
        The process exit status: 0 on success; 1 when the command failed on its inputs
        (one line on stderr); 2 for a malformed command line; 3 when ``predict`` scored
        the readable images but could not read others (each listed on stderr); 70 for an
        unexpected failure, a bug in cncad (``--debug`` shows its traceback); 130 when
        interrupted.
    """
    args = build_parser().parse_args(argv)
    try:
        if not _is_main_process():  # under torchrun, rank 0 reports; errors still print
            with contextlib.redirect_stdout(io.StringIO()):
                return args.handler(args)
        return args.handler(args)
    except KeyboardInterrupt:
        message, status = "interrupted", 130
    except Exception as error:
        if args.debug:
            raise
        if _is_user_error(error):
            message, status = f"error: {_one_line(error)}", 1
        else:
            message, status = (
                f"internal error, a bug in cncad: {type(error).__name__}: {_one_line(error)}\n"
                "rerun with --debug for the traceback, and please report it",
                _INTERNAL_ERROR,
            )
    # Progress bars left open by the failed call close, and end their line, when its
    # frames are freed: at the end of the except block, or here for frames caught in
    # reference cycles. The message then gets a line of its own.
    gc.collect()
    print(f"cncad: {message}", file=sys.stderr)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
