import math

import pytest
import torch

from timm_qsenn.metrics import diversity_at_k, diversity_per_image, sid_at_k


def _peaks(positions, num_positions=16, height=100.0):
    """One map per position: ``height`` at that position, 0 elsewhere (1 x F x 4 x 4)."""
    maps = torch.zeros(1, len(positions), num_positions)
    for j, p in enumerate(positions):
        maps[0, j, p] = height
    return maps.view(1, len(positions), 4, 4)


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
