"""cncad: Cross-modal Normality Constraint for unsupervised multi-class anomaly detection.

The top level holds what users import: the facade ([`CNCDetector`][cncad.detector.CNCDetector]
and its [`Prediction`][cncad.detector.Prediction]), the configuration, the model and its
training engine, CNC's building blocks as plain modules and functions, the scoring
functions, the evaluator and the errors. Everything else lives in its module:
``cncad.losses`` (eqs. 4, 9-11, 16), ``cncad.metrics``, ``cncad.encoders``, ``cncad.data``,
``cncad.checkpoint`` (the file format), ``cncad.files``, ``cncad.visualize``.
"""

__version__ = "0.2.0"

import importlib
import warnings
from typing import Any

from cncad.config import CNCConfig
from cncad.detector import CNCDetector, Prediction
from cncad.errors import (
    CNCADError,
    DatasetError,
    ModelFileError,
    ModelVersionError,
    NonFiniteError,
    TrainingBusyError,
)
from cncad.evaluation import AnomalyEvaluator
from cncad.model import CNCModel
from cncad.modules import (
    FeatureNoise,
    FeatureNormalityPromotion,
    GatedMoE,
    MultiLayerFusion,
    PromptLearner,
    ResidualAttentionDecoder,
    importance_loss,
)
from cncad.scoring import anomaly_map, image_score
from cncad.training import Trainer

__all__ = [
    "AnomalyEvaluator",
    "CNCADError",
    "CNCConfig",
    "CNCDetector",
    "CNCModel",
    "DatasetError",
    "FeatureNoise",
    "FeatureNormalityPromotion",
    "GatedMoE",
    "ModelFileError",
    "ModelVersionError",
    "MultiLayerFusion",
    "NonFiniteError",
    "Prediction",
    "PromptLearner",
    "ResidualAttentionDecoder",
    "Trainer",
    "TrainingBusyError",
    "__version__",
    "anomaly_map",
    "image_score",
    "importance_loss",
]

# Names that cncad 0.1 exported here and that now live only in their own module.
_MOVED = {
    "CLIPEncoder": "cncad.encoders",
    "CLIPTextTower": "cncad.encoders",
    "EncoderFeatures": "cncad.encoders",
    "build_tiny_clip": "cncad.encoders",
    "LossTerms": "cncad.losses",
    "alignment_loss": "cncad.losses",
    "constraint_loss": "cncad.losses",
    "distillation_loss": "cncad.losses",
    "total_loss": "cncad.losses",
    "aupro": "cncad.metrics",
    "image_ap": "cncad.metrics",
    "image_auroc": "cncad.metrics",
    "image_f1_max": "cncad.metrics",
    "pixel_ap": "cncad.metrics",
    "pixel_auroc": "cncad.metrics",
    "pixel_f1_max": "cncad.metrics",
    "CNCOutput": "cncad.model",
    "MoEOutput": "cncad.modules",
    "normality_coefficient": "cncad.modules",
}


def __getattr__(name: str) -> Any:
    """Keep ``from cncad import <moved name>`` working for a while, with a warning."""
    module = _MOVED.get(name)
    if module is None:
        raise AttributeError(f"module 'cncad' has no attribute {name!r}")
    warnings.warn(
        f"cncad.{name} has moved: import it from {module}", DeprecationWarning, stacklevel=2
    )
    return getattr(importlib.import_module(module), name)
