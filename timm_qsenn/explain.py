"""Global and local explanations of Q-SENN decisions, as data first and as figures on request.

* :func:`global_explanation`: every class with its features and their signs, every feature with its classes.
* :func:`explain_image`: one image's decision: the contribution of each feature to the predicted logit
  (``w_cj * normalised f_j``; with the bias they add up to the logit), the feature maps upsampled to the image,
  the runner-up class and the features that separate the two.
* :func:`feature_gallery`: the most activating images of every feature, found with bounded memory.
* Figures (the optional ``plot`` extra, matplotlib): :func:`plot_explanation` and :func:`plot_class_sheet`;
  :func:`write_report` writes a static HTML report that needs only Pillow.
"""

from __future__ import annotations

import html
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ._utils import is_shuffled, write_json
from .qsenn import QSENN

__all__ = [
    "FeatureUse",
    "ClassExplanation",
    "GlobalExplanation",
    "global_explanation",
    "feature_names_of",
    "class_names_of",
    "FeatureContribution",
    "SeparatingFeature",
    "LocalExplanation",
    "feature_contributions",
    "explain_image",
    "GalleryImage",
    "FeatureGallery",
    "feature_gallery",
    "heatmap_overlay",
    "plot_explanation",
    "plot_class_sheet",
    "write_report",
]

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FeatureUse:
    """One feature in a class's decision: its position in the head, backbone channel, name and weight sign."""

    index: int
    channel: int
    name: str
    sign: int
    weight: float


@dataclass(frozen=True)
class ClassExplanation:
    """A class and the features its logit is a sum of (positive ones first)."""

    index: int
    name: str
    features: list[FeatureUse] = field(default_factory=list)


@dataclass(frozen=True)
class GlobalExplanation:
    """Every class with its features, and every feature with the classes using it."""

    classes: list[ClassExplanation]
    feature_classes: dict[int, list[int]]
    feature_names: list[str]

    def to_dict(self) -> dict:
        """A JSON-serialisable form."""
        return asdict(self)

    def to_json(self, path: str | Path | None = None) -> str:
        """The explanation as JSON text, also written to ``path`` when given."""
        return write_json(self.to_dict(), path)


def feature_names_of(model: QSENN) -> list[str]:
    """The model's feature names, or ``feature <channel>`` for features without one."""
    channels = model.head.selection.tolist()
    names = model.feature_names or []
    if names and len(names) != len(channels):
        raise ValueError(
            f"model has {len(names)} feature names for {len(channels)} selected features; "
            "set model.feature_names to one name per selected feature"
        )
    return list(names) if names else [f"feature {c}" for c in channels]


def class_names_of(model: QSENN) -> list[str]:
    """The model's class names from ``pretrained_cfg['label_names']``, or ``class <i>``."""
    names = (getattr(model, "pretrained_cfg", None) or {}).get("label_names")
    if names and len(names) == model.num_classes:
        return list(names)
    return [f"class {i}" for i in range(model.num_classes)]


@torch.no_grad()
def global_explanation(model: QSENN) -> GlobalExplanation:
    """For every class, the features with a non-zero weight and their signs; for every feature, its classes."""
    if model.num_classes <= 0:
        raise ValueError("the model has no class layer (num_classes=0); nothing to explain")
    weight = model.head.fc.weight.detach().float().cpu()
    channels = model.head.selection.tolist()
    feature_names = feature_names_of(model)
    classes = []
    feature_classes: dict[int, list[int]] = {j: [] for j in range(len(channels))}
    for c, name in enumerate(class_names_of(model)):
        row = weight[c]
        used = row.nonzero().flatten().tolist()
        used.sort(key=lambda j: (-float(row[j]), j))
        uses = [FeatureUse(j, channels[j], feature_names[j], int(torch.sign(row[j])), float(row[j])) for j in used]
        for j in used:
            feature_classes[j].append(c)
        classes.append(ClassExplanation(c, name, uses))
    return GlobalExplanation(classes, feature_classes, feature_names)


# -- local explanations --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FeatureContribution:
    """One feature's part in a class logit: ``contribution = weight * normalized``, and where the feature fired."""

    index: int
    channel: int
    name: str
    weight: float
    activation: float  # pooled raw activation f_j
    normalized: float  # (f_j - mean_j) / std_j, what the class layer reads
    contribution: float
    peak: tuple[int, int]  # (row, column) of the map's maximum, in input-image pixels


@dataclass(frozen=True)
class SeparatingFeature:
    """A feature weighted differently by the predicted and the runner-up class, and its share of their margin."""

    index: int
    channel: int
    name: str
    weight_predicted: float
    weight_runner_up: float
    normalized: float
    margin: float  # (weight_predicted - weight_runner_up) * normalized
    peak: tuple[int, int]


@dataclass
class LocalExplanation:
    """Why the model predicted what it did for one image: data first, tensors for figures alongside."""

    predicted: int
    predicted_name: str
    logit: float
    bias: float
    probability: float
    contributions: list[FeatureContribution]  # the predicted class's features, largest contribution first
    runner_up: int | None
    runner_up_name: str | None
    runner_up_logit: float | None
    runner_up_bias: float | None
    separating: list[SeparatingFeature]  # largest share of the margin first
    image_size: tuple[int, int]
    label: int | None = None
    label_name: str | None = None
    # Feature index -> its map upsampled to the image (H x W); only the leading features, see explain_image.
    feature_maps: dict[int, Tensor] = field(default_factory=dict, repr=False, compare=False)
    image: Tensor | None = field(default=None, repr=False, compare=False)  # 3 x H x W in [0, 1], for display

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable form (without the maps and the image)."""
        data = {k: v for k, v in self.__dict__.items() if k not in ("feature_maps", "image")}
        data["contributions"] = [asdict(c) for c in self.contributions]
        data["separating"] = [asdict(s) for s in self.separating]
        return data

    def to_json(self, path: str | Path | None = None) -> str:
        """The explanation as JSON text, also written to ``path`` when given."""
        return write_json(self.to_dict(), path)


def _class_layer(model: QSENN) -> tuple[Tensor, Tensor]:
    if model.num_classes <= 0:
        raise ValueError("the model has no class layer (num_classes=0); nothing to explain")
    return model.head.fc.weight.detach().double(), model.head.fc.bias.detach().double()


@torch.no_grad()
def feature_contributions(model: QSENN, features: Tensor) -> Tensor:
    """B x C x F contributions ``w_cj * normalised f_j`` (float64) of pooled B x F features to every logit.

    Summed over features and added to the bias they give the model's logits in eval mode (dropout off).
    """
    weight, _ = _class_layer(model)
    if features.ndim != 2 or features.shape[1] != weight.shape[1]:
        raise ValueError(
            f"features must be B x {weight.shape[1]} pooled activations (QSENNOutput.features), got "
            f"{tuple(features.shape)}"
        )
    normalized = model.head.normalize(features.detach().double())
    return normalized[:, None, :] * weight[None, :, :]


def _data_config(model: QSENN) -> dict[str, Any]:
    from timm.data import resolve_model_data_config

    return resolve_model_data_config(model)


def _to_display(model: QSENN, image: Tensor) -> Tensor:
    """Undo the input normalisation of a 3 x H x W tensor for display, in [0, 1]."""
    config = _data_config(model)
    mean = torch.tensor(config["mean"], dtype=torch.float32)[:, None, None]
    std = torch.tensor(config["std"], dtype=torch.float32)[:, None, None]
    image = image.detach().float().cpu()
    if image.shape[0] != mean.shape[0]:
        return image.mean(dim=0, keepdim=True).expand(3, -1, -1).clamp(0, 1)
    return (image * std + mean).clamp(0, 1)


def _as_batch(model: QSENN, image: Any, transform: Any | None) -> Tensor:
    if isinstance(image, Tensor):
        if image.ndim == 3:
            image = image.unsqueeze(0)
        if image.ndim != 4 or image.shape[0] != 1:
            raise ValueError(
                f"explain_image takes one image: a C x H x W or 1 x C x H x W tensor, got {tuple(image.shape)}"
            )
        return image
    if transform is None:
        from timm.data import create_transform

        transform = create_transform(**_data_config(model), is_training=False)
    if hasattr(image, "convert"):
        image = image.convert("RGB")
    return transform(image).unsqueeze(0)


def _peak(feature_map: Tensor, height: int, width: int) -> tuple[int, int]:
    """The map's maximum as the centre of its cell in input-image pixels."""
    rows, cols = feature_map.shape
    flat = int(feature_map.flatten().argmax())
    row, col = divmod(flat, cols)
    return int((row + 0.5) * height / rows), int((col + 0.5) * width / cols)


def _upsample(maps: Tensor, height: int, width: int) -> Tensor:
    return F.interpolate(maps[None].float(), size=(height, width), mode="bilinear", align_corners=False)[0]


@torch.no_grad()
def explain_image(
    model: QSENN,
    image: Any,
    label: int | None = None,
    max_maps: int = 8,
    transform: Any | None = None,
) -> LocalExplanation:
    """Explain the model's decision for one image.

    Args:
        model: a Q-SENN model (put in eval mode for the call).
        image: a C x H x W (or 1 x C x H x W) tensor normalised as the model expects, or a PIL image, which is
            prepared with ``transform`` (default: timm's eval transform from the model's data config).
        label: the true class, recorded when given.
        max_maps: how many of the leading contributing features, and of the leading separating features, keep
            their map upsampled to the image (maps of every feature of a dense head would be large).
        transform: the transform for a PIL image.

    Contributions are computed in float64, so they add up to ``logit - bias`` to float64 rounding.
    """
    weight, bias = _class_layer(model)
    batch = _as_batch(model, image, transform).to(next(model.parameters()).device)
    was_training = model.training
    model.eval()
    try:
        out = model.forward_qsenn(batch)
    finally:
        model.train(was_training)
    height, width = batch.shape[2], batch.shape[3]
    features = out.features.detach().double().cpu()
    weight, bias = weight.cpu(), bias.cpu()
    normalized = model.head.normalize(features.to(model.head.mean.device)).double().cpu()[0]
    logits = weight @ normalized + bias
    probabilities = logits.softmax(dim=0)
    order = logits.argsort(descending=True, stable=True)
    predicted = int(order[0])
    runner_up = int(order[1]) if logits.numel() > 1 else None
    maps = out.feature_maps[0].detach().float().cpu()
    channels = model.head.selection.tolist()
    names = feature_names_of(model)
    class_names = class_names_of(model)
    raw = features[0]

    contributions = [
        FeatureContribution(
            j,
            channels[j],
            names[j],
            float(weight[predicted, j]),
            float(raw[j]),
            float(normalized[j]),
            float(weight[predicted, j] * normalized[j]),
            _peak(maps[j], height, width),
        )
        for j in weight[predicted].nonzero().flatten().tolist()
    ]
    contributions.sort(key=lambda c: (-c.contribution, c.index))
    separating: list[SeparatingFeature] = []
    if runner_up is not None:
        differs = (weight[predicted] != weight[runner_up]).nonzero().flatten().tolist()
        separating = [
            SeparatingFeature(
                j,
                channels[j],
                names[j],
                float(weight[predicted, j]),
                float(weight[runner_up, j]),
                float(normalized[j]),
                float((weight[predicted, j] - weight[runner_up, j]) * normalized[j]),
                _peak(maps[j], height, width),
            )
            for j in differs
        ]
        separating.sort(key=lambda s: (-s.margin, s.index))

    shown = [c.index for c in sorted(contributions, key=lambda c: -abs(c.contribution))[:max_maps]]
    shown += [s.index for s in sorted(separating, key=lambda s: -abs(s.margin))[:max_maps]]
    shown = sorted(set(shown))
    upsampled = _upsample(maps[shown], height, width) if shown else None
    feature_maps = {j: upsampled[i] for i, j in enumerate(shown)} if upsampled is not None else {}
    return LocalExplanation(
        predicted=predicted,
        predicted_name=class_names[predicted],
        logit=float(logits[predicted]),
        bias=float(bias[predicted]),
        probability=float(probabilities[predicted]),
        contributions=contributions,
        runner_up=runner_up,
        runner_up_name=class_names[runner_up] if runner_up is not None else None,
        runner_up_logit=float(logits[runner_up]) if runner_up is not None else None,
        runner_up_bias=float(bias[runner_up]) if runner_up is not None else None,
        separating=separating,
        image_size=(height, width),
        label=label,
        label_name=class_names[label] if label is not None else None,
        feature_maps=feature_maps,
        image=_to_display(model, batch[0]),
    )


# -- galleries of the most activating images ----------------------------------------------------------------


@dataclass
class GalleryImage:
    """One of a feature's most activating images, with the feature's heatmap laid over it."""

    index: int  # position in the loader's dataset
    label: int
    activation: float  # pooled raw activation of the feature on this image
    thumbnail: Any = field(repr=False, compare=False)  # PIL image


@dataclass
class FeatureGallery:
    """The most activating images of each used feature, highest activation first."""

    features: dict[int, list[GalleryImage]]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable form (dataset positions, labels and activations; no pixels)."""
        return {
            str(j): [{"index": g.index, "label": g.label, "activation": g.activation} for g in images]
            for j, images in self.features.items()
        }


def heatmap_overlay(image: Tensor, heat: Tensor, alpha: float = 0.6) -> Tensor:
    """A 3 x H x W image in [0, 1] with a jet-coloured heatmap blended in where ``heat`` (H x W) is high."""
    heat = heat.float()
    low, high = heat.min(), heat.max()
    heat = (heat - low) / (high - low) if high > low else torch.zeros_like(heat)
    # The jet colour map from blue (cold) through green and yellow to bright red (hot).
    colour = torch.stack([(1.5 - (3.5 * heat - c).abs()).clamp(0, 1) for c in (3, 2, 1)])
    weight = alpha * heat[None]
    return image.float() * (1 - weight) + colour * weight


def _to_pil(image: Tensor, size: int | None = None) -> Any:
    from PIL import Image

    array = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).contiguous().numpy()
    pil = Image.fromarray(array)
    if size is not None:
        pil.thumbnail((size, size))
    return pil


def _require_sequential(loader: Iterable, what: str) -> Any:
    dataset = getattr(loader, "dataset", None)
    if dataset is None or not hasattr(dataset, "__getitem__"):
        raise ValueError(f"{what} needs a DataLoader over an indexable dataset (loader.dataset[i])")
    if is_shuffled(loader):
        raise ValueError(f"{what} finds images by their position in the loader; build it with shuffle=False")
    return dataset


@torch.no_grad()
def feature_gallery(
    model: QSENN, loader: Iterable, top: int = 5, size: int = 160, progress: bool = False
) -> FeatureGallery:
    """The ``top`` most activating images of every used feature of ``model`` over an unshuffled loader.

    One pass keeps only a running top-``top`` (value, position) per feature; the chosen images are then
    reloaded from ``loader.dataset`` to draw the heatmaps, so memory does not grow with the dataset.
    """
    if top < 1:
        raise ValueError(f"top must be at least 1, got {top}")
    dataset = _require_sequential(loader, "feature_gallery")
    weight, _ = _class_layer(model)
    used = (weight != 0).any(dim=0).nonzero().flatten().tolist()
    device = next(model.parameters()).device
    values = torch.full((len(used), 0), -math.inf, dtype=torch.float64)
    positions = torch.zeros((len(used), 0), dtype=torch.long)
    seen = 0
    was_training = model.training
    model.eval()
    try:
        batches = loader
        if progress:
            from tqdm.auto import tqdm

            batches = tqdm(loader, desc="gallery", leave=False)
        for images, _ in batches:
            features = model.forward_qsenn(images.to(device)).features[:, used].double().cpu().T
            index = torch.arange(seen, seen + features.shape[1]).expand(len(used), -1)
            values, keep = torch.cat([values, features], dim=1).topk(
                min(top, values.shape[1] + features.shape[1]), dim=1
            )
            positions = torch.cat([positions, index], dim=1).gather(1, keep)
            seen += features.shape[1]
        wanted = sorted(set(positions.flatten().tolist()))
        batch_size = getattr(loader, "batch_size", None) or 16
        thumbnails: dict[tuple[int, int], Any] = {}
        labels: dict[int, int] = {}
        rows_of: dict[int, list[int]] = {p: [] for p in wanted}
        for r, row in enumerate(positions.tolist()):
            for p in row:
                rows_of[p].append(r)
        for start in range(0, len(wanted), batch_size):
            chunk = wanted[start : start + batch_size]
            items = [dataset[p] for p in chunk]
            images = torch.stack([item[0] for item in items])
            maps = model.forward_qsenn(images.to(device)).feature_maps.float().cpu()
            for p, image, item, image_maps in zip(chunk, images, items, maps):
                labels[p] = int(item[1])
                display = _to_display(model, image)
                for r in rows_of[p]:
                    heat = _upsample(image_maps[used[r]][None], *display.shape[1:])[0]
                    thumbnails[(r, p)] = _to_pil(heatmap_overlay(display, heat), size)
    finally:
        model.train(was_training)
    gallery = {
        j: [
            GalleryImage(int(p), labels[int(p)], float(v), thumbnails[(r, int(p))])
            for v, p in zip(values[r].tolist(), positions[r].tolist())
        ]
        for r, j in enumerate(used)
    }
    return FeatureGallery(gallery)


# -- figures (matplotlib, optional) --------------------------------------------------------------------------


def _figure_class() -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("figures need matplotlib, the optional 'plot' extra: pip install 'timm-qsenn[plot]'") from e
    return Figure


def _image_array(image: Tensor) -> Any:
    return image.clamp(0, 1).permute(1, 2, 0).numpy()


def plot_explanation(explanation: LocalExplanation, top: int = 4, bars: int = 10) -> Any:
    """A matplotlib figure: the image, the heatmaps of its ``top`` strongest features, and contribution bars."""
    if explanation.image is None:
        raise ValueError("the explanation carries no image; create it with explain_image")
    Figure = _figure_class()
    shown = [c for c in explanation.contributions if c.index in explanation.feature_maps][:top]
    columns = 1 + max(len(shown), 1)
    fig = Figure(figsize=(2.6 * columns, 6.2), layout="constrained")
    grid = fig.add_gridspec(2, columns, height_ratios=[1.1, 1])
    ax = fig.add_subplot(grid[0, 0])
    ax.imshow(_image_array(explanation.image))
    truth = f"\ntrue: {explanation.label_name}" if explanation.label_name is not None else ""
    ax.set_title(f"{explanation.predicted_name} ({100 * explanation.probability:.1f} %){truth}", fontsize=9)
    ax.axis("off")
    for i, c in enumerate(shown):
        ax = fig.add_subplot(grid[0, 1 + i])
        ax.imshow(_image_array(heatmap_overlay(explanation.image, explanation.feature_maps[c.index])))
        ax.set_title(f"{c.name}\n{c.contribution:+.2f}", fontsize=8)
        ax.axis("off")
    half = max(columns // 2, 1)
    _bar_panel(
        fig.add_subplot(grid[1, :half] if columns > 1 else grid[1, 0]),
        [(c.name, c.contribution) for c in explanation.contributions[:bars]],
        f"contributions to {explanation.predicted_name} (bias {explanation.bias:+.2f})",
    )
    if explanation.runner_up is not None and columns > 1:
        _bar_panel(
            fig.add_subplot(grid[1, half:]),
            [(s.name, s.margin) for s in explanation.separating[:bars]],
            f"{explanation.predicted_name} vs {explanation.runner_up_name}",
        )
    return fig


def _bar_panel(ax: Any, items: Sequence[tuple[str, float]], title: str) -> None:
    names = [name for name, _ in items][::-1]
    values = [value for _, value in items][::-1]
    ax.barh(range(len(values)), values, color=["#2b7bba" if v >= 0 else "#d7301f" for v in values])
    ax.set_yticks(range(len(values)), names, fontsize=7)
    ax.axvline(0, color="black", linewidth=0.6)
    ax.set_title(title, fontsize=9)
    ax.tick_params(axis="x", labelsize=7)


def plot_class_sheet(model: QSENN, class_index: int, gallery: FeatureGallery | None = None) -> Any:
    """A matplotlib figure of one class: its features with signs, the other classes using each, and examples.

    With a :func:`feature_gallery` every feature row shows its most activating images; without one the
    sheet is a bar chart of the class's weights.
    """
    explanation = global_explanation(model)
    if not 0 <= class_index < len(explanation.classes):
        raise ValueError(f"class_index must lie in [0, {len(explanation.classes)}), got {class_index}")
    Figure = _figure_class()
    cls = explanation.classes[class_index]
    class_names = class_names_of(model)
    if gallery is None:
        fig = Figure(figsize=(6, 1 + 0.35 * max(len(cls.features), 1)), layout="constrained")
        _bar_panel(fig.add_subplot(), [(f.name, f.weight) for f in cls.features], f"class {cls.name}")
        return fig
    images = max((len(gallery.features.get(f.index, [])) for f in cls.features), default=0)
    rows = max(len(cls.features), 1)
    fig = Figure(figsize=(3.2 + 1.4 * images, 1.5 * rows + 0.4), layout="constrained")
    fig.suptitle(f"class {cls.name}: {len(cls.features)} features", fontsize=10)
    grid = fig.add_gridspec(rows, 1 + max(images, 1), width_ratios=[2.3] + [1] * max(images, 1))
    for row, use in enumerate(cls.features):
        others = [class_names[c] for c in explanation.feature_classes[use.index] if c != class_index]
        ax = fig.add_subplot(grid[row, 0])
        ax.axis("off")
        shared = ", ".join(others[:4]) + (" ..." if len(others) > 4 else "")
        ax.text(
            0,
            0.5,
            f"{'+' if use.sign > 0 else '-'} {use.name}\nweight {use.weight:+.3f}\nalso: {shared or 'no other class'}",
            fontsize=8,
            va="center",
            color="#2b7bba" if use.sign > 0 else "#d7301f",
        )
        for col, example in enumerate(gallery.features.get(use.index, [])):
            ax = fig.add_subplot(grid[row, 1 + col])
            ax.imshow(example.thumbnail)
            ax.set_title(f"{class_names[example.label]}\n{example.activation:.2f}", fontsize=6)
            ax.axis("off")
    return fig


# -- static HTML report --------------------------------------------------------------------------------------

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
