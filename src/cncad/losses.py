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

from cncad._precision import at_least_float32, float32

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
            the prompts from both sides, unless the text features were detached
            (``CNCConfig.detach_text_anchors``, the default).
        decoded: Per layer ``(B, L, C)`` promoted decoded features f̂*_i.

    Returns:
        Scalar tensor.
    """
    if len(encoded) != len(decoded):
        raise ValueError(f"{len(encoded)} encoded vs {len(decoded)} decoded layers")
    flat = [
        (at_least_float32(e.flatten(1)), at_least_float32(d.flatten(1)))
        for e, d in zip(encoded, decoded, strict=True)
    ]  # (B, L * C) pairs
    per_layer = [1.0 - F.cosine_similarity(e, d, dim=1) for e, d in flat]
    return torch.stack(per_layer, dim=0).sum(dim=0).mean()


@float32
def alignment_loss(
    global_features: Tensor, text_normal: Tensor, text_abnormal: Tensor, tau: float = 0.001
) -> Tensor:
    """Modal-alignment loss of eqs. 4 (encoder, L_c^1) and 10 (decoder, L_c^2).

    ``Σ_i -log( exp(e_i·g_n^i/τ) / (exp(e_i·g_n^i/τ) + exp(e_i·g_a^i/τ)) )``: a two-way
    softmax cross-entropy towards "normal" per layer, summed over layers and averaged over
    the batch (training images are all normal).

    The 1/τ factor (1000 at the paper's τ) magnifies rounding errors, so it runs in float32
    with autocast off (half-precision inputs are upcast), and uses ``logsumexp``, as the
    logits reach ±1/τ.

    Args:
        global_features: ``(B, N, D)`` unit global features e_i of the N layers.
        text_normal: ``(N, D)`` unit normal text features g_n^i.
        text_abnormal: ``(N, D)`` unit abnormal text features g_a^i.
        tau: Temperature τ.

    Returns:
        Scalar tensor.
    """
    normal = (global_features * text_normal).sum(-1) / tau  # (B, N)
    abnormal = (global_features * text_abnormal).sum(-1) / tau
    logits = torch.stack([normal, abnormal], dim=-1)
    # -log softmax(logits)[normal], computed stably
    return (torch.logsumexp(logits, dim=-1) - logits[..., 0]).sum(dim=-1).mean()


def constraint_loss(
    encoder_alignment: Tensor,
    decoder_alignment: Tensor,
    epoch: int,
    gamma: float,
    theta: int,
    *,
    ramp_epochs: int = 0,
) -> Tensor:
    """Cross-modal constraint loss (eq. 11), optionally with γ ramped in.

    Args:
        encoder_alignment: L_c^1 (eq. 4).
        decoder_alignment: L_c^2 (eq. 10).
        epoch: The 0-based training epoch.
        gamma: Weight γ of L_c^2.
        theta: First epoch ϑ at which L_c^2 is added.
        ramp_epochs: 0 (the paper): γ applies in full from epoch ϑ. ``R > 0``: the
            weight grows linearly, ``γ · min(1, (epoch - ϑ + 1) / R)``, so it is γ/R at
            epoch ϑ and reaches γ at epoch ϑ + R - 1.

    Returns:
        ``L_c^1`` before epoch ϑ, ``L_c^1 + w L_c^2`` from it on, with ``w = γ`` without
        a ramp.

    Raises:
        ValueError: ``ramp_epochs`` is negative.
    """
    if ramp_epochs < 0:
        raise ValueError(f"ramp_epochs must be >= 0, got {ramp_epochs}")
    if epoch < theta:
        return encoder_alignment
    weight = gamma
    if ramp_epochs > 0:
        weight = gamma * min(1.0, (epoch - theta + 1) / ramp_epochs)
    return encoder_alignment + weight * decoder_alignment


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


def total_loss(distill: Tensor, constraint: Tensor, moe: Tensor) -> Tensor:
    """Total loss (eq. 16): ``L_distill + L_constraint + L_moe``."""
    return distill + constraint + moe
