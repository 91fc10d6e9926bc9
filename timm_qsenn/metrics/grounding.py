"""Grounding in human concepts: alignment of features with image attributes, structural grounding of classes."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._internal import check_features, check_weight
from .accumulators import AttributeContrast

__all__ = ["alignment_matrix", "best_per_feature", "alignment", "structural_grounding"]


def _check_attributes(features: Tensor, present: Tensor, known: Tensor | None) -> Tensor:
    """The ``known`` mask (all true when None), after checking both matrices against ``features``."""
    check_features(features)
    if present.ndim != 2 or present.shape[0] != features.shape[0]:
        raise ValueError(
            f"attributes must be an N x A matrix with one row per feature row ({features.shape[0]}), got "
            f"{tuple(present.shape)}"
        )
    if known is None:
        return torch.ones_like(present, dtype=torch.bool)
    if known.shape != present.shape:
        raise ValueError(f"known must have the attributes' shape {tuple(present.shape)}, got {tuple(known.shape)}")
    return known


def alignment_matrix(features: Tensor, attributes: Tensor, known: Tensor | None = None) -> Tensor:
    """F x A normalised contrasts: mean of f_j on images with attribute a minus without, over mean(f_j - min f_j).

    Only labels where ``known`` is true count. Invariant to positive affine rescaling of each feature; NaN
    where an attribute is never (or always) present among the known labels, or a feature never varies.
    """
    known = _check_attributes(features, attributes, known)
    contrast = AttributeContrast(features.shape[1], attributes.shape[1])
    contrast.update(features, attributes, known)
    return contrast.compute()


def best_per_feature(matrix: Tensor) -> Tensor:
    """Each feature's best (largest) entry of an F x A alignment matrix, for the features that have one."""
    best = matrix.nan_to_num(nan=-math.inf).amax(dim=1)
    return best[torch.isfinite(best)]


def alignment(features: Tensor, attributes: Tensor, known: Tensor | None = None) -> float:
    """Q-SENN's Alignment: the mean over features of the best normalised attribute contrast (higher is better)."""
    best = best_per_feature(alignment_matrix(features, attributes, known))
    return float(best.mean()) if best.numel() else math.nan


def structural_grounding(weight: Tensor, class_attributes: Tensor, top: int = 50) -> float:
    """QPM's Structural Grounding: how much the most attribute-similar class pairs also share features.

    Class similarity is the cosine between rows of the class layer (model) and between class attribute vectors
    (ground truth), diagonal set to 0. Over the ``top`` largest ground-truth entries (ordered pairs, so about
    ``top / 2`` class pairs), the score is the sum of model similarities over the sum of ground-truth ones.
    1 when the class layer's rows are the attribute vectors.
    """
    check_weight(weight)
    if class_attributes.ndim != 2 or class_attributes.shape[0] != weight.shape[0]:
        raise ValueError(
            f"class_attributes must be a C x A matrix with one row per class ({weight.shape[0]}), got "
            f"{tuple(class_attributes.shape)}"
        )
    if top < 1 or top > weight.shape[0] * (weight.shape[0] - 1):
        raise ValueError(f"top must lie in [1, C * (C - 1)] = [1, {weight.shape[0] * (weight.shape[0] - 1)}]")
    model_sim = _cosine_without_diagonal(weight.detach().double().cpu())
    truth_sim = _cosine_without_diagonal(class_attributes.double().cpu())
    values, indices = truth_sim.flatten().topk(top)
    return float(model_sim.flatten()[indices].sum() / values.sum())


def _cosine_without_diagonal(rows: Tensor) -> Tensor:
    """Cosine similarities between the rows, with 0 on the diagonal."""
    unit = torch.nn.functional.normalize(rows, dim=1)
    return (unit @ unit.T).fill_diagonal_(0)
