"""Gated mixture-of-experts over patch tokens (CNC eqs. 13-15)."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from timm.layers import Mlp
from torch import Tensor, nn

from cncad._tracing import compiling_or_tracing

__all__ = ["GatedMoE", "MoEOutput", "importance_loss"]


class MoEOutput(NamedTuple):
    """Result of [`GatedMoE`][cncad.modules.moe.GatedMoE].

    Attributes:
        output: ``(..., C)`` the combined expert outputs z* (eq. 14).
        gates: ``(R, T)`` the router's full softmax distribution G(z_r) for every one of the
            R tokens (the input for [`importance_loss`][cncad.modules.moe.importance_loss]).
        expert_indices: ``(R, K)`` the experts chosen for each token, best first.
    """

    output: Tensor
    gates: Tensor
    expert_indices: Tensor


def importance_loss(
    gates: Tensor, eps: float = 1e-10, *, reduce: Callable[[Tensor], Tensor] | None = None
) -> Tensor:
    """Importance loss of the router (eq. 15), in its scale-free form.

    Eq. 15 as printed divides the squared standard deviation of a *sum* over tokens by the
    squared *mean* over tokens, which makes the loss grow with R². This implements the form
    of Shazeer et al. (2017) it cites: the squared coefficient of variation of the
    importance vector ``I_t = Σ_r G_t(z_r)``::

        L_moe = Var(I) / (Mean(I)² + eps)

    with the population variance over the T experts. It is 0 when all experts receive the
    same total gate mass and independent of the number of tokens (scaling I leaves it
    unchanged); for T = 1 it is 0.

    The loss is a statistic of the whole batch's gate mass, not a mean over images, so
    with the batch split over processes ``reduce`` sums the ``(T,)`` importance vector over
    them first (e.g.
    [`sum_with_local_gradient`][cncad.distributed.ProcessGroup.sum_with_local_gradient]);
    every process then computes the loss of the global batch.

    Args:
        gates: ``(R, T)`` router probabilities for R tokens.
        eps: Numerical guard of the denominator.
        reduce: Maps this batch's ``(T,)`` importance to the global batch's; None keeps it.

    Returns:
        Scalar tensor.
    """
    importance = gates.float().sum(dim=0)  # (T,)
    if reduce is not None:
        importance = reduce(importance)
    return importance.var(unbiased=False) / (importance.mean() ** 2 + eps)


class GatedMoE(nn.Module):
    """Token-wise top-K mixture of MLP experts with a softmax router (eqs. 13-14).

    ``H = softmax(G(z))`` with a linear router ``G: R^C -> R^T`` (eq. 13); each token is
    processed by its K highest-scoring experts and ``z* = Σ_k H_k E_k(z)`` (eq. 14), with the
    raw softmax values H_k as the paper writes it (``renormalize=True`` rescales the K
    values to sum to 1 instead). Routing is vectorised over tokens; the only Python loop is
    over experts.

    Two routings compute the same z*. The sparse one (eager default) runs each expert once on
    the tokens routed to it, found with ``nonzero``: shapes depend on the data, which
    ``torch.jit.trace``, ``torch.export`` and ONNX export cannot follow. The dense one runs
    every expert on every token and weights the outputs with the ``(R, T)`` matrix of the
    selected gate values (zero for the other experts), summed in expert order; adding the
    zeros changes no value, so it gives the same numbers at T/K times the expert work. It is
    used while tracing, compiling or exporting, and whenever ``dense`` is True.

    Args:
        dim: Token width C.
        num_experts: T.
        top_k: K, at most T.
        mlp_ratio: Hidden width of each expert relative to C.
        act_layer: Activation of the expert MLPs.
        renormalize: Renormalise the selected gate values.
        dense: Always use the dense routing (the attribute can be changed later).

    Shapes:
        forward: ``(..., C)`` -> [`MoEOutput`][cncad.modules.moe.MoEOutput] with
        ``output (..., C)``.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int = 5,
        top_k: int = 2,
        mlp_ratio: float = 1.0,
        act_layer: type[nn.Module] = nn.GELU,
        renormalize: bool = False,
        dense: bool = False,
    ) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, {num_experts}], got {top_k}")
        self.num_experts = num_experts
        self.top_k = top_k
        self.renormalize = renormalize
        self.dense = bool(dense)
        self.router = nn.Linear(dim, num_experts)
        hidden = max(1, round(dim * mlp_ratio))
        self.experts = nn.ModuleList(
            Mlp(dim, hidden_features=hidden, act_layer=act_layer) for _ in range(num_experts)
        )

    def forward(self, tokens: Tensor) -> MoEOutput:
        """Route every token to its top-K experts and mix their outputs."""
        shape = tokens.shape
        flat = tokens.reshape(-1, shape[-1])
        gates = self.router(flat).softmax(dim=-1)  # eq. 13, (R, T)
        weights, indices = gates.topk(self.top_k, dim=-1)  # (R, K)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if self.dense or compiling_or_tracing():  # no data-dependent shapes
            output = self._dense(flat, weights, indices)
        else:
            output = self._sparse(flat, weights, indices)
        return MoEOutput(output.reshape(shape), gates, indices)

    def _sparse(self, flat: Tensor, weights: Tensor, indices: Tensor) -> Tensor:
        """Eq. 14 with each expert run on its own tokens: ``(R, C)``."""
        output = torch.zeros_like(flat)
        for expert_id, expert in enumerate(self.experts):
            token_ids, slot = (indices == expert_id).nonzero(as_tuple=True)
            if token_ids.numel() == 0:
                continue
            routed = expert(flat[token_ids]) * weights[token_ids, slot].unsqueeze(-1)
            output.index_add_(0, token_ids, routed.to(output.dtype))  # eq. 14
        return output

    def _dense(self, flat: Tensor, weights: Tensor, indices: Tensor) -> Tensor:
        """Eq. 14 with every expert on every token, static shapes: ``(R, C)``."""
        # (R, T): the selected gate values in their experts' columns, zeros elsewhere
        mixing = torch.zeros(
            flat.shape[0], self.num_experts, dtype=weights.dtype, device=weights.device
        ).scatter(1, indices, weights)
        output = torch.zeros_like(flat)
        for expert_id, expert in enumerate(self.experts):
            routed = expert(flat) * mixing[:, expert_id : expert_id + 1]
            output = output + routed.to(output.dtype)  # eq. 14, in expert order as _sparse
        return output
