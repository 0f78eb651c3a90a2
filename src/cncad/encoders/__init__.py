"""Frozen feature encoders."""

from cncad.encoders.clip import (
    TINY_BACKBONE,
    CLIPEncoder,
    CLIPTextTower,
    EncoderFeatures,
    build_tiny_clip,
    clip_bpe_tokenizer,
    default_layers,
    load_clip,
)

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
