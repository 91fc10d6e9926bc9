"""The driver: every metric of a Q-SENN model over data loaders, with bounded memory.

Feature maps are reduced to per-image scores batch by batch; the metrics over a whole split keep streaming
sums (:mod:`.accumulators`) plus a capped random sample of pooled features for the Gaussian mixtures.
Nothing the size of a dataset's maps is ever held.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from .._utils import eval_mode, forward_batches, gather, is_shuffled
from ..data.attributes import AttributeLabels
from .accumulators import AttributeContrast, ClassMass, Gram, MeanOf, RowSample
from .activations import contrastiveness, dependence_per_image
from .diversity import diversity_per_image
from .grounding import best_per_feature, structural_grounding
from .results import QSENNMetrics
from .sparsity import used_features, weights_per_class

__all__ = ["evaluate"]

# Pooled features kept for the per-feature Gaussian mixtures: at most this many rows (more adds nothing to a
# 2-component fit) and values (about 80 MB of float32, for heads with thousands of features).
_MIXTURE_ROWS = 100_000
_MIXTURE_VALUES = 20_000_000


def finite_or_none(value: float) -> float | None:
    """``value``, or None where it is NaN or infinite (QSENNMetrics holds no NaN)."""
    return value if math.isfinite(value) else None


class _SplitStatistics:
    """Everything the split-wide metrics need, accumulated batch by batch from pooled features."""

    def __init__(
        self,
        weight: Tensor,
        relevant: Tensor,
        attributes: AttributeLabels | None,
    ) -> None:
        num_classes, num_features = weight.shape[0], relevant.numel()
        self.weight = weight[:, relevant].double().cpu()
        self.relevant = relevant
        self.dependence = MeanOf()
        self.class_mass = ClassMass(num_classes, num_features)
        self.gram = Gram(num_features)
        self.sample = RowSample(min(_MIXTURE_ROWS, max(1000, _MIXTURE_VALUES // max(num_features, 1))))
        self.attributes = attributes
        self.contrast = AttributeContrast(num_features, attributes.present.shape[1]) if attributes else None
        self.count = 0

    def update(self, raw: Tensor, normalized: Tensor, predictions: Tensor, labels: Tensor) -> None:
        """Add one gathered batch: raw and normalised pooled features, predicted and true classes."""
        raw = raw[:, self.relevant].double().cpu()
        normalized = normalized[:, self.relevant].double().cpu()
        self.dependence.update(dependence_per_image(raw, predictions.cpu(), self.weight))
        self.class_mass.update(normalized, labels)
        self.gram.update(normalized)
        self.sample.update(normalized)
        if self.contrast is not None:
            rows = slice(self.count, self.count + raw.shape[0])
            if rows.stop > len(self.attributes):
                raise ValueError(
                    f"attributes have {len(self.attributes)} rows but the loader yields more images; pass one "
                    "attribute row per image of the loader, in its (unshuffled) order"
                )
            self.contrast.update(raw, self.attributes.present[rows], self.attributes.known[rows])
        self.count += raw.shape[0]

    def results(self) -> dict[str, float | None]:
        """The split-wide metrics, as keyword arguments of :class:`QSENNMetrics` (None where undefined)."""
        if self.contrast is not None and self.count != len(self.attributes):
            raise ValueError(
                f"attributes have {len(self.attributes)} rows but the loader yielded {self.count} images; pass "
                "one attribute row per image of the loader"
            )
        results = {
            "dependence": self.dependence.compute(),
            "class_independence": self.class_mass.compute(),
            "correlation": self.gram.compute(),
            "contrastiveness": contrastiveness(self.sample.rows) if self.count >= 2 else math.nan,
            "alignment": math.nan,
        }
        if self.contrast is not None:
            best = best_per_feature(self.contrast.compute())
            results["alignment"] = float(best.mean()) if best.numel() else math.nan
        return {name: finite_or_none(value) for name, value in results.items()}


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    test_loader: Iterable,
    train_loader: Iterable | None = None,
    attributes: AttributeLabels | Tensor | None = None,
    class_attributes: Tensor | None = None,
    accelerator: Any | None = None,
    k: int = 5,
    progress: bool = False,
) -> QSENNMetrics:
    """Every metric of a Q-SENN model over data loaders of ``(images, labels)`` batches, with bounded memory.

    Args:
        model: a :class:`~timm_qsenn.QSENN` (or one prepared by Accelerate).
        test_loader: test images: accuracy and diversity@k / SID@k.
        train_loader: images for the split-wide metrics (dependence, class-independence, contrastiveness,
            correlation, alignment), read with the test transform and without shuffling as in the reference.
            Without it they are computed on ``test_loader``.
        attributes: binary attributes of the images of that loader, one row per image in loader order (e.g.
            :func:`read_cub_attributes` with ``split='train'``), for alignment.
        class_attributes: C x A class attribute vectors (:func:`read_cub_class_attributes`) for structural
            grounding.
        accelerator: an ``accelerate.Accelerator`` whose prepared loaders are passed; batches are gathered
            across processes with ``gather_for_metrics``, and every process gets the same result.
        k: features per class for diversity@k and SID@k.
        progress: show progress bars (main process only).
    """
    net = accelerator.unwrap_model(model) if accelerator is not None else model
    if getattr(net, "num_classes", 0) <= 0 or not hasattr(net, "forward_qsenn"):
        raise ValueError("evaluate needs a Q-SENN model with a class layer (num_classes > 0)")
    if k < 1:
        raise ValueError(f"k must be a positive number of features, got {k}")
    if isinstance(attributes, Tensor):
        attributes = AttributeLabels.from_matrix(attributes)
    feature_loader = train_loader if train_loader is not None else test_loader
    if attributes is not None and is_shuffled(feature_loader):
        raise ValueError(
            "attributes are matched to images by position, but the loader shuffles; build it with shuffle=False"
        )
    weight = net.head.fc.weight.detach().float()
    relevant = used_features(weight).cpu()
    structural = None
    pairs = weight.shape[0] * (weight.shape[0] - 1)
    if class_attributes is not None and pairs > 0:
        structural = finite_or_none(structural_grounding(weight, class_attributes, top=min(50, pairs)))
    device = accelerator.device if accelerator is not None else next(net.parameters()).device
    correct, total = 0, 0
    diversity, sid = MeanOf(), MeanOf()
    statistics = _SplitStatistics(weight, relevant, attributes)
    with eval_mode(net):
        test_batches = forward_batches(
            net, test_loader, device=device, accelerator=accelerator, progress=progress, desc="test"
        )
        for out, labels in test_batches:
            predictions = out.logits.argmax(dim=1)
            div = diversity_per_image(out.feature_maps, predictions, weight, k, "diversity")
            sids = diversity_per_image(out.feature_maps, predictions, weight, k, "sid")
            predictions, labels, div, sids, features = gather(
                accelerator, (predictions, labels, div, sids, out.features)
            )
            correct += int((predictions == labels).sum())
            total += labels.numel()
            diversity.update(div)
            sid.update(sids)
            if train_loader is None:
                statistics.update(features, net.head.normalize(features), predictions, labels)
        if train_loader is not None:
            train_batches = forward_batches(
                net, train_loader, device=device, accelerator=accelerator, progress=progress, desc="train"
            )
            for out, labels in train_batches:
                predictions = out.logits.argmax(dim=1)
                predictions, labels, features = gather(accelerator, (predictions, labels, out.features))
                statistics.update(features, net.head.normalize(features), predictions, labels)
    if total == 0:
        raise ValueError("test_loader yielded no images")
    return QSENNMetrics(
        accuracy=correct / total,
        num_images=total,
        num_features=int(relevant.numel()),
        weights_per_class=weights_per_class(weight),
        stage=net.head.stage,
        k=k,
        diversity_at_k=finite_or_none(diversity.compute()),
        sid_at_k=finite_or_none(sid.compute()),
        diversity_images=diversity.count,
        structural_grounding=structural,
        feature_split="train" if train_loader is not None else "test",
        num_feature_images=statistics.count,
        **statistics.results(),
    )
