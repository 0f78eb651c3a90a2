"""Float32 islands inside autocast regions.

The alignment logits (eqs. 4, 10) and the normality coefficient (eqs. 6-7) are built
from cosines between image and text features; with τ = 0.001 the logits are those
cosines times 1000, so the ~3 significant digits of bfloat16 shift them by whole units.
Under ``torch.autocast`` a ``.float()`` cast alone does not help: autocast recasts the
inputs of every matmul and linear layer to the low precision. The functions that feed
these quantities therefore run with autocast switched off and float32 inputs, through
[`float32`][cncad._precision.float32]. Outside autocast they compute exactly what they
computed before.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any, ParamSpec, TypeVar

import torch
from torch import Tensor

__all__ = ["at_least_float32", "autocast_disabled", "float32"]

_P = ParamSpec("_P")
_R = TypeVar("_R")


def at_least_float32(x: Tensor) -> Tensor:
    """Upcast a half-precision float tensor to float32.

    Args:
        x: Any tensor.

    Returns:
        ``x`` in float32 when it is float16/bfloat16; ``x`` itself when it is float32,
        float64 or not floating point.
    """
    if not x.is_floating_point():
        return x
    return x.to(torch.promote_types(x.dtype, torch.float32))


@contextlib.contextmanager
def autocast_disabled(device: torch.device | str) -> Iterator[None]:
    """Switch autocast off for the device type of ``device`` inside the block.

    Args:
        device: The device whose autocast is switched off (only its type matters).
    """
    try:
        context = torch.autocast(device_type=torch.device(device).type, enabled=False)
    except (RuntimeError, ValueError):  # pragma: no cover - backends without autocast
        context = contextlib.nullcontext()
    with context:
        yield


def float32(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """Decorate ``fn`` to run in float32 with autocast off.

    Every floating tensor argument is upcast with
    [`at_least_float32`][cncad._precision.at_least_float32] and autocast is switched off for
    the device of the first tensor argument, so matmuls and linear layers inside ``fn``
    run in float32 (float64 inputs stay float64). Gradients flow back through the casts.
    Module weights used by ``fn`` must be float32 (or float64) themselves.

    Args:
        fn: A function or method taking at least one tensor argument.

    Returns:
        The wrapped function, with ``fn``'s name and docstring.
    """

    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)]
        device = tensors[0].device if tensors else torch.device("cpu")
        cast_args: Any = tuple(_cast(a) for a in args)
        cast_kwargs: Any = {key: _cast(value) for key, value in kwargs.items()}
        with autocast_disabled(device):
            return fn(*cast_args, **cast_kwargs)

    return wrapper


def _cast(value: object) -> object:
    return at_least_float32(value) if isinstance(value, Tensor) else value
