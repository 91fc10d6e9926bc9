"""The static HTML report of a model: metrics, classes and features with their galleries; needs Pillow only."""

from __future__ import annotations

import html
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..qsenn import QSENN
from .gallery import feature_gallery
from .global_explanations import FeatureUse, class_names_of, global_explanation

__all__ = ["write_report"]

_logger = logging.getLogger(__name__)

_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.5em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 1.6em; }
table { border-collapse: collapse; font-size: .9em; }
td, th { border: 1px solid #ddd; padding: .25em .6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
.pos { color: #1f5f99; } .neg { color: #b2271b; }
.feature { margin: 1em 0 1.6em; }
.gallery { display: flex; flex-wrap: wrap; gap: .6em; }
figure { margin: 0; font-size: .75em; text-align: center; }
figure img { display: block; border: 1px solid #ccc; }
.meta { color: #666; font-size: .9em; }
"""


def _feature_link(use: FeatureUse) -> str:
    """A signed, coloured link from a class's row to the feature's section."""
    sign, css = ("+", "pos") if use.sign > 0 else ("&minus;", "neg")
    return f'<a class="{css}" href="#feature-{use.index}">{sign}&nbsp;{html.escape(use.name)}</a>'


def write_report(
    model: QSENN,
    loader: Iterable,
    out_dir: str | Path,
    metrics: Any | None = None,
    top: int = 5,
    title: str | None = None,
    progress: bool = False,
) -> Path:
    """Write a static HTML report of a model to ``out_dir``; returns the path of ``index.html``.

    The folder holds ``index.html`` (metrics, a class table, and per feature its classes and a gallery of its
    most activating images from ``loader``), the images under ``images/`` referenced by relative paths,
    ``explanation.json`` and, with ``metrics`` (a :class:`~timm_qsenn.metrics.QSENNMetrics`), ``metrics.json``.
    The loader must not shuffle. Needs Pillow only, not matplotlib.
    """
    out_dir = Path(out_dir)
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    explanation = global_explanation(model)
    gallery = feature_gallery(model, loader, top=top, progress=progress)
    class_names = class_names_of(model)
    explanation.to_json(out_dir / "explanation.json")
    name = title or f"Q-SENN model {getattr(model, 'backbone_name', '')}".strip()

    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(name)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(name)}</h1>",
        f'<p class="meta">head stage <b>{html.escape(model.head.stage)}</b>, {len(class_names)} classes, '
        f"{len(gallery.features)} features used of {model.head.num_features} selected, backbone "
        f"{html.escape(str(getattr(model, 'backbone_name', '?')))}</p>",
    ]
    if metrics is not None:
        metrics.to_json(out_dir / "metrics.json")
        parts.append('<h2 id="metrics">Metrics</h2><table><tr><th>metric</th><th>value</th><th>better</th></tr>')
        parts += [
            f"<tr><td>{html.escape(m)}</td><td>{html.escape(v)}</td><td>{b}</td></tr>" for m, v, b in metrics.rows()
        ]
        parts.append("</table>")
    parts.append('<h2 id="classes">Classes</h2><table><tr><th>class</th><th>features (sign, name)</th></tr>')
    for cls in explanation.classes:
        links = ", ".join(_feature_link(use) for use in cls.features) or "<i>no features</i>"
        parts.append(f'<tr id="class-{cls.index}"><td>{html.escape(cls.name)}</td><td>{links}</td></tr>')
    parts.append("</table>")
    parts.append('<h2 id="features">Features</h2>')
    weight = model.head.fc.weight.detach()
    for j, examples in gallery.features.items():
        users = []
        for c in explanation.feature_classes[j]:
            css = "pos" if weight[c, j] > 0 else "neg"
            users.append(f'<a class="{css}" href="#class-{c}">{html.escape(class_names[c])}</a>')
        figures = []
        for rank, example in enumerate(examples):
            file = f"images/feature_{j}_{rank}.png"
            example.thumbnail.save(out_dir / file)
            caption = f"{html.escape(class_names[example.label])}<br>activation {example.activation:.3f}"
            figures.append(
                f'<figure><img src="{file}" alt="feature {j}, image {example.index}" '
                f'width="{example.thumbnail.width}" height="{example.thumbnail.height}">'
                f"<figcaption>{caption}</figcaption></figure>"
            )
        parts.append(
            f'<div class="feature" id="feature-{j}"><h3>{html.escape(explanation.feature_names[j])}</h3>'
            f'<p class="meta">backbone channel {int(model.head.selection[j])}; used by {", ".join(users)}</p>'
            f'<div class="gallery">{"".join(figures)}</div></div>'
        )
    parts.append("</body></html>")
    index = out_dir / "index.html"
    index.write_text("\n".join(parts) + "\n", encoding="utf-8")
    _logger.info("wrote the report of %d classes and %d features to %s", len(class_names), len(gallery.features), index)
    return index
