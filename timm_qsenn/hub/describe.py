"""What a saved model records about a model in memory: the ``"qsenn"`` block, the constructor arguments and the
pretrained cfg timm rebuilds it from, and its class names."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Mapping
from typing import Any

import timm
import torch

from .._utils import environment as current_environment
from .._utils import package_version
from ..explain import class_names_of
from ..pretrained import backbone_variant_cfg
from ..qsenn import QSENN
from ..ternary import PACKED_FORMAT, PACKED_FORMAT_VERSION
from .format import FLOAT_FORMAT, FORMAT_VERSION

__all__ = [
    "check_model",
    "architecture",
    "packable",
    "qsenn_metadata",
    "label_names",
    "notes",
    "export_args",
    "backbone_kwargs",
    "export_cfg",
    "jsonable",
]

_logger = logging.getLogger(__name__)

# Constructor kwargs that describe a run, not the architecture: never exported.
_RUNTIME_KWARGS = frozenset(
    {
        *("device", "dtype", "pretrained_cfg", "pretrained_cfg_overlay", "cache_dir", "checkpoint_path"),
        *("pretrained_model_args", "scriptable", "exportable", "no_jit"),
        *("drop_rate", "drop_path_rate", "drop_block_rate"),
    }
)


def check_model(model: Any) -> None:
    """Raise a TypeError unless ``model`` is a timm_qsenn QSENN."""
    if not isinstance(model, QSENN):
        raise TypeError(
            f"expected a timm_qsenn QSENN model, got {type(model).__name__}; create one with "
            "timm.create_model('qsenn', backbone=...) or load one with timm_qsenn.hub.load_model"
        )


def architecture(model: QSENN) -> str:
    """The registered architecture that rebuilds the model: its own ``<backbone>_qsenn``, else ``qsenn``."""
    arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture") or "qsenn"
    return arch if arch == "qsenn" or (arch.endswith("_qsenn") and timm.is_model(arch)) else "qsenn"


def packable(model: QSENN) -> bool:
    """Whether the class layer is ternary, so that it can be stored packed."""
    return model.head.stage == "ternary" and model.num_classes > 0


def _ternary_exact(model: QSENN) -> bool:
    """Whether codes times one float32 scale reproduce the class layer bit for bit."""
    codes, scale = model.head.ternary_codes()
    weight = model.head.fc.weight.detach().to("cpu", torch.float32)
    return torch.equal(codes.to(torch.float32) * torch.tensor(scale, dtype=torch.float32), weight)


def qsenn_metadata(
    model: QSENN,
    metrics: Mapping[str, Any] | None,
    recipe: Any,
    dataset: str | None,
    packed: bool,
    environment: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``"qsenn"`` block of config.json: everything the card and the loaders need besides timm's keys.

    ``environment`` is what produced the model; by default this process on the model's device.
    """
    head = model.head
    if packed and not _ternary_exact(model):
        _logger.warning("class layer is not exactly codes x one float32 scale; storing it unpacked")
        packed = False
    nnz = int(head.fc.weight.count_nonzero()) if model.num_classes > 0 else 0
    scale = head.ternary_codes()[1] if packable(model) else None
    if environment is None:
        environment = current_environment(next(model.parameters()).device)
    return {
        "format_version": FORMAT_VERSION,
        "package_version": package_version(),
        "architecture": architecture(model),
        "backbone": model.backbone_name,
        "stage": head.stage,
        "backbone_channels": head.in_features,
        "n_features": head.num_features,
        "selection": None if head.is_dense else head.selection.tolist(),
        "n_per_class": round(nnz / model.num_classes, 4) if model.num_classes > 0 and not head.is_dense else None,
        "nonzero_weights": nnz,
        "scale": scale,
        "class_layer_format": PACKED_FORMAT if packed else FLOAT_FORMAT,
        "class_layer_format_version": PACKED_FORMAT_VERSION if packed else None,
        "feature_names": list(model.feature_names) if model.feature_names else None,
        "metrics": jsonable(dict(metrics or {}), "metrics"),
        "recipe": jsonable(recipe if recipe is not None else {}, "recipe"),
        "dataset": dataset,
        "environment": jsonable(dict(environment), "environment"),
    }


def label_names(model: QSENN) -> list[str] | None:
    """The class names config.json records: the model's own, or None where ``class_names_of`` makes them up."""
    names = class_names_of(model)
    own = (getattr(model, "pretrained_cfg", None) or {}).get("label_names")
    return names if own and list(own) == names else None


def notes(meta: Mapping[str, Any]) -> str:
    """The ``pretrained_cfg`` note that tells a timm user this model needs timm_qsenn."""
    return (
        f"Q-SENN model ({meta['stage']} head on {meta['backbone']}) saved with timm_qsenn "
        f"{meta['package_version']}; needs `import timm_qsenn` before timm.create_model."
    )


def export_args(model: QSENN) -> dict[str, Any]:
    """Explicit, JSON-able constructor arguments that rebuild the model; never a backbone download."""
    recorded = dict(getattr(model, "_model_args", None) or {})
    args = {k: v for k, v in recorded.items() if k not in _RUNTIME_KWARGS}
    args.update(
        backbone_kwargs=backbone_kwargs(model),
        feature_names=list(model.feature_names) if model.feature_names else None,
        pretrained_backbone=False,
        num_classes=model.num_classes,
        in_chans=model.in_chans,
        global_pool=model.head.pool_type,
    )
    # Curated entrypoints fix the backbone themselves and refuse a second ``backbone`` argument.
    if architecture(model) == "qsenn":
        args["backbone"] = model.backbone_name
    else:
        args.pop("backbone", None)
    return {k: jsonable(v, f"model argument {k!r}") for k, v in args.items()}


def backbone_kwargs(model: QSENN) -> dict[str, Any]:
    """The backbone kwargs the model was created with, without the run-only ones."""
    recorded = dict((getattr(model, "_model_args", None) or {}).get("backbone_kwargs") or {})
    return {k: v for k, v in recorded.items() if k not in _RUNTIME_KWARGS}


def export_cfg(model: QSENN) -> dict[str, Any]:
    """The pretrained cfg an export starts from: the model's own; a QSENN built without timm.create_model gets its
    backbone's."""
    cfg = getattr(model, "pretrained_cfg", None)
    if cfg:
        return dict(cfg)
    return dict(backbone_variant_cfg(model.backbone_name).to_dict(), num_classes=model.num_classes)


def jsonable(value: Any, what: str) -> Any:
    """A JSON-serialisable copy of metrics, recipes and args (dataclasses, paths, tensors and tuples converted)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, Mapping):
        return {str(k): jsonable(v, what) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v, what) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if callable(getattr(value, "tolist", None)):
        return jsonable(value.tolist(), what)  # tensors, numpy arrays and numpy scalars
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    try:
        json.dumps(value)
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"{what} holds {value!r} ({type(value).__name__}), which is not JSON-serialisable; "
            "pass numbers, strings, lists or dicts"
        ) from e
    return value
