"""Accuracy and the sparsity of the class layer: which features are used, and how many weights a class has."""

from __future__ import annotations

from torch import Tensor

from ._internal import check_weight

__all__ = ["accuracy", "used_features", "num_features_used", "weights_per_class"]


def accuracy(logits: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy as a fraction in [0, 1], from B x C logits or B predicted class indices."""
    predictions = logits.argmax(dim=1) if logits.ndim == 2 else logits
    if predictions.shape != labels.shape:
        raise ValueError(
            f"predictions {tuple(predictions.shape)} and labels {tuple(labels.shape)} differ in shape; "
            "pass B x C logits or B class indices with B labels"
        )
    if labels.numel() == 0:
        raise ValueError("accuracy of an empty batch is undefined; pass at least one image")
    return int((predictions == labels).sum()) / labels.numel()


def used_features(weight: Tensor) -> Tensor:
    """Indices of the features (columns of the C x F class layer) that some class gives a non-zero weight."""
    check_weight(weight)
    return (weight != 0).any(dim=0).nonzero().flatten()


def num_features_used(weight: Tensor) -> int:
    """Number of features with a non-zero weight in some class (``NFfeatures`` of the reference)."""
    return int(used_features(weight).numel())


def weights_per_class(weight: Tensor) -> float:
    """Mean number of non-zero weights per class (``PerClass`` of the reference; about n_wc for Q-SENN)."""
    check_weight(weight)
    return int(weight.count_nonzero()) / weight.shape[0]
