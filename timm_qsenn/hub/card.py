"""Model cards: the README.md of a saved model (front matter, details, results, the global explanation), and the
marker that tells a generated card from one a person wrote or edited."""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm

from .._utils import flatten_dict
from ..explain import class_names_of, feature_names_of, global_explanation
from ..qsenn import QSENN
from .describe import packable, qsenn_metadata
from .format import SIDECAR_NAME

__all__ = ["model_card", "write_card", "is_generated_card"]

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

    meta = dict(meta) if meta is not None else qsenn_metadata(model, None, None, None, packable(model))
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
    """The Hub id of the backbone's pretrained weights, for the card's ``base_model``, if it has one."""
    with contextlib.suppress(Exception):
        cfg = timm.get_pretrained_cfg(backbone)
        if cfg is not None and cfg.hf_hub_id:
            return cfg.hf_hub_id
    return None


def _format_value(value: Any) -> str:
    """A metric or magnitude as card text: floats to four significant digits."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _cell(text: Any) -> str:
    """Markdown table cell text: pipes escaped, line breaks folded."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _card_summary(model: QSENN, meta: Mapping[str, Any], folded: Mapping[str, Any] | None) -> str:
    """The paragraph under the title: what the model is and how its classes are decided."""
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
    """The rows of the "Model details" table."""
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
    if meta.get("environment"):
        rows.append(("Produced with", _produced_with(meta["environment"])))
    return [(_cell(k), _cell(v)) for k, v in rows]


def _produced_with(environment: Mapping[str, Any]) -> str:
    """One line of the software and hardware that produced the model, from its recorded environment."""
    names = [name for name in ("timm_qsenn", "torch", "timm") if name in environment]
    parts = [", ".join(f"{name} {environment[name]}" for name in names)]
    if environment.get("device"):
        gpu = f" ({environment['gpu']})" if environment.get("gpu") else ""
        parts.append(f"device {environment['device']}{gpu}")
    if environment.get("cpu"):
        parts.append(f"CPU {environment['cpu']}")
    return "; ".join(part for part in parts if part)


def _card_usage(model: QSENN, repo_id: str | None, folder_name: str | None, folded: Any) -> str:
    """The Python snippet that loads the model and its preprocessing."""
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
    """The sentence that says how to read the global explanation tables."""
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


def _class_rows(model: QSENN) -> list[tuple[str, str, str]]:
    """One row per class: its positive and its negative features."""
    explanation = global_explanation(model)
    rows = []
    for cls in explanation.classes:
        pos = ", ".join(f"+{_cell(u.name)}" for u in cls.features if u.sign > 0) or "-"
        neg = ", ".join(f"-{_cell(u.name)}" for u in cls.features if u.sign < 0) or "-"
        rows.append((_cell(cls.name), pos, neg))
    return rows


def _feature_rows(model: QSENN) -> list[tuple[int, str, int, str, str]]:
    """One row per selected feature: its name, channel, and the classes using it with each sign."""
    weight = model.head.fc.weight.detach().float().cpu()
    classes = class_names_of(model)
    rows = []
    for j, (name, channel) in enumerate(zip(feature_names_of(model), model.head.selection.tolist())):
        pos = [_cell(classes[c]) for c in (weight[:, j] > 0).nonzero().flatten().tolist()]
        neg = [_cell(classes[c]) for c in (weight[:, j] < 0).nonzero().flatten().tolist()]
        rows.append((j, _cell(name), channel, ", ".join(pos) or "-", ", ".join(neg) or "-"))
    return rows


def write_card(path: Path, text: str) -> None:
    """Write a generated card with a trailing marker holding its hash, so edits by people can be recognised."""
    text = text if text.endswith("\n") else text + "\n"
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    path.write_bytes(f"{text}\n<!-- timm_qsenn model card, sha256:{digest} -->\n".encode())


def is_generated_card(text: str) -> bool:
    """Whether a README is a card written by timm_qsenn and left unedited (its marker hash still matches)."""
    match = _CARD_MARKER.search(text)
    if match is None:
        return False
    body = text[: match.start()]
    return hashlib.sha256(body.encode("utf-8")).hexdigest() == match.group(1)
