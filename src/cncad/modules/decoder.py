"""The reverse-distillation decoder: pre-norm transformer blocks, deep to shallow."""

from __future__ import annotations

from timm.layers import Mlp
from timm.models.vision_transformer import Block
from torch import Tensor, nn

__all__ = ["ResidualAttentionDecoder"]


class ResidualAttentionDecoder(nn.Module):
    """A stack of pre-norm transformer blocks (timm's ViT ``Block``), one per tapped layer.

    As in reverse distillation the decoder runs from deep to shallow: with N tapped layers,
    block j (1-based) reconstructs tapped layer N + 1 - j, so its first output is compared
    with the deepest encoder feature. The class token is decoded along with the patches.

    Args:
        dim: Token width (CLIP's vision width).
        num_heads: Attention heads (CLIP's vision heads).
        depth: Number of blocks, one per tapped layer.
        mlp_ratio: MLP hidden width relative to ``dim``.
        qkv_bias: Bias in the attention's qkv projection (CLIP has one).

    Shapes:
        forward: ``(B, L, C)`` -> list of ``depth`` tensors ``(B, L, C)``, in block order
        (deepest reconstruction first).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        depth: int = 3,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            Block(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, mlp_layer=Mlp)
            for _ in range(depth)
        )

    def forward(self, tokens: Tensor) -> list[Tensor]:
        """Decode ``tokens``, returning every block's output."""
        outputs = []
        for block in self.blocks:
            tokens = block(tokens)
            outputs.append(tokens)
        return outputs
