"""timm_qsenn: Q-SENN (Quantized Self-Explaining Neural Networks) heads for any timm backbone.

Importing the package registers every ``*_qsenn`` model with timm::

    import timm, timm_qsenn
    model = timm.create_model("resnet50_qsenn", pretrained=True, num_classes=200)
"""

from ._utils import package_version
from .adapter import MapAdapter
from .head import STAGES, QSENNHead
from .losses import FeatureDiversityLoss, feature_diversity_loss
from .qsenn import QSENN, QSENNOutput
from .ternary import TernaryWeights, pack_ternary, quantize_ternary, ternary_bias, unpack_ternary

__version__ = package_version()

__all__ = [
    "QSENN",
    "QSENNOutput",
    "QSENNHead",
    "MapAdapter",
    "STAGES",
    "FeatureDiversityLoss",
    "feature_diversity_loss",
    "TernaryWeights",
    "quantize_ternary",
    "ternary_bias",
    "pack_ternary",
    "unpack_ternary",
    "__version__",
]
