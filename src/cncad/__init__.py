"""cncad: Cross-modal Normality Constraint for unsupervised multi-class anomaly detection.

The facade (``CNCDetector``), the model (``CNCModel``), its building blocks
(``cncad.modules``), the scoring function and the metrics are all importable from here.
"""

__version__ = "0.1.0"

from cncad.config import CNCConfig
from cncad.detector import CNCDetector, Prediction
from cncad.encoders import CLIPEncoder, CLIPTextTower, EncoderFeatures, build_tiny_clip
from cncad.errors import CNCADError, DatasetError, ModelFileError, ModelVersionError
from cncad.evaluation import AnomalyEvaluator
from cncad.losses import (
    LossTerms,
    alignment_loss,
    constraint_loss,
    distillation_loss,
    total_loss,
)
from cncad.metrics import (
    aupro,
    image_ap,
    image_auroc,
    image_f1_max,
    pixel_ap,
    pixel_auroc,
    pixel_f1_max,
)
from cncad.model import CNCModel, CNCOutput
from cncad.modules import (
    FeatureNoise,
    FeatureNormalityPromotion,
    GatedMoE,
    MoEOutput,
    MultiLayerFusion,
    PromptLearner,
    ResidualAttentionDecoder,
    importance_loss,
    normality_coefficient,
)
from cncad.scoring import anomaly_map, image_score

__all__ = [
    "AnomalyEvaluator",
    "CLIPEncoder",
    "CLIPTextTower",
    "CNCADError",
    "CNCConfig",
    "CNCDetector",
    "CNCModel",
    "CNCOutput",
    "DatasetError",
    "EncoderFeatures",
    "FeatureNoise",
    "FeatureNormalityPromotion",
    "GatedMoE",
    "LossTerms",
    "MoEOutput",
    "ModelFileError",
    "ModelVersionError",
    "MultiLayerFusion",
    "Prediction",
    "PromptLearner",
    "ResidualAttentionDecoder",
    "__version__",
    "alignment_loss",
    "anomaly_map",
    "aupro",
    "build_tiny_clip",
    "constraint_loss",
    "distillation_loss",
    "image_ap",
    "image_auroc",
    "image_f1_max",
    "image_score",
    "importance_loss",
    "normality_coefficient",
    "pixel_ap",
    "pixel_auroc",
    "pixel_f1_max",
    "total_loss",
]
