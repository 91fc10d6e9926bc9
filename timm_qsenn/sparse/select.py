"""Choose n_f features with the group elastic-net path, admitting one new feature at a time (Q-SENN, sec. 1.5)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import random_split

from .point import solve_point
from .problem import (
    Problem,
    Solution,
    check_alpha,
    check_counts,
    check_problem,
    check_settings,
    kkt_tolerance,
    null_model,
)
from .rows import Rows
from .solver import lambda_grid

__all__ = [
    "SelectionPath",
    "selection_path",
    "fit_selection",
    "select_features",
    "split_indices",
    "local_rows",
    "shard_offsets",
    "normalize_features",
    "population_statistics",
    "check_n_features",
]

_logger = logging.getLogger(__name__)

# The reference clamps the feature std at this value before normalising for the solver.
STD_FLOOR = 1e-5


@dataclass
class SelectionPath:
    """The selected feature columns and how they entered the group path."""

    indices: Tensor  # n_f column indices, sorted (as the reference returns them)
    order: Tensor  # the same columns in the order they entered
    entry_lambdas: Tensor  # lambda at which each column of ``order`` entered (float64)
    lambda_max: float
    n_iter: int  # proximal gradient iterations over all restricted solves
    seconds: float


def split_indices(n: int, val_fraction: float = 0.1, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Train and validation row indices, split as the reference does (``random_split`` seeded by ``seed``).

    With ``val_fraction=0.1`` and 5994 rows (CUB) this gives 5395 / 599 rows; ``val_fraction=0`` keeps every
    row for training and returns an empty validation set.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction}")
    if val_fraction == 0.0:
        return torch.arange(n), torch.zeros(0, dtype=torch.int64)
    generator = torch.Generator().manual_seed(int(seed))
    train, val = random_split(range(n), [1.0 - val_fraction, val_fraction], generator=generator)
    return torch.tensor(train.indices, dtype=torch.int64), torch.tensor(val.indices, dtype=torch.int64)


def local_rows(indices: Tensor, n_total: int, row_index: Tensor) -> Tensor:
    """The positions (sorted) of this process's rows, with global indices ``row_index``, that lie in ``indices``.

    A split is drawn once over the global row order (:func:`split_indices`); each process keeps its part.
    """
    member = torch.zeros(n_total, dtype=torch.bool)
    member[indices] = True
    return member[row_index.cpu()].nonzero().flatten()


def shard_offsets(rows: Rows) -> Tensor:
    """Global indices of this process's rows when the processes hold consecutive shards in rank order."""
    if rows.world_size == 1:
        return torch.arange(rows.n)
    counts = [torch.zeros(1, dtype=torch.int64, device=rows.device) for _ in range(rows.world_size)]
    dist.all_gather(counts, torch.tensor([rows.n], device=rows.device), group=rows.process_group)
    start = int(sum(int(c) for c in counts[: dist.get_rank(rows.process_group)]))
    return torch.arange(start, start + rows.n)


def population_statistics(features: Tensor) -> tuple[Tensor, Tensor]:
    """Per-column mean and population (divide by N) standard deviation over all rows, in float64."""
    f64 = features.to(torch.float64)
    mean = f64.mean(dim=0)
    return mean, (f64 - mean).square().mean(dim=0).sqrt()


def normalize_features(
    features: Tensor, statistics: tuple[Tensor, Tensor] | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """``(features - mean) / max(std, 1e-5)`` with the mean and population std over all rows; returns all three.

    ``statistics`` are the float64 ``(mean, std)`` to use instead (e.g. over the rows of every process). The
    returned std is the clamped one, the value the solver divided by.
    """
    f64 = features.to(torch.float64)
    mean, std = population_statistics(f64) if statistics is None else statistics
    std = std.clamp_min(STD_FLOOR)
    normalized = ((f64 - mean) / std).to(features.dtype)
    return normalized, mean.to(features.dtype), std.to(features.dtype)


def check_n_features(n_features: int, num_columns: int) -> int:
    """``n_features`` as an int, checked to be a number of columns that can be selected."""
    if not 1 <= int(n_features) <= num_columns:
        raise ValueError(
            f"n_features must lie in [1, {num_columns}] (the number of feature columns), got {n_features}; "
            "select fewer features or pass more columns"
        )
    return int(n_features)


def selection_path(
    X: Tensor,
    y: Tensor,
    n_features: int = 50,
    *,
    alpha: float = 0.8,
    val_fraction: float = 0.1,
    seed: int = 0,
    n_lambdas: int = 100,
    eps: float = 1e-3,
    normalize: bool = True,
    tol: float = 1e-4,
    max_iter: int = 20000,
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
    chunk_rows: int | None = None,
    process_group: dist.ProcessGroup | None = None,
    row_index: Tensor | None = None,
) -> SelectionPath:
    """Select ``n_features`` columns of ``X`` (n x F dense features) for a sparse multinomial head.

    Follows the group elastic-net path (``alpha * sum_j ||W[:, j]||_2 + 0.5 * (1 - alpha) * ||W||^2``, alpha
    0.8) from lambda_max down a log grid and admits one column at a time: at each lambda the problem restricted
    to the selected columns is solved to its KKT conditions, then the unselected column whose gradient norm
    exceeds ``lam * alpha`` the most enters, and the same lambda is solved again, until no column wants in;
    only then does lambda decrease. Selected columns stay selected. Deterministic for a ``seed``.

    Args:
        X, y: features (raw; normalised here with the full-set mean and population std unless ``normalize``
            is False) and class indices.
        n_features: number of columns to select.
        alpha: group (L1) share of the penalty; 0.8 as in the reference.
        val_fraction, seed: the reference's 90/10 split; selection fits on the training part only.
        n_lambdas, eps: the lambda grid, from lambda_max down to ``eps * lambda_max``.
        tol, max_iter, dtype: solver settings (see :func:`~timm_qsenn.sparse.elastic_net_path`).
        progress: show a tqdm bar over the selected features.
        chunk_rows: rows per chunk of every product (see :class:`~timm_qsenn.sparse.rows.Rows`); ``X`` may be
            float16/bfloat16 or memory-mapped, and is never copied whole (it is standardised chunk by chunk).
        process_group, row_index: sharded over a ``torch.distributed`` group, ``X`` and ``y`` hold this
            process's rows, whose global indices are ``row_index`` (default: consecutive shards in rank
            order); the split is drawn over the global order and every process gets the same selection.

    Deviations from the reference implementation, chosen on purpose:

    * lambda_max is computed exactly on the normalised training split (the reference uses raw features over
      the full set, so its first point is not the all-zero solution), and there is no extra 0.1 lambda
      factor, which only skipped the top of the grid;
    * after a column enters, the same lambda is re-solved instead of restarting the sweep from lambda_max,
      so the order is the entry order of the exact group path (simultaneous entries broken by the largest
      gradient norm);
    * every point is solved full batch to the KKT conditions rather than by SAGA epochs with a
      no-progress stop, and the group prox clamps at zero (the reference flips a column whose norm is below
      the threshold).

    If the grid ends before ``n_features`` columns entered (e.g. constant or duplicated columns), the rest
    are the unselected columns with the largest gradient norm at the last point, with a warning.
    """
    start = time.perf_counter()
    alpha = check_alpha(alpha)
    X, y, num_classes = check_problem(X, y)
    n_features = check_n_features(n_features, X.shape[1])
    check_settings(dtype, tol, max_iter)
    # Read for the statistics and the class counts only: nothing to keep.
    rows = Rows(X, dtype=dtype, chunk_rows=chunk_rows, cache_bytes=0, process_group=process_group)
    if process_group is not None:
        num_classes = int(rows.amax(torch.tensor(num_classes, device=rows.device)))
    row_index = shard_offsets(rows) if row_index is None else row_index
    train = local_rows(split_indices(rows.n_total, val_fraction, seed)[0], rows.n_total, row_index).to(X.device)
    counts = rows.sum(torch.bincount(y[train], minlength=num_classes))
    check_counts(counts, name=f"the training split (val_fraction={val_fraction})")
    mean, std = rows.statistics() if normalize else (None, None)
    result = fit_selection(
        candidate_rows(X, train, (mean, std) if normalize else None, rows),
        y.index_select(0, train),
        num_classes,
        n_features,
        alpha=alpha,
        n_lambdas=n_lambdas,
        eps=eps,
        tol=tol,
        max_iter=max_iter,
        progress=progress,
    )
    result.seconds = time.perf_counter() - start
    return result


def candidate_rows(X: Tensor, train: Tensor, statistics: tuple[Tensor, Tensor] | None, like: Rows) -> Rows:
    """The training rows of ``X`` as the selection sees them: standardised on the fly with ``statistics``."""
    shift, scale = (statistics[0], statistics[1].clamp_min(STD_FLOOR)) if statistics is not None else (None, None)
    return Rows(
        X,
        index=train,
        shift=shift,
        scale=scale,
        dtype=like.dtype,
        device=like.device,
        chunk_rows=like.chunk_rows_requested,
        process_group=like.process_group,
    )


def fit_selection(
    X: Tensor | Rows,
    y: Tensor,
    num_classes: int,
    n_features: int,
    *,
    alpha: float,
    n_lambdas: int = 100,
    eps: float = 1e-3,
    tol: float = 1e-4,
    max_iter: int = 20000,
    progress: bool = False,
) -> SelectionPath:
    """:func:`selection_path` on the normalised training rows its caller validated and split (as sparsify does).

    ``X`` is finite and in the solve dtype (or :class:`~timm_qsenn.sparse.rows.Rows` of its rows), ``y`` int64
    class indices on its device with every class of ``num_classes`` present, and the caller has checked ``alpha``
    and ``n_features`` (:func:`check_n_features`).
    """
    start = time.perf_counter()
    full = Problem.build(X, y, num_classes)
    null = null_model(full, alpha, group=True)
    device = full.targets.device
    abs_tol, _ = kkt_tolerance(full, null, tol, group=True)
    lams = lambda_grid(null.lambda_max, n_lambdas, eps).tolist()

    # The selected columns' values, one column filled as each feature enters: every restricted problem is a view
    # of it, so an admission reads one column of the candidate rows, not a full pass over all of them.
    values = torch.empty(full.rows.n, n_features, dtype=full.rows.dtype, device=full.rows.device)
    # The restricted problems start with no feature column: theta holds the bias only.
    sub = full.columns(torch.zeros(0, dtype=torch.int64), values[:, :0])
    state = sub.start(null.bias)
    order: list[int] = []
    entry: list[float] = []
    total_iter = 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_features, desc="feature selection", unit="feature")
    norms = None
    for lam in lams:
        while len(order) < n_features:
            if order:
                state, n_iter, violation = solve_point(
                    sub, state, lam, alpha=alpha, group=True, tol=abs_tol, max_iter=max_iter
                )
                total_iter += n_iter
                if violation > abs_tol:
                    _logger.warning(
                        "feature selection: lambda=%.4g did not converge in %d iterations (KKT %.3g > %.3g)",
                        lam,
                        max_iter,
                        violation,
                        abs_tol,
                    )
            selected = torch.tensor(order, dtype=torch.int64, device=device)
            # Gradient norms of every column; an unselected column has zero weights, so no ridge term.
            norms = full.gradient(state, columns=selected)[:, :-1].norm(dim=0)
            norms[selected] = -1.0
            best = int(norms.argmax())
            if float(norms[best]) <= lam * alpha + abs_tol:
                break
            full.rows.gather_columns(torch.tensor([best]), out=values[:, len(order) : len(order) + 1])
            order.append(best)
            entry.append(lam)
            sub = full.columns(torch.tensor(order, device=device), values[:, : len(order)])
            if len(order) == 1:
                # Sized on the first restricted problem, not on all F columns (30 passes over every candidate
                # row); the step search adapts it from there as columns enter.
                state.step = sub.first_step()
            # The new column starts at zero (before the bias column), so held logits and probabilities stay valid.
            theta = state.theta
            theta = torch.cat([theta[:, :-1], theta.new_zeros(num_classes, 1), theta[:, -1:]], dim=1)
            state = Solution(theta, state.logits, state.probs, step=state.step)
            if bar is not None:
                bar.update(1)
        if len(order) == n_features:
            break
    if len(order) < n_features:
        rest = [j for j in norms.argsort(descending=True, stable=True).tolist() if j not in set(order)]
        missing = n_features - len(order)
        _logger.warning(
            "feature selection: the lambda grid ended after %d of %d features (constant or duplicated columns?); "
            "adding the %d unselected columns with the largest gradient norm",
            len(order),
            n_features,
            missing,
        )
        order += rest[:missing]
        entry += [0.0] * missing
    if bar is not None:
        bar.close()
    order_t = torch.tensor(order, dtype=torch.int64)
    return SelectionPath(
        indices=order_t.sort().values,
        order=order_t,
        entry_lambdas=torch.tensor(entry, dtype=torch.float64),
        lambda_max=null.lambda_max,
        n_iter=total_iter,
        seconds=time.perf_counter() - start,
    )


def select_features(X: Tensor, y: Tensor, n_features: int = 50, **kwargs) -> Tensor:
    """The ``n_features`` selected column indices, sorted; see :func:`selection_path` for the options."""
    return selection_path(X, y, n_features, **kwargs).indices
