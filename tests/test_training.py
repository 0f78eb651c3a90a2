"""The training engine: exact resume, checkpoints, interruption, non-finite steps, threads."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from cncad import CNCDetector, NonFiniteError, TrainingBusyError
from cncad.checkpoint import CHECKPOINT_NAME
from cncad.data import make_synthetic_dataset
from cncad.training import Trainer, epoch_seed

EPOCHS = 3


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("train_data")
    return make_synthetic_dataset(
        root, categories=("bolt_like", "carpet_like"), n_train=4, n_test_good=1,
        n_test_defect=1, image_size=56, seed=0,
    )  # fmt: skip


def _detector(**overrides) -> CNCDetector:
    options = dict(
        backbone="tiny", pretrained=None, image_size=56, batch_size=4, epochs=EPOCHS, theta=1,
        sigma=1.0, device="cpu",
    )  # fmt: skip
    options.update(overrides)
    return CNCDetector(**options)


def _weights(detector: CNCDetector) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in detector.model.trainable_state_dict().items()}


def _assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [name for name in a if not torch.equal(a[name], b[name])]
    assert not different, different


@pytest.fixture(scope="module")
def reference_weights(data_root: Path) -> dict[bool, dict[str, torch.Tensor]]:
    """The weights after EPOCHS epochs in one go, with the cache on and off."""
    return {
        cache: _weights(_detector().fit(data_root, progress=False, cache=cache))
        for cache in (True, False)
    }


def test_epoch_seed_depends_on_seed_and_epoch_only():
    assert epoch_seed(0, 0) == epoch_seed(0, 0)
    seeds = {epoch_seed(s, e) for s in (0, 1, -1, 2**70) for e in range(4)}
    assert len(seeds) == 16
    assert all(0 <= s < 2**63 for s in seeds)


@pytest.mark.parametrize("cache", [True, False])
def test_two_fits_in_one_process_equal_one_fit(data_root, reference_weights, cache):
    detector = _detector()
    torch.manual_seed(123)  # the caller's random state must not matter
    detector.fit(data_root, epochs=1, progress=False, cache=cache)
    torch.rand(5)
    detector.fit(data_root, progress=False, cache=cache)  # default: the remaining epochs
    assert detector.epochs_trained == EPOCHS
    _assert_identical(_weights(detector), reference_weights[cache])


def test_fit_leaves_the_callers_random_state_alone(data_root):
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    _detector().fit(data_root, epochs=1, progress=False)
    assert torch.equal(torch.rand(3), expected)


_RESUME_SCRIPT = """
import sys, torch
from cncad import CNCDetector
torch.set_num_threads(int(sys.argv[1]))
data, out = sys.argv[2], sys.argv[3]
for cache in ("on", "off"):
    detector = CNCDetector.load(f"{out}/{cache}/last.ckpt")
    assert detector.epochs_trained == 1, detector.epochs_trained
    detector.fit(data, progress=False, cache=cache == "on", checkpoint_dir=f"{out}/{cache}")
    detector.save(f"{out}/{cache}/final.cnc")
print("resumed")
"""


def test_resume_in_a_new_process_is_bit_identical(data_root, reference_weights, tmp_path):
    for cache in ("on", "off"):
        _detector().fit(
            data_root, epochs=1, progress=False, cache=cache == "on",
            checkpoint_dir=tmp_path / cache,
        )  # fmt: skip
    threads = str(torch.get_num_threads())  # reductions are exact for one thread count
    command = [sys.executable, "-c", _RESUME_SCRIPT, threads, str(data_root), str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    for cache in ("on", "off"):
        resumed = CNCDetector.load(tmp_path / cache / "final.cnc")
        assert resumed.epochs_trained == EPOCHS
        assert len(resumed.history) == EPOCHS
        _assert_identical(_weights(resumed), reference_weights[cache == "on"])
        checkpoint = CNCDetector.load(tmp_path / cache / CHECKPOINT_NAME)
        assert checkpoint.epochs_trained == EPOCHS


def test_checkpoint_is_written_every_n_epochs_and_at_the_end(data_root, tmp_path, monkeypatch):
    detector = _detector(epochs=5)
    written = []
    original = detector._write

    def spy(path, kind):
        written.append((detector.epochs_trained, kind))
        return original(path, kind)

    monkeypatch.setattr(detector, "_write", spy)
    detector.fit(data_root, progress=False, checkpoint_dir=tmp_path, checkpoint_every=2)
    assert written == [(2, "checkpoint"), (4, "checkpoint"), (5, "checkpoint")]
    payload = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    assert payload["kind"] == "checkpoint" and payload["epochs_trained"] == 5
    assert payload["training"]["optimizer"]["state"]  # Adam's moments are in it
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_NAME]


def test_checkpoint_dir_is_checked_before_training(data_root, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    detector = _detector()
    with pytest.raises(ValueError, match="checkpoint_dir"):
        detector.fit(data_root, progress=False, checkpoint_dir=blocker)
    with pytest.raises(ValueError, match="checkpoint_dir"):
        detector.fit(data_root, progress=False, checkpoint_dir=blocker / "sub")
    assert detector.epochs_trained == 0


@pytest.mark.parametrize("fault", [RuntimeError("boom"), KeyboardInterrupt()])
def test_a_run_stopped_mid_epoch_keeps_the_last_checkpoint_and_no_cache_files(
    data_root, tmp_path, monkeypatch, fault
):
    detector = _detector()
    calls = []
    original = Trainer.step

    def failing_step(self, features, epoch, batch_index=0, **split):
        calls.append(epoch)
        if epoch == 1 and batch_index == 1:
            raise fault
        return original(self, features, epoch, batch_index, **split)

    monkeypatch.setattr(Trainer, "step", failing_step)
    cache_dir, runs = tmp_path / "cache", tmp_path / "runs"
    with pytest.raises(type(fault)):
        detector.fit(
            data_root, progress=False, cache_dir=cache_dir, cache_memory_gib=0.0,
            checkpoint_dir=runs,
        )  # fmt: skip
    assert calls == [0, 0, 1, 1]
    assert sorted(p.name for p in runs.iterdir()) == [CHECKPOINT_NAME]
    assert list(cache_dir.iterdir()) == []  # the memory-mapped feature files are gone
    assert CNCDetector.load(runs / CHECKPOINT_NAME).epochs_trained == 1
    assert not detector.model.training


_SIGTERM_SCRIPT = """
import sys
from cncad import CNCDetector
detector = CNCDetector(backbone="tiny", pretrained=None, image_size=56, batch_size=4,
                       epochs=1000, device="cpu")
detector.fit(sys.argv[1], progress=False, cache_dir=sys.argv[2], cache_memory_gib=0.0,
             checkpoint_dir=sys.argv[3])
"""


@pytest.mark.skipif(os.name != "posix", reason="SIGTERM delivery is POSIX")
def test_sigterm_stops_training_cleanly(data_root, tmp_path):
    cache_dir, runs = tmp_path / "cache", tmp_path / "runs"
    command = [sys.executable, "-c", _SIGTERM_SCRIPT, str(data_root), str(cache_dir), str(runs)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (runs / CHECKPOINT_NAME).exists() and time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1][-2000:]
        time.sleep(0.1)
    assert any(cache_dir.iterdir()), "the feature cache should be on disk while training"
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert list(cache_dir.iterdir()) == []
    assert sorted(p.name for p in runs.iterdir()) == [CHECKPOINT_NAME]
    assert CNCDetector.load(runs / CHECKPOINT_NAME).epochs_trained >= 1


def _snapshot(detector: CNCDetector) -> tuple[dict, list]:
    moments = [
        {k: v.clone() for k, v in state.items() if isinstance(v, torch.Tensor)}
        for state in detector._trainer.optimizer.state.values()
    ]
    return _weights(detector), moments


class _NaNGradient(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss with a non-finite gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


@pytest.mark.parametrize("what", ["loss", "gradient"])
def test_a_non_finite_step_is_not_taken(data_root, what):
    detector = _detector()
    model = detector.model
    original = model.loss
    snapshots = []

    def poisoned(output, epoch, **options):
        terms = original(output, epoch, **options)
        snapshots.append(_snapshot(detector))
        if epoch == 1 and len(snapshots) == 4:
            if what == "loss":
                return terms._replace(total=terms.total * float("nan"))
            return terms._replace(total=_NaNGradient.apply(terms.total))
        return terms

    model.loss = poisoned
    with pytest.raises(NonFiniteError, match=f"{what} is not finite at epoch 1, batch 1") as info:
        detector.fit(data_root, progress=False)
    assert "distill" in str(info.value) and "\n" not in str(info.value)
    weights, moments = snapshots[-1]
    _assert_identical(_weights(detector), weights)
    after = _snapshot(detector)[1]
    assert len(after) == len(moments)
    for before, now in zip(moments, after, strict=True):
        _assert_identical(now, before)
    assert detector.epochs_trained == 1
    assert all(torch.isfinite(v).all() for v in _weights(detector).values())


def test_gradient_clipping_bounds_the_step(data_root):
    detector = _detector(grad_clip_norm=1e-3)
    detector.fit(data_root, epochs=1, progress=False)
    grads = [p.grad for p in detector._trainer.parameters if p.grad is not None]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    assert float(norm) <= 1e-3 * (1 + 1e-4)
    assert detector.history[0]["grad_norm"] > 1e-3  # the clipping did something


def test_predict_save_and_fit_from_another_thread_during_fit_are_refused(data_root, tmp_path):
    detector = _detector()
    started, release = threading.Event(), threading.Event()
    original = Trainer.step
    errors: list[BaseException] = []

    def slow_step(self, features, epoch, batch_index=0, **split):
        started.set()
        assert release.wait(60)
        return original(self, features, epoch, batch_index, **split)

    def train():
        try:
            detector.fit(data_root, epochs=1, progress=False)
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    Trainer.step = slow_step
    try:
        worker = threading.Thread(target=train)
        worker.start()
        assert started.wait(60)
        image = torch.rand(3, 56, 56)
        with pytest.raises(TrainingBusyError, match="predict was called while fit is running"):
            detector.predict(image)
        with pytest.raises(TrainingBusyError, match="save"):
            detector.save(tmp_path / "m.cnc")
        with pytest.raises(TrainingBusyError, match="already running"):
            detector.fit(data_root, epochs=1, progress=False)
        assert detector.model.training  # predict did not switch training to eval mode
    finally:
        release.set()
        Trainer.step = original
        worker.join(60)
    assert not errors
    assert detector.epochs_trained == 1
    assert not (tmp_path / "m.cnc").exists()
    detector.predict(torch.rand(3, 56, 56))  # fine once fit has returned


def test_training_after_inference_mode_prediction(data_root):
    detector = _detector()
    detector.allow_untrained = True
    with torch.inference_mode():
        first = detector.predict(torch.rand(3, 56, 56, generator=torch.Generator().manual_seed(0)))
    detector.fit(data_root, epochs=1, progress=False)
    again = detector.predict(torch.rand(3, 56, 56, generator=torch.Generator().manual_seed(0)))
    assert not torch.equal(first.pred_score, again.pred_score)  # the new weights are used


def test_fit_arguments_are_validated(data_root):
    detector = _detector()
    with pytest.raises(TypeError, match="epochs must be an integer"):
        detector.fit(data_root, epochs=1.5, progress=False)
    with pytest.raises(ValueError, match="epochs must be at least 0"):
        detector.fit(data_root, epochs=-1, progress=False)
    with pytest.raises(ValueError, match="checkpoint_every must be at least 1"):
        detector.fit(data_root, progress=False, checkpoint_every=0)


def test_fit_without_epochs_after_a_finished_run_warns_and_trains_nothing(data_root):
    detector = _detector(epochs=1).fit(data_root, progress=False)
    before = _weights(detector)
    with pytest.warns(UserWarning, match="already trained"):
        detector.fit(data_root, progress=False)
    _assert_identical(_weights(detector), before)
    assert detector.epochs_trained == 1


def test_a_deep_copy_trains_on_its_own(data_root):
    import copy

    detector = _detector(epochs=2).fit(data_root, epochs=1, progress=False)
    twin = copy.deepcopy(detector)
    twin.fit(data_root, progress=False)
    detector.fit(data_root, progress=False)
    _assert_identical(_weights(twin), _weights(detector))
    assert twin.epochs_trained == detector.epochs_trained == 2


def test_fit_measures_the_normal_statistics_and_saves_them(data_root, tmp_path):
    detector = _detector(epochs=1).fit(data_root, progress=False)
    stats = detector.normal_statistics
    assert stats["images"] == 8
    assert stats["map_p50"] <= stats["map_p99"] <= stats["map_p999"] <= stats["map_max"]
    assert stats["score_p50"] <= stats["score_max"] <= stats["map_max"] + 1e-6
    maps = detector.predict([torch.rand(3, 56, 56) for _ in range(2)]).anomaly_map
    assert maps.min() > 0  # on the same scale as real maps
    loaded = CNCDetector.load(detector.save(tmp_path / "m.cnc"))
    assert loaded.normal_statistics == stats
    assert _detector(epochs=1).fit(data_root, progress=False, cache=False).normal_statistics is None
