"""The per-location adapter: what it computes, that every parameter trains, tracing, and the saved model."""

import json

import pytest
import timm
import torch

import timm_qsenn  # noqa: F401
from timm_qsenn import hub
from timm_qsenn.adapter import MapAdapter

from .conftest import make_ternary

ADAPTER = {"depth": 3, "hidden": 24, "out_features": 12, "act": "gelu", "norm": "batchnorm"}


def _model(**kwargs):
    return timm.create_model("qsenn", backbone="test_resnet", num_classes=5, adapter=ADAPTER, **kwargs)


def test_adapter_is_an_mlp_at_every_location():
    adapter = MapAdapter(6, depth=2, hidden=10, out_features=4, act="relu").eval()
    maps = torch.randn(2, 6, 3, 5)
    first, _, last = adapter.layers
    # The same MLP applied to each location's channel vector.
    pixels = maps.permute(0, 2, 3, 1).reshape(-1, 6)
    expected = torch.relu(pixels @ first.weight.flatten(1).T + first.bias) @ last.weight.flatten(1).T + last.bias
    expected = expected.reshape(2, 3, 5, 4).permute(0, 3, 1, 2)
    assert torch.allclose(adapter(maps), expected, atol=1e-6)


def test_the_head_reads_the_adapters_maps():
    model = _model().eval()
    assert model.backbone_features == 96 and model.num_features == 12 == model.head.in_features
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        maps = model.forward_backbone(x)
        assert maps.shape[1] == 96
        assert torch.equal(model.forward_features(x), model.adapter(maps))
        assert torch.equal(model.forward_qsenn_from_maps(maps).logits, model(x))


def test_every_parameter_gets_a_gradient_and_none_is_frozen():
    model = _model().train()
    assert all(p.requires_grad for p in model.parameters())
    model.forward_qsenn(torch.randn(2, 3, 64, 64)).logits.sum().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert not missing and any(name.startswith("adapter.") for name, _ in model.named_parameters())


def test_without_an_adapter_the_state_dict_is_unchanged():
    plain = timm.create_model("qsenn", backbone="test_resnet", num_classes=5)
    assert not any(k.startswith("adapter.") for k in plain.state_dict())
    assert isinstance(plain.adapter, torch.nn.Identity) and plain.num_features == 96


def test_traces_with_fx_torchscript_and_compile():
    model = make_ternary(_model(), [0, 3, 5, 7, 11], n_per_class=2)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        _, eval_nodes = timm.models.get_graph_node_names(model)
        graph = timm.models.create_feature_extractor(model, return_nodes=[eval_nodes[-1]]).eval()
        assert torch.equal(next(iter(graph(x).values())), expected)
        assert torch.allclose(torch.jit.script(model)(x), expected, atol=1e-6)
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        assert torch.allclose(compiled(x), expected, rtol=1e-5, atol=1e-6)


def test_the_saved_model_rebuilds_backbone_adapter_and_head_in_one_create_model(tmp_path):
    model = make_ternary(_model(), [1, 2, 4, 8], n_per_class=2)
    hub.save_pretrained(model, tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["model_args"]["adapter"] == ADAPTER
    loaded = hub.load_model(tmp_path / "saved").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize(
    "adapter, error, message",
    [
        ({"depth": 0}, ValueError, "must be positive"),
        ({"width": 3}, ValueError, "unknown keys.*valid keys"),
        ({"norm": "groupnorm"}, ValueError, "norm must be one of"),
        ([4, 512], TypeError, "must be a dict"),
    ],
)
def test_bad_adapter_arguments_name_the_fix(adapter, error, message):
    with pytest.raises(error, match=message):
        timm.create_model("qsenn", backbone="test_resnet", num_classes=5, adapter=adapter)


def test_a_model_with_an_adapter_is_not_folded_into_a_plain_timm_model():
    from timm_qsenn.hub.fold import fold

    with pytest.raises(ValueError, match="has an adapter.*save_pretrained"):
        fold(make_ternary(_model(), [1, 2, 4, 8], n_per_class=2))
