"""Image and mask loading and preprocessing, in one place.

Every image that reaches the model goes through the same two steps:

1. [`to_image_tensor`][cncad.data.transforms.to_image_tensor] (or
   [`load_image`][cncad.data.transforms.load_image] for a file) turns whatever the user has (a path,
   a PIL image, a numpy array, a tensor, a list of those) into RGB float tensors of shape
   ``(3, H, W)`` with values in ``[0, 1]``, each at its own original size.
2. [`preprocess`][cncad.data.transforms.preprocess] resizes a batch to the model's square input size
   (bilinear with antialiasing) and applies the CLIP mean/std normalisation.

The datasets in [`cncad.data.folder`][cncad.data.folder] and the detector both call these functions,
so training and inference see identical pixels.
"""

from __future__ import annotations

import operator
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from cncad.errors import CNCADError

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "IMAGE_EXTENSIONS",
    "ImageInput",
    "ImageReadError",
    "denormalize",
    "is_image_file",
    "load_image",
    "load_mask",
    "preprocess",
    "resize_mask",
    "to_image_tensor",
]

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
"""Per-channel RGB mean of the CLIP image encoder's training data."""

CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
"""Per-channel RGB standard deviation of the CLIP image encoder's training data."""

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
"""File extensions recognised as images (compared case-insensitively)."""

ImageInput = str | os.PathLike | Image.Image | np.ndarray | Tensor
"""One image in any form accepted by [`to_image_tensor`][cncad.data.transforms.to_image_tensor]."""

_UINT16_MAX = 65535


class ImageReadError(CNCADError, ValueError):
    """An image or mask file exists but cannot be decoded (corrupt, truncated, unsupported)."""


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


# --------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------


def _open(path: str | os.PathLike, what: str) -> Image.Image:
    """Open and fully decode a file, turning every decoder failure into ImageReadError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        with Image.open(path) as handle:
            handle.load()
            # Multi-frame files (TIFF stacks, animated images): the first frame is the image.
            return handle.copy()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ImageReadError(f"cannot read {what} file {path}: {error}") from error


def _rescale_to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map ``[low, high]`` linearly onto ``[0, 255]`` with rounding."""
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = (values.astype(np.float64) - low) * (255.0 / (high - low))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _composite_on_black(rgb_or_gray: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Premultiply by alpha, i.e. composite over a black background."""
    weight = alpha.astype(np.float64) / 255.0
    if rgb_or_gray.ndim == 3:
        weight = weight[..., None]
    return np.rint(rgb_or_gray.astype(np.float64) * weight).astype(np.uint8)


def _pil_to_uint8(image: Image.Image) -> np.ndarray:
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
        return _rescale_to_uint8(np.asarray(image), 0, _UINT16_MAX)
    if mode == "I":
        # Pillow stores 16-bit PNG/TIFF data as 32-bit "I" in some code paths; such data
        # lies in [0, 65535] and is scaled by that range. Any other int32 data has no
        # meaningful fixed range, so its own min/max is used.
        values = np.asarray(image)
        low, high = int(values.min()), int(values.max())
        if low >= 0 and high <= _UINT16_MAX:
            return _rescale_to_uint8(values, 0, _UINT16_MAX)
        return _rescale_to_uint8(values, low, high)
    if mode == "F":
        values = np.asarray(image)
        low, high = float(np.nanmin(values)), float(np.nanmax(values))
        if low >= 0.0 and high <= 1.0:
            return _rescale_to_uint8(values, 0.0, 1.0)
        return _rescale_to_uint8(values, low, high)
    if mode in ("LA", "La"):
        values = np.asarray(image.convert("LA"))
        return _composite_on_black(values[..., 0], values[..., 1])
    if mode == "P" and "transparency" not in image.info:
        return np.asarray(image.convert("RGB"))
    if mode in ("RGBA", "RGBa", "PA", "P"):
        values = np.asarray(image.convert("RGBA"))
        return _composite_on_black(values[..., :3], values[..., 3])
    if mode == "RGB":
        return np.asarray(image)
    # CMYK, YCbCr, RGBX, LAB, HSV, ...: Pillow's own conversion to RGB.
    return np.asarray(image.convert("RGB"))


def _gray_to_rgb(values: np.ndarray) -> np.ndarray:
    return np.repeat(values[..., None], 3, axis=-1) if values.ndim == 2 else values


def _pil_to_rgb(image: Image.Image, source: str) -> Image.Image:
    try:
        values = _pil_to_uint8(image)
    except (OSError, ValueError) as error:
        raise ImageReadError(
            f"cannot convert {source} (mode {image.mode!r}) to RGB: {error}"
        ) from error
    return Image.fromarray(np.ascontiguousarray(_gray_to_rgb(values)), mode="RGB")


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
        ImageReadError: If the file cannot be decoded (the message names the file).
    """
    return _pil_to_rgb(_open(path, "image"), str(path))


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
    image = _open(path, "mask")
    try:
        values = _pil_to_uint8(image)
    except (OSError, ValueError) as error:
        message = f"cannot convert mask {path} (mode {image.mode!r}): {error}"
        raise ImageReadError(message) from error
    if values.ndim == 3:
        values = values.max(axis=-1)
    return values > threshold


# --------------------------------------------------------------------------------------
# Conversion of in-memory inputs
# --------------------------------------------------------------------------------------


def _uint8_hwc_to_tensor(values: np.ndarray) -> Tensor:
    """``(H, W, 3)`` uint8 array -> ``(3, H, W)`` float32 tensor in [0, 1] (a copy)."""
    return torch.from_numpy(np.ascontiguousarray(values.transpose(2, 0, 1))).float().div_(255.0)


def _check_not_empty(height: int, width: int, what: str) -> None:
    if height == 0 or width == 0:
        raise ValueError(f"{what} has an empty spatial size ({height}x{width})")


def _float_range_error(what: str) -> ValueError:
    return ValueError(
        f"{what} has float values outside [0, 1] (or NaN); float images must be scaled to "
        "[0, 1] (pass uint8 data for 0-255 values)"
    )


def _array_to_tensors(array: np.ndarray) -> list[Tensor]:
    """Convert a channels-last numpy image (or NHWC batch) to RGB tensors."""
    if array.ndim == 4:
        return [tensor for item in array for tensor in _array_to_tensors(item)]
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
        values = _rescale_to_uint8(array, 0, _UINT16_MAX)
    elif np.issubdtype(array.dtype, np.floating):
        if not (np.all(np.isfinite(array)) and array.min() >= 0.0 and array.max() <= 1.0):
            raise _float_range_error("numpy image")
        # Keep full float precision rather than quantising through uint8.
        floats = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
        floats = floats.permute(2, 0, 1)
        if channels == 4:
            floats = floats[:3] * floats[3:]
        elif channels == 1:
            floats = floats.expand(3, -1, -1)
        return [floats.contiguous()]
    else:
        raise TypeError(
            f"numpy images must be uint8, uint16 or float in [0, 1], got dtype {array.dtype}"
        )
    if channels == 4:
        values = _composite_on_black(values[..., :3], values[..., 3])
    elif channels == 1:
        values = np.repeat(values, 3, axis=-1)
    return [_uint8_hwc_to_tensor(values)]


def _tensor_to_tensors(tensor: Tensor) -> list[Tensor]:
    """Convert an ``HxW``, ``CxHxW`` or ``BxCxHxW`` tensor to RGB float tensors."""
    if tensor.ndim == 4:
        return [image for item in tensor for image in _tensor_to_tensors(item)]
    if tensor.ndim == 2:
        tensor = tensor.unsqueeze(0)
    if tensor.ndim != 3:
        raise ValueError(
            f"image tensors must be HxW, CxHxW or BxCxHxW, got shape {tuple(tensor.shape)}"
        )
    channels, height, width = tensor.shape
    if channels not in (1, 3):
        raise ValueError(
            f"image tensors must have 1 or 3 channels (channels first), got shape "
            f"{tuple(tensor.shape)}"
        )
    _check_not_empty(height, width, "image tensor")
    if tensor.dtype == torch.uint8:
        tensor = tensor.float().div_(255.0)
    elif tensor.is_floating_point():
        if not bool(torch.isfinite(tensor).all()) or tensor.min() < 0 or tensor.max() > 1:
            raise _float_range_error("image tensor")
        tensor = tensor.float()
    else:
        raise TypeError(
            f"image tensors must be uint8 or floating point in [0, 1], got dtype {tensor.dtype}"
        )
    if channels == 1:
        tensor = tensor.expand(3, -1, -1).contiguous()
    return [tensor]


def _convert(item: object) -> list[Tensor]:
    if isinstance(item, (str, os.PathLike)):
        return [_uint8_hwc_to_tensor(np.asarray(load_image(item)))]
    if isinstance(item, Image.Image):
        return [_uint8_hwc_to_tensor(np.asarray(_pil_to_rgb(item, "PIL image")))]
    if isinstance(item, np.ndarray):
        return _array_to_tensors(item)
    if isinstance(item, Tensor):
        return _tensor_to_tensors(item)
    raise TypeError(
        "expected a path, a PIL image, a numpy array, a torch tensor or a list of these, "
        f"got {type(item).__name__}"
    )


def to_image_tensor(images: ImageInput | Sequence[ImageInput]) -> list[Tensor]:
    """Convert images in any supported form to RGB float tensors at their own size.

    Accepted inputs, alone or in a list/tuple (lists may mix kinds and sizes):

    * a path (``str`` or `os.PathLike`), read with [`load_image`][cncad.data.transforms.load_image];
    * a PIL image of any mode (converted as in [`load_image`][cncad.data.transforms.load_image]);
    * a numpy array, channels last: ``HxW``, ``HxWx1``, ``HxWx3``, ``HxWx4`` (alpha
      composited over black) or an ``NxHxWxC`` batch; dtype uint8, uint16 (scaled by the
      16-bit range) or float with values in ``[0, 1]``;
    * a torch tensor, channels first: ``HxW``, ``CxHxW`` or ``BxCxHxW`` with ``C`` in
      ``{1, 3}`` (one channel is repeated to three); dtype uint8 or float in ``[0, 1]``.

    Batches (4-D arrays/tensors) are split into one tensor per image. Tensors keep their
    device; other inputs end up on the CPU. A float32 CHW tensor is returned as is (no
    copy), so do not modify the result in place if you reuse the input.

    Args:
        images: One image or a sequence of images.

    Returns:
        A list with one ``(3, H_i, W_i)`` float32 tensor in ``[0, 1]`` per image, in input
        order. ``tuple(t.shape[-2:])`` of each entry is that image's original ``(H, W)``,
        at which anomaly maps should be returned.

    Raises:
        TypeError: For an unsupported type or dtype.
        ValueError: For an empty list, a wrong number of dimensions or channels, an empty
            image, or float values outside ``[0, 1]``.
        FileNotFoundError: For a path that does not exist.
        ImageReadError: For a file that cannot be decoded.
    """
    if isinstance(images, (list, tuple)):
        if len(images) == 0:
            raise ValueError("expected at least one image, got an empty sequence")
        return [tensor for item in images for tensor in _convert(item)]
    return _convert(images)


# --------------------------------------------------------------------------------------
# Model-side preprocessing
# --------------------------------------------------------------------------------------


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    """Normalise ``size`` to a ``(height, width)`` pair of positive ints."""
    try:
        if isinstance(size, Sequence):
            pair = tuple(operator.index(side) for side in size)
        else:
            side = operator.index(size)
            pair = (side, side)
    except TypeError:
        pair = ()
    if len(pair) != 2 or min(pair) <= 0:
        raise ValueError(f"size must be a positive int or a (height, width) pair, got {size!r}")
    return pair  # type: ignore[return-value]


def _resize_bilinear(images: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(images.shape[-2:]) == size:
        return images
    # Antialiasing matters here: industrial images are often 4-10x larger than the model
    # input, and plain bilinear sampling at that factor aliases fine textures.
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)


def _resize_one(image: Tensor, size: tuple[int, int]) -> Tensor:
    """Resize one ``(3, H, W)`` or ``(1, 3, H, W)`` float image to ``(1, 3, *size)``."""
    if not isinstance(image, Tensor):
        raise TypeError(f"expected a torch tensor, got {type(image).__name__}")
    batch = image.unsqueeze(0) if image.ndim == 3 else image
    if batch.ndim != 4 or batch.shape[:2] != (1, 3):
        raise ValueError(f"expected a (3, H, W) image, got {tuple(image.shape)}")
    if not batch.is_floating_point():
        raise TypeError(f"preprocess expects float images in [0, 1], got {batch.dtype}")
    return _resize_bilinear(batch.float(), size)


def preprocess(
    images: Tensor | Sequence[Tensor],
    size: int | tuple[int, int],
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> Tensor:
    """Resize images to the model input size and normalise them with the CLIP statistics.

    Resizing is bilinear with antialiasing and does not keep the aspect ratio (the whole
    image is squashed into ``size x size``, as is customary on MVTec AD); masks must be
    resized the same way (see [`resize_mask`][cncad.data.transforms.resize_mask]) to stay aligned.

    Args:
        images: ``(B, 3, H, W)`` or ``(3, H, W)`` float tensor in ``[0, 1]``, or a sequence
            of ``(3, H_i, W_i)`` tensors of possibly different sizes (for example the
            output of [`to_image_tensor`][cncad.data.transforms.to_image_tensor]).
        size: Output side length, or an ``(height, width)`` pair.
        mean: Per-channel mean subtracted after resizing.
        std: Per-channel standard deviation divided by after resizing.

    Returns:
        ``(B, 3, size, size)`` float32 tensor on the input's device.

    Raises:
        ValueError: If the images do not have 3 channels or ``size`` is invalid.
        TypeError: If ``images`` is not a float tensor or a sequence of them.
    """
    target = _pair(size)
    if isinstance(images, Tensor):
        batch = images.unsqueeze(0) if images.ndim == 3 else images
        if batch.ndim != 4 or batch.shape[1] != 3:
            raise ValueError(
                f"preprocess expects (B, 3, H, W) or (3, H, W), got {tuple(images.shape)}"
            )
        if not batch.is_floating_point():
            raise TypeError(f"preprocess expects float images in [0, 1], got {batch.dtype}")
        resized = _resize_bilinear(batch.float(), target)
    elif isinstance(images, Sequence) and len(images) > 0:
        resized = torch.cat([_resize_one(image, target) for image in images])
    else:
        raise TypeError(
            f"preprocess expects a tensor or a non-empty sequence of tensors, got {images!r:.80}"
        )
    mean_t = torch.as_tensor(mean, dtype=resized.dtype, device=resized.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=resized.dtype, device=resized.device).view(1, -1, 1, 1)
    return (resized - mean_t) / std_t


def resize_mask(mask: Tensor | np.ndarray, size: int | tuple[int, int]) -> Tensor | np.ndarray:
    """Resize masks with nearest-neighbour sampling, keeping type and dtype.

    Uses torch's ``nearest-exact`` mode (pixel-centre aligned, as PIL's ``NEAREST``), so a
    mask resized alongside its image with [`preprocess`][cncad.data.transforms.preprocess] stays
    aligned with it.

    Args:
        mask: ``(H, W)`` or ``(..., H, W)`` (for example ``(B, H, W)`` or ``(B, 1, H, W)``)
            tensor or numpy array, bool, integer or float.
        size: Output side length, or an ``(height, width)`` pair.

    Returns:
        The mask at ``(..., size, size)``, of the same type (tensor or array), dtype and
        device as the input.

    Raises:
        ValueError: If the mask has fewer than 2 dimensions or ``size`` is invalid.
    """
    target = _pair(size)
    if isinstance(mask, np.ndarray):
        resized = resize_mask(torch.from_numpy(np.ascontiguousarray(mask)), target)
        return resized.numpy()  # type: ignore[union-attr]
    if mask.ndim < 2:
        raise ValueError(f"masks must have at least 2 dimensions (H, W), got {tuple(mask.shape)}")
    if tuple(mask.shape[-2:]) == target:
        return mask
    leading = mask.shape[:-2]
    flat = mask.reshape(-1, 1, *mask.shape[-2:])
    # interpolate needs a float input; nearest sampling copies values, so no precision loss
    # for bool/uint8 and the cast back is exact.
    work = flat.to(torch.float32) if not flat.is_floating_point() else flat
    resized = F.interpolate(work, size=target, mode="nearest-exact")
    return resized.to(mask.dtype).reshape(*leading, *target)


def denormalize(
    images: Tensor,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> Tensor:
    """Undo [`preprocess`][cncad.data.transforms.preprocess]'s normalisation for display.

    Args:
        images: ``(B, 3, H, W)`` or ``(3, H, W)`` normalised float tensor.
        mean: The mean used for normalisation.
        std: The standard deviation used for normalisation.

    Returns:
        Tensor of the same shape with values clamped to ``[0, 1]``.
    """
    shape = (-1, 1, 1)
    mean_t = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(shape)
    std_t = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(shape)
    return (images * std_t + mean_t).clamp(0.0, 1.0)
