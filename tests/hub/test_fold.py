"""The plain-timm export (hub/fold.py): layout, sidecar, and which backbones fold."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors.torch import load_file

from timm_qsenn import hub
from timm_qsenn.explain import global_explanation

from ..conftest import make_ternary
from .conftest import CLASSES, FEATURES, METRICS, logits_of


def test_folded_export_layout_and_sidecar(saved, tmp_path):
    model, _, x, logits = saved
    folder = hub.export_folded(model, tmp_path / "folded", metrics=METRICS, dataset="cub200")
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "test_resnet" and "qsenn" not in config
    assert config["label_names"] == CLASSES
    sidecar = json.loads((folder / hub.SIDECAR_NAME).read_text())
    assert sidecar["selection"] == [3, 17, 40, 41, 64, 90] and sidecar["feature_names"] == FEATURES
    explanation = global_explanation(model)
    for cls, entry in zip(explanation.classes, sidecar["classes"]):
        assert [(u["channel"], u["sign"]) for u in entry["features"]] == [(u.channel, u.sign) for u in cls.features]
    weight = load_file(folder / "model.safetensors")["fc.weight"]
    unused = sorted(set(range(96)) - set(sidecar["selection"]))
    assert weight[:, unused].count_nonzero() == 0
    assert (folder / "README.md").read_text().count("import timm_qsenn") == 0
    plain = timm.create_model(f"local-dir:{folder}", pretrained=True)
    assert torch.allclose(logits_of(plain, x), logits, atol=1e-5)


def test_vit_folds_with_average_pooling(tiny_vit):
    model = make_ternary(tiny_vit, [0, 5, 9, 33, 60], n_per_class=2.0, seed=1)
    plain, kwargs = hub.fold(model)
    assert kwargs["global_pool"] == "avg" and kwargs["fc_norm"] is False
    x = torch.randn(2, 3, 64, 64)
    assert torch.allclose(logits_of(plain, x), logits_of(model, x), atol=1e-5)


def test_convnext_cannot_be_folded():
    convnext = timm.create_model("qsenn", backbone="test_convnext", num_classes=3)
    model = make_ternary(convnext, [1, 2, 3], n_per_class=2.0, seed=1)
    with pytest.raises(ValueError, match="test_convnext cannot be folded.*save_pretrained"):
        hub.fold(model)
