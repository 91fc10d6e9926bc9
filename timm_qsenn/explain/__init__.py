"""Global and local explanations of Q-SENN decisions, as data first and as figures on request.

* :func:`global_explanation` (``global_explanations``): every class with its features and their signs, every
  feature with its classes.
* :func:`explain_image` (``local_explanations``): one image's decision: the contribution of each feature to the
  predicted logit (``w_cj * normalised f_j``; with the bias they add up to the logit), the feature maps
  upsampled to the image, the runner-up class and the features that separate the two.
* :func:`feature_gallery` (``gallery``): the most activating images of every feature, found with bounded memory.
* Figures (``figures``, the optional ``plot`` extra, matplotlib): :func:`plot_explanation` and
  :func:`plot_class_sheet`; :func:`write_report` (``report``) writes a static HTML report that needs only Pillow.
* ``images``: what they all draw with: inputs back to displayable images, upsampled maps, heatmap overlays.
"""

from .figures import plot_class_sheet, plot_explanation
from .gallery import FeatureGallery, GalleryImage, feature_gallery
from .global_explanations import (
    ClassExplanation,
    FeatureUse,
    GlobalExplanation,
    class_names_of,
    feature_names_of,
    global_explanation,
)
from .images import heatmap_overlay
from .local_explanations import (
    FeatureContribution,
    LocalExplanation,
    SeparatingFeature,
    explain_image,
    feature_contributions,
)
from .report import write_report

__all__ = [
    "FeatureUse",
    "ClassExplanation",
    "GlobalExplanation",
    "global_explanation",
    "feature_names_of",
    "class_names_of",
    "FeatureContribution",
    "SeparatingFeature",
    "LocalExplanation",
    "feature_contributions",
    "explain_image",
    "GalleryImage",
    "FeatureGallery",
    "feature_gallery",
    "heatmap_overlay",
    "plot_explanation",
    "plot_class_sheet",
    "write_report",
]
