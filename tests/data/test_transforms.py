from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cncad.data.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    ImageReadError,
    check_model_batch,
    denormalize,
    is_image_file,
    load_image,
    load_mask,
    preprocess,
    resize_mask,
    to_image_tensor,
)


def _save(image: Image.Image, path: Path, **params) -> Path:
    image.save(path, **params)
    return path


def _rgb_array(height: int = 6, width: int = 5, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


# ---------------------------------------------------------------------------- load_image


class TestLoadImage:
    def test_rgb_png_roundtrip(self, tmp_path: Path) -> None:
        array = _rgb_array()
        image = load_image(_save(Image.fromarray(array), tmp_path / "a.png"))
        assert image.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(image), array)

    @pytest.mark.parametrize("mode", ["L", "1"])
    def test_single_channel_is_replicated(self, tmp_path: Path, mode: str) -> None:
        gray = np.array([[0, 255], [255, 0]], dtype=np.uint8)
        source = Image.fromarray(gray).convert(mode)
        values = np.asarray(load_image(_save(source, tmp_path / "g.png")))
        assert values.shape == (2, 2, 3)
        for channel in range(3):
            np.testing.assert_array_equal(values[..., channel], gray)

    def test_rgba_is_composited_on_black(self, tmp_path: Path) -> None:
        rgba = np.zeros((1, 3, 4), dtype=np.uint8)
        rgba[..., :3] = 200
        rgba[0, :, 3] = [255, 0, 128]
        values = np.asarray(load_image(_save(Image.fromarray(rgba, "RGBA"), tmp_path / "a.png")))
        np.testing.assert_array_equal(values[0, :, 0], [200, 0, round(200 * 128 / 255)])

    def test_gray_with_alpha(self, tmp_path: Path) -> None:
        la = Image.fromarray(np.array([[[100, 255], [100, 0]]], dtype=np.uint8), "LA")
        values = np.asarray(load_image(_save(la, tmp_path / "la.png")))
        np.testing.assert_array_equal(values[0, :, 1], [100, 0])

    def test_palette_with_and_without_transparency(self, tmp_path: Path) -> None:
        palette = Image.fromarray(_rgb_array(4, 4)).convert("P", palette=Image.Palette.ADAPTIVE)
        opaque = load_image(_save(palette, tmp_path / "p.png"))
        np.testing.assert_array_equal(np.asarray(opaque), np.asarray(palette.convert("RGB")))
        index = int(np.asarray(palette)[0, 0])
        transparent = load_image(_save(palette, tmp_path / "pt.png", transparency=index))
        assert np.asarray(transparent)[0, 0].tolist() == [0, 0, 0]

    def test_16_bit_png_is_scaled_by_full_range(self, tmp_path: Path) -> None:
        values16 = np.array([[0, 257 * 100, 65535, 1000]], dtype=np.uint16)
        path = _save(Image.fromarray(values16), tmp_path / "deep.png")
        assert Image.open(path).mode.startswith("I")
        values = np.asarray(load_image(path))[..., 0]
        # 1000 / 65535 * 255 = 3.9: scaled, not clipped to 255.
        np.testing.assert_array_equal(values, [[0, 100, 255, 4]])

    def test_32_bit_integer_image(self, tmp_path: Path) -> None:
        path = _save(Image.fromarray(np.array([[0, 65535]], dtype=np.int32)), tmp_path / "i.tif")
        assert Image.open(path).mode == "I"
        np.testing.assert_array_equal(np.asarray(load_image(path))[..., 0], [[0, 255]])

    def test_float_image(self, tmp_path: Path) -> None:
        image = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), "F")
        values = np.asarray(load_image(_save(image, tmp_path / "f.tif")))[..., 0]
        np.testing.assert_array_equal(values, [[0, 128, 255]])

    def test_jpeg(self, tmp_path: Path) -> None:
        flat = np.full((8, 8, 3), (200, 100, 50), dtype=np.uint8)
        values = np.asarray(load_image(_save(Image.fromarray(flat), tmp_path / "a.jpg")))
        assert np.abs(values.astype(int) - flat).max() <= 3

    def test_cmyk_jpeg(self, tmp_path: Path) -> None:
        cmyk = Image.fromarray(_rgb_array(8, 8)).convert("CMYK")
        image = load_image(_save(cmyk, tmp_path / "c.jpg"))
        assert image.mode == "RGB" and image.size == (8, 8)

    def test_corrupt_file_names_the_file(self, tmp_path: Path) -> None:
        path = tmp_path / "broken.png"
        path.write_bytes(b"definitely not a png")
        with pytest.raises(ImageReadError, match=r"broken\.png"):
            load_image(path)

    def test_truncated_file(self, tmp_path: Path) -> None:
        path = _save(Image.fromarray(_rgb_array(64, 64)), tmp_path / "cut.png")
        path.write_bytes(path.read_bytes()[:200])
        with pytest.raises(ImageReadError, match=r"cut\.png"):
            load_image(path)
        assert issubclass(ImageReadError, ValueError)

    def test_missing_file(self, tmp_path: Path) -> None:
        with pytest.raises(FileNotFoundError, match=r"nothing\.png"):
            load_image(tmp_path / "nothing.png")


def test_is_image_file() -> None:
    assert is_image_file("a/b/IMG.JPG") and is_image_file("x.tiff")
    assert not is_image_file("notes.txt") and not is_image_file("._000.png")


# ----------------------------------------------------------------------------- load_mask


class TestLoadMask:
    def test_binary_mask(self, tmp_path: Path) -> None:
        values = np.array([[0, 255], [255, 0]], dtype=np.uint8)
        mask = load_mask(_save(Image.fromarray(values), tmp_path / "m.png"))
        assert mask.dtype == bool and mask.shape == (2, 2)
        np.testing.assert_array_equal(mask, values > 0)

    def test_grey_edges_and_threshold(self, tmp_path: Path) -> None:
        path = _save(
            Image.fromarray(np.array([[0, 40, 128, 255]], dtype=np.uint8)), tmp_path / "m.png"
        )
        np.testing.assert_array_equal(load_mask(path), [[False, True, True, True]])
        np.testing.assert_array_equal(load_mask(path, threshold=127), [[False, False, True, True]])

    def test_colour_and_16_bit_masks(self, tmp_path: Path) -> None:
        colour = np.zeros((1, 2, 3), dtype=np.uint8)
        colour[0, 1, 2] = 255  # a pure blue annotation
        mask = load_mask(_save(Image.fromarray(colour), tmp_path / "c.png"), threshold=127)
        np.testing.assert_array_equal(mask, [[False, True]])
        deep = np.array([[0, 65535]], dtype=np.uint16)
        np.testing.assert_array_equal(
            load_mask(_save(Image.fromarray(deep), tmp_path / "d.png"), 127), [[False, True]]
        )

    def test_invalid_threshold(self, tmp_path: Path) -> None:
        with pytest.raises(ValueError, match="threshold"):
            load_mask(tmp_path / "m.png", threshold=255)


# ----------------------------------------------------------------------- to_image_tensor


def _check(tensors: list[torch.Tensor], sizes: list[tuple[int, int]]) -> None:
    assert isinstance(tensors, list) and len(tensors) == len(sizes)
    for tensor, size in zip(tensors, sizes, strict=True):
        assert tensor.dtype == torch.float32
        assert tuple(tensor.shape) == (3, *size)
        assert tensor.min() >= 0.0 and tensor.max() <= 1.0


class TestToImageTensor:
    def test_paths(self, tmp_path: Path) -> None:
        array = _rgb_array(6, 5)
        path = _save(Image.fromarray(array), tmp_path / "a.png")
        for source in (path, str(path)):
            (tensor,) = to_image_tensor(source)
            _check([tensor], [(6, 5)])
            assert torch.equal(tensor, torch.from_numpy(array).permute(2, 0, 1).float() / 255)

    def test_pil_image_of_any_mode(self) -> None:
        _check(to_image_tensor(Image.new("L", (5, 6), 10)), [(6, 5)])
        rgba = Image.new("RGBA", (5, 6), (255, 255, 255, 0))
        assert to_image_tensor(rgba)[0].max() == 0.0

    @pytest.mark.parametrize("shape", [(6, 5), (6, 5, 1), (6, 5, 3), (6, 5, 4)])
    def test_uint8_arrays(self, shape: tuple[int, ...]) -> None:
        array = np.full(shape, 255, dtype=np.uint8)
        (tensor,) = to_image_tensor(array)
        _check([tensor], [(6, 5)])
        assert torch.all(tensor == 1.0)

    def test_uint8_array_values_and_channel_order(self) -> None:
        array = _rgb_array(3, 4)
        (tensor,) = to_image_tensor(array)
        assert tensor[1, 2, 3] == pytest.approx(array[2, 3, 1] / 255)

    def test_float_uint16_and_batched_arrays(self) -> None:
        (floats,) = to_image_tensor(np.full((4, 4, 3), 0.25, dtype=np.float64))
        assert torch.allclose(floats, torch.full((3, 4, 4), 0.25))
        (deep,) = to_image_tensor(np.full((4, 4), 65535, dtype=np.uint16))
        assert torch.all(deep == 1.0)
        _check(to_image_tensor(np.zeros((2, 4, 5, 3), dtype=np.uint8)), [(4, 5)] * 2)

    def test_tensors(self) -> None:
        chw = torch.rand(3, 6, 5)
        assert to_image_tensor(chw)[0] is chw  # float32 CHW passes through without copy
        (from_uint8,) = to_image_tensor(torch.full((3, 6, 5), 255, dtype=torch.uint8))
        assert torch.all(from_uint8 == 1.0)
        (gray,) = to_image_tensor(torch.rand(1, 6, 5))
        assert torch.equal(gray[0], gray[2])
        _check(to_image_tensor(torch.rand(6, 5, dtype=torch.float64)), [(6, 5)])
        _check(to_image_tensor(torch.rand(4, 1, 6, 5)), [(6, 5)] * 4)

    def test_list_of_mixed_kinds_and_sizes(self, tmp_path: Path) -> None:
        path = _save(Image.new("L", (7, 9)), tmp_path / "g.jpg")
        inputs = [
            path,
            Image.new("RGB", (3, 2)),
            np.zeros((4, 4), np.uint8),
            torch.rand(2, 3, 5, 6),
        ]
        _check(to_image_tensor(inputs), [(9, 7), (2, 3), (4, 4), (5, 6), (5, 6)])
        _check(to_image_tensor((torch.rand(3, 2, 2),)), [(2, 2)])

    @pytest.mark.parametrize(
        ("bad", "error", "match"),
        [
            (np.full((4, 4, 3), 1.5), ValueError, r"outside \[0, 1\]"),
            (np.full((4, 4, 3), np.nan), ValueError, "NaN"),
            (torch.full((3, 4, 4), -0.1), ValueError, r"outside \[0, 1\]"),
            (np.zeros((4, 4, 2), np.uint8), ValueError, "channels"),
            (np.zeros(4, np.uint8), ValueError, "HxW"),
            (torch.zeros(2, 4, 4), ValueError, "1 or 3 channels"),
            (torch.zeros(4, 4, 4), ValueError, "1 or 3 channels"),
            (torch.zeros(1, 1, 1, 3, 4, 4), ValueError, "BxCxHxW"),
            (np.zeros((0, 4, 3), np.uint8), ValueError, "empty"),
            (torch.zeros(3, 4, 4, dtype=torch.int32), TypeError, "dtype"),
            (np.zeros((4, 4), dtype=bool), TypeError, "dtype"),
            (42, TypeError, "int"),
            ([], ValueError, "empty sequence"),
            ([torch.rand(3, 2, 2), {"image": 1}], TypeError, "dict"),
        ],
    )
    def test_errors(self, bad: object, error: type[Exception], match: str) -> None:
        with pytest.raises(error, match=match):
            to_image_tensor(bad)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ preprocess


class TestPreprocess:
    def test_clip_mean_image_becomes_zero(self) -> None:
        images = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1).expand(2, 3, 10, 12)
        out = preprocess(images, 8)
        assert out.shape == (2, 3, 8, 8) and out.dtype == torch.float32
        assert out.abs().max() < 1e-5

    def test_normalisation_statistics(self) -> None:
        out = preprocess(torch.ones(3, 4, 4), 4)  # unchanged size: no resampling
        expected = (1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
        assert torch.allclose(out[0, :, 0, 0], expected)

    def test_antialiased_downscale_averages_fine_patterns(self) -> None:
        checker = (torch.arange(64).view(-1, 1) + torch.arange(64)) % 2
        image = checker.float().expand(1, 3, 64, 64)
        restored = denormalize(preprocess(image, 8))
        assert torch.allclose(restored, torch.full_like(restored, 0.5), atol=0.02)

    def test_sequence_of_sizes_and_rectangular_target(self) -> None:
        out = preprocess([torch.rand(3, 10, 20), torch.rand(3, 7, 7)], (4, 6))
        assert out.shape == (2, 3, 4, 6)

    def test_denormalize_inverts(self) -> None:
        image = torch.rand(1, 3, 5, 5)
        assert torch.allclose(denormalize(preprocess(image, 5)), image, atol=1e-6)

    def test_errors(self) -> None:
        with pytest.raises(ValueError, match="3, H, W"):
            preprocess(torch.rand(1, 1, 4, 4), 4)
        with pytest.raises(TypeError, match="float"):
            preprocess(torch.zeros(1, 3, 4, 4, dtype=torch.uint8), 4)
        with pytest.raises(ValueError, match="size"):
            preprocess(torch.rand(3, 4, 4), 0)
        with pytest.raises(TypeError):
            preprocess([], 4)


# ----------------------------------------------------------------------------- resize_mask


class TestResizeMask:
    def test_bool_mask_keeps_dtype_and_alignment(self) -> None:
        mask = torch.zeros(8, 8, dtype=torch.bool)
        mask[:, :4] = True
        small = resize_mask(mask, 4)
        assert small.dtype == torch.bool and small.shape == (4, 4)
        assert small[:, :2].all() and not small[:, 2:].any()

    def test_upsampling_repeats_pixels(self) -> None:
        mask = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        big = resize_mask(mask, 4)
        expected = mask.repeat_interleave(2, 0).repeat_interleave(2, 1)
        assert torch.equal(big, expected)

    def test_leading_dimensions_and_numpy(self) -> None:
        batch = torch.randint(0, 2, (3, 1, 10, 6)).float()
        out = resize_mask(batch, 5)
        assert out.shape == (3, 1, 5, 5) and set(out.unique().tolist()) <= {0.0, 1.0}
        array = np.zeros((2, 6, 6), dtype=bool)
        array[:, 3:, :] = True
        resized = resize_mask(array, 3)
        assert isinstance(resized, np.ndarray) and resized.dtype == bool
        assert resized[:, 2].all() and not resized[:, 0].any()

    def test_needs_two_dimensions(self) -> None:
        with pytest.raises(ValueError, match="2 dimensions"):
            resize_mask(torch.zeros(5), 3)


# ------------------------------------------------------------------ non-finite pixels


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class TestNonFinitePixels:
    @pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
    def test_float_pil_image_with_one_bad_pixel_is_refused(self, bad: float) -> None:
        values = np.full((6, 5), 0.5, dtype=np.float32)
        values[2, 3] = bad
        with pytest.raises(ImageReadError, match="1 of its 30 float pixels are NaN or infinite"):
            to_image_tensor(Image.fromarray(values, mode="F"))

    def test_float_tiff_file_with_inf_is_refused_and_left_as_is(self, tmp_path: Path) -> None:
        values = np.linspace(0, 3, 30, dtype=np.float32).reshape(6, 5)
        values[0, 0] = np.inf
        path = _save(Image.fromarray(values, mode="F"), tmp_path / "depth.tif")
        before = _sha256(path)
        with pytest.raises(ImageReadError) as info:
            load_image(path)
        assert str(path) in str(info.value) and "NaN or infinite" in str(info.value)
        with pytest.raises(ImageReadError, match="NaN or infinite"):
            load_mask(path)
        assert _sha256(path) == before

    def test_finite_float_image_is_still_scaled_by_its_range(self) -> None:
        values = np.array([[0.0, 2.0]], dtype=np.float32)
        pixels = to_image_tensor(Image.fromarray(values, mode="F"))[0]
        assert pixels[0].tolist() == [[0.0, 1.0]]

    @pytest.mark.parametrize(
        "bad",
        [
            np.array([[[0.5, np.inf, 0.5]]], dtype=np.float32),
            torch.tensor([[[0.5, float("nan")]]]).expand(3, 1, 2),
        ],
        ids=["numpy", "tensor"],
    )
    def test_float_arrays_and_tensors_say_not_finite(self, bad: object) -> None:
        with pytest.raises(ValueError, match="NaN or infinite values") as info:
            to_image_tensor(bad)
        assert "outside" not in str(info.value)

    def test_out_of_range_message_gives_the_range(self) -> None:
        with pytest.raises(ValueError, match=r"values in \[0, 255\], outside \[0, 1\]"):
            to_image_tensor(torch.linspace(0, 255, 12).reshape(3, 2, 2))


# ------------------------------------------------------------------ decompression bombs


class TestDecompressionBomb:
    def test_more_than_twice_the_limit_is_one_clear_error(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        path = _save(Image.new("RGB", (30, 40)), tmp_path / "bomb.png")
        before = _sha256(path)
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)
        with pytest.raises(ImageReadError) as info:
            load_image(path)
        message = str(info.value)
        assert str(path) in message and "1,200 pixels" in message
        assert "1,000 (twice PIL's limit of 500)" in message
        assert "PIL.Image.MAX_IMAGE_PIXELS" in message and "\n" not in message
        with pytest.raises(ImageReadError, match="decompression bomb"):
            to_image_tensor(str(path))
        assert _sha256(path) == before

    def test_between_one_and_two_times_the_limit_warns_and_decodes(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        path = _save(Image.new("RGB", (30, 40)), tmp_path / "large.png")
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
        with pytest.warns(Image.DecompressionBombWarning):
            assert load_image(path).size == (30, 40)


# ------------------------------------------------------------------- check_model_batch


class TestCheckModelBatch:
    def test_preprocessed_images_pass(self) -> None:
        extremes = torch.stack([torch.zeros(3, 4, 4), torch.ones(3, 4, 4)])
        check_model_batch(preprocess(extremes, 4))
        check_model_batch(torch.zeros(0, 3, 4, 4))

    @pytest.mark.parametrize(
        ("images", "error", "match"),
        [
            (torch.full((2, 3, 4, 4), 200.0), ValueError, r"\[200, 200\].*divide 0-255"),
            (preprocess(torch.full((1, 3, 4, 4), 255.0), 4), ValueError, "divide 0-255"),
            (torch.full((2, 3, 4, 4), -20.0), ValueError, r"\[-20, -20\]"),
            (torch.tensor(float("nan")).expand(1, 3, 4, 4), ValueError, "NaN or infinite"),
            (torch.zeros(1, 3, 4, 4, dtype=torch.uint8), TypeError, "dtype torch.uint8"),
            (np.zeros((1, 3, 4, 4), dtype=np.float32), TypeError, "type ndarray"),
        ],
        ids=["0-255", "0-255-normalised", "negative", "nan", "uint8", "numpy"],
    )
    def test_bad_batches(self, images: object, error: type[Exception], match: str) -> None:
        with pytest.raises(error, match=match) as info:
            check_model_batch(images, "a training batch")  # type: ignore[arg-type]
        assert str(info.value).startswith("a training batch has")
        assert "AnomalyFolder" in str(info.value)
