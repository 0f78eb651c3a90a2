"""Frozen feature encoders: the interface, CLIP, timm, and local weight loading."""

from cncad.encoders.base import EncoderFeatures, FrozenEncoder, resample_tokens, tokens_to_map
from cncad.encoders.clip import (
    TINY_BACKBONE,
    CLIPEncoder,
    CLIPTextTower,
    build_tiny_clip,
    clip_bpe_tokenizer,
    default_layers,
    load_clip,
)
from cncad.encoders.timm import TIMM_PREFIX, TimmEncoder, create_timm_model, default_cnn_layers
from cncad.encoders.weights import (
    KeyRemap,
    available_remaps,
    cached_hub_file,
    get_remap,
    hub_unreachable_reason,
    load_encoder_weights,
    load_state_dict_file,
    register_remap,
    remap_by_order,
)

__all__ = [
    "TIMM_PREFIX",
    "TINY_BACKBONE",
    "CLIPEncoder",
    "CLIPTextTower",
    "EncoderFeatures",
    "FrozenEncoder",
    "KeyRemap",
    "TimmEncoder",
    "available_remaps",
    "build_tiny_clip",
    "cached_hub_file",
    "clip_bpe_tokenizer",
    "create_timm_model",
    "default_cnn_layers",
    "default_layers",
    "get_remap",
    "hub_unreachable_reason",
    "load_clip",
    "load_encoder_weights",
    "load_state_dict_file",
    "register_remap",
    "remap_by_order",
    "resample_tokens",
    "tokens_to_map",
]
