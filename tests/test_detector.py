import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from cncad import CNCDetector, Prediction
from cncad.data import AnomalyFolder, make_synthetic_dataset


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    return make_synthetic_dataset(
        root, n_train=8, n_test_good=2, n_test_defect=3, image_size=64, seed=0
    )


@pytest.fixture(scope="module")
def fitted(dataset_root):
    detector = CNCDetector(
        backbone="tiny",
        pretrained=None,
        image_size=56,
        batch_size=4,
        epochs=2,
        theta=1,
        sigma=1.0,
        device="cpu",
    )
    return detector.fit(dataset_root, progress=False)


def test_short_fit_on_generated_data_lowers_the_loss(dataset_root):
    detector = CNCDetector(
        backbone="tiny",
        pretrained=None,
        image_size=56,
        batch_size=8,
        epochs=6,
        theta=10,
        lr=1e-3,
        device="cpu",
    )
    detector.fit(dataset_root, progress=False)
    totals = [h["total"] for h in detector.history]
    assert len(totals) == 6 and detector.epochs_trained == 6
    assert totals[-1] < 0.7 * totals[0]
    assert {"distill", "constraint", "align_encoder", "align_decoder", "moe"} <= set(
        detector.history[0]
    )


def test_same_seed_same_data_same_model(dataset_root):
    def train():
        detector = CNCDetector(
            backbone="tiny",
            pretrained=None,
            image_size=56,
            batch_size=4,
            epochs=1,
            device="cpu",
            seed=3,
        )
        return detector.fit(dataset_root, progress=False)

    a, b = train(), train()
    for (name, pa), pb in zip(
        a.model.trainable_state_dict().items(), b.model.trainable_state_dict().values(), strict=True
    ):
        assert torch.equal(pa, pb), name


def test_fit_accepts_dataset_and_dataloader_and_skips_defective_images(dataset_root):
    detector = CNCDetector(
        backbone="tiny", pretrained=None, image_size=56, batch_size=4, device="cpu"
    )
    test_set = AnomalyFolder(dataset_root, split="test", image_size=56)
    before = {k: v.clone() for k, v in detector.model.trainable_state_dict().items()}
    detector.fit(test_set, epochs=1, progress=False)  # mixed labels: only normals train
    assert detector.epochs_trained == 1
    changed = any(
        not torch.equal(before[k], v) for k, v in detector.model.trainable_state_dict().items()
    )
    assert changed
    images = torch.randn(4, 3, 56, 56)
    loader = DataLoader(TensorDataset(images, torch.tensor([1, 1, 1, 1])), batch_size=2)
    with pytest.raises(ValueError, match="no normal images"):
        detector.fit(loader, epochs=1, progress=False)
    with pytest.raises(TypeError, match="DataLoader"):
        detector.fit(42, progress=False)


def test_predict_on_every_input_kind(fitted, dataset_root):
    path = next((dataset_root / "carpet_like" / "test").rglob("*.png"))
    pil = Image.open(path).convert("RGB")
    array = np.array(pil)
    chw = torch.from_numpy(array).permute(2, 0, 1).float() / 255
    inputs = {
        "path": str(path),
        "pathlib": path,
        "pil": pil,
        "array": array,
        "chw": chw,
        "bchw": chw.unsqueeze(0),
        "uint8 tensor": torch.from_numpy(array).permute(2, 0, 1),
    }
    reference = fitted.predict(str(path))
    assert isinstance(reference, Prediction)
    assert reference.pred_score.shape == (1,)
    assert reference.anomaly_map.shape == (1, 64, 64)
    assert reference.pred_label is None and reference.pred_mask is None
    for name, value in inputs.items():
        result = fitted.predict(value)
        assert torch.allclose(result.pred_score, reference.pred_score, atol=1e-4), name
        assert result.anomaly_map.shape == (1, 64, 64), name


def test_predict_keeps_each_inputs_own_resolution(fitted):
    gen = torch.Generator().manual_seed(0)
    batch = torch.rand(3, 3, 40, 70, generator=gen)
    result = fitted.predict(batch, batch_size=2)
    assert result.pred_score.shape == (3,) and result.anomaly_map.shape == (3, 40, 70)
    mixed = fitted.predict([torch.rand(3, 30, 30), np.zeros((50, 20, 3), np.uint8)])
    assert isinstance(mixed.anomaly_map, list)
    assert [m.shape for m in mixed.anomaly_map] == [(30, 30), (50, 20)]
    with pytest.raises((TypeError, ValueError)):
        fitted.predict(torch.rand(2, 5, 5))
    with pytest.raises((TypeError, ValueError)):
        fitted.predict(3.5)


def test_threshold_gives_labels_and_masks(fitted):
    images = torch.rand(2, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    scores = fitted.predict(images).pred_score
    fitted.threshold = float(scores.mean())
    try:
        result = fitted.predict(images)
        assert torch.equal(result.pred_label, scores >= fitted.threshold)
        assert result.pred_mask.dtype == torch.bool
        assert torch.equal(result.pred_mask, result.anomaly_map >= fitted.threshold)
    finally:
        fitted.threshold = None


def test_save_load_round_trip_is_identical(fitted, tmp_path):
    images = torch.rand(2, 3, 60, 60, generator=torch.Generator().manual_seed(2))
    fitted.threshold = 0.5
    try:
        path = fitted.save(tmp_path / "model.cnc")
        expected = fitted.predict(images)
    finally:
        fitted.threshold = None
    payload = torch.load(path, weights_only=True)
    assert not any(key.startswith("encoder.") for key in payload["state_dict"])
    loaded = CNCDetector.load(path)
    result = loaded.predict(images)
    assert torch.equal(result.pred_score, expected.pred_score)
    assert torch.equal(result.anomaly_map, expected.anomaly_map)
    assert loaded.threshold == 0.5 and loaded.epochs_trained == fitted.epochs_trained
    assert loaded.config == fitted.config


def test_load_rejects_foreign_files(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"format": "something-else"}, path)
    with pytest.raises(ValueError, match="not a cncad detector"):
        CNCDetector.load(path)
    torch.save({"format": "cncad-detector", "format_version": 99}, path)
    with pytest.raises(ValueError, match="format version 99"):
        CNCDetector.load(path)


def test_custom_clip_model_object_is_passed_as_encoder(tmp_path):
    from cncad.encoders import build_tiny_clip

    detector = CNCDetector(
        encoder=build_tiny_clip(), image_size=56, device="cpu", allow_untrained=True
    )
    assert detector.config.backbone == "custom"
    path = detector.save(tmp_path / "custom.cnc")
    with pytest.raises(ValueError, match="encoder="):
        CNCDetector.load(path)
    images = torch.rand(1, 3, 56, 56)
    again = CNCDetector.load(path, encoder=build_tiny_clip())
    assert torch.equal(again.predict(images).pred_score, detector.predict(images).pred_score)


def test_clip_model_is_the_deprecated_name_of_encoder(tmp_path):
    from cncad.encoders import build_tiny_clip

    with pytest.warns(DeprecationWarning, match="encoder="):
        detector = CNCDetector(
            clip_model=build_tiny_clip(), image_size=56, device="cpu", allow_untrained=True
        )
    path = detector.save(tmp_path / "custom.cnc")
    with pytest.warns(DeprecationWarning):
        again = CNCDetector.load(path, clip_model=build_tiny_clip())
    images = torch.rand(1, 3, 56, 56)
    assert torch.equal(again.predict(images).pred_score, detector.predict(images).pred_score)
    with pytest.raises(ValueError, match="pass the backbone once"):
        CNCDetector(clip_model=build_tiny_clip(), encoder=build_tiny_clip(), image_size=56)


def test_top_level_namespace_holds_what_users_import():
    import cncad

    assert len(cncad.__all__) <= 25
    for name in cncad.__all__:
        assert getattr(cncad, name) is not None
    for internal in ("build_tiny_clip", "total_loss", "MoEOutput", "CNCOutput", "LossTerms"):
        assert internal not in cncad.__all__
    from cncad.encoders import build_tiny_clip

    with pytest.warns(DeprecationWarning, match="import it from cncad.encoders"):
        assert cncad.build_tiny_clip is build_tiny_clip
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        cncad.nonexistent  # noqa: B018


def test_evaluate_returns_the_seven_metrics_per_category(fitted, dataset_root):
    results = fitted.evaluate(dataset_root, eval_size=64, progress=False)
    assert set(results["per_category"]) == {"carpet_like", "bolt_like"}
    for metrics in [*results["per_category"].values(), results["mean"]]:
        for name in ("I-AUROC", "P-AUROC", "AUPRO", "I-AP", "P-AP", "I-F1max", "P-F1max"):
            assert 0.0 <= metrics[name] <= 1.0
    assert results["mean"]["n_images"] == 2 * (2 + 3)


def test_a_model_saved_after_training_predicts_like_the_trained_one(dataset_root, tmp_path):
    detector = CNCDetector(
        backbone="tiny", pretrained=None, image_size=56, batch_size=4, theta=0, device="cpu"
    )
    images = torch.rand(2, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    detector.allow_untrained = True
    detector.predict(images)  # fills the text-feature cache for the initial prompts
    detector.fit(dataset_root, epochs=1, progress=False)  # the prompts change
    path = detector.save(tmp_path / "model.cnc")
    expected = detector.predict(images).pred_score
    assert torch.equal(CNCDetector.load(path).predict(images).pred_score, expected)


def test_predict_iter_streams_what_predict_returns_in_input_order(fitted, dataset_root):
    generator = torch.Generator().manual_seed(3)
    inputs = [torch.rand(3, 40 + 7 * i, 50, generator=generator) for i in range(7)]
    whole = fitted.predict(inputs, batch_size=3)
    for workers in (0, 2):
        batches = list(fitted.predict_iter(iter(inputs), 3, num_workers=workers, progress=False))
        assert [len(b.indices) for b in batches] == [3, 3, 1]
        assert [i for b in batches for i in b.indices] == list(range(7))
        assert torch.equal(torch.cat([b.pred_score for b in batches]), whole.pred_score)
        maps = [m for b in batches for m in b.anomaly_map]
        assert all(torch.equal(a, b) for a, b in zip(maps, whole.anomaly_map, strict=True))
        assert all(b.images is None and b.failures == [] for b in batches)


def test_predict_iter_reads_folders_keeps_images_and_skips_bad_files(fitted, tmp_path):
    folder = tmp_path / "parts"
    folder.mkdir()
    for name, size in (("a.png", 30), ("c.png", 44)):
        Image.fromarray(np.full((size, size, 3), 128, np.uint8)).save(folder / name)
    (folder / "b.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"b\.png"):
        list(fitted.predict_iter(folder, progress=False))
    batches = list(
        fitted.predict_iter(
            folder, 2, num_workers=2, progress=False, keep_images=True, on_error="skip"
        )
    )
    assert [p for b in batches for p in b.paths] == [str(folder / "a.png"), str(folder / "c.png")]
    failures = [f for b in batches for f in b.failures]
    assert [(f.index, f.source) for f in failures] == [(1, str(folder / "b.png"))]
    assert "b.png" in failures[0].reason and "\n" not in failures[0].reason
    images = [image for b in batches for image in b.images]
    assert [tuple(image.shape) for image in images] == [(3, 30, 30), (3, 44, 44)]
    assert [tuple(m.shape) for b in batches for m in b.anomaly_map] == [(30, 30), (44, 44)]


def test_predict_iter_validates_its_arguments(fitted):
    image = torch.rand(3, 20, 20)
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        next(fitted.predict_iter([image], batch_size=0))
    with pytest.raises(TypeError, match="num_workers must be an integer"):
        next(fitted.predict_iter([image], num_workers=1.5))
    with pytest.raises(ValueError, match="on_error"):
        next(fitted.predict_iter([image], on_error="ignore"))
    with pytest.raises(ValueError, match="no images"):
        fitted.predict([])
