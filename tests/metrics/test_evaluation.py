import json
import weakref

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.data import DataLoader, TensorDataset

import timm_qsenn.metrics.evaluation as evaluation_module
from timm_qsenn.head import QSENNHead
from timm_qsenn.metrics import (
    AttributeLabels,
    QSENNMetrics,
    accuracy,
    alignment,
    class_independence,
    contrastiveness,
    correlation,
    dependence,
    diversity_at_k,
    evaluate,
    num_features_used,
    sid_at_k,
    structural_grounding,
    used_features,
    weights_per_class,
)
from timm_qsenn.qsenn import QSENNOutput
from timm_qsenn.ternary import quantize_ternary, ternary_bias

from ..conftest import make_ternary


def test_evaluate_matches_the_tensor_functions(tiny_cnn, tmp_path):
    model = make_ternary(tiny_cnn, list(range(0, 48, 3)))
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randn(13, 3, 64, 64, generator=g), torch.randint(0, 5, (13,), generator=g)
    train_images, train_labels = torch.randn(11, 3, 64, 64, generator=g), torch.randint(0, 5, (11,), generator=g)
    present = torch.rand(11, 6, generator=g) > 0.5
    class_attributes = torch.rand(5, 6, generator=g)
    test_loader = DataLoader(TensorDataset(images, labels), batch_size=5)
    train_loader = DataLoader(TensorDataset(train_images, train_labels), batch_size=4)
    metrics = evaluate(model, test_loader, train_loader, present, class_attributes, k=2)

    weight, relevant = model.head.fc.weight, used_features(model.head.fc.weight)
    with torch.no_grad():
        test, train = model.forward_qsenn(images), model.forward_qsenn(train_images)
    predictions = test.logits.argmax(1)
    raw = train.features[:, relevant]
    normalized = model.head.normalize(train.features)[:, relevant]
    assert metrics.accuracy == accuracy(test.logits, labels)
    assert metrics.num_images == 13 and metrics.num_feature_images == 11 and metrics.feature_split == "train"
    assert metrics.num_features == num_features_used(weight)
    assert metrics.weights_per_class == weights_per_class(weight)
    assert metrics.diversity_at_k == pytest.approx(diversity_at_k(test.feature_maps, predictions, weight, k=2))
    assert metrics.sid_at_k == pytest.approx(sid_at_k(test.feature_maps, predictions, weight, k=2))
    counted = (weight[predictions] != 0).sum(1) >= 2
    assert metrics.diversity_images == int(counted.sum())
    assert metrics.dependence == pytest.approx(dependence(raw, train.logits.argmax(1), weight[:, relevant]))
    assert metrics.class_independence == pytest.approx(class_independence(normalized, train_labels, 5))
    assert metrics.correlation == pytest.approx(correlation(normalized))
    assert metrics.contrastiveness == pytest.approx(contrastiveness(normalized), abs=1e-6)
    assert metrics.alignment == pytest.approx(alignment(raw, present))
    assert metrics.structural_grounding == pytest.approx(structural_grounding(weight, class_attributes, top=20))

    data = json.loads(metrics.to_json(tmp_path / "metrics.json"))
    assert json.loads((tmp_path / "metrics.json").read_text()) == data
    assert QSENNMetrics.from_dict(data) == metrics
    table = metrics.to_table()
    assert "diversity@2 (Q-SENN)" in table and "SID@2 (QPM)" in table and len(table.splitlines()) <= 16
    with pytest.raises(ValueError, match="unknown metric keys"):
        QSENNMetrics.from_dict({**data, "Accuracy": 1.0})


def test_evaluate_covers_the_whole_test_set_and_checks_attribute_rows(tiny_vit, monkeypatch):
    model = make_ternary(tiny_vit, list(range(0, 64, 4)), n_per_class=1)
    images, labels = torch.randn(10, 3, 32, 32), torch.randint(0, 5, (10,))
    test_loader = DataLoader(TensorDataset(images, labels), batch_size=3)
    short_train = DataLoader(TensorDataset(images[:2], labels[:2]), batch_size=3)
    metrics = evaluate(model, test_loader, short_train, k=1)
    # Every test image counts (k = 1), not just as many as the (shorter) training set would allow.
    assert metrics.diversity_images == 10 and metrics.diversity_at_k == pytest.approx(1.0)
    assert metrics.alignment is None and metrics.structural_grounding is None
    alone = evaluate(model, test_loader, k=1)
    assert alone.feature_split == "test" and alone.num_feature_images == 10
    fitted = []
    with monkeypatch.context() as patch:  # mixtures fitted on a uniform sample of 4 of the 10 images
        patch.setattr(evaluation_module, "_MIXTURE_ROWS", 4)
        patch.setattr(evaluation_module, "contrastiveness", lambda f: fitted.append(f.shape) or 0.5)
        sampled = evaluate(model, test_loader, k=1)
    assert fitted == [(4, alone.num_features)] and sampled.correlation == pytest.approx(alone.correlation)
    with pytest.raises(ValueError, match="rows but the loader"):
        evaluate(model, test_loader, attributes=torch.ones(7, 3, dtype=torch.bool))
    shuffled = DataLoader(TensorDataset(images, labels), batch_size=3, shuffle=True)
    with pytest.raises(ValueError, match="shuffle"):
        evaluate(model, shuffled, attributes=AttributeLabels.from_matrix(torch.ones(10, 3)))
    assert model.training is False


# -- bounded memory ----------------------------------------------------------------------------------------


class _LiveBytes(TorchDispatchMode):
    """Tracks the bytes of live tensor storages created by aten ops, and their peak."""

    def __init__(self, ignore=()):
        super().__init__()
        self.ignore = {t.untyped_storage().data_ptr() for t in ignore}  # the dataset's own tensors
        self.refs: dict[int, int] = {}
        self.current = 0
        self.peak = 0
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                self._track(t)
        return out

    def _track(self, t):
        storage = t.untyped_storage()
        key, size = storage.data_ptr(), storage.nbytes()
        if key == 0 or key in self.ignore:
            return
        if key not in self.refs:
            self.refs[key] = 0
            self.current += size
            self.peak = max(self.peak, self.current)
            self.largest = max(self.largest, size)
        self.refs[key] += 1
        weakref.finalize(t, self._release, key, size)

    def _release(self, key, size):
        self.refs[key] -= 1
        if self.refs[key] == 0:
            del self.refs[key]
            self.current -= size


class _MapModel(nn.Module):
    """A stand-in Q-SENN whose feature maps are large (full image resolution), to measure what evaluate holds."""

    def __init__(self, features=8, classes=3):
        super().__init__()
        self.num_classes = classes
        self.conv = nn.Conv2d(3, features, 1)
        self.head = QSENNHead(features, classes)
        self.head.select(list(range(features)))
        t = quantize_ternary(torch.randn(classes, features), 3)
        self.head.set_class_layer(t.weight, ternary_bias(t.codes, torch.randn(classes)))

    def forward_qsenn(self, x):
        maps = self.conv(x).relu()
        features = maps.mean(dim=(2, 3))
        return QSENNOutput(self.head.classify(features), features, maps)


def _peak_bytes(model, num_images, batch_size=8):
    images, labels = torch.randn(num_images, 3, 32, 32), torch.randint(0, 3, (num_images,))
    loader = DataLoader(TensorDataset(images, labels), batch_size=batch_size)
    with _LiveBytes(ignore=(images, labels)) as tracker:
        metrics = evaluate(model, loader, loader, k=2)
    assert metrics.num_images == num_images and metrics.diversity_at_k is not None
    return tracker


def test_evaluate_memory_does_not_grow_with_the_dataset():
    model = _MapModel().eval()
    all_maps_bytes = 256 * 8 * 32 * 32 * 4  # what stacking the maps of 256 images would take: 8 MiB
    small, large = _peak_bytes(model, 32), _peak_bytes(model, 256)
    batch_maps_bytes = 8 * 8 * 32 * 32 * 4
    assert large.largest <= 4 * batch_maps_bytes  # no tensor ever holds more than a few batches of maps
    assert large.peak < all_maps_bytes / 4
    assert large.peak - small.peak < all_maps_bytes / 20  # 8x the images, (almost) the same peak


def test_evaluate_under_accelerate_gathers_like_a_plain_run(tiny_cnn):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    model = make_ternary(tiny_cnn, list(range(0, 40, 2)))
    images, labels = torch.randn(7, 3, 32, 32), torch.randint(0, 5, (7,))
    plain = evaluate(model, DataLoader(TensorDataset(images, labels), batch_size=3), k=2)
    try:
        accelerator = Accelerator(cpu=True)
        prepared_model, loader = accelerator.prepare(model, DataLoader(TensorDataset(images, labels), batch_size=3))
        metrics = evaluate(prepared_model, loader, accelerator=accelerator, k=2)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    assert metrics.num_images == 7
    for name, value in plain.to_dict().items():
        assert getattr(metrics, name) == (pytest.approx(value, abs=1e-6) if isinstance(value, float) else value)
