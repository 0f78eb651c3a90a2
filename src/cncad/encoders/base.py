"""The frozen-encoder interface shared by the CLIP and timm encoders.

An encoder turns ``(B, 3, S, S)`` images into the tapped features of N layers, shallow to
deep, as an [`EncoderFeatures`][cncad.encoders.base.EncoderFeatures] (patch tokens in row-major grid
order, plus class tokens when the encoder has them), and tells the rest of the model what it needs
to know: the channel width and the grid of every tapped layer, whether there is a text tower (CNC
needs one), and the attention head count when it is a transformer.

Feature maps ``(B, C, h, w)`` of CNNs are flattened to tokens ``(B, h * w, C)`` by the
encoder; [`tokens_to_map`][cncad.encoders.base.tokens_to_map] and
[`resample_tokens`][cncad.encoders.base.resample_tokens] go back and forth.
"""

from __future__ import annotations

import abc
from functools import lru_cache
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cncad._tracing import prebuilt, tracing

__all__ = ["EncoderFeatures", "FrozenEncoder", "resample_tokens", "tokens_to_map"]

Grid = tuple[int, int]


class EncoderFeatures(NamedTuple):
    """The tapped features of one batch, shallow to deep.

    Every field is ``None`` or a list with one tensor per tapped layer, batch dimension
    first, so a feature cache can store and slice it field by field.

    Attributes:
        class_tokens: One ``(B, C_i)`` class token per tapped layer, or ``None`` for
            encoders without one (CNNs).
        patch_tokens: One ``(B, L_i, C_i)`` patch-token sequence per tapped layer,
            ``L_i = h_i * w_i`` in row-major order of the layer's grid
            ([`FrozenEncoder.grids`][cncad.encoders.base.FrozenEncoder.grids]). Widths and grids may
            differ between layers.
    """

    class_tokens: list[Tensor] | None
    patch_tokens: list[Tensor]


class FrozenEncoder(nn.Module, abc.ABC):
    """Base class of the frozen teachers: no gradients, always in eval mode.

    Subclasses set ``self.image_size`` and ``self.layers`` and implement
    [`forward`][cncad.encoders.base.FrozenEncoder.forward],
    [`widths`][cncad.encoders.base.FrozenEncoder.widths] and
    [`grids`][cncad.encoders.base.FrozenEncoder.grids]; the other properties have defaults for a
    CNN.

    Shapes:
        forward: ``(B, 3, image_size, image_size)`` normalised images ->
        [`EncoderFeatures`][cncad.encoders.base.EncoderFeatures] with ``(B, L_i, C_i)`` patch
        tokens.
    """

    image_size: int
    layers: tuple[int, ...]

    @property
    @abc.abstractmethod
    def widths(self) -> tuple[int, ...]:
        """Channel width C_i of each tapped layer, shallow to deep."""

    @property
    @abc.abstractmethod
    def grids(self) -> tuple[Grid, ...]:
        """Token grid ``(h_i, w_i)`` of each tapped layer at ``image_size``."""

    @property
    def has_text(self) -> bool:
        """Whether a text tower is attached (required by CNC prompt learning)."""
        return False

    @property
    def has_class_token(self) -> bool:
        """Whether [`forward`][cncad.encoders.base.FrozenEncoder.forward] returns class tokens."""
        return False

    @property
    def num_heads(self) -> int | None:
        """Attention heads of a transformer encoder, ``None`` for CNNs."""
        return None

    @abc.abstractmethod
    def forward(self, images: Tensor) -> EncoderFeatures:
        """Tapped features of ``(B, 3, image_size, image_size)`` images."""

    def train(self, mode: bool = True) -> FrozenEncoder:
        """Keep the frozen encoder in eval mode whatever the parent module does."""
        return super().train(False)

    def freeze(self) -> None:
        """Switch off gradients of every parameter and enter eval mode."""
        self.requires_grad_(False)
        self.eval()

    def check_input(self, images: Tensor) -> None:
        """Raise a ``ValueError`` unless ``images`` is ``(B, 3, image_size, image_size)``."""
        if images.ndim != 4 or images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"encoder expects {self.image_size}x{self.image_size} inputs "
                f"(B, 3, {self.image_size}, {self.image_size}), got {tuple(images.shape)}"
            )


def tokens_to_map(tokens: Tensor, grid: Grid) -> Tensor:
    """Row-major tokens ``(B, h * w, C)`` as a feature map ``(B, C, h, w)``."""
    batch, length, channels = tokens.shape
    if length != grid[0] * grid[1]:
        raise ValueError(f"{length} tokens do not fill a {grid[0]}x{grid[1]} grid")
    return tokens.transpose(1, 2).reshape(batch, channels, grid[0], grid[1])


def resample_tokens(tokens: Tensor, grid: Grid, target: Grid) -> Tensor:
    """Resample row-major patch tokens from one grid to another, bilinearly.

    Shrinking uses antialiasing (a triangle filter over the covered cells), so a coarse
    grid averages the fine features instead of picking every other one.

    While tracing (``torch.jit.trace``, ``torch.onnx.export``) the same linear, separable
    resize is applied as ``R_h @ X @ R_w.T`` with constant matrices (ONNX has no
    antialiased bilinear resize), equal to the eager result up to float32 rounding; the
    matrices must be built before tracing by ``_resampling_matrices(grid, target)``
    (``cncad.export`` does).

    Args:
        tokens: ``(B, h * w, C)`` tokens on ``grid = (h, w)``.
        grid: Their grid.
        target: The grid ``(h', w')`` to resample to.

    Returns:
        ``(B, h' * w', C)`` tokens; ``tokens`` itself when the grids are equal.

    Raises:
        RuntimeError: While tracing, matrices that were not built before.
    """
    grid, target = tuple(grid), tuple(target)
    if grid == target:
        return tokens
    if tracing():
        rows, cols = prebuilt(
            _resampling_matrices, grid, target, what=f"the {grid} -> {target} resampling"
        )
        maps = tokens_to_map(tokens, grid)  # (B, C, h, w)
        resized = torch.matmul(torch.matmul(rows.to(maps.dtype), maps), cols.to(maps.dtype))
        return resized.flatten(2).transpose(1, 2)
    shrink = target[0] < grid[0] or target[1] < grid[1]
    resized = F.interpolate(
        tokens_to_map(tokens, grid),
        size=target,
        mode="bilinear",
        align_corners=False,
        antialias=shrink,
    )
    return resized.flatten(2).transpose(1, 2)


@lru_cache(maxsize=64)
def _resampling_matrices(grid: Grid, target: Grid) -> tuple[Tensor, Tensor]:
    """``R_h`` ``(h', h)`` and ``R_w.T`` ``(w, w')``, float32: ``resample_tokens`` as matrices.

    Each is ``F.interpolate``'s 1-D bilinear resize (antialiased when shrinking, by the rule
    of [`resample_tokens`][cncad.encoders.base.resample_tokens]) of an identity, in float64,
    so it holds PyTorch's own weights.
    """
    shrink = target[0] < grid[0] or target[1] < grid[1]
    with torch.inference_mode(False), torch.no_grad():
        rows, cols = (
            F.interpolate(
                torch.eye(size, dtype=torch.float64)[None, None],
                size=(size_out, size),
                mode="bilinear",
                align_corners=False,
                antialias=shrink,
            )[0, 0].float()
            for size, size_out in ((grid[0], target[0]), (grid[1], target[1]))
        )
    return rows, cols.T.contiguous()
