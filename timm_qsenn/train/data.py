"""Datasets and transforms: the paper's datasets from their official layouts, Fashion-MNIST, any timm dataset.

Training loaders are deterministic functions of (seed, epoch): the shuffle order comes from a seeded sampler and
each image's augmentation from an RNG seeded by (seed, epoch, index). A resumed run, a run with more worker
processes and a run split over several processes therefore see exactly the same augmented batches.
"""

from __future__ import annotations

import gzip
import hashlib
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_dataset, create_transform
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms as T

from .._utils import read_table
from .config import DataConfig

__all__ = [
    "DATASET_STATS",
    "NAMED_DATASETS",
    "DataBundle",
    "ImageList",
    "build_datasets",
    "build_transforms",
    "train_loader",
    "eval_loader",
    "EpochSampler",
]

# Per-dataset normalisation (method notes 1.1); Fashion-MNIST measured on its 60k training images.
DATASET_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cub200": ((0.4853, 0.4964, 0.4295), (0.2300, 0.2258, 0.2625)),
    "travelingbirds": ((0.4584, 0.4369, 0.3957), (0.2610, 0.2569, 0.2722)),
    "stanford_cars": ((0.4593, 0.4466, 0.4453), (0.2920, 0.2910, 0.2988)),
    "fgvc_aircraft": ((0.4827, 0.5130, 0.5352), (0.2236, 0.2170, 0.2478)),
    "imagenet": (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    "fashion_mnist": ((0.2860, 0.2860, 0.2860), (0.3530, 0.3530, 0.3530)),
}
NAMED_DATASETS = ("cub200", "travelingbirds", "stanford_cars", "fgvc_aircraft", "fashion_mnist", "folder")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist package
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip


class ImageList(Dataset):
    """Images given as (path, label) pairs, optionally cropped to a box (x, y, w, h) before the transform."""

    def __init__(
        self,
        samples: Sequence[tuple[str, int]],
        classes: Sequence[str],
        name: str,
        boxes: Sequence[tuple[float, float, float, float]] | None = None,
        transform: Any = None,
    ):
        self.samples = list(samples)
        self.classes = list(classes)
        self.name = name
        self.boxes = list(boxes) if boxes is not None else None
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, label = self.samples[index]
        image = Image.open(path).convert("RGB")
        if self.boxes is not None:
            x, y, w, h = self.boxes[index]
            image = image.crop((int(x), int(y), int(x + w), int(y + h)))
        return (self.transform(image) if self.transform else image), label

    def fingerprint(self) -> str:
        """Identity of the images, labels and crops (for the feature cache)."""
        digest = hashlib.sha256(self.name.encode())
        for i, (path, label) in enumerate(self.samples):
            digest.update(f"{path}|{label}|{self.boxes[i] if self.boxes else ''}\n".encode())
        return digest.hexdigest()

    def subset(self, indices: Sequence[int]) -> ImageList:
        """The same dataset restricted to ``indices``."""
        boxes = [self.boxes[i] for i in indices] if self.boxes is not None else None
        return ImageList([self.samples[i] for i in indices], self.classes, self.name, boxes, self.transform)


class ArrayImages(Dataset):
    """Grayscale images held in memory as an N x H x W uint8 array (Fashion-MNIST), served as RGB."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, classes: Sequence[str], name: str, transform=None):
        self.images, self.labels = images, labels
        self.classes = list(classes)
        self.name = name
        self.transform = transform
        self.samples = [(f"{name}/{i}", int(label)) for i, label in enumerate(labels)]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = Image.fromarray(self.images[index], mode="L").convert("RGB")
        return (self.transform(image) if self.transform else image), int(self.labels[index])

    def fingerprint(self) -> str:
        """Identity of the pixels and labels (for the feature cache)."""
        digest = hashlib.sha256(self.name.encode())
        digest.update(self.images.tobytes())
        digest.update(self.labels.tobytes())
        return digest.hexdigest()

    def subset(self, indices: Sequence[int]) -> ArrayImages:
        """The same dataset restricted to ``indices``."""
        idx = np.asarray(indices, dtype=np.int64)
        return ArrayImages(self.images[idx], self.labels[idx], self.classes, self.name, self.transform)


class TimmDataset(Dataset):
    """A dataset from ``timm.data.create_dataset`` (optionally a subset of it), with class names and an identity."""

    def __init__(self, dataset: Any, name: str, indices: Sequence[int] | None = None):
        self.dataset = dataset
        self.name = name  # e.g. "folder:train:/data/birds"
        self.indices = list(range(len(dataset))) if indices is None else list(indices)
        reader = getattr(dataset, "reader", None)
        class_to_idx = getattr(reader, "class_to_idx", None) or getattr(dataset, "class_to_idx", None)
        if class_to_idx:
            self.classes = [c for c, _ in sorted(class_to_idx.items(), key=lambda kv: kv[1])]
        else:
            self.classes = [str(c) for c in getattr(dataset, "classes", [])]
        listed = list(getattr(reader, "samples", None) or getattr(dataset, "samples", None) or [])
        self.samples = [listed[i] for i in self.indices] if listed else []

    @property
    def transform(self) -> Any:
        return self.dataset.transform

    @transform.setter
    def transform(self, value: Any) -> None:
        self.dataset.transform = value

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image, label = self.dataset[self.indices[index]]
        return image, int(label)

    def fingerprint(self) -> str:
        """Identity of the files and labels where the reader lists them, else name, split and indices."""
        digest = hashlib.sha256(f"{self.name}|{len(self.dataset)}|{self.indices}".encode())
        for sample in self.samples:
            digest.update(f"{sample}\n".encode())
        return digest.hexdigest()

    def subset(self, indices: Sequence[int]) -> TimmDataset:
        """The same dataset restricted to ``indices`` (sharing the underlying timm dataset)."""
        return TimmDataset(self.dataset, self.name, [self.indices[i] for i in indices])


# -- readers of the official layouts --------------------------------------------------------------------------


def _find_root(root: str, marker: str, name: str, children: Sequence[str]) -> Path:
    """The folder holding ``marker``: ``root`` itself or one of its ``children``."""
    if not root:
        raise FileNotFoundError(f"dataset {name}: set data.root to the folder of its official archive")
    base = Path(root).expanduser()
    candidates = [base] + [base / c for c in children]
    for folder in candidates:
        if (folder / marker).exists():
            return folder
    looked = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(f"dataset {name}: {marker} not found; looked in {looked}")


def _cub_split(root: Path, split: str) -> tuple[dict[int, str], dict[int, int], list[int], list[str]]:
    """CUB's image paths, labels, the ids of ``split`` and class names from its official text files."""
    paths = {int(i): p for i, p in read_table(root / "images.txt")}
    labels = {int(i): int(c) - 1 for i, c in read_table(root / "image_class_labels.txt")}
    train = {int(i): flag == "1" for i, flag in read_table(root / "train_test_split.txt")}
    classes = [name.split(".", 1)[-1].replace("_", " ") for _, name in read_table(root / "classes.txt")]
    ids = [i for i in sorted(paths) if train[i] == (split == "train")]
    return paths, labels, ids, classes


def read_cub200(root: str, split: str, crop_gt: bool = False) -> ImageList:
    """CUB-200-2011 from its official archive: ``CUB_200_2011/{images,images.txt,...}``."""
    base = _find_root(root, "images.txt", "cub200", ["CUB_200_2011"])
    paths, labels, ids, classes = _cub_split(base, split)
    boxes = None
    if crop_gt:
        table = {int(r[0]): tuple(float(v) for v in r[1:5]) for r in read_table(base / "bounding_boxes.txt")}
        boxes = [table[i] for i in ids]
    samples = [(str(base / "images" / paths[i]), labels[i]) for i in ids]
    return ImageList(samples, classes, f"cub200:{split}:crop={crop_gt}", boxes)


def read_travelingbirds(root: str, split: str, cub_root: str) -> ImageList:
    """TravelingBirds (``CUB_fixed/{train,test}/<class>/<image>``) with CUB-200-2011's official split."""
    base = _find_root(root, "CUB_fixed", "travelingbirds", ["travelingbirds", "TravelingBirds"]) / "CUB_fixed"
    if not cub_root:
        raise FileNotFoundError(
            "dataset travelingbirds takes its split from CUB-200-2011: set data.cub_root to the CUB_200_2011 folder"
        )
    cub = _find_root(cub_root, "images.txt", "cub200 (for travelingbirds)", ["CUB_200_2011"])
    paths, labels, ids, classes = _cub_split(cub, split)
    folder = base / ("train" if split == "train" else "test")
    samples = [(str(folder / paths[i]), labels[i]) for i in ids]
    missing = [p for p, _ in samples[:50] if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"dataset travelingbirds: {missing[0]} is missing; is {folder} complete?")
    return ImageList(samples, classes, f"travelingbirds:{split}")


def read_fgvc_aircraft(root: str, split: str) -> ImageList:
    """FGVC-Aircraft 2013b at the variant level: ``trainval`` for training, ``test`` for testing (100 classes)."""
    base = _find_root(root, "data/variants.txt", "fgvc_aircraft", ["fgvc-aircraft-2013b"]) / "data"
    classes = [line.strip() for line in (base / "variants.txt").read_text().splitlines() if line.strip()]
    index = {name: i for i, name in enumerate(classes)}
    listing = base / f"images_variant_{'trainval' if split == 'train' else 'test'}.txt"
    if not listing.is_file():
        raise FileNotFoundError(f"dataset fgvc_aircraft: missing {listing}")
    samples = []
    for line in listing.read_text().splitlines():
        if line.strip():
            image_id, variant = line.split(" ", 1)
            samples.append((str(base / "images" / f"{image_id}.jpg"), index[variant.strip()]))
    return ImageList(samples, classes, f"fgvc_aircraft:{split}")


def read_stanford_cars(root: str, split: str) -> ImageList:
    """Stanford Cars from the devkit layout (``devkit/cars_meta.mat``, ``cars_{train,test}/``); needs scipy."""
    base = _find_root(root, "devkit/cars_meta.mat", "stanford_cars", ["stanford_cars", "StanfordCars"])
    try:
        from scipy.io import loadmat
    except ImportError as e:
        raise ImportError("reading Stanford Cars' .mat annotations needs scipy: pip install scipy") from e
    annos = base / ("devkit/cars_train_annos.mat" if split == "train" else "cars_test_annos_withlabels.mat")
    if not annos.is_file():
        raise FileNotFoundError(f"dataset stanford_cars: missing {annos}")
    classes = [str(c[0]) for c in loadmat(base / "devkit/cars_meta.mat", squeeze_me=False)["class_names"][0]]
    folder = base / ("cars_train" if split == "train" else "cars_test")
    samples = [
        (str(folder / str(a["fname"][0])), int(a["class"][0][0]) - 1)
        for a in loadmat(annos, squeeze_me=False)["annotations"][0]
    ]
    return ImageList(samples, classes, f"stanford_cars:{split}")


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: {array.size} values for shape {shape}")
    return array.reshape(shape)


def read_fashion_mnist(root: str, split: str) -> ArrayImages:
    """Fashion-MNIST from its original idx files (Debian: apt-get install dataset-fashion-mnist)."""
    base = Path(root or FASHION_MNIST_DIR).expanduser()
    prefix = "train" if split == "train" else "t10k"
    images, labels = base / f"{prefix}-images-idx3-ubyte.gz", base / f"{prefix}-labels-idx1-ubyte.gz"
    for path in (images, labels):
        if not path.is_file():
            raise FileNotFoundError(
                f"dataset fashion_mnist: {path} not found; install Debian's dataset-fashion-mnist package "
                f"(apt-get install dataset-fashion-mnist) or set data.root to the folder of the idx .gz files"
            )
    return ArrayImages(_read_idx(images), _read_idx(labels), FASHION_MNIST_CLASSES, f"fashion_mnist:{split}")


def _read_timm(name: str, root: str, split: str) -> TimmDataset:
    splits = ["train"] if split == "train" else ["test", "validation", "val"]
    if name == "folder":
        # timm falls back to the root itself when a split folder is missing; a run needs real splits.
        base = Path(root).expanduser()
        found = [s for s in splits if (base / s).is_dir()]
        if not found:
            raise FileNotFoundError(
                f"dataset folder: no {' or '.join(splits)} sub-folder in {root!r}; expected the ImageFolder layout "
                "ROOT/train/<class>/<image> and ROOT/test/<class>/<image>"
            )
        return TimmDataset(create_dataset("", root=str(base), split=found[0]), f"{name}:{found[0]}:{root}")
    errors = []
    for candidate in splits:
        try:
            dataset = create_dataset(name, root=root, split=candidate)
        except (FileNotFoundError, RuntimeError, AssertionError, ValueError) as e:
            errors.append(f"{candidate}: {e}")
            continue
        return TimmDataset(dataset, f"{name}:{candidate}:{root}")
    raise FileNotFoundError(f"dataset {name}: no usable {'/'.join(splits)} split under {root!r} ({'; '.join(errors)})")


def read_dataset(cfg: DataConfig, split: str) -> Dataset:
    """The raw (untransformed) ``split`` ('train' or 'test') of the configured dataset."""
    name = cfg.dataset
    if name == "cub200":
        return read_cub200(cfg.root, split, cfg.crop_gt)
    if name == "travelingbirds":
        return read_travelingbirds(cfg.root, split, cfg.cub_root)
    if name == "fgvc_aircraft":
        return read_fgvc_aircraft(cfg.root, split)
    if name == "stanford_cars":
        return read_stanford_cars(cfg.root, split)
    if name == "fashion_mnist":
        return read_fashion_mnist(cfg.root, split)
    if name == "folder" or "/" in name:
        return _read_timm(name, cfg.root, split)
    raise ValueError(
        f"unknown dataset {name!r}; use one of {', '.join(NAMED_DATASETS)} or a timm dataset name such as "
        "torch/cifar10 or hfds/<repo>"
    )


def _first_per_class(dataset: Dataset, per_class: int) -> Dataset:
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


# -- transforms ------------------------------------------------------------------------------------------------


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


# -- loaders ---------------------------------------------------------------------------------------------------


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
        return len(self.classes)


def _split_view(cfg: DataConfig, split: str, per_class: int | None, transform: Any) -> Dataset:
    # Every view is read on its own so that transforms are never shared between views.
    dataset = read_dataset(cfg, split)
    if per_class:
        dataset = _first_per_class(dataset, per_class)
    if len(dataset) == 0:
        raise ValueError(f"dataset {cfg.dataset} under {cfg.root!r} has an empty {split} split")
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
