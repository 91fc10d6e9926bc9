"""Shared test setup: no network, few threads, tiny backbones."""

import os

# Tests never reach the Hub; a helper that needs a fake Hub sets HF_ENDPOINT in its own subprocess.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


def make_ternary(model, channels, n_per_class=3, seed=0):
    """Move a Q-SENN model to the ternary stage on ``channels`` with random (seeded) statistics and weights."""
    from timm_qsenn.ternary import quantize_ternary, ternary_bias

    g = torch.Generator().manual_seed(seed)
    model.head.select(channels)
    model.head.set_normalization(torch.rand(len(channels), generator=g), torch.rand(len(channels), generator=g) + 0.5)
    t = quantize_ternary(torch.randn(model.num_classes, len(channels), generator=g), n_per_class)
    model.head.set_class_layer(t.weight, ternary_bias(t.codes, torch.randn(model.num_classes, generator=g)))
    return model.eval()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny_cnn():
    """A Q-SENN model on timm's tiny test_resnet (96 channels), 5 classes."""
    import timm

    import timm_qsenn  # noqa: F401

    return timm.create_model("qsenn", backbone="test_resnet", num_classes=5).eval()


@pytest.fixture
def tiny_vit():
    """A Q-SENN model on timm's tiny test_vit (64 channels, class token), 5 classes, any input size."""
    import timm

    import timm_qsenn  # noqa: F401

    return timm.create_model(
        "qsenn", backbone="test_vit", num_classes=5, backbone_kwargs={"dynamic_img_size": True}
    ).eval()
