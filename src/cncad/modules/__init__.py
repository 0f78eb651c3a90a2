"""Reusable building blocks of CNC, each a plain ``nn.Module`` or function."""

from cncad.modules.decoder import ResidualAttentionDecoder
from cncad.modules.fusion import FeatureNoise, MultiLayerFusion
from cncad.modules.moe import GatedMoE, MoEOutput, importance_loss
from cncad.modules.normality_promotion import FeatureNormalityPromotion, normality_coefficient
from cncad.modules.prompt_learner import PromptLearner

__all__ = [
    "FeatureNoise",
    "FeatureNormalityPromotion",
    "GatedMoE",
    "MoEOutput",
    "MultiLayerFusion",
    "PromptLearner",
    "ResidualAttentionDecoder",
    "importance_loss",
    "normality_coefficient",
]
