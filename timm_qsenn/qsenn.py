"""QSENN: any timm backbone plus a Q-SENN head, its timm entrypoints and default pretrained cfgs.

The module name is unique on purpose: timm files registered models under the last component of the module
name, so ``timm.list_models(module='qsenn')`` lists exactly the models registered here.
"""

import logging
import math
from functools import partial
from typing import Any

import timm
import torch
from timm.models import build_model_with_cfg, register_model
from torch import Tensor, nn

from .adapter import create_adapter
from .backbone import (
    create_backbone,
    feature_layout,
    image_batch_check,
    probe_features,
    prune_unused,
    spatial_maps,
    tokens_to_maps,
)
from .head import QSENNHead, QSENNOutput
from .pretrained import CURATED_BACKBONES, HUB_CONFIGS_ENV, build_default_cfgs, plan_weights
from .ternary import unpack_layer

_logger = logging.getLogger(__name__)

__all__ = [
    "QSENN",
    "QSENNOutput",
    "checkpoint_filter_fn",
    "CURATED_BACKBONES",
    "HUB_CONFIGS_ENV",
]


class QSENN(nn.Module):
    """A timm backbone whose classifier is a Q-SENN head (selected features, normalisation, ternary layer)."""

    def __init__(
        self,
        backbone: str = "resnet50",
        num_classes: int = 1000,
        in_chans: int = 3,
        global_pool: str = "avg",
        drop_rate: float = 0.2,
        img_size: int | tuple[int, int] | None = None,
        drop_path_rate: float | None = None,
        drop_block_rate: float | None = None,
        bn_momentum: float | None = None,
        bn_eps: float | None = None,
        pretrained_backbone: bool = False,
        backbone_kwargs: dict[str, Any] | None = None,
        feature_names: list[str] | None = None,
        adapter: dict[str, Any] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        """
        Args:
            backbone: timm model name (optionally with a pretrained tag) whose ``forward_features`` gives the maps.
            num_classes: classes of the class layer; 0 removes it and ``forward`` returns features.
            in_chans: input image channels.
            global_pool: ``'avg'`` (Q-SENN's spatial mean) or ``''`` to return per-location outputs.
            drop_rate: dropout on the pooled features (0.2 for the dense model, 0.1 in fine-tuning).
            img_size: input size for backbones built for one size (ViT-like); passed to the backbone when set.
            drop_path_rate, drop_block_rate, bn_momentum, bn_eps: passed to the backbone when set.
            pretrained_backbone: load the backbone's own pretrained weights through timm.
            backbone_kwargs: further keyword arguments for ``timm.create_model(backbone, ...)``.
            feature_names: human names of the selected features, in selection order (see ``align.py``).
            adapter: an MLP applied at every location of the backbone maps (``adapter.MapAdapter``'s
                depth, hidden, out_features, act, norm); the head reads its outputs. None: the backbone's maps.
            device, dtype: where and in which dtype to create parameters.
        """
        super().__init__()
        self.backbone_name = backbone
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.drop_rate = drop_rate
        self.feature_names = list(feature_names) if feature_names is not None else None
        self.grad_checkpointing = False

        extra = {
            k: v
            for k, v in dict(
                img_size=img_size,
                drop_path_rate=drop_path_rate,
                drop_block_rate=drop_block_rate,
                bn_momentum=bn_momentum,
                bn_eps=bn_eps,
                device=device,
                dtype=dtype,
            ).items()
            if v is not None
        }
        # With the backbone's own class count, its pretrained classifier can become the dense head (see below);
        # not behind an adapter, whose features are not the backbone's channels.
        adopt = (
            pretrained_backbone and not adapter and num_classes > 0 and num_classes == _backbone_num_classes(backbone)
        )
        self.backbone = create_backbone(
            backbone,
            pretrained_backbone,
            in_chans=in_chans,
            num_classes=num_classes if adopt else 0,
            **extra,
            **(backbone_kwargs or {}),
        )
        classifier = _linear_on_pooled_maps(self.backbone, in_chans, img_size) if adopt else None
        if adopt:
            self.backbone.reset_classifier(0)
        self.backbone_features = self.backbone.num_features
        # Token backbones: prefix tokens (class, register, distillation) are dropped before the grid.
        self.num_prefix_tokens = int(getattr(self.backbone, "num_prefix_tokens", 0))
        size = _probe_size(self.backbone, in_chans, img_size)
        architecture = {k: v for k, v in {**extra, **(backbone_kwargs or {})}.items() if k not in _NOT_ARCHITECTURE}
        probe = probe_features(self.backbone, size, key=(backbone, repr(sorted(architecture.items())), size))
        self.feature_layout = feature_layout(self.backbone, probe)
        patch_embed = getattr(self.backbone, "patch_embed", None)
        self.patch_size = [int(p) for p in getattr(patch_embed, "patch_size", (1, 1))]
        self.patch_padded = bool(getattr(patch_embed, "dynamic_img_pad", False))
        # Layers after the feature maps (head norms, a conv head) are never used: removed, and their keys in
        # older checkpoints ignored on load.
        removed = prune_unused(self.backbone, probe.unused) if probe is not None else []
        self.pruned = ["backbone." + name for name in removed]
        self.register_load_state_dict_pre_hook(_drop_pruned_keys)
        # timm's feature API (features_only, FeatureGetterNet): the backbone's, under the ``backbone.`` prefix.
        self.feature_info = [
            dict(info, module="backbone." + info["module"]) for info in getattr(self.backbone, "feature_info", [])
        ]
        # Identity when None: no parameters, so models without an adapter keep their state dict keys.
        self.adapter = create_adapter(self.backbone_features, adapter, device=device, dtype=dtype)
        self.num_features = getattr(self.adapter, "out_features", self.backbone_features)
        self.head = QSENNHead(
            self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate, device=device, dtype=dtype
        )
        self.head_from_backbone = classifier is not None
        if classifier is not None:
            with torch.no_grad():
                self.head.fc.weight.copy_(classifier.weight)
                self.head.fc.bias.copy_(classifier.bias)

    @property
    def head_hidden_size(self) -> int:
        """Width of ``forward_head(x, pre_logits=True)``: the number of features the class layer reads."""
        return self.head.num_features

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """The backbone's parameter groups under the ``backbone.`` prefix; the head falls in the last group."""
        matcher = self.backbone.group_matcher(coarse=coarse)
        if callable(matcher):  # a function of the parameter name (e.g. Inception-v3)
            return partial(_prefixed_matcher_fn, matcher)
        return {name: _prefix_matcher(value) for name, value in matcher.items()}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        nwd = getattr(self.backbone, "no_weight_decay", None)
        return {"backbone." + name for name in nwd()} if callable(nwd) else set()

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> nn.Module | str:
        return "head.fc" if name_only else self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Rebuild the class layer for ``num_classes``; the selected features and their statistics stay."""
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
        self.head.reset(num_classes, pool_type=global_pool)

    def forward_backbone(self, x: Tensor) -> Tensor:
        """Backbone feature maps as B x C x H x W, for CNNs and token models alike (what a map cache stores)."""
        x = image_batch_check(x, self.in_chans)
        return self._to_maps(self.backbone.forward_features(x), x)

    def forward_features(self, x: Tensor) -> Tensor:
        """The maps the head reads, B x num_features x H x W: the backbone's, through the adapter if any."""
        return self.adapter(self.forward_backbone(x))

    def _to_maps(self, features: Tensor, image: Tensor) -> Tensor:
        if self.feature_layout == "NHWC":
            return features.permute(0, 3, 1, 2)
        if self.feature_layout == "tokens":
            return tokens_to_maps(features, image, self.num_prefix_tokens, self.patch_size, self.patch_padded)
        return spatial_maps(features, self.backbone_name)

    @torch.jit.ignore
    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """The backbone's intermediate features (its ``forward_intermediates``); the final ones as Q-SENN maps."""
        x = image_batch_check(x, self.in_chans)
        out = self.backbone.forward_intermediates(
            x,
            indices=indices,
            norm=norm,
            stop_early=stop_early,
            output_fmt=output_fmt,
            intermediates_only=intermediates_only,
        )
        if intermediates_only:
            return out
        final, intermediates = out
        return self.adapter(self._to_maps(final, x)), intermediates

    @torch.jit.ignore
    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the backbone's layers after the given intermediates (and the class layer with ``prune_head``)."""
        take = self.backbone.prune_intermediate_layers(indices, prune_norm=prune_norm, prune_head=False)
        if prune_head:
            self.reset_classifier(0, "")
        return take

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    @torch.jit.ignore
    def forward_qsenn(self, x: Tensor) -> QSENNOutput:
        """Logits plus the pooled features and feature maps they were computed from (always pooled)."""
        return self.head.forward_qsenn(self.forward_features(x))

    @torch.jit.ignore
    def forward_qsenn_from_maps(self, maps: Tensor) -> QSENNOutput:
        """:meth:`forward_qsenn` from backbone maps (``forward_backbone``'s output, e.g. cached): adapter + head."""
        return self.head.forward_qsenn(self.adapter(maps))


def _prefix_pattern(pattern: str) -> str:
    return r"^backbone\.(?:" + pattern.removeprefix("^") + ")"


def _prefix_matcher(value: Any) -> Any:
    if value is None or isinstance(value, str):
        return value and _prefix_pattern(value)
    return [(_prefix_pattern(p), ordinal) for p, ordinal in value]


def _prefixed_matcher_fn(matcher: Any, name: str) -> Any:
    if name.startswith("backbone."):
        return matcher(name.removeprefix("backbone."))
    return float("inf")  # the head, in the last group


# Construction kwargs that do not change which layers a backbone has (so not part of its probe's key).
_NOT_ARCHITECTURE = frozenset({"device", "dtype", "pretrained_cfg_overlay", "cache_dir", "drop_path_rate", "drop_rate"})


def _backbone_num_classes(backbone: str) -> int | None:
    cfg = timm.get_pretrained_cfg(backbone) if timm.is_model(backbone.split(".", 1)[0]) else None
    return getattr(cfg, "num_classes", None)


def _default_feature_indices(model_kwargs: dict[str, Any], kwargs: dict[str, Any]) -> Any:
    """The out_indices of the backbone's own ``features_only`` model (built on the meta device to read them)."""
    if not kwargs.get("features_only") or "out_indices" in kwargs:
        return None
    backbone = model_kwargs.get("backbone", "resnet50")
    extra = {
        k: v for k, v in (model_kwargs.get("backbone_kwargs") or {}).items() if k not in ("pretrained_cfg_overlay",)
    }
    features = timm.create_model(backbone, features_only=True, feature_cls="getter", device="meta", **extra)
    return tuple(features.feature_info.out_indices)


def _probe_size(backbone: nn.Module, in_chans: int, img_size: Any) -> tuple[int, int, int]:
    """An input size the backbone accepts: the one it was built for, else its pretrained cfg's."""
    if img_size is None:
        img_size = (getattr(backbone, "pretrained_cfg", None) or {}).get("input_size", (in_chans, 224, 224))[1:]
    height, width = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    return in_chans, int(height), int(width)


def _linear_on_pooled_maps(backbone: nn.Module, in_chans: int, img_size: Any) -> nn.Linear | None:
    """The backbone's classifier when it is exactly a linear layer on the mean-pooled maps Q-SENN reads.

    Decided numerically on a random batch: then the backbone's pretrained logits are the dense head's.
    """
    classifier = backbone.get_classifier() if hasattr(backbone, "get_classifier") else None
    if not isinstance(classifier, nn.Linear) or classifier.in_features != backbone.num_features:
        return None
    size = _probe_size(backbone, in_chans, img_size)
    x = torch.randn(2, *size, generator=torch.Generator().manual_seed(0)).to(classifier.weight)
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            features = backbone.forward_features(x)
            if features.ndim != 4 or getattr(backbone, "output_fmt", "NCHW") != "NCHW":
                return None
            expected = backbone.forward_head(features)
            pooled = classifier(features.mean(dim=(2, 3)))
    finally:
        backbone.train(was_training)
    tolerance = 1e-4 * (1 + float(expected.abs().max()))
    return copy_linear(classifier) if float((pooled - expected).abs().max()) <= tolerance else None


def copy_linear(layer: nn.Linear) -> nn.Linear:
    """A detached copy of a linear layer (its weights outlive the backbone's classifier)."""
    copy = nn.Linear(layer.in_features, layer.out_features, device=layer.weight.device, dtype=layer.weight.dtype)
    with torch.no_grad():
        copy.weight.copy_(layer.weight)
        copy.bias.copy_(layer.bias)
    return copy


def _drop_pruned_keys(module: QSENN, state_dict: dict[str, Tensor], prefix: str, *args: Any) -> None:
    """A load_state_dict pre-hook: keys of the removed backbone layers (in older checkpoints) are ignored."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        name = key[len(prefix) :]
        if any(name == p or name.startswith(p + ".") for p in module.pruned):
            del state_dict[key]


# -- pretrained weights ------------------------------------------------------------------------------------


def checkpoint_filter_fn(state_dict: dict[str, Tensor], model: QSENN) -> dict[str, Tensor]:
    """Prepare a Q-SENN checkpoint for ``load_state_dict``: unpack the compact ternary layer, check the format,
    and leave out a class layer trained for another number of classes (the features and selection stay)."""
    state_dict = dict(state_dict)
    if not any(k.startswith("backbone.") for k in state_dict):
        raise ValueError(
            "checkpoint holds no Q-SENN weights (no 'backbone.' keys); for a plain timm backbone checkpoint "
            f"use timm.create_model('{model.backbone_name}_qsenn', pretrained=True, "
            "pretrained_cfg_overlay=dict(file=...)) with a backbone tag, or load it into model.backbone"
        )
    state_dict = unpack_layer(state_dict, "head.fc")
    # timm loads non-strictly when it drops a classifier, so check the backbone here: a checkpoint of another
    # backbone must not load halfway.
    own = {k for k in model.state_dict() if k.startswith("backbone.")}
    given = {k for k in state_dict if k.startswith("backbone.")}
    if own != given:
        raise ValueError(
            f"checkpoint does not fit the backbone {model.backbone_name}: missing {sorted(own - given)[:3]}, "
            f"unexpected {sorted(given - own)[:3]}; it holds another backbone (or other backbone_kwargs)"
        )
    bias = state_dict.get("head.fc.bias")
    if bias is not None and bias.shape[0] != model.num_classes:
        _logger.info(
            "the checkpoint's class layer has %d classes, the model %d: its class layer is fresh, its features stay",
            bias.shape[0],
            model.num_classes,
        )
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("head.fc.")}
    return state_dict


# Read by timm's register_model when each entrypoint below is defined, so it must exist first.
default_cfgs = build_default_cfgs()


def _create_qsenn(variant: str, pretrained: bool = False, **kwargs: Any) -> QSENN:
    cache_dir = kwargs.pop("cache_dir", None)
    plan = plan_weights(
        variant,
        pretrained,
        kwargs,
        pretrained_cfg=kwargs.pop("pretrained_cfg", None),
        overlay=kwargs.pop("pretrained_cfg_overlay", None),
        cache_dir=cache_dir,
    )
    model = build_model_with_cfg(
        QSENN,
        variant,
        plan.source == "qsenn",
        pretrained_cfg=plan.cfg,
        pretrained_filter_fn=checkpoint_filter_fn,
        cache_dir=cache_dir,
        # features_only wraps the model in timm's FeatureGetterNet, which reads forward_intermediates, by default
        # at the levels the backbone's own features_only model returns.
        feature_cfg={"feature_cls": "getter", "out_indices": _default_feature_indices(plan.model_kwargs, kwargs)},
        **plan.model_kwargs,
    )
    if not isinstance(model, QSENN):
        return model  # the features_only wrapper
    if model.pretrained_cfg.get("pool_size") is None:
        # Token backbones have no pool size in their cfg: it is the feature grid at the default input size.
        reduction = model.backbone.feature_info[-1]["reduction"]
        height, width = model.pretrained_cfg["input_size"][1:]
        model.pretrained_cfg["pool_size"] = (math.ceil(height / reduction), math.ceil(width / reduction))
    if plan.source == "backbone":
        head = (
            "the dense head is the backbone's own pretrained classifier (a linear layer on the mean-pooled maps)"
            if model.head_from_backbone
            else "the Q-SENN head is freshly initialised"
        )
        model.pretrained_cfg["notes"] = (f"Backbone weights of timm's {model.backbone_name}; {head}.",)
    return model


def _make_entrypoint(backbone: str):
    def entrypoint(pretrained: bool = False, **kwargs: Any) -> QSENN:
        return _create_qsenn(entrypoint.__name__, pretrained, backbone=backbone, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = f"{backbone}_qsenn"
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"Q-SENN head on timm's ``{backbone}``."
    return register_model(entrypoint)


for _backbone in CURATED_BACKBONES:
    globals()[f"{_backbone}_qsenn"] = _make_entrypoint(_backbone)


@register_model
def qsenn(pretrained: bool = False, **kwargs: Any) -> QSENN:
    """Q-SENN head on any timm backbone: ``timm.create_model('qsenn', backbone='convnext_nano')``."""
    return _create_qsenn("qsenn", pretrained, **kwargs)
