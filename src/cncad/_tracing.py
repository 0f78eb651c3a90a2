"""Whether a forward runs under a tracer, and constants that must exist before it starts.

Code with a fast eager path that a graph cannot express (data-dependent shapes, chunk
loops over the batch, in-place ``out=`` kernels) takes a plain whole-tensor branch when
[`tracing`][cncad._tracing.tracing] is true. Constant matrices built by cached functions
are built *before* tracing (the ONNX export warms the caches), so the tracer sees them as
constants rather than recording how they were made;
[`prebuilt`][cncad._tracing.prebuilt] refuses a cache miss during tracing.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor

__all__ = ["compiling_or_tracing", "prebuilt", "tracing"]


class _Cached(Protocol):
    def __call__(self, *args: Any) -> Any: ...

    def cache_info(self) -> Any: ...


def tracing() -> bool:
    """Whether ``torch.jit.trace`` or ``torch.onnx.export`` is recording this call."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


def compiling_or_tracing() -> bool:
    """[`tracing`][cncad._tracing.tracing], or ``torch.compile`` is compiling this call."""
    if tracing():
        return True
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and compiler.is_compiling())


def prebuilt(cached: _Cached, *args: Any, what: str) -> Tensor:
    """``cached(*args)`` from a ``functools.lru_cache`` function that already holds it.

    Args:
        cached: An ``lru_cache``-wrapped function returning a constant tensor.
        *args: Its arguments.
        what: How to name the constant in the error.

    Returns:
        The cached tensor.

    Raises:
        RuntimeError: The entry was not in the cache: it would have been built inside the
            trace, whose record of its construction has no faithful graph form.
    """
    misses = cached.cache_info().misses
    value = cached(*args)
    if cached.cache_info().misses != misses:
        raise RuntimeError(
            f"{what} was not built before tracing started; build it once outside the trace "
            "(cncad.export does) so that the graph holds it as a constant"
        )
    return value
