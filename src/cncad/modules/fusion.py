"""Training noise on encoded features and multi-layer fusion (CNC eq. 12)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["FeatureNoise", "MultiLayerFusion"]


class FeatureNoise(nn.Module):
    """Gaussian perturbation ``f_noise = f + ε`` of encoded features, in training mode only.

    The paper perturbs the encoded features to curb over-generalisation but gives no scale.
    Here ``ε ~ N(0, (std · s_c)^2)`` where ``s_c`` is channel c's standard deviation over the
    batch's tokens (detached): CLIP's intermediate tokens have a few channels with very large
    magnitudes, and a per-channel scale perturbs every channel in proportion to its own
    spread instead of drowning the small channels in noise sized for the large ones.

    Args:
        std: Noise scale relative to each channel's spread; 0 disables the noise.

    Shapes:
        forward: ``(B, L, C) -> (B, L, C)``.
    """

    def __init__(self, std: float = 0.1) -> None:
        super().__init__()
        if std < 0:
            raise ValueError(f"std must be >= 0, got {std}")
        self.std = std

    def forward(self, features: Tensor) -> Tensor:
        """Return the features, perturbed when training."""
        if not self.training or self.std == 0:
            return features
        spread = features.detach().flatten(0, -2).std(dim=0, unbiased=False)
        return features + torch.randn_like(features) * (self.std * spread)

    def extra_repr(self) -> str:
        """The options, for ``repr``."""
        return f"std={self.std}"


class MultiLayerFusion(nn.Module):
    """Φ of eq. 12: concatenate layer features, then Linear + Dropout back to width C.

    Args:
        in_dims: Channel width of each layer feature.
        out_dim: Output width C.
        dropout: Dropout rate after the projection.

    Shapes:
        forward: a sequence of ``(B, L, C_i)`` -> ``(B, L, out_dim)``.
    """

    def __init__(self, in_dims: Sequence[int], out_dim: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.in_dims = tuple(in_dims)
        self.proj = nn.Linear(sum(self.in_dims), out_dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        """Fuse the layer features (eq. 12)."""
        if tuple(f.shape[-1] for f in features) != self.in_dims:
            raise ValueError(
                f"expected layer widths {self.in_dims}, got {tuple(f.shape[-1] for f in features)}"
            )
        return self.drop(self.proj(torch.cat(list(features), dim=-1)))
