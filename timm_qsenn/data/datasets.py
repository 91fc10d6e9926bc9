"""Datasets: the paper's datasets read from their official layouts, Fashion-MNIST from its idx files, any timm dataset.

Every dataset class lists its items (``samples``), names its classes, restricts itself to a subset and has a
``fingerprint()`` of its content, which the feature cache keys on.
"""

from __future__ import annotations

import gzip
import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from timm.data import create_dataset
from torch.utils.data import Dataset

from .._utils import read_table
from .config import DataConfig

__all__ = [
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
]

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


def read_idx(path: Path) -> np.ndarray:
    """The array in a gzipped idx file (the format of MNIST and Fashion-MNIST)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: {array.size} values for shape {shape}; download the file again")
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
    return ArrayImages(read_idx(images), read_idx(labels), FASHION_MNIST_CLASSES, f"fashion_mnist:{split}")


def _read_timm(name: str, root: str, split: str) -> TimmDataset:
    """A timm dataset, or an ImageFolder for ``folder``; the test split is the first of test, validation, val."""
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
