"""Explanation tests: a ternary Q-SENN with readable class names."""

import pytest

from ..conftest import make_ternary

CLASS_NAMES = ["albatross", "bunting", "cormorant", "dove", "egret"]


def ternary_with_class_names(model, channels, n_per_class=3, seed=0):
    """A ternary model (``make_ternary``) whose pretrained_cfg names its five classes."""
    model = make_ternary(model, channels, n_per_class, seed)
    model.pretrained_cfg["label_names"] = list(CLASS_NAMES)
    return model


@pytest.fixture
def ternary_cnn(tiny_cnn):
    return ternary_with_class_names(tiny_cnn, list(range(0, 60, 4)))
