"""The timm model contract for every registered Q-SENN name, plus forward/backward and loading paths."""

import fnmatch
import inspect
import json
import os
import subprocess
import sys
import warnings

import pytest
import safetensors.torch
import timm
import torch
from timm.models._manipulate import group_parameters

import timm_qsenn
from timm_qsenn import QSENN, QSENNOutput
from timm_qsenn.ternary import quantize_ternary, ternary_bias

REGISTERED = timm.list_models(module="qsenn")


def test_registration():
    for name in [
        "resnet18_qsenn",
        "resnet34_qsenn",
        "resnet50_qsenn",
        "resnet101_qsenn",
        "densenet121_qsenn",
        "inception_v3_qsenn",
        "convnext_tiny_qsenn",
        "efficientnet_b0_qsenn",
        "tf_efficientnet_lite0_qsenn",
        "vit_small_patch16_224_qsenn",
        "deit_small_patch16_224_qsenn",
        "vit_small_patch14_dinov2_qsenn",
        "swin_tiny_patch4_window7_224_qsenn",
        "qsenn",
    ]:
        assert name in REGISTERED
    # Every backbone weight tag becomes a tag of the Q-SENN variant, the backbone's default first.
    assert "resnet50_qsenn.tv_in1k" in timm.list_pretrained("resnet50_qsenn*")
    assert timm.get_pretrained_cfg("resnet50_qsenn").tag == timm.get_pretrained_cfg("resnet50").tag


@pytest.mark.parametrize("model_name", REGISTERED)
def test_model_contract_on_meta(model_name):
    """A port of timm's test_model_default_cfgs and its API-contract helpers, on the meta device."""
    with pytest.raises(TypeError):
        timm.create_model(model_name, device="meta", not_a_model_arg=1)
    model = timm.create_model(model_name, device="meta", dtype=torch.float32).eval()
    cfg = model.pretrained_cfg
    assert model.num_classes >= 0 and model.num_features > 0 and model.head_hidden_size > 0
    assert model.in_chans == cfg["input_size"][0]
    assert inspect.signature(model.reset_classifier).parameters["global_pool"].default is None
    param_names = [n for n, _ in model.named_parameters()]
    assert len(set(group_parameters(model, model.group_matcher(), reverse=True).values())) > 1
    for pattern in model.no_weight_decay():
        if any(fnmatch.fnmatch(n, pattern) for n in param_names):
            continue
        # As in timm: an optional parameter (e.g. a distillation token) may be listed while absent.
        obj = model
        for attr in pattern.split("."):
            obj = getattr(obj, attr, None)
        assert obj is None, pattern
    state_dict = model.state_dict()
    if cfg.get("num_classes"):  # self-supervised backbones (DINOv2, EVA-02 MIM) default to no classifier
        assert cfg["classifier"] + ".weight" in state_dict
    first_conv = cfg["first_conv"] if isinstance(cfg["first_conv"], tuple) else (cfg["first_conv"],)
    assert all(c + ".weight" in state_dict for c in first_conv)

    pool_size = cfg["pool_size"]
    x = torch.randn(1, *cfg["input_size"], device="meta")
    features = model.forward_features(x)
    pre_logits = model.forward_head(features, pre_logits=True)
    assert features.shape[1:] == (model.num_features, *pool_size)
    assert pre_logits.shape == (1, model.head_hidden_size)
    model.to(torch.bfloat16)
    assert model(x.bfloat16()).dtype == torch.bfloat16
    model.to(torch.float32)

    model.reset_classifier(0)
    out = model(x)
    assert model.num_classes == 0 and out.shape == pre_logits.shape
    model.reset_classifier(0, "")
    assert model(x).shape == (1, model.head_hidden_size, *pool_size)
    model = timm.create_model(model_name, device="meta", num_classes=0, global_pool="").eval()
    assert model(x).shape == (1, model.head_hidden_size, *pool_size)

    # reset_classifier keeps device, dtype and mode; frozen parameters stay frozen.
    model.to(device="meta", dtype=torch.float64)
    model.reset_classifier(0)
    model.reset_classifier(2)
    assert all(p.device.type == "meta" and p.dtype == torch.float64 for p in model.head.fc.parameters())
    assert all(not m.training for m in model.modules())
    frozen = timm.create_model(model_name, device="meta")
    frozen.requires_grad_(False)
    frozen.reset_classifier(0)
    frozen.reset_classifier(0, "")
    assert not [n for n, p in frozen.named_parameters() if p.requires_grad]
    misplaced = [n for n, t in [*frozen.named_parameters(), *frozen.named_buffers()] if t.device.type != "meta"]
    assert not misplaced


@pytest.mark.parametrize("fixture", ["tiny_cnn", "tiny_vit"])
@pytest.mark.parametrize("size", [(64, 64), (96, 80)])
def test_forward_backward_at_two_sizes(fixture, size, request):
    model = request.getfixturevalue(fixture).train()
    x = torch.randn(2, 3, *size)
    out = model.forward_qsenn(x)
    assert isinstance(out, QSENNOutput)
    assert out.logits.shape == (2, 5)
    assert out.features.shape == (2, model.head_hidden_size)
    assert out.feature_maps.shape[:2] == (2, model.head_hidden_size)
    # The grid follows the input: token models give one cell per patch, CNNs one per stride.
    reduction = model.backbone.feature_info[-1]["reduction"]
    assert out.feature_maps.shape[2:] == tuple(-(-s // reduction) for s in size)
    model(x).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    model.eval()
    with torch.no_grad():
        out = model.forward_qsenn(x)
        assert torch.allclose(out.logits, model(x), atol=1e-5)
        assert torch.allclose(out.features, out.feature_maps.mean(dim=(2, 3)))


def test_selected_and_ternary_model_forward(tiny_cnn):
    model = tiny_cnn
    model.head.select([0, 5, 9, 40, 95])
    model.head.set_normalization(torch.rand(5), torch.rand(5) + 0.5)
    t = quantize_ternary(torch.randn(5, 5), n_per_class=2)
    model.head.set_class_layer(t.weight, ternary_bias(t.codes, torch.randn(5)))
    x = torch.randn(3, 3, 64, 64)
    out = model.forward_qsenn(x)
    assert out.feature_maps.shape[1] == 5 and model.head_hidden_size == 5
    full = model.forward_features(x)
    assert torch.equal(out.feature_maps, full[:, [0, 5, 9, 40, 95]])
    assert torch.allclose(model(x), out.logits, atol=1e-6)


@pytest.mark.parametrize("fixture", ["tiny_cnn", "tiny_vit"])
def test_torchscript(fixture, request):
    model = request.getfixturevalue(fixture)
    model.head.select([1, 2, 3])
    x = torch.randn(2, 3, 64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(model)
    assert torch.allclose(scripted(x), model(x), atol=1e-6)


def test_state_dict_round_trip_through_a_fresh_model(tiny_cnn):
    model = tiny_cnn
    model.head.select([3, 1, 4])
    t = quantize_ternary(torch.randn(5, 3), n_per_class=1)
    model.head.set_class_layer(t.weight, torch.zeros(5))
    fresh = timm.create_model("qsenn", backbone="test_resnet", num_classes=5).eval()
    fresh.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(fresh(x), model(x))
    assert fresh.head.stage == "ternary"


def test_pretrained_backbone_from_a_local_file(tmp_path):
    backbone = timm.create_model("test_resnet", num_classes=0)
    path = tmp_path / "backbone.safetensors"
    safetensors.torch.save_file(backbone.state_dict(), path)
    model = timm.create_model(
        "qsenn", backbone="test_resnet", pretrained=True, num_classes=3, pretrained_cfg_overlay={"file": str(path)}
    )
    for name, tensor in backbone.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[name], tensor), name
    assert model.head.fc.weight.shape == (3, backbone.num_features)


def test_pretrained_path_with_a_qsenn_checkpoint_drops_only_the_class_layer(tmp_path, tiny_cnn):
    tiny_cnn.head.select([3, 1, 4])
    path = tmp_path / "qsenn.safetensors"
    safetensors.torch.save_file(tiny_cnn.state_dict(), path)
    # What timm's train.py --pretrained-path does: the file, with the classifier dropped.
    model = timm.create_model(
        "qsenn",
        backbone="test_resnet",
        pretrained=True,
        num_classes=7,
        pretrained_cfg_overlay={"file": str(path), "num_classes": -1},
    )
    assert torch.equal(model.head.selection, torch.tensor([3, 1, 4]))
    assert model.head.fc.weight.shape == (7, 3)
    assert torch.equal(model.backbone.conv1[0].weight, tiny_cnn.backbone.conv1[0].weight)


def test_checkpoint_path_loads_strictly(tmp_path, tiny_cnn):
    tiny_cnn.head.select([2, 8])
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": tiny_cnn.state_dict()}, path)
    model = timm.create_model("qsenn", backbone="test_resnet", num_classes=5, checkpoint_path=str(path))
    assert model.head.stage == "selected" and model.head_hidden_size == 2


def test_foreign_checkpoint_is_rejected(tmp_path):
    path = tmp_path / "foreign.safetensors"
    safetensors.torch.save_file({"weight": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="no Q-SENN weights"):
        timm_qsenn.qsenn.checkpoint_filter_fn(
            {"weight": torch.zeros(2)}, timm.create_model("qsenn", backbone="test_resnet")
        )


def test_unknown_backbone_names_the_fix():
    with pytest.raises(ValueError, match="unknown timm backbone 'resnet5O'.*did you mean.*resnet50"):
        timm.create_model("qsenn", backbone="resnet5O")


def test_wrong_input_channels(tiny_cnn):
    with pytest.raises(ValueError, match="in_chans=C"):
        tiny_cnn(torch.randn(1, 1, 64, 64))
    gray = timm.create_model("qsenn", backbone="test_resnet", in_chans=1, num_classes=2)
    assert gray(torch.randn(1, 1, 64, 64)).shape == (1, 2)


def test_backbone_without_spatial_features():
    class Pooled(torch.nn.Module):
        num_features = 4

        def forward_features(self, x):
            return x.mean(dim=(2, 3)).repeat(1, 2)[:, :4]

    model = QSENN(backbone="test_resnet", num_classes=2)
    model.backbone = Pooled()
    with pytest.raises(ValueError, match="no spatial features.*choose a CNN or ViT backbone"):
        model.forward_features(torch.randn(1, 3, 8, 8))


def test_unknown_global_pool():
    with pytest.raises(ValueError, match="'avg' or ''"):
        timm.create_model("qsenn", backbone="test_resnet", global_pool="max")


def test_hub_config_tags_are_registered_from_a_folder(tmp_path):
    config = {
        "architecture": "resnet18_qsenn",
        "tag": "toy",
        "hf_hub_id": "example/resnet18_qsenn.toy",
        "pretrained_cfg": {"num_classes": 7, "input_size": [3, 128, 128], "label_names": list("abcdefg")},
    }
    (tmp_path / "resnet18_qsenn.toy.json").write_text(json.dumps(config))
    code = (
        "import timm, timm_qsenn, json;"
        "cfg = timm.get_pretrained_cfg('resnet18_qsenn.toy');"
        "m = timm.create_model('resnet18_qsenn.toy', device='meta');"
        "print(json.dumps([cfg.hf_hub_id, m.num_classes, m.pretrained_cfg['input_size'], "
        "'resnet18_qsenn.toy' in timm.list_pretrained('resnet18_qsenn*')]))"
    )
    env = dict(os.environ, TIMM_QSENN_HUB_CONFIGS=str(tmp_path), HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == ["example/resnet18_qsenn.toy", 7, [3, 128, 128], True]
