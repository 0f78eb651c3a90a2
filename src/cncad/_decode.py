"""Image decoding with numpy and PIL only: the one home of cncad's reading rules.

Every input becomes an RGB image at its own size, with grey replicated, 16-bit data scaled
by the 16-bit range, alpha composited over black, and float pixels required to be finite
and in ``[0, 1]``. The public names are documented where they are re-exported,
[`cncad.data.transforms`][cncad.data.transforms] (which adds the torch tensors and the
model-side preprocessing) and [`cncad.data.stream`][cncad.data.stream];
[`cncad.deploy`][cncad.deploy], which runs without torch, builds on this module directly.
Nothing here imports torch.
"""

from __future__ import annotations

import math
import os
import re
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import numpy as np
from PIL import Image, UnidentifiedImageError

from cncad.errors import DatasetError, ImageReadError

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "DECODE_ERRORS",
    "IMAGE_EXTENSIONS",
    "DecodeFailure",
    "ImageReadError",
    "channels_first_shape",
    "check_float_range",
    "find_image_files",
    "float_bounds",
    "is_image_file",
    "is_torch_tensor",
    "iter_inputs",
    "load_image",
    "load_mask",
    "map_in_order",
    "rgb_arrays",
    "tensor_dtype_error",
    "to_float_images",
]

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
"""Per-channel RGB mean of the CLIP image encoder's training data."""

CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
"""Per-channel RGB standard deviation of the CLIP image encoder's training data."""

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
"""File extensions recognised as images (compared case-insensitively)."""

_UINT16_MAX = 65535

_Result = TypeVar("_Result")
_Object = TypeVar("_Object")


def _documented_in(module: str) -> Callable[[_Object], _Object]:
    """Name the public module that re-exports and documents an object as its ``__module__``.

    ``help``, ``inspect``, pickling and the API reference then point there (as numpy does
    for its re-exported functions); the code itself stays in this module.
    """

    def mark(obj: _Object) -> _Object:
        obj.__module__ = module
        return obj

    return mark


# --------------------------------------------------------------------------------------
# Finding image files
# --------------------------------------------------------------------------------------


@_documented_in("cncad.data.transforms")
def is_image_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` names an image file and is not a hidden file.

    Image file names end with one of
    [`IMAGE_EXTENSIONS`][cncad.data.transforms.IMAGE_EXTENSIONS].

    Hidden files (names starting with ``.``) are excluded so that macOS ``._name.png``
    resource forks and similar clutter are never mistaken for images.

    Args:
        path: A file path; only its name is inspected, the file system is not touched.

    Returns:
        ``True`` for names such as ``000.png`` or ``IMG_1.JPG``.
    """
    name = Path(path).name
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def find_image_files(root: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """The image files in a folder, sorted by their path relative to it.

    Hidden files and folders (names starting with ``.``) are skipped.

    Args:
        root: A folder.
        recursive: Whether to search its subfolders too.

    Returns:
        The image file paths (possibly none).
    """
    root = Path(root)
    if not recursive:
        return sorted(p for p in root.iterdir() if p.is_file() and is_image_file(p))
    found = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs if not d.startswith(".")]
        found.extend(Path(directory) / f for f in files if is_image_file(f))
    return sorted(found, key=lambda p: p.relative_to(root).parts)


# --------------------------------------------------------------------------------------
# Files and PIL images
# --------------------------------------------------------------------------------------


def open_image(path: str | os.PathLike, what: str = "image") -> Image.Image:
    """Open and fully decode a file, turning every decoder failure into ImageReadError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        with Image.open(path) as handle:
            handle.load()
            # Multi-frame files (TIFF stacks, animated images): the first frame is the image.
            return handle.copy()
    except Image.DecompressionBombError as error:
        raise ImageReadError(_decompression_bomb_message(path, what, error)) from error
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ImageReadError(f"cannot read {what} file {path}: {error}") from error


def _decompression_bomb_message(path: Path, what: str, error: Exception) -> str:
    """One line for PIL's refusal of an image with more than twice its pixel limit."""
    found = re.search(r"\((\d+) pixels\)", str(error))
    size = f"{int(found.group(1)):,} pixels" if found else "too many pixels"
    limit = Image.MAX_IMAGE_PIXELS
    limits = f"{2 * limit:,} (twice PIL's limit of {limit:,})" if limit else "PIL's limit"
    return (
        f"cannot read {what} file {path}: it has {size}, more than {limits}, and could be a "
        "decompression bomb; if the file is trusted, raise the limit in Python with "
        "PIL.Image.MAX_IMAGE_PIXELS = <pixels> (None removes it) before reading it"
    )


def rescale_to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map ``[low, high]`` linearly onto ``[0, 255]`` with rounding."""
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = (values.astype(np.float64) - low) * (255.0 / (high - low))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def composite_on_black(rgb_or_gray: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Premultiply by alpha, i.e. composite over a black background."""
    weight = alpha.astype(np.float64) / 255.0
    if rgb_or_gray.ndim == 3:
        weight = weight[..., None]
    return np.rint(rgb_or_gray.astype(np.float64) * weight).astype(np.uint8)


def pil_to_uint8(image: Image.Image) -> np.ndarray:
    """Decode any PIL mode to 8-bit pixels, keeping grey images single-channel.

    Returns:
        ``(H, W)`` uint8 for single-channel modes, ``(H, W, 3)`` uint8 otherwise.
    """
    mode = image.mode
    if mode == "1":
        return np.asarray(image.convert("L"))
    if mode == "L":
        return np.asarray(image)
    if mode.startswith("I;16"):
        return rescale_to_uint8(np.asarray(image), 0, _UINT16_MAX)
    if mode == "I":
        # Pillow stores 16-bit PNG/TIFF data as 32-bit "I" in some code paths; such data
        # lies in [0, 65535] and is scaled by that range. Any other int32 data has no
        # meaningful fixed range, so its own min/max is used.
        values = np.asarray(image)
        low, high = int(values.min()), int(values.max())
        if low >= 0 and high <= _UINT16_MAX:
            return rescale_to_uint8(values, 0, _UINT16_MAX)
        return rescale_to_uint8(values, low, high)
    if mode == "F":
        values = np.asarray(image)
        if not np.isfinite(values).all():
            bad = int(values.size - np.count_nonzero(np.isfinite(values)))
            raise ValueError(
                f"{bad} of its {values.size} float pixels are NaN or infinite; "
                "images must have finite pixel values"
            )
        low, high = float(values.min()), float(values.max())
        if low >= 0.0 and high <= 1.0:
            return rescale_to_uint8(values, 0.0, 1.0)
        return rescale_to_uint8(values, low, high)
    if mode in ("LA", "La"):
        values = np.asarray(image.convert("LA"))
        return composite_on_black(values[..., 0], values[..., 1])
    if mode == "P" and "transparency" not in image.info:
        return np.asarray(image.convert("RGB"))
    if mode in ("RGBA", "RGBa", "PA", "P"):
        values = np.asarray(image.convert("RGBA"))
        return composite_on_black(values[..., :3], values[..., 3])
    if mode == "RGB":
        return np.asarray(image)
    # CMYK, YCbCr, RGBX, LAB, HSV, ...: Pillow's own conversion to RGB.
    return np.asarray(image.convert("RGB"))


def gray_to_rgb(values: np.ndarray) -> np.ndarray:
    """``(H, W)`` -> ``(H, W, 3)`` by replication; ``(H, W, 3)`` unchanged."""
    return np.repeat(values[..., None], 3, axis=-1) if values.ndim == 2 else values


def pil_to_rgb(image: Image.Image, source: str) -> Image.Image:
    """Any PIL image as an 8-bit RGB PIL image (``source`` names it in errors)."""
    try:
        values = pil_to_uint8(image)
    except (OSError, ValueError) as error:
        raise ImageReadError(
            f"cannot convert {source} (mode {image.mode!r}) to RGB: {error}"
        ) from error
    return Image.fromarray(np.ascontiguousarray(gray_to_rgb(values)), mode="RGB")


@_documented_in("cncad.data.transforms")
def load_image(path: str | os.PathLike) -> Image.Image:
    """Read an image file as an 8-bit RGB PIL image.

    Every colour mode is converted the same way:

    * grey (``L``, ``1``) is replicated to three channels;
    * 16-bit grey (``I;16*``, and ``I`` holding values in ``[0, 65535]``) is scaled by the
      full 16-bit range (``v * 255 / 65535``), never clipped, so relative intensities are
      kept; other 32-bit integer or float data is scaled by its own min/max (float data
      already in ``[0, 1]`` is scaled by 255);
    * images with transparency (``RGBA``, ``LA``, ``PA``, palette with a transparent
      colour) are composited over black, i.e. colours are premultiplied by alpha. Fully
      opaque images are unchanged; fully transparent pixels become black, whatever colour
      they stored;
    * palette, CMYK, YCbCr and other modes use Pillow's conversion to RGB.

    EXIF orientation tags are deliberately ignored: ground-truth masks are drawn on the
    stored pixel grid, and rotating the image but not its mask would misalign them. Only
    the first frame of a multi-frame file is read.

    Args:
        path: Path of a PNG, JPEG, BMP, TIFF or any other format Pillow decodes.

    Returns:
        A PIL image in mode ``RGB`` of the file's own size ``(W, H)``, detached from the
        file.

    Raises:
        FileNotFoundError: If ``path`` is not an existing file.
        ImageReadError: If the file cannot be decoded (the message names the file), has
            float pixels that are NaN or infinite, or has more than twice
            ``PIL.Image.MAX_IMAGE_PIXELS`` pixels (a possible decompression bomb; the
            message says how to raise the limit for a trusted file). Between one and two
            times the limit, Pillow's ``DecompressionBombWarning`` is emitted and the image
            is read.
    """
    return pil_to_rgb(open_image(path, "image"), str(path))


@_documented_in("cncad.data.transforms")
def load_mask(path: str | os.PathLike, threshold: int = 0) -> np.ndarray:
    """Read a ground-truth mask file as a boolean array.

    The mask is decoded to 8-bit values exactly as [`load_image`][cncad.data.transforms.load_image]
    decodes images (16-bit masks scaled by the 16-bit range, alpha composited over black); colour
    masks are reduced by taking the maximum over the RGB channels, so an annotation drawn in any
    colour counts. A pixel is defective when its value is strictly greater than
    ``threshold``.

    The default ``threshold=0`` marks every non-black pixel, which is right for masks
    stored as 0/255 or as label indices (0/1/2, ...). Masks saved with anti-aliased or
    JPEG-blurred edges contain intermediate grey values around each defect; use
    ``threshold=127`` to keep only pixels that are at least half on.

    Args:
        path: Path of the mask image.
        threshold: Pixels with 8-bit value ``> threshold`` are ``True``; in ``[0, 254]``.

    Returns:
        ``(H, W)`` bool array at the mask file's own resolution.

    Raises:
        FileNotFoundError: If ``path`` is not an existing file.
        ImageReadError: If the file cannot be decoded.
        ValueError: If ``threshold`` is outside ``[0, 254]``.
    """
    if not 0 <= threshold <= 254:
        raise ValueError(f"threshold must be in [0, 254], got {threshold}")
    image = open_image(path, "mask")
    try:
        values = pil_to_uint8(image)
    except (OSError, ValueError) as error:
        message = f"cannot convert mask {path} (mode {image.mode!r}): {error}"
        raise ImageReadError(message) from error
    if values.ndim == 3:
        values = values.max(axis=-1)
    return values > threshold


# --------------------------------------------------------------------------------------
# In-memory inputs: the rules shared by numpy arrays and torch tensors
# --------------------------------------------------------------------------------------


def _check_not_empty(height: int, width: int, what: str) -> None:
    if height == 0 or width == 0:
        raise ValueError(f"{what} has an empty spatial size ({height}x{width})")


def float_bounds(values: np.ndarray) -> tuple[float, float]:
    """``(min, max)`` of float pixels; ``(nan, nan)`` when any is NaN or infinite."""
    if not np.isfinite(values).all():
        return math.nan, math.nan
    return float(values.min()), float(values.max())


def check_float_range(low: float, high: float, what: str) -> None:
    """Refuse float pixels whose bounds (from ``float_bounds``) are not within ``[0, 1]``.

    Raises:
        ValueError: One line naming ``what``: NaN or infinite values, or the range found.
    """
    if low >= 0.0 and high <= 1.0:
        return
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"{what} has NaN or infinite values; images must have finite pixel values")
    raise ValueError(
        f"{what} has float values in [{low:.4g}, {high:.4g}], outside [0, 1]; float images "
        "must be scaled to [0, 1] (pass uint8 data for 0-255 values)"
    )


def channels_first_shape(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """``(C, H, W)`` of one channels-first image (an ``HxW`` one given as ``1xHxW``), checked.

    Raises:
        ValueError: Other than 3 dimensions, ``C`` not 1 or 3, or an empty image.
    """
    shape = tuple(shape)
    if len(shape) != 3:
        raise ValueError(f"image tensors must be HxW, CxHxW or BxCxHxW, got shape {shape}")
    channels, height, width = shape
    if channels not in (1, 3):
        raise ValueError(
            f"image tensors must have 1 or 3 channels (channels first), got shape {shape}"
        )
    _check_not_empty(height, width, "image tensor")
    return channels, height, width


def tensor_dtype_error(dtype: object) -> TypeError:
    """The error for a channels-first image of a dtype other than uint8 or float."""
    return TypeError(f"image tensors must be uint8 or floating point in [0, 1], got dtype {dtype}")


def _channels_last_images(array: np.ndarray) -> list[np.ndarray]:
    """A channels-last numpy image (or NHWC batch) as RGB images, see ``rgb_arrays``."""
    if array.ndim == 4:
        return [image for item in array for image in _channels_last_images(item)]
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3:
        raise ValueError(
            f"numpy images must be HxW, HxWxC or NxHxWxC (channels last), got shape {array.shape}"
        )
    height, width, channels = array.shape
    if channels not in (1, 3, 4):
        raise ValueError(
            f"numpy images must have 1, 3 or 4 channels in the last axis, got shape "
            f"{array.shape} (channels-first arrays are not accepted: use a torch tensor)"
        )
    _check_not_empty(height, width, "numpy image")
    if array.dtype == np.uint8:
        values = array
    elif array.dtype == np.uint16:
        values = rescale_to_uint8(array, 0, _UINT16_MAX)
    elif np.issubdtype(array.dtype, np.floating):
        check_float_range(*float_bounds(array), "numpy image")
        # Keep full float precision rather than quantising through uint8.
        floats = np.ascontiguousarray(array, dtype=np.float32).transpose(2, 0, 1)
        if channels == 4:
            floats = floats[:3] * floats[3:]
        elif channels == 1:
            floats = np.broadcast_to(floats, (3, height, width))
        return [np.ascontiguousarray(floats)]
    else:
        raise TypeError(
            f"numpy images must be uint8, uint16 or float in [0, 1], got dtype {array.dtype}"
        )
    if channels == 4:
        values = composite_on_black(values[..., :3], values[..., 3])
    elif channels == 1:
        values = np.repeat(values, 3, axis=-1)
    return [values]


def rgb_arrays(item: Any) -> list[np.ndarray]:
    """A path, PIL image or channels-last numpy array as RGB images at their own size.

    Integer data (files, PIL images, uint8 and uint16 arrays) comes back as ``(H, W, 3)``
    uint8 pixels; float arrays as ``(3, H, W)`` float32 in ``[0, 1]``, unquantised. The
    caller turns them into its own float images (numpy or torch) and handles tensors.

    Args:
        item: A path, a PIL image or a numpy array (``HxW``, ``HxWxC`` or ``NxHxWxC``
            with ``C`` in ``{1, 3, 4}``; uint8, uint16 or float in ``[0, 1]``).

    Returns:
        One array per image (batches are split).

    Raises:
        TypeError: A torch tensor, or any error of ``to_float_images`` (which also takes
            tensors).
    """
    if isinstance(item, (str, os.PathLike)):
        return [np.asarray(load_image(item))]
    if isinstance(item, Image.Image):
        return [np.asarray(pil_to_rgb(item, "PIL image"))]
    if isinstance(item, np.ndarray):
        return _channels_last_images(item)
    raise TypeError(
        "expected a path, a PIL image, a numpy array, a torch tensor or a list of these, "
        f"got {type(item).__name__}"
    )


def is_torch_tensor(value: Any) -> bool:
    """Whether ``value`` is a torch tensor, without importing torch.

    A tensor exists only once torch is imported, so torch is looked up among the imported
    modules.
    """
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


# --------------------------------------------------------------------------------------
# In-memory inputs as numpy float images (the runtime without torch)
# --------------------------------------------------------------------------------------


def uint8_to_float(values: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` uint8 -> ``(3, H, W)`` float32 in ``[0, 1]`` (as torch's ``/ 255``)."""
    chw = np.ascontiguousarray(values.transpose(2, 0, 1))
    return chw.astype(np.float32) / np.float32(255.0)


def _channels_first_to_float(array: np.ndarray) -> list[np.ndarray]:
    """A channels-first image (``HxW``, ``CxHxW``, ``BxCxHxW``, from a tensor) as RGB floats."""
    if array.ndim == 4:
        return [image for item in array for image in _channels_first_to_float(item)]
    if array.ndim == 2:
        array = array[None]
    channels, height, width = channels_first_shape(array.shape)
    if array.dtype == np.uint8:
        floats = array.astype(np.float32) / np.float32(255.0)
    elif np.issubdtype(array.dtype, np.floating):
        check_float_range(*float_bounds(array), "image tensor")
        floats = array.astype(np.float32)
    else:
        raise tensor_dtype_error(array.dtype)
    if channels == 1:
        floats = np.broadcast_to(floats, (3, height, width))
    return [np.ascontiguousarray(floats)]


def to_float_images(item: Any) -> list[np.ndarray]:
    """One input as RGB float32 images ``(3, H, W)`` in ``[0, 1]``, each at its own size.

    Args:
        item: A path, a PIL image, a channels-last numpy array (``HxW``, ``HxWxC``,
            ``NxHxWxC``; uint8, uint16 or float in ``[0, 1]``) or a channels-first torch
            tensor (``HxW``, ``CxHxW``, ``BxCxHxW``; uint8 or float in ``[0, 1]``).

    Returns:
        One array per image (batches are split).

    Raises:
        TypeError: An unsupported type or dtype.
        ValueError: A wrong number of dimensions or channels, an empty image, or float
            values that are not finite or outside ``[0, 1]``.
        FileNotFoundError: A path that does not exist.
        ImageReadError: A file or PIL image that cannot be decoded.
    """
    if is_torch_tensor(item):
        return _channels_first_to_float(item.detach().cpu().numpy())
    return [
        uint8_to_float(image) if image.dtype == np.uint8 else image for image in rgb_arrays(item)
    ]


# --------------------------------------------------------------------------------------
# Streams of inputs
# --------------------------------------------------------------------------------------


@_documented_in("cncad.deploy")
class DecodeFailure(NamedTuple):
    """An input that could not be read or converted (with ``on_error="skip"``).

    Attributes:
        index: Position in the input stream.
        source: The file path when the input was one, else None.
        reason: One line: the error's type and message.
    """

    index: int
    source: str | None
    reason: str


DECODE_ERRORS: tuple[type[Exception], ...] = (OSError, ImageReadError, TypeError, ValueError)
"""What reading or converting one input may raise: ``on_error="skip"`` reports these as a
``DecodeFailure`` and lets any other error through."""


@_documented_in("cncad.data.stream")
def iter_inputs(images: Any) -> Iterator[Any]:
    """The single images of ``images``, lazily, in order.

    Args:
        images: A folder (its image files, searched recursively, sorted by relative path),
            one image (a path, PIL image, ``HxW[xC]`` array or ``[C]xHxW`` tensor), a 4-D
            array or tensor (split into images), or any iterable of these.

    Yields:
        One image input at a time (folders expanded into their files).

    Raises:
        DatasetError: A folder without image files.
    """
    if isinstance(images, (str, os.PathLike)):
        path = Path(images)
        if path.is_dir():
            found = find_image_files(path)
            if not found:
                raise DatasetError(
                    f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found in directory {path}"
                )
            yield from found
        else:
            yield path
        return
    if isinstance(images, np.ndarray) or is_torch_tensor(images):
        if images.ndim == 4:
            yield from images
        else:
            yield images
        return
    if isinstance(images, Iterable) and not isinstance(images, Image.Image):
        for item in images:
            if (isinstance(item, np.ndarray) or is_torch_tensor(item)) and item.ndim == 4:
                yield from item
            else:
                yield item
        return
    yield images


def map_in_order(
    function: Callable[[int, Any], _Result], items: Iterable[Any], workers: int, window: int
) -> Iterator[_Result]:
    """``function(index, item)`` for each item, on ``workers`` threads, results in order.

    With ``workers == 0`` each item is handled on the calling thread when its result is
    asked for. Otherwise at most ``window`` items are handled ahead of the consumer; one
    that stops early (or an error) cancels what is still queued.

    Args:
        function: Called with the item's position (0-based) and the item.
        items: Any iterable, read lazily.
        workers: Threads; 0 for none.
        window: How many results may wait for the consumer (``>= 1``).

    Yields:
        The results, in the order of ``items``.
    """
    inputs = enumerate(items)
    if workers == 0:
        for index, item in inputs:
            yield function(index, item)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cncad-decode") as pool:
        pending: deque[Future[_Result]] = deque()
        try:
            for index, item in inputs:
                pending.append(pool.submit(function, index, item))
                if len(pending) >= window:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:  # a consumer that stops early (or an error) leaves no work running
            for future in pending:
                future.cancel()
