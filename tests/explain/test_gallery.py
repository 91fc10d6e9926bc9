import json

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from timm_qsenn.explain import feature_gallery


def test_feature_gallery_keeps_the_most_activating_images(ternary_cnn):
    images, labels = torch.randn(11, 3, 40, 40), torch.randint(0, 5, (11,))
    loader = DataLoader(TensorDataset(images, labels), batch_size=4)
    gallery = feature_gallery(ternary_cnn, loader, top=3, size=32)
    with torch.no_grad():
        features = ternary_cnn.forward_qsenn(images).features
    used = ternary_cnn.head.fc.weight.ne(0).any(0).nonzero().flatten().tolist()
    assert sorted(gallery.features) == used
    for j, examples in gallery.features.items():
        # Compared by activation: a dead feature ties on every image.
        assert [e.activation for e in examples] == pytest.approx(features[:, j].topk(3).values.tolist(), abs=1e-6)
        assert all(e.activation == pytest.approx(float(features[e.index, j]), abs=1e-6) for e in examples)
        assert all(e.label == int(labels[e.index]) and max(e.thumbnail.size) == 32 for e in examples)
    assert json.loads(json.dumps(gallery.to_dict()))
    with pytest.raises(ValueError, match="shuffle"):
        feature_gallery(ternary_cnn, DataLoader(TensorDataset(images, labels), shuffle=True))
