"""CUB-200-2011's attribute files: per-image attribute labels (for alignment) and class attribute vectors.

The rows of :class:`AttributeLabels` follow the dataset's image ids; :meth:`AttributeLabels.subset` reorders
them to a loader's images.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from .._utils import read_table

__all__ = ["AttributeLabels", "read_cub_attributes", "read_cub_class_attributes"]


@dataclass(frozen=True)
class AttributeLabels:
    """Binary attribute labels of N images (rows in dataset order), with which labels are trusted."""

    present: Tensor  # bool, N x A
    known: Tensor  # bool, N x A: labels to use (CUB: certainty "probably" or "definitely")
    names: list[str]
    image_paths: list[str] | None = None  # relative paths, e.g. "001.Black_footed_Albatross/x.jpg"

    def __post_init__(self) -> None:
        if self.present.ndim != 2 or self.present.shape != self.known.shape:
            raise ValueError(
                f"present and known must be N x A matrices of one shape, got {tuple(self.present.shape)} and "
                f"{tuple(self.known.shape)}"
            )
        if len(self.names) != self.present.shape[1]:
            raise ValueError(f"{len(self.names)} attribute names for {self.present.shape[1]} attribute columns")
        if self.image_paths is not None and len(self.image_paths) != self.present.shape[0]:
            raise ValueError(f"{len(self.image_paths)} image paths for {self.present.shape[0]} rows")

    @classmethod
    def from_matrix(cls, present: Tensor, names: Sequence[str] | None = None) -> AttributeLabels:
        """Labels from an N x A 0/1 matrix, all of them trusted."""
        present = present.bool()
        names = list(names) if names is not None else [f"attribute {a}" for a in range(present.shape[1])]
        return cls(present, torch.ones_like(present), names)

    def __len__(self) -> int:
        return self.present.shape[0]

    def subset(self, image_paths: Sequence[str | Path]) -> AttributeLabels:
        """The rows of the given images, in that order, matched by their last two path parts (class/file)."""
        if self.image_paths is None:
            raise ValueError("these attribute labels carry no image paths; read them with read_cub_attributes")
        row_of = {_path_key(p): i for i, p in enumerate(self.image_paths)}
        missing = [str(p) for p in image_paths if _path_key(p) not in row_of]
        if missing:
            raise ValueError(
                f"{len(missing)} images have no attribute labels, e.g. {missing[:3]}; pass paths of the same "
                "dataset (matched by class folder and file name)"
            )
        rows = torch.tensor([row_of[_path_key(p)] for p in image_paths], dtype=torch.long)
        return replace(
            self,
            present=self.present[rows],
            known=self.known[rows],
            image_paths=[self.image_paths[i] for i in rows.tolist()],
        )


def _path_key(path: str | Path) -> str:
    """The class folder and file name of an image path, which match it across dataset roots."""
    return "/".join(Path(path).parts[-2:])


def _cub_root(root: str | Path) -> Path:
    """The CUB_200_2011 folder at or directly under ``root``."""
    root = Path(root).expanduser()
    for candidate in (root, root / "CUB_200_2011"):
        if (candidate / "attributes" / "image_attribute_labels.txt").is_file():
            return candidate
    raise FileNotFoundError(
        f"no CUB-200-2011 attribute files under {root}: expected attributes/image_attribute_labels.txt; pass the "
        "CUB_200_2011 folder of the official archive"
    )


def _cub_attribute_names(root: Path, count: int) -> list[str]:
    """The names of attributes.txt (which the archive keeps beside or inside the folder), or numbered names."""
    for path in (root / "attributes" / "attributes.txt", root / "attributes.txt", root.parent / "attributes.txt"):
        if path.is_file():
            names = [line.split(maxsplit=1)[1] for line in path.read_text().splitlines() if line.strip()]
            if len(names) == count:
                return names
    return [f"attribute {a + 1}" for a in range(count)]


def read_cub_attributes(
    root: str | Path, split: Literal["train", "test"] | None = "train", min_certainty: int = 3
) -> AttributeLabels:
    """CUB-200-2011's per-image attribute labels, trusted where certainty >= ``min_certainty``, in image-id order.

    ``root`` is the ``CUB_200_2011`` folder (``images.txt``, ``train_test_split.txt``,
    ``attributes/image_attribute_labels.txt``). Certainty 3 and 4 are "probably" and "definitely"; certainty
    1 ("not visible") and 2 ("guessing") are dropped, as in the reference. A few lines of the official file
    carry an extra column; only the first four are read. Rows are in image-id order, which is not the order
    of an ImageFolder over ``images/``: use :meth:`AttributeLabels.subset` with the dataset's paths.
    """
    if not 1 <= min_certainty <= 4:
        raise ValueError(f"min_certainty must be a CUB certainty id in 1..4, got {min_certainty}")
    root = _cub_root(root)
    images = read_table(root / "images.txt")
    paths = {int(row[0]): row[1] for row in images}
    ids = sorted(paths)
    if split is not None:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train', 'test' or None, got {split!r}")
        is_train = {int(row[0]): row[1] == "1" for row in read_table(root / "train_test_split.txt")}
        ids = [i for i in ids if is_train[i] == (split == "train")]
    labels = []
    with open(root / "attributes" / "image_attribute_labels.txt") as f:
        for line in f:
            parts = line.split(None, 4)
            if len(parts) >= 4:
                labels.append((int(parts[0]), int(parts[1]), parts[2] == "1", int(parts[3])))
    if not labels:
        raise ValueError(f"{root / 'attributes' / 'image_attribute_labels.txt'} holds no labels")
    num_attributes = max(a for _, a, _, _ in labels)
    row_of = {image_id: r for r, image_id in enumerate(ids)}
    present = torch.zeros(len(ids), num_attributes, dtype=torch.bool)
    known = torch.zeros(len(ids), num_attributes, dtype=torch.bool)
    for image_id, attribute, is_present, certainty in labels:
        row = row_of.get(image_id)
        if row is not None and certainty >= min_certainty:
            present[row, attribute - 1] = is_present
            known[row, attribute - 1] = True
    return AttributeLabels(present, known, _cub_attribute_names(root, num_attributes), [paths[i] for i in ids])


def read_cub_class_attributes(root: str | Path) -> Tensor:
    """CUB-200-2011's class attribute vectors (200 x 312, percent of images), for structural grounding."""
    path = _cub_root(root) / "attributes" / "class_attribute_labels_continuous.txt"
    rows = read_table(path)
    if len({len(r) for r in rows}) != 1:
        raise ValueError(f"{path} has rows of different lengths; it should hold one row per class")
    return torch.tensor([[float(v) for v in row] for row in rows], dtype=torch.float64)
