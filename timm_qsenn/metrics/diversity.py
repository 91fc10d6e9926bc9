"""Diversity@k (Q-SENN) and SID@k (QPM): how differently the top-k features of a class fire over an image.

How images are counted and the top k chosen, and where that differs from the reference: the package docstring.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from ._internal import check_weight, nanmean
from .sparsity import used_features

__all__ = ["DiversityVariant", "diversity_per_image", "diversity_at_k", "sid_at_k"]

DiversityVariant = Literal["diversity", "sid"]
_SID_EPS = 1e-5


def diversity_per_image(
    feature_maps: Tensor,
    predictions: Tensor,
    weight: Tensor,
    k: int = 5,
    variant: DiversityVariant = "diversity",
) -> Tensor:
    """Per-image diversity@k (``variant='diversity'``, Q-SENN) or SID@k (``'sid'``, QPM); NaN where not counted.

    For an image predicted as class c, the maps of the ``k`` features with the largest signed weights of c are
    each soft-maxed over space (SID first divides a map by its mean absolute value); the score is the sum over
    positions of their pointwise maximum, divided by ``k``. It lies in [1/k, 1]: 1/k for identical maps, 1 for
    maps whose soft-maxed mass sits at disjoint positions. Images whose class has fewer than ``k`` non-zero
    weights are not counted (NaN).
    """
    check_weight(weight)
    if feature_maps.ndim != 4 or feature_maps.shape[1] != weight.shape[1]:
        raise ValueError(
            f"feature_maps must be B x {weight.shape[1]} x H x W (one map per class-layer feature), got "
            f"{tuple(feature_maps.shape)}"
        )
    if predictions.shape != (feature_maps.shape[0],):
        raise ValueError(f"predictions must hold one class index per image, got {tuple(predictions.shape)}")
    if k < 1:
        raise ValueError(f"k must be a positive number of features, got {k}")
    if variant not in ("diversity", "sid"):
        raise ValueError(f"variant must be 'diversity' (Q-SENN) or 'sid' (QPM), got {variant!r}")
    relevant = used_features(weight)
    scores = torch.full((feature_maps.shape[0],), math.nan, device=feature_maps.device)
    if relevant.numel() < k:
        return scores
    rows = weight.float()[:, relevant][predictions]
    eligible = (rows != 0).sum(dim=1) >= k
    if not eligible.any():
        return scores
    order = torch.sort(rows[eligible], dim=1, descending=True, stable=True).indices[:, :k]
    maps = feature_maps[eligible][:, relevant].float().flatten(2)
    top = maps.gather(1, order.unsqueeze(2).expand(-1, -1, maps.shape[2]))
    if variant == "sid":
        top = top / top.abs().mean(dim=2, keepdim=True).clamp(min=_SID_EPS)
    scores[eligible] = top.softmax(dim=2).amax(dim=1).sum(dim=1) / k
    return scores


def diversity_at_k(feature_maps: Tensor, predictions: Tensor, weight: Tensor, k: int = 5) -> float:
    """Q-SENN's diversity@k (plain spatial softmax), averaged over the counted images; NaN if none counts."""
    return nanmean(diversity_per_image(feature_maps, predictions, weight, k, "diversity"))


def sid_at_k(feature_maps: Tensor, predictions: Tensor, weight: Tensor, k: int = 5) -> float:
    """QPM's SID@k (maps divided by their mean absolute value before the softmax), averaged over counted images."""
    return nanmean(diversity_per_image(feature_maps, predictions, weight, k, "sid"))
