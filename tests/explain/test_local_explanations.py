import json

import pytest
import torch
from PIL import Image

from timm_qsenn.explain import explain_image, feature_contributions

from .conftest import CLASS_NAMES, ternary_with_class_names


@pytest.mark.parametrize("stage", ["ternary", "dense"])
def test_contributions_sum_to_logit_minus_bias_for_every_image(request, stage):
    if stage == "ternary":
        model = ternary_with_class_names(request.getfixturevalue("tiny_cnn"), list(range(0, 96, 6)))
    else:
        model = request.getfixturevalue("tiny_vit")  # dense head, token backbone
    images = torch.randn(6, 3, 48, 48)
    with torch.no_grad():
        out = model.forward_qsenn(images)
        logits = model(images)
    weight, bias = model.head.fc.weight.double(), model.head.fc.bias.double()
    contributions = feature_contributions(model, out.features)
    expected = torch.nn.functional.linear(model.head.normalize(out.features.double()), weight)
    assert torch.allclose(contributions.sum(dim=2), expected, rtol=0, atol=1e-12)
    assert torch.allclose(contributions.sum(dim=2) + bias, logits.double(), atol=1e-4)
    for image, image_logits in zip(images, logits):
        explanation = explain_image(model, image)
        total = sum(c.contribution for c in explanation.contributions)
        assert total == pytest.approx(explanation.logit - explanation.bias, rel=0, abs=1e-12)
        assert explanation.logit == pytest.approx(float(image_logits.max()), abs=1e-4)
        assert explanation.predicted == int(image_logits.argmax())
        assert explanation.runner_up == int(image_logits.topk(2).indices[1])
        margin = sum(s.margin for s in explanation.separating)
        assert margin + explanation.bias - explanation.runner_up_bias == pytest.approx(
            explanation.logit - explanation.runner_up_logit, abs=1e-12
        )


def test_local_explanation_data_maps_and_json(ternary_cnn):
    image = Image.fromarray((torch.rand(70, 90, 3) * 255).byte().numpy())
    explanation = explain_image(ternary_cnn, image, label=2, max_maps=3)
    height, width = explanation.image_size
    assert (height, width) == tuple(ternary_cnn.pretrained_cfg["input_size"][1:])
    assert (
        explanation.image.shape == (3, height, width) and 0 <= explanation.image.min() <= explanation.image.max() <= 1
    )
    assert explanation.label_name == "cormorant" and explanation.predicted_name in CLASS_NAMES
    assert 0 < len(explanation.feature_maps) <= 6
    assert all(m.shape == (height, width) for m in explanation.feature_maps.values())
    contributions = [c.contribution for c in explanation.contributions]
    assert contributions == sorted(contributions, reverse=True)
    for c in explanation.contributions:
        assert 0 <= c.peak[0] < height and 0 <= c.peak[1] < width
        assert c.contribution == pytest.approx(c.weight * c.normalized)
    data = json.loads(explanation.to_json())
    assert set(data) >= {"predicted", "contributions", "runner_up", "separating", "logit", "bias"}
    assert "feature_maps" not in data and "image" not in data
    with pytest.raises(ValueError, match="one image"):
        explain_image(ternary_cnn, torch.rand(2, 3, 32, 32))
