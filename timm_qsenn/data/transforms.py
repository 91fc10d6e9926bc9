"""Per-dataset normalisation statistics and the train/eval transforms of a run."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from torchvision import transforms as T

from .config import DataConfig

__all__ = ["DATASET_STATS", "build_transforms"]

# Per-dataset normalisation (method notes 1.1); Fashion-MNIST measured on its 60k training images.
DATASET_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cub200": ((0.4853, 0.4964, 0.4295), (0.2300, 0.2258, 0.2625)),
    "travelingbirds": ((0.4584, 0.4369, 0.3957), (0.2610, 0.2569, 0.2722)),
    "stanford_cars": ((0.4593, 0.4466, 0.4453), (0.2920, 0.2910, 0.2988)),
    "fgvc_aircraft": ((0.4827, 0.5130, 0.5352), (0.2236, 0.2170, 0.2478)),
    "imagenet": (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    "fashion_mnist": ((0.2860, 0.2860, 0.2860), (0.3530, 0.3530, 0.3530)),
}


def build_transforms(cfg: DataConfig, mean: Sequence[float], std: Sequence[float]) -> tuple[Any, Any]:
    """(train, eval) transforms. Eval: short-side resize + centre crop, or a squash resize for GT crops."""
    size = cfg.img_size
    eval_tf = create_transform(
        input_size=size,
        is_training=False,
        interpolation="bilinear",
        crop_pct=1.0,
        crop_mode="squash" if cfg.crop_gt else "center",
        mean=tuple(mean),
        std=tuple(std),
    )
    if cfg.augment == "timm":
        train_tf = create_transform(
            input_size=size, is_training=True, auto_augment=cfg.auto_augment, mean=tuple(mean), std=tuple(std)
        )
        return train_tf, eval_tf
    if cfg.augment not in ("qsenn", "light"):
        raise ValueError(f"data.augment must be qsenn, light or timm, got {cfg.augment!r}")
    resize = [T.Resize((size, size))] if cfg.crop_gt else [T.Resize(size), T.RandomCrop(size, padding=4)]
    extra = [T.ColorJitter(0.1, 0.1, 0.1), T.TrivialAugmentWide()] if cfg.augment == "qsenn" else []
    train_tf = T.Compose([*resize, T.RandomHorizontalFlip(), *extra, T.ToTensor(), T.Normalize(mean, std)])
    return train_tf, eval_tf
