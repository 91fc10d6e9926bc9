"""The checks of the saved format (hub/format.py, hub/files.py): bad files are refused and named."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from timm_qsenn import hub


def _copy(folder: Path, tmp_path: Path, name: str) -> Path:
    target = tmp_path / name
    shutil.copytree(folder, target)
    return target


def _rewrite_weights(folder: Path, edit_tensors=None, edit_metadata=None) -> None:
    path = folder / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    if edit_tensors:
        edit_tensors(tensors)
    if edit_metadata:
        edit_metadata(metadata)
    save_file(tensors, path, metadata=metadata)


def test_corrupt_and_truncated_weights_are_named(saved, tmp_path):
    _, folder, _, _ = saved
    corrupt = _copy(folder, tmp_path, "corrupt")
    (corrupt / "model.safetensors").write_bytes(os.urandom(4096))
    truncated = _copy(folder, tmp_path, "truncated")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    for bad in (corrupt, truncated):
        path = str(bad / "model.safetensors")
        with pytest.raises(ValueError, match="corrupt or truncated") as info:
            hub.load_model(bad)
        assert path in str(info.value)
    with pytest.raises(ValueError, match="corrupt or truncated"):
        hub.push_to_hub(corrupt, "org/never-uploaded")  # checked before anything leaves the machine
    missing = _copy(folder, tmp_path, "missing")
    (missing / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing"):
        hub.load_model(missing)


def test_unknown_packed_format_version_is_refused(saved, tmp_path):
    _, folder, _, _ = saved
    future = _copy(folder, tmp_path, "future")

    def bump(tensors):
        tensors["head.fc.weight_format_version"] = torch.tensor(99)

    _rewrite_weights(future, bump, lambda m: m.update({"timm_qsenn.class_layer_format_version": "99"}))
    path = str(future / "model.safetensors")
    with pytest.raises(ValueError, match="version 99.*upgrade timm_qsenn") as info:
        hub.load_model(future)
    assert path in str(info.value)
    # timm's own loaders never see the header; the packed tensors carry the version too.
    with pytest.raises(ValueError, match="format version 99"):
        timm.create_model(f"local-dir:{future}", pretrained=True)
    newer = _copy(folder, tmp_path, "newer")
    config = json.loads((newer / "config.json").read_text())
    config["qsenn"]["format_version"] = 99
    (newer / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="format version 99.*upgrade timm_qsenn") as info:
        hub.load_model(newer)
    assert str(newer / "config.json") in str(info.value)


def test_config_of_another_architecture_is_refused(tmp_path):
    from timm.models import save_for_hf

    save_for_hf(timm.create_model("test_resnet", num_classes=3), tmp_path / "plain", safe_serialization=True)
    with pytest.raises(ValueError, match="'test_resnet', not a Q-SENN model") as info:
        hub.load_model(tmp_path / "plain")
    assert str(tmp_path / "plain" / "config.json") in str(info.value)


def test_selected_channels_beyond_the_backbone_are_refused(saved, tmp_path):
    _, folder, _, _ = saved
    wide = _copy(folder, tmp_path, "wide")

    def widen(tensors):
        tensors["head.selection"] = torch.tensor([3, 17, 40, 41, 64, 500])

    _rewrite_weights(wide, widen)
    with pytest.raises(ValueError, match="selects channel 500 but the backbone has only 96") as info:
        hub.load_model(wide)
    assert str(wide / "model.safetensors") in str(info.value)


def test_plain_weights_and_missing_folders_are_named(saved, tmp_path):
    _, folder, _, _ = saved
    plain = _copy(folder, tmp_path, "plain-weights")
    save_file({"conv1.weight": torch.zeros(1)}, plain / "model.safetensors")
    with pytest.raises(ValueError, match="holds no Q-SENN weights") as info:
        hub.load_model(plain)
    assert str(plain / "model.safetensors") in str(info.value)
    with pytest.raises(FileNotFoundError, match="no model folder at"):
        hub.load_model(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="holds no config.json"):
        hub.load_model(tmp_path)
