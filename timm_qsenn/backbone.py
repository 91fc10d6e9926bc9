"""The backbone side of a Q-SENN model: creating a timm backbone by name, removing what Q-SENN never reads, and
turning its ``forward_features`` output into B x C x H x W maps.

Q-SENN reads the backbone's feature maps and nothing after them. Which parts of a backbone come after its maps
is decided generically, by following one ``forward_features`` pass through autograd on the meta device (no
memory, no compute): submodules none of whose parameters are reached (a ConvNeXt or ViT head norm, a
MobileNetV3 ``conv_head``, an EfficientViT head) are removed, and a stray parameter that is never reached (a
mask token) becomes a buffer. Every remaining parameter then gets a gradient, as DDP requires.
"""

import difflib
import logging
from dataclasses import dataclass
from typing import Any

import timm
import torch
from timm.layers import register_notrace_function
from torch import Tensor, nn
from torch.func import functional_call

__all__ = [
    "check_backbone_name",
    "create_backbone",
    "Removed",
    "FeatureProbe",
    "probe_features",
    "feature_layout",
    "prune_unused",
    "tokens_to_maps",
    "spatial_maps",
    "image_batch_check",
]

_logger = logging.getLogger(__name__)


def check_backbone_name(name: str) -> None:
    """Raise a ValueError with the closest timm names when ``name`` (optionally with a tag) is not a timm model."""
    arch = name.split(".", 1)[0]
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
        raise ValueError(f"unknown timm backbone {name!r}{hint}")


def create_backbone(name: str, pretrained: bool, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name, ...)``, by default without its classifier (``num_classes=0``)."""
    check_backbone_name(name)
    kwargs.setdefault("num_classes", 0)
    return timm.create_model(name, pretrained=pretrained, **kwargs)


class Removed(nn.Module):
    """Stands where a backbone layer after its feature maps was removed; passes its input through.

    It takes a head's ``pre_logits`` argument too, so that the backbone's own ``forward_head`` still compiles
    (TorchScript compiles every submodule's forward, called or not).
    """

    def forward(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        return x


class _ForwardFeatures(nn.Module):
    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone.forward_features(x)


@dataclass(frozen=True)
class FeatureProbe:
    """What one ``forward_features`` pass through autograd on the meta device shows about a backbone."""

    unused: frozenset[str]  # parameters that no gradient reaches
    output_shape: tuple[int, ...]  # of forward_features for a batch of 2


# Probes by architecture (name and construction kwargs): the same architecture is built again and again (timm's
# own model tests, a trainer's evaluation models), and its layers do not change.
_PROBES: dict[Any, FeatureProbe | None] = {}
_MAX_PROBES = 64


def probe_features(backbone: nn.Module, input_size: tuple[int, int, int], key: Any = None) -> FeatureProbe | None:
    """Probe ``backbone.forward_features`` on the meta device (no memory, no compute); None if it cannot run there.

    ``key`` names the architecture (a hashable of its name and construction kwargs): a repeated key reuses
    the first probe.
    """
    if key is not None and key in _PROBES:
        return _PROBES[key]
    probe = _probe(backbone, input_size)
    if key is not None:
        if len(_PROBES) >= _MAX_PROBES:
            _PROBES.pop(next(iter(_PROBES)))
        _PROBES[key] = probe
    return probe


def _probe(backbone: nn.Module, input_size: tuple[int, int, int]) -> FeatureProbe | None:
    wrapper = _ForwardFeatures(backbone)
    was_training = backbone.training
    backbone.eval()
    try:
        # A model may be created under no_grad or inference_mode; the probe needs autograd either way.
        with torch.inference_mode(False), torch.enable_grad():
            params = {n: torch.empty_like(p, device="meta").requires_grad_(True) for n, p in wrapper.named_parameters()}
            buffers = {n: torch.empty_like(b, device="meta") for n, b in wrapper.named_buffers()}
            out = functional_call(wrapper, {**params, **buffers}, (torch.empty(2, *input_size, device="meta"),))
            grads = torch.autograd.grad(out.float().sum(), list(params.values()), allow_unused=True)
    except Exception as e:  # a backbone whose forward needs real data or a real device
        _logger.warning("could not probe %s on the meta device (%s); it is kept whole", type(backbone).__name__, e)
        return None
    finally:
        backbone.train(was_training)
    unused = frozenset(name.removeprefix("backbone.") for name, g in zip(params, grads) if g is None)
    return FeatureProbe(unused, tuple(out.shape))


def feature_layout(backbone: nn.Module, probe: FeatureProbe | None) -> str:
    """How ``forward_features`` lays its output out: ``NCHW`` or ``NHWC`` maps, or B x N x C ``tokens``."""
    if probe is not None and len(probe.output_shape) not in (3, 4):
        raise ValueError(_no_maps(type(backbone).__name__, list(probe.output_shape)))
    if probe is not None and len(probe.output_shape) == 3:
        return "tokens"
    return "NHWC" if getattr(backbone, "output_fmt", "NCHW") == "NHWC" else "NCHW"


def _no_maps(backbone: str, shape: list[int]) -> str:
    return (
        f"backbone {backbone} has no spatial features: forward_features returned shape {shape}; Q-SENN needs "
        "B x C x H x W maps or B x N x C tokens, choose a CNN or ViT backbone"
    )


@register_notrace_function
def spatial_maps(features: Tensor, backbone: str) -> Tensor:
    """``features`` itself, after checking that they are B x C x H x W maps (a leaf for FX tracing)."""
    if features.ndim != 4:
        raise ValueError(_no_maps(backbone, list(features.shape)))
    return features


def prune_unused(backbone: nn.Module, unused: frozenset[str]) -> list[str]:
    """Remove the parts of ``backbone`` whose parameters are all ``unused``; return the names removed.

    Whole submodules become :class:`Removed`; an unused parameter of a module that is otherwise used becomes a
    buffer (its state-dict key stays).
    """
    removed: list[str] = []
    for name, module in list(backbone.named_modules()):
        if not name or any(name.startswith(r + ".") for r in removed):
            continue
        own = [f"{name}.{n}" for n, _ in module.named_parameters()]
        if own and all(n in unused for n in own):
            parent_name, _, child = name.rpartition(".")
            parent = backbone.get_submodule(parent_name) if parent_name else backbone
            parent._modules[child] = Removed()
            removed.append(name)
    for name in sorted(unused):
        if any(name.startswith(r + ".") for r in removed):
            continue
        owner_name, _, attr = name.rpartition(".")
        owner = backbone.get_submodule(owner_name) if owner_name else backbone
        value = getattr(owner, attr).detach()
        delattr(owner, attr)
        owner.register_buffer(attr, value)
        removed.append(name)
    return removed


@register_notrace_function
def image_batch_check(x: Tensor, in_chans: int) -> Tensor:
    """``x`` itself, after checking that it is a B x in_chans x H x W batch (a leaf for FX tracing)."""
    if x.ndim != 4 or x.shape[1] != in_chans:
        raise ValueError(
            f"expected a B x {in_chans} x H x W image batch, got shape {list(x.shape)}; for images with C "
            "channels create the model with in_chans=C"
        )
    return x


@register_notrace_function
def tokens_to_maps(tokens: Tensor, image: Tensor, num_prefix_tokens: int, patch: list[int], padded: bool) -> Tensor:
    """B x N x C tokens of a patch backbone -> B x C x H x W maps, prefix tokens dropped (a leaf for FX tracing).

    The grid is the patch grid of the input image: ``ceil(size / patch)`` for a backbone that pads its input to
    a multiple of the patch size, ``floor`` otherwise.
    """
    height, width = image.shape[-2], image.shape[-1]
    if padded:
        rows, cols = (height + patch[0] - 1) // patch[0], (width + patch[1] - 1) // patch[1]
    else:
        rows, cols = height // patch[0], width // patch[1]
    grid = tokens[:, num_prefix_tokens:]
    if grid.shape[1] != rows * cols:
        raise ValueError(
            f"the backbone returned {grid.shape[1]} patch tokens for a {height} x {width} input, not the "
            f"{rows} x {cols} grid of its {patch[0]} x {patch[1]} patches; create it with dynamic_img_size=True"
        )
    return grid.transpose(1, 2).reshape(grid.shape[0], grid.shape[2], rows, cols)
