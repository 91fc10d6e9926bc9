"""The Q-SENN sparsification step in one call: select, fit the path, quantise, set the bias (sec. 1.5 to 1.7)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from ..ternary import TernaryWeights, quantize_ternary, ternary_bias
from .problem import check_alpha, check_counts, check_problem, check_settings
from .rows import Rows
from .select import (
    candidate_rows,
    check_n_features,
    fit_selection,
    local_rows,
    normalize_features,
    shard_offsets,
    split_indices,
)
from .solver import elastic_net_path

__all__ = ["SparseHead", "sparsify"]


@dataclass
class SparseHead:
    """A fitted sparse class layer over selected features, ready for ``QSENNHead``.

    Install it with ``head.select(sh.selection); head.set_normalization(sh.mean, sh.std);
    head.set_class_layer(sh.weight, sh.bias, ternary=sh.ternary)``.
    """

    selection: Tensor  # n_f backbone channels (int64), the columns the layer reads, in this order
    mean: Tensor  # n_f, float32, mean of the selected features over all rows
    std: Tensor  # n_f, float32, population std over all rows, clamped at 1e-5 as in the fit
    weight: Tensor  # C x n_f, float32: ternary {-a, 0, +a}, or the kept real weights with ternary=False
    bias: Tensor  # C, float32
    scale: float | None  # the ternary magnitude a; None with ternary=False
    threshold: float  # magnitude of dense_weight at or below which a weight is dropped
    ternary: bool
    dense_weight: Tensor  # C x n_f, the path solution before quantisation
    dense_bias: Tensor  # C
    selection_order: Tensor | None  # the selected channels in entry order, when selection ran
    lambdas: Tensor  # path summary, one entry per lambda (strongest first)
    nnz: Tensor
    train_acc: Tensor
    val_acc: Tensor
    seconds: dict[str, float] = field(default_factory=dict)  # wall time of "select", "path", "quantize"

    def logits(self, features: Tensor) -> Tensor:
        """Class scores of raw (unnormalised) features of the selected channels, as the head computes them."""
        normalized = (features.to(self.mean.dtype) - self.mean) / self.std
        return normalized @ self.weight.t() + self.bias


def _keep_largest(weight: Tensor, quantized: TernaryWeights) -> Tensor:
    """The real-valued weights that the ternary rule keeps (SLDD-style), zeros elsewhere."""
    return torch.where(quantized.codes != 0, weight, torch.zeros_like(weight)).to(torch.float32)


def sparsify(
    features: Tensor,
    labels: Tensor,
    *,
    n_features: int = 50,
    n_per_class: float = 5,
    selection: Tensor | list[int] | None = None,
    select_alpha: float = 0.8,
    alpha: float = 0.99,
    n_lambdas: int = 100,
    eps: float = 1e-3,
    val_fraction: float = 0.1,
    seed: int = 0,
    exact_per_class: bool = False,
    binary: bool = False,
    ternary: bool = True,
    tol: float = 1e-4,
    max_iter: int = 20000,
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
    chunk_rows: int | None = None,
    process_group: dist.ProcessGroup | None = None,
    row_index: Tensor | None = None,
) -> SparseHead:
    """One Q-SENN sparsification step on pooled features (N x F) and their labels.

    1. If ``selection`` is None the columns are backbone channels: select ``n_features`` of them with the
       one-at-a-time group path (:func:`~timm_qsenn.sparse.selection_path`, ``select_alpha``). Otherwise the
       columns already are the given channels (``len(selection) == features.shape[1]``) and nothing is
       selected; ``n_features`` is then ignored.
    2. Normalise the selected columns with their mean and population std over all rows (std clamped at 1e-5).
    3. Fit the elastic-net path (``alpha``, ``n_lambdas``, ``eps``) on the training part of the seeded
       ``val_fraction`` split and take its least-regularised solution, ``lambda = eps * lambda_max``.
    4. Quantise to {-a, 0, +a} with a budget of ``n_per_class`` weights per class and set the bias by the
       Q-SENN rule (:func:`~timm_qsenn.ternary.quantize_ternary`, :func:`~timm_qsenn.ternary.ternary_bias`).
       With ``ternary=False`` the kept weights stay real and the bias is the path's (SLDD-style; the reference
       SLDD model picks a denser path point instead of the last one).

    ``features`` may live on any device, in any floating dtype (float16/bfloat16 halve the memory) and may be
    memory-mapped; the fit runs on its device, in ``dtype``, over row chunks of ``chunk_rows`` (default about
    128 MiB each). With a ``process_group`` (``torch.distributed``) ``features`` and ``labels`` are this
    process's shard, whose global row indices are ``row_index`` (default: consecutive shards in rank order);
    the split is drawn over the global order, every sum runs over all shards, and every process returns the
    same head. The result is on the CPU.
    """
    # The one validation of the data (a full scan) and the one split; selection and path fit on its rows.
    features, labels, num_classes = check_problem(features, labels, name="features")
    num_columns = features.shape[1]
    if selection is None:
        select_alpha = check_alpha(select_alpha)
        n_features = check_n_features(n_features, num_columns)
    else:
        selection = torch.as_tensor(selection, dtype=torch.int64).flatten().cpu()
        if selection.numel() != num_columns:
            raise ValueError(
                f"selection names {selection.numel()} channels but features has {num_columns} columns; with a "
                "selection, pass the features of exactly those channels (in that order)"
            )
    alpha = check_alpha(alpha)
    check_settings(dtype, tol, max_iter)
    # Read for the statistics and the class counts only: nothing to keep.
    rows = Rows(features, dtype=dtype, chunk_rows=chunk_rows, cache_bytes=0, process_group=process_group)
    if process_group is not None:
        num_classes = int(rows.amax(torch.tensor(num_classes, device=rows.device)))
    row_index = shard_offsets(rows) if row_index is None else row_index.flatten()
    if row_index.numel() != rows.n:
        raise ValueError(
            f"row_index has {row_index.numel()} entries but features has {rows.n} rows; pass one "
            "global row index per local row"
        )
    # The one split, drawn over the global row order; each process keeps its rows of either part.
    train, val = split_indices(rows.n_total, val_fraction, seed)
    train, val = (local_rows(part, rows.n_total, row_index).to(features.device) for part in (train, val))
    counts = rows.sum(torch.bincount(labels[train], minlength=num_classes))
    check_counts(counts, name=f"the training split (val_fraction={val_fraction})")
    has_val = int(rows.sum(torch.tensor(val.numel(), device=rows.device))) > 0
    path_settings = dict(n_lambdas=n_lambdas, eps=eps, tol=tol, max_iter=max_iter, progress=progress)

    seconds: dict[str, float] = {}
    order = None
    if selection is None:
        start = time.perf_counter()
        # Selection standardises with the statistics of all rows and fits on the training rows, chunk by chunk:
        # the candidate matrix is never copied whole.
        chosen = fit_selection(
            candidate_rows(features, train, rows.statistics(), rows),
            labels.index_select(0, train),
            num_classes,
            n_features,
            alpha=select_alpha,
            **path_settings,
        )
        selection, order = chosen.indices, chosen.order
        seconds["select"] = time.perf_counter() - start
        columns = features[:, selection.to(features.device)]
    else:
        columns = features

    start = time.perf_counter()
    column_rows = Rows(columns, dtype=dtype, chunk_rows=chunk_rows, process_group=process_group)
    normalized, mean, std = normalize_features(columns.to(dtype), column_rows.statistics())
    path = elastic_net_path(
        normalized[train],
        labels[train],
        alpha=alpha,
        X_val=normalized[val] if has_val else None,
        y_val=labels[val] if has_val else None,
        num_classes=num_classes,
        dtype=dtype,
        check_input=False,
        chunk_rows=chunk_rows,
        process_group=process_group,
        **path_settings,
    )
    seconds["path"] = time.perf_counter() - start

    start = time.perf_counter()
    dense_weight, dense_bias = path.weights[-1].to(torch.float32), path.biases[-1].to(torch.float32)
    quantized = quantize_ternary(dense_weight, n_per_class, exact_per_class=exact_per_class, binary=binary)
    if ternary:
        weight, scale = quantized.weight, quantized.scale
        bias = ternary_bias(quantized.codes, dense_bias)
    else:
        weight, scale = _keep_largest(dense_weight, quantized), None
        bias = dense_bias.clone()
    seconds["quantize"] = time.perf_counter() - start

    return SparseHead(
        selection=selection.cpu(),
        mean=mean.to(device="cpu", dtype=torch.float32),
        std=std.to(device="cpu", dtype=torch.float32),
        weight=weight,
        bias=bias,
        scale=scale,
        threshold=quantized.threshold,
        ternary=ternary,
        dense_weight=dense_weight,
        dense_bias=dense_bias,
        selection_order=order,
        lambdas=path.lambdas,
        nnz=path.nnz,
        train_acc=path.train_acc,
        val_acc=path.val_acc,
        seconds=seconds,
    )
