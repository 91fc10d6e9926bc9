import json
import math
import weakref
from statistics import NormalDist

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.data import DataLoader, TensorDataset

import timm_qsenn.metrics as metrics_module
from timm_qsenn.head import QSENNHead
from timm_qsenn.metrics import (
    AttributeLabels,
    QSENNMetrics,
    accuracy,
    alignment,
    alignment_matrix,
    class_independence,
    contrastiveness,
    correlation,
    dependence,
    dependence_per_image,
    diversity_at_k,
    diversity_per_image,
    evaluate,
    fit_gaussian_mixture_1d,
    num_features_used,
    read_cub_attributes,
    read_cub_class_attributes,
    sid_at_k,
    structural_grounding,
    used_features,
    weights_per_class,
)
from timm_qsenn.qsenn import QSENNOutput
from timm_qsenn.ternary import quantize_ternary, ternary_bias

from .conftest import make_ternary


def _peaks(positions, num_positions=16, height=100.0):
    """One map per position: ``height`` at that position, 0 elsewhere (1 x F x 4 x 4)."""
    maps = torch.zeros(1, len(positions), num_positions)
    for j, p in enumerate(positions):
        maps[0, j, p] = height
    return maps.view(1, len(positions), 4, 4)


# -- accuracy and sparsity -----------------------------------------------------------------------------------


def test_accuracy_and_sparsity_counts():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, 1.0], [0.0, 1.0]])
    assert accuracy(logits, torch.tensor([0, 1, 1, 1])) == 0.75
    assert accuracy(torch.tensor([0, 1]), torch.tensor([0, 0])) == 0.5
    with pytest.raises(ValueError, match="differ in shape"):
        accuracy(logits, torch.tensor([0, 1]))
    weight = torch.tensor([[1.0, 0, 0, -1.0], [0, 0, 0, 1.0], [1.0, 0, 0, 0]])
    assert used_features(weight).tolist() == [0, 3]
    assert num_features_used(weight) == 2
    assert weights_per_class(weight) == 4 / 3


# -- diversity@k / SID@k ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", [diversity_at_k, sid_at_k])
def test_disjoint_maps_give_one_and_identical_maps_give_one_over_k(metric):
    weight = torch.ones(1, 5)
    prediction = torch.tensor([0])
    assert metric(_peaks([0, 3, 6, 9, 12]), prediction, weight, k=5) == pytest.approx(1.0, abs=1e-5)
    identical = torch.rand(1, 1, 4, 4).expand(1, 5, 4, 4)
    assert metric(identical, prediction, weight, k=5) == pytest.approx(1 / 5, abs=1e-6)
    assert metric(torch.rand(1, 5, 4, 4), prediction, weight, k=1) == pytest.approx(1.0, abs=1e-6)


def test_sid_is_invariant_to_map_scale_and_diversity_is_not():
    maps = torch.rand(3, 4, 5, 5)
    scaled = maps * torch.tensor([1.0, 7.0, 0.2, 3.0])[None, :, None, None]
    weight, predictions = torch.ones(2, 4), torch.tensor([0, 1, 0])
    assert sid_at_k(scaled, predictions, weight, k=3) == pytest.approx(sid_at_k(maps, predictions, weight, k=3))
    assert diversity_at_k(scaled, predictions, weight, k=3) != pytest.approx(
        diversity_at_k(maps, predictions, weight, 3)
    )


def test_only_classes_with_k_weights_count_and_top_k_is_signed():
    # Class 0 has 2 positive and 1 negative weight; feature 2 has weight 0 in class 0 but is used by class 1.
    weight = torch.tensor([[1.0, 1.0, 0.0, -1.0, 0.0], [0.0, 0.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0, 0.0]])
    maps = _peaks([0, 1, 0, 3, 5])
    per_image = diversity_per_image(maps.repeat(2, 1, 1, 1), torch.tensor([0, 2]), weight, k=3)
    # Signed top-3 of class 0 is features 0, 1 and the zero-weight 2 (a copy of 0), not the negative 3: 2/3.
    assert per_image[0].item() == pytest.approx(2 / 3, abs=1e-5)
    assert math.isnan(per_image[1].item())  # class 2 has one weight < k
    # Feature 4 is unused by every class and never enters; only the counted image is averaged.
    assert diversity_at_k(maps.repeat(2, 1, 1, 1), torch.tensor([0, 2]), weight, k=3) == pytest.approx(2 / 3, abs=1e-5)
    assert math.isnan(diversity_at_k(maps, torch.tensor([2]), weight, k=3))


def test_diversity_checks_its_inputs():
    with pytest.raises(ValueError, match="one map per class-layer feature"):
        diversity_at_k(torch.rand(1, 3, 2, 2), torch.tensor([0]), torch.ones(1, 4))
    with pytest.raises(ValueError, match="positive"):
        diversity_at_k(torch.rand(1, 4, 2, 2), torch.tensor([0]), torch.ones(1, 4), k=0)
    with pytest.raises(ValueError, match="variant"):
        diversity_per_image(torch.rand(1, 4, 2, 2), torch.tensor([0]), torch.ones(1, 4), variant="SID")


# -- dependence, class-independence, contrastiveness, correlation -----------------------------------------


def test_dependence_known_answers():
    weight = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0], [0.0, 2.0, 0.0, 0.0, 3.0]])
    features = torch.tensor([[1.0, 1.0, 1.0, 1.0, 9.0], [0.0, 5.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    per_image = dependence_per_image(features, torch.tensor([0, 1, 0]), weight)
    assert per_image[0].item() == pytest.approx(0.25)  # four equal contributions
    assert per_image[1].item() == pytest.approx(1.0)  # one feature carries the logit
    assert math.isnan(per_image[2].item())  # nothing contributes: skipped
    assert dependence(features, torch.tensor([0, 1, 0]), weight) == pytest.approx(0.625)


def test_class_independence_known_answers_and_affine_invariance():
    labels = torch.arange(4).repeat_interleave(5)
    owned = (labels == 2).float() * torch.rand(20).add(0.5)  # fires on class 2 only
    spread = torch.ones(20) + (torch.arange(20) % 5 == 0).float()  # same mass in every class
    assert class_independence(owned[:, None], labels) == pytest.approx(0.0, abs=1e-12)
    assert class_independence(spread[:, None], labels) == pytest.approx(0.75)
    features = torch.stack([owned, spread], dim=1)
    assert class_independence(features, labels) == pytest.approx(0.375)
    assert class_independence(3 * features - 7, labels) == pytest.approx(0.375)


def test_gaussian_mixture_recovers_its_components_like_scikit_learn():
    g = torch.Generator().manual_seed(1)
    values = torch.cat([torch.randn(600, generator=g) * 0.5 - 2, torch.randn(1400, generator=g) * 1.5 + 3])
    weights, means, stds = fit_gaussian_mixture_1d(values[:, None])
    assert weights[0].tolist() == pytest.approx([0.3, 0.7], abs=0.03)
    assert means[0].tolist() == pytest.approx([-2, 3], abs=0.15)
    assert stds[0].tolist() == pytest.approx([0.5, 1.5], abs=0.1)
    mixture = pytest.importorskip("sklearn.mixture").GaussianMixture(2, random_state=0).fit(values[:, None].numpy())
    order = mixture.means_.ravel().argsort()
    assert means[0].numpy() == pytest.approx(mixture.means_.ravel()[order], abs=0.02)
    assert stds[0].numpy() ** 2 == pytest.approx(mixture.covariances_.ravel()[order], rel=0.03)


def test_contrastiveness_known_answers_and_affine_invariance(monkeypatch):
    g = torch.Generator().manual_seed(0)
    on_off = torch.cat([torch.zeros(100), torch.full((100,), 10.0)]) + 0.01 * torch.randn(200, generator=g)
    constant = torch.full((200,), 4.0)
    broad = torch.randn(200, generator=g)
    assert contrastiveness(on_off[:, None]) == pytest.approx(1.0, abs=1e-6)
    assert contrastiveness(constant[:, None]) == 0.0
    features = torch.stack([on_off, broad], dim=1)
    _, means, stds = fit_gaussian_mixture_1d((broad - broad.mean())[:, None] / broad.std(unbiased=False))
    overlap = NormalDist(float(means[0, 0]), float(stds[0, 0])).overlap(
        NormalDist(float(means[0, 1]), float(stds[0, 1]))
    )
    assert contrastiveness(features) == pytest.approx(1 - (overlap + 0.0) / 2, abs=1e-6)
    assert contrastiveness(features * torch.tensor([3.0, 0.5]) + torch.tensor([-4.0, 9.0])) == pytest.approx(
        contrastiveness(features), abs=1e-6
    )
    whole = contrastiveness(features)
    monkeypatch.setattr(metrics_module, "_EM_CHUNK_VALUES", 200)  # one column per EM run: same answer
    assert contrastiveness(features) == pytest.approx(whole, abs=1e-12)


def test_correlation_known_answers():
    a, b = torch.tensor([1.0, 0.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0, 0.0])
    assert correlation(torch.stack([a, b], dim=1)) == 0.0
    assert correlation(torch.stack([a, 2 * a, b], dim=1)) == pytest.approx(2 / 3)
    c = torch.tensor([1.0, 1.0, 0.0, 0.0])
    # cos(a, c) = cos(b, c) = 1/sqrt(2); a and b are orthogonal.
    assert correlation(torch.stack([a, b, c], dim=1)) == pytest.approx(1 / math.sqrt(2))


# -- alignment and structural grounding ---------------------------------------------------------------------


def test_alignment_known_answer_mask_and_affine_invariance():
    g = torch.Generator().manual_seed(0)
    present = torch.rand(40, 3, generator=g) > 0.5
    feature = present[:, 0].float()  # fires exactly when attribute 0 is present
    p = present[:, 0].float().mean().item()
    matrix = alignment_matrix(feature[:, None], present)
    assert matrix[0, 0].item() == pytest.approx(1 / p)  # difference 1 over mean(f - min f) = p
    assert alignment(feature[:, None], present) == pytest.approx(1 / p)
    features = torch.stack([feature, torch.rand(40, generator=g)], dim=1)
    reference = alignment(features, present)
    assert alignment(features * torch.tensor([5.0, 0.1]) + torch.tensor([2.0, -3.0]), present) == pytest.approx(
        reference
    )
    assert alignment(-features, present) != pytest.approx(reference)
    # Labels that are not trusted do not count, whatever they say.
    known = torch.rand(40, 3, generator=g) > 0.3
    scrambled = torch.where(known, present, ~present)
    assert torch.allclose(alignment_matrix(features, scrambled, known), alignment_matrix(features, present, known))


def test_structural_grounding_known_answers():
    class_attributes = torch.rand(6, 10)
    assert structural_grounding(class_attributes, class_attributes, top=10) == pytest.approx(1.0)
    orthogonal = torch.eye(6)
    assert structural_grounding(orthogonal, class_attributes, top=4) == 0.0
    with pytest.raises(ValueError, match="one row per class"):
        structural_grounding(torch.rand(5, 4), class_attributes)


# -- CUB files -----------------------------------------------------------------------------------------------


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


# -- the driver ------------------------------------------------------------------------------------------------


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
        patch.setattr(metrics_module, "_MIXTURE_ROWS", 4)
        patch.setattr(metrics_module, "contrastiveness", lambda f: fitted.append(f.shape) or 0.5)
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
