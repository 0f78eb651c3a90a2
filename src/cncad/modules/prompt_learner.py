"""Class-agnostic learnable prompts (CNC eqs. 2-3), CoOp style.

Each tapped layer i owns a normal prompt ``[V_1]..[V_M] object`` and an abnormal prompt
``[V_1]..[V_M] damaged object``. The context vectors ``[V_m]`` are learned; the class
words stay the frozen token embeddings of the text. All prompts are encoded in one batch by
the frozen CLIP text transformer, pooled at the end-of-text token and projected.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cncad.encoders.clip import CLIPTextTower

__all__ = ["PromptLearner"]

_PLACEHOLDER = "X"


class PromptLearner(nn.Module):
    """Learnable normal/abnormal prompts, one pair per tapped layer (eqs. 2-3).

    In training mode every call runs the text tower, so gradients reach the context
    vectors. In eval mode the text features are computed once and cached in a buffer, which
    is saved with the state dict: inference (and a reloaded model) never runs the text
    tower. The cache holds for the context values it was computed from: any change of the
    context (an optimiser step, ``load_state_dict``, ``context.data.copy_``) makes the
    next eval call recompute it.

    Args:
        text_tower: The frozen CLIP text tower.
        tokenizer: open_clip tokenizer (list of strings -> ``(N, context_length)`` ids).
        num_layers: Number of prompt pairs (one per tapped vision layer).
        prompt_length: Learnable context vectors per prompt (M; the paper uses 12).
        normal_words: Words after the context of the normal prompt (eq. 2).
        abnormal_words: Words after the context of the abnormal prompt (eq. 3).
        init_std: Standard deviation of the context initialisation (CoOp's 0.02).

    Shapes:
        forward: ``() -> (g_n, g_a)``, each ``(num_layers, D)``, L2-normalised.
    """

    def __init__(
        self,
        text_tower: CLIPTextTower,
        tokenizer: Callable[[list[str]], Tensor],
        num_layers: int = 3,
        prompt_length: int = 12,
        normal_words: str = "object",
        abnormal_words: str = "damaged object",
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        self.text_tower = text_tower
        self.num_layers = num_layers
        self.prompt_length = prompt_length
        context = " ".join([_PLACEHOLDER] * prompt_length)
        token_ids = tokenizer([f"{context} {normal_words}", f"{context} {abnormal_words}"])
        self._check_placeholders(token_ids, tokenizer)
        # One row per (layer, normal/abnormal) prompt, layer-major: [n_1, a_1, n_2, a_2, ...].
        token_ids = token_ids.repeat(num_layers, 1)
        self.register_buffer("token_ids", token_ids, persistent=False)
        with torch.no_grad():
            frozen = text_tower.embed(token_ids)
        self.register_buffer("prefix_embedding", frozen[:, :1].clone(), persistent=False)
        self.register_buffer(
            "suffix_embedding", frozen[:, 1 + prompt_length :].clone(), persistent=False
        )
        self.context = nn.Parameter(
            torch.randn(num_layers, 2, prompt_length, text_tower.width) * init_std
        )
        embed_dim = self._output_dim()
        self.register_buffer("cached_features", torch.zeros(2, num_layers, embed_dim))
        self.register_buffer("cache_valid", torch.tensor(False))
        # The context values the cache was computed from. The version counter of the
        # parameter cannot tell: writes through ``context.data`` do not bump it.
        self.register_buffer("cached_context", self.context.detach().clone(), persistent=False)
        self.register_load_state_dict_post_hook(_adopt_loaded_cache)

    def _check_placeholders(self, token_ids: Tensor, tokenizer: Callable) -> None:
        placeholder_id = tokenizer([_PLACEHOLDER])[0, 1]
        span = token_ids[:, 1 : 1 + self.prompt_length]
        if not bool((span == placeholder_id).all()):
            raise ValueError("the tokenizer does not map each context placeholder to one token")

    def _output_dim(self) -> int:
        projection = self.text_tower.text_projection
        if projection is None:
            return self.text_tower.width
        if isinstance(projection, nn.Linear):
            return projection.out_features
        return projection.shape[1]

    def prompt_embeddings(self) -> Tensor:
        """Token embeddings of all prompts with the learned context spliced in.

        Returns:
            ``(2 * num_layers, context_length, width)``, rows ordered layer-major
            ``[normal_1, abnormal_1, normal_2, ...]``.
        """
        context = self.context.reshape(2 * self.num_layers, self.prompt_length, -1)
        context = context.to(self.prefix_embedding.dtype)
        return torch.cat([self.prefix_embedding, context, self.suffix_embedding], dim=1)

    def encode(self) -> tuple[Tensor, Tensor]:
        """Run the text tower on all prompts in one forward (eqs. 2-3).

        The text tower runs in float32 with autocast off (see
        [`CLIPTextTower.forward`][cncad.encoders.clip.CLIPTextTower.forward]).

        Returns:
            ``(g_n, g_a)``, each ``(num_layers, D)``, L2-normalised, float32.
        """
        features = self.text_tower(self.prompt_embeddings(), self.token_ids)
        features = F.normalize(features.float(), dim=-1).reshape(self.num_layers, 2, -1)
        return features[:, 0], features[:, 1]

    def cache_is_current(self) -> bool:
        """Whether the cached text features belong to the present context vectors."""
        return bool(self.cache_valid) and _same_values(self.cached_context, self.context)

    def forward(self) -> tuple[Tensor, Tensor]:
        """Text features of the prompts: fresh in training mode, cached in eval mode."""
        if self.training:
            return self.encode()
        if not self.cache_is_current():
            # Plain tensors even under torch.inference_mode(): inference tensors could not
            # be updated in place later (load_state_dict, a training step).
            with torch.inference_mode(False), torch.no_grad():
                normal, abnormal = self.encode()
                # new tensors, not in-place copies: features returned earlier stay unchanged
                self.cached_features = torch.stack([normal, abnormal])
                self.cached_context = self.context.detach().clone()
                self.cache_valid.fill_(True)
        return self.cached_features[0], self.cached_features[1]

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        # A file must never pair a context with text features of an older one: a cache
        # that no longer matches the context is saved as invalid (recomputed after loading).
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if not self.cache_is_current():
            destination[prefix + "cache_valid"] = torch.tensor(False)

    def train(self, mode: bool = True) -> PromptLearner:
        """Set the mode; the frozen text tower stays in eval mode."""
        super().train(mode)
        self.text_tower.eval()
        return self


def _same_values(cached: Tensor, current: Tensor) -> bool:
    return (
        cached.shape == current.shape
        and cached.dtype == current.dtype
        and cached.device == current.device
        and torch.equal(cached, current.detach())
    )


def _adopt_loaded_cache(module: nn.Module, incompatible_keys: object) -> None:
    """After ``load_state_dict``: a loaded valid cache belongs to the loaded context."""
    if isinstance(module, PromptLearner) and bool(module.cache_valid):
        with torch.inference_mode(False), torch.no_grad():
            module.cached_context = module.context.detach().clone()
