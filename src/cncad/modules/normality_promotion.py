"""Feature-level normality promotion, FNP (CNC eqs. 5-8).

``f* = f ⊕ λ Ψ(α, β)`` with ``Ψ = (1 + tanh(α - β)) / 2`` (eq. 6), ``α = f ⊗ g_n`` and
``β = f ⊗ g_a`` (eq. 7), ``λ = 1 / ||f||`` (eq. 5). The same map is applied to encoded
(eq. 5) and decoded (eq. 8) features. Two points are ambiguous in the paper and are options
here, discussed in ``docs/design.md``:

* the norm in λ: per token (default) or over the whole ``H x W x C`` map;
* how the per-position scalar ``λΨ`` meets a C-channel feature: added to every channel
  (default, the literal element-wise ``⊕`` with broadcasting) or added along the token's
  own unit direction.

α and β compare a visual token with a text feature, so the token is first mapped into the
joint space (CLIP's ``ln_post`` and ``proj``); the caller passes that projection in.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cncad._precision import float32

__all__ = ["FeatureNormalityPromotion", "normality_coefficient"]


@float32
def normality_coefficient(
    projected: Tensor, text_normal: Tensor, text_abnormal: Tensor, cosine: bool = True
) -> Tensor:
    """Cross-modal control coefficient Ψ (eqs. 6-7).

    Runs in float32 with autocast off (half-precision inputs are upcast): α and β are
    cosines between image and text features, and bfloat16 would round them to about
    three significant digits.

    Args:
        projected: ``(B, L, D)`` tokens in the joint image-text space.
        text_normal: ``(D,)`` normal text feature g_n (unit norm).
        text_abnormal: ``(D,)`` abnormal text feature g_a (unit norm).
        cosine: L2-normalise the tokens first, so α and β are cosine similarities.

    Returns:
        ``(B, L)`` values in (0, 1), float32 (float64 for float64 inputs): above 1/2 where
        a token is closer to "normal".
    """
    if cosine:
        projected = F.normalize(projected, dim=-1)
    alpha = projected @ text_normal  # eq. 7
    beta = projected @ text_abnormal  # eq. 7
    return 0.5 * (1.0 + torch.tanh(alpha - beta))  # eq. 6


class FeatureNormalityPromotion(nn.Module):
    """Add the cross-modal normality coefficient to visual features (eqs. 5 and 8).

    Parameter-free: it is a module so that its options travel with the model.

    Args:
        norm: ``"token"``: λ = 1/||f_l|| for each token; ``"map"``: λ = 1/||f||_F of the
            sample's whole ``(L, C)`` map.
        mode: ``"broadcast"``: ``f* = f + λΨ`` on every channel; ``"direction"``:
            ``f* = f + λΨ f`` (λΨ along the unit direction of f when ``norm="token"``).
        cosine: Whether α and β use cosine similarity (see
            [`normality_coefficient`][cncad.modules.normality_promotion.normality_coefficient]).
        eps: Guards the norm against zero.

    Shapes:
        forward: features ``(B, L, C)``, projected ``(B, L, D)``, text features ``(D,)``
        -> ``(B, L, C)``.
    """

    def __init__(
        self,
        norm: Literal["token", "map"] = "token",
        mode: Literal["broadcast", "direction"] = "broadcast",
        cosine: bool = True,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if norm not in ("token", "map"):
            raise ValueError(f"norm must be 'token' or 'map', got {norm!r}")
        if mode not in ("broadcast", "direction"):
            raise ValueError(f"mode must be 'broadcast' or 'direction', got {mode!r}")
        self.norm = norm
        self.mode = mode
        self.cosine = cosine
        self.eps = eps

    def forward(
        self, features: Tensor, projected: Tensor, text_normal: Tensor, text_abnormal: Tensor
    ) -> Tensor:
        """Promote ``features`` with the coefficient computed from ``projected``."""
        if features.shape[:2] != projected.shape[:2]:
            raise ValueError(
                f"features {tuple(features.shape)} and projected {tuple(projected.shape)} "
                "must share (B, L)"
            )
        psi = normality_coefficient(projected, text_normal, text_abnormal, self.cosine)
        psi = psi.unsqueeze(-1).to(features.dtype)
        if self.norm == "token":
            magnitude = features.norm(dim=-1, keepdim=True)
        else:
            magnitude = features.flatten(1).norm(dim=1).view(-1, 1, 1)
        scale = 1.0 / magnitude.clamp_min(self.eps)  # λ, eq. 5
        if self.mode == "broadcast":
            return features + scale * psi  # eqs. 5 and 8: ⊕ with the scalar on every channel
        return features + scale * psi * features

    def extra_repr(self) -> str:
        """The options, for ``repr``."""
        return f"norm={self.norm!r}, mode={self.mode!r}, cosine={self.cosine}"
