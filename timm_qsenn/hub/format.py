"""The saved format: file names, the ``"qsenn"`` config block and the safetensors header, their versions, and the
checks that read them before any tensor is loaded."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
from safetensors import safe_open

from .._utils import package_version
from ..ternary import PACKED_FORMAT, PACKED_FORMAT_VERSION

__all__ = [
    "CONFIG_KEY",
    "FORMAT_VERSION",
    "SIDECAR_NAME",
    "FLOAT_FORMAT",
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "CARD_FILE",
    "weights_metadata",
    "is_qsenn_arch",
    "read_json",
    "check_config",
    "check_weights",
]

CONFIG_KEY = "qsenn"  # top-level config.json key of the Q-SENN metadata
FORMAT_VERSION = 1  # layout of the "qsenn" config block and of the safetensors header metadata
SIDECAR_NAME = "qsenn_ternary.json"  # the ternary structure next to a folded (plain timm) export
FLOAT_FORMAT = "float"  # class layer stored as an ordinary ``head.fc.weight``

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "README.md"

# safetensors header metadata (str -> str); checked before any tensor is read.
_META_FORMAT = "timm_qsenn.format"
_META_VERSION = "timm_qsenn.format_version"
_META_PACKAGE = "timm_qsenn.package_version"
_META_LAYER = "timm_qsenn.class_layer_format"
_META_LAYER_VERSION = "timm_qsenn.class_layer_format_version"
_FORMAT_NAME = "timm_qsenn"


def weights_metadata(meta: Mapping[str, Any]) -> dict[str, str]:
    """The safetensors header metadata of a saved model, from its ``"qsenn"`` config block."""
    metadata = {
        "format": "pt",
        _META_FORMAT: _FORMAT_NAME,
        _META_VERSION: str(FORMAT_VERSION),
        _META_PACKAGE: meta["package_version"],
        _META_LAYER: meta["class_layer_format"],
    }
    if meta["class_layer_format_version"] is not None:
        metadata[_META_LAYER_VERSION] = str(meta["class_layer_format_version"])
    return metadata


def is_qsenn_arch(arch: str) -> bool:
    """Whether a timm architecture name is a Q-SENN one (``qsenn`` or ``<backbone>_qsenn``)."""
    return arch == "qsenn" or arch.endswith("_qsenn")


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; anything unreadable is a ValueError naming the file."""
    try:
        config = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not readable JSON ({e}); download or export the model again") from e
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds a JSON {type(config).__name__}, expected an object (a timm config)")
    return config


def check_config(path: Path) -> dict[str, Any]:
    """Check that ``path`` is a config.json of a Q-SENN model this version reads; return its Q-SENN block."""
    config = read_json(path)
    arch = config.get("architecture")
    if not isinstance(arch, str):
        raise ValueError(f"{path} names no architecture; it is not a timm config.json")
    if not is_qsenn_arch(arch):
        raise ValueError(
            f"{path} describes the timm architecture {arch!r}, not a Q-SENN model ('qsenn' or "
            f"'<backbone>_qsenn'); load it with timm.create_model, or wrap it with "
            f"timm.create_model('qsenn', backbone={arch!r})"
        )
    if not timm.is_model(arch):
        raise ValueError(
            f"{path} names the architecture {arch!r}, which this timm_qsenn does not register; upgrade timm_qsenn"
        )
    meta = config.get(CONFIG_KEY) or {}
    version = meta.get("format_version")
    if version is not None and int(version) > FORMAT_VERSION:
        raise ValueError(
            f"{path} was written by timm_qsenn {meta.get('package_version')} in format version {version}; this "
            f"timm_qsenn {package_version()} reads up to version {FORMAT_VERSION}: upgrade timm_qsenn"
        )
    return meta


def check_weights(path: Path) -> dict[str, str]:
    """Check a model.safetensors header (format, class-layer format and versions) before reading tensors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing; a Q-SENN model folder holds {CONFIG_FILE} and {WEIGHTS_FILE} (pickle checkpoints "
            "are not read)"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            keys = list(f.keys())
    except Exception as e:  # safetensors raises its own SafetensorError for every broken file
        raise ValueError(
            f"{path} is not a readable safetensors file ({e}): it is corrupt or truncated; download it again "
            "(timm_qsenn.hub.pull or hf_hub_download(force_download=True)) or export the model again"
        ) from e
    if metadata.get(_META_FORMAT, _FORMAT_NAME) != _FORMAT_NAME:
        raise ValueError(f"{path} is in the format {metadata[_META_FORMAT]!r}, not {_FORMAT_NAME!r}")
    version = metadata.get(_META_VERSION)
    if version is not None and (not version.isdigit() or int(version) > FORMAT_VERSION):
        raise ValueError(
            f"{path} was written in timm_qsenn file format version {version} (by timm_qsenn "
            f"{metadata.get(_META_PACKAGE)}); this timm_qsenn reads up to version {FORMAT_VERSION}: upgrade it"
        )
    layer = metadata.get(_META_LAYER)
    if layer == PACKED_FORMAT:
        layer_version = metadata.get(_META_LAYER_VERSION)
        if layer_version != str(PACKED_FORMAT_VERSION):
            raise ValueError(
                f"{path} stores its class layer as {PACKED_FORMAT} version {layer_version}; this timm_qsenn "
                f"reads version {PACKED_FORMAT_VERSION}: upgrade timm_qsenn to load it"
            )
    elif layer not in (None, FLOAT_FORMAT):
        raise ValueError(f"{path} stores its class layer in the unknown format {layer!r}; upgrade timm_qsenn")
    if not any(k.startswith("backbone.") for k in keys):
        raise ValueError(
            f"{path} holds no Q-SENN weights (no 'backbone.' tensors); it is a plain timm checkpoint: load it "
            "with timm.create_model, or as a backbone with pretrained_cfg_overlay=dict(file=...)"
        )
    return metadata
