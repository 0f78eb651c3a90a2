"""The torch-free runtime: parity with CNCDetector.predict, inputs, errors, no torch import."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from _subprocess import run_without_torch
from cncad import CNCDetector
from cncad.calibration import Calibration, CalibrationError, ScoreNormalization
from cncad.errors import ModelFileError

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from cncad.deploy import ONNXDetector, resize_image, resize_map  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL_SIZE_TOL = 1e-4  # images at the model's size (the bound)
OTHER_SIZE_TOL = 1e-3  # other sizes: resized with PIL/numpy instead of torch


def _images(size: tuple[int, int], count: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for _ in range(count)]


def _assert_parity(reference, result, tol: float) -> None:
    np.testing.assert_allclose(result.pred_score, reference.pred_score.numpy(), rtol=0, atol=tol)
    ref_maps = reference.anomaly_map
    maps = result.anomaly_map
    if isinstance(ref_maps, list):
        assert len(maps) == len(ref_maps)
        for got, want in zip(maps, ref_maps, strict=True):
            assert got.shape == tuple(want.shape)
            np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=tol)
    else:
        assert maps.shape == tuple(ref_maps.shape)
        np.testing.assert_allclose(maps, ref_maps.numpy(), rtol=0, atol=tol)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[CNCDetector, ONNXDetector]:
    detector = CNCDetector(
        backbone="tiny", pretrained=None, image_size=56, sigma=1.0, batch_size=4,
        allow_untrained=True,
    )  # fmt: skip
    path = detector.export(tmp_path_factory.mktemp("deploy") / "tiny.onnx")
    return detector, ONNXDetector(path)


def test_tiny_clip_parity_at_the_model_size(tiny):
    detector, deployed = tiny
    images = _images((56, 56), 5, seed=0)
    result = deployed.predict(images, batch_size=2)
    _assert_parity(detector.predict(images), result, MODEL_SIZE_TOL)
    assert result.pred_score.dtype == np.float32 and result.anomaly_map.shape == (5, 56, 56)
    assert result.pred_label is None and result.pred_mask is None and result.norm_score is None


@pytest.mark.parametrize("size", [(40, 60), (131, 97), (224, 224), (57, 55)])
def test_tiny_clip_parity_at_other_sizes(tiny, size):
    detector, deployed = tiny
    images = _images(size, 2, seed=size[0])
    result = deployed.predict(images)
    assert result.anomaly_map.shape == (2, *size)
    _assert_parity(detector.predict(images), result, OTHER_SIZE_TOL)


def test_every_kind_of_input_gives_the_torch_paths_numbers(tiny, tmp_path):
    detector, deployed = tiny
    (picture,) = _images((70, 50), 1, seed=7)
    path = tmp_path / "part.png"
    Image.fromarray(picture).save(path)
    grey = picture[..., 0]
    floats = picture.astype(np.float32) / 255
    rgba = np.concatenate([picture, np.full((70, 50, 1), 128, np.uint8)], axis=-1)
    tensor = torch.from_numpy(picture).permute(2, 0, 1).contiguous()
    for inputs in (
        str(path),
        path,
        [Image.open(path)],
        grey,
        floats,
        rgba,
        (picture.astype(np.uint16) * 257),
        tensor,
        tensor[None].float() / 255,
        [picture, tensor],
    ):
        _assert_parity(detector.predict(inputs), deployed.predict(inputs), OTHER_SIZE_TOL)
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    Image.fromarray(picture).save(folder / "b.png")
    Image.fromarray(picture[:40]).save(folder / "sub" / "a.png")
    _assert_parity(detector.predict(folder), deployed.predict(folder), OTHER_SIZE_TOL)


def test_predict_iter_streams_in_order_with_failures_and_kept_images(tiny, tmp_path):
    _, deployed = tiny
    good = tmp_path / "good.png"
    Image.fromarray(_images((30, 20), 1, seed=1)[0]).save(good)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    stream = [good, broken, good, good]
    batches = list(
        deployed.predict_iter(
            stream, batch_size=2, num_workers=2, progress=False, keep_images=True, on_error="skip"
        )
    )
    assert [i for b in batches for i in b.indices] == [0, 2, 3]
    failures = [f for b in batches for f in b.failures]
    assert [(f.index, f.source) for f in failures] == [(1, str(broken))]
    assert "ImageReadError" in failures[0].reason
    assert all(img.shape == (3, 30, 20) for b in batches for img in b.images)
    with pytest.raises(ValueError, match="cannot read image"):
        deployed.predict(stream)


def test_thresholds_and_calibration_match_the_torch_path(tiny, tmp_path):
    detector, _ = tiny
    images = _images((56, 56), 4, seed=11) + _images((80, 64), 2, seed=12)
    raw = detector.predict(images)
    score, pixel = float(raw.pred_score.median()), float(np.median(raw.anomaly_map[0].numpy()))
    cal = Calibration(
        image=ScoreNormalization(score, score - 0.5, score + 0.5),
        pixel=ScoreNormalization(pixel, pixel - 1.0, pixel + 2.0),
        method="fpr",
        target_fpr=0.05,
        normal_images=40,
        anomalous_images=0,
    )
    part = Calibration(
        image=ScoreNormalization(score + 0.1, score - 0.4, score + 0.6),
        pixel=ScoreNormalization(pixel + 0.1, pixel - 1.0, pixel + 2.0),
        method="fpr",
        target_fpr=0.05,
        normal_images=20,
        anomalous_images=0,
    )
    calibrated = CNCDetector(
        backbone="tiny", pretrained=None, image_size=56, sigma=1.0, allow_untrained=True
    )
    calibrated.calibration = Calibration(**{**cal.__dict__, "per_category": {"screw": part}})
    calibrated.threshold, calibrated.pixel_threshold = score, pixel
    deployed = ONNXDetector(calibrated.export(tmp_path / "calibrated.onnx"))
    assert deployed.calibration == calibrated.calibration
    assert (deployed.threshold, deployed.pixel_threshold) == (score, pixel)
    for category in (None, "screw"):
        want = calibrated.predict(images, category=category)
        got = deployed.predict(images, category=category)
        np.testing.assert_array_equal(got.pred_label, want.pred_label.numpy())
        np.testing.assert_allclose(got.norm_score, want.norm_score.numpy(), atol=1e-4)
        for mask, want_mask, amap, want_map in zip(
            got.pred_mask, want.pred_mask, got.norm_map, want.norm_map, strict=True
        ):
            assert (mask != want_mask.numpy()).mean() < 1e-3
            np.testing.assert_allclose(amap, want_map.numpy(), atol=OTHER_SIZE_TOL)
    with pytest.raises(CalibrationError, match="calibrated categories: screw"):
        deployed.predict(images, category="nut")
    deployed.threshold = 1e9
    assert not deployed.predict(images).pred_label.any()
    with pytest.raises(ValueError, match="finite"):
        deployed.threshold = float("nan")


def test_timm_visual_only_encoder_parity(tmp_path):
    detector = CNCDetector(
        backbone="timm/test_efficientnet", pretrained=None, use_cnc=False, image_size=64,
        sigma=1.0, allow_untrained=True,
    )  # fmt: skip
    deployed = ONNXDetector(detector.export(tmp_path / "timm.onnx"))
    same = _images((64, 64), 3, seed=3)
    _assert_parity(detector.predict(same), deployed.predict(same), MODEL_SIZE_TOL)
    other = _images((90, 48), 2, seed=4)
    _assert_parity(detector.predict(other), deployed.predict(other), OTHER_SIZE_TOL)


@pytest.mark.skipif(
    os.environ.get("CNCAD_SKIP_VIT_B16") == "1", reason="CNCAD_SKIP_VIT_B16=1 was set"
)
def test_vit_b16_with_cnc_parity(tmp_path):
    # A randomly initialised ViT-B/16 at 112 px (7x7 patches; the position embedding is
    # resized as for any other size), CNC on: the full-size graph, ~350 MB.
    detector = CNCDetector(
        backbone="ViT-B-16", pretrained=None, image_size=112, allow_untrained=True
    )
    deployed = ONNXDetector(detector.export(tmp_path / "vit_b16.onnx"))
    same = _images((112, 112), 2, seed=5)
    _assert_parity(detector.predict(same), deployed.predict(same), MODEL_SIZE_TOL)
    other = _images((150, 90), 1, seed=6)
    _assert_parity(detector.predict(other), deployed.predict(other), OTHER_SIZE_TOL)


def test_openvino_runs_the_exported_file_with_the_same_numbers(tiny):
    ov = pytest.importorskip("openvino", reason="openvino is not installed (cncad[openvino])")
    detector, deployed = tiny
    # f32: the CPU plugin may otherwise run in bf16 on CPUs that have it
    config = {"INFERENCE_PRECISION_HINT": "f32"}
    compiled = ov.Core().compile_model(str(deployed.path), "CPU", config)
    images = np.stack([resize_image(img.transpose(2, 0, 1) / np.float32(255), 56) for img in
                       _images((56, 56), 3, seed=9)]).astype(np.float32)  # fmt: skip
    result = compiled(images)
    scores = result[compiled.output("pred_score")]
    maps = result[compiled.output("anomaly_map")]
    reference = detector.predict(torch.from_numpy(images))
    np.testing.assert_allclose(scores, reference.pred_score.numpy(), rtol=0, atol=1e-4)
    np.testing.assert_allclose(maps, reference.anomaly_map.numpy(), rtol=0, atol=1e-4)


def test_runs_in_a_process_where_torch_cannot_be_imported(tiny, tmp_path):
    detector, deployed = tiny
    picture = _images((60, 45), 1, seed=8)[0]
    image_path = tmp_path / "part.png"
    Image.fromarray(picture).save(image_path)
    script = f"""
import json
from cncad.deploy import ONNXDetector

result = ONNXDetector({str(deployed.path)!r}).predict([{str(image_path)!r}])
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "open_clip"))
print(json.dumps({{
    "score": result.pred_score.tolist(),
    "map": result.anomaly_map.tolist(),
    "heavy": heavy,
}}))
"""
    out = json.loads(run_without_torch(script))
    assert out["heavy"] == []
    reference = detector.predict([image_path])
    np.testing.assert_allclose(out["score"], reference.pred_score.numpy(), atol=OTHER_SIZE_TOL)
    np.testing.assert_allclose(
        np.array(out["map"]), reference.anomaly_map.numpy(), atol=OTHER_SIZE_TOL
    )


def test_clear_errors_for_files_that_are_not_cncad_models(tmp_path):
    onnx = pytest.importorskip("onnx")
    with pytest.raises(FileNotFoundError, match="not found"):
        ONNXDetector(tmp_path / "missing.onnx")
    text = tmp_path / "text.onnx"
    text.write_text("hello")
    with pytest.raises(ModelFileError, match="is not a readable ONNX model"):
        ONNXDetector(text)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])],
        "plain",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    plain = tmp_path / "plain.onnx"
    onnx.save(onnx.helper.make_model(graph), str(plain))
    with pytest.raises(ModelFileError, match="not exported by cncad"):
        ONNXDetector(plain)


def test_missing_onnxruntime_says_how_to_install_it(tiny, monkeypatch):
    _, deployed = tiny
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ImportError, match=r"pip install cncad\[deploy\]"):
        ONNXDetector(deployed.path)


def test_bad_arguments(tiny):
    _, deployed = tiny
    image = _images((20, 20), 1, seed=0)
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        deployed.predict(image, batch_size=0)
    with pytest.raises(ValueError, match="on_error must be"):
        list(deployed.predict_iter(image, on_error="ignore"))
    with pytest.raises(ValueError, match="not available"):
        ONNXDetector(deployed.path, providers=["NoSuchExecutionProvider"])
    with pytest.raises(ValueError, match="run expects"):
        deployed.run(np.zeros((1, 3, 20, 20), np.float32))
    with pytest.raises(ValueError, match="outside"):
        deployed.predict(np.full((8, 8, 3), 2.0, np.float32))
    with pytest.raises(ValueError, match="needs a calibrated detector"):
        deployed.predict(image, category="screw")
    with pytest.raises(ValueError, match="no images"):
        deployed.predict([])


def test_numpy_map_resize_is_torch_bilinear():
    import torch.nn.functional as F

    rng = np.random.default_rng(0)
    amap = rng.random((56, 56), dtype=np.float32) * 4
    for size in [(224, 224), (40, 60), (57, 55), (3, 500)]:
        want = F.interpolate(torch.from_numpy(amap)[None, None], size=size, mode="bilinear")
        np.testing.assert_allclose(resize_map(amap, size), want[0, 0].numpy(), atol=1e-5)


def test_pil_image_resize_is_torch_antialiased_bilinear():
    import torch.nn.functional as F

    rng = np.random.default_rng(1)
    for shape in [(40, 60), (300, 500), (20, 20)]:
        image = rng.random((3, *shape), dtype=np.float32)
        want = F.interpolate(
            torch.from_numpy(image)[None], size=(56, 56), mode="bilinear", antialias=True
        )
        np.testing.assert_allclose(resize_image(image, 56), want[0].numpy(), atol=3e-5)
