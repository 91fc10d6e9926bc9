"""Naming Q-SENN features with human concepts, without extra supervision of the model.

The Q-SENN paper aligns features with language concepts through CLIP, but its procedure is not public (method
notes 1.11). The algorithm here is chosen to be simple, checkable and independent of where concept evidence
comes from:

1. **Evidence.** An N x K matrix saying how much each of K concepts is present in each of N images: either
   the similarities of the images to concept prompts under a CLIP-like model the user has locally
   (:func:`clip_concept_scores`), or binary annotations such as CUB's attributes (:class:`AttributeLabels`),
   where unreliable labels are masked out.
2. **Feature activations.** The pooled activation of every feature on the same images
   (:func:`pooled_features`), read from the model without changing it.
3. **Association.** For each feature and concept, the Pearson correlation across images between the feature's
   activation and the concept's evidence, over the images where the concept is labelled. It is invariant to
   positive affine rescaling of a feature (so raw and normalised features agree, and so do differently scaled
   backbones), lies in [-1, 1] whatever the evidence's scale, and for binary labels it is the point-biserial
   correlation, the effect size of Q-SENN's Alignment metric (``statistic='contrast'`` uses that metric's
   normalised mean difference instead). For CLIP, ``center_images=True`` first subtracts each image's mean
   similarity over the concepts, removing what an image says about every concept at once (its style, scale,
   quality), so that a concept is credited only for being more present than the others.
4. **Naming.** Each feature's best concept is the one with the largest correlation; its **confidence** is that
   correlation and its **margin** the gap to the next concept. A one-to-one naming maximises the summed
   correlation under the constraint that no concept names two features (an exact assignment,
   :func:`linear_assignment`, by SciPy's ``linear_sum_assignment``). Features whose confidence is below a
   threshold keep their default name, manual names override any of them, and :func:`apply_feature_names`
   stores the result in ``model.feature_names``, which every explanation, the config and the model card read.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from ._utils import write_json
from .data.attributes import AttributeLabels
from .features import pooled_features
from .metrics import alignment_matrix

__all__ = [
    "ConceptMatch",
    "FeatureNaming",
    "concept_correlation",
    "name_features",
    "name_features_from_attributes",
    "linear_assignment",
    "apply_feature_names",
    "pooled_features",
    "clip_concept_scores",
    "cub_attribute_phrase",
]


def concept_correlation(
    features: Tensor, scores: Tensor, known: Tensor | None = None, center_images: bool = False
) -> Tensor:
    """F x K Pearson correlations across images between N x F feature activations and N x K concept scores.

    Only images where ``known`` (N x K, bool) is true count for a concept. ``center_images`` subtracts each
    image's mean score over the concepts first (for CLIP similarities). NaN where a feature or a concept does
    not vary over the counted images.
    """
    if features.ndim != 2 or scores.ndim != 2 or features.shape[0] != scores.shape[0]:
        raise ValueError(
            f"features (N x F) and scores (N x K) must have one row per image, got {tuple(features.shape)} and "
            f"{tuple(scores.shape)}"
        )
    if known is not None and known.shape != scores.shape:
        raise ValueError(f"known must have the scores' shape {tuple(scores.shape)}, got {tuple(known.shape)}")
    f = features.detach().double().cpu()
    s = scores.detach().double().cpu()
    if center_images:
        s = s - s.mean(dim=1, keepdim=True)
    mask = torch.ones_like(s) if known is None else known.bool().cpu().double()
    count = mask.sum(dim=0)
    f = f - f.mean(dim=0)  # a global shift changes no correlation and keeps the sums well conditioned
    s_mean = (s * mask).sum(dim=0) / count.clamp(min=1)
    s = (s - s_mean) * mask
    mean_f = (f.T @ mask) / count
    var_f = ((f * f).T @ mask) / count - mean_f**2
    var_s = (s * s).sum(dim=0) / count
    cov = (f.T @ s) / count  # the masked scores are centred, so E[f s] - E[f] E[s] = E[f s]
    tiny = 1e-12
    scale_f = (f * f).mean(dim=0).clamp(min=1e-300)
    valid = (var_f > tiny * scale_f[:, None]) & (var_s > tiny * (s * s).mean(dim=0).clamp(min=1e-300))[None, :]
    valid &= count[None, :] >= 2
    correlation = cov / (var_f.clamp(min=0) * var_s[None, :]).sqrt()
    return torch.where(valid, correlation.clamp(-1, 1), torch.full_like(correlation, math.nan))


def linear_assignment(scores: Tensor, maximize: bool = False) -> list[tuple[int, int]]:
    """An optimal one-to-one assignment of rows to columns (Hungarian algorithm), as (row, column) pairs.

    Minimises (or with ``maximize`` maximises) the summed entries; every row is assigned when rows <= columns,
    every column otherwise. Exact (SciPy's ``linear_sum_assignment``); NaN entries count as the worst value.
    """
    if scores.ndim != 2 or 0 in scores.shape:
        raise ValueError(f"scores must be a non-empty 2-D matrix, got shape {tuple(scores.shape)}")
    cost = scores.detach().double().cpu().numpy()
    cost = -cost if maximize else cost.copy()
    # A finite stand-in worse than any assignment of finite entries: SciPy rejects NaN and may find inf infeasible.
    finite = cost[np.isfinite(cost)]
    worst = (finite.max() - finite.min() + 1) * cost.size + finite.max() if finite.size else 0.0
    cost[~np.isfinite(cost)] = worst
    rows, columns = linear_sum_assignment(cost)
    return sorted(zip(rows.tolist(), columns.tolist()))


@dataclass(frozen=True)
class ConceptMatch:
    """A feature's concept: which one, how strongly it is associated (confidence) and how distinctly (margin)."""

    feature: int
    concept: int | None
    name: str | None
    confidence: float  # the association statistic (correlation across images, in [-1, 1], by default)
    margin: float  # confidence minus that of the next best concept


@dataclass
class FeatureNaming:
    """Concept names for a model's features: the best concept of each, and a one-to-one assignment."""

    concepts: list[str]
    best: list[ConceptMatch]
    assigned: list[ConceptMatch]  # one-to-one: no concept names two features (None where concepts run out)
    statistic: str
    num_images: int
    scores: Tensor = field(repr=False, compare=False)  # F x K association matrix

    def names(
        self,
        one_to_one: bool = False,
        min_confidence: float = 0.0,
        overrides: Mapping[int, str] | None = None,
        fallback: Sequence[str] | None = None,
        unique: bool = True,
    ) -> list[str]:
        """One name per feature: its concept if confident enough, else ``fallback``; ``overrides`` win.

        Args:
            one_to_one: use the one-to-one assignment instead of each feature's best concept.
            min_confidence: features whose confidence is below this keep their fallback name.
            overrides: manual names by feature index (position in ``model.head.selection``).
            fallback: names for unnamed features (default ``feature <index>``; ``apply_feature_names`` passes
                the model's current names).
            unique: number repeated names ("red wing (2)"), since explanations list features by name.
        """
        matches = self.assigned if one_to_one else self.best
        if fallback is not None and len(fallback) != len(matches):
            raise ValueError(f"fallback needs one name per feature ({len(matches)}), got {len(fallback)}")
        overrides = dict(overrides or {})
        bad = [j for j in overrides if not 0 <= j < len(matches)]
        if bad:
            raise ValueError(f"override feature indices {bad} are outside [0, {len(matches)})")
        names = []
        for m in matches:
            if m.feature in overrides:
                names.append(overrides[m.feature])
            elif m.name is not None and m.confidence >= min_confidence:
                names.append(m.name)
            else:
                names.append(fallback[m.feature] if fallback is not None else f"feature {m.feature}")
        return _numbered(names) if unique else names

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable form (without the association matrix)."""
        return {
            "statistic": self.statistic,
            "num_images": self.num_images,
            "concepts": self.concepts,
            "best": [m.__dict__ for m in self.best],
            "assigned": [m.__dict__ for m in self.assigned],
        }

    def to_json(self, path: str | Path | None = None) -> str:
        """The naming as JSON text, also written to ``path`` when given."""
        return write_json(self.to_dict(), path)


def _numbered(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    result = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        result.append(name if seen[name] == 1 else f"{name} ({seen[name]})")
    return result


def _naming(matrix: Tensor, concepts: Sequence[str], statistic: str, num_images: int) -> FeatureNaming:
    concepts = list(concepts)
    if len(concepts) != matrix.shape[1]:
        raise ValueError(f"{len(concepts)} concept names for {matrix.shape[1]} concept columns")
    ranked = matrix.nan_to_num(nan=-math.inf)
    top = ranked.topk(min(2, ranked.shape[1]), dim=1)
    best = []
    for j in range(matrix.shape[0]):
        value = float(top.values[j, 0])
        if not math.isfinite(value):
            best.append(ConceptMatch(j, None, None, math.nan, math.nan))
            continue
        second = float(top.values[j, 1]) if top.values.shape[1] > 1 else -math.inf
        margin = value - second if math.isfinite(second) else value
        concept = int(top.indices[j, 0])
        best.append(ConceptMatch(j, concept, concepts[concept], value, margin))
    assigned_concept = dict(linear_assignment(matrix, maximize=True))
    assigned = []
    for j in range(matrix.shape[0]):
        concept = assigned_concept.get(j)
        value = float(matrix[j, concept]) if concept is not None else math.nan
        if concept is None or not math.isfinite(value):
            assigned.append(ConceptMatch(j, None, None, math.nan, math.nan))
            continue
        others = torch.cat([ranked[j, :concept], ranked[j, concept + 1 :]])
        runner = float(others.max()) if others.numel() else -math.inf
        margin = value - runner if math.isfinite(runner) else value
        assigned.append(ConceptMatch(j, concept, concepts[concept], value, margin))
    return FeatureNaming(concepts, best, assigned, statistic, num_images, matrix)


def name_features(
    features: Tensor, scores: Tensor, concepts: Sequence[str], center_images: bool = True
) -> FeatureNaming:
    """Name features from an N x K image-by-concept score matrix (e.g. CLIP similarities to concept prompts).

    ``features`` are the N x F pooled activations of the same images, in the same order (:func:`pooled_features`).
    ``center_images`` removes each image's mean score over the concepts, as suits CLIP similarities; turn it
    off for scores that are already per-concept probabilities.
    """
    matrix = concept_correlation(features, scores, center_images=center_images)
    return _naming(matrix, concepts, "correlation", features.shape[0])


def name_features_from_attributes(
    features: Tensor,
    attributes: AttributeLabels,
    statistic: Literal["correlation", "contrast"] = "correlation",
    phrase: Any | None = None,
) -> FeatureNaming:
    """Name features from binary attribute annotations of the same images (e.g. :func:`read_cub_attributes`).

    ``statistic='correlation'`` (point-biserial correlation over the trusted labels) gives confidences in
    [-1, 1]; ``'contrast'`` uses the normalised mean difference of Q-SENN's Alignment metric. ``phrase`` maps an
    attribute name to a readable one (e.g. :func:`cub_attribute_phrase`).
    """
    if features.ndim != 2 or features.shape[0] != len(attributes):
        raise ValueError(
            f"features must have one row per attribute row ({len(attributes)}), got {tuple(features.shape)}"
        )
    if statistic == "correlation":
        matrix = concept_correlation(features, attributes.present.double(), known=attributes.known)
    elif statistic == "contrast":
        matrix = alignment_matrix(features, attributes.present, attributes.known)
    else:
        raise ValueError(f"statistic must be 'correlation' or 'contrast', got {statistic!r}")
    names = [phrase(n) for n in attributes.names] if phrase is not None else attributes.names
    return _naming(matrix, names, statistic, features.shape[0])


def apply_feature_names(
    model: torch.nn.Module,
    names: FeatureNaming | Sequence[str] | Mapping[int, str],
    one_to_one: bool = False,
    min_confidence: float = 0.0,
    overrides: Mapping[int, str] | None = None,
) -> list[str]:
    """Store feature names in ``model.feature_names`` (one per selected feature); returns them.

    ``names`` is a :class:`FeatureNaming` (options as in :meth:`FeatureNaming.names`), a full list of names, or
    a mapping of feature index to name that renames only those features. ``overrides`` are manual names
    applied last.
    """
    from .explain import feature_names_of

    current = feature_names_of(model)
    if isinstance(names, FeatureNaming):
        if len(names.best) != len(current):
            raise ValueError(
                f"the naming covers {len(names.best)} features but the model has {len(current)}; name the "
                "features of this model (its selection may have changed)"
            )
        result = names.names(one_to_one, min_confidence, overrides, fallback=current)
    else:
        if isinstance(names, Mapping):
            overrides = {**dict(names), **dict(overrides or {})}
            result = list(current)
        else:
            result = list(names)
            if len(result) != len(current):
                raise ValueError(f"got {len(result)} names for {len(current)} features; give one per feature")
        for j, name in (overrides or {}).items():
            if not 0 <= j < len(result):
                raise ValueError(f"feature index {j} is outside [0, {len(result)})")
            result[j] = name
    if not all(isinstance(n, str) and n for n in result):
        raise ValueError("feature names must be non-empty strings")
    model.feature_names = result
    return result


def cub_attribute_phrase(name: str) -> str:
    """A readable phrase for a CUB attribute name: ``has_bill_shape::curved`` -> ``curved bill shape``."""
    part, _, value = name.partition("::")
    part = part.removeprefix("has_").replace("_", " ").strip()
    value = value.replace("_", " ").strip()
    return f"{value} {part}" if value else part


def clip_concept_scores(
    images: Sequence[str | Path],
    concepts: Sequence[str],
    model_path: str | Path,
    backend: Literal["transformers", "open_clip"] = "transformers",
    model_name: str | None = None,
    prompt: str = "a photo of {}.",
    batch_size: int = 32,
    device: str | torch.device = "cpu",
) -> Tensor:
    """N x K cosine similarities of images to concept prompts under a CLIP-like model stored **locally**.

    Nothing is downloaded: ``model_path`` must be a local folder (``backend='transformers'``, any model with
    ``get_image_features``/``get_text_features`` such as CLIP or SigLIP, loaded with ``local_files_only``) or a
    local checkpoint file (``backend='open_clip'``, with its architecture in ``model_name``). Each concept is
    written into ``prompt``. Pass the result to :func:`name_features` with the features of the same images.
    """
    path = Path(model_path).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"CLIP model {path} does not exist; clip_concept_scores never downloads models: save one locally "
            "first (e.g. CLIPModel.save_pretrained(folder)) and pass that folder"
        )
    if not concepts:
        raise ValueError("concepts must name at least one concept")
    prompts = [prompt.format(c) for c in concepts]
    if backend == "transformers":
        encode_images, text = _transformers_encoders(path, prompts, device)
    elif backend == "open_clip":
        if model_name is None:
            raise ValueError("backend='open_clip' needs model_name, the architecture of the checkpoint (e.g. ViT-B-32)")
        encode_images, text = _open_clip_encoders(path, model_name, prompts, device)
    else:
        raise ValueError(f"backend must be 'transformers' or 'open_clip', got {backend!r}")
    from PIL import Image

    text = torch.nn.functional.normalize(text.float(), dim=-1)
    rows = []
    for start in range(0, len(images), batch_size):
        batch = [Image.open(p).convert("RGB") for p in images[start : start + batch_size]]
        with torch.no_grad():
            embedded = torch.nn.functional.normalize(encode_images(batch).float(), dim=-1)
        rows.append((embedded @ text.T).cpu())
    if not rows:
        raise ValueError("images must list at least one image file")
    return torch.cat(rows)


def _missing(package: str) -> ImportError:
    return ImportError(
        f"clip_concept_scores with this backend needs the optional package {package!r}: pip install {package}"
    )


def _transformers_encoders(path: Path, prompts: list[str], device: str | torch.device):
    try:
        from transformers import AutoModel, AutoProcessor
    except ImportError as e:
        raise _missing("transformers") from e
    model = AutoModel.from_pretrained(str(path), local_files_only=True).to(device).eval()
    processor = AutoProcessor.from_pretrained(str(path), local_files_only=True)
    with torch.no_grad():
        tokens = processor(text=prompts, padding=True, return_tensors="pt").to(device)
        text = _embedding(model.get_text_features(**tokens))

    def encode_images(batch: list) -> Tensor:
        pixels = processor(images=batch, return_tensors="pt").to(device)
        return _embedding(model.get_image_features(**pixels))

    return encode_images, text


def _embedding(output: Any) -> Tensor:
    # Some transformers versions return a model output holding the projected embedding, not a tensor.
    if isinstance(output, Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    return pooled if isinstance(pooled, Tensor) else output[0]


def _open_clip_encoders(path: Path, model_name: str, prompts: list[str], device: str | torch.device):
    try:
        import open_clip
    except ImportError as e:
        raise _missing("open_clip_torch") from e
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=str(path), device=device)
    model.eval()
    tokenizer = open_clip.get_tokenizer(model_name)
    with torch.no_grad():
        text = model.encode_text(tokenizer(prompts).to(device))

    def encode_images(batch: list) -> Tensor:
        return model.encode_image(torch.stack([preprocess(image) for image in batch]).to(device))

    return encode_images, text
