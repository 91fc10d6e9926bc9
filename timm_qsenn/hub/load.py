"""Loading a saved Q-SENN model from a folder, a Hub repository or a registered tag, every file checked first."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import timm
from torch import nn

from ..pretrained import hub_config
from ..qsenn import QSENN
from .files import hub_file, model_folder
from .format import CONFIG_FILE, WEIGHTS_FILE, check_config, check_weights, is_qsenn_arch

__all__ = ["load_model"]


def load_model(name_or_path: str | os.PathLike, **kwargs: Any) -> QSENN:
    """Load a Q-SENN model from a folder (or a run folder holding ``model/``), ``hf-hub:ORG/NAME`` or a tag.

    Config and safetensors header are checked before any tensor is read; ``kwargs`` go to
    ``timm.create_model`` (``pretrained`` defaults to True, ``num_classes`` may differ: the class layer is then
    fresh, the selected features stay).
    """
    kwargs.setdefault("pretrained", True)
    name = os.fspath(name_or_path)
    if name.startswith(("hf-hub:", "hf_hub:")):
        repo = name.split(":", 1)[1]
        config_file = hub_file(repo, CONFIG_FILE, kwargs.get("cache_dir"))
        meta = check_config(config_file)
        source = config_file
        if kwargs["pretrained"]:
            source = hub_file(repo, WEIGHTS_FILE, kwargs.get("cache_dir"))
            check_weights(source)
        model = _create("hf-hub:" + repo, source, **kwargs)
    elif name.startswith("local-dir:") or isinstance(name_or_path, os.PathLike) or _looks_like_path(name):
        folder = model_folder(name.removeprefix("local-dir:"))
        meta = check_config(folder / CONFIG_FILE)
        source = folder / CONFIG_FILE
        if kwargs["pretrained"]:
            source = folder / WEIGHTS_FILE
            check_weights(source)
        model = _create("local-dir:" + str(folder), source, **kwargs)
    else:
        arch = name.split(".", 1)[0]
        if not timm.is_model(arch) or not is_qsenn_arch(arch):
            raise ValueError(
                f"{name!r} is neither a model folder nor a registered Q-SENN model; pass a folder written by "
                "save_pretrained, 'hf-hub:ORG/NAME', or a name from timm.list_models('*qsenn*', pretrained=True)"
            )
        meta, source = {}, name
        registered = hub_config(name)
        if kwargs["pretrained"] and registered is not None:
            source = hub_file(registered["hf_hub_id"], WEIGHTS_FILE, kwargs.get("cache_dir"))
            check_weights(source)
        model = _create(name, source, **kwargs)
    if not isinstance(model, QSENN):
        raise ValueError(f"{source} does not describe a Q-SENN model (got {type(model).__name__})")
    names = meta.get("feature_names")
    if model.feature_names is None and names and len(names) == model.head.num_features:
        model.feature_names = list(names)
    return model


def _looks_like_path(name: str) -> bool:
    """Whether a name given to load_model means a local folder rather than a registered model."""
    return os.path.exists(name) or "/" in name or os.sep in name or name.startswith((".", "~"))


def _create(name: str, source: Path | str, **kwargs: Any) -> nn.Module:
    """``timm.create_model`` whose loading errors name the file they come from."""
    try:
        return timm.create_model(name, **kwargs)
    except (ValueError, RuntimeError, KeyError) as e:
        raise ValueError(f"could not load {source}: {e}") from e
