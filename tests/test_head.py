import pytest
import torch

from timm_qsenn.head import QSENNHead
from timm_qsenn.ternary import pack_layer, quantize_ternary, ternary_bias, unpack_layer


def _ternary_head(in_features=8, num_classes=3, channels=(1, 4, 6, 7)):
    head = QSENNHead(in_features, num_classes)
    head.select(list(channels))
    head.set_normalization(torch.rand(len(channels)), torch.rand(len(channels)) + 0.5)
    t = quantize_ternary(torch.randn(num_classes, len(channels)), n_per_class=2)
    head.set_class_layer(t.weight, ternary_bias(t.codes, torch.randn(num_classes)))
    return head.eval()


def test_dense_head_is_pool_then_linear():
    head = QSENNHead(6, 4).eval()
    maps = torch.randn(2, 6, 3, 5)
    assert head.stage == "dense" and head.num_features == 6
    assert torch.allclose(head(maps), head.fc(maps.mean(dim=(2, 3))))
    assert torch.allclose(head(maps, pre_logits=True), maps.mean(dim=(2, 3)))


def test_select_carries_columns_and_moves_stage():
    head = QSENNHead(6, 4)
    old = head.fc.weight.detach().clone()
    head.select([5, 2])
    assert head.stage == "selected" and head.num_features == 2
    assert torch.equal(head.fc.weight, old[:, [5, 2]])
    assert head.mean.requires_grad and head.std.requires_grad
    head.select([2, 0])  # channel 2 keeps its column, channel 0 is new and starts at zero
    assert torch.equal(head.fc.weight[:, 0], old[:, 2])
    assert torch.equal(head.fc.weight[:, 1], torch.zeros(4))
    for bad, message in (([], "at least one"), ([1, 1], "distinct"), ([6], "\\[0, 6\\)")):
        with pytest.raises(ValueError, match=message):
            head.select(bad)


def test_ternary_stage_freezes_the_class_layer_and_computes_normalised_logits():
    head = _ternary_head()
    assert head.stage == "ternary"
    assert not head.fc.weight.requires_grad and not head.fc.bias.requires_grad
    maps = torch.rand(2, 8, 4, 4)
    f = maps[:, [1, 4, 6, 7]].mean(dim=(2, 3))
    expected = ((f - head.mean) / head.std) @ head.fc.weight.T + head.fc.bias
    assert torch.allclose(head(maps), expected, atol=1e-6)
    codes, scale = head.ternary_codes()
    assert torch.allclose(codes.float() * scale, head.fc.weight)


def test_unpooled_head_averages_to_the_pooled_logits():
    head = _ternary_head()
    maps = torch.rand(2, 8, 3, 3)
    per_location = QSENNHead(8, 3, pool_type="")
    per_location.load_state_dict(head.state_dict())
    per_location.eval()
    out = per_location(maps)
    assert out.shape == (2, 3, 3, 3)
    assert torch.allclose(out.mean(dim=(2, 3)), head(maps), atol=1e-5)


def test_state_dict_restores_structure_and_stage():
    head = _ternary_head()
    fresh = QSENNHead(8, 3)
    fresh.load_state_dict(head.state_dict())
    fresh.eval()
    assert fresh.stage == "ternary" and fresh.num_features == 4
    assert not fresh.fc.weight.requires_grad and fresh.mean.requires_grad
    maps = torch.rand(2, 8, 2, 2)
    assert torch.equal(fresh(maps), head(maps))


def test_new_num_classes_drops_the_ternary_layer_cleanly():
    head = _ternary_head()
    state = {k: v for k, v in head.state_dict().items() if not k.startswith("fc.")}
    other = QSENNHead(8, 5)
    other.load_state_dict(state, strict=False)
    assert other.stage == "selected" and other.num_features == 4
    assert other.fc.weight.shape == (5, 4) and other.fc.weight.requires_grad
    assert torch.equal(other.selection, head.selection)


def test_packed_class_layer_unpacks_on_load():
    head = _ternary_head()
    codes, scale = head.ternary_codes()
    state = pack_layer(head.state_dict(), "fc", codes, scale)
    assert "fc.weight" not in state and state["fc.weight_packed"].dtype == torch.uint8
    fresh = QSENNHead(8, 3)
    fresh.load_state_dict(state)
    assert torch.allclose(fresh.fc.weight, head.fc.weight)
    bad = dict(state, **{"fc.weight_format_version": torch.tensor(99)})
    with pytest.raises(ValueError, match="format version 99"):
        unpack_layer(dict(bad), "fc")
    incomplete = {k: v for k, v in state.items() if k != "fc.weight_scale"}
    with pytest.raises(ValueError, match="incomplete"):
        unpack_layer(incomplete, "fc")


def test_checkpoint_selecting_channels_beyond_the_backbone_is_rejected():
    head = _ternary_head(in_features=8)
    small = QSENNHead(6, 3)
    with pytest.raises(ValueError, match="channel 7 but the backbone has only 6"):
        small.load_state_dict(head.state_dict())


def test_set_class_layer_validates():
    head = QSENNHead(8, 3)
    with pytest.raises(ValueError, match="select features"):
        head.set_class_layer(torch.zeros(3, 8), torch.zeros(3))
    head.select([0, 1])
    with pytest.raises(ValueError, match="3 x 2"):
        head.set_class_layer(torch.zeros(3, 8), torch.zeros(3))
    with pytest.raises(ValueError, match="-a, 0 and \\+a"):
        head.set_class_layer(torch.tensor([[1.0, 2.0]] * 3), torch.zeros(3))
    head.set_class_layer(torch.tensor([[1.0, 2.0]] * 3), torch.zeros(3), ternary=False)
    assert head.stage == "selected"
    with pytest.raises(ValueError, match="not 'ternary'"):
        head.ternary_codes()
    with pytest.raises(ValueError, match="shape \\(2,\\)"):
        head.set_normalization(torch.zeros(3), torch.ones(3))
    with pytest.raises(ValueError, match="select\\(\\) before"):
        QSENNHead(8, 3).set_normalization(torch.zeros(8), torch.ones(8))


def test_reset_keeps_features_and_leaves_ternary_stage():
    head = _ternary_head()
    head.reset(7)
    assert head.stage == "selected" and head.num_features == 4
    assert head.fc.weight.shape == (7, 4) and head.fc.weight.requires_grad
    assert head.training is False and head.fc.training is False
    head.reset(0)
    assert isinstance(head.fc, torch.nn.Identity)
    assert head(torch.rand(2, 8, 2, 2)).shape == (2, 4)
    with pytest.raises(ValueError, match="'avg' or ''"):
        head.reset(3, pool_type="max")
