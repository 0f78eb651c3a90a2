"""The frozen CLIP encoder: tapped vision blocks, the shared projection and the text tower.

The vision side runs open_clip's own ``VisionTransformer.forward_intermediates`` and keeps
the class token and the patch tokens of each tapped block. The text side exposes the parts
of the text transformer that prompt learning needs (token embeddings in, projected pooled
features out), so that [`PromptLearner`][cncad.modules.prompt_learner.PromptLearner] can overwrite
token embeddings CoOp-style without copying open_clip's forward.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence

import open_clip
import torch
import torch.nn.functional as F
from open_clip.model import resize_pos_embed
from torch import Tensor, nn

from cncad._precision import float32
from cncad.encoders.base import EncoderFeatures, FrozenEncoder
from cncad.encoders.weights import (
    _hub_cache_dir,
    _hub_endpoint,
    cached_hub_file,
    hub_unreachable_reason,
)
from cncad.errors import WeightsUnavailableError

__all__ = [
    "TINY_BACKBONE",
    "CLIPEncoder",
    "CLIPTextTower",
    "EncoderFeatures",
    "build_tiny_clip",
    "clip_bpe_tokenizer",
    "default_layers",
    "load_clip",
]

TINY_BACKBONE = "tiny"
"""Backbone name of the small randomly initialised CLIP used by tests and offline demos."""

_TINY_SEED = 20250225  # fixed, so that a saved detector with the tiny backbone reloads exactly


def build_tiny_clip() -> open_clip.CLIP:
    """Build the tiny, randomly initialised CLIP model (backbone ``"tiny"``).

    It has CLIP's architecture (ViT vision tower with patch size 14, causal text transformer
    with the standard BPE vocabulary) at a toy size: width 64, 6 vision blocks, 3 text blocks,
    joint embedding 64. Its weights are random but identical on every call (a private fixed
    seed; the global RNG is left untouched). **It has no pretrained knowledge**: use it for
    tests and offline demos only; real use needs pretrained CLIP weights.

    Returns:
        An ``open_clip.CLIP`` in eval mode on the CPU, native input size 224.
    """
    vision_cfg = open_clip.CLIPVisionCfg(
        layers=6, width=64, head_width=16, mlp_ratio=4.0, patch_size=14, image_size=224
    )
    text_cfg = open_clip.CLIPTextCfg(
        context_length=77, vocab_size=49408, width=64, heads=4, layers=3
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_TINY_SEED)
        model = open_clip.CLIP(
            embed_dim=64, vision_cfg=vision_cfg, text_cfg=text_cfg, quick_gelu=True
        )
    return model.eval()


@functools.lru_cache(maxsize=1)
def clip_bpe_tokenizer() -> Callable[[list[str]], Tensor]:
    """CLIP's byte-pair tokenizer (shipped with open_clip, so it works offline), built once.

    It is stateless, and shared by the OpenAI models and the tiny backbone.
    """
    return open_clip.get_tokenizer("ViT-B-32")


def load_clip(
    backbone: str, pretrained: str | None = None
) -> tuple[nn.Module, Callable[[list[str]], Tensor]]:
    """Load a CLIP model and its tokenizer with open_clip.

    Weights that come from the Hugging Face hub (a pretrained tag such as ``"openai"``, an
    ``"hf-hub:"`` backbone) are checked first, before the model is built: when the hub
    cannot be used (``HF_HUB_OFFLINE`` set, or no connection within seconds; see
    [`hub_unreachable_reason`][cncad.encoders.weights.hub_unreachable_reason]), a copy in
    the local hub cache is loaded without the network, and without one
    [`WeightsUnavailableError`][cncad.errors.WeightsUnavailableError] is raised at once.

    Args:
        backbone: ``"tiny"``; an open_clip model name (``"ViT-L-14-336-quickgelu"``); an
            open_clip schema source (``"hf-hub:org/repo"``, ``"local-dir:/path"``); or the
            path of an OpenAI-format checkpoint file (``ViT-L-14-336px.pt``), whose
            architecture is read from the weights.
        pretrained: Pretrained tag (``"openai"``) or the path of a checkpoint file for a
            model name; ignored for the other kinds of ``backbone``.

    Returns:
        The model (on the CPU, eval mode) and a tokenizer mapping a list of strings to a
        ``(N, context_length)`` long tensor.

    Raises:
        WeightsUnavailableError: The weights would have to be downloaded and cannot be; the
            one-line message says how to pass a local checkpoint instead.
        RuntimeError: The weights could not be loaded for another reason (an unknown tag, a
            damaged file); the message says how to use a local checkpoint instead.
    """
    if backbone == TINY_BACKBONE:
        return build_tiny_clip(), clip_bpe_tokenizer()
    if not os.path.isfile(backbone):
        backbone, pretrained = _without_unreachable_hub(backbone, pretrained)
    try:
        if os.path.isfile(backbone):
            model = open_clip.load_openai_model(backbone, device="cpu")
            tokenizer = clip_bpe_tokenizer()
        else:
            model = open_clip.create_model(backbone, pretrained=pretrained, device="cpu")
            tokenizer = open_clip.get_tokenizer(backbone)
    except Exception as error:  # open_clip raises many kinds; re-raise with the way out
        raise RuntimeError(
            f"could not load CLIP backbone {backbone!r} (pretrained={pretrained!r}): {error}. "
            f"{_WAY_OUT}"
        ) from error
    return model.eval(), tokenizer


_WAY_OUT = (
    "Offline, pass a local checkpoint: pretrained='/path/to/open_clip_pytorch_model.bin' "
    "(CLI: --pretrained PATH) with the architecture name, or "
    "backbone='/path/to/ViT-L-14-336px.pt' (CLI: --backbone PATH) for an OpenAI checkpoint "
    "file. backbone='tiny' runs without weights (tests and demos only)."
)
_HF_HUB = "hf-hub:"
_OPEN_CLIP_CONFIG = "open_clip_config.json"
_OPEN_CLIP_WEIGHTS = "open_clip_pytorch_model.bin"


def _safe_first(filename: str) -> tuple[str, ...]:
    """``filename`` after its safetensors alternative, in open_clip's order of preference."""
    if filename == _OPEN_CLIP_WEIGHTS:
        return ("open_clip_model.safetensors", filename)
    if filename.endswith((".bin", ".pth")):
        return (filename[:-4] + ".safetensors", filename)
    return (filename,)


def _without_unreachable_hub(backbone: str, pretrained: str | None) -> tuple[str, str | None]:
    """The ``(backbone, pretrained)`` to give open_clip so that an unusable hub is not tried.

    Unchanged when no hub file is needed or the hub can be used. Otherwise the cached
    files replace the hub: the cached weights file for a tag, the cached repository folder
    (``"local-dir:"``) for an ``"hf-hub:"`` backbone.

    Raises:
        WeightsUnavailableError: The hub cannot be used and the files are not cached.
    """
    if backbone.startswith(_HF_HUB):
        repo = backbone[len(_HF_HUB) :]
        reason = hub_unreachable_reason()
        if reason is None:
            return backbone, pretrained
        config = cached_hub_file(repo, _OPEN_CLIP_CONFIG)
        weights = cached_hub_file(repo, *_safe_first(_OPEN_CLIP_WEIGHTS))
        if config is not None and weights is not None:
            return f"local-dir:{os.path.dirname(config)}", None
        raise _unavailable(f"of {backbone!r}", repo, reason)
    if pretrained is None or backbone.startswith("local-dir:") or os.path.isfile(pretrained):
        return backbone, pretrained
    tag_cfg = open_clip.get_pretrained_cfg(backbone.replace("/", "-"), pretrained)
    if not tag_cfg or not tag_cfg.get("hf_hub"):
        return backbone, pretrained  # not a hub tag: open_clip's own error or download
    # as open_clip reads it: "org/repo/" (default file name) or "org/repo/file.bin"
    repo, filename = os.path.split(tag_cfg["hf_hub"])
    reason = hub_unreachable_reason()
    if reason is None:
        return backbone, pretrained
    cached = cached_hub_file(repo, *_safe_first(filename or _OPEN_CLIP_WEIGHTS))
    if cached is not None:
        return backbone, cached
    url = tag_cfg.get("url", "")
    openai_file = os.path.basename(url) if "openaipublic" in url else None  # OpenAI format
    raise _unavailable(f"{pretrained!r} of {backbone}", repo, reason, openai_file)


def _unavailable(
    what: str, repo: str, reason: str, openai_file: str | None = None
) -> WeightsUnavailableError:
    local = (
        "pass a local checkpoint: pretrained='/path/to/open_clip_pytorch_model.bin' "
        "(CLI: --pretrained PATH) with this backbone"
    )
    if openai_file is not None:
        local += f", or backbone='/path/to/{openai_file}' (CLI: --backbone PATH)"
    return WeightsUnavailableError(
        f"the pretrained weights {what} are not in the local Hugging Face cache "
        f"({_hub_cache_dir()}) and cannot be downloaded from {_hub_endpoint()}/{repo} "
        f"now ({reason}). To run without the hub, {local}; or download them once where the "
        "hub is reachable (they are cached for later runs)."
    )


def default_layers(depth: int, num_taps: int = 3) -> tuple[int, ...]:
    """1-based block indices evenly spaced over ``depth``, ending at the last block.

    Args:
        depth: Number of transformer blocks of the vision tower.
        num_taps: How many blocks to tap.

    Returns:
        Strictly increasing indices; for depth 24 and 3 taps ``(8, 16, 24)``.
    """
    if not 1 <= num_taps <= depth:
        raise ValueError(f"cannot tap {num_taps} blocks of a {depth}-block encoder")
    return tuple(round(depth * (k + 1) / num_taps) for k in range(num_taps))


_EOS_POOLS = ("argmax", "eos")  # pool types that read the end-of-text position


class CLIPTextTower(nn.Module):
    """The frozen CLIP text transformer, fed with token embeddings instead of token ids.

    Works with open_clip's ``CLIP`` (text modules on the model) and ``CustomTextCLIP``
    (text modules on ``model.text``) when the text tower is open_clip's own transformer.

    Args:
        clip_model: The open_clip model that owns the text tower.
    """

    def __init__(self, clip_model: nn.Module) -> None:
        super().__init__()
        owner = getattr(clip_model, "text", clip_model)
        needed = ("token_embedding", "positional_embedding", "transformer", "ln_final")
        if not all(hasattr(owner, name) for name in needed):
            raise TypeError(
                f"{type(clip_model).__name__} has no open_clip text transformer; prompt "
                "learning (use_cnc=True) needs one"
            )
        if getattr(owner, "cls_emb", None) is not None:
            raise TypeError("text towers with a class embedding (CoCa) are not supported")
        self.token_embedding: nn.Embedding = owner.token_embedding
        self.positional_embedding: nn.Parameter = owner.positional_embedding
        self.transformer: nn.Module = owner.transformer
        self.ln_final: nn.Module = owner.ln_final
        self.text_projection = owner.text_projection
        self.register_buffer("attn_mask", owner.attn_mask, persistent=False)
        self.pool_type: str = getattr(
            owner, "text_pool_type", getattr(owner, "pool_type", "argmax")
        )
        self.eos_id: int | None = getattr(owner, "text_eos_id", getattr(owner, "eos_id", None))
        self.truncate_after_eos = True
        """Skip the positions after the last end-of-text token.

        Exact; see [`forward`][cncad.encoders.clip.CLIPTextTower.forward].
        """
        self.requires_grad_(False)

    @property
    def width(self) -> int:
        """Width of the token embeddings."""
        return self.token_embedding.embedding_dim

    @property
    def context_length(self) -> int:
        """Number of token positions."""
        return self.positional_embedding.shape[0]

    def _pooled_index(self, token_ids: Tensor) -> Tensor:
        """``(N,)`` position of the token whose feature is pooled (the end of text)."""
        if self.pool_type == "eos":
            return (token_ids == self.eos_id).int().argmax(dim=-1)
        return token_ids.argmax(dim=-1)

    def embed(self, token_ids: Tensor) -> Tensor:
        """Token embeddings of ``token_ids`` ``(N, L)``, returned as ``(N, L, width)``."""
        return self.token_embedding(token_ids)

    @float32
    def forward(self, embeddings: Tensor, token_ids: Tensor) -> Tensor:
        """Encode prompts given as token embeddings.

        Runs in float32 with autocast off: the text features feed the τ-scaled logits of
        eqs. 4 and 10 (see ``docs/design.md``, "Float32 around the τ-scaled logits").

        Args:
            embeddings: ``(N, L, width)`` token embeddings (possibly with learned context).
            token_ids: ``(N, L)`` the token ids the embeddings stand for; they decide where
                the end-of-text token is, where the pooled feature is read.

        Returns:
            ``(N, D)`` projected text features, not normalised.
        """
        positional, attn_mask = self.positional_embedding, self.attn_mask
        if self.truncate_after_eos and attn_mask is not None and self.pool_type in _EOS_POOLS:
            # Under the causal mask no position sees the ones after it, so the positions
            # after the last pooled end-of-text token cannot change the result: dropping
            # them gives the same features for a fraction of the cost (77 -> ~20 tokens).
            keep = int(self._pooled_index(token_ids).max()) + 1
            embeddings, token_ids = embeddings[:, :keep], token_ids[:, :keep]
            positional, attn_mask = positional[:keep], attn_mask[:keep, :keep]
        x = embeddings + positional.to(embeddings.dtype)
        x = self.transformer(x, attn_mask=attn_mask)
        x = self.ln_final(x)
        x = open_clip.transformer.text_global_pool(
            x, token_ids, self.pool_type, eos_token_id=self.eos_id
        )
        if self.text_projection is None:
            return x
        if isinstance(self.text_projection, nn.Linear):
            return self.text_projection(x)
        return x @ self.text_projection


class CLIPEncoder(FrozenEncoder):
    """The frozen CLIP visual encoder with tapped blocks (the teacher of reverse distillation).

    Args:
        clip_model: An open_clip ``CLIP``/``CustomTextCLIP`` with a ``VisionTransformer``
            vision tower. It is frozen and kept in eval mode.
        image_size: Input side; when it differs from the model's, the position embedding
            is resized with open_clip's ``resize_pos_embed`` (bicubic, as when loading).
        layers: 1-based indices of the tapped blocks; ``None`` for
            [`default_layers`][cncad.encoders.clip.default_layers].
        num_taps: Number of taps when ``layers`` is ``None``.
        with_text: Whether to keep the text tower (needed for prompt learning).

    Shapes:
        forward: ``(B, 3, image_size, image_size)`` normalised images ->
        [`EncoderFeatures`][cncad.encoders.base.EncoderFeatures] with ``(B, C)`` class tokens and
        ``(B, L, C)`` patch tokens.
    """

    def __init__(
        self,
        clip_model: nn.Module,
        image_size: int = 224,
        layers: Sequence[int] | None = None,
        num_taps: int = 3,
        with_text: bool = True,
    ) -> None:
        super().__init__()
        visual = getattr(clip_model, "visual", None)
        if visual is None or not hasattr(visual, "forward_intermediates"):
            raise TypeError(
                "the CLIP model needs an open_clip vision transformer with "
                "forward_intermediates (open_clip >= 2.32)"
            )
        if not hasattr(visual, "transformer") or not hasattr(visual, "positional_embedding"):
            raise TypeError(
                f"vision tower {type(visual).__name__} is not a ViT; CNC taps ViT blocks"
            )
        self.visual = visual
        _resize_position_embedding(visual, image_size)
        self.image_size = image_size
        depth = len(visual.transformer.resblocks)
        self.layers = tuple(layers) if layers is not None else default_layers(depth, num_taps)
        if max(self.layers) > depth or min(self.layers) < 1:
            raise ValueError(f"layers {self.layers} out of range for a {depth}-block encoder")
        self.text = CLIPTextTower(clip_model) if with_text else None
        self.freeze()

    @property
    def width(self) -> int:
        """Channel width C of the tapped tokens."""
        return self.visual.transformer.width

    @property
    def widths(self) -> tuple[int, ...]:
        """Channel width of each tapped layer.

        All equal to [`width`][cncad.encoders.clip.CLIPEncoder.width].
        """
        return (self.width,) * len(self.layers)

    @property
    def grids(self) -> tuple[tuple[int, int], ...]:
        """Patch grid of each tapped layer.

        All equal to [`grid_size`][cncad.encoders.clip.CLIPEncoder.grid_size].
        """
        return (self.grid_size,) * len(self.layers)

    @property
    def has_text(self) -> bool:
        """Whether the text tower was kept (``with_text=True``)."""
        return self.text is not None

    @property
    def has_class_token(self) -> bool:
        """CLIP's ViT always has a class token."""
        return True

    @property
    def num_heads(self) -> int:
        """Attention heads of the vision blocks."""
        attn = getattr(self.visual.transformer.resblocks[0], "attn", None)
        return int(getattr(attn, "num_heads", max(1, self.width // 64)))

    @property
    def embed_dim(self) -> int:
        """Dimension D of the joint image-text space."""
        return self.visual.proj.shape[1]

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patch grid ``(h, w)`` of the tapped features."""
        return tuple(self.visual.grid_size)

    @torch.no_grad()
    def forward(self, images: Tensor) -> EncoderFeatures:
        """Run the vision tower and return the class and patch tokens of the tapped blocks."""
        self.check_input(images)
        out = self.visual.forward_intermediates(
            images,
            indices=[i - 1 for i in self.layers],
            stop_early=True,
            intermediates_only=True,
            output_fmt="NLC",
            output_extra_tokens=True,
        )
        class_tokens = [prefix[:, 0] for prefix in out["image_intermediates_prefix"]]
        return EncoderFeatures(class_tokens, list(out["image_intermediates"]))

    @float32
    def project(self, tokens: Tensor) -> Tensor:
        """Map vision tokens into the joint space with CLIP's frozen ``ln_post`` and ``proj``.

        Gradients flow to ``tokens`` (decoded features are projected too), never to the
        frozen weights. Runs in float32 with autocast off, because the result feeds the
        τ-scaled alignment logits (eqs. 4, 10) and the coefficient Ψ (eqs. 6-7).

        Args:
            tokens: ``(..., C)`` vision tokens, any float dtype.

        Returns:
            ``(..., D)`` projected tokens, not normalised, float32 (float64 for float64
            tokens).
        """
        return self.visual.ln_post(tokens) @ self.visual.proj

    @float32
    def global_feature(self, class_token: Tensor) -> Tensor:
        """The global feature e of a block: its class token projected and L2-normalised.

        Runs in float32 with autocast off, like
        [`project`][cncad.encoders.clip.CLIPEncoder.project].

        Args:
            class_token: ``(B, C)``.

        Returns:
            ``(B, D)`` unit vectors in float32.
        """
        return F.normalize(self.project(class_token), dim=-1)


def _resize_position_embedding(visual: nn.Module, image_size: int) -> None:
    patch = visual.patch_size if isinstance(visual.patch_size, tuple) else (visual.patch_size,) * 2
    if image_size % patch[0] or image_size % patch[1]:
        raise ValueError(f"image_size {image_size} is not a multiple of the patch size {patch}")
    grid = (image_size // patch[0], image_size // patch[1])
    if tuple(visual.grid_size) == grid:
        return
    old = visual.positional_embedding.data
    visual.grid_size = grid
    visual.image_size = (image_size, image_size)
    holder = nn.Module()  # resize_pos_embed reads the target grid from ``model.visual``
    holder.visual = visual
    state = {"visual.positional_embedding": old}
    resize_pos_embed(state, holder)
    visual.positional_embedding = nn.Parameter(
        state["visual.positional_embedding"], requires_grad=False
    )
