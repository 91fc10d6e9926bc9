"""The results of :func:`~timm_qsenn.metrics.evaluate`: one record, as JSON and as a text table."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from .._utils import write_json

__all__ = ["QSENNMetrics"]


@dataclass
class QSENNMetrics:
    """Accuracy, sparsity and interpretability metrics of one model; NaN-free (missing values are None)."""

    accuracy: float
    num_images: int
    num_features: int
    weights_per_class: float
    stage: str
    k: int = 5
    diversity_at_k: float | None = None  # Q-SENN, plain spatial softmax
    sid_at_k: float | None = None  # QPM, maps divided by their mean absolute value first
    diversity_images: int = 0  # test images counted (predicted class has >= k non-zero weights)
    dependence: float | None = None
    class_independence: float | None = None
    contrastiveness: float | None = None
    correlation: float | None = None
    alignment: float | None = None
    structural_grounding: float | None = None
    feature_split: str = "test"  # the split the feature statistics (dependence ... alignment) come from
    num_feature_images: int = 0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable form."""
        return asdict(self)

    def to_json(self, path: str | Path | None = None) -> str:
        """The metrics as JSON text, also written to ``path`` when given."""
        return write_json(self.to_dict(), path)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QSENNMetrics:
        """Metrics from :meth:`to_dict` output; unknown keys are errors."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown metric keys {unknown}; expected keys of QSENNMetrics: {sorted(known)}")
        return cls(**data)

    def rows(self) -> list[tuple[str, str, str]]:
        """(metric, value, which way is better) rows, as in :meth:`to_table`."""
        k = self.k

        def fmt(value: float | None, digits: int = 3) -> str:
            return "n/a" if value is None else f"{value:.{digits}f}"

        return [
            ("accuracy", f"{100 * self.accuracy:.2f} %", "higher"),
            ("features used", str(self.num_features), "fewer"),
            ("weights per class", f"{self.weights_per_class:.2f}", "fewer"),
            (f"diversity@{k} (Q-SENN)", fmt(self.diversity_at_k), "higher"),
            (f"SID@{k} (QPM)", fmt(self.sid_at_k), "higher"),
            ("dependence", fmt(self.dependence), "lower"),
            ("class-independence", fmt(self.class_independence), "higher"),
            ("contrastiveness", fmt(self.contrastiveness), "higher"),
            ("correlation", fmt(self.correlation), "lower"),
            ("alignment", fmt(self.alignment), "higher"),
            ("structural grounding", fmt(self.structural_grounding), "higher"),
        ]

    def to_table(self) -> str:
        """A one-screen text table."""
        lines = [f"Q-SENN metrics: {self.stage} head, {self.num_images} test images"]
        lines += [f"  {name:<24}{value:>10}   {better} is better" for name, value, better in self.rows()]
        lines.append(
            f"  diversity over {self.diversity_images} test images; dependence to alignment over "
            f"{self.num_feature_images} {self.feature_split} images"
        )
        return "\n".join(lines)
