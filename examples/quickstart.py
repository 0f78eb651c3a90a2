"""Quickstart: fit, evaluate, predict, save and load, offline on generated data.

Uses the tiny randomly initialised backbone, so it runs on a CPU in well under a minute;
the numbers it prints measure the pipeline, not CNC's accuracy with pretrained CLIP.

    python examples/quickstart.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from cncad import CNCDetector
from cncad.data import make_synthetic_dataset
from cncad.evaluation import format_table


def main() -> None:
    workdir = Path(tempfile.mkdtemp(prefix="cncad-quickstart-"))
    root = make_synthetic_dataset(workdir / "data", n_train=16, image_size=64)

    detector = CNCDetector(backbone="tiny", pretrained=None, image_size=56, epochs=5, sigma=1.0)
    detector.fit(root)
    print(format_table(detector.evaluate(root)))

    image = next((root / "bolt_like" / "test").glob("*/*.png"))
    result = detector.predict(image)
    score, shape = float(result.pred_score[0]), tuple(result.anomaly_map.shape)
    print(f"{image.name}: score {score:.4f}, map {shape}")

    path = detector.save(workdir / "model.cnc")
    again = CNCDetector.load(path)
    assert (again.predict(image).pred_score == result.pred_score).all()
    print(f"saved and reloaded {path}")


if __name__ == "__main__":
    main()
