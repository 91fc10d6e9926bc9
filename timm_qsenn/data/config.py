"""The data section of a run's config: dataset, input pipeline and loaders (method notes 1.1)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DataConfig"]


@dataclass
class DataConfig:
    """Dataset, input pipeline and loaders (method notes 1.1)."""

    # cub200, stanford_cars, fgvc_aircraft, travelingbirds, fashion_mnist, folder, or a timm name (torch/..., hfds/...)
    dataset: str = "folder"
    root: str = ""
    cub_root: str = ""  # TravelingBirds: the CUB_200_2011 folder whose official split it uses
    crop_gt: bool = False  # CUB/TravelingBirds: crop to the ground-truth box and squash-resize
    img_size: int = 448
    augment: str = "qsenn"  # qsenn (the paper's), light (crop + flip), timm (create_transform)
    auto_augment: str | None = None  # with augment=timm, e.g. rand-m9-mstd0.5
    mean: list[float] | None = None  # None: the dataset's statistics (the backbone's for unknown datasets)
    std: list[float] | None = None
    batch_size: int = 16  # per process
    eval_batch_size: int = 64  # per process
    workers: int = 4
    train_per_class: int | None = None  # keep the first N training images of every class
    test_per_class: int | None = None
