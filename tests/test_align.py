import itertools
import json
import math
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from timm_qsenn.align import (
    apply_feature_names,
    clip_concept_scores,
    concept_correlation,
    cub_attribute_phrase,
    linear_assignment,
    name_features,
    name_features_from_attributes,
    pooled_features,
)
from timm_qsenn.explain import explain_image, global_explanation
from timm_qsenn.metrics import AttributeLabels


def _planted(num_images=400, num_concepts=30, num_features=12, noise=0.5, binary=False, seed=0):
    """Concept evidence, and features that are noisy, rescaled copies of distinct concepts (a hidden permutation)."""
    g = torch.Generator().manual_seed(seed)
    if binary:
        concepts = (torch.rand(num_images, num_concepts, generator=g) < 0.3).float()
    else:
        concepts = torch.randn(num_images, num_concepts, generator=g)
    truth = torch.randperm(num_concepts, generator=g)[:num_features]
    scale = torch.rand(num_features, generator=g) * 3 + 0.5
    shift = torch.randn(num_features, generator=g) * 5
    features = concepts[:, truth] * scale + shift + noise * torch.randn(num_images, num_features, generator=g)
    return features, concepts, truth.tolist()


def test_concept_correlation_is_pearson_over_the_known_images():
    g = torch.Generator().manual_seed(0)
    features, scores = torch.randn(50, 3, generator=g), torch.randn(50, 4, generator=g)
    matrix = concept_correlation(features, scores)
    expected = np.corrcoef(features.T.numpy(), scores.T.numpy())[:3, 3:]
    assert matrix.numpy() == pytest.approx(expected, abs=1e-10)
    known = torch.rand(50, 4, generator=g) > 0.4
    masked = concept_correlation(features, scores, known)
    for a in range(4):
        rows = known[:, a].numpy()
        sub = np.corrcoef(features[rows].T.numpy(), scores[rows, a].numpy())[:3, 3]
        assert masked[:, a].numpy() == pytest.approx(sub, abs=1e-10)
    assert concept_correlation(torch.ones(50, 1), scores).isnan().all()  # a constant feature says nothing


def test_alignment_is_invariant_to_positive_affine_rescaling_of_a_feature():
    features, concepts, _ = _planted()
    rescaled = features.clone()
    rescaled[:, 3] = 7.5 * rescaled[:, 3] - 40
    assert torch.allclose(concept_correlation(rescaled, concepts), concept_correlation(features, concepts), atol=1e-10)
    flipped = features.clone()
    flipped[:, 3] = -flipped[:, 3]
    assert torch.allclose(concept_correlation(flipped, concepts)[3], -concept_correlation(features, concepts)[3])


@pytest.mark.parametrize("one_to_one", [False, True])
def test_planted_concepts_are_recovered_from_scores(one_to_one):
    features, concepts, truth = _planted()
    names = [f"concept {a}" for a in range(concepts.shape[1])]
    naming = name_features(features, concepts, names, center_images=False)
    matches = naming.assigned if one_to_one else naming.best
    assert [m.concept for m in matches] == truth
    assert all(m.confidence > 0.6 and m.margin > 0.3 for m in matches)
    assert naming.names(one_to_one=one_to_one) == [names[a] for a in truth]


def test_clip_like_scores_are_centred_per_image():
    features, concepts, truth = _planted(noise=0.3, seed=1)
    g = torch.Generator().manual_seed(2)
    # CLIP similarities share a large per-image offset (style, quality) that says nothing about any concept.
    offset = 5 * torch.randn(features.shape[0], 1, generator=g)
    scores = 0.05 * concepts + offset
    biased_features = features + offset  # ... and the features pick it up too
    naming = name_features(biased_features, scores, [str(a) for a in range(30)])
    assert [m.concept for m in naming.best] == truth
    # Without centering every concept looks alike: the offset dominates each correlation, so confidences are
    # high for every concept and the margins that tell them apart vanish.
    uncentred = name_features(biased_features, scores, [str(a) for a in range(30)], center_images=False)
    assert min(m.margin for m in naming.best) > 10 * max(m.margin for m in uncentred.best)


@pytest.mark.parametrize("statistic", ["correlation", "contrast"])
def test_planted_concepts_are_recovered_from_binary_attributes(statistic):
    features, concepts, truth = _planted(binary=True, noise=0.3)
    g = torch.Generator().manual_seed(3)
    known = torch.rand(concepts.shape, generator=g) > 0.2
    # Untrusted labels are wrong on purpose: they must not count.
    present = torch.where(known, concepts.bool(), ~concepts.bool())
    names = [f"has_part_{a}::red" for a in range(concepts.shape[1])]
    attributes = AttributeLabels(present, known, names)
    naming = name_features_from_attributes(features, attributes, statistic=statistic, phrase=cub_attribute_phrase)
    assert [m.concept for m in naming.best] == truth
    assert [m.concept for m in naming.assigned] == truth
    assert naming.best[0].name == f"red part {truth[0]}"
    data = json.loads(naming.to_json())
    assert data["statistic"] == statistic and len(data["best"]) == 12


def test_linear_assignment_is_optimal():
    g = torch.Generator().manual_seed(0)
    for rows, cols in [(4, 4), (3, 6), (6, 3), (5, 5)]:
        for _ in range(5):
            scores = torch.randn(rows, cols, generator=g)
            pairs = linear_assignment(scores, maximize=True)
            assert len(pairs) == min(rows, cols)
            assert len({r for r, _ in pairs}) == len({c for _, c in pairs}) == len(pairs)
            best = max(
                sum(float(scores[r, c]) for r, c in zip(range(rows), perm))
                if rows <= cols
                else sum(float(scores[r, c]) for r, c in zip(perm, range(cols)))
                for perm in itertools.permutations(range(max(rows, cols)), min(rows, cols))
            )
            assert sum(float(scores[r, c]) for r, c in pairs) == pytest.approx(best)
            cheapest = linear_assignment(scores)
            assert sum(float(scores[r, c]) for r, c in cheapest) == pytest.approx(
                -sum(float(-scores[r, c]) for r, c in linear_assignment(-scores, maximize=True))
            )
    with_nan = torch.tensor([[math.nan, 1.0], [0.5, 0.9]])
    assert linear_assignment(with_nan, maximize=True) == [(0, 1), (1, 0)]


def test_names_overrides_thresholds_and_duplicates():
    features, concepts, truth = _planted(num_features=3)
    features = torch.cat([features, features[:, :1] + 0.1 * torch.randn(400, 1)], dim=1)  # two copies of one
    naming = name_features(features, concepts, [f"c{a}" for a in range(30)], center_images=False)
    names = naming.names()
    assert names[3] == f"c{truth[0]} (2)"
    assert naming.names(unique=False)[3] == f"c{truth[0]}"
    assert naming.names(overrides={1: "wing bar"})[1] == "wing bar"
    assert naming.names(min_confidence=1.01) == ["feature 0", "feature 1", "feature 2", "feature 3"]
    assert naming.names(one_to_one=True)[3] != f"c{truth[0]}"  # the concept is taken by feature 0
    with pytest.raises(ValueError, match="outside"):
        naming.names(overrides={4: "x"})


def test_names_reach_the_model_and_its_explanations(tiny_cnn):
    model = tiny_cnn
    model.head.select([3, 7, 11, 20])
    images = torch.randn(12, 3, 32, 32)
    loader = DataLoader(TensorDataset(images, torch.zeros(12, dtype=torch.long)), batch_size=5)
    features, labels = pooled_features(model, loader)
    with torch.no_grad():
        assert torch.allclose(features, model.forward_qsenn(images).features)
    assert labels.shape == (12,)
    scores = torch.cat([features[:, [2, 0]], torch.randn(12, 3)], dim=1)
    naming = name_features(features, scores, ["stripe", "beak", "x", "y", "z"], center_images=False)
    names = apply_feature_names(model, naming, min_confidence=0.999, overrides={3: "tail"})
    assert names[0] == "beak" and names[2] == "stripe" and names[3] == "tail"
    assert names[1] == "feature 7"  # not confident enough: keeps the model's name (its backbone channel)
    assert model.feature_names == names
    assert global_explanation(model).feature_names == names
    assert {c.name for c in explain_image(model, images[0]).contributions} <= set(names)
    assert apply_feature_names(model, {1: "eye"})[1] == "eye" and model.feature_names[0] == "beak"
    with pytest.raises(ValueError, match="one per feature"):
        apply_feature_names(model, ["a", "b"])


def test_cub_attribute_phrase():
    assert cub_attribute_phrase("has_bill_shape::curved_(up_or_down)") == "curved (up or down) bill shape"
    assert cub_attribute_phrase("has_wing_color::blue") == "blue wing color"


def test_clip_scores_never_download_and_use_a_local_model(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        clip_concept_scores(["x.jpg"], ["red"], tmp_path / "missing")
    folder = tmp_path / "clip"
    folder.mkdir()
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match="pip install transformers"):
        clip_concept_scores(["x.jpg"], ["red"], folder)

    calls = []

    class FakeModel:
        """A CLIP stand-in: text i embeds to axis i; an image embeds to its mean colour."""

        @classmethod
        def from_pretrained(cls, path, local_files_only=False):
            calls.append((path, local_files_only))
            return cls()

        def to(self, device):
            return self

        def eval(self):
            return self

        def get_text_features(self, ids):
            return torch.eye(3)[ids]

        def get_image_features(self, pixels):
            return pixels

    class FakeProcessor(FakeModel):
        def __call__(self, text=None, images=None, padding=False, return_tensors=None):
            if text is not None:
                return _Batch(
                    ids=torch.tensor(
                        [["a photo of red.", "a photo of green.", "a photo of blue."].index(t) for t in text]
                    )
                )
            return _Batch(
                pixels=torch.stack([torch.tensor(np.asarray(i), dtype=torch.float32).mean((0, 1)) for i in images])
            )

    class _Batch(dict):
        def to(self, device):
            return self

    monkeypatch.setitem(
        sys.modules, "transformers", types.SimpleNamespace(AutoModel=FakeModel, AutoProcessor=FakeProcessor)
    )
    paths = []
    for i, colour in enumerate([(255, 0, 0), (0, 0, 255), (0, 255, 0)]):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (4, 4), colour).save(paths[-1])
    scores = clip_concept_scores(paths, ["red", "green", "blue"], folder, batch_size=2)
    assert calls == [(str(folder), True), (str(folder), True)]
    assert scores.argmax(dim=1).tolist() == [0, 2, 1]
    assert torch.allclose(scores.max(dim=1).values, torch.ones(3))


def test_names_travel_through_a_saved_model(tiny_cnn, tmp_path):
    hub = pytest.importorskip("timm_qsenn.hub")
    tiny_cnn.head.select([3, 7, 11])
    names = apply_feature_names(tiny_cnn, ["striped wing", "red crown", "long tail"])
    folder = hub.save_pretrained(tiny_cnn, tmp_path / "model")
    assert json.loads((folder / "config.json").read_text())["model_args"]["feature_names"] == names
    assert "red crown" in (folder / "README.md").read_text()
    assert hub.load_model(folder).feature_names == names
