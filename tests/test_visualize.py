"""Pictures: colour map, overlay, labelled panels with a colour bar, stacked panels, demo."""

from __future__ import annotations

import doctest
import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cncad.visualize
from cncad.cli import main
from cncad.visualize import colorize, overlay, render_panel, save_panel, stack_panels

GREEN = np.array([0, 255, 0], np.uint8)
HOT = np.array([224, 0, 0], np.uint8)  # the top of the colour ramp
COLD = np.array([0, 0, 96], np.uint8)  # its bottom


def _green_image(height: int = 64, width: int = 64) -> np.ndarray:
    return np.broadcast_to(GREEN, (height, width, 3)).copy()


def _ramp_map(height: int = 64, width: int = 64) -> np.ndarray:
    return np.tile(np.linspace(0.0, 1.0, width), (height, 1))


def _box(panel: np.ndarray, colour: np.ndarray) -> tuple[int, int, int, int]:
    """``(top, bottom, left, right)`` (exclusive ends) of the pixels of exactly ``colour``."""
    ys, xs = np.nonzero(np.all(panel == colour, axis=-1))
    assert len(ys), f"no pixel of colour {colour}"
    return int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1


def _ink(region: np.ndarray) -> int:
    """Number of dark (text) pixels."""
    return int(np.count_nonzero(region.max(axis=-1) < 128))


# ------------------------------------------------------------------------------ colours


def test_colorize_spans_the_ramp_and_clips_outside_the_bounds() -> None:
    colours = colorize(np.array([[-1.0, 0.0, 1.0, 2.0]]), vmin=0.0, vmax=1.0)
    assert colours.dtype == np.uint8 and colours.shape == (1, 4, 3)
    np.testing.assert_array_equal(colours[0], [COLD, COLD, HOT, HOT])


def test_overlay_blends_with_alpha() -> None:
    image = np.full((2, 2, 3), 100, np.uint8)
    amap = np.ones((2, 2))
    np.testing.assert_array_equal(overlay(image, amap, 0.0, 0.0, 1.0), image)
    np.testing.assert_array_equal(overlay(image, amap, 1.0, 0.0, 1.0)[0, 0], HOT)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: colorize(np.array([[0.0, np.nan]])), ValueError, "non-finite"),
        (lambda: colorize(np.zeros(4)), ValueError, r"\(H, W\)"),
        (lambda: colorize(np.zeros((2, 2)), vmin=float("nan")), ValueError, "vmin must.*finite"),
        (lambda: colorize(np.zeros((2, 2)), vmin=1.0, vmax=1.0), ValueError, "below vmax"),
        (lambda: colorize(np.zeros((2, 2)), vmax="1"), TypeError, "vmax must be a number"),
        (lambda: overlay(np.zeros((2, 2, 3)), np.zeros((2, 2))), TypeError, "uint8"),
        (lambda: overlay(np.zeros((2, 2, 3), np.uint8), np.zeros((3, 2))), ValueError, "size"),
        (
            lambda: overlay(np.zeros((2, 2, 3), np.uint8), np.zeros((2, 2)), 1.5),
            ValueError,
            "alpha",
        ),
    ],
)
def test_bad_inputs_raise_one_clear_error(call, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        call()


# ------------------------------------------------------------------------------ panels


def test_panel_tiles_are_titled_and_scaled_up_to_a_legible_size() -> None:
    with_mask = render_panel(_green_image(), _ramp_map(), np.ones((64, 64)), vmin=0.0, vmax=1.0)
    without = render_panel(_green_image(), _ramp_map(), None, vmin=0.0, vmax=1.0)
    assert with_mask.dtype == np.uint8 and with_mask.ndim == 3 and with_mask.shape[2] == 3

    top, bottom, left, right = _box(with_mask, GREEN)  # the image tile, first
    assert (bottom - top, right - left) == (96, 96)  # 64 px scaled up to 96
    assert with_mask.shape[1] - without.shape[1] == 96 + 4  # one more tile and its gap
    assert with_mask.shape[0] == without.shape[0]
    # The strip above the tiles holds a title per tile (and "score" over the bar).
    strip = with_mask[: top - 1]
    for i in range(4):
        start = left + i * (96 + 4)
        assert _ink(strip[:, start : start + 96]) > 10, f"tile {i} has no title"
    assert _ink(with_mask[top:bottom, left - 4 : left]) == 0  # nothing drawn over tiles


def test_panel_has_a_colour_bar_with_the_score_scale() -> None:
    panel = render_panel(_green_image(), _ramp_map(), vmin=0.0, vmax=1.0)
    top, bottom, left, _ = _box(panel, GREEN)
    overlay_right = left + 3 * 96 + 2 * 4
    bar = [
        x
        for x in range(overlay_right, panel.shape[1])
        if np.array_equal(panel[top, x], HOT) and np.array_equal(panel[bottom - 1, x], COLD)
    ]
    assert len(bar) == 12  # hot at the top, cold at the bottom
    ticks = panel[top:bottom, bar[-1] + 2 :]
    assert _ink(ticks) > 30  # the numbers 1, 0.5 and 0 beside it
    # The labels change with the scale.
    other = render_panel(_green_image(), _ramp_map(), vmin=-123.0, vmax=456.0)
    assert not np.array_equal(other[top:bottom, bar[-1] + 2 :], ticks)


def test_panel_title_is_drawn_above_the_tiles() -> None:
    plain = render_panel(_green_image(), _ramp_map())
    titled = render_panel(_green_image(), _ramp_map(), title="bolt_like / scratch: score 0.912")
    extra = titled.shape[0] - plain.shape[0]
    assert extra > 8
    assert _ink(titled[:extra]) > 30
    np.testing.assert_array_equal(titled[extra:], plain)


def test_panel_keeps_the_aspect_ratio_and_honours_tile_height() -> None:
    panel = render_panel(_green_image(50, 150), np.zeros((50, 150)), tile_height=40)
    top, bottom, left, right = _box(panel, GREEN)
    assert (bottom - top, right - left) == (40, 120)
    large = render_panel(_green_image(200, 300), np.zeros((200, 300)))
    top, bottom, left, right = _box(large, GREEN)
    assert (bottom - top, right - left) == (200, 300)  # big enough: drawn at its own size


def test_titles_of_narrow_tiles_stay_over_their_tile() -> None:
    panel = render_panel(
        _green_image(200, 50), np.zeros((200, 50)), np.zeros((200, 50)), tile_height=100
    )
    top, _, left, right = _box(panel, GREEN)
    assert right - left == 25
    strip = panel[: top - 1]
    for i in range(4):  # titles shortened or clipped, but never over the gaps
        gap_start = left + 25 + i * (25 + 4)
        assert _ink(strip[:, gap_start : gap_start + 4]) == 0, f"title {i} spills over"
        assert _ink(strip[:, gap_start - 25 : gap_start]) > 0, f"tile {i} has no title"


def test_panel_accepts_grey_images() -> None:
    grey = np.full((64, 64), 255, np.uint8)
    panel = render_panel(grey, _ramp_map())
    assert panel.shape == render_panel(np.stack([grey] * 3, -1), _ramp_map()).shape


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"mask": np.zeros((32, 32))}, ValueError, "the mask is 32x32 but the image is 64x64"),
        ({"amap": np.full((64, 64), np.inf)}, ValueError, "non-finite"),
        ({"image": np.zeros((64, 64, 3), np.float32)}, TypeError, "uint8"),
        ({"title": 3}, TypeError, "title"),
        ({"tile_height": 0}, ValueError, "tile_height"),
        ({"vmin": 2.0, "vmax": 1.0}, ValueError, "below vmax"),
    ],
)
def test_render_panel_refuses_bad_inputs(
    kwargs: dict, error: type[Exception], message: str
) -> None:
    arguments = {"image": _green_image(), "amap": _ramp_map(), **kwargs}
    with pytest.raises(error, match=message):
        render_panel(**arguments)


def test_stack_panels_pads_rows_and_adds_a_caption() -> None:
    wide = render_panel(_green_image(64, 128), _ramp_map(64, 128))
    narrow = render_panel(_green_image(), _ramp_map())
    stacked = stack_panels([wide, narrow])
    assert stacked.shape == (wide.shape[0] + 4 + narrow.shape[0], wide.shape[1], 3)
    np.testing.assert_array_equal(stacked[: wide.shape[0]], wide)
    assert (stacked[wide.shape[0] + 4 :, narrow.shape[1] :] == 255).all()  # white padding

    captioned = stack_panels([wide, narrow], caption="trained on X\nreproduce: Y")
    below = captioned[stacked.shape[0] :]
    assert below.shape[0] > 20 and _ink(below) > 30


def test_stack_panels_refuses_bad_inputs() -> None:
    with pytest.raises(ValueError, match="at least one"):
        stack_panels([])
    with pytest.raises(TypeError, match="uint8"):
        stack_panels([np.zeros((4, 4, 3))])
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        stack_panels([np.zeros((4, 4), np.uint8)])


def test_save_panel_writes_the_rendered_panel(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "panel.png"
    assert save_panel(target, _green_image(), _ramp_map(), title="t") == target
    expected = render_panel(_green_image(), _ramp_map(), title="t")
    np.testing.assert_array_equal(np.asarray(Image.open(target).convert("RGB")), expected)


def test_save_panel_leaves_an_earlier_file_when_the_input_is_bad(tmp_path: Path) -> None:
    target = tmp_path / "panel.png"
    save_panel(target, _green_image(), _ramp_map())
    before = hashlib.sha256(target.read_bytes()).hexdigest()
    with pytest.raises(ValueError, match="mask"):
        save_panel(target, _green_image(), _ramp_map(), mask=np.zeros((3, 3)))
    assert hashlib.sha256(target.read_bytes()).hexdigest() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["panel.png"]


def test_module_docstring_example_runs() -> None:
    result = doctest.testmod(cncad.visualize)
    assert result.attempted > 0 and result.failed == 0


# ------------------------------------------------------------------------------ demo


def test_demo_draws_panels_from_every_category(tmp_path: Path) -> None:
    argv = ["demo", "--out", str(tmp_path), "--epochs", "1", "--image-size", "28"]
    argv += ["--data-size", "32", "--train-images", "2", "--heatmaps", "3", "--device", "cpu"]
    assert main([*argv, "--quiet"]) == 0

    panels = sorted((tmp_path / "heatmaps").glob("*.png"))
    assert len(panels) == 4  # three defective, one normal
    categories = sorted(p.name for p in (tmp_path / "data").iterdir() if p.is_dir())
    assert len(categories) == 2
    drawn: dict[str, list[str]] = {c: [] for c in categories}
    for panel in panels:
        category = next(c for c in categories if panel.name.startswith(f"{c}_"))
        drawn[category].append(panel.name[len(category) + 1 :].split("_")[0])
    assert all(drawn.values()), drawn  # every category
    assert sum(kind == "good" for kinds in drawn.values() for kind in kinds) == 1
    first = max(drawn.values(), key=len)
    assert len({kind for kind in first if kind != "good"}) >= 2  # and several defect types
    for panel in panels:  # 32 px images drawn as titled 96 px tiles with a colour bar
        width, height = Image.open(panel).size
        assert height > 96 + 20 and width > 4 * 96 + 3 * 4 + 12


def test_demo_refuses_a_negative_heatmap_count(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(["demo", "--heatmaps", "-1"])
    assert stopped.value.code == 2
    assert "--heatmaps: must be at least 0, got -1" in capsys.readouterr().err


# ------------------------------------------------------------------------------ pictures

ROOT = Path(__file__).resolve().parents[1]


def test_readme_shows_the_real_defect_picture_and_says_what_made_it() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "(docs/images/real_defects.png)" in readme
    for fact in ("tf_efficientnet_lite0", "use_cnc=False", "benchmarks/readme_picture.py"):
        assert fact in readme
    picture = ROOT / "docs" / "images" / "real_defects.png"
    assert picture.stat().st_size < 400 * 1024
    assert (ROOT / "benchmarks" / "readme_picture.py").is_file()
