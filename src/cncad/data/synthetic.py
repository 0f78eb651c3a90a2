"""Synthetic industrial images with pixel-exact defect masks, for tests, demos and docs.

Three classes imitate the kinds found in MVTec AD:

* ``carpet_like``: a woven texture of alternating warp and weft threads;
* ``sand_like``: a stochastic granular texture;
* ``bolt_like``: a round metal part (a washer with concentric grooves) on a background.

Normal images vary from one to the next (pattern phase, object position and size,
brightness, illumination gradient, sensor noise), so a detector cannot simply memorise
one image. Three defect kinds are drawn on top, each with its exact mask:

* ``scratch``: a thin bright or dark line;
* ``stain``: a dark, tinted blob made of overlapping discs;
* ``missing``: a piece cut out (a hole in textures, a chunk bitten out of the part).

Everything is numpy and Pillow; a hundred 64x64 images take well under a second.
"""

from __future__ import annotations

import os
import shutil
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from cncad.files import atomic_write

__all__ = [
    "DEFECT_TYPES",
    "SYNTHETIC_CATEGORIES",
    "make_synthetic_dataset",
    "synthetic_sample",
]

SYNTHETIC_CATEGORIES: tuple[str, ...] = ("carpet_like", "sand_like", "bolt_like")
"""Names of the synthetic image classes."""

DEFECT_TYPES: tuple[str, ...] = ("scratch", "stain", "missing")
"""Names of the synthetic defect kinds."""

_MIN_SIZE = 16
_MAX_DEFECT_TRIES = 20


class _Scene:
    """A defect-free rendering: float RGB in [0, 1] plus what defects need to know.

    Attributes:
        image: ``(H, W, 3)`` float64 image without sensor noise.
        surface: ``(H, W)`` bool, where defects may be placed (the object or the texture).
        background: ``(H, W, 3)`` what shows through where a piece is missing.
        center: ``(y, x)`` of the object (image centre for textures).
        radius: Object radius in pixels (half the image size for textures).
    """

    def __init__(
        self,
        image: np.ndarray,
        surface: np.ndarray,
        background: np.ndarray,
        center: tuple[float, float],
        radius: float,
    ) -> None:
        self.image = image
        self.surface = surface
        self.background = background
        self.center = center
        self.radius = radius


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates ``(yy, xx)``, each ``(size, size)`` float64."""
    axis = np.arange(size, dtype=np.float64) + 0.5
    return np.meshgrid(axis, axis, indexing="ij")


def _smooth_noise(size: int, cells: int, rng: np.random.Generator) -> np.ndarray:
    """Band-limited noise in about [-1, 1]: a ``cells x cells`` grid upsampled bicubically."""
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    upsampled = Image.fromarray(coarse, mode="F").resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(upsampled, dtype=np.float64) / 1.5


def _illumination(size: int, rng: np.random.Generator) -> np.ndarray:
    """A gentle random linear lighting gradient times a global brightness, ``(H, W, 1)``."""
    yy, xx = _grid(size)
    angle = rng.uniform(0.0, 2.0 * np.pi)
    ramp = (np.cos(angle) * xx + np.sin(angle) * yy) / size - 0.5
    brightness = rng.uniform(0.9, 1.1)
    return (brightness * (1.0 + 0.08 * ramp))[..., None]


def _render_carpet(size: int, rng: np.random.Generator) -> _Scene:
    period = size / 8.0
    yy, xx = _grid(size)
    u = (xx + rng.uniform(0.0, period)) / period
    v = (yy + rng.uniform(0.0, period)) / period
    # Each cell shows either the vertical (warp) or the horizontal (weft) threads on top,
    # in a checkerboard: the basic plain weave.
    warp_on_top = (np.floor(u) + np.floor(v)) % 2 == 0
    warp = 0.55 + 0.45 * np.sin(np.pi * ((2.0 * u) % 1.0))
    weft = 0.55 + 0.45 * np.sin(np.pi * ((2.0 * v) % 1.0))
    pattern = np.where(warp_on_top, warp, weft) + 0.05 * _smooth_noise(size, 6, rng)
    colour = np.array([0.66, 0.36, 0.27]) + rng.normal(0.0, 0.015, 3)
    image = pattern[..., None] * colour * _illumination(size, rng)
    hole = np.full_like(image, 0.05)
    surface = np.ones((size, size), dtype=bool)
    return _Scene(image, surface, hole, (size / 2.0, size / 2.0), size / 2.0)


def _render_sand(size: int, rng: np.random.Generator) -> _Scene:
    grains = (
        0.5 * _smooth_noise(size, max(size // 4, 2), rng)
        + 0.3 * _smooth_noise(size, max(size // 2, 2), rng)
        + 0.2 * rng.standard_normal((size, size))
    )
    colour = np.array([0.74, 0.67, 0.52]) + rng.normal(0.0, 0.015, 3)
    image = (0.82 + 0.16 * grains)[..., None] * colour * _illumination(size, rng)
    hole = np.full_like(image, 0.06)
    surface = np.ones((size, size), dtype=bool)
    return _Scene(image, surface, hole, (size / 2.0, size / 2.0), size / 2.0)


def _render_bolt(size: int, rng: np.random.Generator) -> _Scene:
    yy, xx = _grid(size)
    center = (size / 2.0 + rng.normal(0.0, 0.03 * size), size / 2.0 + rng.normal(0.0, 0.03 * size))
    outer = size * 0.32 * rng.uniform(0.97, 1.03)
    inner = outer * 0.38
    dy, dx = yy - center[0], xx - center[1]
    distance = np.hypot(dy, dx)

    background = (0.2 + 0.06 * (yy / size))[..., None] * np.array([0.95, 1.0, 1.05])
    background = background * _illumination(size, rng)

    # One-pixel-wide soft edges, so the part looks rendered rather than pasted.
    coverage = np.clip(outer - distance + 0.5, 0.0, 1.0) * np.clip(distance - inner + 0.5, 0.0, 1.0)
    light = rng.uniform(0.0, 2.0 * np.pi)
    facing = np.cos(np.arctan2(dy, dx) - light) * distance / outer
    grooves = np.sin(2.0 * np.pi * distance / (outer / 5.0))
    metal = 0.62 + 0.18 * facing + 0.06 * grooves
    part = metal[..., None] * np.array([0.92, 0.95, 1.0])

    image = coverage[..., None] * part + (1.0 - coverage[..., None]) * background
    surface = coverage > 0.5
    return _Scene(image, surface, background, center, outer)


_RENDERERS: dict[str, Callable[[int, np.random.Generator], _Scene]] = {
    "carpet_like": _render_carpet,
    "sand_like": _render_sand,
    "bolt_like": _render_bolt,
}


def _draw(size: int, paint: Callable[[ImageDraw.ImageDraw], None]) -> np.ndarray:
    canvas = Image.new("L", (size, size), 0)
    paint(ImageDraw.Draw(canvas))
    return np.asarray(canvas) > 0


def _point_on_surface(scene: _Scene, rng: np.random.Generator, margin: float) -> np.ndarray:
    """A random ``(x, y)`` on the part (or anywhere but the border, for textures)."""
    candidates = np.argwhere(scene.surface)
    size = scene.surface.shape[0]
    inside = np.all((candidates >= margin) & (candidates < size - margin), axis=1)
    if inside.any():
        candidates = candidates[inside]
    y, x = candidates[rng.integers(len(candidates))]
    return np.array([x + 0.5, y + 0.5])


def _scratch(scene: _Scene, rng: np.random.Generator) -> np.ndarray:
    size = scene.surface.shape[0]
    middle = _point_on_surface(scene, rng, margin=size * 0.15)
    angle = rng.uniform(0.0, np.pi)
    half = 0.5 * rng.uniform(0.5, 1.0) * scene.radius
    offset = half * np.array([np.cos(angle), np.sin(angle)])
    start, end = middle - offset, middle + offset
    width = max(1, round(size / 48))
    mask = _draw(size, lambda d: d.line([tuple(start), tuple(end)], fill=255, width=width))
    mask &= scene.surface
    local_mean = scene.image[mask].mean() if mask.any() else 0.5
    tone = 0.95 if local_mean < 0.5 else 0.08
    scene.image[mask] = 0.2 * scene.image[mask] + 0.8 * tone
    return mask


def _stain(scene: _Scene, rng: np.random.Generator) -> np.ndarray:
    size = scene.surface.shape[0]
    middle = _point_on_surface(scene, rng, margin=size * 0.15)
    blobs = []
    for _ in range(rng.integers(3, 6)):
        radius = size * rng.uniform(0.035, 0.08)
        x, y = middle + rng.normal(0.0, size * 0.04, 2)
        blobs.append((x - radius, y - radius, x + radius, y + radius))
    mask = _draw(size, lambda d: [d.ellipse(box, fill=255) for box in blobs])
    mask &= scene.surface
    tint = np.array([0.55, 0.42, 0.28]) * rng.uniform(0.7, 1.0)
    scene.image[mask] = scene.image[mask] * tint
    return mask


def _missing(scene: _Scene, rng: np.random.Generator) -> np.ndarray:
    size = scene.surface.shape[0]
    if scene.radius < size / 2.0:
        # A round chunk bitten out of the part's rim.
        angle = rng.uniform(0.0, 2.0 * np.pi)
        cy = scene.center[0] + scene.radius * np.sin(angle)
        cx = scene.center[1] + scene.radius * np.cos(angle)
        bite = scene.radius * rng.uniform(0.3, 0.45)
        box = (cx - bite, cy - bite, cx + bite, cy + bite)
        mask = _draw(size, lambda d: d.ellipse(box, fill=255))
    else:
        # An irregular polygonal hole in the texture.
        middle = _point_on_surface(scene, rng, margin=size * 0.2)
        corners = rng.integers(4, 7)
        angles = np.sort(rng.uniform(0.0, 2.0 * np.pi, corners))
        radii = size * rng.uniform(0.07, 0.14, corners)
        offsets = radii[:, None] * np.stack([np.cos(angles), np.sin(angles)], axis=1)
        points = [tuple(point) for point in middle + offsets]
        mask = _draw(size, lambda d: d.polygon(points, fill=255))
    mask &= scene.surface
    scene.image[mask] = scene.background[mask]
    return mask


_DEFECTS: dict[str, Callable[[_Scene, np.random.Generator], np.ndarray]] = {
    "scratch": _scratch,
    "stain": _stain,
    "missing": _missing,
}


def _as_generator(rng: np.random.Generator | int | None) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def synthetic_sample(
    category: str,
    defect: str | None = None,
    size: int = 64,
    rng: np.random.Generator | int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Render one synthetic image and its ground-truth mask in memory.

    Args:
        category: One of [`SYNTHETIC_CATEGORIES`][cncad.data.synthetic.SYNTHETIC_CATEGORIES].
        defect: One of [`DEFECT_TYPES`][cncad.data.synthetic.DEFECT_TYPES], or ``None`` for a normal
            image.
        size: Side length in pixels (at least 16).
        rng: A numpy generator, an int seed, or ``None`` for fresh OS entropy. The same
            seed gives the same image.

    Returns:
        ``(image, mask)``: ``(size, size, 3)`` uint8 RGB image and ``(size, size)`` bool
        mask, all ``False`` for a normal image and never empty for a defective one.

    Raises:
        ValueError: For an unknown category or defect, or ``size < 16``.
    """
    if category not in _RENDERERS:
        raise ValueError(f"unknown category {category!r}; choose from {SYNTHETIC_CATEGORIES}")
    if defect is not None and defect not in _DEFECTS:
        raise ValueError(f"unknown defect {defect!r}; choose from {DEFECT_TYPES} or None")
    if size < _MIN_SIZE:
        raise ValueError(f"size must be at least {_MIN_SIZE}, got {size}")
    generator = _as_generator(rng)
    scene = _RENDERERS[category](size, generator)
    mask = np.zeros((size, size), dtype=bool)
    if defect is not None:
        for _ in range(_MAX_DEFECT_TRIES):
            mask = _DEFECTS[defect](scene, generator)
            if mask.any():
                break
        else:  # pragma: no cover - needs an object smaller than any defect at size >= 16
            raise RuntimeError(f"could not place a {defect} on {category} at size {size}")
    sensor_noise = generator.normal(0.0, 0.015, (size, size, 1)) + generator.normal(
        0.0, 0.006, (size, size, 3)
    )
    image = np.clip(np.rint((scene.image + sensor_noise) * 255.0), 0, 255).astype(np.uint8)
    return image, mask


def _stable_id(name: str) -> int:
    # Python's hash() is salted per process; CRC32 keeps seeds identical across runs.
    return zlib.crc32(name.encode("utf-8"))


def _sample_rng(seed: int, category: str, group: str, index: int) -> np.random.Generator:
    """An independent stream per image, so changing one count leaves other images unchanged."""
    return np.random.default_rng([seed, _stable_id(category), _stable_id(group), index])


def _save_png(array: np.ndarray, path: Path) -> None:
    with atomic_write(path, "wb") as handle:
        Image.fromarray(array).save(handle, format="PNG", compress_level=1)


def make_synthetic_dataset(
    root: str | os.PathLike,
    categories: Sequence[str] = ("carpet_like", "bolt_like"),
    n_train: int = 16,
    n_test_good: int = 4,
    n_test_defect: int = 8,
    image_size: int = 64,
    seed: int = 0,
    defect_types: Sequence[str] = DEFECT_TYPES,
    overwrite: bool = False,
) -> Path:
    """Write a synthetic dataset in the MVTec AD folder layout.

    The tree written under ``root``, per category::

        <category>/train/good/000.png ...                  n_train normal images
        <category>/test/good/000.png ...                   n_test_good normal images
        <category>/test/<defect>/000.png ...               n_test_defect in total
        <category>/ground_truth/<defect>/000_mask.png ...  0/255 masks

    Defective images cycle through ``defect_types`` (with 8 images and 3 kinds: 3
    scratches, 3 stains, 2 missing pieces). Every image is drawn from its own random
    stream derived from ``(seed, category, folder, index)``, so the output is byte-for-byte
    reproducible and, for example, adding a category or more training images does not
    change the other files.

    Args:
        root: Output folder (created if needed); pass it to
            [`AnomalyFolder`][cncad.data.folder.AnomalyFolder].
        categories: Names from [`SYNTHETIC_CATEGORIES`][cncad.data.synthetic.SYNTHETIC_CATEGORIES].
        n_train: Normal training images per category.
        n_test_good: Normal test images per category.
        n_test_defect: Defective test images per category, over all defect kinds.
        image_size: Side length of the square images (at least 16).
        seed: Seed of the whole dataset.
        defect_types: Defect kinds to use, from [`DEFECT_TYPES`][cncad.data.synthetic.DEFECT_TYPES].
        overwrite: Delete ``<root>/<category>`` first if it already exists. Without it an
            existing non-empty category folder raises ``FileExistsError``, so a dataset is
            never silently mixed with leftovers of a previous one.

    Returns:
        ``Path(root)``.

    Raises:
        ValueError: For unknown category or defect names, negative counts or a too small
            ``image_size``.
        FileExistsError: If a category folder exists, is not empty and ``overwrite`` is
            false.

    Examples:
        >>> root = make_synthetic_dataset("/tmp/synthetic", categories=["sand_like"])
        >>> sorted(p.name for p in (root / "sand_like" / "test").iterdir())
        ['good', 'missing', 'scratch', 'stain']
    """
    unknown = [name for name in categories if name not in _RENDERERS]
    unknown += [name for name in defect_types if name not in _DEFECTS]
    if unknown or isinstance(categories, str):
        raise ValueError(
            f"unknown names {unknown or [categories]}: categories must be a sequence of "
            f"{SYNTHETIC_CATEGORIES}, defect_types of {DEFECT_TYPES}"
        )
    if min(n_train, n_test_good, n_test_defect) < 0:
        raise ValueError("image counts must not be negative")
    if n_test_defect > 0 and not defect_types:
        raise ValueError("defect_types is empty but n_test_defect > 0")
    if image_size < _MIN_SIZE:
        raise ValueError(f"image_size must be at least {_MIN_SIZE}, got {image_size}")

    root = Path(root)
    for category in categories:
        category_dir = root / category
        if category_dir.exists() and any(category_dir.iterdir()):
            if not overwrite:
                raise FileExistsError(
                    f"{category_dir} already exists and is not empty; pass overwrite=True "
                    "to replace it"
                )
            shutil.rmtree(category_dir)

    for category in categories:
        category_dir = root / category
        normal_groups = (("train", n_train), ("test", n_test_good))
        for split, count in normal_groups:
            folder = category_dir / split / "good"
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                rng = _sample_rng(seed, category, f"{split}/good", index)
                image, _ = synthetic_sample(category, None, image_size, rng)
                _save_png(image, folder / f"{index:03d}.png")

        per_defect_index = dict.fromkeys(defect_types, 0)
        for position in range(n_test_defect):
            defect = defect_types[position % len(defect_types)]
            index = per_defect_index[defect]
            per_defect_index[defect] += 1
            image_dir = category_dir / "test" / defect
            mask_dir = category_dir / "ground_truth" / defect
            image_dir.mkdir(parents=True, exist_ok=True)
            mask_dir.mkdir(parents=True, exist_ok=True)
            rng = _sample_rng(seed, category, f"test/{defect}", index)
            image, mask = synthetic_sample(category, defect, image_size, rng)
            _save_png(image, image_dir / f"{index:03d}.png")
            _save_png(mask.astype(np.uint8) * 255, mask_dir / f"{index:03d}_mask.png")
    return root
