"""The detector and checkpoint file format: checksums, atomic writes, validation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import cncad.checkpoint as checkpoint
from cncad import CNCDetector, ModelFileError, ModelVersionError, NonFiniteError
from cncad.checkpoint import (
    DetectorFile,
    content_checksum,
    read_detector_file,
    write_detector_file,
)


@pytest.fixture(scope="module")
def detector() -> CNCDetector:
    model = CNCDetector(
        backbone="tiny", pretrained=None, image_size=56, device="cpu", allow_untrained=True
    )
    model.threshold = 0.75
    return model


@pytest.fixture(scope="module")
def saved(detector: CNCDetector, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return detector.save(tmp_path_factory.mktemp("model") / "model.cnc")


def _payload(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def _resave(payload: dict, path: Path, checksum: bool = True) -> Path:
    if checksum:
        payload["checksum"] = content_checksum(payload)
    torch.save(payload, path)
    return path


def test_the_file_loads_with_weights_only_and_carries_a_checksum(saved):
    payload = _payload(saved)
    assert payload["format_version"] == checkpoint.FILE_FORMAT_VERSION
    assert payload["kind"] == "detector" and payload["training"] is None
    assert payload["checksum"] == content_checksum(payload)
    assert payload["checksum"].startswith("sha256:")


def test_checksum_sees_values_types_and_key_order_independence():
    base = {"a": torch.zeros(3), "b": [1, 2.0, None], "c": {"x": "y"}}
    assert content_checksum(base) == content_checksum(dict(reversed(list(base.items()))))
    changed = [
        {**base, "a": torch.tensor([0.0, 0.0, 1e-30])},
        {**base, "a": torch.zeros(3, dtype=torch.float64)},
        {**base, "a": torch.zeros(1, 3)},
        {**base, "b": [1, 2, None]},  # int instead of float
        {**base, "c": {"x": "z"}},
    ]
    assert len({content_checksum(p) for p in [base, *changed]}) == 6
    assert content_checksum({**base, "checksum": "anything"}) == content_checksum(base)


def test_every_flipped_byte_is_an_error_or_changes_nothing(detector, saved, tmp_path):
    reference = read_detector_file(saved)
    data = saved.read_bytes()
    generator = torch.Generator().manual_seed(0)
    positions = torch.randint(0, len(data), (96,), generator=generator).tolist()
    positions += list(range(0, len(data), max(1, len(data) // 64)))
    errors = 0
    for position in positions:
        damaged = bytearray(data)
        damaged[position] ^= 0xFF
        path = tmp_path / "damaged.cnc"
        path.write_bytes(bytes(damaged))
        try:
            contents = read_detector_file(path)
        except ModelFileError:
            errors += 1
            continue
        # A byte that decides nothing (zip padding, a name field torch ignores) may flip.
        assert contents.state_dict.keys() == reference.state_dict.keys()
        for name, tensor in reference.state_dict.items():
            assert torch.equal(contents.state_dict[name], tensor), (position, name)
        assert contents.threshold == reference.threshold
        assert contents.config == reference.config
    assert errors >= len(positions) // 2


def test_damaged_tensor_data_is_reported_as_damaged(saved, tmp_path):
    payload = _payload(saved)
    name = next(iter(payload["state_dict"]))
    payload["state_dict"][name] = payload["state_dict"][name].clone()
    payload["state_dict"][name].view(-1)[0] += 1.0
    path = _resave(payload, tmp_path / "edited.cnc", checksum=False)  # old checksum stays
    with pytest.raises(ModelFileError, match="damaged: its contents do not match the checksum"):
        CNCDetector.load(path)


def test_a_failing_save_leaves_the_old_file_untouched(detector, saved, tmp_path, monkeypatch):
    target = tmp_path / "model.cnc"
    target.write_bytes(saved.read_bytes())
    before = target.read_bytes()

    def half_then_fail(obj, handle):
        handle.write(b"PK\x03\x04 partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        detector.save(target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.cnc"]


def test_save_refuses_non_finite_weights(detector, saved, tmp_path):
    target = tmp_path / "model.cnc"
    target.write_bytes(saved.read_bytes())
    before = target.read_bytes()
    parameter = detector.model.decoder.blocks[0].attn.qkv.weight
    original = parameter.detach().clone()
    with torch.no_grad():
        parameter[0, 0] = float("nan")
    try:
        with pytest.raises(NonFiniteError, match=r"NaN or infinity \(decoder\.blocks\.0"):
            detector.save(target)
    finally:
        with torch.no_grad():
            parameter.copy_(original)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.cnc"]


def _edited(saved: Path, tmp_path: Path, edit) -> Path:
    payload = _payload(saved)
    edit(payload)
    return _resave(payload, tmp_path / "edited.cnc")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda p: p.pop("state_dict"), "'state_dict' is missing"),
        (lambda p: p.pop("threshold"), "'threshold' is missing"),
        (lambda p: p.update(threshold="0.5"), "'threshold' should be a number or None"),
        (lambda p: p.update(threshold=float("nan")), "'threshold' is nan"),
        (lambda p: p.update(epochs_trained=2.0), "'epochs_trained' should be an integer"),
        (lambda p: p.update(epochs_trained=True), "'epochs_trained' should be an integer"),
        (lambda p: p.update(epochs_trained=-1), "'epochs_trained' is -1"),
        (lambda p: p.update(history={"a": 1}), "'history' should be a list"),
        (lambda p: p.update(history=[{"total": "x"}]), "'history' should hold dicts of numbers"),
        (lambda p: p.update(config=[1]), "'config' should be a dict"),
        (lambda p: p["state_dict"].update(extra=torch.zeros(1)), "unexpected \\['extra'\\]"),
        (lambda p: p["state_dict"].update(x=1.0), "non-tensor entry"),
        (lambda p: p.update(kind="weights"), "'kind' is 'weights'"),
        (lambda p: p.update(training={"optimizer": 3}), "no optimizer state"),
        (lambda p: p.update(normal_statistics={"map_p50": "x"}), "'normal_statistics'"),
        (lambda p: p.update(normal_statistics=[1.0]), "'normal_statistics'"),
    ],
)
def test_malformed_files_are_one_line_model_file_errors(saved, tmp_path, edit, message):
    path = _edited(saved, tmp_path, edit)
    with pytest.raises(ModelFileError, match=message) as info:
        CNCDetector.load(path)
    assert "\n" not in str(info.value)


def test_a_weight_of_the_wrong_shape_or_dtype_is_a_model_file_error(saved, tmp_path):
    def reshape(payload):
        name = "decoder.blocks.0.attn.qkv.weight"
        payload["state_dict"][name] = payload["state_dict"][name][:-1]

    with pytest.raises(ModelFileError, match=r"qkv\.weight' is \(191, 64\)") as info:
        CNCDetector.load(_edited(saved, tmp_path, reshape))
    assert "\n" not in str(info.value)

    def retype(payload):
        name = "decoder.blocks.0.attn.qkv.weight"
        payload["state_dict"][name] = payload["state_dict"][name].double()

    with pytest.raises(ModelFileError, match=r"torch\.float64"):
        CNCDetector.load(_edited(saved, tmp_path, retype))


def test_non_finite_weights_in_a_file_are_refused(saved, tmp_path):
    def poison(payload):
        name = next(iter(payload["state_dict"]))
        payload["state_dict"][name] = torch.full_like(payload["state_dict"][name], float("inf"))

    with pytest.raises(ModelFileError, match="weights hold NaN or infinity"):
        CNCDetector.load(_edited(saved, tmp_path, poison))


def test_a_mismatched_optimizer_state_is_a_model_file_error(detector, tmp_path):
    contents = DetectorFile(
        config=detector.config,
        state_dict=detector.model.trainable_state_dict(),
        kind="checkpoint",
        optimizer_state={"state": {}, "param_groups": [{"params": [0, 1]}]},
    )
    path = write_detector_file(tmp_path / "last.ckpt", contents)
    with pytest.raises(ModelFileError, match="optimizer state covers 2 tensors"):
        CNCDetector.load(path)


def test_version_1_files_still_load(detector, saved, tmp_path):
    payload = _payload(saved)
    for key in ("checksum", "kind", "training"):
        payload.pop(key)
    payload["format_version"] = 1
    path = _resave(payload, tmp_path / "v1.cnc", checksum=False)
    loaded = CNCDetector.load(path)
    assert loaded.threshold == 0.75
    images = torch.rand(1, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    assert torch.equal(loaded.predict(images).pred_score, detector.predict(images).pred_score)


def test_unknown_format_versions_and_foreign_files(saved, tmp_path):
    path = _edited(saved, tmp_path, lambda p: p.update(format_version=3))
    with pytest.raises(ModelVersionError, match="format version 3"):
        CNCDetector.load(path)
    foreign = tmp_path / "foreign.cnc"
    foreign.write_bytes(b"not a torch file at all")
    with pytest.raises(ModelFileError, match="not a cncad detector file, or is damaged"):
        CNCDetector.load(foreign)
    with pytest.raises(FileNotFoundError):
        CNCDetector.load(tmp_path / "missing.cnc")
