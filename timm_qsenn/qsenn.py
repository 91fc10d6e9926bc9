"""QSENN: any timm backbone plus a Q-SENN head, its timm entrypoints and default pretrained cfgs.

The module name is unique on purpose: timm files registered models under the last component of the module
name, so ``timm.list_models(module='qsenn')`` lists exactly the models registered here.
"""

from __future__ import annotations

import logging
import math
from functools import partial
from typing import Any

import torch
from timm.models import build_model_with_cfg, register_model
from torch import Tensor, nn

from .backbone import create_backbone
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
        self.backbone = create_backbone(
            backbone, pretrained_backbone, in_chans=in_chans, **extra, **(backbone_kwargs or {})
        )
        self.num_features = self.backbone.num_features
        # Token backbones: prefix tokens (class, register, distillation) are dropped before the grid.
        self.num_prefix_tokens = int(getattr(self.backbone, "num_prefix_tokens", 0))
        self.channels_last_output = getattr(self.backbone, "output_fmt", "NCHW") == "NHWC"
        self.head = QSENNHead(
            self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate, device=device, dtype=dtype
        )

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

    def forward_features(self, x: Tensor) -> Tensor:
        """Backbone feature maps as B x C x H x W, for CNNs and token models alike."""
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(
                f"expected a B x {self.in_chans} x H x W image batch, got shape {list(x.shape)}; for images "
                "with C channels create the model with in_chans=C"
            )
        return self._to_grid(self.backbone.forward_features(x), x.shape[2], x.shape[3])

    def _to_grid(self, x: Tensor, height: int, width: int) -> Tensor:
        if x.ndim == 4:
            return x.permute(0, 3, 1, 2) if self.channels_last_output else x
        if x.ndim == 3:
            x = x[:, self.num_prefix_tokens :]
            batch, count, channels = x.shape
            rows = int(math.floor(math.sqrt(count * height / width) + 0.5))
            cols = count // max(rows, 1)
            if rows * cols != count:
                raise ValueError(
                    f"cannot arrange {count} tokens of backbone {self.backbone_name} in a grid for a "
                    f"{height} x {width} input; set num_prefix_tokens on the backbone if it has prefix tokens"
                )
            return x.transpose(1, 2).reshape(batch, channels, rows, cols)
        raise ValueError(
            f"backbone {self.backbone_name} has no spatial features: forward_features returned shape "
            f"{list(x.shape)}; Q-SENN needs B x C x H x W maps or B x N x C tokens, choose a CNN or ViT backbone"
        )

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    @torch.jit.ignore
    def forward_qsenn(self, x: Tensor) -> QSENNOutput:
        """Logits plus the pooled features and feature maps they were computed from (always pooled)."""
        return self.head.forward_qsenn(self.forward_features(x))


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
        **plan.model_kwargs,
    )
    if model.pretrained_cfg.get("pool_size") is None:
        # Token backbones have no pool size in their cfg: it is the feature grid at the default input size.
        reduction = model.backbone.feature_info[-1]["reduction"]
        height, width = model.pretrained_cfg["input_size"][1:]
        model.pretrained_cfg["pool_size"] = (math.ceil(height / reduction), math.ceil(width / reduction))
    return model


def _make_entrypoint(backbone: str):
    def entrypoint(pretrained: bool = False, **kwargs: Any) -> QSENN:
        kwargs["backbone_kwargs"] = {**CURATED_BACKBONES[backbone], **(kwargs.get("backbone_kwargs") or {})}
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
