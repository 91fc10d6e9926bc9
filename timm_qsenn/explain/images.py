"""Pixels for people: inputs back to displayable images, feature maps upsampled, heatmap overlays, thumbnails."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..qsenn import QSENN

__all__ = ["data_config", "to_display", "upsample", "heatmap_overlay", "to_pil"]


def data_config(model: QSENN) -> dict[str, Any]:
    """timm's data config of the model (input size, mean, std), as its transforms use it."""
    from timm.data import resolve_model_data_config

    return resolve_model_data_config(model)


def to_display(model: QSENN, image: Tensor) -> Tensor:
    """Undo the input normalisation of a 3 x H x W tensor for display, in [0, 1]."""
    config = data_config(model)
    mean = torch.tensor(config["mean"], dtype=torch.float32)[:, None, None]
    std = torch.tensor(config["std"], dtype=torch.float32)[:, None, None]
    image = image.detach().float().cpu()
    if image.shape[0] != mean.shape[0]:
        return image.mean(dim=0, keepdim=True).expand(3, -1, -1).clamp(0, 1)
    return (image * std + mean).clamp(0, 1)


def upsample(maps: Tensor, height: int, width: int) -> Tensor:
    """K x h x w feature maps resized (bilinear) to the K x ``height`` x ``width`` of the input image."""
    return F.interpolate(maps[None].float(), size=(height, width), mode="bilinear", align_corners=False)[0]


def heatmap_overlay(image: Tensor, heat: Tensor, alpha: float = 0.6) -> Tensor:
    """A 3 x H x W image in [0, 1] with a jet-coloured heatmap blended in where ``heat`` (H x W) is high."""
    heat = heat.float()
    low, high = heat.min(), heat.max()
    heat = (heat - low) / (high - low) if high > low else torch.zeros_like(heat)
    # The jet colour map from blue (cold) through green and yellow to bright red (hot).
    colour = torch.stack([(1.5 - (3.5 * heat - c).abs()).clamp(0, 1) for c in (3, 2, 1)])
    weight = alpha * heat[None]
    return image.float() * (1 - weight) + colour * weight


def to_pil(image: Tensor, size: int | None = None) -> Any:
    """A 3 x H x W image in [0, 1] as a PIL image, shrunk to fit ``size`` x ``size`` when given (a thumbnail)."""
    from PIL import Image

    array = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).contiguous().numpy()
    pil = Image.fromarray(array)
    if size is not None:
        pil.thumbnail((size, size))
    return pil
