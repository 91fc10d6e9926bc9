import pytest
import torch

from timm_qsenn.metrics import alignment, alignment_matrix, structural_grounding


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
