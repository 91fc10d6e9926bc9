"""The plugin-free export: a Q-SENN model folded into its backbone's own timm classifier, saved as a plain timm
checkpoint that loads without timm_qsenn, with a sidecar JSON holding the ternary structure."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models import save_for_hf
from torch import Tensor, nn

from .._utils import eval_mode, write_json
from ..explain import class_names_of, global_explanation
from ..qsenn import QSENN
from .card import model_card, write_card
from .describe import backbone_kwargs, check_model, jsonable, label_names, qsenn_metadata
from .format import CARD_FILE, FORMAT_VERSION, SIDECAR_NAME
from .save import staging

__all__ = ["fold", "export_folded"]

# The pretrained_cfg keys a folded export copies from the Q-SENN model (preprocessing and licence); every other
# key is the plain backbone's own.
_COPIED_CFG_KEYS = (
    *("input_size", "test_input_size", "min_input_size", "interpolation", "crop_mode"),
    *("crop_pct", "test_crop_pct", "mean", "std", "license"),
)
# Classifier settings tried, in order, to make a backbone's own head a linear layer on Q-SENN's pooled maps.
_FOLD_OVERRIDES: tuple[dict[str, Any], ...] = (
    {},
    {"global_pool": "avg"},
    {"global_pool": "avg", "fc_norm": False},  # ViT, DeiT, DINOv2: keep the final norm before pooling
    {"global_pool": "avg", "fc_norm": False, "final_norm": False},  # ViTs whose backbone norms after pooling
    {"global_pool": "avg", "use_fc_norm": False},  # EVA
    {"global_pool": "avg", "use_fc_norm": False, "use_post_transformer_norm": False},  # EVA02 (fc_norm)
)


def fold(model: QSENN) -> tuple[nn.Module, dict[str, Any]]:
    """The model as a plain timm model: selection, normalisation and class layer folded into its classifier.

    Returns the plain model and the kwargs that build it (``timm.create_model(arch, **kwargs)``). The fold is
    checked numerically against the Q-SENN model; a backbone whose classifier is not a linear layer on the
    pooled maps (ConvNeXt's norm after pooling, an MLP head) raises a ValueError saying why.
    """
    check_model(model)
    head = model.head
    if model.num_classes <= 0:
        raise ValueError("the model has no class layer (num_classes=0); there is nothing to fold")
    if not isinstance(model.adapter, nn.Identity):
        raise ValueError(
            "the model has an adapter (an MLP between the backbone and the head), which no plain timm classifier "
            "holds; share it with save_pretrained/push_to_hub (needs timm_qsenn) instead"
        )
    if head.pool_type != "avg":
        raise ValueError(f"folding needs the spatial mean (global_pool='avg'), the model has {head.pool_type!r}")
    weight, bias = _folded_layer(model)
    base = {**backbone_kwargs(model), "in_chans": model.in_chans}
    img_size = (getattr(model, "_model_args", None) or {}).get("img_size")
    if img_size is not None:
        base["img_size"] = img_size
    state = {k: v.detach() for k, v in model.backbone.state_dict().items()}
    size = tuple((getattr(model, "pretrained_cfg", None) or {}).get("input_size") or (model.in_chans, 224, 224))
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, *size, generator=generator)
    device = next(model.parameters()).device
    with eval_mode(model), torch.no_grad():
        reference = model(x.to(device)).float().cpu()
    reasons = []
    for overrides in _FOLD_OVERRIDES:
        kwargs = {**base, **overrides, "num_classes": model.num_classes}
        try:
            plain = timm.create_model(model.backbone_name, pretrained=False, **kwargs)
        except TypeError:
            continue  # this family has no such option
        except (ValueError, AssertionError) as e:
            reasons.append(f"{overrides or 'default'}: {e}")
            continue
        reason = _load_folded(plain, state, weight, bias)
        if reason is None:
            with torch.no_grad():
                logits = plain.eval()(x).float()
            tolerance = 1e-4 * (1 + float(reference.abs().max()))
            error = float((logits - reference).abs().max())
            if error <= tolerance:
                return plain, kwargs
            reason = f"logits differ by {error:.3g} (tolerance {tolerance:.3g})"
        reasons.append(f"{overrides or 'default'}: {reason}")
    raise ValueError(
        f"backbone {model.backbone_name} cannot be folded into a plain timm classifier: its own head is not a "
        "linear layer on the spatially averaged feature maps Q-SENN reads (e.g. ConvNeXt normalises after "
        "pooling). Share it with save_pretrained/push_to_hub (needs timm_qsenn) instead. Tried: " + "; ".join(reasons)
    )


def _folded_layer(model: QSENN) -> tuple[Tensor, Tensor]:
    """W'[:, sel] = W / sigma, b' = b - sum W mu / sigma, in float64, over all backbone channels."""
    head = model.head
    w = head.fc.weight.detach().to("cpu", torch.float64)
    b = head.fc.bias.detach().to("cpu", torch.float64)
    # The head's own normalisation, evaluated in float64: it is affine, n(f) = f / sigma - mu / sigma.
    probe = torch.stack([torch.zeros(head.num_features), torch.ones(head.num_features)]).to(
        head.mean.device, torch.float64
    )
    with torch.no_grad():
        offset, one = head.normalize(probe).to("cpu", torch.float64)
    weight = torch.zeros(model.num_classes, head.in_features, dtype=torch.float64)
    weight[:, head.selection.cpu()] = w * (one - offset)
    bias = b + w @ offset
    return weight, bias


def _load_folded(plain: nn.Module, state: dict[str, Tensor], weight: Tensor, bias: Tensor) -> str | None:
    """Put backbone weights and the folded layer into ``plain``; return why it does not fit, or None."""
    classifier = plain.get_classifier() if hasattr(plain, "get_classifier") else None
    if not isinstance(classifier, nn.Linear):
        return f"its classifier is a {type(classifier).__name__}, not a Linear layer"
    if classifier.in_features != weight.shape[1]:
        return (
            f"its classifier reads {classifier.in_features} features, not the {weight.shape[1]} channels of "
            "forward_features (a hidden layer sits between)"
        )
    name = next(n for n, m in plain.named_modules() if m is classifier)
    head_keys = {f"{name}.weight", f"{name}.bias"}
    # Backbone tensors the plain model lacks (e.g. an fc_norm Q-SENN never applies) may be left out: the
    # numerical check decides. Tensors it needs but the backbone lacks would stay random: not foldable.
    missing, _ = plain.load_state_dict(state, strict=False)
    extra = sorted(set(missing) - head_keys)
    if extra:
        return f"its head holds more than a linear layer (parameters {extra})"
    with torch.no_grad():
        classifier.weight.copy_(weight.to(classifier.weight.dtype))
        classifier.bias.copy_(bias.to(classifier.bias.dtype))
    return None


def export_folded(
    model: QSENN,
    folder: str | os.PathLike,
    *,
    metrics: Mapping[str, Any] | None = None,
    dataset: str | None = None,
    overwrite: bool = False,
    repo_id: str | None = None,
    environment: Mapping[str, Any] | None = None,
) -> Path:
    """Save the folded model as a vanilla timm checkpoint (no timm_qsenn needed) plus the ternary sidecar JSON.

    ``environment`` is what produced the model, shown on the card (see :func:`save_pretrained`).
    """
    plain, kwargs = fold(model)
    meta = qsenn_metadata(model, metrics, None, dataset, packed=False, environment=environment)
    classifier = next(n for n, m in plain.named_modules() if m is plain.get_classifier())
    arch = model.backbone_name.split(".", 1)[0]
    folded = {"architecture": arch, "classifier": classifier, "sidecar": SIDECAR_NAME}
    cfg = dict(plain.pretrained_cfg)
    source_cfg = getattr(model, "pretrained_cfg", None) or {}
    cfg.update({k: source_cfg[k] for k in _COPIED_CFG_KEYS if source_cfg.get(k) is not None})
    cfg["notes"] = [f"Q-SENN model folded into plain timm by timm_qsenn {meta['package_version']}; see {SIDECAR_NAME}."]
    model_config: dict[str, Any] = {
        "qsenn_folded": {**folded, "format_version": FORMAT_VERSION, "package_version": meta["package_version"]}
    }
    labels = label_names(model)
    if labels:
        model_config["label_names"] = labels
    args = {k: jsonable(v, f"model argument {k!r}") for k, v in kwargs.items()}
    plain.pretrained_cfg = cfg  # plain is this export's own object: its cfg is the one to write
    with staging(folder, overwrite) as tmp:
        save_for_hf(plain, tmp, model_config=model_config, model_args=args, safe_serialization=True)
        write_json(_sidecar(model, meta, folded), tmp / SIDECAR_NAME)
        text = model_card(model, meta, repo_id=repo_id, folder_name=Path(folder).name, folded=folded)
        write_card(tmp / CARD_FILE, text)
    return Path(folder)


def _sidecar(model: QSENN, meta: Mapping[str, Any], folded: Mapping[str, Any]) -> dict[str, Any]:
    """The Q-SENN structure that a folded checkpoint no longer shows: features, signs, normalisation."""
    head = model.head
    explanation = global_explanation(model)
    return {
        "format": "qsenn-folded-sidecar",
        "format_version": FORMAT_VERSION,
        "package_version": meta["package_version"],
        "backbone": model.backbone_name,
        "architecture": folded["architecture"],
        "classifier": folded["classifier"],
        "fold": "W'[:, selection] = W / std; b' = b - sum_j W[:, j] * mean[j] / std[j]; other columns are 0",
        "stage": head.stage,
        "selection": head.selection.tolist(),
        "feature_names": explanation.feature_names,
        "class_names": class_names_of(model),
        "scale": meta["scale"],
        "n_per_class": meta["n_per_class"],
        "mean": head.mean.detach().float().cpu().tolist(),
        "std": head.std.detach().float().cpu().tolist(),
        "bias": head.fc.bias.detach().float().cpu().tolist(),
        "classes": [
            {
                "index": c.index,
                "name": c.name,
                "features": [
                    {"index": u.index, "channel": u.channel, "sign": u.sign, "weight": u.weight} for u in c.features
                ],
            }
            for c in explanation.classes
        ],
        "metrics": meta["metrics"],
        "dataset": meta["dataset"],
        "environment": meta["environment"],
    }
