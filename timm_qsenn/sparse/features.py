"""Deprecated: pooled features and their cache moved to :mod:`timm_qsenn.features`, since ``sparse`` works on
tensors only. This alias, and the same names in :mod:`timm_qsenn.sparse`, go in the next release."""

from __future__ import annotations

import importlib
import warnings
from typing import Any

# The names that moved; timm_qsenn.features is imported on first use, so importing sparse never loads models.
MOVED = (
    "FeatureSet",
    "extract_features",
    "pooled_features",
    "clear_feature_cache",
    "feature_cache_key",
    "dataset_fingerprint",
)


def moved(module: str, name: str) -> Any:
    """``timm_qsenn.features.<name>`` for a deprecated alias in ``module``, with a DeprecationWarning."""
    warnings.warn(
        f"{module}.{name} is deprecated and goes in the next release; import {name} from timm_qsenn.features",
        DeprecationWarning,
        stacklevel=3,  # the code that looked the alias up, past this function and a module __getattr__
    )
    return getattr(importlib.import_module("timm_qsenn.features"), name)


def __getattr__(name: str) -> Any:
    """The names that moved to :mod:`timm_qsenn.features`, with a DeprecationWarning."""
    if name in MOVED:
        return moved(__name__, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
