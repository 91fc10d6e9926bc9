"""Metrics on pooled feature activations: dependence, class-independence, contrastiveness and correlation.

Contrastiveness fits a 2-component Gaussian mixture to every feature (:func:`fit_gaussian_mixture_1d`); which
features (raw or normalised) each metric reads is in the package docstring.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import torch
from torch import Tensor

from ._internal import check_features, check_weight, nanmean
from .accumulators import ClassMass, Gram

__all__ = [
    "dependence_per_image",
    "dependence",
    "class_independence",
    "fit_gaussian_mixture_1d",
    "contrastiveness",
    "correlation",
]

# Values per chunk of columns in one EM run, bounding its float64 temporaries.
_EM_CHUNK_VALUES = 4_000_000


def dependence_per_image(features: Tensor, predictions: Tensor, weight: Tensor) -> Tensor:
    """Per image, the largest share of one feature in the summed |f_j * w_cj| of its predicted class c."""
    check_weight(weight)
    check_features(features, weight.shape[1])
    contributions = (features.double() * weight.double()[predictions]).abs()
    return contributions.amax(dim=1) / contributions.sum(dim=1)


def dependence(features: Tensor, predictions: Tensor, weight: Tensor) -> float:
    """Q-SENN's Dependence: the mean largest single-feature share of the predicted logit (lower is better).

    Q-SENN passes the raw pooled features, not the normalised ones the class layer reads; images whose
    contributions are all zero are skipped, as the reference drops NaN.
    """
    return nanmean(dependence_per_image(features, predictions, weight))


def class_independence(features: Tensor, labels: Tensor, num_classes: int | None = None) -> float:
    """QPM's Class-Independence: 1 minus the mean, over features, of the largest share one class holds.

    Each feature is shifted to a minimum of 0; a class's share is the activation mass of its ground-truth images.
    0 when every feature fires for one class only, 1 - 1/C when every class holds an equal share. Features
    that never vary are skipped.
    """
    check_features(features)
    if labels.shape != (features.shape[0],):
        raise ValueError(f"labels must hold one class per row of features, got {tuple(labels.shape)}")
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    mass = ClassMass(num_classes, features.shape[1])
    mass.update(features, labels)
    return mass.compute()


def fit_gaussian_mixture_1d(
    values: Tensor, max_iter: int = 100, tol: float = 1e-3, reg_var: float = 1e-6
) -> tuple[Tensor, Tensor, Tensor]:
    """Fit a 2-component Gaussian mixture to every column of an N x F matrix by EM; (weights, means, stds).

    Each is F x 2 (float64), components ordered by mean. EM starts from a 1-D 2-means split (deterministic,
    where scikit-learn's default starts from k-means too) and stops when the mean log-likelihood of every
    column changes by less than ``tol``; ``reg_var`` is added to the variances, as scikit-learn's ``reg_covar``.
    """
    check_features(values)
    if values.shape[0] < 2:
        raise ValueError(f"a 2-component mixture needs at least 2 values per column, got {values.shape[0]}")
    x = values.detach().double().cpu()
    # 2-means on each column: split at the midpoint of the two cluster means until the split is stable.
    lo, hi = x.amin(dim=0), x.amax(dim=0)
    centres = torch.stack([lo + (hi - lo) / 4, hi - (hi - lo) / 4], dim=1)
    upper = x > centres.mean(dim=1)
    for _ in range(100):
        resp = torch.stack([~upper, upper], dim=2).double()
        centres = (resp * x[..., None]).sum(dim=0) / resp.sum(dim=0).clamp(min=1)
        new_upper = x > centres.mean(dim=1)
        if torch.equal(new_upper, upper):
            break
        upper = new_upper
    resp = torch.stack([~upper, upper], dim=2).double()
    previous = torch.full((x.shape[1],), -math.inf, dtype=torch.float64)
    for _ in range(max_iter):
        counts = resp.sum(dim=0) + 10 * torch.finfo(torch.float64).eps
        weights = counts / x.shape[0]
        means = (resp * x[..., None]).sum(dim=0) / counts
        variances = (resp * (x[..., None] - means) ** 2).sum(dim=0) / counts + reg_var
        log_prob = (
            weights.log() - 0.5 * torch.log(2 * math.pi * variances) - (x[..., None] - means) ** 2 / (2 * variances)
        )
        log_norm = log_prob.logsumexp(dim=2, keepdim=True)
        resp = (log_prob - log_norm).exp()
        likelihood = log_norm.squeeze(2).mean(dim=0)
        if ((likelihood - previous).abs() < tol).all():
            break
        previous = likelihood
    order = means.argsort(dim=1)
    return weights.gather(1, order), means.gather(1, order), variances.gather(1, order).sqrt()


def contrastiveness(features: Tensor) -> float:
    """QPM's Contrastiveness: 1 minus the mean overlap of the two Gaussians of a per-feature 2-component mixture.

    Each feature is standardised first, which makes the score invariant to positive affine rescaling and the
    variance floor relative; a feature that never varies counts as one component (overlap 1). Near 1 for
    features that are clearly on or off, lower for features with one broad mode.
    """
    check_features(features)
    x = features.detach().double().cpu()
    std = x.std(dim=0, unbiased=False)
    varying = std > 1e-12 * x.abs().amax(dim=0).clamp(min=1e-300)
    overlaps = torch.ones(x.shape[1], dtype=torch.float64)
    columns = varying.nonzero().flatten()
    chunk = max(1, _EM_CHUNK_VALUES // x.shape[0])
    for start in range(0, columns.numel(), chunk):
        part = columns[start : start + chunk]
        z = (x[:, part] - x[:, part].mean(dim=0)) / std[part]
        _, means, stds = fit_gaussian_mixture_1d(z)
        overlaps[part] = torch.tensor(
            [
                NormalDist(float(m[0]), float(s[0])).overlap(NormalDist(float(m[1]), float(s[1])))
                for m, s in zip(means, stds)
            ],
            dtype=torch.float64,
        )
    return 1.0 - float(overlaps.mean())


def correlation(features: Tensor) -> float:
    """QPM's Correlation: the mean, over features, of the largest cosine similarity to any other feature.

    The cosine is uncentred, over the N images; on normalised (centred) features it is the Pearson correlation.
    1 when every feature has a duplicate, 0 for mutually orthogonal features (lower is better).
    """
    check_features(features)
    gram = Gram(features.shape[1])
    gram.update(features)
    return gram.compute()
