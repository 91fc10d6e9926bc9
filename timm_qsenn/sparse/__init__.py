"""Sparsification on pooled feature matrices: feature extraction and statistics, (group) elastic-net paths,
feature selection and the Q-SENN quantisation step. Only ``features.py`` knows about models and loaders."""

from .features import (
    FeatureSet,
    clear_feature_cache,
    dataset_fingerprint,
    extract_features,
    feature_cache_key,
    pooled_features,
)
from .select import SelectionPath, normalize_features, select_features, selection_path, split_indices
from .solver import RegPath, elastic_net_path, kkt_violation, lambda_grid, lambda_max, objective
from .sparsify import SparseHead, sparsify

__all__ = [
    "FeatureSet",
    "extract_features",
    "pooled_features",
    "clear_feature_cache",
    "feature_cache_key",
    "dataset_fingerprint",
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
