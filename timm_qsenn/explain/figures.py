"""Matplotlib figures (the optional ``plot`` extra): one image's explanation, one class's sheet."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from ..qsenn import QSENN
from .gallery import FeatureGallery
from .global_explanations import class_names_of, global_explanation
from .images import heatmap_overlay
from .local_explanations import LocalExplanation

__all__ = ["plot_explanation", "plot_class_sheet"]


def _figure_class() -> Any:
    """matplotlib's Figure class, imported on first use so that the package runs without the extra."""
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("figures need matplotlib, the optional 'plot' extra: pip install 'timm-qsenn[plot]'") from e
    return Figure


def _image_array(image: Tensor) -> Any:
    """A 3 x H x W image in [0, 1] as the H x W x 3 array ``imshow`` takes."""
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
    """Horizontal bars of signed (name, value) items, the first on top, positive blue and negative red."""
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
