import sys

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from timm_qsenn.explain import explain_image, feature_gallery, plot_class_sheet, plot_explanation


def test_figures(ternary_cnn, tmp_path):
    pytest.importorskip("matplotlib")
    explanation = explain_image(ternary_cnn, torch.randn(3, 48, 48))
    figure = plot_explanation(explanation, top=3)
    figure.savefig(tmp_path / "local.png")
    loader = DataLoader(TensorDataset(torch.randn(6, 3, 32, 32), torch.randint(0, 5, (6,))), batch_size=3)
    sheet = plot_class_sheet(ternary_cnn, 1, feature_gallery(ternary_cnn, loader, top=2, size=32))
    sheet.savefig(tmp_path / "sheet.png")
    plot_class_sheet(ternary_cnn, 0).savefig(tmp_path / "bars.png")
    assert all(Image.open(tmp_path / f).size[0] > 100 for f in ("local.png", "sheet.png", "bars.png"))
    with pytest.raises(ValueError, match="class_index"):
        plot_class_sheet(ternary_cnn, 5)


def test_figures_explain_a_missing_matplotlib(ternary_cnn, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    explanation = explain_image(ternary_cnn, torch.randn(3, 32, 32))
    with pytest.raises(ImportError, match=r"timm-qsenn\[plot\]"):
        plot_explanation(explanation)
