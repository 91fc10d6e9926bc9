"""Input checks and the NaN-skipping mean that the metric modules of this package share."""

from __future__ import annotations

import math

from torch import Tensor


def check_weight(weight: Tensor) -> None:
    """Raise unless ``weight`` is a C x F class-layer matrix."""
    if weight.ndim != 2:
        raise ValueError(f"weight must be the C x F class-layer matrix, got shape {tuple(weight.shape)}")


def check_features(features: Tensor, num_features: int | None = None) -> None:
    """Raise unless ``features`` is an N x F matrix (with ``num_features`` columns when given)."""
    if features.ndim != 2 or (num_features is not None and features.shape[1] != num_features):
        expected = "F" if num_features is None else str(num_features)
        raise ValueError(f"features must be an N x {expected} matrix, got shape {tuple(features.shape)}")


def nanmean(values: Tensor) -> float:
    """The mean of the values that are not NaN (in float64); NaN when every value is."""
    finite = values[~values.isnan()]
    return float(finite.double().mean()) if finite.numel() else math.nan
