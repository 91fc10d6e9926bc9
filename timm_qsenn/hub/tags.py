"""Publishing a saved model as a registered timm tag: the hub config JSON that ``hub_configs/`` ships."""

from __future__ import annotations

import os
from pathlib import Path

from .._utils import write_json
from .files import model_folder
from .format import CONFIG_FILE, check_config, read_json

__all__ = ["write_hub_config"]


def write_hub_config(folder: str | os.PathLike, hf_hub_id: str, tag: str, out_dir: str | os.PathLike) -> Path:
    """Write the hub config JSON that registers a saved model as ``<architecture>.<tag>`` (see hub_configs/)."""
    source = model_folder(folder)
    config = read_json(source / CONFIG_FILE)
    check_config(source / CONFIG_FILE)
    pretrained_cfg = dict(config.get("pretrained_cfg") or {})
    if config.get("label_names"):
        pretrained_cfg["label_names"] = config["label_names"]
    pretrained_cfg["num_classes"] = config.get("num_classes", pretrained_cfg.get("num_classes"))
    entry = {
        "architecture": config["architecture"],
        "tag": tag,
        "hf_hub_id": hf_hub_id,
        "model_args": config.get("model_args") or {},
        "pretrained_cfg": pretrained_cfg,
    }
    out = Path(out_dir) / f"{config['architecture']}.{tag}.json"
    write_json(entry, out)
    return out
