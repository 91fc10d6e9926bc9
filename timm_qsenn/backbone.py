"""Creating a timm backbone for a Q-SENN model by name, with a helpful error for an unknown one."""

from __future__ import annotations

import difflib
from typing import Any

import timm
from torch import nn

__all__ = ["check_backbone_name", "create_backbone"]


def check_backbone_name(name: str) -> None:
    """Raise a ValueError with the closest timm names when ``name`` (optionally with a tag) is not a timm model."""
    arch = name.split(".", 1)[0]
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
        raise ValueError(f"unknown timm backbone {name!r}{hint}")


def create_backbone(name: str, pretrained: bool, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name, num_classes=0)``: the backbone without its classifier."""
    check_backbone_name(name)
    return timm.create_model(name, pretrained=pretrained, num_classes=0, **kwargs)
