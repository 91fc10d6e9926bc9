"""Streaming accumulators: what a metric over a whole split keeps between batches, in bounded memory.

Each has ``update`` (one batch) and, where it yields a metric, ``compute``. The tensor functions of the
metrics build on them too, so a metric over one tensor and over a stream of batches is the same code.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["MeanOf", "ClassMass", "Gram", "RowSample", "AttributeContrast"]


class MeanOf:
    """Streaming mean of per-image scores, skipping NaN."""

    def __init__(self) -> None:
        self.total = 0.0
        self.count = 0

    def update(self, values: Tensor) -> None:
        """Add a batch of scores; NaN entries (images not counted) are skipped."""
        finite = values[~values.isnan()].double()
        self.total += float(finite.sum())
        self.count += int(finite.numel())

    def compute(self) -> float:
        """The mean of the counted scores; NaN when none was counted."""
        return self.total / self.count if self.count else math.nan


class ClassMass:
    """Streaming per-class sums of features, for class-independence."""

    def __init__(self, num_classes: int, num_features: int) -> None:
        self.sums = torch.zeros(num_classes, num_features, dtype=torch.float64)
        self.counts = torch.zeros(num_classes, dtype=torch.float64)
        self.minimum = torch.full((num_features,), math.inf, dtype=torch.float64)

    def update(self, features: Tensor, labels: Tensor) -> None:
        """Add N x F features of images whose ground-truth classes are ``labels``."""
        features, labels = features.detach().double().cpu(), labels.cpu().long()
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.counts.numel()):
            raise ValueError(f"labels must lie in [0, {self.counts.numel()}), got {int(labels.max())}")
        self.sums.index_add_(0, labels, features)
        self.counts += torch.bincount(labels, minlength=self.counts.numel()).double()
        self.minimum = torch.minimum(self.minimum, features.amin(dim=0))

    def compute(self) -> float:
        """Class-independence of everything added so far (see :func:`class_independence`)."""
        # Sum over class c of (f - min f) is the class's sum minus its count times the global minimum.
        mass = self.sums - self.counts[:, None] * self.minimum[None, :]
        total = mass.sum(dim=0)
        share = (mass.amax(dim=0) / total)[total > 0]
        return 1.0 - float(share.mean()) if share.numel() else math.nan


class Gram:
    """Streaming Gram matrix of features, for correlation."""

    def __init__(self, num_features: int) -> None:
        self.gram = torch.zeros(num_features, num_features, dtype=torch.float64)

    def update(self, features: Tensor) -> None:
        """Add N x F features."""
        features = features.detach().double().cpu()
        self.gram += features.T @ features

    def compute(self) -> float:
        """Correlation of everything added so far (see :func:`correlation`)."""
        if self.gram.shape[0] < 2:
            return math.nan
        norms = self.gram.diagonal().sqrt()
        cosine = self.gram / (norms[:, None] * norms[None, :])
        cosine.fill_diagonal_(-math.inf)
        best = cosine.nan_to_num(nan=-math.inf).amax(dim=1)
        best = best[(norms > 0) & torch.isfinite(best)]
        return float(best.mean()) if best.numel() else math.nan


class RowSample:
    """A uniform random sample of at most ``capacity`` rows of a stream (the rows with the smallest random keys)."""

    def __init__(self, capacity: int, seed: int = 0) -> None:
        self.capacity = capacity
        self.generator = torch.Generator().manual_seed(seed)
        self.rows: Tensor | None = None
        self.keys = torch.empty(0)

    def update(self, rows: Tensor) -> None:
        """Offer a batch of rows to the sample; ``self.rows`` holds the sample in stream order."""
        rows = rows.detach().float().cpu()
        keys = torch.rand(rows.shape[0], generator=self.generator)
        if self.rows is not None:
            rows, keys = torch.cat([self.rows, rows]), torch.cat([self.keys, keys])
        if rows.shape[0] > self.capacity:
            keep = keys.topk(self.capacity, largest=False).indices.sort().values
            rows, keys = rows[keep], keys[keep]
        self.rows, self.keys = rows, keys


class AttributeContrast:
    """Streaming per-attribute sums of features over images with and without each attribute."""

    def __init__(self, num_features: int, num_attributes: int) -> None:
        shape = (num_features, num_attributes)
        self.present_sum = torch.zeros(shape, dtype=torch.float64)
        self.absent_sum = torch.zeros(shape, dtype=torch.float64)
        self.present_count = torch.zeros(num_attributes, dtype=torch.float64)
        self.absent_count = torch.zeros(num_attributes, dtype=torch.float64)
        self.total = torch.zeros(num_features, dtype=torch.float64)
        self.count = 0
        self.minimum = torch.full((num_features,), math.inf, dtype=torch.float64)

    def update(self, features: Tensor, present: Tensor, known: Tensor) -> None:
        """Add N x F features with the N x A attribute labels of the same images (only ``known`` ones count)."""
        features = features.detach().double().cpu()
        with_attr = (present.bool() & known.bool()).double().cpu()
        without_attr = (~present.bool() & known.bool()).double().cpu()
        self.present_sum += features.T @ with_attr
        self.absent_sum += features.T @ without_attr
        self.present_count += with_attr.sum(dim=0)
        self.absent_count += without_attr.sum(dim=0)
        self.total += features.sum(dim=0)
        self.count += features.shape[0]
        self.minimum = torch.minimum(self.minimum, features.amin(dim=0))

    def compute(self) -> Tensor:
        """The F x A normalised contrasts of everything added so far (see :func:`alignment_matrix`)."""
        difference = self.present_sum / self.present_count - self.absent_sum / self.absent_count
        scale = self.total / max(self.count, 1) - self.minimum
        matrix = difference / scale[:, None]
        matrix[:, (self.present_count == 0) | (self.absent_count == 0)] = math.nan
        matrix[~(scale > 0)] = math.nan
        return matrix
