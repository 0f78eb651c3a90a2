"""Pictures of anomaly maps: colour-mapped heatmaps, overlays and labelled comparison panels.

Everything is drawn with Pillow (no plotting library needed): a panel is one row of
titled tiles (image, ground truth, anomaly map, overlay) with a colour bar giving the
score scale; [`stack_panels`][cncad.visualize.stack_panels] puts several rows and a
caption into one picture.

Examples:
    >>> import numpy as np
    >>> image = np.zeros((64, 64, 3), np.uint8)
    >>> amap = np.zeros((64, 64)); amap[20:30, 20:30] = 1.0
    >>> panel = render_panel(image, amap, mask=amap > 0.5, title="score 1.000")
    >>> panel.dtype, panel.shape[2]
    (dtype('uint8'), 3)
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cncad._inference import check_optional_finite
from cncad.files import save_image_atomic

__all__ = ["colorize", "overlay", "render_panel", "save_panel", "stack_panels"]

# Control points of a perceptually ordered dark-blue -> cyan -> yellow -> red ramp.
_RAMP = np.array(
    [
        [0.0, 0, 0, 96],
        [0.25, 0, 96, 255],
        [0.5, 0, 224, 192],
        [0.75, 255, 224, 0],
        [1.0, 224, 0, 0],
    ],
    dtype=np.float64,
)

# Smallest tile side drawn: smaller images are scaled up so the tile titles fit.
_MIN_TILE = 96
_BACKGROUND = (255, 255, 255)
_INK = (0, 0, 0)
_MARGIN = 4
_GAP = 4
_BAR_WIDTH = 12


def _scale(amap: np.ndarray, vmin: Any, vmax: Any) -> tuple[float, float]:
    """The ``(low, high)`` colour bounds: the given ones, else the map's own range.

    A flat map gets a tiny range above its value, so it shows in the coldest colour.
    """
    low, high = check_optional_finite(vmin, "vmin"), check_optional_finite(vmax, "vmax")
    if low is not None and high is not None and low >= high:
        raise ValueError(f"vmin ({low:g}) must be below vmax ({high:g})")
    low = float(amap.min()) if low is None else low
    high = float(amap.max()) if high is None else high
    if high <= low:  # a flat map, or one entirely beyond the one bound given
        if vmax is None:
            high = low + max(abs(low) * 1e-6, 1e-12)
        else:
            low = high - max(abs(high) * 1e-6, 1e-12)
    return low, high


def _as_map(amap: Any, name: str, size: tuple[int, int] | None = None) -> np.ndarray:
    """``amap`` as a finite ``(H, W)`` float64 array, of ``size`` when given."""
    values = np.asarray(amap)
    if values.ndim != 2 or values.size == 0:
        raise ValueError(f"expected an (H, W) {name}, got shape {values.shape}")
    if size is not None and values.shape != size:
        raise ValueError(
            f"the {name} is {values.shape[0]}x{values.shape[1]} but the image is "
            f"{size[0]}x{size[1]}; give them the same size"
        )
    values = values.astype(np.float64)
    bad = int(np.count_nonzero(~np.isfinite(values)))
    if bad:
        raise ValueError(f"the {name} has {bad} non-finite values (NaN or inf)")
    return values


def _as_rgb(image: Any) -> np.ndarray:
    """``image`` as ``(H, W, 3)`` uint8: ``(H, W)`` and ``(H, W, 1)`` grey are repeated."""
    picture = np.asarray(image)
    if picture.dtype != np.uint8:
        raise TypeError(f"expected a uint8 image, got dtype {picture.dtype}")
    if picture.ndim == 2:
        picture = picture[..., None]
    if picture.ndim != 3 or picture.shape[2] not in (1, 3) or 0 in picture.shape:
        raise ValueError(f"expected an (H, W, 3) or (H, W) image, got shape {np.shape(image)}")
    return np.repeat(picture, 3, axis=2) if picture.shape[2] == 1 else picture


def colorize(amap: np.ndarray, vmin: float | None = None, vmax: float | None = None) -> np.ndarray:
    """Colour-map an anomaly map, dark blue (low) through cyan and yellow to red (high).

    Args:
        amap: ``(H, W)`` finite scores.
        vmin: Score shown as the coldest colour (default: the map's minimum).
        vmax: Score shown as the hottest colour (default: the map's maximum). Pass fixed
            bounds to compare maps of different images on one scale.

    Returns:
        ``(H, W, 3)`` uint8 RGB.

    Raises:
        ValueError: The map is not 2-D or has NaN/inf values; a bound is not finite; or
            ``vmin >= vmax``.
        TypeError: A bound is not a number.
    """
    values = _as_map(amap, "anomaly map")
    low, high = _scale(values, vmin, vmax)
    t = np.clip((values - low) / max(high - low, 1e-12), 0.0, 1.0)
    channels = [np.interp(t, _RAMP[:, 0], _RAMP[:, c]) for c in (1, 2, 3)]
    return np.stack(channels, axis=-1).round().astype(np.uint8)


def overlay(
    image: np.ndarray,
    amap: np.ndarray,
    alpha: float = 0.5,
    vmin: float | None = None,
    vmax: float | None = None,
) -> np.ndarray:
    """Blend the colour-mapped anomaly map over the image.

    Args:
        image: ``(H, W, 3)`` (or ``(H, W)`` grey) uint8 image.
        amap: ``(H, W)`` anomaly map at the image's resolution.
        alpha: Weight of the heatmap, in ``[0, 1]``.
        vmin: Lower colour bound (see [`colorize`][cncad.visualize.colorize]).
        vmax: Upper colour bound.

    Returns:
        ``(H, W, 3)`` uint8 RGB.

    Raises:
        ValueError: The image and map differ in size, ``alpha`` is outside ``[0, 1]``, or
            [`colorize`][cncad.visualize.colorize] refuses the map or bounds.
        TypeError: The image is not uint8, or ``alpha`` is not a number.
    """
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise TypeError(f"alpha must be a number in [0, 1], got {type(alpha).__name__}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    picture = _as_rgb(image)
    values = _as_map(amap, "anomaly map", picture.shape[:2])
    heat = colorize(values, vmin, vmax).astype(np.float64)
    blended = (1 - alpha) * picture.astype(np.float64) + alpha * heat
    return blended.round().clip(0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------ drawing


def _font(size: int) -> Any:
    """Pillow's built-in font at ``size`` px (its fixed bitmap font on old Pillow)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one size only
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font: Any) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def _line_height(font: Any) -> int:
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    return _text_size(probe, "Ag|0.9", font)[1] + 4


def _wrap(text: str, font: Any, width: int) -> list[str]:
    """Split ``text`` at its newlines, then between words so each line fits ``width``."""
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = word if not line else f"{line} {word}"
            if line and _text_size(probe, candidate, font)[0] > width:
                lines.append(line)
                line = word
            else:
                line = candidate
        lines.append(line)
    return lines


# Shorter tile titles, used when the full one is wider than its tile.
_SHORT_LABELS = {"ground truth": "truth", "anomaly map": "map"}


def _draw_label(
    canvas: Image.Image, label: str, font: Any, corner: tuple[int, int], width: int, height: int
) -> None:
    """Centre ``label`` (or its short form) over a tile ``width`` px wide, never past it."""
    draw = ImageDraw.Draw(canvas)
    for text in (label, _SHORT_LABELS.get(label, label)):
        text_width = _text_size(draw, text, font)[0]
        if text_width <= width:
            draw.text(
                (corner[0] + (width - text_width) // 2, corner[1]), text, fill=_INK, font=font
            )
            return
    strip = Image.new("RGB", (width, height), _BACKGROUND)  # clipped to the tile's width
    ImageDraw.Draw(strip).text((0, 0), text, fill=_INK, font=font)
    canvas.paste(strip, corner)


def _format_value(value: float) -> str:
    return f"{value:.3g}"


def _resized(values: np.ndarray, size: tuple[int, int], resample: int) -> np.ndarray:
    """``values`` ``(H, W)`` float or ``(H, W, 3)`` uint8 resized to ``size`` = (W, H)."""
    if values.shape[1::-1] == size:
        return values
    if values.ndim == 2:
        image = Image.fromarray(values.astype(np.float32))
        return np.asarray(image.resize(size, resample), dtype=np.float64)
    return np.asarray(Image.fromarray(values).resize(size, resample))


def render_panel(
    image: np.ndarray,
    amap: np.ndarray,
    mask: np.ndarray | None = None,
    title: str | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    *,
    tile_height: int | None = None,
) -> np.ndarray:
    """Draw one labelled row: image | ground truth | anomaly map | overlay | colour bar.

    Each tile has its title above it; the colour bar on the right maps colours to scores,
    with ``vmax`` at the top, ``vmin`` at the bottom and their midpoint between.

    Args:
        image: ``(H, W, 3)`` (or ``(H, W)`` grey) uint8 image.
        amap: ``(H, W)`` finite anomaly map at the image's resolution.
        mask: Optional ``(H, W)`` ground-truth mask (non-zero = defect), drawn white on
            black; its tile is left out when None.
        title: Optional caption above the row (e.g. the file and its score); long ones
            wrap.
        vmin: Score drawn as the coldest colour (default: the map's minimum). Give the
            same bounds to several panels to compare them.
        vmax: Score drawn as the hottest colour (default: the map's maximum).
        tile_height: Height of every tile in pixels, the width following the image's
            aspect ratio. Default: the image's own size, scaled up so that neither side
            is below 96 px.

    Returns:
        ``(H', W', 3)`` uint8 RGB picture on a white background.

    Raises:
        ValueError: Mismatched sizes, non-finite map values or bounds, ``vmin >= vmax``,
            or a ``tile_height`` below 8.
        TypeError: A non-uint8 image, or a title that is not a string.
    """
    picture = _as_rgb(image)
    size = picture.shape[:2]
    values = _as_map(amap, "anomaly map", size)
    truth = None if mask is None else _as_map(mask, "mask", size) > 0
    if title is not None and not isinstance(title, str):
        raise TypeError(f"title must be a string or None, got {type(title).__name__}")
    if tile_height is not None and (
        isinstance(tile_height, bool) or not isinstance(tile_height, int) or tile_height < 8
    ):
        raise ValueError(f"tile_height must be an integer of at least 8, got {tile_height!r}")
    low, high = _scale(values, vmin, vmax)

    height, width = size
    if tile_height is None:
        factor = max(1.0, _MIN_TILE / min(height, width))
        tile = (round(width * factor), round(height * factor))
    else:
        tile = (max(1, round(width * tile_height / height)), tile_height)
    picture = _resized(picture, tile, Image.BILINEAR)
    values = _resized(values, tile, Image.BILINEAR)
    tiles = [("image", picture)]
    if truth is not None:
        gray = _resized(truth.astype(np.uint8) * 255, tile, Image.NEAREST)
        white = np.where(gray >= 128, 255, 0).astype(np.uint8)
        tiles.append(("ground truth", np.repeat(white[..., None], 3, axis=2)))
    tiles += [
        ("anomaly map", colorize(values, low, high)),
        ("overlay", overlay(picture, values, 0.5, low, high)),
    ]

    font = _font(int(np.clip(round(tile[1] / 12), 11, 18)))
    line = _line_height(font)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    ticks = [(high, "top"), ((low + high) / 2, "middle"), (low, "bottom")]
    tick_width = max(_text_size(probe, _format_value(v), font)[0] for v, _ in ticks)
    bar_area = _BAR_WIDTH + 4 + max(tick_width, _text_size(probe, "score", font)[0])
    tiles_width = len(tiles) * tile[0] + (len(tiles) - 1) * _GAP
    canvas_width = 2 * _MARGIN + tiles_width + 2 * _GAP + bar_area
    title_lines = _wrap(title, font, canvas_width - 2 * _MARGIN) if title else []
    top = _MARGIN + len(title_lines) * line + (2 if title_lines else 0)
    tiles_top = top + line
    canvas = Image.new("RGB", (canvas_width, tiles_top + tile[1] + _MARGIN), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)

    for i, text in enumerate(title_lines):
        draw.text((_MARGIN, _MARGIN + i * line), text, fill=_INK, font=font)
    for i, (label, pixels) in enumerate(tiles):
        left = _MARGIN + i * (tile[0] + _GAP)
        canvas.paste(Image.fromarray(np.ascontiguousarray(pixels)), (left, tiles_top))
        _draw_label(canvas, label, font, (left, top), tile[0], line)

    bar_left = _MARGIN + tiles_width + 2 * _GAP
    ramp = np.linspace(high, low, tile[1])[:, None].repeat(_BAR_WIDTH, axis=1)
    canvas.paste(Image.fromarray(colorize(ramp, low, high)), (bar_left, tiles_top))
    draw.rectangle(
        (bar_left - 1, tiles_top - 1, bar_left + _BAR_WIDTH, tiles_top + tile[1]), outline=_INK
    )
    draw.text((bar_left, top), "score", fill=_INK, font=font)
    for value, where in ticks:
        text = _format_value(value)
        text_height = line - 4
        y = {
            "top": tiles_top,
            "middle": tiles_top + (tile[1] - text_height) // 2,
            "bottom": tiles_top + tile[1] - text_height - 2,
        }[where]
        draw.text((bar_left + _BAR_WIDTH + 4, y), text, fill=_INK, font=font)
    return np.asarray(canvas)


def stack_panels(panels: Sequence[np.ndarray], caption: str | None = None) -> np.ndarray:
    """Stack panels (e.g. from [`render_panel`][cncad.visualize.render_panel]) in one picture.

    Rows are left-aligned on a white background, narrower ones padded on the right; the
    caption, wrapped to the picture's width, goes below them.

    Args:
        panels: ``(H_i, W_i, 3)`` uint8 pictures, top to bottom.
        caption: Optional text under the rows (newlines start new lines).

    Returns:
        ``(H, W, 3)`` uint8 RGB.

    Raises:
        ValueError: No panels, or one that is not ``(H, W, 3)``.
        TypeError: A panel is not uint8, or the caption is not a string.
    """
    rows = [np.asarray(panel) for panel in panels]
    if not rows:
        raise ValueError("stack_panels needs at least one panel")
    for i, row in enumerate(rows):
        if row.dtype != np.uint8:
            raise TypeError(f"panel {i} must be uint8, got dtype {row.dtype}")
        if row.ndim != 3 or row.shape[2] != 3 or 0 in row.shape:
            raise ValueError(f"panel {i} must be (H, W, 3), got shape {row.shape}")
    if caption is not None and not isinstance(caption, str):
        raise TypeError(f"caption must be a string or None, got {type(caption).__name__}")
    width = max(row.shape[1] for row in rows)
    font = _font(12)
    line = _line_height(font)
    lines = _wrap(caption, font, width - 2 * _MARGIN) if caption else []
    height = sum(row.shape[0] for row in rows) + _GAP * (len(rows) - 1)
    height += len(lines) * line + (2 * _MARGIN if lines else 0)
    canvas = Image.new("RGB", (width, height), _BACKGROUND)
    y = 0
    for row in rows:
        canvas.paste(Image.fromarray(np.ascontiguousarray(row)), (0, y))
        y += row.shape[0] + _GAP
    draw = ImageDraw.Draw(canvas)
    y += _MARGIN - _GAP
    for text in lines:
        draw.text((_MARGIN, y), text, fill=_INK, font=font)
        y += line
    return np.asarray(canvas)


def save_panel(
    path: str | os.PathLike,
    image: np.ndarray,
    amap: np.ndarray,
    mask: np.ndarray | None = None,
    title: str | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    *,
    tile_height: int | None = None,
) -> Path:
    """Save [`render_panel`][cncad.visualize.render_panel]'s labelled row as a picture.

    The picture is drawn before the file is touched, and the file is replaced atomically
    (see [`atomic_write`][cncad.files.atomic_write]): a failure leaves an earlier file as
    it was.

    Args:
        path: Output file; its extension (normally ``.png``) chooses the format. Missing
            folders are created.
        image: ``(H, W, 3)`` (or ``(H, W)`` grey) uint8 image.
        amap: ``(H, W)`` anomaly map.
        mask: Optional ``(H, W)`` ground-truth mask; its tile is left out when None.
        title: Optional caption drawn above the tiles (e.g. the image score).
        vmin: Lower colour bound of the map.
        vmax: Upper colour bound of the map.
        tile_height: Tile height in pixels (see [`render_panel`][cncad.visualize.render_panel]).

    Returns:
        The path written.

    Raises:
        ValueError: The extension names no image format Pillow can write, or
            [`render_panel`][cncad.visualize.render_panel] refuses an input.
        TypeError: As [`render_panel`][cncad.visualize.render_panel].
    """
    picture = render_panel(image, amap, mask, title, vmin, vmax, tile_height=tile_height)
    return save_image_atomic(Image.fromarray(picture), path)
