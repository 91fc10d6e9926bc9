"""Accuracy, sparsity and the interpretability metrics of the Q-SENN family: tensor functions and one driver.

Every metric is a plain function over tensors (section 2 of the method notes); :func:`evaluate` runs them all
over data loaders with bounded memory. The modules, one concern each:

* ``sparsity``: accuracy, used features, weights per class.
* ``diversity``: diversity@k (Q-SENN) and SID@k (QPM) on feature maps.
* ``activations``: dependence, class-independence, contrastiveness (1-D Gaussian mixtures), correlation.
* ``grounding``: alignment with image attributes, structural grounding of classes.
* ``accumulators``: the streaming sums the metrics over a whole split keep between batches.
* ``results``: :class:`QSENNMetrics`; ``evaluation``: the driver :func:`evaluate`.

Conventions, and where they differ from the reference code:

* ``diversity_at_k`` is Q-SENN's diversity@k (plain spatial softmax); ``sid_at_k`` is QPM's SID@k (each map
  divided by its mean absolute value first). Their values are not comparable with each other.
* Both average over **every** test image whose predicted class has at least ``k`` non-zero weights. The
  reference bounds its loop by the training-set length (``floor(len(train) / 300)`` blocks of 300 test
  images), which drops the tail of the test set (94 of CUB's 5794 images); that is a bug, fixed here as in
  CHiQPM.
* The ``k`` features of a class are its ``k`` largest **signed** weights, as in the reference: a class with
  fewer than ``k`` positive weights gets zero-weight features of other classes ahead of its negative ones.
  Ties are broken by feature index (a stable sort), where the reference's ``topk`` leaves them unspecified.
* Only features with a non-zero weight in some class take part (the reference's "relevant features").
* Dependence uses the raw pooled features, as Q-SENN does; class-independence, contrastiveness and correlation
  use the normalised features the class layer reads, as QPM does (the first two are invariant to that choice).
* Without a training loader the split-wide metrics run on the test loader; ``QSENNMetrics.feature_split`` says
  which split they describe.

The CUB-200-2011 attribute readers live in :mod:`timm_qsenn.data.attributes`; they are re-exported here.
"""

from ..data.attributes import AttributeLabels, read_cub_attributes, read_cub_class_attributes
from .activations import (
    class_independence,
    contrastiveness,
    correlation,
    dependence,
    dependence_per_image,
    fit_gaussian_mixture_1d,
)
from .diversity import diversity_at_k, diversity_per_image, sid_at_k
from .evaluation import evaluate
from .grounding import alignment, alignment_matrix, structural_grounding
from .results import QSENNMetrics
from .sparsity import accuracy, num_features_used, used_features, weights_per_class

__all__ = [
    "accuracy",
    "used_features",
    "num_features_used",
    "weights_per_class",
    "diversity_per_image",
    "diversity_at_k",
    "sid_at_k",
    "dependence_per_image",
    "dependence",
    "class_independence",
    "fit_gaussian_mixture_1d",
    "contrastiveness",
    "correlation",
    "alignment_matrix",
    "alignment",
    "structural_grounding",
    "AttributeLabels",
    "read_cub_attributes",
    "read_cub_class_attributes",
    "QSENNMetrics",
    "evaluate",
]
