"""Pretrained cfgs of the Q-SENN variants, the hub configs of trained models, and where weights come from.

Every ``<backbone>_qsenn`` variant takes its data settings and weight sources from its backbone's timm cfg;
trained Q-SENN models are tags read from ``hub_configs/*.json`` (and the folders in ``$TIMM_QSENN_HUB_CONFIGS``).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

import timm
from safetensors import safe_open
from timm.models import generate_default_cfgs
from timm.models._pretrained import PretrainedCfg

from .backbone import check_backbone_name
from .head import STAGES

__all__ = [
    "CURATED_BACKBONES",
    "HUB_CONFIGS_ENV",
    "SOURCE_KEYS",
    "hub_config",
    "variant_cfg",
    "backbone_cfg",
    "backbone_variant_cfg",
    "build_default_cfgs",
    "resolve_variant_cfg",
    "CheckpointInfo",
    "inspect_checkpoint",
    "WeightsPlan",
    "plan_weights",
]

_logger = logging.getLogger(__name__)

HUB_CONFIGS_ENV = "TIMM_QSENN_HUB_CONFIGS"

# Backbones registered as ``<name>_qsenn``. The token models keep the input size timm builds them for (their cfg
# says fixed_input_size, so timm's tools use it); img_size=... builds them for another size, and
# backbone_kwargs={"dynamic_img_size": True, "dynamic_img_pad": True} for any size per batch (eager, TorchScript and
# torch.compile; not FX, like timm's own dynamic-size ViTs).
CURATED_BACKBONES: tuple[str, ...] = (
    *("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "densenet121", "inception_v3"),
    *(
        "convnext_tiny",
        "convnext_small",
        "convnext_base",
        "efficientnet_b0",
        "efficientnet_b3",
        "tf_efficientnet_lite0",
    ),
    *("vit_small_patch16_224", "vit_base_patch16_224", "deit_small_patch16_224", "vit_small_patch14_dinov2"),
    *("vit_base_patch14_dinov2", "eva02_small_patch14_224", "swin_tiny_patch4_window7_224"),
)

SOURCE_KEYS = ("url", "file", "state_dict", "hf_hub_id", "hf_hub_filename")
_VARIANT_DATA_KEYS = (
    "input_size",
    "test_input_size",
    "min_input_size",
    "fixed_input_size",
    "interpolation",
    "crop_pct",
    "test_crop_pct",
    "crop_mode",
    "mean",
    "std",
    "pool_size",
    "test_pool_size",
)


def variant_cfg(backbone_cfg: PretrainedCfg, backbone: str) -> PretrainedCfg:
    """Derive a Q-SENN variant's cfg from its backbone's: data settings and weights; head names are ours."""
    cfg = {k: getattr(backbone_cfg, k) for k in SOURCE_KEYS + _VARIANT_DATA_KEYS}
    first_conv = backbone_cfg.first_conv
    if isinstance(first_conv, str):
        first_conv = "backbone." + first_conv
    elif first_conv:
        first_conv = tuple("backbone." + c for c in first_conv)
    return PretrainedCfg(
        **cfg,
        num_classes=backbone_cfg.num_classes,
        first_conv=first_conv,
        classifier="head.fc",
        license=backbone_cfg.license,
        origin_url=backbone_cfg.origin_url,
        notes=(
            f"Backbone weights of timm's {backbone}. With the backbone's own number of classes the dense head is "
            "its pretrained classifier where that is exactly a linear layer on the mean-pooled feature maps "
            "Q-SENN reads (ResNet, DenseNet, EfficientNet, Inception-v3, ...); otherwise the head is fresh.",
        ),
    )


def _backbone_tags(backbone: str) -> dict[str, PretrainedCfg]:
    """The backbone's pretrained tags, default first, each with its cfg."""
    cfgs = timm.models.get_arch_pretrained_cfgs(backbone)
    return {name.partition(".")[2]: cfg for name, cfg in cfgs.items()}


def _hub_config_files() -> list[Path]:
    """The shipped hub configs, then those in the folders listed in $TIMM_QSENN_HUB_CONFIGS (os.pathsep)."""
    shipped = resources.files("timm_qsenn").joinpath("hub_configs")
    files = sorted(Path(str(p)) for p in shipped.iterdir() if p.name.endswith(".json"))
    for folder in filter(None, os.environ.get(HUB_CONFIGS_ENV, "").split(os.pathsep)):
        files.extend(sorted(Path(folder).glob("*.json")))
    return files


def _read_hub_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"hub config {path} is not readable JSON: {e}") from e
    missing = [k for k in ("architecture", "tag", "hf_hub_id") if k not in config]
    if missing:
        raise ValueError(f"hub config {path} lacks {missing}")
    return config


def _load_hub_configs() -> dict[str, dict[str, Any]]:
    configs = {}
    for path in _hub_config_files():
        config = _read_hub_config(path)
        configs[f"{config['architecture']}.{config['tag']}"] = config
    return configs


_HUB_CONFIGS = _load_hub_configs()
# Tags whose weights are the backbone's own (the head is fresh); every other tag carries a trained Q-SENN.
_BACKBONE_WEIGHT_TAGS: set[str] = set()


def _hub_variant_cfg(name: str, config: dict[str, Any]) -> PretrainedCfg:
    arch = config["architecture"]
    backbone = config.get("model_args", {}).get("backbone") or arch.removesuffix("_qsenn")
    base = variant_cfg(timm.get_pretrained_cfg(backbone), backbone)
    fields = dict(config.get("pretrained_cfg", {}))
    fields.update(hf_hub_id=config["hf_hub_id"], url=None, file=None, hf_hub_filename=None)
    fields.setdefault("notes", (f"Q-SENN model {name} trained with timm_qsenn.",))
    return replace(base, **fields)


def build_default_cfgs() -> dict[str, Any]:
    cfgs: dict[str, PretrainedCfg] = {}
    for backbone in CURATED_BACKBONES:
        arch = f"{backbone}_qsenn"
        for tag, cfg in _backbone_tags(backbone).items():
            cfgs[f"{arch}.{tag}"] = variant_cfg(cfg, f"{backbone}.{tag}")
            _BACKBONE_WEIGHT_TAGS.add(f"{arch}.{tag}")
    registered = {f"{b}_qsenn" for b in CURATED_BACKBONES} | {"qsenn"}
    for name, config in _HUB_CONFIGS.items():
        if name.partition(".")[0] in registered:
            cfgs[name] = _hub_variant_cfg(name, config)
        else:
            _logger.warning("hub config %s names an architecture timm_qsenn does not register; skipped", name)
    return generate_default_cfgs({k: asdict(v) for k, v in cfgs.items()})


@dataclass(frozen=True)
class CheckpointInfo:
    """What a weights file holds, read from its keys (and shapes) without loading its tensors."""

    path: str
    qsenn: bool  # a Q-SENN model (keys under ``backbone.``), or only a backbone
    num_classes: int | None  # classes of its Q-SENN class layer, when it has one
    stage: str | None  # the stage of its Q-SENN head ("dense", "selected", "ternary"), when it has one


def inspect_checkpoint(path: str | os.PathLike) -> CheckpointInfo:
    """Read a weights file's keys; a missing, corrupt or truncated file is a ValueError naming the file."""
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file {path} does not exist; pass the path of a .safetensors or .pth file")
    small = ("head.fc.weight_shape", "head.stage_id")  # tiny tensors whose values describe the model
    try:
        if path.endswith(".safetensors"):
            with safe_open(path, framework="pt") as f:
                shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}  # noqa: SIM118
                values = {k: f.get_tensor(k) for k in small if k in shapes}
        else:
            state = timm.models.load_state_dict(path)
            shapes = {k: list(v.shape) for k, v in state.items()}
            values = {k: state[k] for k in small if k in state}
    except Exception as e:  # safetensors and torch.load raise their own types for every kind of damage
        raise ValueError(
            f"weights file {path} cannot be read ({type(e).__name__}: {e}); it is corrupt, truncated or not a "
            "weights file: export or download it again"
        ) from e
    qsenn = any(k.startswith("backbone.") for k in shapes)
    if "head.fc.weight_shape" in values:
        shapes["head.fc.weight"] = values["head.fc.weight_shape"].tolist()
    head = shapes.get("head.fc.weight")
    stage_id = values.get("head.stage_id")
    stage = STAGES[int(stage_id)] if qsenn and stage_id is not None and 0 <= int(stage_id) < len(STAGES) else None
    return CheckpointInfo(path, qsenn, int(head[0]) if qsenn and head else None, stage)


@dataclass(frozen=True)
class WeightsPlan:
    """Where a model's pretrained weights come from, decided once by :func:`plan_weights`."""

    cfg: PretrainedCfg  # the variant's cfg, overlay applied
    source: str  # "none", "backbone" (the backbone's own timm weights, fresh head) or "qsenn" (a Q-SENN checkpoint)
    model_kwargs: dict[str, Any]  # the constructor kwargs, with the backbone's own loading filled in


def plan_weights(
    variant: str,
    pretrained: bool,
    kwargs: dict[str, Any],
    pretrained_cfg: Any = None,
    overlay: dict[str, Any] | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> WeightsPlan:
    """Decide where ``timm.create_model(variant, pretrained=..., **kwargs)`` takes its weights from.

    A backbone tag (the default tag included) and a file holding only a backbone load the backbone's own timm
    weights through its entrypoint (its checkpoint filters and input-conv adaption apply) and leave the head
    fresh; a trained Q-SENN tag, a ``hf-hub:``/``local-dir:`` model and a file holding a Q-SENN model load the
    whole model. A hub-config tag also fills the model kwargs it was trained with (``model_args``).
    """
    kwargs = dict(kwargs)
    overlay = dict(overlay or {})
    cfg, backbone_tag = resolve_variant_cfg(variant, pretrained_cfg, kwargs)
    cfg = replace(cfg, architecture=variant, **overlay)
    if not pretrained:
        return WeightsPlan(cfg, "none", kwargs)
    if cfg.source in ("hf-hub", "local-dir") or cfg.state_dict is not None:
        return WeightsPlan(cfg, "qsenn", kwargs)
    if cfg.file:
        backbone_weights = not inspect_checkpoint(cfg.file).qsenn
    else:
        backbone_weights = backbone_tag
    if not backbone_weights:
        return WeightsPlan(cfg, "qsenn", kwargs)
    backbone = kwargs.get("backbone", "resnet50")
    if variant != "qsenn" and cfg.tag and "." not in backbone:
        backbone = f"{backbone}.{cfg.tag}"
    backbone_kwargs = dict(kwargs.get("backbone_kwargs") or {})
    source_overlay = {k: v for k, v in overlay.items() if k in SOURCE_KEYS}
    if source_overlay:
        backbone_kwargs["pretrained_cfg_overlay"] = source_overlay
    if cache_dir is not None:
        backbone_kwargs["cache_dir"] = cache_dir
    kwargs.update(backbone=backbone, pretrained_backbone=True, backbone_kwargs=backbone_kwargs)
    return WeightsPlan(cfg, "backbone", kwargs)


def resolve_variant_cfg(variant: str, pretrained_cfg: Any, kwargs: dict[str, Any]) -> tuple[PretrainedCfg, bool]:
    """The variant's pretrained cfg, and whether its weights are the backbone's own (the head then is fresh).

    A hub-config tag also fills the model kwargs it was trained with (``model_args``) where not given.
    """
    if isinstance(pretrained_cfg, PretrainedCfg):
        return pretrained_cfg, False
    if isinstance(pretrained_cfg, dict):
        return PretrainedCfg(**pretrained_cfg), False
    name = f"{variant}.{pretrained_cfg}" if pretrained_cfg else variant
    hub_config = _HUB_CONFIGS.get(name)
    for key, value in (hub_config or {}).get("model_args", {}).items():
        kwargs.setdefault(key, value)
    if variant == "qsenn" and hub_config is None:
        backbone = kwargs.setdefault("backbone", "resnet50")
        return backbone_variant_cfg(backbone), True
    cfg = timm.models.get_pretrained_cfg(name)
    return cfg, f"{variant}.{cfg.tag}" in _BACKBONE_WEIGHT_TAGS


def backbone_cfg(backbone: str) -> PretrainedCfg:
    arch = backbone.split(".", 1)[0]
    if not timm.is_model(arch):
        check_backbone_name(backbone)
    return timm.get_pretrained_cfg(backbone) or PretrainedCfg(architecture=arch)


def hub_config(name: str) -> dict[str, Any] | None:
    """The hub config that registers ``name`` (``<architecture>.<tag>``), if one does."""
    return _HUB_CONFIGS.get(name)


def backbone_variant_cfg(backbone: str) -> PretrainedCfg:
    """The cfg of a Q-SENN variant on ``backbone`` (a timm name, optionally with a tag)."""
    return variant_cfg(backbone_cfg(backbone), backbone)
