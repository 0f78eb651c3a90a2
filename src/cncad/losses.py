"""The training objective of CNC (eqs. 4, 9, 10, 11, 16).

The MoE term (eq. 15) lives with the router, in
[`importance_loss`][cncad.modules.moe.importance_loss].
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "LossTerms",
    "alignment_loss",
    "constraint_loss",
    "distillation_loss",
    "total_loss",
]


def distillation_loss(encoded: Sequence[Tensor], decoded: Sequence[Tensor]) -> Tensor:
    """Cross-modal distillation loss (eq. 9).

    For each layer i, one minus the cosine similarity of the *flattened* promoted maps
    ``Flat(f*_i)`` and ``Flat(f̂*_i)`` of each sample, summed over layers and averaged over
    the batch.

    Args:
        encoded: Per layer ``(B, L, C)`` promoted encoded features f*_i. The encoder is
            frozen, but f*_i depends on the learned prompts through Ψ, so gradients reach
            the prompts from both sides.
        decoded: Per layer ``(B, L, C)`` promoted decoded features f̂*_i.

    Returns:
        Scalar tensor.
    """
    if len(encoded) != len(decoded):
        raise ValueError(f"{len(encoded)} encoded vs {len(decoded)} decoded layers")
    per_layer = [
        1.0 - F.cosine_similarity(_at_least_fp32(e.flatten(1)), _at_least_fp32(d.flatten(1)), dim=1)
        for e, d in zip(encoded, decoded, strict=True)
    ]
    return torch.stack(per_layer, dim=0).sum(dim=0).mean()


def alignment_loss(
    global_features: Tensor, text_normal: Tensor, text_abnormal: Tensor, tau: float = 0.001
) -> Tensor:
    """Modal-alignment loss of eqs. 4 (encoder, L_c^1) and 10 (decoder, L_c^2).

    ``Σ_i -log( exp(e_i·g_n^i/τ) / (exp(e_i·g_n^i/τ) + exp(e_i·g_a^i/τ)) )``: a two-way
    softmax cross-entropy towards "normal" per layer, summed over layers and averaged over
    the batch (training images are all normal).

    Args:
        global_features: ``(B, N, D)`` unit global features e_i of the N layers.
        text_normal: ``(N, D)`` unit normal text features g_n^i.
        text_abnormal: ``(N, D)`` unit abnormal text features g_a^i.
        tau: Temperature τ.

    Returns:
        Scalar tensor.
    """
    # the 1/τ = 1000 factor magnifies rounding errors: compute in at least float32
    global_features = _at_least_fp32(global_features)
    normal = (global_features * text_normal.to(global_features.dtype)).sum(-1) / tau  # (B, N)
    abnormal = (global_features * text_abnormal.to(global_features.dtype)).sum(-1) / tau
    logits = torch.stack([normal, abnormal], dim=-1)
    # -log softmax(logits)[normal], computed stably
    return (torch.logsumexp(logits, dim=-1) - logits[..., 0]).sum(dim=-1).mean()


def constraint_loss(
    encoder_alignment: Tensor, decoder_alignment: Tensor, epoch: int, gamma: float, theta: int
) -> Tensor:
    """Cross-modal constraint loss (eq. 11).

    Args:
        encoder_alignment: L_c^1 (eq. 4).
        decoder_alignment: L_c^2 (eq. 10).
        epoch: The 0-based training epoch.
        gamma: Weight γ of L_c^2.
        theta: First epoch ϑ at which L_c^2 is added.

    Returns:
        ``L_c^1`` before epoch ϑ, ``L_c^1 + γ L_c^2`` from it on.
    """
    if epoch < theta:
        return encoder_alignment
    return encoder_alignment + gamma * decoder_alignment


class LossTerms(NamedTuple):
    """Every term of the objective, for the optimiser (``total``) and for logging.

    Attributes:
        total: L_total (eq. 16).
        distill: L_distill (eq. 9).
        constraint: L_constraint (eq. 11).
        align_encoder: L_c^1 (eq. 4).
        align_decoder: L_c^2 (eq. 10), reported even in epochs where eq. 11 leaves it out.
        moe: L_moe (eq. 15), already weighted.
    """

    total: Tensor
    distill: Tensor
    constraint: Tensor
    align_encoder: Tensor
    align_decoder: Tensor
    moe: Tensor

    def as_floats(self) -> dict[str, float]:
        """The terms as plain floats keyed by name."""
        return {name: float(value.detach()) for name, value in self._asdict().items()}


def _at_least_fp32(x: Tensor) -> Tensor:
    """Upcast half precision to float32 and leave float32/float64 as they are."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def total_loss(distill: Tensor, constraint: Tensor, moe: Tensor) -> Tensor:
    """Total loss (eq. 16): ``L_distill + L_constraint + L_moe``."""
    return distill + constraint + moe
