"""Data: the paper's datasets from their official layouts, Fashion-MNIST, any timm dataset; transforms; loaders;
CUB's attribute files.

``datasets`` reads the raw splits, ``transforms`` normalises and augments them, ``loaders`` turns a config into
the datasets and the seeded loaders of a run, ``config`` holds the data section of that config, and
``attributes`` reads CUB-200-2011's attribute labels for the alignment metrics.
"""

from .attributes import AttributeLabels, read_cub_attributes, read_cub_class_attributes
from .config import DataConfig
from .datasets import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    NAMED_DATASETS,
    ArrayImages,
    ImageList,
    TimmDataset,
    read_cub200,
    read_dataset,
    read_fashion_mnist,
    read_fgvc_aircraft,
    read_idx,
    read_stanford_cars,
    read_travelingbirds,
)
from .loaders import DataBundle, EpochSampler, SeededAugmentation, build_datasets, eval_loader, train_loader
from .transforms import DATASET_STATS, build_transforms

__all__ = [
    "DataConfig",
    "DATASET_STATS",
    "NAMED_DATASETS",
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_CLASSES",
    "ImageList",
    "ArrayImages",
    "TimmDataset",
    "read_cub200",
    "read_travelingbirds",
    "read_fgvc_aircraft",
    "read_stanford_cars",
    "read_fashion_mnist",
    "read_idx",
    "read_dataset",
    "build_transforms",
    "EpochSampler",
    "SeededAugmentation",
    "DataBundle",
    "build_datasets",
    "train_loader",
    "eval_loader",
    "AttributeLabels",
    "read_cub_attributes",
    "read_cub_class_attributes",
]
