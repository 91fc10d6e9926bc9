import json

import torch

from timm_qsenn.explain import explain_image, global_explanation

from .conftest import CLASS_NAMES


def test_global_explanation_lists_signed_features_both_ways(ternary_cnn):
    explanation = global_explanation(ternary_cnn)
    weight = ternary_cnn.head.fc.weight
    for cls in explanation.classes:
        assert cls.name == CLASS_NAMES[cls.index]
        assert [u.index for u in cls.features] == sorted(
            weight[cls.index].nonzero().flatten().tolist(), key=lambda j: (-float(weight[cls.index, j]), j)
        )
        assert all(u.sign == int(torch.sign(weight[cls.index, u.index])) for u in cls.features)
        for use in cls.features:
            assert cls.index in explanation.feature_classes[use.index]
    assert json.loads(explanation.to_json())["feature_names"][0] == "feature 0"


def test_feature_names_reach_every_explanation(ternary_cnn):
    names = [f"part {j}" for j in range(ternary_cnn.head.num_features)]
    ternary_cnn.feature_names = names
    explanation = explain_image(ternary_cnn, torch.randn(3, 40, 40))
    assert all(c.name == names[c.index] for c in explanation.contributions)
    assert global_explanation(ternary_cnn).feature_names == names
