"""Ternary quantisation of a sparse class layer, the Q-SENN bias rule, and the packed 2-bit format of a layer.

Implements section 1.7 of the Q-SENN method: the ``n_per_class * num_classes`` largest-magnitude weights are
kept under one global budget, every kept weight becomes ``+a`` or ``-a`` with one global magnitude ``a``
(the mean magnitude of the kept weights), and the bias is set from each class's net count of positive weights.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "TernaryWeights",
    "quantize_ternary",
    "ternary_bias",
    "pack_ternary",
    "unpack_ternary",
    "pack_layer",
    "unpack_layer",
    "PACKED_FORMAT",
    "PACKED_FORMAT_VERSION",
    "PACKED_SUFFIXES",
]

PACKED_FORMAT = "qsenn-ternary-2bit"
PACKED_FORMAT_VERSION = 1
# A packed layer ``<name>`` replaces ``<name>.weight`` by these tensors: the 2-bit codes, their shape, the one
# magnitude and the format version. Its bias stays ``<name>.bias``.
PACKED_SUFFIXES = ("weight_packed", "weight_shape", "weight_scale", "weight_format_version")

# 2-bit code of each ternary value; 3 is never written and is rejected on unpacking.
_CODE_OF = {0: 0, 1: 1, -1: 2}


@dataclass(frozen=True)
class TernaryWeights:
    """A quantised class layer: ``weight == scale * codes`` with ``codes`` in {-1, 0, +1}."""

    codes: Tensor  # int8, C x F
    scale: float
    threshold: float

    @property
    def weight(self) -> Tensor:
        """The ternary weight matrix in float32."""
        return self.codes.to(torch.float32) * self.scale

    @property
    def nnz(self) -> int:
        """Number of non-zero weights."""
        return int(self.codes.count_nonzero())


def _check_matrix(weight: Tensor) -> None:
    if weight.ndim != 2:
        raise ValueError(f"weight must be a 2-D (classes x features) matrix, got shape {tuple(weight.shape)}")
    if not torch.isfinite(weight).all():
        raise ValueError("weight contains NaN or inf; quantise the result of a converged sparse fit")


def quantize_ternary(
    weight: Tensor,
    n_per_class: float = 5,
    exact_per_class: bool = False,
    binary: bool = False,
) -> TernaryWeights:
    """Quantise a (sparse) class layer to {-a, 0, +a} under a budget of ``n_per_class`` weights per class.

    Args:
        weight: C x F real weights, usually the weakest-regularised solution of the elastic-net path.
        n_per_class: average number of weights per class; the global budget is ``K = floor(n_per_class * C)``,
            as in the reference (computed so that float representation cannot cost a weight: 0.29 x 100 keeps 29).
        exact_per_class: keep exactly ``n_per_class`` weights in every class (QPM-style) instead of a global
            budget. Every class then needs at least that many non-zero weights.
        binary: keep only positive weights, giving assignments in {0, a} (QPM-style non-negative layer).

    The global rule keeps the entries whose magnitude exceeds ``tau``, the midpoint between the K-th and
    (K+1)-th largest non-zero magnitudes, so entries tied at the boundary are all dropped and the layer never
    has more than K non-zeros. Two deviations from the reference implementation, both fixes:

    * the reference bucketises against ``[-max, -tau, tau, max]``, which flips the sign of the single
      largest-magnitude weight when it is negative and leaves it out of ``a``; here every kept weight keeps
      its sign and counts towards ``a``;
    * when the budget is at least the number of non-zeros the reference sets ``tau`` to the smallest non-zero
      magnitude and so still drops that weight; here all non-zeros are kept.
    """
    _check_matrix(weight)
    num_classes, num_features = weight.shape
    if n_per_class <= 0:
        raise ValueError(f"n_per_class must be positive, got {n_per_class}")
    w = weight.detach().to(torch.float64)
    candidates = w.clamp(min=0) if binary else w
    mag = candidates.abs()
    if mag.count_nonzero() == 0:
        kind = "positive" if binary else "non-zero"
        raise ValueError(f"weight has no {kind} entries to keep; the sparse fit returned an empty layer")

    if exact_per_class:
        k = int(n_per_class)
        if k != n_per_class:
            raise ValueError(f"exact_per_class needs an integer n_per_class, got {n_per_class}")
        if k > num_features:
            raise ValueError(
                f"impossible budget: exact_per_class asks for {k} weights per class but the layer has only "
                f"{num_features} features; lower n_per_class or select more features"
            )
        short = (mag > 0).sum(dim=1) < k
        if short.any():
            bad = short.nonzero().flatten().tolist()
            raise ValueError(
                f"impossible budget: classes {bad[:10]}{'...' if len(bad) > 10 else ''} have fewer than {k} "
                "candidate weights; fit the path with weaker regularisation or lower n_per_class"
            )
        top = mag.topk(k, dim=1)
        keep = torch.zeros_like(mag, dtype=torch.bool).scatter_(1, top.indices, True)
        threshold = float(top.values[:, -1].min())
    else:
        # A hair above the product, so that e.g. 0.29 * 100 = 28.999999999999996 floors to 29.
        budget = math.floor(n_per_class * num_classes + 1e-9)
        if budget >= num_classes * num_features:
            warnings.warn(
                f"the budget of {budget} weights (n_per_class={n_per_class} x {num_classes} classes) is at least the "
                f"{num_classes * num_features} weights of a {num_classes} x {num_features} layer: every non-zero "
                "weight is kept; lower n_per_class or select more features",
                stacklevel=2,
            )
        if budget < 1:
            raise ValueError(
                f"impossible budget: n_per_class={n_per_class} with {num_classes} classes keeps no weight; "
                "n_per_class * num_classes must be at least 1"
            )
        values = mag[mag > 0].sort(descending=True).values
        if budget < values.numel():
            threshold = float((values[budget - 1] + values[budget]) / 2)
        else:
            threshold = 0.0
        keep = mag > threshold
        if not keep.any():
            raise ValueError(
                f"impossible budget: all of the {values.numel()} largest weights tie at the boundary of the "
                f"{budget}-weight budget; raise n_per_class"
            )

    scale = float(mag[keep].mean())
    codes = torch.where(keep, torch.sign(candidates), torch.zeros_like(candidates)).to(torch.int8)
    return TernaryWeights(codes=codes.to(weight.device), scale=scale, threshold=threshold)


def ternary_bias(codes: Tensor, dense_bias: Tensor) -> Tensor:
    """Q-SENN bias rule: the class with the fewest net positive weights gets +B, the most gets -B.

    ``B = max |dense_bias|`` and the bias is linear in each class's net count ``#pos - #neg`` in between.
    When every class has the same net count the reference divides by zero and returns NaN; here every class
    gets bias 0, the only choice that does not favour a class.
    """
    if codes.ndim != 2 or dense_bias.ndim != 1 or codes.shape[0] != dense_bias.shape[0]:
        raise ValueError(
            f"codes must be C x F and dense_bias of length C, got {tuple(codes.shape)} and {tuple(dense_bias.shape)}"
        )
    if not torch.isfinite(dense_bias).all():
        raise ValueError("dense_bias contains NaN or inf")
    signs = torch.sign(codes.to(torch.float64))
    net = (signs > 0).sum(dim=1) - (signs < 0).sum(dim=1)
    spread = net - net.min()
    span = int(spread.max())
    bound = float(dense_bias.abs().max())
    if span == 0:
        return torch.zeros_like(dense_bias, dtype=torch.float32)
    bias = (bound - spread.to(torch.float64) * (2 * bound / span)).clamp(-bound, bound)
    return bias.to(device=dense_bias.device, dtype=torch.float32)


def pack_ternary(codes: Tensor) -> Tensor:
    """Pack ternary codes {-1, 0, +1} into a flat uint8 tensor, four codes per byte (first code in bits 0-1)."""
    flat = codes.detach().reshape(-1).to(torch.int16).cpu()
    if flat.numel() and not ((flat >= -1) & (flat <= 1)).all():
        raise ValueError("codes must contain only -1, 0 and +1")
    two_bit = torch.where(flat < 0, torch.full_like(flat, _CODE_OF[-1]), flat).to(torch.uint8)
    pad = (-two_bit.numel()) % 4
    two_bit = torch.cat([two_bit, two_bit.new_zeros(pad)]).view(-1, 4)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8)
    return (two_bit << shifts).sum(dim=1, dtype=torch.uint8)


def unpack_ternary(packed: Tensor, shape: tuple[int, ...] | list[int]) -> Tensor:
    """Undo :func:`pack_ternary`: return int8 codes of the given shape."""
    shape = tuple(int(s) for s in shape)
    count = 1
    for s in shape:
        count *= s
    if packed.dtype != torch.uint8 or packed.ndim != 1:
        raise ValueError(f"packed codes must be a 1-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    if packed.numel() != (count + 3) // 4:
        raise ValueError(
            f"packed codes hold {packed.numel()} bytes but shape {shape} needs {(count + 3) // 4}; "
            "the file is truncated or the shape is wrong"
        )
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=packed.device)
    two_bit = ((packed.unsqueeze(1) >> shifts) & 3).reshape(-1)[:count]
    if (two_bit == 3).any():
        raise ValueError("packed codes contain the invalid 2-bit value 3; the data is corrupt")
    codes = torch.where(two_bit == _CODE_OF[-1], torch.full_like(two_bit, 255), two_bit).view(torch.int8)
    return codes.reshape(shape)


def pack_layer(state_dict: dict[str, Tensor], layer: str, codes: Tensor, scale: float) -> dict[str, Tensor]:
    """A copy of ``state_dict`` whose ``<layer>.weight`` (``scale * codes``) is stored packed (see PACKED_SUFFIXES)."""
    packed = {k: v for k, v in state_dict.items() if k != f"{layer}.weight"}
    values = (
        pack_ternary(codes),
        torch.tensor(list(codes.shape), dtype=torch.int64),
        torch.tensor(scale, dtype=torch.float32),
        torch.tensor(PACKED_FORMAT_VERSION, dtype=torch.int64),
    )
    packed.update({f"{layer}.{suffix}": value for suffix, value in zip(PACKED_SUFFIXES, values)})
    return packed


def unpack_layer(state_dict: dict[str, Tensor], layer: str) -> dict[str, Tensor]:
    """Replace a packed ``<layer>`` in ``state_dict`` by a float32 ``<layer>.weight``, in place; returns the dict.

    A state dict without the packed keys is returned unchanged.
    """
    keys = [f"{layer}.{suffix}" for suffix in PACKED_SUFFIXES]
    if keys[0] not in state_dict:
        return state_dict
    missing = [k for k in keys if k not in state_dict]
    if missing:
        raise ValueError(f"packed ternary class layer {layer!r} is incomplete, missing {missing}; the file is damaged")
    packed, shape, scale, version = (state_dict.pop(k) for k in keys)
    if int(version) != PACKED_FORMAT_VERSION:
        raise ValueError(
            f"packed ternary class layer {layer!r} uses format version {int(version)}, this timm_qsenn reads "
            f"version {PACKED_FORMAT_VERSION}; upgrade timm_qsenn to load it"
        )
    codes = unpack_ternary(packed, shape.tolist())
    state_dict[f"{layer}.weight"] = codes.to(torch.float32) * scale.to(torch.float32)
    return state_dict
