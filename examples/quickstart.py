"""Quickstart: fit, evaluate, predict, save and load, offline on generated data.

Uses the tiny randomly initialised backbone, so it runs on a CPU in well under a minute;
the numbers it prints measure the pipeline, not CNC's accuracy with pretrained CLIP. For
real use, drop ``backbone``/``pretrained`` (the defaults are the paper's ViT-L-14-336 with
OpenAI weights) and point ``fit``/``evaluate`` at your own MVTec-style folder.

    python examples/quickstart.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from cncad import CNCDetector
from cncad.data import make_synthetic_dataset
from cncad.evaluation import format_table


def main() -> None:
    """Run the whole workflow in a temporary folder, which is removed at the end."""
    with tempfile.TemporaryDirectory(prefix="cncad-quickstart-") as tmp:
        workdir = Path(tmp)
        # Two synthetic categories in the MVTec AD layout: train/good, test/<defect>, masks.
        root = make_synthetic_dataset(workdir / "data", n_train=16, image_size=64)

        detector = CNCDetector(backbone="tiny", pretrained=None, image_size=56, epochs=5, sigma=1.0)
        detector.fit(root, progress=False)  # one multi-class model on both categories
        print(format_table(detector.evaluate(root, progress=False)))

        image = next((root / "bolt_like" / "test").glob("*/*.png"))
        result = detector.predict(image)  # a path, PIL image, array, tensor or a list
        score, shape = float(result.pred_score[0]), tuple(result.anomaly_map.shape)
        print(f"{image.name}: score {score:.4f}, map {shape}")

        path = detector.save(workdir / "model.cnc")  # trained weights + config, not CLIP
        again = CNCDetector.load(path)
        assert torch.equal(again.predict(image).pred_score, result.pred_score)
        print(f"saved and reloaded {path.name}: identical scores")


if __name__ == "__main__":
    main()
