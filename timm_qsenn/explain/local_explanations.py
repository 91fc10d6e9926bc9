"""Local explanations: why the model predicted what it did for one image, feature by feature."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .._utils import eval_mode, write_json
from ..qsenn import QSENN
from .global_explanations import class_layer, class_names_of, feature_names_of
from .images import data_config, to_display, upsample

__all__ = [
    "FeatureContribution",
    "SeparatingFeature",
    "LocalExplanation",
    "feature_contributions",
    "explain_image",
]


@dataclass(frozen=True)
class FeatureContribution:
    """One feature's part in a class logit: ``contribution = weight * normalized``, and where the feature fired."""

    index: int
    channel: int
    name: str
    weight: float
    activation: float  # pooled raw activation f_j
    normalized: float  # (f_j - mean_j) / std_j, what the class layer reads
    contribution: float
    peak: tuple[int, int]  # (row, column) of the map's maximum, in input-image pixels


@dataclass(frozen=True)
class SeparatingFeature:
    """A feature weighted differently by the predicted and the runner-up class, and its share of their margin."""

    index: int
    channel: int
    name: str
    weight_predicted: float
    weight_runner_up: float
    normalized: float
    margin: float  # (weight_predicted - weight_runner_up) * normalized
    peak: tuple[int, int]


@dataclass
class LocalExplanation:
    """Why the model predicted what it did for one image: data first, tensors for figures alongside."""

    predicted: int
    predicted_name: str
    logit: float
    bias: float
    probability: float
    contributions: list[FeatureContribution]  # the predicted class's features, largest contribution first
    runner_up: int | None
    runner_up_name: str | None
    runner_up_logit: float | None
    runner_up_bias: float | None
    separating: list[SeparatingFeature]  # largest share of the margin first
    image_size: tuple[int, int]
    label: int | None = None
    label_name: str | None = None
    # Feature index -> its map upsampled to the image (H x W); only the leading features, see explain_image.
    feature_maps: dict[int, Tensor] = field(default_factory=dict, repr=False, compare=False)
    image: Tensor | None = field(default=None, repr=False, compare=False)  # 3 x H x W in [0, 1], for display

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable form (without the maps and the image)."""
        data = {k: v for k, v in self.__dict__.items() if k not in ("feature_maps", "image")}
        data["contributions"] = [asdict(c) for c in self.contributions]
        data["separating"] = [asdict(s) for s in self.separating]
        return data

    def to_json(self, path: str | Path | None = None) -> str:
        """The explanation as JSON text, also written to ``path`` when given."""
        return write_json(self.to_dict(), path)


@torch.no_grad()
def feature_contributions(model: QSENN, features: Tensor) -> Tensor:
    """B x C x F contributions ``w_cj * normalised f_j`` (float64) of pooled B x F features to every logit.

    Summed over features and added to the bias they give the model's logits in eval mode (dropout off).
    """
    weight, _ = class_layer(model)
    if features.ndim != 2 or features.shape[1] != weight.shape[1]:
        raise ValueError(
            f"features must be B x {weight.shape[1]} pooled activations (QSENNOutput.features), got "
            f"{tuple(features.shape)}"
        )
    normalized = model.head.normalize(features.detach().double())
    return normalized[:, None, :] * weight[None, :, :]


def _as_batch(model: QSENN, image: Any, transform: Any | None) -> Tensor:
    """One image (a tensor, or a PIL image to transform) as a batch of one."""
    if isinstance(image, Tensor):
        if image.ndim == 3:
            image = image.unsqueeze(0)
        if image.ndim != 4 or image.shape[0] != 1:
            raise ValueError(
                f"explain_image takes one image: a C x H x W or 1 x C x H x W tensor, got {tuple(image.shape)}"
            )
        return image
    if transform is None:
        from timm.data import create_transform

        transform = create_transform(**data_config(model), is_training=False)
    if hasattr(image, "convert"):
        image = image.convert("RGB")
    return transform(image).unsqueeze(0)


def _peak(feature_map: Tensor, height: int, width: int) -> tuple[int, int]:
    """The map's maximum as the centre of its cell in input-image pixels."""
    rows, cols = feature_map.shape
    flat = int(feature_map.flatten().argmax())
    row, col = divmod(flat, cols)
    return int((row + 0.5) * height / rows), int((col + 0.5) * width / cols)


@torch.no_grad()
def explain_image(
    model: QSENN,
    image: Any,
    label: int | None = None,
    max_maps: int = 8,
    transform: Any | None = None,
) -> LocalExplanation:
    """Explain the model's decision for one image.

    Args:
        model: a Q-SENN model (put in eval mode for the call).
        image: a C x H x W (or 1 x C x H x W) tensor normalised as the model expects, or a PIL image, which is
            prepared with ``transform`` (default: timm's eval transform from the model's data config).
        label: the true class, recorded when given.
        max_maps: how many of the leading contributing features, and of the leading separating features, keep
            their map upsampled to the image (maps of every feature of a dense head would be large).
        transform: the transform for a PIL image.

    Contributions are computed in float64, so they add up to ``logit - bias`` to float64 rounding.
    """
    weight, bias = class_layer(model)
    batch = _as_batch(model, image, transform).to(next(model.parameters()).device)
    with eval_mode(model):
        out = model.forward_qsenn(batch)
    height, width = batch.shape[2], batch.shape[3]
    features = out.features.detach().double().cpu()
    weight, bias = weight.cpu(), bias.cpu()
    normalized = model.head.normalize(features.to(model.head.mean.device)).double().cpu()[0]
    logits = weight @ normalized + bias
    probabilities = logits.softmax(dim=0)
    order = logits.argsort(descending=True, stable=True)
    predicted = int(order[0])
    runner_up = int(order[1]) if logits.numel() > 1 else None
    maps = out.feature_maps[0].detach().float().cpu()
    channels = model.head.selection.tolist()
    names = feature_names_of(model)
    class_names = class_names_of(model)
    raw = features[0]

    contributions = [
        FeatureContribution(
            j,
            channels[j],
            names[j],
            float(weight[predicted, j]),
            float(raw[j]),
            float(normalized[j]),
            float(weight[predicted, j] * normalized[j]),
            _peak(maps[j], height, width),
        )
        for j in weight[predicted].nonzero().flatten().tolist()
    ]
    contributions.sort(key=lambda c: (-c.contribution, c.index))
    separating: list[SeparatingFeature] = []
    if runner_up is not None:
        differs = (weight[predicted] != weight[runner_up]).nonzero().flatten().tolist()
        separating = [
            SeparatingFeature(
                j,
                channels[j],
                names[j],
                float(weight[predicted, j]),
                float(weight[runner_up, j]),
                float(normalized[j]),
                float((weight[predicted, j] - weight[runner_up, j]) * normalized[j]),
                _peak(maps[j], height, width),
            )
            for j in differs
        ]
        separating.sort(key=lambda s: (-s.margin, s.index))

    shown = [c.index for c in sorted(contributions, key=lambda c: -abs(c.contribution))[:max_maps]]
    shown += [s.index for s in sorted(separating, key=lambda s: -abs(s.margin))[:max_maps]]
    shown = sorted(set(shown))
    upsampled = upsample(maps[shown], height, width) if shown else None
    feature_maps = {j: upsampled[i] for i, j in enumerate(shown)} if upsampled is not None else {}
    return LocalExplanation(
        predicted=predicted,
        predicted_name=class_names[predicted],
        logit=float(logits[predicted]),
        bias=float(bias[predicted]),
        probability=float(probabilities[predicted]),
        contributions=contributions,
        runner_up=runner_up,
        runner_up_name=class_names[runner_up] if runner_up is not None else None,
        runner_up_logit=float(logits[runner_up]) if runner_up is not None else None,
        runner_up_bias=float(bias[runner_up]) if runner_up is not None else None,
        separating=separating,
        image_size=(height, width),
        label=label,
        label_name=class_names[label] if label is not None else None,
        feature_maps=feature_maps,
        image=to_display(model, batch[0]),
    )
