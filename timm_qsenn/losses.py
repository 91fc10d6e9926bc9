"""The losses of Q-SENN training: the feature diversity loss, which makes the heavily weighted features of a
prediction peak at different places, and the training loss (cross-entropy plus that loss)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .head import QSENNOutput

__all__ = ["feature_diversity_loss", "FeatureDiversityLoss", "qsenn_loss", "DEFAULT_DIVERSITY_WEIGHT"]

DEFAULT_DIVERSITY_WEIGHT = 0.196


def feature_diversity_loss(
    feature_maps: Tensor,
    logits: Tensor,
    weight: Tensor,
    beta: float = DEFAULT_DIVERSITY_WEIGHT,
) -> Tensor:
    """Feature diversity loss L_div of Q-SENN (method notes 1.3).

    Args:
        feature_maps: B x F x H x W maps of the features the class layer reads.
        logits: B x C class scores; the loss uses each image's *predicted* class, not its label.
        weight: C x F class-layer weights. Gradients flow into it, as in the reference dense training.
        beta: loss weight (0.196 in the paper).

    For image b with predicted class c the loss sums, over positions p, the largest over features j of
    ``|W_cj| / (||W_c|| + 1e-5) * r_bj * softmax_p(M_bj)``, where ``r_bj`` is the feature's spatial mean
    relative to the image's largest feature mean. The result is ``-beta`` times the batch mean.
    """
    if feature_maps.ndim != 4:
        raise ValueError(f"feature_maps must be B x F x H x W, got shape {tuple(feature_maps.shape)}")
    batch, num_features = feature_maps.shape[:2]
    if logits.shape[0] != batch or weight.shape != (logits.shape[1], num_features):
        raise ValueError(
            f"shapes do not fit: feature_maps {tuple(feature_maps.shape)}, logits {tuple(logits.shape)}, "
            f"weight {tuple(weight.shape)} (expected {logits.shape[1]} x {num_features})"
        )
    # Softmax over many positions loses precision in half precision; the loss is cheap enough in float32.
    maps = feature_maps.float().flatten(2)
    # Rows of the predicted classes as a one-hot product: the backward of indexing accumulates repeated rows in
    # a thread- (CPU) or atomic- (GPU) dependent order, which made training irreproducible. Outside autocast,
    # the product copies the float32 rows exactly.
    predicted = F.one_hot(logits.argmax(dim=1), weight.shape[0]).to(torch.float32)
    with torch.autocast(logits.device.type, enabled=False):
        rows = predicted @ weight.float()
    relevance = rows.abs() / (rows.norm(dim=1, keepdim=True) + 1e-5)
    mean_act = maps.mean(dim=2)
    relative = mean_act / mean_act.amax(dim=1, keepdim=True).clamp(min=1e-6)
    spatial = maps.softmax(dim=2)
    weighted = (relevance * relative).unsqueeze(2) * spatial
    return -beta * weighted.amax(dim=1).sum(dim=1).mean()


class FeatureDiversityLoss(nn.Module):
    """Module form of :func:`feature_diversity_loss` with a fixed ``beta``."""

    def __init__(self, beta: float = DEFAULT_DIVERSITY_WEIGHT):
        super().__init__()
        self.beta = beta

    def forward(self, feature_maps: Tensor, logits: Tensor, weight: Tensor) -> Tensor:
        return feature_diversity_loss(feature_maps, logits, weight, self.beta)

    def extra_repr(self) -> str:
        return f"beta={self.beta}"


def qsenn_loss(
    out: QSENNOutput, labels: Tensor, weight: Tensor, diversity_weight: float
) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, cross-entropy, diversity loss): cross-entropy plus the feature diversity loss on the maps."""
    cross_entropy = F.cross_entropy(out.logits.float(), labels)
    if not diversity_weight:
        return cross_entropy, cross_entropy, torch.zeros((), device=cross_entropy.device)
    diversity = feature_diversity_loss(out.feature_maps, out.logits, weight, diversity_weight)
    return cross_entropy + diversity, cross_entropy, diversity
