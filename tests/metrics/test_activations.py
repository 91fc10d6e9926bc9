import math
from statistics import NormalDist

import pytest
import torch

import timm_qsenn.metrics.activations as activations_module
from timm_qsenn.metrics import (
    class_independence,
    contrastiveness,
    correlation,
    dependence,
    dependence_per_image,
    fit_gaussian_mixture_1d,
)


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
    monkeypatch.setattr(activations_module, "_EM_CHUNK_VALUES", 200)  # one column per EM run: same answer
    assert contrastiveness(features) == pytest.approx(whole, abs=1e-12)


def test_correlation_known_answers():
    a, b = torch.tensor([1.0, 0.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0, 0.0])
    assert correlation(torch.stack([a, b], dim=1)) == 0.0
    assert correlation(torch.stack([a, 2 * a, b], dim=1)) == pytest.approx(2 / 3)
    c = torch.tensor([1.0, 1.0, 0.0, 0.0])
    # cos(a, c) = cos(b, c) = 1/sqrt(2); a and b are orthogonal.
    assert correlation(torch.stack([a, b, c], dim=1)) == pytest.approx(1 / math.sqrt(2))
