"""Share Q-SENN models: timm's Hub layout with a packed ternary class layer, model cards, push and pull, and a
plugin-free export folded into the backbone's own timm classifier.

What :func:`save_pretrained` writes, :func:`load_model` reads, and the model card is generated from the same
metadata (the ``"qsenn"`` block of ``config.json``):

* ``config.json``: timm's config (``architecture``, ``model_args``, ``pretrained_cfg``, ``label_names``) plus a
  top-level ``"qsenn"`` block (stage, selected channels, weights per class, scale, feature names, metrics,
  recipe, dataset, format and package versions). timm ignores unknown top-level keys.
* ``model.safetensors``: the state dict with the ternary class layer packed into 2-bit codes
  (``head.fc.weight_packed`` and friends, see :func:`timm_qsenn.ternary.pack_layer`); the header
  metadata names the file format and the class-layer format with their versions.
* ``README.md``: a model card made with huggingface_hub's ``ModelCard``.

Every timm loading path reads such a folder: ``create_model('local-dir:...' / 'hf-hub:...', pretrained=True)``,
registered tags, ``checkpoint_path=`` and ``pretrained_cfg_overlay=dict(file=...)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from timm.models import save_for_hf
from torch import Tensor, nn

from ._utils import flatten_dict, package_version
from .explain import class_names_of, feature_names_of, global_explanation
from .pretrained import CURATED_BACKBONES, backbone_variant_cfg, hub_config
from .qsenn import QSENN
from .ternary import PACKED_FORMAT, PACKED_FORMAT_VERSION, pack_layer

__all__ = [
    "save_pretrained",
    "load_model",
    "push_to_hub",
    "pull",
    "export_folded",
    "fold",
    "model_card",
    "write_hub_config",
    "CONFIG_KEY",
    "FORMAT_VERSION",
    "SIDECAR_NAME",
]

_logger = logging.getLogger(__name__)

CONFIG_KEY = "qsenn"  # top-level config.json key of the Q-SENN metadata
FORMAT_VERSION = 1  # layout of the "qsenn" config block and of the safetensors header metadata
SIDECAR_NAME = "qsenn_ternary.json"  # the ternary structure next to a folded (plain timm) export
FLOAT_FORMAT = "float"  # class layer stored as an ordinary ``head.fc.weight``

_CONFIG = "config.json"
_WEIGHTS = "model.safetensors"
_CARD = "README.md"
# safetensors header metadata (str -> str); checked before any tensor is read.
_META_FORMAT = "timm_qsenn.format"
_META_VERSION = "timm_qsenn.format_version"
_META_PACKAGE = "timm_qsenn.package_version"
_META_LAYER = "timm_qsenn.class_layer_format"
_META_LAYER_VERSION = "timm_qsenn.class_layer_format_version"
_FORMAT_NAME = "timm_qsenn"
# Only these files travel to and from the Hub: no pickle is ever uploaded.
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.md", "*.png", "*.jpg", "*.svg"]
# Constructor kwargs that describe a run, not the architecture: never exported.
_RUNTIME_KWARGS = frozenset(
    {
        *("device", "dtype", "pretrained_cfg", "pretrained_cfg_overlay", "cache_dir", "checkpoint_path"),
        *("pretrained_model_args", "scriptable", "exportable", "no_jit"),
        *("drop_rate", "drop_path_rate", "drop_block_rate"),
    }
)
# pretrained_cfg fields a folded export takes from the Q-SENN model: preprocessing and licence.
_DATA_KEYS = (
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
_CARD_MARKER = re.compile(r"\n<!-- timm_qsenn model card, sha256:([0-9a-f]{64}) -->\n?$")
_CITATION = """@inproceedings{norrenbrock2024qsenn,
  title     = {Q-SENN: Quantized Self-Explaining Neural Networks},
  author    = {Norrenbrock, Thomas and Rudolph, Marco and Rosenhahn, Bodo},
  booktitle = {Proceedings of the AAAI Conference on Artificial Intelligence},
  volume    = {38},
  number    = {19},
  pages     = {21482--21491},
  year      = {2024}
}"""


# -- save --------------------------------------------------------------------------------------------------


def save_pretrained(
    model: QSENN,
    folder: str | os.PathLike,
    *,
    metrics: Mapping[str, Any] | None = None,
    recipe: Mapping[str, Any] | Any | None = None,
    dataset: str | None = None,
    compact: bool = True,
    overwrite: bool = False,
    repo_id: str | None = None,
) -> Path:
    """Write ``config.json``, ``model.safetensors`` (packed ternary layer) and a model card into ``folder``."""
    _check_model(model)
    meta = _qsenn_metadata(model, metrics, recipe, dataset, packed=compact and _packable(model))
    with _staging(folder, overwrite) as staging:
        args, cfg = _export_args(model), _export_cfg(model)
        model_config = {CONFIG_KEY: meta, "pretrained_cfg": {"notes": [_notes(meta)]}}
        labels = _label_names(model)
        if labels:
            model_config["label_names"] = labels
        with _export_view(model, args, cfg):
            save_for_hf(model, staging, model_config=model_config, model_args=args, safe_serialization=True)
        state = _state_dict(model, packed=meta["class_layer_format"] == PACKED_FORMAT)
        save_file(state, staging / _WEIGHTS, metadata=_weights_metadata(meta))
        _write_card(staging / _CARD, model_card(model, meta, repo_id=repo_id, folder_name=Path(folder).name))
    return Path(folder)


def _check_model(model: Any) -> None:
    if not isinstance(model, QSENN):
        raise TypeError(
            f"expected a timm_qsenn QSENN model, got {type(model).__name__}; create one with "
            "timm.create_model('qsenn', backbone=...) or load one with timm_qsenn.hub.load_model"
        )


def _architecture(model: QSENN) -> str:
    arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture") or "qsenn"
    return arch if arch == "qsenn" or (arch.endswith("_qsenn") and timm.is_model(arch)) else "qsenn"


def _packable(model: QSENN) -> bool:
    return model.head.stage == "ternary" and model.num_classes > 0


def _state_dict(model: QSENN, packed: bool) -> dict[str, Tensor]:
    """The model's state dict on the CPU, contiguous, with the class layer packed when asked."""
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if packed:
        state = pack_layer(state, "head.fc", *model.head.ternary_codes())
    return state


def _ternary_exact(model: QSENN) -> bool:
    """Whether codes times one float32 scale reproduce the class layer bit for bit."""
    codes, scale = model.head.ternary_codes()
    weight = model.head.fc.weight.detach().to("cpu", torch.float32)
    return torch.equal(codes.to(torch.float32) * torch.tensor(scale, dtype=torch.float32), weight)


def _qsenn_metadata(
    model: QSENN, metrics: Mapping[str, Any] | None, recipe: Any, dataset: str | None, packed: bool
) -> dict[str, Any]:
    """The ``"qsenn"`` block of config.json: everything the card and the loaders need besides timm's keys."""
    head = model.head
    if packed and not _ternary_exact(model):
        _logger.warning("class layer is not exactly codes x one float32 scale; storing it unpacked")
        packed = False
    nnz = int(head.fc.weight.count_nonzero()) if model.num_classes > 0 else 0
    scale = head.ternary_codes()[1] if _packable(model) else None
    return {
        "format_version": FORMAT_VERSION,
        "package_version": package_version(),
        "architecture": _architecture(model),
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
        "metrics": _jsonable(dict(metrics or {}), "metrics"),
        "recipe": _jsonable(recipe if recipe is not None else {}, "recipe"),
        "dataset": dataset,
    }


def _weights_metadata(meta: Mapping[str, Any]) -> dict[str, str]:
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


def _notes(meta: Mapping[str, Any]) -> str:
    return (
        f"Q-SENN model ({meta['stage']} head on {meta['backbone']}) saved with timm_qsenn "
        f"{meta['package_version']}; needs `import timm_qsenn` before timm.create_model."
    )


def _label_names(model: QSENN) -> list[str] | None:
    names = (getattr(model, "pretrained_cfg", None) or {}).get("label_names")
    return list(names) if names and len(names) == model.num_classes else None


def _export_args(model: QSENN) -> dict[str, Any]:
    """Explicit, JSON-able constructor arguments that rebuild the model; never a backbone download."""
    recorded = dict(getattr(model, "_model_args", None) or {})
    args = {k: v for k, v in recorded.items() if k not in _RUNTIME_KWARGS}
    args.update(
        backbone_kwargs=_backbone_kwargs(model),
        feature_names=list(model.feature_names) if model.feature_names else None,
        pretrained_backbone=False,
        num_classes=model.num_classes,
        in_chans=model.in_chans,
        global_pool=model.head.pool_type,
    )
    # Curated entrypoints fix the backbone themselves and refuse a second ``backbone`` argument.
    if _architecture(model) == "qsenn":
        args["backbone"] = model.backbone_name
    else:
        args.pop("backbone", None)
    return {k: _jsonable(v, f"model argument {k!r}") for k, v in args.items()}


def _backbone_kwargs(model: QSENN) -> dict[str, Any]:
    recorded = dict((getattr(model, "_model_args", None) or {}).get("backbone_kwargs") or {})
    return {k: v for k, v in recorded.items() if k not in _RUNTIME_KWARGS}


def _export_cfg(model: QSENN) -> dict[str, Any]:
    """The model's pretrained cfg; a QSENN built without timm.create_model gets its backbone's."""
    cfg = getattr(model, "pretrained_cfg", None)
    if cfg:
        return dict(cfg, architecture=_architecture(model))
    base = backbone_variant_cfg(model.backbone_name)
    return dict(base.to_dict(), architecture="qsenn", num_classes=model.num_classes)


@contextlib.contextmanager
def _export_view(model: nn.Module, args: dict[str, Any], cfg: dict[str, Any]) -> Iterator[None]:
    """Show timm's exporter exactly the args and cfg given, then restore the model's own attributes."""
    saved = {name: model.__dict__[name] for name in ("_model_args", "pretrained_cfg") if name in model.__dict__}
    model.__dict__.update(_model_args=args, pretrained_cfg=cfg)
    try:
        yield
    finally:
        for name in ("_model_args", "pretrained_cfg"):
            model.__dict__.pop(name, None)
        model.__dict__.update(saved)


def _jsonable(value: Any, what: str) -> Any:
    """A JSON-serialisable copy of metrics, recipes and args (dataclasses, paths, tensors and tuples converted)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v, what) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, what) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if callable(getattr(value, "tolist", None)):
        return _jsonable(value.tolist(), what)  # tensors, numpy arrays and numpy scalars
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


@contextlib.contextmanager
def _staging(folder: str | os.PathLike, overwrite: bool) -> Iterator[Path]:
    """A temporary folder next to ``folder`` whose files replace those in ``folder`` when the block succeeds."""
    target = Path(folder)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} is a file; pass a folder to write the model into")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{target} is not empty; choose an empty or new folder, or pass overwrite=True to replace the "
            "model files in it"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".qsenn-", dir=target.parent))
    try:
        yield staging
        target.mkdir(exist_ok=True)
        for path in staging.iterdir():
            os.replace(path, target / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# -- model card --------------------------------------------------------------------------------------------

_CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

{{ summary }}

## Model details

| | |
|---|---|
{% for key, value in details %}| {{ key }} | {{ value }} |
{% endfor %}
## How to use

```bash
pip install {{ install }}
```

```python
{{ usage }}
```
{% if metrics %}
## Results
{% if dataset %}
Evaluated on `{{ dataset }}`.
{% endif %}
| metric | value |
|---|---|
{% for key, value in metrics %}| {{ key }} | {{ value }} |
{% endfor %}{% endif %}
## Global explanation

{{ explanation_intro }}
{% if classes %}
| class | positive features | negative features |
|---|---|---|
{% for row in classes %}| {{ row[0] }} | {{ row[1] }} | {{ row[2] }} |
{% endfor %}
### Features

| # | feature | backbone channel | classes using it positively | classes using it negatively |
|---|---|---|---|---|
{% for row in features %}| {{ row[0] }} | {{ row[1] }} | {{ row[2] }} | {{ row[3] }} | {{ row[4] }} |
{% endfor %}{% endif %}{% if recipe %}
## Training recipe

```json
{{ recipe }}
```
{% endif %}
## Citation

```bibtex
{{ citation }}
```
"""


def model_card(
    model: QSENN,
    meta: Mapping[str, Any] | None = None,
    *,
    repo_id: str | None = None,
    folder_name: str | None = None,
    folded: Mapping[str, Any] | None = None,
) -> str:
    """The model card (README.md text) of a Q-SENN model, or of its folded plain-timm export."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    meta = dict(meta) if meta is not None else _qsenn_metadata(model, None, None, None, _packable(model))
    metrics = {str(k): v for k, v in flatten_dict(meta.get("metrics") or {}).items()}
    ordered = sorted(metrics, key=lambda k: (not re.search(r"acc|top-?1", k, re.I), list(metrics).index(k)))
    dataset = meta.get("dataset")
    name = repo_id.split("/")[-1] if repo_id else (folder_name or f"{model.backbone_name}_qsenn")
    base_model = _base_model(model.backbone_name)
    numeric = [k for k in ordered if isinstance(metrics[k], (int, float)) and not isinstance(metrics[k], bool)]
    eval_results = (
        [
            EvalResult(
                task_type="image-classification",
                dataset_type=dataset,
                dataset_name=dataset,
                metric_type=k,
                metric_value=metrics[k],
            )
            for k in numeric
        ]
        if dataset
        else None
    )
    card_data = ModelCardData(
        library_name="timm",
        pipeline_tag="image-classification",
        tags=["image-classification", "timm", "q-senn", "timm_qsenn", "interpretability"]
        + (["folded"] if folded else []),
        license=(getattr(model, "pretrained_cfg", None) or {}).get("license"),
        datasets=[dataset] if dataset else None,
        metrics=ordered or None,
        base_model=base_model,
        model_name=name if eval_results else None,
        eval_results=eval_results or None,
    )
    card = ModelCard.from_template(
        card_data,
        template_str=_CARD_TEMPLATE,
        title=f"{name}: Q-SENN on {model.backbone_name}" + (" (folded, plain timm)" if folded else ""),
        summary=_card_summary(model, meta, folded),
        details=_card_details(model, meta, folded),
        install="timm" if folded else "timm timm-qsenn",
        usage=_card_usage(model, repo_id, folder_name, folded),
        dataset=dataset,
        metrics=[(_cell(k), _cell(_format_value(metrics[k]))) for k in ordered],
        explanation_intro=_explanation_intro(model, meta),
        classes=_class_rows(model) if not model.head.is_dense else [],
        features=_feature_rows(model) if not model.head.is_dense else [],
        recipe=json.dumps(meta.get("recipe"), indent=2) if meta.get("recipe") else "",
        citation=_CITATION,
    )
    return card.content


def _base_model(backbone: str) -> str | None:
    with contextlib.suppress(Exception):
        cfg = timm.get_pretrained_cfg(backbone)
        if cfg is not None and cfg.hf_hub_id:
            return cfg.hf_hub_id
    return None


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _cell(text: Any) -> str:
    """Markdown table cell text: pipes escaped, line breaks folded."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _card_summary(model: QSENN, meta: Mapping[str, Any], folded: Mapping[str, Any] | None) -> str:
    head = model.head
    text = (
        f"A [Q-SENN](https://arxiv.org/abs/2312.13839) (Quantized Self-Explaining Neural Network) image "
        f"classifier on timm's `{model.backbone_name}`, made with "
        f"[timm_qsenn](https://pypi.org/project/timm-qsenn/). "
    )
    if head.stage == "ternary":
        text += (
            f"Each of the {model.num_classes} classes is decided by a few of {head.num_features} learned features "
            f"(on average {meta.get('n_per_class')}), every one with weight +a or -a "
            f"(a = {_format_value(meta.get('scale'))}), so the global explanation below is the whole classifier."
        )
    elif not head.is_dense:
        text += (
            f"Each of the {model.num_classes} classes reads a few of {head.num_features} selected features "
            f"(on average {meta.get('n_per_class')}) through a sparse real-valued layer."
        )
    else:
        text += "The head is still dense (all backbone channels); it is not yet interpretable."
    if folded:
        text += (
            f"\n\nThis is the **folded** export: selection, normalisation and the class layer are folded into "
            f"the backbone's own classifier (`{folded.get('classifier')}`), a sparse linear layer on the pooled "
            f"features, so plain timm loads it without timm_qsenn. The ternary structure is in `{SIDECAR_NAME}`."
        )
    return text


def _card_details(model: QSENN, meta: Mapping[str, Any], folded: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    rows = [
        ("Architecture", f"`{folded['architecture']}` (plain timm)" if folded else f"`{meta.get('architecture')}`"),
        ("Backbone", f"`{model.backbone_name}`"),
        ("Head stage", str(meta.get("stage"))),
        ("Features", f"{model.head.num_features} of {model.head.in_features} backbone channels"),
        ("Classes", str(model.num_classes)),
    ]
    if meta.get("n_per_class") is not None:
        rows.append(("Weights per class (mean)", str(meta["n_per_class"])))
    if meta.get("scale") is not None:
        rows.append(("Ternary magnitude a", _format_value(meta["scale"])))
    if not folded:
        rows.append(("Class layer storage", f"{meta.get('class_layer_format')}"))
    for key in ("input_size", "crop_pct", "crop_mode", "interpolation", "mean", "std"):
        if cfg.get(key) is not None:
            rows.append((key, f"`{tuple(cfg[key]) if isinstance(cfg[key], list) else cfg[key]}`"))
    if meta.get("dataset"):
        rows.append(("Dataset", f"`{meta['dataset']}`"))
    rows.append(("timm_qsenn version", str(meta.get("package_version"))))
    return [(_cell(k), _cell(v)) for k, v in rows]


def _card_usage(model: QSENN, repo_id: str | None, folder_name: str | None, folded: Any) -> str:
    where = f"hf-hub:{repo_id}" if repo_id else f"local-dir:path/to/{folder_name or 'model'}"
    lines = ["import timm"]
    if not folded:
        lines.append("import timm_qsenn  # registers the Q-SENN architectures with timm")
    lines += [
        "",
        f'model = timm.create_model("{where}", pretrained=True).eval()',
        "config = timm.data.resolve_data_config({}, model=model)",
        "transform = timm.data.create_transform(**config)",
    ]
    if folded:
        lines += ["", f"# The ternary structure (classes, features, signs) is in {SIDECAR_NAME} next to the weights."]
    else:
        lines += [
            "",
            "# Logits plus the pooled features and feature maps they come from:",
            "# output = model.forward_qsenn(transform(image).unsqueeze(0))",
        ]
    return "\n".join(lines)


def _explanation_intro(model: QSENN, meta: Mapping[str, Any]) -> str:
    if model.head.is_dense or model.num_classes <= 0:
        return "The head is dense, so there is no compact global explanation yet."
    named = "" if model.feature_names else " Features have no names yet; they are listed by backbone channel."
    if model.head.stage == "ternary":
        return (
            "A class's logit is `a x (sum of its positive features - sum of its negative features) + bias`, "
            "where each feature is the spatial mean of one backbone channel, normalised by the mean and "
            f"standard deviation stored in the head. Every class with its features and signs:{named}"
        )
    return f"Every class with the features its sparse layer reads, and their signs:{named}"


def _feature_label(use: Any) -> str:
    return _cell(use.name)


def _class_rows(model: QSENN) -> list[tuple[str, str, str]]:
    explanation = global_explanation(model)
    rows = []
    for cls in explanation.classes:
        pos = ", ".join(f"+{_feature_label(u)}" for u in cls.features if u.sign > 0) or "-"
        neg = ", ".join(f"-{_feature_label(u)}" for u in cls.features if u.sign < 0) or "-"
        rows.append((_cell(cls.name), pos, neg))
    return rows


def _feature_rows(model: QSENN) -> list[tuple[int, str, int, str, str]]:
    weight = model.head.fc.weight.detach().float().cpu()
    classes = class_names_of(model)
    rows = []
    for j, (name, channel) in enumerate(zip(feature_names_of(model), model.head.selection.tolist())):
        pos = [_cell(classes[c]) for c in (weight[:, j] > 0).nonzero().flatten().tolist()]
        neg = [_cell(classes[c]) for c in (weight[:, j] < 0).nonzero().flatten().tolist()]
        rows.append((j, _cell(name), channel, ", ".join(pos) or "-", ", ".join(neg) or "-"))
    return rows


def _write_card(path: Path, text: str) -> None:
    """Write a generated card with a trailing marker holding its hash, so edits by people can be recognised."""
    text = text if text.endswith("\n") else text + "\n"
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    path.write_bytes(f"{text}\n<!-- timm_qsenn model card, sha256:{digest} -->\n".encode())


def _is_generated_card(text: str) -> bool:
    """Whether a README is a card written by timm_qsenn and left unedited (its marker hash still matches)."""
    match = _CARD_MARKER.search(text)
    if match is None:
        return False
    body = text[: match.start()]
    return hashlib.sha256(body.encode("utf-8")).hexdigest() == match.group(1)


# -- load --------------------------------------------------------------------------------------------------


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
        config_file = _hub_file(repo, _CONFIG, kwargs.get("cache_dir"))
        meta = _check_config(config_file)
        source = config_file
        if kwargs["pretrained"]:
            source = _hub_file(repo, _WEIGHTS, kwargs.get("cache_dir"))
            _check_weights(source)
        model = _create("hf-hub:" + repo, source, **kwargs)
    elif name.startswith("local-dir:") or isinstance(name_or_path, os.PathLike) or _looks_like_path(name):
        folder = _model_folder(name.removeprefix("local-dir:"))
        meta = _check_config(folder / _CONFIG)
        source = folder / _CONFIG
        if kwargs["pretrained"]:
            source = folder / _WEIGHTS
            _check_weights(source)
        model = _create("local-dir:" + str(folder), source, **kwargs)
    else:
        arch = name.split(".", 1)[0]
        if not timm.is_model(arch) or not _is_qsenn_arch(arch):
            raise ValueError(
                f"{name!r} is neither a model folder nor a registered Q-SENN model; pass a folder written by "
                "save_pretrained, 'hf-hub:ORG/NAME', or a name from timm.list_models('*qsenn*', pretrained=True)"
            )
        meta, source = {}, name
        registered = hub_config(name)
        if kwargs["pretrained"] and registered is not None:
            source = _hub_file(registered["hf_hub_id"], _WEIGHTS, kwargs.get("cache_dir"))
            _check_weights(source)
        model = _create(name, source, **kwargs)
    if not isinstance(model, QSENN):
        raise ValueError(f"{source} does not describe a Q-SENN model (got {type(model).__name__})")
    names = meta.get("feature_names")
    if model.feature_names is None and names and len(names) == model.head.num_features:
        model.feature_names = list(names)
    return model


def _looks_like_path(name: str) -> bool:
    return os.path.exists(name) or "/" in name or os.sep in name or name.startswith((".", "~"))


def _is_qsenn_arch(arch: str) -> bool:
    return arch == "qsenn" or arch.endswith("_qsenn")


def _model_folder(path: str | os.PathLike) -> Path:
    """The folder holding config.json: ``path`` itself, or ``path/model`` for a training run folder."""
    path = Path(path).expanduser()
    for folder in (path, path / "model"):
        if (folder / _CONFIG).is_file():
            return folder
    if path.is_file():
        raise ValueError(
            f"{path} is a file; pass the folder holding config.json and model.safetensors (for a bare weights "
            "file use timm.create_model(..., checkpoint_path=...))"
        )
    if not path.exists():
        raise FileNotFoundError(f"no model folder at {path}; for a Hub repository pass 'hf-hub:ORG/NAME'")
    raise FileNotFoundError(
        f"{path} holds no {_CONFIG} (nor model/{_CONFIG}); pass a folder written by timm_qsenn.hub."
        "save_pretrained or a training run folder"
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not readable JSON ({e}); download or export the model again") from e
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds a JSON {type(config).__name__}, expected an object (a timm config)")
    return config


def _check_config(path: Path) -> dict[str, Any]:
    """Check that ``path`` is a config.json of a Q-SENN model this version reads; return its Q-SENN block."""
    config = _read_json(path)
    arch = config.get("architecture")
    if not isinstance(arch, str):
        raise ValueError(f"{path} names no architecture; it is not a timm config.json")
    if not _is_qsenn_arch(arch):
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


def _check_weights(path: Path) -> dict[str, str]:
    """Check a model.safetensors header (format, class-layer format and versions) before reading tensors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing; a Q-SENN model folder holds {_CONFIG} and {_WEIGHTS} (pickle checkpoints are not read)"
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


def _create(name: str, source: Path | str, **kwargs: Any) -> nn.Module:
    """``timm.create_model`` whose loading errors name the file they come from."""
    try:
        return timm.create_model(name, **kwargs)
    except (ValueError, RuntimeError, KeyError) as e:
        raise ValueError(f"could not load {source}: {e}") from e


def _split_revision(repo: str) -> tuple[str, str | None]:
    repo_id, _, revision = repo.removeprefix("hf-hub:").removeprefix("hf_hub:").partition("@")
    return repo_id, revision or None


def _hub_file(repo: str, filename: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Download (or find in the cache) one file of a Hub repository; a missing one is a FileNotFoundError."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    repo_id, revision = _split_revision(repo)
    try:
        return Path(
            hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir, library_name="timm_qsenn")
        )
    except (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise FileNotFoundError(
            f"hf-hub:{repo} has no {filename} that can be reached ({type(e).__name__}: {e}); check the repository "
            "id, your token for private repositories, or the local cache when HF_HUB_OFFLINE=1"
        ) from e


# -- push and pull -----------------------------------------------------------------------------------------


def push_to_hub(
    model_or_folder: QSENN | str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    folded: bool = False,
    token: str | None = None,
    overwrite_card: bool = False,
    commit_message: str | None = None,
) -> str:
    """Upload a model (or a saved/run folder) to ``repo_id``; returns the repository URL.

    Only safetensors, JSON, Markdown and images are uploaded; nothing on the Hub is deleted. A README.md on the
    Hub stays unless it is an unedited card generated by timm_qsenn or ``overwrite_card`` is set.
    ``folded`` uploads the plain-timm export of :func:`export_folded` instead.
    """
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="qsenn-push-") as tmp:
        staging = Path(tmp) / "upload"
        _stage_upload(model_or_folder, staging, repo_id, folded)
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        ignore = [] if overwrite_card else _protected_card(api, repo_id, Path(tmp) / "remote")
        if ignore:
            _logger.info("keeping the README.md of %s: it was not written by timm_qsenn", repo_id)
        api.upload_folder(
            repo_id=repo_id,
            folder_path=staging,
            allow_patterns=_HUB_PATTERNS,
            ignore_patterns=ignore or None,
            commit_message=commit_message
            or f"Upload {'folded ' if folded else ''}Q-SENN model with timm_qsenn {package_version()}",
        )
    return str(url)


def _stage_upload(model_or_folder: QSENN | str | os.PathLike, staging: Path, repo_id: str, folded: bool) -> None:
    if isinstance(model_or_folder, nn.Module):
        _check_model(model_or_folder)
        if folded:
            export_folded(model_or_folder, staging, repo_id=repo_id)
        else:
            save_pretrained(model_or_folder, staging, repo_id=repo_id)
        return
    folder = _model_folder(model_or_folder)
    model = load_model(folder)  # checks every file before anything leaves the machine
    meta = _check_config(folder / _CONFIG)
    if folded:
        export_folded(model, staging, metrics=meta.get("metrics"), dataset=meta.get("dataset"), repo_id=repo_id)
        return
    staging.mkdir(parents=True)
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if path.is_file() and _hub_file_allowed(relative):
            (staging / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, staging / relative)
    card = folder / _CARD
    if not card.is_file() or _is_generated_card(card.read_text(encoding="utf-8", errors="replace")):
        _write_card(staging / _CARD, model_card(model, meta, repo_id=repo_id))


def _hub_file_allowed(relative: Path) -> bool:
    if any(part.startswith(".") for part in relative.parts):
        return False  # e.g. the .cache folder snapshot_download leaves in a pulled folder
    return any(fnmatch.fnmatch(relative.name, pattern) for pattern in _HUB_PATTERNS)


def _protected_card(api: Any, repo_id: str, tmp: Path) -> list[str]:
    """``["README.md"]`` when the Hub holds a README that a person wrote or edited, else ``[]``."""
    if not api.file_exists(repo_id, _CARD):
        return []
    remote = api.hf_hub_download(repo_id, _CARD, local_dir=tmp)
    text = Path(remote).read_text(encoding="utf-8", errors="replace")
    return [] if _is_generated_card(text) else [_CARD]


def pull(repo_id: str, folder: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Download a model repository (safetensors, JSON, cards; never pickles) into ``folder`` and check it."""
    from huggingface_hub import snapshot_download

    target = Path(folder)
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(f"{target} is not empty; choose an empty or new folder, or pass overwrite=True")
    repo, revision = _split_revision(repo_id)
    snapshot_download(
        repo, revision=revision, local_dir=target, allow_patterns=_HUB_PATTERNS, library_name="timm_qsenn"
    )
    config = _read_json(target / _CONFIG) if (target / _CONFIG).is_file() else None
    if config is None:
        raise FileNotFoundError(f"hf-hub:{repo_id} has no {_CONFIG}; it is not a timm model repository")
    if _is_qsenn_arch(str(config.get("architecture"))):
        _check_config(target / _CONFIG)
        _check_weights(target / _WEIGHTS)
    return target


# -- plugin-free export ------------------------------------------------------------------------------------


def fold(model: QSENN) -> tuple[nn.Module, dict[str, Any]]:
    """The model as a plain timm model: selection, normalisation and class layer folded into its classifier.

    Returns the plain model and the kwargs that build it (``timm.create_model(arch, **kwargs)``). The fold is
    checked numerically against the Q-SENN model; a backbone whose classifier is not a linear layer on the
    pooled maps (ConvNeXt's norm after pooling, an MLP head) raises a ValueError saying why.
    """
    _check_model(model)
    head = model.head
    if model.num_classes <= 0:
        raise ValueError("the model has no class layer (num_classes=0); there is nothing to fold")
    if head.pool_type != "avg":
        raise ValueError(f"folding needs the spatial mean (global_pool='avg'), the model has {head.pool_type!r}")
    weight, bias = _folded_layer(model)
    arch = model.backbone_name.split(".", 1)[0]
    base = {**CURATED_BACKBONES.get(arch, {}), **_backbone_kwargs(model), "in_chans": model.in_chans}
    img_size = (getattr(model, "_model_args", None) or {}).get("img_size")
    if img_size is not None:
        base["img_size"] = img_size
    state = {k: v.detach() for k, v in model.backbone.state_dict().items()}
    size = tuple((getattr(model, "pretrained_cfg", None) or {}).get("input_size") or (model.in_chans, 224, 224))
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, *size, generator=generator)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            reference = model(x.to(device)).float().cpu()
    finally:
        model.train(was_training)
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
) -> Path:
    """Save the folded model as a vanilla timm checkpoint (no timm_qsenn needed) plus the ternary sidecar JSON."""
    plain, kwargs = fold(model)
    meta = _qsenn_metadata(model, metrics, None, dataset, packed=False)
    classifier = next(n for n, m in plain.named_modules() if m is plain.get_classifier())
    arch = model.backbone_name.split(".", 1)[0]
    folded = {"architecture": arch, "classifier": classifier, "sidecar": SIDECAR_NAME}
    cfg = dict(plain.pretrained_cfg)
    source_cfg = getattr(model, "pretrained_cfg", None) or {}
    cfg.update({k: source_cfg[k] for k in _DATA_KEYS if source_cfg.get(k) is not None})
    cfg["notes"] = [f"Q-SENN model folded into plain timm by timm_qsenn {meta['package_version']}; see {SIDECAR_NAME}."]
    model_config: dict[str, Any] = {
        "qsenn_folded": {**folded, "format_version": FORMAT_VERSION, "package_version": meta["package_version"]}
    }
    labels = _label_names(model)
    if labels:
        model_config["label_names"] = labels
    args = {k: _jsonable(v, f"model argument {k!r}") for k, v in kwargs.items()}
    with _staging(folder, overwrite) as staging:
        with _export_view(plain, args, cfg):
            save_for_hf(plain, staging, model_config=model_config, model_args=args, safe_serialization=True)
        sidecar = _sidecar(model, meta, folded)
        (staging / SIDECAR_NAME).write_text(json.dumps(sidecar, indent=1) + "\n", encoding="utf-8")
        text = model_card(model, meta, repo_id=repo_id, folder_name=Path(folder).name, folded=folded)
        _write_card(staging / _CARD, text)
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
    }


# -- publishing a registered tag ---------------------------------------------------------------------------


def write_hub_config(folder: str | os.PathLike, hf_hub_id: str, tag: str, out_dir: str | os.PathLike) -> Path:
    """Write the hub config JSON that registers a saved model as ``<architecture>.<tag>`` (see hub_configs/)."""
    source = _model_folder(folder)
    config = _read_json(source / _CONFIG)
    _check_config(source / _CONFIG)
    pretrained_cfg = dict(config.get("pretrained_cfg") or {})
    if config.get("label_names"):
        pretrained_cfg["label_names"] = config["label_names"]
    pretrained_cfg["num_classes"] = config.get("num_classes", pretrained_cfg.get("num_classes"))
    entry = {
        "architecture": config["architecture"],
        "tag": tag,
        "hf_hub_id": hf_hub_id,
        "model_args": config.get("model_args") or {},
        "pretrained_cfg": pretrained_cfg,
    }
    out = Path(out_dir) / f"{config['architecture']}.{tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(entry, indent=2) + "\n", encoding="utf-8")
    return out
