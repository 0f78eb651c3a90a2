"""Shared fixtures: the tiny CLIP backbone at a small input size."""

from __future__ import annotations

import pytest
import torch

from cncad.config import CNCConfig

TINY_SIZE = 56  # 4x4 patch grid with the tiny backbone's patch size 14


torch.set_num_threads(2)


@pytest.fixture
def tiny_config() -> CNCConfig:
    return CNCConfig(
        backbone="tiny",
        pretrained=None,
        image_size=TINY_SIZE,
        batch_size=4,
        epochs=1,
        theta=1,
        sigma=1.0,
        device="cpu",
    )
