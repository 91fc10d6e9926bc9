import math

import pytest
import torch

from timm_qsenn.losses import FeatureDiversityLoss, feature_diversity_loss


def test_known_value_on_hand_made_maps():
    ln3 = math.log(3.0)
    # Two features over two positions whose softmaxes are (1/4, 3/4) and (3/4, 1/4), equal spatial means.
    maps = torch.tensor([[[[0.0, ln3]], [[ln3, 0.0]]]])
    logits = torch.tensor([[2.0, 1.0]])  # predicted class 0
    weight = torch.tensor([[3.0, -4.0], [1.0, 0.0]])
    relevance = torch.tensor([0.6, 0.8]) * 5 / (5 + 1e-5)
    # Position 0: max(0.6/4, 0.8*3/4) = 0.6; position 1: max(0.6*3/4, 0.8/4) = 0.45.
    expected = -0.196 * (relevance[1] * 0.75 + relevance[0] * 0.75)
    assert feature_diversity_loss(maps, logits, weight).item() == pytest.approx(expected.item(), rel=1e-6)
    assert FeatureDiversityLoss(beta=0.5)(maps, logits, weight).item() == pytest.approx(
        expected.item() / 0.196 * 0.5, rel=1e-6
    )


def test_uses_predicted_class_and_relative_activation():
    maps = torch.rand(3, 4, 5, 5)
    weight = torch.randn(2, 4)
    logits = torch.tensor([[1.0, 0.0]] * 3)
    loss0 = feature_diversity_loss(maps, logits, weight)
    flipped = feature_diversity_loss(maps, logits.flip(1), weight)
    weight_swapped = weight.flip(0)
    assert loss0.item() == pytest.approx(feature_diversity_loss(maps, logits.flip(1), weight_swapped).item())
    assert loss0.item() != pytest.approx(flipped.item())
    # A feature that is silent on average contributes nothing, wherever it peaks.
    silent = maps.clone()
    silent[:, 3] = 0
    with_peak = silent.clone()
    with_peak[:, 3, 0, 0] = 1e-9
    assert feature_diversity_loss(silent, logits, weight).item() == pytest.approx(
        feature_diversity_loss(with_peak, logits, weight).item(), abs=1e-6
    )


def test_disjoint_peaks_score_better_than_shared_peaks():
    logits = torch.tensor([[1.0, 0.0]])
    weight = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    shared = torch.zeros(1, 2, 4, 4)
    shared[0, :, 0, 0] = 10.0
    disjoint = torch.zeros(1, 2, 4, 4)
    disjoint[0, 0, 0, 0] = 10.0
    disjoint[0, 1, 3, 3] = 10.0
    assert feature_diversity_loss(disjoint, logits, weight) < feature_diversity_loss(shared, logits, weight)


def test_gradients_reach_maps_and_weights():
    maps = torch.rand(2, 3, 4, 4, requires_grad=True)
    weight = torch.randn(5, 3, requires_grad=True)
    logits = torch.randn(2, 5)
    feature_diversity_loss(maps, logits, weight).backward()
    assert maps.grad is not None and maps.grad.abs().sum() > 0
    assert weight.grad is not None and weight.grad.abs().sum() > 0


def test_half_precision_inputs_give_a_float32_loss():
    maps = torch.rand(2, 3, 4, 4).bfloat16()
    loss = feature_diversity_loss(maps, torch.randn(2, 5).bfloat16(), torch.randn(5, 3).bfloat16())
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


@pytest.mark.parametrize(
    "maps, logits, weight",
    [
        (torch.rand(2, 3, 4), torch.rand(2, 5), torch.rand(5, 3)),
        (torch.rand(2, 3, 4, 4), torch.rand(3, 5), torch.rand(5, 3)),
        (torch.rand(2, 3, 4, 4), torch.rand(2, 5), torch.rand(5, 4)),
    ],
)
def test_shape_errors(maps, logits, weight):
    with pytest.raises(ValueError):
        feature_diversity_loss(maps, logits, weight)


def test_weight_gradient_is_reproducible_with_threads():
    """Many images predicting the same class must not make the gradient depend on thread scheduling."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        g = torch.Generator().manual_seed(0)
        maps = torch.rand(512, 256, 4, 4, generator=g)
        logits = torch.randn(512, 3, generator=g)
        grads = []
        for _ in range(5):
            weight = torch.randn(3, 256, generator=torch.Generator().manual_seed(1), requires_grad=True)
            feature_diversity_loss(maps, logits, weight).backward()
            grads.append(weight.grad)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(grads[0], grad) for grad in grads[1:])


def test_autocast_keeps_the_weight_rows_in_float32():
    g = torch.Generator().manual_seed(0)
    maps, logits = torch.rand(4, 6, 3, 3, generator=g), torch.randn(4, 5, generator=g)
    weight = torch.randn(5, 6, generator=g) * (1 + 1e-3 * torch.rand(5, 6, generator=g))
    plain = feature_diversity_loss(maps, logits, weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = feature_diversity_loss(maps, logits, weight)
    assert mixed.dtype == torch.float32 and torch.equal(plain, mixed)
