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

import math
import operator
import os
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from cncad._decode import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGE_EXTENSIONS,
    ImageReadError,
    channels_first_shape,
    check_float_range,
    is_image_file,
    load_image,
    load_mask,
    rgb_arrays,
    tensor_dtype_error,
)

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "IMAGE_EXTENSIONS",
    "NORMALIZED_LIMIT",
    "ImageInput",
    "ImageReadError",
    "check_model_batch",
    "denormalize",
    "is_image_file",
    "load_image",
    "load_mask",
    "preprocess",
    "resize_mask",
    "to_image_tensor",
]

ImageInput = str | os.PathLike | Image.Image | np.ndarray | Tensor
"""One image in any form accepted by [`to_image_tensor`][cncad.data.transforms.to_image_tensor]."""

# --------------------------------------------------------------------------------------
# Conversion of in-memory inputs (the rules themselves live in cncad._decode)
# --------------------------------------------------------------------------------------


def _uint8_hwc_to_tensor(values: np.ndarray) -> Tensor:
    """``(H, W, 3)`` uint8 array -> ``(3, H, W)`` float32 tensor in [0, 1] (a copy)."""
    return torch.from_numpy(np.ascontiguousarray(values.transpose(2, 0, 1))).float().div_(255.0)


def _float_bounds(tensor: Tensor) -> tuple[float, float]:
    """``(min, max)`` of float pixels, on their device; ``(nan, nan)`` when any is not finite."""
    if not bool(torch.isfinite(tensor).all()):
        return math.nan, math.nan
    return float(tensor.min()), float(tensor.max())


def _tensor_to_tensors(tensor: Tensor) -> list[Tensor]:
    """Convert an ``HxW``, ``CxHxW`` or ``BxCxHxW`` tensor to RGB float tensors."""
    if tensor.ndim == 4:
        return [image for item in tensor for image in _tensor_to_tensors(item)]
    if tensor.ndim == 2:
        tensor = tensor.unsqueeze(0)
    channels, _, _ = channels_first_shape(tuple(tensor.shape))
    if tensor.dtype == torch.uint8:
        tensor = tensor.float().div_(255.0)
    elif tensor.is_floating_point():
        check_float_range(*_float_bounds(tensor), "image tensor")
        tensor = tensor.float()
    else:
        raise tensor_dtype_error(tensor.dtype)
    if channels == 1:
        tensor = tensor.expand(3, -1, -1).contiguous()
    return [tensor]


def _convert(item: object) -> list[Tensor]:
    if isinstance(item, Tensor):
        return _tensor_to_tensors(item)
    return [
        _uint8_hwc_to_tensor(image) if image.dtype == np.uint8 else torch.from_numpy(image)
        for image in rgb_arrays(item)
    ]


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
            image, float values outside ``[0, 1]`` (the message gives their range), or NaN
            or infinite values.
        FileNotFoundError: For a path that does not exist.
        ImageReadError: For a file that cannot be decoded, or a file or PIL image of mode
            ``F`` with NaN or infinite pixels (see
            [`load_image`][cncad.data.transforms.load_image]).
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


NORMALIZED_LIMIT: float = 10.0
"""Largest magnitude accepted in a batch of normalised images by
[`check_model_batch`][cncad.data.transforms.check_model_batch].

CLIP-normalised images from ``[0, 1]`` pixels lie within about ``[-1.8, 2.2]``; 0-255 pixel
values reach 255 as they are and several hundred normalised the same way."""


def check_model_batch(images: Tensor, what: str = "a batch") -> None:
    """Check that a batch of preprocessed images is what the model takes, at little cost.

    Datasets and DataLoaders given to ``fit`` and ``evaluate`` must yield images as
    [`AnomalyFolder`][cncad.data.folder.AnomalyFolder] does: float, ``[0, 1]`` pixels
    normalised by [`preprocess`][cncad.data.transforms.preprocess], so within about
    ``[-1.8, 2.2]``. One pass for finiteness and one for the min/max of the batch catch
    NaN/inf values and 0-255 pixel values (normalised or not) before they reach the
    feature cache or the model; images outside ``[-NORMALIZED_LIMIT, NORMALIZED_LIMIT]``
    are refused. (Un-normalised ``[0, 1]`` images cannot be told apart and pass.)

    Args:
        images: ``(B, 3, H, W)`` tensor.
        what: Names the batch in the message, e.g. ``"a training batch"``.

    Raises:
        TypeError: If the images are not a floating point tensor (for example uint8 pixels).
        ValueError: If a value is NaN or infinite, or outside the limit.
    """
    expected = (
        "items must be images as AnomalyFolder returns them: float, pixels scaled to [0, 1] "
        "and normalised by cncad.data.preprocess (within about [-1.8, 2.2])"
    )
    if not isinstance(images, Tensor):
        raise TypeError(f"{what} has images of type {type(images).__name__}; {expected}")
    if not images.is_floating_point():
        raise TypeError(f"{what} has images of dtype {images.dtype}; {expected}")
    if images.numel() == 0:
        return
    if not bool(torch.isfinite(images).all()):
        raise ValueError(f"{what} has images with NaN or infinite values; {expected}")
    low, high = (float(value) for value in torch.aminmax(images))
    if low < -NORMALIZED_LIMIT or high > NORMALIZED_LIMIT:
        hint = "; divide 0-255 pixel values by 255 first" if high > NORMALIZED_LIMIT else ""
        raise ValueError(f"{what} has image values in [{low:.4g}, {high:.4g}]; {expected}{hint}")


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
