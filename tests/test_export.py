"""ONNX export: the graph, its metadata, its outputs, and the checks around it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cncad import CNCDetector, __version__
from cncad.calibration import Calibration, ScoreNormalization
from cncad.config import CNCConfig
from cncad.data.transforms import CLIP_MEAN, CLIP_STD
from cncad.errors import NotTrainedError
from cncad.export import InferenceGraph, export, export_onnx

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def detector() -> CNCDetector:
    config = CNCConfig(
        backbone="tiny", pretrained=None, image_size=56, batch_size=4, sigma=1.0, device="cpu"
    )
    return CNCDetector(config, allow_untrained=True)


_PROBE = torch.rand(1, 3, 56, 56, generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def state_around_export(detector, tmp_path_factory):
    import cncad.model

    before = {
        "resample": cncad.model.resample_tokens,
        "fastpath": torch.backends.mha.get_fastpath_enabled(),
        "map": detector.predict(_PROBE).anomaly_map,
    }
    path = detector.export(tmp_path_factory.mktemp("export") / "tiny.onnx")
    return path, before


@pytest.fixture(scope="module")
def exported(state_around_export):
    return state_around_export[0]


def _session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_graph_is_valid_with_a_dynamic_batch_and_the_metadata(detector, exported):
    model = onnx.load(str(exported))
    onnx.checker.check_model(model)
    (images,) = model.graph.input
    dims = images.type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [3, 56, 56]
    assert [o.name for o in model.graph.output] == ["pred_score", "anomaly_map"]
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["cncad.format"] == "cncad-onnx/1"
    assert meta["cncad.version"] == __version__
    assert CNCConfig.from_dict(json.loads(meta["cncad.config"])) == detector.config
    assert json.loads(meta["cncad.image_size"]) == 56
    assert json.loads(meta["cncad.mean"]) == pytest.approx(CLIP_MEAN)
    assert json.loads(meta["cncad.std"]) == pytest.approx(CLIP_STD)
    assert json.loads(meta["cncad.layers"]) == list(detector.model.layers)
    assert json.loads(meta["cncad.threshold"]) is None
    assert json.loads(meta["cncad.calibration"]) is None


def test_text_tower_is_not_in_the_graph(exported):
    model = onnx.load(str(exported))
    shapes = [tuple(init.dims) for init in model.graph.initializer]
    # the tiny CLIP's token embedding (49408 x 64) belongs to the frozen text tower only
    assert not any(49408 in shape for shape in shapes)
    assert not any("text" in node.name for node in model.graph.node)


@pytest.mark.parametrize("batch", [1, 3])
def test_graph_outputs_equal_the_eager_model_for_any_batch(detector, exported, batch):
    images = torch.rand(batch, 3, 56, 56, generator=torch.Generator().manual_seed(batch))
    reference = detector.predict(images)
    scores, maps = _session(exported).run(None, {"images": images.numpy()})
    assert scores.shape == (batch,) and maps.shape == (batch, 56, 56)
    np.testing.assert_allclose(scores, reference.pred_score.numpy(), rtol=0, atol=1e-4)
    np.testing.assert_allclose(maps, reference.anomaly_map.numpy(), rtol=0, atol=1e-4)


def test_inference_graph_matches_model_predict_in_eager_mode(detector):
    graph = InferenceGraph(detector.model)
    images = torch.rand(2, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        scores, maps = graph(images)
        ref_maps, ref_scores = detector.model.predict((images - mean) / std)
    torch.testing.assert_close(maps, ref_maps, rtol=0, atol=1e-5)
    torch.testing.assert_close(scores, ref_scores, rtol=0, atol=1e-5)


def test_calibrated_detector_exports_labels_masks_and_normalised_outputs(tmp_path):
    detector = CNCDetector(
        backbone="tiny", pretrained=None, image_size=56, sigma=1.0, allow_untrained=True
    )
    images = torch.rand(3, 3, 56, 56, generator=torch.Generator().manual_seed(3))
    raw = detector.predict(images)
    middle = float(raw.pred_score.median())
    pixel = float(raw.anomaly_map.median())
    detector.calibration = Calibration(
        image=ScoreNormalization(middle, middle - 0.2, middle + 0.3),
        pixel=ScoreNormalization(pixel, pixel - 1.0, pixel + 1.0),
        method="fpr",
        target_fpr=0.01,
        normal_images=100,
        anomalous_images=0,
    )
    detector.threshold, detector.pixel_threshold = middle, pixel
    path = detector.export(tmp_path / "calibrated.onnx")
    session = _session(path)
    names = [o.name for o in session.get_outputs()]
    assert names == [
        "pred_score",
        "anomaly_map",
        "pred_label",
        "pred_mask",
        "norm_score",
        "norm_map",
    ]
    out = dict(zip(names, session.run(None, {"images": images.numpy()}), strict=True))
    reference = detector.predict(images)
    np.testing.assert_array_equal(out["pred_label"], reference.pred_label.numpy())
    assert out["pred_label"].any() and not out["pred_label"].all()
    mismatched = out["pred_mask"] != reference.pred_mask.numpy()
    assert mismatched.mean() < 1e-3  # only pixels within rounding of the threshold can flip
    np.testing.assert_allclose(out["norm_score"], reference.norm_score.numpy(), atol=1e-4)
    np.testing.assert_allclose(out["norm_map"], reference.norm_map.numpy(), atol=1e-4)
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert Calibration.from_dict(json.loads(meta["cncad.calibration"])) == detector.calibration
    assert json.loads(meta["cncad.pixel_threshold"]) == pytest.approx(pixel)


def test_bad_arguments_are_refused_before_any_work(detector, tmp_path):
    with pytest.raises(ValueError, match="format must be one of 'onnx'"):
        export(detector, tmp_path / "m.xml", format="openvino")
    with pytest.raises(ValueError, match="format must be one of"):
        detector.export(tmp_path / "m.onnx", format="tflite")
    with pytest.raises(ValueError, match="is a folder"):
        export_onnx(detector, tmp_path)
    with pytest.raises(ValueError, match="opset must be at least 17"):
        export_onnx(detector, tmp_path / "m.onnx", opset=13)
    with pytest.raises(TypeError, match="opset must be an integer"):
        export_onnx(detector, tmp_path / "m.onnx", opset="17")
    assert not list(tmp_path.iterdir())


def test_untrained_detector_is_refused(tmp_path):
    untrained = CNCDetector(backbone="tiny", pretrained=None, image_size=56)
    with pytest.raises(NotTrainedError):
        untrained.export(tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_failed_export_leaves_an_existing_file_as_it_was(detector, tmp_path, monkeypatch):
    target = tmp_path / "m.onnx"
    target.write_bytes(b"previous")

    def fail(*args, **kwargs):
        raise RuntimeError("tracing failed")

    monkeypatch.setattr(torch.onnx, "export", fail)
    with pytest.raises(RuntimeError, match="tracing failed"):
        detector.export(target)
    assert target.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]
    assert not detector.model.training


def test_export_restores_the_model_state(detector, state_around_export):
    import cncad.model

    _, before = state_around_export
    assert cncad.model.resample_tokens is before["resample"]
    assert torch.backends.mha.get_fastpath_enabled() == before["fastpath"]
    assert not detector.model.training
    after = detector.predict(_PROBE).anomaly_map
    torch.testing.assert_close(after, before["map"], rtol=0, atol=0)
