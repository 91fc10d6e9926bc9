"""Regularisation paths of multinomial logistic regression with elastic-net and group elastic-net penalties.

The objective at strength ``lam`` is::

    mean cross-entropy(X @ W.T + b, y) + lam * (alpha * P(W) + 0.5 * (1 - alpha) * ||W||_F^2)

with ``P(W) = ||W||_1`` (elastic net) or ``P(W) = sum_j ||W[:, j]||_2`` over feature columns (group elastic
net); the bias is not penalised. Each point of the path is solved by :func:`~timm_qsenn.sparse.point.solve_point`
(full batch FISTA on the device ``X`` lives on), warm-started from an extrapolation of the previous points, and
stopped when the KKT optimality conditions hold to ``tol``. The pieces the path is built from (the problem, a
solution, the null model with lambda_max, the tolerance) are :mod:`timm_qsenn.sparse.problem`; the feature
selection is built from the same pieces.

The layout follows scikit-learn's ``enet_path``: a plain path function returning arrays, validated once at the
boundary, with thin layers (feature selection, :func:`~timm_qsenn.sparse.sparsify`) on top.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from .point import solve_point
from .problem import (
    Problem,
    Solution,
    check_alpha,
    check_problem,
    check_settings,
    fit_sums,
    kkt_tolerance,
    null_model,
)
from .rows import Rows

__all__ = ["RegPath", "lambda_max", "lambda_grid", "elastic_net_path", "objective", "kkt_violation"]

_logger = logging.getLogger(__name__)


@dataclass
class RegPath:
    """A regularisation path as plain CPU tensors, one row per lambda (strongest first)."""

    lambdas: Tensor  # K
    weights: Tensor  # K x C x F
    biases: Tensor  # K x C, centred (softmax is invariant to a common shift)
    objective: Tensor  # K, penalised training objective
    train_loss: Tensor  # K, mean training cross-entropy
    train_acc: Tensor  # K
    val_loss: Tensor  # K, NaN without validation data
    val_acc: Tensor  # K, NaN without validation data
    nnz: Tensor  # K, non-zero weights
    n_active: Tensor  # K, feature columns with a non-zero weight
    n_iter: Tensor  # K, proximal gradient iterations
    kkt: Tensor  # K, largest KKT violation at the returned solution
    converged: Tensor  # K, bool: kkt <= tol * alpha * lambda_max
    seconds: Tensor  # K, wall time of each point (the first includes the setup)
    alpha: float
    group: bool
    tol: float  # absolute KKT tolerance used for the convergence flags
    rounding: float  # measured rounding of the solver's gradient on these features (tol is at least 4x it)

    def __len__(self) -> int:
        return self.lambdas.shape[0]


# -- the objective, lambda_max and the KKT check -----------------------------------------------------------


def _penalty(weight: Tensor, lam: float, alpha: float, group: bool) -> Tensor:
    sparse = weight.norm(dim=0).sum() if group else weight.abs().sum()
    return lam * (alpha * sparse + 0.5 * (1.0 - alpha) * weight.square().sum())


def lambda_max(X: Tensor, y: Tensor, alpha: float = 0.99, group: bool = False) -> float:
    """The smallest lambda at which the all-zero weight matrix is optimal (exactly, by the KKT conditions).

    ``max_{c,j} |X^T (Y - Ybar)|_{jc} / (n * alpha)``, or with ``group`` the largest column L2 norm over
    classes; as in glm-saga, computed on the matrix as given (pass normalised features to match a fit on them).
    """
    alpha = check_alpha(alpha)
    X, y, num_classes = check_problem(X, y)
    return null_model(Problem.build(X, y, num_classes), alpha, group).lambda_max


def lambda_grid(lam_max: float, n_lambdas: int = 100, eps: float = 1e-3) -> Tensor:
    """``n_lambdas`` values log-spaced from ``lam_max`` down to ``eps * lam_max`` (float64)."""
    if n_lambdas < 1:
        raise ValueError(f"n_lambdas must be at least 1, got {n_lambdas}")
    if not 0.0 < eps <= 1.0:
        raise ValueError(f"eps must lie in (0, 1] (the ratio of the last to the first lambda), got {eps}")
    if n_lambdas == 1:
        return torch.tensor([lam_max], dtype=torch.float64)
    return torch.logspace(math.log10(lam_max), math.log10(eps * lam_max), n_lambdas, dtype=torch.float64)


def objective(
    X: Tensor, y: Tensor, weight: Tensor, bias: Tensor, lam: float, alpha: float = 0.99, group: bool = False
) -> float:
    """The penalised objective: mean cross-entropy plus the (group) elastic-net penalty on ``weight``."""
    weight = weight.to(device=X.device, dtype=X.dtype)
    bias = bias.to(device=X.device, dtype=X.dtype)
    z = torch.addmm(bias, X, weight.t())
    return float(F.cross_entropy(z, y.to(X.device)) + _penalty(weight, lam, alpha, group))


def kkt_violation(
    X: Tensor, y: Tensor, weight: Tensor, bias: Tensor, lam: float, alpha: float = 0.99, group: bool = False
) -> float:
    """Largest violation of the optimality conditions at ``(weight, bias)``; 0 at the exact solution.

    For a non-zero weight the smooth gradient plus ``lam * alpha * sign(w)`` must vanish, for a zero weight
    the gradient must lie within ``lam * alpha`` (per column L2 norms with ``group``); the bias gradient must
    vanish. Returns the largest absolute residual, in the units of the gradient.
    """
    X, y, num_classes = check_problem(X, y, weight.shape[0])
    prob = Problem.build(X, y, num_classes)
    theta = torch.cat([weight, bias[:, None]], dim=1).to(device=X.device, dtype=X.dtype)
    return prob.kkt(prob.point(theta), lam, alpha, group)[0]


# -- the path ----------------------------------------------------------------------------------------------


def _extrapolate(prob: Problem, state: Solution, prev: Solution, ratio: float) -> Solution:
    """Warm start for the next lambda: linear extrapolation of the path in log(lambda).

    Weights that are zero stay zero and weights whose sign would flip stop at zero; the path is piecewise
    smooth, so this lands much closer to the next solution than the last one does.
    """
    theta = state.theta + ratio * (state.theta - prev.theta)
    keep = theta * state.theta > 0
    keep[:, -1] = True
    theta = torch.where(keep, theta, torch.zeros_like(theta))
    return prob.point(theta, step=state.step)


def elastic_net_path(
    X: Tensor,
    y: Tensor,
    *,
    alpha: float = 0.99,
    n_lambdas: int = 100,
    eps: float = 1e-3,
    lambdas: Tensor | list[float] | None = None,
    group: bool = False,
    X_val: Tensor | None = None,
    y_val: Tensor | None = None,
    num_classes: int | None = None,
    tol: float = 1e-4,
    max_iter: int = 20000,
    dtype: torch.dtype = torch.float32,
    stop_at_nnz: int | None = None,
    progress: bool = False,
    check_input: bool = True,
    chunk_rows: int | None = None,
    process_group: dist.ProcessGroup | None = None,
) -> RegPath:
    """Fit the (group) elastic-net path of multinomial logistic regression on ``X`` (already normalised).

    Args:
        X: n x F features, on the device to solve on; y: n class indices in ``[0, num_classes)``.
        alpha: L1 (or group) share of the penalty, in (0, 1].
        n_lambdas, eps: the default path, ``n_lambdas`` values log-spaced from :func:`lambda_max` (exact: the
            first point has exactly zero weights) down to ``eps * lambda_max``. No lambda=0 point is added.
        lambdas: explicit positive lambdas instead; they are fitted in decreasing order.
        group: penalise feature columns ``W[:, j]`` by their L2 norm instead of entries by their magnitude.
        X_val, y_val: optional validation data for the loss and accuracy columns.
        num_classes: number of classes (default ``y.max() + 1``); every class must occur in ``y``.
        tol: convergence when the largest KKT violation is at most ``tol * alpha * lambda_max``, i.e. relative
            to the largest gradient of the all-zero model.
        max_iter: iterations per lambda before giving up (the point is then flagged not converged).
        dtype: solve in this dtype (float32 default, float64 for reference-grade accuracy).
        stop_at_nnz: stop after the first point with at least this many non-zero weights.
        progress: show a tqdm bar over the lambdas.
        check_input: False skips the scan of the data (as scikit-learn's ``enet_path``), for a caller that
            validated it already (:func:`~timm_qsenn.sparse.problem.check_problem`): ``X`` and ``X_val`` finite
            and in ``dtype``, ``y`` and ``y_val`` int64 class indices on ``X``'s device.
        chunk_rows: rows per chunk of every product with ``X`` (default: chunks of about 128 MiB), which bounds
            the memory a product needs; ``X`` itself may then be float16/bfloat16 or memory-mapped.
        process_group: solve over the rows of every process in this group (``torch.distributed``): ``X``,
            ``y``, ``X_val`` and ``y_val`` hold this process's shard; every process gets the same path.
    """
    start = time.perf_counter()
    alpha = check_alpha(alpha)
    check_settings(dtype, tol, max_iter)
    if check_input:
        X, y, num_classes = check_problem(X, y, num_classes)
    elif num_classes is None:
        num_classes = int(y.max()) + 1
    rows = Rows(X, dtype=dtype, chunk_rows=chunk_rows, process_group=process_group)
    if process_group is not None:
        num_classes = int(rows.amax(torch.tensor(num_classes, device=rows.device)))
    if (X_val is None) != (y_val is None):
        raise ValueError("pass both X_val and y_val, or neither")
    if X_val is not None:
        if check_input:
            X_val, y_val, _ = check_problem(X_val, y_val, num_classes, name="X_val")
        if X_val.shape[1] != X.shape[1]:
            raise ValueError(f"X_val has {X_val.shape[1]} features but X has {X.shape[1]}")
        val_rows = Rows(X_val, dtype=dtype, device=X.device, chunk_rows=chunk_rows, process_group=process_group)
        y_val = y_val.to(X.device)
        if val_rows.n_total == 0:
            val_rows = None
    else:
        val_rows = None

    prob = Problem.build(rows, y, num_classes)
    null = null_model(prob, alpha, group)
    lam_max = null.lambda_max
    if lambdas is None:
        lams = lambda_grid(lam_max, n_lambdas, eps)
    else:
        lams = torch.as_tensor(lambdas, dtype=torch.float64).flatten()
        if lams.numel() == 0 or not torch.isfinite(lams).all() or (lams <= 0).any():
            raise ValueError(
                "lambdas must be a non-empty list of positive finite values; an unpenalised fit (lambda=0) "
                "can diverge on separable data"
            )
        lams = lams.sort(descending=True).values

    abs_tol, rounding = kkt_tolerance(prob, null, tol, group)
    zero = prob.start(null.bias)
    zero.step = prob.first_step()
    state, prev = zero, None
    prev_lam = lam_max
    rows: list[dict] = []
    lam_list = lams.tolist()
    iterator = lam_list
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(lam_list, desc="elastic-net path", unit="lambda")
    for k, lam in enumerate(iterator):
        if lam >= lam_max:
            # At or above lambda_max the all-zero model is optimal exactly, so it is returned as such.
            state = prob.point(zero.theta.clone(), step=state.step)
            n_iter, violation = 0, prob.kkt(state, lam, alpha, group)[0]
        else:
            screen = None
            if state.grad is not None and not group:
                # Sequential strong rule (Tibshirani et al. 2012): a zero weight whose gradient is below
                # alpha * (2 lam - lam_prev) at the previous point very likely stays zero.
                screen = (state.grad[:, :-1].abs() > alpha * (2 * lam - prev_lam)).any(dim=1)
            start_state = state
            if prev is not None and k >= 2 and lam_list[k - 2] > prev_lam:
                ratio = min(math.log(prev_lam / lam) / math.log(lam_list[k - 2] / prev_lam), 1.0)
                start_state = _extrapolate(prob, state, prev, ratio)
            prev = state
            state, n_iter, violation = solve_point(
                prob, start_state, lam, alpha=alpha, group=group, tol=abs_tol, max_iter=max_iter, screen=screen
            )
        prev_lam = lam
        row = _summarise(prob, val_rows, y_val, state, lam, alpha, group)
        row.update(n_iter=n_iter, kkt=violation, converged=violation <= abs_tol)
        row["seconds"] = time.perf_counter() - start
        start = time.perf_counter()
        rows.append(row)
        if not row["converged"]:
            _logger.warning(
                "elastic-net path: lambda=%.4g did not converge in %d iterations (KKT violation %.3g > %.3g); "
                "raise max_iter or tol",
                lam,
                max_iter,
                violation,
                abs_tol,
            )
        _logger.debug(
            "lambda=%.4g nnz=%d acc=%.4f iters=%d kkt=%.2e", lam, row["nnz"], row["train_acc"], n_iter, violation
        )
        if stop_at_nnz is not None and row["nnz"] >= stop_at_nnz:
            break

    def column(key: str, dtype_: torch.dtype = torch.float64) -> Tensor:
        return torch.tensor([r[key] for r in rows], dtype=dtype_)

    return RegPath(
        lambdas=torch.tensor(lam_list[: len(rows)], dtype=torch.float64),
        weights=torch.stack([r["weight"] for r in rows]),
        biases=torch.stack([r["bias"] for r in rows]),
        objective=column("objective"),
        train_loss=column("train_loss"),
        train_acc=column("train_acc"),
        val_loss=column("val_loss"),
        val_acc=column("val_acc"),
        nnz=column("nnz", torch.int64),
        n_active=column("n_active", torch.int64),
        n_iter=column("n_iter", torch.int64),
        kkt=column("kkt"),
        converged=column("converged", torch.bool),
        seconds=column("seconds"),
        alpha=alpha,
        group=group,
        tol=abs_tol,
        rounding=rounding,
    )


def _summarise(
    prob: Problem,
    val_rows: Rows | None,
    y_val: Tensor | None,
    state: Solution,
    lam: float,
    alpha: float,
    group: bool,
) -> dict:
    ce, acc = prob.fit_sums(state)
    stats = [ce, _penalty(state.weight, lam, alpha, group), acc]
    if val_rows is not None:
        stats += list(fit_sums(val_rows, state.theta, y_val, prob.block_rows))
    nonzero = state.weight != 0
    stats += [nonzero.sum().to(prob.dtype), nonzero.any(dim=0).sum().to(prob.dtype)]
    values = torch.stack(stats).tolist()
    ce_v, pen_v, acc_v = values[:3]
    val_loss, val_acc = values[3:5] if val_rows is not None else (math.nan, math.nan)
    return dict(
        weight=state.weight.detach().cpu().clone(),
        # Softmax ignores a common shift of the biases; report the centred ones, the gauge glm-saga's zero start
        # keeps (its bias steps sum to zero), which the Q-SENN bias rule (max |b|) depends on.
        bias=(state.bias - state.bias.mean()).detach().cpu(),
        objective=ce_v + pen_v,
        train_loss=ce_v,
        train_acc=acc_v,
        val_loss=val_loss,
        val_acc=val_acc,
        nnz=int(values[-2]),
        n_active=int(values[-1]),
    )
