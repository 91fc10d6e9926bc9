"""Sparsification on pooled feature matrices, on tensors only: (group) elastic-net paths, feature selection and
the Q-SENN quantisation step. Pooled features of a model over a loader are :mod:`timm_qsenn.features`."""

from __future__ import annotations

from typing import Any

from .select import SelectionPath, normalize_features, select_features, selection_path, split_indices
from .solver import RegPath, elastic_net_path, kkt_violation, lambda_grid, lambda_max, objective
from .sparsify import SparseHead, sparsify

__all__ = [
    "RegPath",
    "elastic_net_path",
    "lambda_max",
    "lambda_grid",
    "objective",
    "kkt_violation",
    "SelectionPath",
    "selection_path",
    "select_features",
    "split_indices",
    "normalize_features",
    "SparseHead",
    "sparsify",
]


def __getattr__(name: str) -> Any:
    """The feature names that moved to :mod:`timm_qsenn.features`, kept one release with a DeprecationWarning."""
    from .features import MOVED, moved

    if name in MOVED:
        return moved(__name__, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
