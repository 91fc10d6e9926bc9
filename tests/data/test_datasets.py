import gzip
from pathlib import Path

import numpy as np
import pytest

from timm_qsenn.data import (
    read_cub200,
    read_dataset,
    read_fashion_mnist,
    read_fgvc_aircraft,
    read_idx,
    read_travelingbirds,
)
from timm_qsenn.train.config import load_config

from .conftest import write_image


def _cub(root: Path) -> Path:
    """A two-class CUB_200_2011 layout with three images per class, the first two of each for training."""
    base = root / "CUB_200_2011"
    classes = ["001.Black_footed_Albatross", "002.Laysan_Albatross"]
    lines = {"images": [], "labels": [], "split": [], "boxes": []}
    image_id = 0
    for c, name in enumerate(classes):
        for i in range(3):
            image_id += 1
            rel = f"{name}/img_{i}.jpg"
            write_image(base / "images" / rel, value=60 * c + 10 * i)
            lines["images"].append(f"{image_id} {rel}")
            lines["labels"].append(f"{image_id} {c + 1}")
            lines["split"].append(f"{image_id} {int(i < 2)}")
            lines["boxes"].append(f"{image_id} 2.0 3.0 10.0 8.0")
    (base / "images.txt").write_text("\n".join(lines["images"]) + "\n")
    (base / "image_class_labels.txt").write_text("\n".join(lines["labels"]) + "\n")
    (base / "train_test_split.txt").write_text("\n".join(lines["split"]) + "\n")
    (base / "bounding_boxes.txt").write_text("\n".join(lines["boxes"]) + "\n")
    (base / "classes.txt").write_text("\n".join(f"{i + 1} {n}" for i, n in enumerate(classes)) + "\n")
    return base


def test_cub_official_split_labels_and_gt_crop(tmp_path):
    base = _cub(tmp_path)
    train = read_cub200(str(tmp_path), "train")  # the parent folder works too
    test = read_cub200(str(base), "test")
    assert len(train) == 4 and len(test) == 2
    assert [label for _, label in train.samples] == [0, 0, 1, 1]
    assert train.classes == ["Black footed Albatross", "Laysan Albatross"]
    image, label = test[1]
    assert image.size == (20, 16) and label == 1
    cropped = read_cub200(str(base), "train", crop_gt=True)
    assert cropped[0][0].size == (10, 8)
    assert cropped.fingerprint() != train.fingerprint()


def test_travelingbirds_takes_cub_split(tmp_path):
    cub = _cub(tmp_path / "cub")
    for split in ("train", "test"):
        for rel in (cub / "images.txt").read_text().split():
            if "/" in rel:
                write_image(tmp_path / "tb" / "CUB_fixed" / split / rel, value=200)
    train = read_travelingbirds(str(tmp_path / "tb"), "train", str(cub))
    test = read_travelingbirds(str(tmp_path / "tb"), "test", str(cub))
    assert len(train) == 4 and len(test) == 2
    assert all("CUB_fixed/test" in path for path, _ in test.samples)
    with pytest.raises(FileNotFoundError, match="data.cub_root"):
        read_travelingbirds(str(tmp_path / "tb"), "train", "")


def test_fgvc_aircraft_variants(tmp_path):
    data = tmp_path / "fgvc-aircraft-2013b" / "data"
    data.mkdir(parents=True)
    (data / "variants.txt").write_text("707-320\nA300B4\n")
    (data / "images_variant_trainval.txt").write_text("0001 707-320\n0002 A300B4\n0003 A300B4\n")
    (data / "images_variant_test.txt").write_text("0004 707-320\n")
    for i in range(1, 5):
        write_image(data / "images" / f"{i:04d}.jpg")
    train, test = read_fgvc_aircraft(str(tmp_path), "train"), read_fgvc_aircraft(str(tmp_path), "test")
    assert [label for _, label in train.samples] == [0, 1, 1] and len(test) == 1
    assert train.classes == ["707-320", "A300B4"]


def _idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_idx_files(tmp_path):
    images = np.arange(3 * 28 * 28).reshape(3, 28, 28) % 256
    _idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    _idx(tmp_path / "train-labels-idx1-ubyte.gz", np.array([9, 0, 3]))
    dataset = read_fashion_mnist(str(tmp_path), "train")
    image, label = dataset[0]
    assert image.mode == "RGB" and image.size == (28, 28) and label == 9
    assert np.array_equal(np.asarray(image)[..., 0], images[0])
    assert dataset.classes[9] == "Ankle boot"
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        read_fashion_mnist(str(tmp_path), "test")
    with gzip.open(tmp_path / "bad-images-idx3-ubyte.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + (10).to_bytes(4, "big") + b"\x00" * 3)
    with pytest.raises(ValueError, match="truncated"):
        read_idx(tmp_path / "bad-images-idx3-ubyte.gz")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.dataset=cub200", "data.root=/nonexistent"], "images.txt not found; looked in /nonexistent"),
        (["data.dataset=cub200"], "set data.root"),
        (["data.dataset=folder", "data.root=/nonexistent"], "no train sub-folder in '/nonexistent'"),
        (["data.dataset=fgvc_aircraft", "data.root=/nonexistent"], "variants.txt not found"),
        (["data.dataset=imagenet_typo"], "unknown dataset 'imagenet_typo'"),
    ],
)
def test_missing_or_unknown_datasets_name_what_and_where(overrides, message):
    with pytest.raises((FileNotFoundError, ValueError), match=message):
        read_dataset(load_config(overrides=overrides).data, "train")


def test_incomplete_cub_names_the_missing_file(tmp_path):
    base = _cub(tmp_path)
    (base / "train_test_split.txt").unlink()
    with pytest.raises(FileNotFoundError, match="missing train_test_split.txt"):
        read_cub200(str(base), "train")
