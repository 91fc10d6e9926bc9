"""Galleries: the most activating images of every used feature, found in one pass with bounded memory."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .._utils import eval_mode, forward_batches, is_shuffled
from ..qsenn import QSENN
from .global_explanations import class_layer
from .images import heatmap_overlay, to_display, to_pil, upsample

__all__ = ["GalleryImage", "FeatureGallery", "feature_gallery"]


@dataclass
class GalleryImage:
    """One of a feature's most activating images, with the feature's heatmap laid over it."""

    index: int  # position in the loader's dataset
    label: int
    activation: float  # pooled raw activation of the feature on this image
    thumbnail: Any = field(repr=False, compare=False)  # PIL image


@dataclass
class FeatureGallery:
    """The most activating images of each used feature, highest activation first."""

    features: dict[int, list[GalleryImage]]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable form (dataset positions, labels and activations; no pixels)."""
        return {
            str(j): [{"index": g.index, "label": g.label, "activation": g.activation} for g in images]
            for j, images in self.features.items()
        }


def _require_sequential(loader: Iterable, what: str) -> Any:
    """The loader's dataset, once it is known to be indexable and read in order (images are found by position)."""
    dataset = getattr(loader, "dataset", None)
    if dataset is None or not hasattr(dataset, "__getitem__"):
        raise ValueError(f"{what} needs a DataLoader over an indexable dataset (loader.dataset[i])")
    if is_shuffled(loader):
        raise ValueError(f"{what} finds images by their position in the loader; build it with shuffle=False")
    return dataset


@torch.no_grad()
def feature_gallery(
    model: QSENN, loader: Iterable, top: int = 5, size: int = 160, progress: bool = False
) -> FeatureGallery:
    """The ``top`` most activating images of every used feature of ``model`` over an unshuffled loader.

    One pass keeps only a running top-``top`` (value, position) per feature; the chosen images are then
    reloaded from ``loader.dataset`` to draw the heatmaps, so memory does not grow with the dataset.
    """
    if top < 1:
        raise ValueError(f"top must be at least 1, got {top}")
    dataset = _require_sequential(loader, "feature_gallery")
    weight, _ = class_layer(model)
    used = (weight != 0).any(dim=0).nonzero().flatten().tolist()
    device = next(model.parameters()).device
    with eval_mode(model):
        values, positions = _top_images(model, loader, used, top, device, progress)
        batch_size = getattr(loader, "batch_size", None) or 16
        thumbnails, labels = _thumbnails(model, dataset, used, positions, batch_size, size, device)
    gallery = {
        j: [
            GalleryImage(int(p), labels[int(p)], float(v), thumbnails[(r, int(p))])
            for v, p in zip(values[r].tolist(), positions[r].tolist())
        ]
        for r, j in enumerate(used)
    }
    return FeatureGallery(gallery)


def _top_images(
    model: QSENN, loader: Iterable, used: list[int], top: int, device: torch.device, progress: bool
) -> tuple[Tensor, Tensor]:
    """Per used feature, its ``top`` largest pooled activations over the loader and their positions in it."""
    values = torch.full((len(used), 0), -math.inf, dtype=torch.float64)
    positions = torch.zeros((len(used), 0), dtype=torch.long)
    seen = 0
    for out, _ in forward_batches(model, loader, device=device, progress=progress, desc="gallery"):
        features = out.features[:, used].double().cpu().T
        index = torch.arange(seen, seen + features.shape[1]).expand(len(used), -1)
        values, keep = torch.cat([values, features], dim=1).topk(min(top, values.shape[1] + features.shape[1]), dim=1)
        positions = torch.cat([positions, index], dim=1).gather(1, keep)
        seen += features.shape[1]
    return values, positions


def _thumbnails(
    model: QSENN,
    dataset: Any,
    used: list[int],
    positions: Tensor,
    batch_size: int,
    size: int,
    device: torch.device,
) -> tuple[dict[tuple[int, int], Any], dict[int, int]]:
    """Heatmap thumbnails by (feature row, dataset position), and the labels of those images, reloaded in batches."""
    wanted = sorted(set(positions.flatten().tolist()))
    thumbnails: dict[tuple[int, int], Any] = {}
    labels: dict[int, int] = {}
    rows_of: dict[int, list[int]] = {p: [] for p in wanted}
    for r, row in enumerate(positions.tolist()):
        for p in row:
            rows_of[p].append(r)
    for start in range(0, len(wanted), batch_size):
        chunk = wanted[start : start + batch_size]
        items = [dataset[p] for p in chunk]
        images = torch.stack([item[0] for item in items])
        maps = model.forward_qsenn(images.to(device)).feature_maps.float().cpu()
        for p, image, item, image_maps in zip(chunk, images, items, maps):
            labels[p] = int(item[1])
            display = to_display(model, image)
            for r in rows_of[p]:
                heat = upsample(image_maps[used[r]][None], *display.shape[1:])[0]
                thumbnails[(r, p)] = to_pil(heatmap_overlay(display, heat), size)
    return thumbnails, labels
