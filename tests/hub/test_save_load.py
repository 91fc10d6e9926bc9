"""Saving and loading (hub/save.py, hub/load.py, hub/describe.py): the layout, exact round trips, packing."""

from __future__ import annotations

import copy
import json
import shutil
import struct

import pytest
import timm
import torch
from safetensors import safe_open

import timm_qsenn
from timm_qsenn import QSENN, hub
from timm_qsenn._utils import environment

from ..conftest import make_ternary
from .conftest import CLASSES, FEATURES, METRICS, logits_of


def test_save_pretrained_writes_timm_layout_with_qsenn_metadata(saved):
    model, folder, _, _ = saved
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "qsenn"
    assert config["label_names"] == CLASSES
    args = config["model_args"]
    assert args["backbone"] == "test_resnet" and args["pretrained_backbone"] is False
    assert args["feature_names"] == FEATURES and args["num_classes"] == 5
    meta = config["qsenn"]
    assert meta["stage"] == "ternary" and meta["n_features"] == 6 and meta["backbone_channels"] == 96
    assert meta["selection"] == [3, 17, 40, 41, 64, 90]
    assert meta["n_per_class"] == pytest.approx(model.head.fc.weight.count_nonzero().item() / 5)
    assert meta["scale"] == pytest.approx(model.head.ternary_codes()[1])
    assert meta["metrics"] == METRICS and meta["recipe"]["seed"] == 3 and meta["dataset"] == "cub200"
    assert meta["package_version"] == timm_qsenn.__version__
    assert "qsenn" not in config["pretrained_cfg"]  # Q-SENN keys stay out of timm's PretrainedCfg
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        metadata = f.metadata()
        keys = set(f.keys())
    assert metadata["timm_qsenn.class_layer_format"] == "qsenn-ternary-2bit"
    assert metadata["timm_qsenn.class_layer_format_version"] == "1"
    assert metadata["timm_qsenn.format_version"] == str(hub.FORMAT_VERSION)
    assert "head.fc.weight_packed" in keys and "head.fc.weight" not in keys


def test_local_dir_round_trip_is_exact(saved):
    model, folder, x, logits = saved
    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True)
    assert torch.equal(logits_of(loaded, x), logits)
    assert loaded.head.stage == "ternary"
    assert loaded.feature_names == FEATURES
    assert loaded.pretrained_cfg["label_names"] == CLASSES


def test_load_model_reads_folders_and_run_folders(saved, tmp_path):
    _, folder, x, logits = saved
    run = tmp_path / "run"
    shutil.copytree(folder, run / "model")
    for source in (folder, str(folder), run, f"local-dir:{folder}"):
        loaded = hub.load_model(source)
        assert isinstance(loaded, QSENN)
        assert torch.equal(logits_of(loaded, x), logits)
        assert loaded.feature_names == FEATURES


def test_checkpoint_path_round_trip(saved):
    _, folder, x, logits = saved
    loaded = timm.create_model(
        "qsenn", backbone="test_resnet", num_classes=5, checkpoint_path=str(folder / "model.safetensors")
    )
    assert loaded.head.stage == "ternary"
    assert torch.equal(logits_of(loaded, x), logits)


def test_other_num_classes_drops_only_the_class_layer(saved):
    model, folder, x, _ = saved
    with torch.no_grad():
        features = model.forward_head(model.forward_features(x), pre_logits=True)
    loaders = [
        lambda: timm.create_model(f"local-dir:{folder}", pretrained=True, num_classes=3),
        lambda: hub.load_model(folder, num_classes=3),
        # what train.py --pretrained-path does
        lambda: timm.create_model(
            "qsenn",
            backbone="test_resnet",
            pretrained=True,
            num_classes=3,
            pretrained_cfg_overlay={"file": str(folder / "model.safetensors"), "num_classes": -1},
        ),
    ]
    for load in loaders:
        loaded = load().eval()
        assert loaded.num_classes == 3 and loaded.head.stage == "selected"
        assert loaded.head.selection.tolist() == [3, 17, 40, 41, 64, 90]
        with torch.no_grad():
            assert torch.equal(loaded.forward_head(loaded.forward_features(x), pre_logits=True), features)
            assert loaded(x).shape == (2, 3)


def test_dense_model_and_directly_built_model_round_trip(tmp_path):
    dense = timm.create_model("qsenn", backbone="test_resnet", num_classes=4).eval()
    hub.save_pretrained(dense, tmp_path / "dense")
    config = json.loads((tmp_path / "dense" / "config.json").read_text())
    assert config["qsenn"]["class_layer_format"] == "float" and config["qsenn"]["selection"] is None
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(logits_of(hub.load_model(tmp_path / "dense"), x), logits_of(dense, x))
    direct = make_ternary(QSENN("test_resnet", num_classes=3), [0, 1, 2, 3], n_per_class=2.0, seed=1)
    hub.save_pretrained(direct, tmp_path / "direct")
    assert torch.equal(logits_of(hub.load_model(tmp_path / "direct"), x), logits_of(direct, x))


def test_save_never_overwrites_a_non_empty_folder(saved, tmp_path):
    model, folder, _, _ = saved
    target = tmp_path / "occupied"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty.*overwrite=True"):
        hub.save_pretrained(model, target)
    assert sorted(p.name for p in target.iterdir()) == ["notes.txt"]
    hub.save_pretrained(model, target, overwrite=True)
    assert (target / "notes.txt").read_text() == "mine" and (target / "model.safetensors").is_file()


# -- compact storage -----------------------------------------------------------------------------------------


def test_packed_class_layer_takes_at_most_2_1_bits_per_weight(tmp_path):
    model = timm.create_model("qsenn", backbone="test_resnet", num_classes=200)
    model = make_ternary(model, list(range(50)), n_per_class=5, seed=1)
    hub.save_pretrained(model, tmp_path / "packed")
    hub.save_pretrained(model, tmp_path / "float", compact=False)
    path = tmp_path / "packed" / "model.safetensors"
    raw = path.read_bytes()
    header = json.loads(raw[8 : 8 + struct.unpack("<Q", raw[:8])[0]])
    layer = {k: v for k, v in header.items() if k.startswith("head.fc.weight")}
    data_bytes = sum(v["data_offsets"][1] - v["data_offsets"][0] for v in layer.values())
    header_bytes = sum(len(json.dumps({k: v}, separators=(",", ":"))) for k, v in layer.items())
    bits = 8 * data_bytes / (200 * 50)
    print(
        f"\n200x50 ternary layer: {data_bytes} bytes of tensors ({bits:.4f} bits/weight) + {header_bytes} "
        f"bytes of safetensors header entries; float32 would take {200 * 50 * 4} bytes"
    )
    assert data_bytes == 2500 + 16 + 4 + 8
    assert bits <= 2.1
    saved_float = (tmp_path / "float" / "model.safetensors").stat().st_size
    assert saved_float - path.stat().st_size > 200 * 50 * 4 - 2 * 2528
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(logits_of(hub.load_model(tmp_path / "packed"), x), logits_of(model, x))


# -- provenance ----------------------------------------------------------------------------------------------


def test_saved_model_records_the_environment_that_produced_it(saved, tmp_path):
    model, folder, _, _ = saved
    meta = json.loads((folder / "config.json").read_text())["qsenn"]
    assert meta["environment"] == environment("cpu")  # by default: this process, on the model's device
    env = meta["environment"]
    row = f"| Produced with | timm_qsenn {env['timm_qsenn']}, torch {torch.__version__}, timm {timm.__version__};"
    assert row in (folder / "README.md").read_text()

    given = {"timm_qsenn": "9.9", "torch": "2.9", "timm": "1.9", "device": "cuda:0", "gpu": "H200", "cpu": "EPYC"}
    recorded = {k: copy.deepcopy(getattr(model, k)) for k in ("pretrained_cfg", "_model_args")}
    attributes = {k: id(v) for k, v in model.__dict__.items()}
    hub.save_pretrained(model, tmp_path / "given", environment=given)
    assert {k: id(v) for k, v in model.__dict__.items()} == attributes  # the model is not edited
    assert all(getattr(model, k) == v for k, v in recorded.items())
    assert json.loads((tmp_path / "given" / "config.json").read_text())["qsenn"]["environment"] == given
    card = (tmp_path / "given" / "README.md").read_text()
    assert "| Produced with | timm_qsenn 9.9, torch 2.9, timm 1.9; device cuda:0 (H200); CPU EPYC |" in card
