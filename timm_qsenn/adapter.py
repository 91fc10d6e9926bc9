"""MapAdapter: an MLP applied at every location of the backbone maps (a stack of 1x1 convolutions).

A frozen foundation backbone (DINO-QPM's DINOv2) reads through a small trained adapter: the Q-SENN head then
selects, pools and classifies the adapter's output channels instead of the backbone's.
"""

from typing import Any

import torch
from timm.layers import LayerNorm2d, get_act_layer
from torch import Tensor, nn

__all__ = ["MapAdapter", "ADAPTER_KEYS", "create_adapter"]

ADAPTER_KEYS = ("depth", "hidden", "out_features", "act", "norm")
_NORM_LAYERS = {"batchnorm": nn.BatchNorm2d, "layernorm": LayerNorm2d}


class MapAdapter(nn.Module):
    """``depth`` 1x1 convolutions ``in -> hidden -> ... -> out_features``; norm and activation between them."""

    def __init__(
        self,
        in_features: int,
        depth: int = 4,
        hidden: int = 2048,
        out_features: int = 512,
        act: str = "gelu",
        norm: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if depth < 1 or hidden < 1 or out_features < 1:
            raise ValueError(
                f"adapter depth, hidden and out_features must be positive, got depth={depth}, hidden={hidden}, "
                f"out_features={out_features}; e.g. adapter=dict(depth=4, hidden=2048, out_features=512)"
            )
        if norm is not None and norm not in _NORM_LAYERS:
            raise ValueError(f"adapter norm must be one of {sorted(_NORM_LAYERS)} or None, got {norm!r}")
        act_layer = get_act_layer(act)
        if act_layer is None:
            raise ValueError(f"adapter act {act!r} is not an activation timm knows; use e.g. 'gelu' or 'relu'")
        dd = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        widths = [in_features] + [hidden] * (depth - 1) + [out_features]
        layers: list[nn.Module] = []
        for i, (width_in, width_out) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.Conv2d(width_in, width_out, 1, **dd))
            if i < depth - 1:  # the last layer is linear: its outputs are the features Q-SENN selects
                if norm is not None:
                    layers.append(_NORM_LAYERS[norm](width_out, **dd))
                layers.append(act_layer())
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """B x in_features x H x W maps -> B x out_features x H x W."""
        return self.layers(x)


def create_adapter(
    in_features: int, adapter: dict[str, Any] | None, device: Any = None, dtype: Any = None
) -> nn.Module:
    """The adapter a QSENN's ``adapter=`` argument describes; ``nn.Identity`` (no parameters) for None."""
    if not adapter:
        return nn.Identity()
    if not isinstance(adapter, dict):
        raise TypeError(f"adapter must be a dict of {', '.join(ADAPTER_KEYS)} or None, got {type(adapter).__name__}")
    unknown = sorted(set(adapter) - set(ADAPTER_KEYS))
    if unknown:
        raise ValueError(f"adapter has unknown keys {unknown}; valid keys: {', '.join(ADAPTER_KEYS)}")
    return MapAdapter(in_features, **adapter, device=device, dtype=dtype)
