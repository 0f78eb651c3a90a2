"""A frozen timm encoder: any CNN with a feature pyramid, or a ViT, as the teacher.

CNNs are tapped through timm's ``forward_intermediates`` (or, for the few models without
it, timm's ``FeatureListNet``, the machinery behind ``features_only=True``); layer i is
the i-th entry of the model's ``feature_info`` (for a typical 5-level CNN, strides 2, 4,
8, 16, 32). ViTs are tapped through ``forward_intermediates`` too, block by block, with
their class token. timm encoders have no text tower, so they serve the visual-only
configuration of CNC (``use_cnc=False``: fusion, MoE and decoder, Table 2 row vi).

cncad normalises images with CLIP's mean and standard deviation; timm models expect their
own (``pretrained_cfg["mean"]``/``["std"]``, e.g. 0.5/0.5 for the TF EfficientNet-Lite
weights). The encoder converts one into the other with a per-channel affine map before the
model runs, so the same preprocessed images serve every encoder.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor, nn

from cncad.data.transforms import CLIP_MEAN, CLIP_STD
from cncad.encoders.base import EncoderFeatures, FrozenEncoder, Grid
from cncad.encoders.clip import default_layers
from cncad.encoders.weights import (
    KeyRemap,
    _hub_cache_dir,
    _hub_endpoint,
    cached_hub_file,
    hub_unreachable_reason,
    load_encoder_weights,
)
from cncad.errors import WeightsUnavailableError

__all__ = ["TIMM_PREFIX", "TimmEncoder", "create_timm_model", "default_cnn_layers"]

TIMM_PREFIX = "timm/"
"""``CNCConfig.backbone`` prefix naming a timm model: ``"timm/tf_efficientnet_lite0"``."""


def default_cnn_layers(num_levels: int, num_taps: int = 3) -> tuple[int, ...]:
    """The ``num_taps`` consecutive pyramid levels that end one level before the last.

    Reverse distillation taps the middle of a CNN (RD4AD uses the stride 4, 8 and 16
    stages of a ResNet): the last level is too coarse and too class-specific. For a
    5-level pyramid and 3 taps this gives ``(2, 3, 4)``. Shallow pyramids end at the last.

    Args:
        num_levels: Levels in the model's ``feature_info``.
        num_taps: How many to tap.

    Returns:
        1-based, strictly increasing level indices.
    """
    if not 1 <= num_taps <= num_levels:
        raise ValueError(f"cannot tap {num_taps} levels of a {num_levels}-level pyramid")
    last = num_levels - 1 if num_levels - 1 >= num_taps else num_levels
    return tuple(range(last - num_taps + 1, last + 1))


def create_timm_model(name: str, pretrained: str | None = None) -> nn.Module:
    """Create a timm model by name, randomly initialised unless ``pretrained`` is set.

    Pretrained weights are looked for before the model is built: when they would come from
    the hub (or a URL) that cannot be used now (``HF_HUB_OFFLINE`` set, or no connection
    within seconds; see
    [`hub_unreachable_reason`][cncad.encoders.weights.hub_unreachable_reason]), a copy in
    the local cache is loaded without the network, and without one
    [`WeightsUnavailableError`][cncad.errors.WeightsUnavailableError] is raised at once.

    Args:
        name: timm model name, with or without the ``"timm/"`` prefix.
        pretrained: ``None`` for random weights; ``"default"`` for timm's default
            pretrained tag; another string is a tag (``"in1k"`` -> ``name.in1k``).
            Pretrained tags download from the Hugging Face hub; offline, use
            ``weights="file.pth"`` instead.

    Returns:
        The full model (classifier included, so that checkpoints load as saved), in eval
        mode on the CPU.

    Raises:
        WeightsUnavailableError: The weights would have to be downloaded and cannot be; the
            one-line message says how to pass a local checkpoint instead.
        RuntimeError: The model or its weights could not be created for another reason.
    """
    name = name.removeprefix(TIMM_PREFIX)
    if pretrained is None:
        return timm.create_model(name, pretrained=False).eval()
    full_name = name if pretrained == "default" else f"{name}.{pretrained}"
    overlay = _cached_weights_overlay(full_name)
    try:
        return timm.create_model(full_name, pretrained=True, **overlay).eval()
    except Exception as error:  # hub, network and registry errors: add the way out
        raise RuntimeError(
            f"could not load timm model {full_name!r} with pretrained weights: {error}. {_WAY_OUT}"
        ) from error


_WAY_OUT = (
    "Offline, create it randomly initialised and pass a local checkpoint: "
    "pretrained=None, weights='/path/to/weights.pth' (with weights_remap if its keys differ)."
)
_HF_WEIGHTS = "pytorch_model.bin"
_HF_SAFE_ALTERNATIVES = {
    "pytorch_model.bin": "model.safetensors",
    "open_clip_pytorch_model.bin": "open_clip_model.safetensors",
}


def _cached_weights_overlay(full_name: str) -> dict[str, Any]:
    """Extra ``timm.create_model`` arguments that load cached weights when the hub is unusable.

    Empty when the source can be used (or timm does not know the name: its own error
    follows); ``{"pretrained_cfg_overlay": {"file": path}}`` with the cached copy otherwise.

    Raises:
        WeightsUnavailableError: The source cannot be used and nothing is cached.
    """
    cfg = _get_pretrained_cfg(full_name)
    if cfg is None or cfg.file or cfg.state_dict is not None:
        return {}
    if cfg.hf_hub_id:
        repo, _, revision = cfg.hf_hub_id.partition("@")
        filename = cfg.hf_hub_filename or _HF_WEIGHTS
        reason = hub_unreachable_reason()
        if reason is None:
            return {}
        names = (_HF_SAFE_ALTERNATIVES.get(filename, filename), filename)
        cached = cached_hub_file(repo, *names, revision=revision or None)
        source, cache = f"{_hub_endpoint()}/{repo}", _hub_cache_dir()
    elif cfg.url:
        reason = hub_unreachable_reason(cfg.url)
        if reason is None:
            return {}
        path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(cfg.url))
        cached = path if os.path.isfile(path) else None
        source, cache = cfg.url, os.path.dirname(path)
    else:
        return {}
    if cached is not None:
        return {"pretrained_cfg_overlay": {"file": cached}}
    raise WeightsUnavailableError(
        f"the pretrained weights of timm model {full_name!r} are not in the local cache "
        f"({cache}) and cannot be downloaded from {source} now ({reason}). To run "
        "without the hub, pass a local checkpoint: pretrained=None, "
        "weights='/path/to/weights.pth' (with weights_remap if its keys differ); or download "
        "them once where the hub is reachable (they are cached for later runs)."
    )


def _get_pretrained_cfg(full_name: str) -> Any:
    """The timm pretrained config of ``"arch"`` or ``"arch.tag"``; ``None`` if unknown."""
    try:
        return timm.models.get_pretrained_cfg(full_name)
    except Exception:  # unknown names and tags: timm.create_model raises the clear error
        return None


class TimmEncoder(FrozenEncoder):
    """A frozen timm CNN or ViT with tapped layers.

    Args:
        model: A timm model name (``"tf_efficientnet_lite0"``, ``"timm/..."`` accepted) or
            a timm model object (a CNN with ``feature_info``, or a ViT with
            ``forward_intermediates``). An object is used as is, frozen in place.
        image_size: Square input side. ViTs get their position embedding resized
            (timm's ``set_input_size``) when it differs from the model's.
        layers: 1-based indices into the model's ``feature_info`` (CNN pyramid levels or
            ViT blocks), shallow to deep. ``None``:
            [`default_cnn_layers`][cncad.encoders.timm.default_cnn_layers] for CNNs,
            [`default_layers`][cncad.encoders.clip.default_layers] for ViTs.
        num_taps: Number of taps when ``layers`` is ``None``.
        weights: Local checkpoint loaded into the full model before anything is pruned.
        remap: Key-remapping hook or registered name for ``weights`` (see
            [`cncad.encoders.weights`][cncad.encoders.weights]).
        pretrained: timm pretrained tag when ``model`` is a name (needs the hub).
        input_mean: Per-channel mean the incoming images were normalised with (CLIP's,
            as produced by [`preprocess`][cncad.data.transforms.preprocess]).
        input_std: Their per-channel standard deviation.
        renormalize: Convert from ``input_mean``/``input_std`` to the model's own
            normalisation (``pretrained_cfg``, ImageNet's when absent) before the model.

    Shapes:
        forward: ``(B, 3, image_size, image_size)`` normalised images ->
        [`EncoderFeatures`][cncad.encoders.base.EncoderFeatures] with ``(B, h_i * w_i, C_i)`` patch
        tokens; class tokens ``(B, C)`` for ViTs with one, ``None`` for CNNs.
    """

    def __init__(
        self,
        model: str | nn.Module,
        image_size: int = 224,
        layers: Sequence[int] | None = None,
        num_taps: int = 3,
        weights: str | os.PathLike | None = None,
        remap: KeyRemap | str | None = None,
        pretrained: str | None = None,
        input_mean: Sequence[float] = CLIP_MEAN,
        input_std: Sequence[float] = CLIP_STD,
        renormalize: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(model, str):
            self.name = model.removeprefix(TIMM_PREFIX)
            model = create_timm_model(model, pretrained)
        else:
            self.name = type(model).__name__
        if weights is not None:
            load_encoder_weights(model, weights, remap)
        info = getattr(model, "feature_info", None)
        if info is None:
            raise TypeError(f"{type(model).__name__} has no feature_info: not a timm model")
        levels = len(info) if isinstance(info, list) else len(info.info)
        self.is_vit = hasattr(model, "patch_embed") and hasattr(model, "num_prefix_tokens")
        if self.is_vit:
            _set_vit_input_size(model, image_size)
            default = default_layers(levels, num_taps)
        else:
            default = default_cnn_layers(levels, num_taps)
        self.layers = tuple(layers) if layers is not None else default
        if min(self.layers) < 1 or max(self.layers) > levels:
            raise ValueError(f"layers {self.layers} out of range for {levels} feature levels")
        self.image_size = image_size
        self._indices = indices = [i - 1 for i in self.layers]
        self.features: nn.Module | None = None
        if hasattr(model, "forward_intermediates"):
            if hasattr(model, "prune_intermediate_layers"):
                model.prune_intermediate_layers(indices, prune_norm=True, prune_head=True)
            self.model = model
        elif not self.is_vit:
            self.model = timm.models.FeatureListNet(model, out_indices=indices)
            self.features = self.model
        else:
            raise TypeError(f"{type(model).__name__} has no forward_intermediates")
        self._has_class_token = self.is_vit and getattr(model, "cls_token", None) is not None
        cfg = getattr(model, "pretrained_cfg", None) or {}
        mean = torch.tensor(cfg.get("mean", IMAGENET_DEFAULT_MEAN) if renormalize else input_mean)
        std = torch.tensor(cfg.get("std", IMAGENET_DEFAULT_STD) if renormalize else input_std)
        # x_model = (x_input * input_std + input_mean - mean) / std, per channel
        scale = torch.tensor(input_std, dtype=torch.float32) / std
        shift = (torch.tensor(input_mean, dtype=torch.float32) - mean) / std
        self.register_buffer("input_scale", scale.float().view(1, 3, 1, 1), persistent=False)
        self.register_buffer("input_shift", shift.float().view(1, 3, 1, 1), persistent=False)
        self.freeze()
        with torch.no_grad():
            probe, grids = self._run(torch.zeros(1, 3, image_size, image_size))
        self._widths = tuple(t.shape[-1] for t in probe.patch_tokens)
        self._grids: tuple[Grid, ...] = tuple(grids)

    @property
    def widths(self) -> tuple[int, ...]:
        """Channel width C_i of each tapped layer."""
        return self._widths

    @property
    def grids(self) -> tuple[Grid, ...]:
        """Token grid ``(h_i, w_i)`` of each tapped layer."""
        return self._grids

    @property
    def has_class_token(self) -> bool:
        """True for ViTs with a class token."""
        return self._has_class_token

    @property
    def num_heads(self) -> int | None:
        """Attention heads of a ViT's blocks; ``None`` for CNNs."""
        if not self.is_vit:
            return None
        attn = getattr(self.model.blocks[0], "attn", None)
        return getattr(attn, "num_heads", None)

    @torch.no_grad()
    def forward(self, images: Tensor) -> EncoderFeatures:
        """Run the model and return the tapped features as tokens."""
        return self._run(images)[0]

    def _run(self, images: Tensor) -> tuple[EncoderFeatures, list[Grid]]:
        self.check_input(images)
        images = images * self.input_scale.to(images.dtype) + self.input_shift.to(images.dtype)
        indices = self._indices
        if self.is_vit:
            out = self.model.forward_intermediates(
                images,
                indices=indices,
                intermediates_only=True,
                output_fmt="NLC",
                return_prefix_tokens=True,
                norm=False,
            )
            patch_tokens = [tokens for tokens, _ in out]
            class_tokens = [prefix[:, 0] for _, prefix in out] if self.has_class_token else None
            grid = tuple(self.model.patch_embed.grid_size)
            return EncoderFeatures(class_tokens, patch_tokens), [grid] * len(patch_tokens)
        if self.features is not None:
            maps = self.features(images)
        else:
            maps = self.model.forward_intermediates(
                images, indices=indices, intermediates_only=True
            )
        tokens = [m.flatten(2).transpose(1, 2) for m in maps]
        return EncoderFeatures(None, tokens), [tuple(m.shape[-2:]) for m in maps]

    def extra_repr(self) -> str:
        """The model name and taps, for ``repr``."""
        return f"name={self.name!r}, layers={self.layers}, image_size={self.image_size}"


def _set_vit_input_size(model: nn.Module, image_size: int) -> None:
    current = getattr(model.patch_embed, "img_size", None)
    if current is not None and tuple(current) == (image_size, image_size):
        return
    if not hasattr(model, "set_input_size"):
        raise TypeError(f"{type(model).__name__} cannot change its input size")
    model.set_input_size(img_size=(image_size, image_size))
