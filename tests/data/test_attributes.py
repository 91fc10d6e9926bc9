import pytest
import torch

import timm_qsenn.metrics as metrics
from timm_qsenn.data.attributes import AttributeLabels, read_cub_attributes, read_cub_class_attributes


def _write_cub(root):
    root.mkdir()
    (root / "attributes").mkdir()
    images = ["001.A/a1.jpg", "001.A/a2.jpg", "002.B/b1.jpg", "002.B/b2.jpg"]
    (root / "images.txt").write_text("".join(f"{i + 1} {p}\n" for i, p in enumerate(images)))
    (root / "train_test_split.txt").write_text("1 1\n2 0\n3 1\n4 0\n")
    (root.parent / "attributes.txt").write_text("1 has_bill_shape::curved\n2 has_wing_color::blue\n")
    lines = []
    for image in range(1, 5):
        for attribute in (1, 2):
            present = (image + attribute) % 2
            certainty = {1: 4, 2: 3, 3: 1, 4: 2}[image] if attribute == 1 else 3
            lines.append(f"{image} {attribute} {present} {certainty} 12.5")
    lines[3] += " 0"  # the official file has a few lines with an extra column
    (root / "attributes" / "image_attribute_labels.txt").write_text("\n".join(lines) + "\n")
    (root / "attributes" / "class_attribute_labels_continuous.txt").write_text("10.0 90.5\n55.0 0.0\n")
    return images


def test_cub_readers(tmp_path):
    root = tmp_path / "CUB_200_2011"
    images = _write_cub(root)
    train = read_cub_attributes(tmp_path, split="train")  # the parent folder works too
    assert train.names == ["has_bill_shape::curved", "has_wing_color::blue"]
    assert train.image_paths == [images[0], images[2]]
    assert train.present.tolist() == [[False, True], [False, True]]
    assert train.known.tolist() == [[True, True], [False, True]]  # image 3, attribute 1: "not visible"
    everything = read_cub_attributes(root, split=None)
    assert len(everything) == 4 and everything.known[:, 0].tolist() == [True, True, False, False]
    reordered = everything.subset(["/data/test/002.B/b2.jpg", "/data/train/001.A/a1.jpg"])
    assert reordered.image_paths == [images[3], images[0]]
    assert torch.equal(reordered.present, everything.present[[3, 0]])
    with pytest.raises(ValueError, match="no attribute labels"):
        everything.subset(["003.C/c.jpg"])
    assert read_cub_class_attributes(root).tolist() == [[10.0, 90.5], [55.0, 0.0]]
    with pytest.raises(FileNotFoundError, match="image_attribute_labels"):
        read_cub_attributes(tmp_path / "nowhere")


def test_metrics_still_exports_the_readers():
    # The README imports them from timm_qsenn.metrics, where they lived before timm_qsenn.data.
    assert metrics.AttributeLabels is AttributeLabels
    assert metrics.read_cub_attributes is read_cub_attributes
    assert metrics.read_cub_class_attributes is read_cub_class_attributes
