"""Decoding a stream of images ahead of the model, in input order, with bounded memory.

[`decode_stream`][cncad.data.stream.decode_stream] turns any stream of inputs (a folder, a
list, a generator of paths, PIL images, arrays or tensors) into model-ready tensors. With
``workers > 0`` a pool of threads reads and preprocesses the next images while the caller
runs the model on the current ones (PIL's decoders and torch's resizing release the GIL);
at most ``window`` images are decoded ahead, so memory depends on the window, not on the
length of the stream. Results come back in input order.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any, Literal, NamedTuple

from torch import Tensor

from cncad._decode import DECODE_ERRORS, DecodeFailure, iter_inputs, map_in_order
from cncad.data.transforms import preprocess, to_image_tensor

__all__ = ["DecodeFailure", "DecodedImage", "decode_stream", "iter_inputs"]

OnError = Literal["raise", "skip"]


class DecodedImage(NamedTuple):
    """One input, ready for the model.

    Attributes:
        index: Position in the input stream (0-based).
        source: The file path when the input was one, else None.
        model_input: ``(3, S, S)`` resized, CLIP-normalised float32 image.
        size: The input's own ``(H, W)``, at which its anomaly map is returned.
        image: The ``(3, H, W)`` float image in ``[0, 1]`` when asked for (e.g. to draw an
            overlay), else None.
    """

    index: int
    source: str | None
    model_input: Tensor
    size: tuple[int, int]
    image: Tensor | None


def decode_stream(
    images: Any,
    image_size: int,
    *,
    workers: int = 0,
    window: int = 16,
    keep_images: bool = False,
    on_error: OnError = "raise",
) -> Iterator[DecodedImage | DecodeFailure]:
    """Decode and preprocess a stream of images, ``workers`` threads ahead of the caller.

    Examples:
        >>> import torch
        >>> items = list(decode_stream([torch.rand(3, 40, 60), torch.rand(3, 20, 20)], 28))
        >>> tuple((d.index, d.size, tuple(d.model_input.shape)) for d in items)
        ((0, (40, 60), (3, 28, 28)), (1, (20, 20), (3, 28, 28)))

    Args:
        images: What [`iter_inputs`][cncad.data.stream.iter_inputs] accepts.
        image_size: The model's input side S.
        workers: Decoding threads; 0 decodes on the calling thread, when asked.
        window: At most this many images are decoded ahead of the consumer.
        keep_images: Also return each ``(3, H, W)`` image in ``[0, 1]``.
        on_error: ``"raise"``: the first input that cannot be read raises its error;
            ``"skip"``: it is reported as a [`DecodeFailure`][cncad.data.stream.DecodeFailure]
            in its place and the stream goes on.

    Yields:
        [`DecodedImage`][cncad.data.stream.DecodedImage] (or
        [`DecodeFailure`][cncad.data.stream.DecodeFailure]) in input order.

    Raises:
        ValueError: ``workers`` or ``window`` out of range, or an unknown ``on_error``.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ValueError(f"workers must be an integer >= 0, got {workers!r}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an integer >= 1, got {window!r}")

    def decode(index: int, item: Any) -> DecodedImage | DecodeFailure:
        source = str(item) if isinstance(item, (str, os.PathLike)) else None
        try:
            (image,) = to_image_tensor([item])
            model_input = preprocess(image, image_size)[0]
        except DECODE_ERRORS as error:
            if on_error == "raise":
                raise
            return DecodeFailure(index, source, f"{type(error).__name__}: {error}")
        size = (int(image.shape[-2]), int(image.shape[-1]))
        return DecodedImage(index, source, model_input, size, image if keep_images else None)

    yield from map_in_order(decode, iter_inputs(images), workers, window)
