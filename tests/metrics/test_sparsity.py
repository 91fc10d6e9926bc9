import pytest
import torch

from timm_qsenn.metrics import accuracy, num_features_used, used_features, weights_per_class


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
