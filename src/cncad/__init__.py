"""cncad: Cross-modal Normality Constraint for unsupervised multi-class anomaly detection.

The top level holds what users import: the facade ([`CNCDetector`][cncad.detector.CNCDetector]
and its [`Prediction`][cncad.detector.Prediction]), the configuration, the model and its
training engine, CNC's building blocks as plain modules and functions, the scoring
functions, the evaluator and the errors. Everything else lives in its module:
``cncad.losses`` (eqs. 4, 9-11, 16), ``cncad.metrics``, ``cncad.encoders``, ``cncad.data``,
``cncad.checkpoint`` (the file format), ``cncad.files``, ``cncad.visualize``.
"""

__version__ = "0.3.0"

import importlib
import warnings
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cncad.config import CNCConfig
    from cncad.detector import CNCDetector, Prediction, PredictionBatch
    from cncad.errors import (
        CNCADError,
        DatasetError,
        ModelFileError,
        ModelVersionError,
        NonFiniteError,
        NotTrainedError,
        TrainingBusyError,
        WeightsUnavailableError,
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
    "NotTrainedError",
    "Prediction",
    "PredictionBatch",
    "PromptLearner",
    "ResidualAttentionDecoder",
    "Trainer",
    "TrainingBusyError",
    "WeightsUnavailableError",
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


# Where each public name is defined. They are imported on first access (PEP 562), so that
# ``import cncad`` and the command line's ``--help`` do not pay for torch and open_clip.
_PUBLIC = {
    "AnomalyEvaluator": "cncad.evaluation",
    "CNCADError": "cncad.errors",
    "CNCConfig": "cncad.config",
    "CNCDetector": "cncad.detector",
    "CNCModel": "cncad.model",
    "DatasetError": "cncad.errors",
    "FeatureNoise": "cncad.modules",
    "FeatureNormalityPromotion": "cncad.modules",
    "GatedMoE": "cncad.modules",
    "ModelFileError": "cncad.errors",
    "ModelVersionError": "cncad.errors",
    "MultiLayerFusion": "cncad.modules",
    "NonFiniteError": "cncad.errors",
    "NotTrainedError": "cncad.errors",
    "Prediction": "cncad.detector",
    "PredictionBatch": "cncad.detector",
    "PromptLearner": "cncad.modules",
    "ResidualAttentionDecoder": "cncad.modules",
    "Trainer": "cncad.training",
    "TrainingBusyError": "cncad.errors",
    "WeightsUnavailableError": "cncad.errors",
    "anomaly_map": "cncad.scoring",
    "image_score": "cncad.scoring",
    "importance_loss": "cncad.modules",
}


def __getattr__(name: str) -> Any:
    """Import a public name from its module on first access.

    Names that cncad 0.1 exported here and that now live only in their own module still
    import, with a ``DeprecationWarning`` that names the module.

    Args:
        name: The attribute looked up on ``cncad``.

    Returns:
        The object ``name`` refers to.

    Raises:
        AttributeError: ``name`` is neither public nor a moved name.
    """
    module = _PUBLIC.get(name)
    if module is not None:
        value = getattr(importlib.import_module(module), name)
        globals()[name] = value  # later look-ups no longer reach __getattr__
        return value
    module = _MOVED.get(name)
    if module is None:
        raise AttributeError(f"module 'cncad' has no attribute {name!r}")
    warnings.warn(
        f"cncad.{name} has moved: import it from {module}", DeprecationWarning, stacklevel=2
    )
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    """The module's attributes, the public names not imported yet included."""
    return sorted(set(globals()) | set(__all__))
