"""Images per second: CNCDetector.predict (torch) against the exported ONNX graph.

Side by side in one run, on the same images: ``CNCDetector.predict``, ``ONNXDetector``
(onnxruntime, CPU provider unless ``--providers``) and, when installed, OpenVINO's runtime
on the same file (f32). A randomly initialised detector (weights do not change the speed)
at the model's size, so no resizing is timed; each figure is the median of ``--repeats``
timed runs after one warm-up run.

    python benchmarks/bench_deploy.py                      # ViT-B-16, 224 px, batches 1 and 8
    python benchmarks/bench_deploy.py --json deploy.json
    python benchmarks/bench_deploy.py --backbone tiny --image-size 56 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cncad import CNCDetector
from cncad.deploy import ONNXDetector


def _rate(run, images: int, repeats: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return images / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="ViT-B-16")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--images", type=int, default=16, help="images per timed run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--providers", nargs="+", default=["CPUExecutionProvider"])
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()

    detector = CNCDetector(
        backbone=args.backbone,
        pretrained=None,
        image_size=args.image_size,
        device="cpu",
        allow_untrained=True,
    )
    size = args.image_size
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (args.images, size, size, 3), dtype=np.uint8)
    images = [image for image in pixels]
    batch = (pixels.transpose(0, 3, 1, 2) / np.float32(255)).astype(np.float32)
    results: dict = {
        "backbone": args.backbone,
        "image_size": size,
        "images": args.images,
        "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "rows": [],
    }
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        path = detector.export(Path(folder) / "model.onnx")
        results["export_seconds"] = round(time.perf_counter() - start, 1)
        results["file_mib"] = round(path.stat().st_size / 2**20, 1)
        deployed = ONNXDetector(path, providers=args.providers)
        compiled = None
        try:
            import openvino as ov

            compiled = ov.Core().compile_model(
                str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"}
            )
            results["openvino"] = ov.__version__
        except ImportError:
            results["openvino"] = None
        for batch_size in args.batch_sizes:
            row = {"batch_size": batch_size}
            row["torch"] = _rate(
                lambda bs=batch_size: detector.predict(images, batch_size=bs),
                args.images,
                args.repeats,
            )
            row["onnxruntime"] = _rate(
                lambda bs=batch_size: deployed.predict(images, batch_size=bs),
                args.images,
                args.repeats,
            )
            if compiled is not None:

                def run_openvino(bs: int = batch_size) -> None:
                    for first in range(0, len(batch), bs):
                        compiled(batch[first : first + bs])

                # the graph only: images already decoded, at the model's size
                row["openvino_graph_only"] = _rate(run_openvino, args.images, args.repeats)
            row = {k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}
            results["rows"].append(row)
            print(json.dumps(row))
    print(json.dumps({k: v for k, v in results.items() if k != "rows"}))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
