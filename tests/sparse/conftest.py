"""Small problems for the sparse tests: structured (class-dependent means, correlated features) and random."""

import pytest
import torch


def structured_problem(n=400, num_features=10, num_classes=5, informative=None, seed=0, dtype=torch.float32):
    """Non-negative, correlated features whose class means differ on the first ``informative`` columns."""
    gen = torch.Generator().manual_seed(seed)
    informative = num_features if informative is None else informative
    y = (torch.arange(n) % num_classes)[torch.randperm(n, generator=gen)]
    means = torch.zeros(num_classes, num_features)
    means[:, :informative] = 2.0 * torch.randn(num_classes, informative, generator=gen)
    shared = torch.randn(n, 3, generator=gen) @ torch.randn(3, num_features, generator=gen) * 0.5
    x = torch.relu(means[y] + shared + torch.randn(n, num_features, generator=gen))
    return x.to(dtype), y


def standardize(x):
    return (x - x.mean(0)) / x.std(0, unbiased=False).clamp_min(1e-5)


@pytest.fixture
def structured():
    x, y = structured_problem()
    return standardize(x), y


@pytest.fixture
def random_problem():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(300, 8, generator=gen)
    y = torch.randint(0, 4, (300,), generator=gen)
    return x, y
