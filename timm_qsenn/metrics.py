"""Accuracy, sparsity and the interpretability metrics of the Q-SENN family: tensor functions and one driver.

Every metric is a plain function over tensors (section 2 of the method notes). :func:`evaluate` runs them all
over data loaders with bounded memory: feature maps are reduced to per-image scores batch by batch, and the
metrics over a whole split keep streaming sums (class masses, a Gram matrix, attribute contrasts) plus a capped
random sample of pooled features for the Gaussian mixtures. Nothing the size of a dataset's maps is ever held.

Conventions, and where they differ from the reference code:

* ``diversity_at_k`` is Q-SENN's diversity@k (plain spatial softmax); ``sid_at_k`` is QPM's SID@k (each map
  divided by its mean absolute value first). Their values are not comparable with each other.
* Both average over **every** test image whose predicted class has at least ``k`` non-zero weights. The
  reference bounds its loop by the training-set length (``floor(len(train) / 300)`` blocks of 300 test
  images), which drops the tail of the test set (94 of CUB's 5794 images); that is a bug, fixed here as in
  CHiQPM.
* The ``k`` features of a class are its ``k`` largest **signed** weights, as in the reference: a class with
  fewer than ``k`` positive weights gets zero-weight features of other classes ahead of its negative ones.
  Ties are broken by feature index (a stable sort), where the reference's ``topk`` leaves them unspecified.
* Only features with a non-zero weight in some class take part (the reference's "relevant features").
* Dependence uses the raw pooled features, as Q-SENN does; class-independence, contrastiveness and correlation
  use the normalised features the class layer reads, as QPM does (the first two are invariant to that choice).
* Without a training loader the split-wide metrics run on the test loader; ``QSENNMetrics.feature_split`` says
  which split they describe.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from statistics import NormalDist
from typing import Any, Literal

import torch
from torch import Tensor

from ._utils import is_shuffled, read_table, write_json

__all__ = [
    "accuracy",
    "used_features",
    "num_features_used",
    "weights_per_class",
    "diversity_per_image",
    "diversity_at_k",
    "sid_at_k",
    "dependence_per_image",
    "dependence",
    "class_independence",
    "fit_gaussian_mixture_1d",
    "contrastiveness",
    "correlation",
    "alignment_matrix",
    "alignment",
    "structural_grounding",
    "AttributeLabels",
    "read_cub_attributes",
    "read_cub_class_attributes",
    "QSENNMetrics",
    "evaluate",
]

DiversityVariant = Literal["diversity", "sid"]
# Pooled features kept for the per-feature Gaussian mixtures: at most this many rows (more adds nothing to a
# 2-component fit) and values (about 80 MB of float32, for heads with thousands of features).
_MIXTURE_ROWS = 100_000
_MIXTURE_VALUES = 20_000_000
# Values per chunk of columns in one EM run, bounding its float64 temporaries.
_EM_CHUNK_VALUES = 4_000_000
_SID_EPS = 1e-5


# -- accuracy and sparsity -----------------------------------------------------------------------------------


def accuracy(logits: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy as a fraction in [0, 1], from B x C logits or B predicted class indices."""
    predictions = logits.argmax(dim=1) if logits.ndim == 2 else logits
    if predictions.shape != labels.shape:
        raise ValueError(
            f"predictions {tuple(predictions.shape)} and labels {tuple(labels.shape)} differ in shape; "
            "pass B x C logits or B class indices with B labels"
        )
    if labels.numel() == 0:
        raise ValueError("accuracy of an empty batch is undefined; pass at least one image")
    return int((predictions == labels).sum()) / labels.numel()


def _check_weight(weight: Tensor) -> None:
    if weight.ndim != 2:
        raise ValueError(f"weight must be the C x F class-layer matrix, got shape {tuple(weight.shape)}")


def used_features(weight: Tensor) -> Tensor:
    """Indices of the features (columns of the C x F class layer) that some class gives a non-zero weight."""
    _check_weight(weight)
    return (weight != 0).any(dim=0).nonzero().flatten()


def num_features_used(weight: Tensor) -> int:
    """Number of features with a non-zero weight in some class (``NFfeatures`` of the reference)."""
    return int(used_features(weight).numel())


def weights_per_class(weight: Tensor) -> float:
    """Mean number of non-zero weights per class (``PerClass`` of the reference; about n_wc for Q-SENN)."""
    _check_weight(weight)
    return int(weight.count_nonzero()) / weight.shape[0]


# -- diversity@k / SID@k -------------------------------------------------------------------------------------


def diversity_per_image(
    feature_maps: Tensor,
    predictions: Tensor,
    weight: Tensor,
    k: int = 5,
    variant: DiversityVariant = "diversity",
) -> Tensor:
    """Per-image diversity@k (``variant='diversity'``, Q-SENN) or SID@k (``'sid'``, QPM); NaN where not counted.

    For an image predicted as class c, the maps of the ``k`` features with the largest signed weights of c are
    each soft-maxed over space (SID first divides a map by its mean absolute value); the score is the sum over
    positions of their pointwise maximum, divided by ``k``. It lies in [1/k, 1]: 1/k for identical maps, 1 for
    maps whose soft-maxed mass sits at disjoint positions. Images whose class has fewer than ``k`` non-zero
    weights are not counted (NaN).
    """
    _check_weight(weight)
    if feature_maps.ndim != 4 or feature_maps.shape[1] != weight.shape[1]:
        raise ValueError(
            f"feature_maps must be B x {weight.shape[1]} x H x W (one map per class-layer feature), got "
            f"{tuple(feature_maps.shape)}"
        )
    if predictions.shape != (feature_maps.shape[0],):
        raise ValueError(f"predictions must hold one class index per image, got {tuple(predictions.shape)}")
    if k < 1:
        raise ValueError(f"k must be a positive number of features, got {k}")
    if variant not in ("diversity", "sid"):
        raise ValueError(f"variant must be 'diversity' (Q-SENN) or 'sid' (QPM), got {variant!r}")
    relevant = used_features(weight)
    scores = torch.full((feature_maps.shape[0],), math.nan, device=feature_maps.device)
    if relevant.numel() < k:
        return scores
    rows = weight.float()[:, relevant][predictions]
    eligible = (rows != 0).sum(dim=1) >= k
    if not eligible.any():
        return scores
    order = torch.sort(rows[eligible], dim=1, descending=True, stable=True).indices[:, :k]
    maps = feature_maps[eligible][:, relevant].float().flatten(2)
    top = maps.gather(1, order.unsqueeze(2).expand(-1, -1, maps.shape[2]))
    if variant == "sid":
        top = top / top.abs().mean(dim=2, keepdim=True).clamp(min=_SID_EPS)
    scores[eligible] = top.softmax(dim=2).amax(dim=1).sum(dim=1) / k
    return scores


def diversity_at_k(feature_maps: Tensor, predictions: Tensor, weight: Tensor, k: int = 5) -> float:
    """Q-SENN's diversity@k (plain spatial softmax), averaged over the counted images; NaN if none counts."""
    return _nanmean(diversity_per_image(feature_maps, predictions, weight, k, "diversity"))


def sid_at_k(feature_maps: Tensor, predictions: Tensor, weight: Tensor, k: int = 5) -> float:
    """QPM's SID@k (maps divided by their mean absolute value before the softmax), averaged over counted images."""
    return _nanmean(diversity_per_image(feature_maps, predictions, weight, k, "sid"))


def _nanmean(values: Tensor) -> float:
    finite = values[~values.isnan()]
    return float(finite.double().mean()) if finite.numel() else math.nan


# -- dependence ----------------------------------------------------------------------------------------------


def dependence_per_image(features: Tensor, predictions: Tensor, weight: Tensor) -> Tensor:
    """Per image, the largest share of one feature in the summed |f_j * w_cj| of its predicted class c."""
    _check_weight(weight)
    _check_features(features, weight.shape[1])
    contributions = (features.double() * weight.double()[predictions]).abs()
    return contributions.amax(dim=1) / contributions.sum(dim=1)


def dependence(features: Tensor, predictions: Tensor, weight: Tensor) -> float:
    """Q-SENN's Dependence: the mean largest single-feature share of the predicted logit (lower is better).

    Q-SENN passes the raw pooled features, not the normalised ones the class layer reads; images whose
    contributions are all zero are skipped, as the reference drops NaN.
    """
    return _nanmean(dependence_per_image(features, predictions, weight))


def _check_features(features: Tensor, num_features: int | None = None) -> None:
    if features.ndim != 2 or (num_features is not None and features.shape[1] != num_features):
        expected = "F" if num_features is None else str(num_features)
        raise ValueError(f"features must be an N x {expected} matrix, got shape {tuple(features.shape)}")


# -- class-independence --------------------------------------------------------------------------------------


class _ClassMass:
    """Streaming per-class sums of features, for class-independence."""

    def __init__(self, num_classes: int, num_features: int):
        self.sums = torch.zeros(num_classes, num_features, dtype=torch.float64)
        self.counts = torch.zeros(num_classes, dtype=torch.float64)
        self.minimum = torch.full((num_features,), math.inf, dtype=torch.float64)

    def update(self, features: Tensor, labels: Tensor) -> None:
        features, labels = features.detach().double().cpu(), labels.cpu().long()
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.counts.numel()):
            raise ValueError(f"labels must lie in [0, {self.counts.numel()}), got {int(labels.max())}")
        self.sums.index_add_(0, labels, features)
        self.counts += torch.bincount(labels, minlength=self.counts.numel()).double()
        self.minimum = torch.minimum(self.minimum, features.amin(dim=0))

    def compute(self) -> float:
        # Sum over class c of (f - min f) is the class's sum minus its count times the global minimum.
        mass = self.sums - self.counts[:, None] * self.minimum[None, :]
        total = mass.sum(dim=0)
        share = (mass.amax(dim=0) / total)[total > 0]
        return 1.0 - float(share.mean()) if share.numel() else math.nan


def class_independence(features: Tensor, labels: Tensor, num_classes: int | None = None) -> float:
    """QPM's Class-Independence: 1 minus the mean, over features, of the largest share one class holds.

    Each feature is shifted to a minimum of 0; a class's share is the activation mass of its ground-truth images.
    0 when every feature fires for one class only, 1 - 1/C when every class holds an equal share. Features
    that never vary are skipped.
    """
    _check_features(features)
    if labels.shape != (features.shape[0],):
        raise ValueError(f"labels must hold one class per row of features, got {tuple(labels.shape)}")
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    mass = _ClassMass(num_classes, features.shape[1])
    mass.update(features, labels)
    return mass.compute()


# -- contrastiveness -----------------------------------------------------------------------------------------


def fit_gaussian_mixture_1d(
    values: Tensor, max_iter: int = 100, tol: float = 1e-3, reg_var: float = 1e-6
) -> tuple[Tensor, Tensor, Tensor]:
    """Fit a 2-component Gaussian mixture to every column of an N x F matrix by EM; (weights, means, stds).

    Each is F x 2 (float64), components ordered by mean. EM starts from a 1-D 2-means split (deterministic,
    where scikit-learn's default starts from k-means too) and stops when the mean log-likelihood of every
    column changes by less than ``tol``; ``reg_var`` is added to the variances, as scikit-learn's ``reg_covar``.
    """
    _check_features(values)
    if values.shape[0] < 2:
        raise ValueError(f"a 2-component mixture needs at least 2 values per column, got {values.shape[0]}")
    x = values.detach().double().cpu()
    # 2-means on each column: split at the midpoint of the two cluster means until the split is stable.
    lo, hi = x.amin(dim=0), x.amax(dim=0)
    centres = torch.stack([lo + (hi - lo) / 4, hi - (hi - lo) / 4], dim=1)
    upper = x > centres.mean(dim=1)
    for _ in range(100):
        resp = torch.stack([~upper, upper], dim=2).double()
        centres = (resp * x[..., None]).sum(dim=0) / resp.sum(dim=0).clamp(min=1)
        new_upper = x > centres.mean(dim=1)
        if torch.equal(new_upper, upper):
            break
        upper = new_upper
    resp = torch.stack([~upper, upper], dim=2).double()
    previous = torch.full((x.shape[1],), -math.inf, dtype=torch.float64)
    for _ in range(max_iter):
        counts = resp.sum(dim=0) + 10 * torch.finfo(torch.float64).eps
        weights = counts / x.shape[0]
        means = (resp * x[..., None]).sum(dim=0) / counts
        variances = (resp * (x[..., None] - means) ** 2).sum(dim=0) / counts + reg_var
        log_prob = (
            weights.log() - 0.5 * torch.log(2 * math.pi * variances) - (x[..., None] - means) ** 2 / (2 * variances)
        )
        log_norm = log_prob.logsumexp(dim=2, keepdim=True)
        resp = (log_prob - log_norm).exp()
        likelihood = log_norm.squeeze(2).mean(dim=0)
        if ((likelihood - previous).abs() < tol).all():
            break
        previous = likelihood
    order = means.argsort(dim=1)
    return weights.gather(1, order), means.gather(1, order), variances.gather(1, order).sqrt()


def contrastiveness(features: Tensor) -> float:
    """QPM's Contrastiveness: 1 minus the mean overlap of the two Gaussians of a per-feature 2-component mixture.

    Each feature is standardised first, which makes the score invariant to positive affine rescaling and the
    variance floor relative; a feature that never varies counts as one component (overlap 1). Near 1 for
    features that are clearly on or off, lower for features with one broad mode.
    """
    _check_features(features)
    x = features.detach().double().cpu()
    std = x.std(dim=0, unbiased=False)
    varying = std > 1e-12 * x.abs().amax(dim=0).clamp(min=1e-300)
    overlaps = torch.ones(x.shape[1], dtype=torch.float64)
    columns = varying.nonzero().flatten()
    chunk = max(1, _EM_CHUNK_VALUES // x.shape[0])
    for start in range(0, columns.numel(), chunk):
        part = columns[start : start + chunk]
        z = (x[:, part] - x[:, part].mean(dim=0)) / std[part]
        _, means, stds = fit_gaussian_mixture_1d(z)
        overlaps[part] = torch.tensor(
            [
                NormalDist(float(m[0]), float(s[0])).overlap(NormalDist(float(m[1]), float(s[1])))
                for m, s in zip(means, stds)
            ],
            dtype=torch.float64,
        )
    return 1.0 - float(overlaps.mean())


class _Sample:
    """A uniform random sample of at most ``capacity`` rows of a stream (the rows with the smallest random keys)."""

    def __init__(self, capacity: int, seed: int = 0):
        self.capacity = capacity
        self.generator = torch.Generator().manual_seed(seed)
        self.rows: Tensor | None = None
        self.keys = torch.empty(0)

    def update(self, rows: Tensor) -> None:
        rows = rows.detach().float().cpu()
        keys = torch.rand(rows.shape[0], generator=self.generator)
        if self.rows is not None:
            rows, keys = torch.cat([self.rows, rows]), torch.cat([self.keys, keys])
        if rows.shape[0] > self.capacity:
            keep = keys.topk(self.capacity, largest=False).indices.sort().values
            rows, keys = rows[keep], keys[keep]
        self.rows, self.keys = rows, keys


# -- correlation ---------------------------------------------------------------------------------------------


class _Gram:
    """Streaming Gram matrix of features, for correlation."""

    def __init__(self, num_features: int):
        self.gram = torch.zeros(num_features, num_features, dtype=torch.float64)

    def update(self, features: Tensor) -> None:
        features = features.detach().double().cpu()
        self.gram += features.T @ features

    def compute(self) -> float:
        if self.gram.shape[0] < 2:
            return math.nan
        norms = self.gram.diagonal().sqrt()
        cosine = self.gram / (norms[:, None] * norms[None, :])
        cosine.fill_diagonal_(-math.inf)
        best = cosine.nan_to_num(nan=-math.inf).amax(dim=1)
        best = best[(norms > 0) & torch.isfinite(best)]
        return float(best.mean()) if best.numel() else math.nan


def correlation(features: Tensor) -> float:
    """QPM's Correlation: the mean, over features, of the largest cosine similarity to any other feature.

    The cosine is uncentred, over the N images; on normalised (centred) features it is the Pearson correlation.
    1 when every feature has a duplicate, 0 for mutually orthogonal features (lower is better).
    """
    _check_features(features)
    gram = _Gram(features.shape[1])
    gram.update(features)
    return gram.compute()


# -- alignment with attributes -------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttributeLabels:
    """Binary attribute labels of N images (rows in dataset order), with which labels are trusted."""

    present: Tensor  # bool, N x A
    known: Tensor  # bool, N x A: labels to use (CUB: certainty "probably" or "definitely")
    names: list[str]
    image_paths: list[str] | None = None  # relative paths, e.g. "001.Black_footed_Albatross/x.jpg"

    def __post_init__(self) -> None:
        if self.present.ndim != 2 or self.present.shape != self.known.shape:
            raise ValueError(
                f"present and known must be N x A matrices of one shape, got {tuple(self.present.shape)} and "
                f"{tuple(self.known.shape)}"
            )
        if len(self.names) != self.present.shape[1]:
            raise ValueError(f"{len(self.names)} attribute names for {self.present.shape[1]} attribute columns")
        if self.image_paths is not None and len(self.image_paths) != self.present.shape[0]:
            raise ValueError(f"{len(self.image_paths)} image paths for {self.present.shape[0]} rows")

    @classmethod
    def from_matrix(cls, present: Tensor, names: Sequence[str] | None = None) -> AttributeLabels:
        """Labels from an N x A 0/1 matrix, all of them trusted."""
        present = present.bool()
        names = list(names) if names is not None else [f"attribute {a}" for a in range(present.shape[1])]
        return cls(present, torch.ones_like(present), names)

    def __len__(self) -> int:
        return self.present.shape[0]

    def subset(self, image_paths: Sequence[str | Path]) -> AttributeLabels:
        """The rows of the given images, in that order, matched by their last two path parts (class/file)."""
        if self.image_paths is None:
            raise ValueError("these attribute labels carry no image paths; read them with read_cub_attributes")
        row_of = {_path_key(p): i for i, p in enumerate(self.image_paths)}
        missing = [str(p) for p in image_paths if _path_key(p) not in row_of]
        if missing:
            raise ValueError(
                f"{len(missing)} images have no attribute labels, e.g. {missing[:3]}; pass paths of the same "
                "dataset (matched by class folder and file name)"
            )
        rows = torch.tensor([row_of[_path_key(p)] for p in image_paths], dtype=torch.long)
        return replace(
            self,
            present=self.present[rows],
            known=self.known[rows],
            image_paths=[self.image_paths[i] for i in rows.tolist()],
        )


def _path_key(path: str | Path) -> str:
    return "/".join(Path(path).parts[-2:])


class _AttributeContrast:
    """Streaming per-attribute sums of features over images with and without each attribute."""

    def __init__(self, num_features: int, num_attributes: int):
        shape = (num_features, num_attributes)
        self.present_sum = torch.zeros(shape, dtype=torch.float64)
        self.absent_sum = torch.zeros(shape, dtype=torch.float64)
        self.present_count = torch.zeros(num_attributes, dtype=torch.float64)
        self.absent_count = torch.zeros(num_attributes, dtype=torch.float64)
        self.total = torch.zeros(num_features, dtype=torch.float64)
        self.count = 0
        self.minimum = torch.full((num_features,), math.inf, dtype=torch.float64)

    def update(self, features: Tensor, present: Tensor, known: Tensor) -> None:
        features = features.detach().double().cpu()
        with_attr = (present.bool() & known.bool()).double().cpu()
        without_attr = (~present.bool() & known.bool()).double().cpu()
        self.present_sum += features.T @ with_attr
        self.absent_sum += features.T @ without_attr
        self.present_count += with_attr.sum(dim=0)
        self.absent_count += without_attr.sum(dim=0)
        self.total += features.sum(dim=0)
        self.count += features.shape[0]
        self.minimum = torch.minimum(self.minimum, features.amin(dim=0))

    def compute(self) -> Tensor:
        difference = self.present_sum / self.present_count - self.absent_sum / self.absent_count
        scale = self.total / max(self.count, 1) - self.minimum
        matrix = difference / scale[:, None]
        matrix[:, (self.present_count == 0) | (self.absent_count == 0)] = math.nan
        matrix[~(scale > 0)] = math.nan
        return matrix


def _check_attributes(features: Tensor, present: Tensor, known: Tensor | None) -> Tensor:
    _check_features(features)
    if present.ndim != 2 or present.shape[0] != features.shape[0]:
        raise ValueError(
            f"attributes must be an N x A matrix with one row per feature row ({features.shape[0]}), got "
            f"{tuple(present.shape)}"
        )
    if known is None:
        return torch.ones_like(present, dtype=torch.bool)
    if known.shape != present.shape:
        raise ValueError(f"known must have the attributes' shape {tuple(present.shape)}, got {tuple(known.shape)}")
    return known


def alignment_matrix(features: Tensor, attributes: Tensor, known: Tensor | None = None) -> Tensor:
    """F x A normalised contrasts: mean of f_j on images with attribute a minus without, over mean(f_j - min f_j).

    Only labels where ``known`` is true count. Invariant to positive affine rescaling of each feature; NaN
    where an attribute is never (or always) present among the known labels, or a feature never varies.
    """
    known = _check_attributes(features, attributes, known)
    contrast = _AttributeContrast(features.shape[1], attributes.shape[1])
    contrast.update(features, attributes, known)
    return contrast.compute()


def _best_per_feature(matrix: Tensor) -> Tensor:
    best = matrix.nan_to_num(nan=-math.inf).amax(dim=1)
    return best[torch.isfinite(best)]


def alignment(features: Tensor, attributes: Tensor, known: Tensor | None = None) -> float:
    """Q-SENN's Alignment: the mean over features of the best normalised attribute contrast (higher is better)."""
    best = _best_per_feature(alignment_matrix(features, attributes, known))
    return float(best.mean()) if best.numel() else math.nan


# -- structural grounding ------------------------------------------------------------------------------------


def structural_grounding(weight: Tensor, class_attributes: Tensor, top: int = 50) -> float:
    """QPM's Structural Grounding: how much the most attribute-similar class pairs also share features.

    Class similarity is the cosine between rows of the class layer (model) and between class attribute vectors
    (ground truth), diagonal set to 0. Over the ``top`` largest ground-truth entries (ordered pairs, so about
    ``top / 2`` class pairs), the score is the sum of model similarities over the sum of ground-truth ones.
    1 when the class layer's rows are the attribute vectors.
    """
    _check_weight(weight)
    if class_attributes.ndim != 2 or class_attributes.shape[0] != weight.shape[0]:
        raise ValueError(
            f"class_attributes must be a C x A matrix with one row per class ({weight.shape[0]}), got "
            f"{tuple(class_attributes.shape)}"
        )
    if top < 1 or top > weight.shape[0] * (weight.shape[0] - 1):
        raise ValueError(f"top must lie in [1, C * (C - 1)] = [1, {weight.shape[0] * (weight.shape[0] - 1)}]")
    model_sim = _cosine_without_diagonal(weight.detach().double().cpu())
    truth_sim = _cosine_without_diagonal(class_attributes.double().cpu())
    values, indices = truth_sim.flatten().topk(top)
    return float(model_sim.flatten()[indices].sum() / values.sum())


def _cosine_without_diagonal(rows: Tensor) -> Tensor:
    unit = torch.nn.functional.normalize(rows, dim=1)
    return (unit @ unit.T).fill_diagonal_(0)


# -- CUB-200-2011 attribute files ----------------------------------------------------------------------------


def _cub_root(root: str | Path) -> Path:
    root = Path(root).expanduser()
    for candidate in (root, root / "CUB_200_2011"):
        if (candidate / "attributes" / "image_attribute_labels.txt").is_file():
            return candidate
    raise FileNotFoundError(
        f"no CUB-200-2011 attribute files under {root}: expected attributes/image_attribute_labels.txt; pass the "
        "CUB_200_2011 folder of the official archive"
    )


def _cub_attribute_names(root: Path, count: int) -> list[str]:
    for path in (root / "attributes" / "attributes.txt", root / "attributes.txt", root.parent / "attributes.txt"):
        if path.is_file():
            names = [line.split(maxsplit=1)[1] for line in path.read_text().splitlines() if line.strip()]
            if len(names) == count:
                return names
    return [f"attribute {a + 1}" for a in range(count)]


def read_cub_attributes(
    root: str | Path, split: Literal["train", "test"] | None = "train", min_certainty: int = 3
) -> AttributeLabels:
    """CUB-200-2011's per-image attribute labels, trusted where certainty >= ``min_certainty``, in image-id order.

    ``root`` is the ``CUB_200_2011`` folder (``images.txt``, ``train_test_split.txt``,
    ``attributes/image_attribute_labels.txt``). Certainty 3 and 4 are "probably" and "definitely"; certainty
    1 ("not visible") and 2 ("guessing") are dropped, as in the reference. A few lines of the official file
    carry an extra column; only the first four are read. Rows are in image-id order, which is not the order
    of an ImageFolder over ``images/``: use :meth:`AttributeLabels.subset` with the dataset's paths.
    """
    if not 1 <= min_certainty <= 4:
        raise ValueError(f"min_certainty must be a CUB certainty id in 1..4, got {min_certainty}")
    root = _cub_root(root)
    images = read_table(root / "images.txt")
    paths = {int(row[0]): row[1] for row in images}
    ids = sorted(paths)
    if split is not None:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train', 'test' or None, got {split!r}")
        is_train = {int(row[0]): row[1] == "1" for row in read_table(root / "train_test_split.txt")}
        ids = [i for i in ids if is_train[i] == (split == "train")]
    labels = []
    with open(root / "attributes" / "image_attribute_labels.txt") as f:
        for line in f:
            parts = line.split(None, 4)
            if len(parts) >= 4:
                labels.append((int(parts[0]), int(parts[1]), parts[2] == "1", int(parts[3])))
    if not labels:
        raise ValueError(f"{root / 'attributes' / 'image_attribute_labels.txt'} holds no labels")
    num_attributes = max(a for _, a, _, _ in labels)
    row_of = {image_id: r for r, image_id in enumerate(ids)}
    present = torch.zeros(len(ids), num_attributes, dtype=torch.bool)
    known = torch.zeros(len(ids), num_attributes, dtype=torch.bool)
    for image_id, attribute, is_present, certainty in labels:
        row = row_of.get(image_id)
        if row is not None and certainty >= min_certainty:
            present[row, attribute - 1] = is_present
            known[row, attribute - 1] = True
    return AttributeLabels(present, known, _cub_attribute_names(root, num_attributes), [paths[i] for i in ids])


def read_cub_class_attributes(root: str | Path) -> Tensor:
    """CUB-200-2011's class attribute vectors (200 x 312, percent of images), for structural grounding."""
    path = _cub_root(root) / "attributes" / "class_attribute_labels_continuous.txt"
    rows = read_table(path)
    if len({len(r) for r in rows}) != 1:
        raise ValueError(f"{path} has rows of different lengths; it should hold one row per class")
    return torch.tensor([[float(v) for v in row] for row in rows], dtype=torch.float64)


# -- results -------------------------------------------------------------------------------------------------


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


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


# -- the driver ----------------------------------------------------------------------------------------------


class _MeanOf:
    """Streaming mean of per-image scores, skipping NaN."""

    def __init__(self) -> None:
        self.total = 0.0
        self.count = 0

    def update(self, values: Tensor) -> None:
        finite = values[~values.isnan()].double()
        self.total += float(finite.sum())
        self.count += int(finite.numel())

    def compute(self) -> float:
        return self.total / self.count if self.count else math.nan


class _SplitStatistics:
    """Everything the split-wide metrics need, accumulated batch by batch from pooled features."""

    def __init__(
        self,
        weight: Tensor,
        relevant: Tensor,
        attributes: AttributeLabels | None,
    ):
        num_classes, num_features = weight.shape[0], relevant.numel()
        self.weight = weight[:, relevant].double().cpu()
        self.relevant = relevant
        self.dependence = _MeanOf()
        self.class_mass = _ClassMass(num_classes, num_features)
        self.gram = _Gram(num_features)
        self.sample = _Sample(min(_MIXTURE_ROWS, max(1000, _MIXTURE_VALUES // max(num_features, 1))))
        self.attributes = attributes
        self.contrast = _AttributeContrast(num_features, attributes.present.shape[1]) if attributes else None
        self.count = 0

    def update(self, raw: Tensor, normalized: Tensor, predictions: Tensor, labels: Tensor) -> None:
        raw = raw[:, self.relevant].double().cpu()
        normalized = normalized[:, self.relevant].double().cpu()
        self.dependence.update(dependence_per_image(raw, predictions.cpu(), self.weight))
        self.class_mass.update(normalized, labels)
        self.gram.update(normalized)
        self.sample.update(normalized)
        if self.contrast is not None:
            rows = slice(self.count, self.count + raw.shape[0])
            if rows.stop > len(self.attributes):
                raise ValueError(
                    f"attributes have {len(self.attributes)} rows but the loader yields more images; pass one "
                    "attribute row per image of the loader, in its (unshuffled) order"
                )
            self.contrast.update(raw, self.attributes.present[rows], self.attributes.known[rows])
        self.count += raw.shape[0]

    def results(self) -> dict[str, float | None]:
        if self.contrast is not None and self.count != len(self.attributes):
            raise ValueError(
                f"attributes have {len(self.attributes)} rows but the loader yielded {self.count} images; pass "
                "one attribute row per image of the loader"
            )
        results = {
            "dependence": self.dependence.compute(),
            "class_independence": self.class_mass.compute(),
            "correlation": self.gram.compute(),
            "contrastiveness": contrastiveness(self.sample.rows) if self.count >= 2 else math.nan,
            "alignment": math.nan,
        }
        if self.contrast is not None:
            best = _best_per_feature(self.contrast.compute())
            results["alignment"] = float(best.mean()) if best.numel() else math.nan
        return {name: _finite(value) for name, value in results.items()}


def _batches(loader: Iterable, description: str, show: bool) -> Iterable:
    if not show:
        return loader
    from tqdm.auto import tqdm

    return tqdm(loader, desc=description, leave=False)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    test_loader: Iterable,
    train_loader: Iterable | None = None,
    attributes: AttributeLabels | Tensor | None = None,
    class_attributes: Tensor | None = None,
    accelerator: Any | None = None,
    k: int = 5,
    progress: bool = False,
) -> QSENNMetrics:
    """Every metric of a Q-SENN model over data loaders of ``(images, labels)`` batches, with bounded memory.

    Args:
        model: a :class:`~timm_qsenn.QSENN` (or one prepared by Accelerate).
        test_loader: test images: accuracy and diversity@k / SID@k.
        train_loader: images for the split-wide metrics (dependence, class-independence, contrastiveness,
            correlation, alignment), read with the test transform and without shuffling as in the reference.
            Without it they are computed on ``test_loader``.
        attributes: binary attributes of the images of that loader, one row per image in loader order (e.g.
            :func:`read_cub_attributes` with ``split='train'``), for alignment.
        class_attributes: C x A class attribute vectors (:func:`read_cub_class_attributes`) for structural
            grounding.
        accelerator: an ``accelerate.Accelerator`` whose prepared loaders are passed; batches are gathered
            across processes with ``gather_for_metrics``, and every process gets the same result.
        k: features per class for diversity@k and SID@k.
        progress: show progress bars (main process only).
    """
    net = accelerator.unwrap_model(model) if accelerator is not None else model
    if getattr(net, "num_classes", 0) <= 0 or not hasattr(net, "forward_qsenn"):
        raise ValueError("evaluate needs a Q-SENN model with a class layer (num_classes > 0)")
    if k < 1:
        raise ValueError(f"k must be a positive number of features, got {k}")
    if isinstance(attributes, Tensor):
        attributes = AttributeLabels.from_matrix(attributes)
    feature_loader = train_loader if train_loader is not None else test_loader
    if attributes is not None and is_shuffled(feature_loader):
        raise ValueError(
            "attributes are matched to images by position, but the loader shuffles; build it with shuffle=False"
        )
    weight = net.head.fc.weight.detach().float()
    relevant = used_features(weight).cpu()
    structural = None
    pairs = weight.shape[0] * (weight.shape[0] - 1)
    if class_attributes is not None and pairs > 0:
        structural = _finite(structural_grounding(weight, class_attributes, top=min(50, pairs)))
    device = accelerator.device if accelerator is not None else next(net.parameters()).device
    show = progress and (accelerator is None or accelerator.is_main_process)
    was_training = net.training
    net.eval()
    try:
        correct, total = 0, 0
        diversity, sid = _MeanOf(), _MeanOf()
        statistics = _SplitStatistics(weight, relevant, attributes)
        for images, labels in _batches(test_loader, "test", show):
            out, labels = _forward(net, images, labels, device, accelerator)
            predictions = out.logits.argmax(dim=1)
            div = diversity_per_image(out.feature_maps, predictions, weight, k, "diversity")
            sids = diversity_per_image(out.feature_maps, predictions, weight, k, "sid")
            predictions, labels, div, sids, features = _gather(
                accelerator, (predictions, labels, div, sids, out.features)
            )
            correct += int((predictions == labels).sum())
            total += labels.numel()
            diversity.update(div)
            sid.update(sids)
            if train_loader is None:
                statistics.update(features, net.head.normalize(features), predictions, labels)
        if train_loader is not None:
            for images, labels in _batches(train_loader, "train", show):
                out, labels = _forward(net, images, labels, device, accelerator)
                predictions = out.logits.argmax(dim=1)
                predictions, labels, features = _gather(accelerator, (predictions, labels, out.features))
                statistics.update(features, net.head.normalize(features), predictions, labels)
    finally:
        net.train(was_training)
    if total == 0:
        raise ValueError("test_loader yielded no images")
    return QSENNMetrics(
        accuracy=correct / total,
        num_images=total,
        num_features=int(relevant.numel()),
        weights_per_class=weights_per_class(weight),
        stage=net.head.stage,
        k=k,
        diversity_at_k=_finite(diversity.compute()),
        sid_at_k=_finite(sid.compute()),
        diversity_images=diversity.count,
        structural_grounding=structural,
        feature_split="train" if train_loader is not None else "test",
        num_feature_images=statistics.count,
        **statistics.results(),
    )


def _forward(net: Any, images: Tensor, labels: Tensor, device: torch.device, accelerator: Any | None):
    images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
    if accelerator is None:
        return net.forward_qsenn(images), labels
    # forward_qsenn bypasses the autocast that Accelerate wraps around forward.
    with accelerator.autocast():
        return net.forward_qsenn(images), labels


def _gather(accelerator: Any | None, tensors: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    if accelerator is None:
        return tensors
    return tuple(accelerator.gather_for_metrics(tensors))
