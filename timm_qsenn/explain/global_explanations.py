"""The global explanation: every class with the features its logit is a sum of, every feature with its classes."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .._utils import write_json
from ..qsenn import QSENN

__all__ = [
    "FeatureUse",
    "ClassExplanation",
    "GlobalExplanation",
    "global_explanation",
    "feature_names_of",
    "class_names_of",
    "class_layer",
]


@dataclass(frozen=True)
class FeatureUse:
    """One feature in a class's decision: its position in the head, backbone channel, name and weight sign."""

    index: int
    channel: int
    name: str
    sign: int
    weight: float


@dataclass(frozen=True)
class ClassExplanation:
    """A class and the features its logit is a sum of (positive ones first)."""

    index: int
    name: str
    features: list[FeatureUse] = field(default_factory=list)


@dataclass(frozen=True)
class GlobalExplanation:
    """Every class with its features, and every feature with the classes using it."""

    classes: list[ClassExplanation]
    feature_classes: dict[int, list[int]]
    feature_names: list[str]

    def to_dict(self) -> dict:
        """A JSON-serialisable form."""
        return asdict(self)

    def to_json(self, path: str | Path | None = None) -> str:
        """The explanation as JSON text, also written to ``path`` when given."""
        return write_json(self.to_dict(), path)


def feature_names_of(model: QSENN) -> list[str]:
    """The model's feature names, or ``feature <channel>`` for features without one."""
    channels = model.head.selection.tolist()
    names = model.feature_names or []
    if names and len(names) != len(channels):
        raise ValueError(
            f"model has {len(names)} feature names for {len(channels)} selected features; "
            "set model.feature_names to one name per selected feature"
        )
    return list(names) if names else [f"feature {c}" for c in channels]


def class_names_of(model: QSENN) -> list[str]:
    """The model's class names from ``pretrained_cfg['label_names']``, or ``class <i>``."""
    names = (getattr(model, "pretrained_cfg", None) or {}).get("label_names")
    if names and len(names) == model.num_classes:
        return list(names)
    return [f"class {i}" for i in range(model.num_classes)]


def class_layer(model: QSENN) -> tuple[Tensor, Tensor]:
    """The class layer's weight and bias in float64; raises for a model without one."""
    if model.num_classes <= 0:
        raise ValueError("the model has no class layer (num_classes=0); nothing to explain")
    return model.head.fc.weight.detach().double(), model.head.fc.bias.detach().double()


@torch.no_grad()
def global_explanation(model: QSENN) -> GlobalExplanation:
    """For every class, the features with a non-zero weight and their signs; for every feature, its classes."""
    weight = class_layer(model)[0].float().cpu()
    channels = model.head.selection.tolist()
    feature_names = feature_names_of(model)
    classes = []
    feature_classes: dict[int, list[int]] = {j: [] for j in range(len(channels))}
    for c, name in enumerate(class_names_of(model)):
        row = weight[c]
        used = row.nonzero().flatten().tolist()
        used.sort(key=lambda j: (-float(row[j]), j))
        uses = [FeatureUse(j, channels[j], feature_names[j], int(torch.sign(row[j])), float(row[j])) for j in used]
        for j in used:
            feature_classes[j].append(c)
        classes.append(ClassExplanation(c, name, uses))
    return GlobalExplanation(classes, feature_classes, feature_names)
