"""Loaders of a run: the datasets with their transforms, a seeded training loader and an in-order eval loader.

Training loaders are deterministic functions of (seed, epoch): the shuffle order comes from a seeded sampler and
each image's augmentation from an RNG seeded by (seed, epoch, index). A resumed run, a run with more worker
processes and a run split over several processes therefore see exactly the same augmented batches.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader, Dataset, Sampler

from .config import DataConfig
from .datasets import read_dataset
from .transforms import DATASET_STATS, build_transforms

__all__ = ["EpochSampler", "SeededAugmentation", "DataBundle", "build_datasets", "train_loader", "eval_loader"]


class EpochSampler(Sampler[int]):
    """A shuffle that depends only on (seed, epoch); ``start_epoch(epoch, skip)`` also skips consumed samples."""

    def __init__(self, length: int, seed: int):
        self.length, self.seed = length, seed
        self.epoch, self.skip = 0, 0

    def start_epoch(self, epoch: int, skip: int = 0) -> None:
        """Shuffle for ``epoch``, leaving out its first ``skip`` samples (already trained on before a resume)."""
        self.epoch, self.skip = epoch, skip

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        yield from torch.randperm(self.length, generator=generator)[self.skip :].tolist()

    def __len__(self) -> int:
        return self.length - self.skip


class SeededAugmentation(Dataset):
    """Draws each image's augmentation from RNGs seeded by (seed, epoch, index)."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        seed = (self.seed * 1_000_003 + self.epoch) * 10_000_019 + index
        py_state, torch_state = random.getstate(), torch.get_rng_state()
        random.seed(seed)
        torch.manual_seed(seed)
        try:
            return self.dataset[index]
        finally:
            random.setstate(py_state)
            torch.set_rng_state(torch_state)


@dataclass
class DataBundle:
    """The datasets of a run: training (augmented), training with eval transforms, and test."""

    train: Dataset
    train_eval: Dataset
    test: Dataset
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def num_classes(self) -> int:
        """How many classes the run classifies."""
        return len(self.classes)


def _first_per_class(dataset: Dataset, per_class: int) -> Dataset:
    """The first ``per_class`` items of every class, in dataset order (labels from ``samples`` where listed)."""
    if dataset.samples:
        labels = [label for _, label in dataset.samples]
    else:
        labels = [dataset[i][1] for i in range(len(dataset))]
    taken: dict[int, int] = {}
    keep = []
    for i, label in enumerate(labels):
        if taken.get(label, 0) < per_class:
            taken[label] = taken.get(label, 0) + 1
            keep.append(i)
    return dataset.subset(keep)


def _split_view(cfg: DataConfig, split: str, per_class: int | None, transform: Any) -> Dataset:
    """One view of a split: read, subset to ``per_class`` items per class, with ``transform`` attached."""
    # Every view is read on its own so that transforms are never shared between views.
    dataset = read_dataset(cfg, split)
    if per_class:
        dataset = _first_per_class(dataset, per_class)
    if len(dataset) == 0:
        raise ValueError(
            f"dataset {cfg.dataset} under {cfg.root!r} has an empty {split} split; check data.root and the "
            "data.train_per_class/test_per_class subsets"
        )
    dataset.transform = transform
    return dataset


def build_datasets(
    cfg: DataConfig, fallback_mean: Sequence[float] | None = None, fallback_std: Sequence[float] | None = None
) -> DataBundle:
    """Read the train and test splits, subset them, and attach the transforms.

    ``fallback_mean``/``fallback_std`` normalise datasets without known statistics (use the backbone's).
    """
    stats = DATASET_STATS.get(
        cfg.dataset, (fallback_mean or IMAGENET_DEFAULT_MEAN, fallback_std or IMAGENET_DEFAULT_STD)
    )
    mean = tuple(cfg.mean) if cfg.mean else tuple(stats[0])
    std = tuple(cfg.std) if cfg.std else tuple(stats[1])
    train_tf, eval_tf = build_transforms(cfg, mean, std)
    train = _split_view(cfg, "train", cfg.train_per_class, train_tf)
    classes = list(train.classes)
    if not classes:
        raise ValueError(f"dataset {cfg.dataset} names no classes; use a folder dataset or one with class names")
    return DataBundle(
        train=train,
        train_eval=_split_view(cfg, "train", cfg.train_per_class, eval_tf),
        test=_split_view(cfg, "test", cfg.test_per_class, eval_tf),
        classes=classes,
        mean=mean,
        std=std,
    )


def train_loader(dataset: Dataset, cfg: DataConfig, seed: int) -> DataLoader:
    """Shuffled, augmentation-seeded, last partial batch dropped; see :class:`EpochSampler`."""
    return DataLoader(
        SeededAugmentation(dataset, seed),
        batch_size=cfg.batch_size,
        sampler=EpochSampler(len(dataset), seed),
        drop_last=True,
        num_workers=cfg.workers,
        pin_memory=torch.cuda.is_available(),
        generator=_private_generator(seed),
    )


def eval_loader(dataset: Dataset, cfg: DataConfig) -> DataLoader:
    """In dataset order, every image once."""
    return DataLoader(
        dataset,
        batch_size=cfg.eval_batch_size,
        shuffle=False,
        num_workers=cfg.workers,
        pin_memory=torch.cuda.is_available(),
        generator=_private_generator(0),
    )


def _private_generator(seed: int) -> torch.Generator:
    # Every new iterator draws a worker base seed; from the global RNG that draw would shift the dropout masks
    # of a run resumed mid-epoch (which starts one more iterator than the original run did).
    return torch.Generator().manual_seed(seed)
