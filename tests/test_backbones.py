"""Any timm backbone through the generic ``qsenn`` wrapper: every parameter is used, the feature API agrees with
the backbone's own, the model traces and compiles, and its pretrained classifier becomes the dense head."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

import timm_qsenn  # noqa: F401

from .conftest import make_ternary

# Tiny backbones of every kind: CNNs, ConvNeXt (head norm after pooling), token ViTs with class-token and average
# pooling (fc_norm), a hybrid, and heads with layers after pooling (MobileNetV3/V4 conv heads, EfficientViT).
BACKBONES = {
    "test_resnet": {},
    "test_convnext": {},
    "test_efficientnet": {},
    "test_nfnet": {},
    "test_byobnet": {},
    "test_mambaout": {},
    "test_vit": {"dynamic_img_size": True},
    "test_vit2": {"dynamic_img_size": True},
    "mobilenetv3_small_050": {},
    "mobilenetv4_conv_small": {},
    "efficientvit_b0": {},
}
SIZE = 64


def _model(backbone: str, num_classes: int = 5, **kwargs):
    return timm.create_model(
        "qsenn", backbone=backbone, num_classes=num_classes, backbone_kwargs=BACKBONES[backbone], **kwargs
    )


def _missing_gradients(model, x) -> list[str]:
    model.zero_grad(set_to_none=True)
    model(x).sum().backward()
    return [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]


@pytest.mark.parametrize("backbone", BACKBONES)
def test_every_parameter_gets_a_gradient_in_every_stage(backbone):
    model = _model(backbone).train()
    assert all(p.requires_grad for p in model.parameters()), "a fresh model has no frozen parameters"
    x = torch.randn(2, 3, SIZE, SIZE)
    assert not _missing_gradients(model, x)
    make_ternary(model, list(range(0, model.num_features, 3)), n_per_class=2).train()
    assert not _missing_gradients(model, x)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "head.mean" in trainable and "head.fc.weight" not in trainable


@pytest.mark.parametrize("backbone", BACKBONES)
def test_feature_api_agrees_with_the_backbones_own(backbone):
    plain = timm.create_model(backbone, num_classes=0, **BACKBONES[backbone]).eval()
    model = _model(backbone).eval()
    # The same weights; the Q-SENN backbone lacks only the layers after its feature maps.
    missing, unexpected = model.backbone.load_state_dict(plain.state_dict(), strict=False)
    assert not missing and all(any(k.startswith(p.removeprefix("backbone.")) for p in model.pruned) for k in unexpected)
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        ours = model.forward_intermediates(x, intermediates_only=True)
        theirs = plain.forward_intermediates(x, intermediates_only=True)
        final, _ = model.forward_intermediates(x)
        assert len(ours) == len(theirs) and all(torch.equal(a, b) for a, b in zip(ours, theirs))
        assert torch.equal(final, model.forward_features(x))
    assert [info["module"] for info in model.feature_info] == ["backbone." + i["module"] for i in plain.feature_info]
    features = timm.create_model("qsenn", backbone=backbone, features_only=True, backbone_kwargs=BACKBONES[backbone])
    reference = timm.create_model(backbone, features_only=True, feature_cls="getter", **BACKBONES[backbone])
    assert features.feature_info.channels() == reference.feature_info.channels()
    assert features.feature_info.reduction() == reference.feature_info.reduction()


def test_token_maps_follow_the_patch_grid_of_the_input():
    # Built for one size (as timm builds the curated token models, or for another with img_size=...) ...
    fixed = timm.create_model("vit_small_patch14_dinov2_qsenn", num_classes=3, img_size=224).eval()
    assert fixed.pretrained_cfg["fixed_input_size"]
    # ... or for any size per batch, the input padded to a multiple of the patch.
    dynamic = timm.create_model(
        "vit_small_patch14_dinov2_qsenn",
        num_classes=3,
        backbone_kwargs={"dynamic_img_size": True, "dynamic_img_pad": True},
    ).eval()
    with torch.no_grad():
        assert fixed.forward_features(torch.randn(1, 3, 224, 224)).shape == (1, fixed.num_features, 16, 16)
        for height, width in ((128, 128), (98, 140), (224, 70)):
            maps = dynamic.forward_features(torch.randn(1, 3, height, width))
            assert maps.shape[1:] == (dynamic.num_features, -(-height // 14), -(-width // 14))


def test_state_dicts_saved_with_the_removed_layers_still_load():
    model = _model("test_convnext").eval()
    assert model.pruned == ["backbone.head"]
    older = dict(
        model.state_dict(), **{"backbone.head.norm.weight": torch.ones(64), "backbone.head.norm.bias": torch.zeros(64)}
    )
    fresh = _model("test_convnext").eval()
    fresh.load_state_dict(older)
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_fx_feature_extraction_and_fullgraph_compile_of_a_ternary_model():
    model = make_ternary(_model("test_resnet"), [1, 5, 9, 30, 64], n_per_class=2)
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        expected = model(x)
        # timm's FX feature extractor and its forward_intermediates one agree (same seed, same weights).
        extractors = []
        for feature_cls in ("fx", "getter"):
            torch.manual_seed(0)
            extractors.append(
                timm.create_model("qsenn", backbone="test_resnet", features_only=True, feature_cls=feature_cls)
            )
        assert all(torch.equal(a, b) for a, b in zip(*(e.eval()(x) for e in extractors)))
        # The whole model traces symbolically with timm's extractor (its leaf functions and modules).
        _, eval_nodes = timm.models.get_graph_node_names(model)
        graph = timm.models.create_feature_extractor(model, return_nodes=[eval_nodes[-1]]).eval()
        assert torch.equal(next(iter(graph(x).values())), expected)
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        assert torch.allclose(compiled(x), expected, rtol=1e-5, atol=1e-6)


def test_pretrained_resnet50_qsenn_gives_the_logits_of_timms_resnet50(tmp_path):
    reference = timm.create_model("resnet50").eval()
    path = tmp_path / "resnet50.safetensors"
    save_file(reference.state_dict(), str(path))
    overlay = {"file": str(path)}
    plain = timm.create_model("resnet50", pretrained=True, pretrained_cfg_overlay=overlay).eval()
    model = timm.create_model("resnet50_qsenn", pretrained=True, pretrained_cfg_overlay=overlay).eval()
    assert model.head_from_backbone and "backbone's own pretrained classifier" in model.pretrained_cfg["notes"][0]
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x), rtol=1e-5, atol=1e-5)
    other = timm.create_model("resnet50_qsenn", pretrained=True, num_classes=10, pretrained_cfg_overlay=overlay)
    assert not other.head_from_backbone and "freshly initialised" in other.pretrained_cfg["notes"][0]
    # ConvNeXt normalises after pooling: its classifier is not a linear layer on the maps, so the head is fresh.
    convnext = timm.create_model("test_convnext")
    path = tmp_path / "convnext.safetensors"
    save_file(convnext.state_dict(), str(path))
    wrapped = timm.create_model(
        "qsenn", backbone="test_convnext", pretrained=True, num_classes=1000, pretrained_cfg_overlay={"file": str(path)}
    )
    assert not wrapped.head_from_backbone


DDP_SCRIPT = """
import sys, torch, timm
from accelerate import Accelerator
import timm_qsenn
from timm_qsenn.train.loop import TrainModule
sys.path.insert(0, {tests!r})
from conftest import make_ternary

acc = Accelerator(cpu=True)
for backbone, kwargs in {backbones!r}.items():
    torch.manual_seed(0)
    model = timm.create_model("qsenn", backbone=backbone, num_classes=4, backbone_kwargs=kwargs)
    for stage in ("dense", "ternary"):
        if stage == "ternary":
            make_ternary(model, list(range(0, model.num_features, 4)), n_per_class=2).train()
        module = TrainModule(model, diversity_weight=0.196)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
        module, optimizer = acc.prepare(module, optimizer)
        module.train()
        for step in range(2):
            x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(acc.process_index * 10 + step))
            loss = module(x, torch.tensor([0, 1]))[0]
            acc.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
        acc.free_memory()
    acc.print("ok", backbone)
"""


def test_ddp_trains_every_kind_of_backbone_without_find_unused_parameters(tmp_path):
    backbones = {
        b: BACKBONES[b]
        for b in ("test_resnet", "test_convnext", "test_vit", "test_vit2", "test_efficientnet", "mobilenetv3_small_050")
    }
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(tests=str(Path(__file__).parent), backbones=backbones))
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541", str(script)],
        env=dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    for backbone in backbones:
        assert f"ok {backbone}" in result.stdout
