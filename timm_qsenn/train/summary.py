"""What a run reports: the one-screen summary, the config for trackers, and a warning about a dense model near
chance."""

from __future__ import annotations

import logging
from typing import Any

from .._utils import flatten_dict

__all__ = ["format_summary", "tracker_config", "warn_if_near_chance"]

_logger = logging.getLogger(__name__)


def tracker_config(tree: dict[str, Any]) -> dict[str, Any]:
    """A config flattened for trackers, which accept only scalars."""
    return {k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in flatten_dict(tree).items()}


def warn_if_near_chance(accuracy: float | None, num_classes: int) -> None:
    """Q-SENN selects and quantises the dense model's features: a dense model that learned little dooms it."""
    if accuracy is not None and accuracy < 1.5 / num_classes:
        _logger.warning(
            "the dense model reaches %.1f %% test accuracy, close to chance (%.1f %%); the Q-SENN features come from "
            "it, so expect a poor result: train it longer (dense.epochs, dense.lr) or check the data",
            100 * accuracy,
            100 / num_classes,
        )


def format_summary(summary: dict[str, Any]) -> str:
    """The one-screen summary printed at the end of a run."""

    def pct(value: float | None) -> str:
        return "n/a" if value is None else f"{100 * value:.2f}%"

    dense, qsenn = summary["dense_accuracy"], summary["qsenn_accuracy"]
    gap = "" if dense is None else f"  ({100 * (qsenn - dense):+.2f} points)"
    lines = [
        f"Q-SENN on {summary['backbone']} / {summary['dataset']}: {summary['num_classes']} classes, "
        f"{summary['train_images']} training and {summary['test_images']} test images",
        f"  dense accuracy      {pct(dense)}",
        f"  Q-SENN accuracy     {pct(qsenn)}{gap}",
    ]
    metrics = summary.get("metrics", {})
    used = metrics.get("num_features")
    lines += [
        f"  features            {summary['n_features']} selected"
        + ("" if used is None else f", {used} used by the class layer"),
        f"  weights per class   {summary['weights_per_class']:.2f}  (ternary, a = {summary['scale']:.4g})",
    ]
    k = metrics.get("k", 5)
    shown = {
        "diversity_at_k": f"diversity@{k}",
        "sid_at_k": f"SID@{k}",
        "dependence": "dependence",
        "class_independence": "class-independence",
        "contrastiveness": "contrastiveness",
    }
    values = [f"{label} {metrics[key]:.3f}" for key, label in shown.items() if metrics.get(key) is not None]
    if values:
        lines.append("  interpretability    " + ", ".join(values))
    seconds = summary["seconds"]
    phases = ", ".join(f"{k} {v:.0f}s" for k, v in seconds.items() if k != "total")
    lines.append(f"  time                {seconds['total']:.0f}s  ({phases})")
    return "\n".join(lines)
