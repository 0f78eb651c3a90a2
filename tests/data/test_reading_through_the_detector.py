"""The detector and the command line read data through cncad.data, and refuse bad batches.

``CNCDetector.fit``/``evaluate`` given a path and ``cncad fit``/``cncad evaluate`` all open it
with [`open_dataset`][cncad.data.folder.open_dataset]; the checks of
[`check_model_batch`][cncad.data.transforms.check_model_batch] guard Datasets passed in.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from cncad import CNCDetector
from cncad.cli import main
from cncad.data import AnomalyFolder, make_synthetic_dataset
from cncad.evaluation import IMAGE_METRICS, PIXEL_METRICS

TINY = {
    "backbone": "tiny",
    "pretrained": None,
    "image_size": 56,
    "batch_size": 4,
    "epochs": 1,
    "theta": 1,
    "sigma": 1.0,
    "device": "cpu",
}


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("reading")
    return make_synthetic_dataset(
        root, categories=("carpet_like",), n_train=4, n_test_good=3, n_test_defect=3, image_size=48
    )


@pytest.fixture(scope="module")
def plain_fitted(
    data_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[CNCDetector, Path]:
    """A detector fitted through the API on a plain folder (which the CLI also accepts)."""
    plain = tmp_path_factory.mktemp("plain") / "parts"
    shutil.copytree(data_root / "carpet_like" / "train" / "good", plain / "day_1")
    before = _hashes(plain)
    detector = CNCDetector(**TINY).fit(plain, progress=False)
    assert _hashes(plain) == before
    return detector, plain


@pytest.fixture(scope="module")
def maskless(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test split alone: test/good and test/<defect>, no ground_truth folder."""
    root = tmp_path_factory.mktemp("maskless") / "carpet_like"
    shutil.copytree(data_root / "carpet_like" / "test", root / "test")
    return root


def test_fit_on_a_plain_folder_works_in_the_api_as_in_the_cli(
    plain_fitted: tuple[CNCDetector, Path],
) -> None:
    detector, _ = plain_fitted
    assert detector.epochs_trained == 1 and detector.is_trained


def test_evaluate_without_masks_gives_image_metrics_and_says_why(
    plain_fitted: tuple[CNCDetector, Path], data_root: Path, maskless: Path
) -> None:
    detector, _ = plain_fitted
    before = _hashes(maskless)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the full test set warns about nothing
        full = detector.evaluate(data_root, eval_size=32, progress=False)
    with pytest.warns(UserWarning, match=r"pixel metrics .* are None") as caught:
        results = detector.evaluate(maskless, eval_size=32, progress=False)
    assert len([w for w in caught if "ground-truth mask" in str(w.message)]) == 1
    row, reference = results["per_category"]["carpet_like"], full["per_category"]["carpet_like"]
    assert all(row[m] is None for m in PIXEL_METRICS)
    assert all(reference[m] is not None for m in PIXEL_METRICS)
    # The same scores as with masks: the image metrics do not depend on them.
    assert {m: row[m] for m in IMAGE_METRICS} == {m: reference[m] for m in IMAGE_METRICS}
    assert _hashes(maskless) == before


def test_cli_evaluate_without_masks_prints_why_and_writes_nulls(
    plain_fitted: tuple[CNCDetector, Path],
    maskless: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    detector, _ = plain_fitted
    model = detector.save(tmp_path / "model.cnc")
    target = tmp_path / "eval.json"
    before = _hashes(maskless)
    status = main(["evaluate", str(model), str(maskless), "--json", str(target), "--quiet"])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert "3 defective images have no ground-truth mask" in captured.out
    notes = [line for line in captured.err.splitlines() if line.startswith("cncad: warning:")]
    assert len(notes) == 1 and "pixel metrics" in notes[0] and "'carpet_like'" in notes[0]
    assert "Traceback" not in captured.err
    report = json.loads(target.read_text(encoding="utf-8"))
    for row in (report["per_category"]["carpet_like"], report["mean"]):
        assert all(row[m] is None for m in PIXEL_METRICS)
        assert all(0.0 <= row[m] <= 1.0 for m in IMAGE_METRICS)
    assert _hashes(maskless) == before


def _uint8_like(n: int = 4) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 56, 56), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("cache", [True, False])
def test_fit_refuses_a_dataset_of_0_255_floats_at_the_first_batch(cache: bool) -> None:
    detector = CNCDetector(**TINY)
    data = TensorDataset(_uint8_like().float())
    with pytest.raises(ValueError, match=r"training batch has image values in \[0, 255\]") as info:
        detector.fit(data, progress=False, cache=cache)
    assert "divide 0-255 pixel values by 255" in str(info.value)
    assert detector.epochs_trained == 0


def test_fit_says_the_input_has_nan_not_the_cache() -> None:
    images = torch.zeros(4, 3, 56, 56)
    images[2, 1, 5, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite values") as info:
        CNCDetector(**TINY).fit(TensorDataset(images), progress=False)
    assert "cache" not in str(info.value)


def test_evaluate_refuses_a_dataset_of_0_255_floats(
    plain_fitted: tuple[CNCDetector, Path], data_root: Path
) -> None:
    detector, _ = plain_fitted
    items = AnomalyFolder(data_root, split="test", image_size=56)

    class Unnormalised(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(items)

        def __getitem__(self, index: int) -> dict:
            item = dict(items[index])
            item["image"] = item["image"] * 200.0
            return item

    with pytest.raises(ValueError, match="a batch given to evaluate has image values"):
        detector.evaluate(Unnormalised(), eval_size=32, progress=False)
