"""Pictures of anomaly maps: colour-mapped heatmaps, overlays and comparison panels."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from cncad.files import save_image_atomic

__all__ = ["colorize", "overlay", "save_panel"]

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


def colorize(amap: np.ndarray, vmin: float | None = None, vmax: float | None = None) -> np.ndarray:
    """Colour-map an anomaly map.

    Args:
        amap: ``(H, W)`` scores.
        vmin: Score shown as the coldest colour (default: the map's minimum).
        vmax: Score shown as the hottest colour (default: the map's maximum). Pass fixed
            bounds to compare maps of different images on one scale.

    Returns:
        ``(H, W, 3)`` uint8 RGB.
    """
    amap = np.asarray(amap, dtype=np.float64)
    if amap.ndim != 2:
        raise ValueError(f"expected an (H, W) map, got shape {amap.shape}")
    low = float(amap.min()) if vmin is None else vmin
    high = float(amap.max()) if vmax is None else vmax
    t = np.clip((amap - low) / max(high - low, 1e-12), 0.0, 1.0)
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
        image: ``(H, W, 3)`` uint8 RGB image.
        amap: ``(H, W)`` anomaly map at the image's resolution.
        alpha: Weight of the heatmap.
        vmin: Lower colour bound (see [`colorize`][cncad.visualize.colorize]).
        vmax: Upper colour bound.

    Returns:
        ``(H, W, 3)`` uint8 RGB.
    """
    image = np.asarray(image)
    if image.shape[:2] != np.shape(amap):
        raise ValueError(f"image {image.shape[:2]} and map {np.shape(amap)} differ in size")
    heat = colorize(amap, vmin, vmax).astype(np.float64)
    blended = (1 - alpha) * image.astype(np.float64) + alpha * heat
    return blended.round().clip(0, 255).astype(np.uint8)


def save_panel(
    path: str | os.PathLike,
    image: np.ndarray,
    amap: np.ndarray,
    mask: np.ndarray | None = None,
    title: str | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
) -> Path:
    """Save image | ground truth | anomaly map | overlay side by side as a picture.

    The file is replaced atomically (see [`atomic_write`][cncad.files.atomic_write]): a
    failed save leaves an earlier file as it was.

    Args:
        path: Output file; its extension (normally ``.png``) chooses the format. Missing
            folders are created.
        image: ``(H, W, 3)`` uint8 RGB image.
        amap: ``(H, W)`` anomaly map.
        mask: Optional ``(H, W)`` ground-truth mask; its panel is left out when None.
        title: Optional caption drawn above the panels (e.g. the image score).
        vmin: Lower colour bound of the map.
        vmax: Upper colour bound of the map.

    Returns:
        The path written.

    Raises:
        ValueError: The extension names no image format Pillow can write.
    """
    tiles = [np.asarray(image, dtype=np.uint8)]
    if mask is not None:
        gray = (np.asarray(mask) > 0).astype(np.uint8) * 255
        tiles.append(np.repeat(gray[..., None], 3, axis=-1))
    tiles += [colorize(amap, vmin, vmax), overlay(image, amap, 0.5, vmin, vmax)]
    gap = 4
    height, width = tiles[0].shape[:2]
    caption = 14 if title else 0
    canvas = np.full(
        (height + caption, len(tiles) * width + (len(tiles) - 1) * gap, 3), 255, np.uint8
    )
    for i, tile in enumerate(tiles):
        canvas[caption:, i * (width + gap) : i * (width + gap) + width] = tile
    picture = Image.fromarray(canvas)
    if title:
        ImageDraw.Draw(picture).text((2, 1), title, fill=(0, 0, 0))
    return save_image_atomic(picture, path)
