"""Regularisation paths of multinomial logistic regression with elastic-net and group elastic-net penalties.

The objective at strength ``lam`` is::

    mean cross-entropy(X @ W.T + b, y) + lam * (alpha * P(W) + 0.5 * (1 - alpha) * ||W||_F^2)

with ``P(W) = ||W||_1`` (elastic net) or ``P(W) = sum_j ||W[:, j]||_2`` over feature columns (group elastic
net); the bias is not penalised. Each point of the path is solved full batch, on the device ``X`` lives on, by
accelerated proximal gradient (FISTA) with backtracking, a growing step size and adaptive momentum restarts,
warm-started from the previous point, and stopped when the KKT optimality conditions hold to ``tol``.

The layout follows scikit-learn's ``enet_path``: a plain path function returning arrays, validated once at the
boundary, with thin layers (feature selection, :func:`~timm_qsenn.sparse.sparsify`) on top.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

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


# -- validation --------------------------------------------------------------------------------------------


def _check_alpha(alpha: float) -> float:
    if not 0.0 < float(alpha) <= 1.0:
        raise ValueError(f"alpha must lie in (0, 1] (the L1 share of the penalty), got {alpha}")
    return float(alpha)


def _check_problem(
    X: Tensor, y: Tensor, num_classes: int | None = None, name: str = "X", dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor, int]:
    """Validate a feature matrix and its labels once; return them on one device plus the class count."""
    if not isinstance(X, Tensor) or not isinstance(y, Tensor):
        raise TypeError(f"{name} and its labels must be torch tensors, got {type(X).__name__}, {type(y).__name__}")
    if X.ndim != 2 or X.shape[0] == 0 or X.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty 2-D (samples x features) matrix, got shape {tuple(X.shape)}")
    if not X.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {X.dtype}; convert it with .float()")
    if y.ndim != 1 or y.shape[0] != X.shape[0]:
        raise ValueError(
            f"labels for {name} must be a 1-D tensor with one entry per row ({X.shape[0]}), got shape {tuple(y.shape)}"
        )
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise TypeError(f"labels for {name} must be integer class indices, got {y.dtype}")
    if not torch.isfinite(X).all():
        bad = (~torch.isfinite(X)).any(dim=0).nonzero().flatten().tolist()
        raise ValueError(
            f"{name} contains NaN or inf in columns {bad[:10]}{'...' if len(bad) > 10 else ''}; check the "
            "feature extraction (e.g. fp16 overflow) before fitting"
        )
    y = y.to(device=X.device, dtype=torch.int64)
    if int(y.min()) < 0:
        raise ValueError(f"labels for {name} must be non-negative class indices, got {int(y.min())}")
    top = int(y.max()) + 1
    if num_classes is None:
        num_classes = top
    elif top > num_classes:
        raise ValueError(f"labels for {name} go up to {top - 1} but num_classes is {num_classes}")
    if dtype is not None:
        X = X.to(dtype)
    return X, y, num_classes


def _check_classes(y: Tensor, num_classes: int, name: str = "X") -> Tensor:
    """Class frequencies; every class must occur, or its unpenalised bias would diverge to -inf."""
    counts = torch.bincount(y, minlength=num_classes)
    if num_classes < 2:
        raise ValueError(f"the labels for {name} hold a single class; a classifier needs at least two")
    empty = (counts == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(
            f"classes {empty[:10]}{'...' if len(empty) > 10 else ''} have no rows in {name}; the unpenalised "
            "bias of an absent class diverges. Use a split that keeps every class (e.g. val_fraction=0) or "
            "remap the labels to 0..K-1"
        )
    return counts


# -- numerical core ----------------------------------------------------------------------------------------
# Internally the weights and the bias are one parameter matrix theta = [W | b] (C x (F + 1)) acting on the
# features with a column of ones appended: one matmul gives all logits, one the whole gradient, and the
# per-iteration bookkeeping runs on one small tensor instead of two.

# Step growth per accepted iteration; backtracking takes back an overshoot.
_GROWTH = 1.1
# Entries of the diagonal (Jacobi) metric are floored at this share of their mean, so that a coordinate
# with almost no curvature does not get an unbounded step.
_METRIC_FLOOR = 0.3
# The L1 path is solved on the classes with a non-zero weight row (the others merged into one) while they are
# fewer than this share of all classes; early in the path that makes an iteration several times cheaper.
_REDUCE_BELOW = 0.75
# Halvings of the step before the search gives up; 2^-100 of any sane step is below any curvature scale.
_MAX_BACKTRACKS = 100
# A KKT violation below this many times the measured gradient rounding cannot be told from zero.
_ROUNDING_MARGIN = 4.0


def _cross_entropy(z: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(z, y)


def _penalty(weight: Tensor, lam: float, alpha: float, group: bool) -> Tensor:
    sparse = weight.norm(dim=0).sum() if group else weight.abs().sum()
    return lam * (alpha * sparse + 0.5 * (1.0 - alpha) * weight.square().sum())


def _prox(v: Tensor, threshold: Tensor, shrink: Tensor, group: bool) -> Tensor:
    """Proximal map of the (group) elastic net under a diagonal metric: (group) soft threshold, then shrinkage.

    ``threshold`` and ``shrink`` broadcast against ``v`` (per entry, or per column with ``group``) and are zero
    on the bias column, which the map then leaves alone.
    """
    if group:
        norms = v.norm(dim=0, keepdim=True)
        # clamp_min keeps a zero column at zero instead of dividing by zero (and, unlike the reference, never
        # flips the sign of a column whose norm is below the threshold).
        factor = (1.0 - threshold / norms.clamp_min(torch.finfo(v.dtype).tiny)).clamp_min(0.0)
        return v * (factor / (1.0 + shrink))
    return (v - v.clamp(-threshold, threshold)) / (1.0 + shrink)


@dataclass
class _Problem:
    """Training data with the constants every gradient needs; optionally with its last class frozen.

    A frozen last class stands for several classes merged into one (see :meth:`restrict`): its weights stay
    zero and its bias stays put. Softmax ignores a common shift of the biases, so fixing that one bias only
    fixes the shift; letting it move instead would put its gradient, a difference of two numbers near 1 when
    the merged class holds most of the probability, at the mercy of float32 rounding.
    """

    X1: Tensor  # n x (F + 1): the features and a column of ones
    y: Tensor  # n
    targets: Tensor  # C x (F + 1): X1^T Y, the constant part of the gradient (class sums and class counts)
    x_absmax: float  # largest |X1| entry, for rounding bounds
    frozen_last: bool = False

    @classmethod
    def build(cls, X: Tensor, y: Tensor, num_classes: int) -> _Problem:
        X1 = torch.cat([X, X.new_ones(X.shape[0], 1)], dim=1)
        targets = X1.new_zeros(num_classes, X1.shape[1]).index_add_(0, y, X1)
        return cls(X1, y, targets, float(X1.abs().max()))

    @property
    def n(self) -> int:
        return self.X1.shape[0]

    def columns(self, cols: Tensor) -> _Problem:
        """The same problem on the feature columns ``cols`` only."""
        keep = torch.cat([cols.to(self.X1.device), cols.new_full((1,), self.X1.shape[1] - 1).to(self.X1.device)])
        return _Problem(self.X1[:, keep], self.y, self.targets[:, keep], self.x_absmax)

    def restrict(self, active: Tensor) -> tuple[_Problem, Tensor, Tensor]:
        """The problem on the ``active`` classes plus one frozen class merging the rest.

        With every weight row of the rest at zero their logits are their biases, the same on every row, so
        they act as one class whose bias is their logsumexp; at any optimum their biases split as
        ``log(counts)``. Returns the problem, the rest's class indices and their log shares of that class.
        """
        num_classes = self.targets.shape[0]
        rest = torch.ones(num_classes, dtype=torch.bool, device=self.X1.device)
        rest[active] = False
        rest = rest.nonzero().flatten()
        label_map = torch.full((num_classes,), active.numel(), dtype=torch.int64, device=self.X1.device)
        label_map[active] = torch.arange(active.numel(), device=self.X1.device)
        targets = torch.cat([self.targets[active], self.targets[rest].sum(dim=0, keepdim=True)])
        rest_counts = self.targets[rest, -1]
        log_share = (rest_counts / rest_counts.sum()).log()
        return _Problem(self.X1, label_map[self.y], targets, self.x_absmax, True), rest, log_share


@dataclass
class _State:
    """An iterate ``theta = [W | b]`` with its logits and, when known, its probabilities and smooth gradient."""

    theta: Tensor
    logits: Tensor
    probs: Tensor | None = None
    grad: Tensor | None = None
    step: float = 1.0

    @property
    def weight(self) -> Tensor:
        return self.theta[:, :-1]

    @property
    def bias(self) -> Tensor:
        return self.theta[:, -1]


def _smooth_grad(prob: _Problem, probs: Tensor, theta: Tensor, lam: float, alpha: float) -> Tensor:
    """Gradient of the mean cross-entropy plus the ridge term, for weights and bias together."""
    grad = (probs.t() @ prob.X1).sub_(prob.targets).div_(prob.n)
    if alpha < 1.0:
        grad[:, :-1].add_(theta[:, :-1], alpha=lam * (1.0 - alpha))
    if prob.frozen_last:
        grad[-1] = 0.0
    return grad


def _violations(grad: Tensor, theta: Tensor, lam: float, alpha: float, group: bool) -> Tensor:
    """Distance of 0 from the subdifferential per class row (per feature column with ``group``); the bias,
    unpenalised, must have a zero gradient and counts in every class row."""
    l1 = lam * alpha
    g_w, w = grad[:, :-1], theta[:, :-1]
    if group:
        norms = w.norm(dim=0)
        unit = w / norms.clamp_min(torch.finfo(w.dtype).tiny)
        inside = (g_w + l1 * unit).norm(dim=0)
        outside = (g_w.norm(dim=0) - l1).clamp_min(0.0)
        per_column = torch.where(norms > 0, inside, outside)
        return torch.cat([per_column, grad[:, -1].abs()])
    per_entry = torch.where(w != 0, (g_w + l1 * w.sign()).abs(), (g_w.abs() - l1).clamp_min(0.0))
    return torch.maximum(per_entry.amax(dim=1), grad[:, -1].abs())


def _kkt_at(prob: _Problem, state: _State, lam: float, alpha: float, group: bool) -> tuple[float, Tensor]:
    """KKT violation at ``state`` and its parts (see :func:`_violations`); caches probs and gradient."""
    state.probs = torch.softmax(state.logits, dim=1)
    state.grad = _smooth_grad(prob, state.probs, state.theta, lam, alpha)
    parts = _violations(state.grad, state.theta, lam, alpha, group)
    return float(parts.max()), parts


def _metric(prob: _Problem, probs: Tensor, group: bool) -> Tensor:
    """Diagonal of the CE Hessian at ``probs`` (Jacobi preconditioner), one entry per parameter.

    The L1 prox stays an elementwise soft threshold under a diagonal metric; the group prox needs one scale
    per column, so with ``group`` the weight columns are averaged over classes.
    """
    curvature = probs * (1.0 - probs)
    h = (curvature.t() @ prob.X1.square()).div_(prob.n)
    if group:
        h[:, :-1] = h[:, :-1].mean(dim=0, keepdim=True)
    floor = max(_METRIC_FLOOR * float(h.mean()), torch.finfo(h.dtype).eps)
    return h.clamp_min(floor)


def _null_model(X: Tensor, y: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """The bias of the all-zero model (log class frequencies) and the CE gradient w.r.t. W there (C x F)."""
    counts = _check_classes(y, num_classes)
    freq = counts.to(X.dtype) / X.shape[0]
    bias = freq.log()
    bias = bias - bias.mean()
    # X^T (P - Y) / n with P the class frequencies on every row, written without an n x C one-hot matrix.
    class_sums = torch.zeros(num_classes, X.shape[1], dtype=X.dtype, device=X.device).index_add_(0, y, X)
    grad = freq[:, None] * X.mean(dim=0)[None, :] - class_sums / X.shape[0]
    return bias, grad


def _null_scale(grad: Tensor, group: bool) -> float:
    return float(grad.norm(dim=0).max() if group else grad.abs().max())


def _null_state(prob: _Problem, bias: Tensor) -> _State:
    theta = bias.new_zeros(bias.shape[0], prob.X1.shape[1])
    theta[:, -1] = bias
    return _State(theta, bias.expand(prob.n, -1).clone())


def _absolute_tol(
    prob: _Problem, null: _State, grad0: Tensor, tol: float, scale: float, group: bool
) -> tuple[float, float]:
    """The KKT tolerance ``tol * scale``, raised to what the solver's arithmetic can resolve on this problem,
    and the measured rounding of the gradient it is based on.

    The gradient at the all-zero model is known twice: from class sums (``grad0``) and from the GEMM every
    iteration uses, whose summation order depends on the BLAS and the CPU. Their difference, and the bias
    gradient there (exactly zero in exact arithmetic), measure the rounding of the gradient on these
    features; a violation below a few times that is noise, so asking for less could never be met.
    """
    requested = tol * scale if scale > 0 else tol
    probs = torch.softmax(null.logits, dim=1)
    grad = _smooth_grad(prob, probs, null.theta, 0.0, 1.0)
    diff = grad[:, :-1] - grad0
    weight_error = float(diff.norm(dim=0).max() if group else diff.abs().max())
    rounding = max(weight_error, float(grad[:, -1].abs().max()))
    floor = _ROUNDING_MARGIN * rounding
    if floor <= requested:
        return requested, rounding
    _logger.warning(
        "KKT tolerance %.3g is below the rounding of %s gradients on these features (%.3g); solving to %.3g "
        "instead (dtype=torch.float64 resolves tighter tolerances)",
        requested,
        str(prob.X1.dtype).removeprefix("torch."),
        rounding,
        floor,
    )
    return floor, rounding


def _first_step(X1: Tensor, iters: int = 30) -> float:
    """A first step size under the Jacobi metric: the inverse of the largest eigenvalue of the Gram matrix of
    ``X1`` with unit diagonal (features as correlated as they are), by power iteration; the search adapts it."""
    n = X1.shape[0]
    diag = X1.square().mean(dim=0).clamp_min(torch.finfo(X1.dtype).tiny).sqrt()
    gen = torch.Generator(device="cpu").manual_seed(0)
    v = torch.randn(X1.shape[1], generator=gen, dtype=X1.dtype).to(X1.device)
    sigma = 1.0
    for _ in range(iters):
        w = (X1.t() @ (X1 @ (v / diag))) / (n * diag)
        sigma = float(w.norm())
        if sigma == 0.0:
            return 1.0
        v = w / sigma
    return 1.0 / sigma


# -- public helpers ----------------------------------------------------------------------------------------


def lambda_max(X: Tensor, y: Tensor, alpha: float = 0.99, group: bool = False) -> float:
    """The smallest lambda at which the all-zero weight matrix is optimal (exactly, by the KKT conditions).

    ``max_{c,j} |X^T (Y - Ybar)|_{jc} / (n * alpha)``, or with ``group`` the largest column L2 norm over
    classes; as in glm-saga, computed on the matrix as given (pass normalised features to match a fit on them).
    """
    alpha = _check_alpha(alpha)
    X, y, num_classes = _check_problem(X, y)
    _, grad = _null_model(X, y, num_classes)
    return _null_scale(grad, group) / alpha


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
    return float(_cross_entropy(z, y.to(X.device)) + _penalty(weight, lam, alpha, group))


def kkt_violation(
    X: Tensor, y: Tensor, weight: Tensor, bias: Tensor, lam: float, alpha: float = 0.99, group: bool = False
) -> float:
    """Largest violation of the optimality conditions at ``(weight, bias)``; 0 at the exact solution.

    For a non-zero weight the smooth gradient plus ``lam * alpha * sign(w)`` must vanish, for a zero weight
    the gradient must lie within ``lam * alpha`` (per column L2 norms with ``group``); the bias gradient must
    vanish. Returns the largest absolute residual, in the units of the gradient.
    """
    X, y, num_classes = _check_problem(X, y, weight.shape[0])
    prob = _Problem.build(X, y, num_classes)
    theta = torch.cat([weight, bias[:, None]], dim=1).to(device=X.device, dtype=X.dtype)
    return _kkt_at(prob, _State(theta, prob.X1 @ theta.t()), lam, alpha, group)[0]


# -- the solver --------------------------------------------------------------------------------------------


def _fista(
    prob: _Problem, state: _State, lam: float, alpha: float, group: bool, tol: float, max_iter: int
) -> tuple[_State, int, float]:
    """Solve one point of the path from a warm start; return the solution, iterations and KKT violation.

    FISTA under a diagonal (Jacobi) metric fixed for the solve, with a step that grows by ``_GROWTH`` per
    iteration and backtracks on the exact Bregman divergence, and momentum restarts when it points uphill.
    It stops when the KKT conditions hold to ``tol``.
    """
    X1, n = prob.X1, prob.n
    l1, l2 = lam * alpha, lam * (1.0 - alpha)
    eps = torch.finfo(X1.dtype).eps
    x = state
    if x.probs is None:
        x.probs = torch.softmax(x.logits, dim=1)
    h = _metric(prob, x.probs, group)
    inv_h = h.reciprocal()
    # The penalty's per-parameter scale under the metric; zero on the unpenalised bias column.
    penalised = inv_h[:1].clone() if group else inv_h.clone()
    penalised[:, -1] = 0.0
    y_theta, y_z, probs = x.theta, x.logits, x.probs
    step = state.step
    momentum = 1.0
    for it in range(1, max_iter + 1):
        if probs is None:
            probs = torch.softmax(y_z, dim=1)
        # X1^T (P - Y) / n with the constant X1^T Y precomputed: no n x C one-hot residual is formed.
        p_x = probs.t() @ X1
        grad = (p_x - prob.targets).div_(n)
        if prob.frozen_last:
            grad[-1] = 0.0
        for _ in range(_MAX_BACKTRACKS):
            new = _prox(
                torch.addcmul(y_theta, inv_h, grad, value=-step),
                (step * l1) * penalised,
                (step * l2) * penalised,
                group,
            )
            new_z = X1 @ new.t()
            d = new - y_theta
            # Backtracking on the exact Bregman divergence of the CE in logit space,
            # D = mean_i [log sum_c p_ic e^dz_ic - sum_c p_ic dz_ic], with expm1/log1p instead of a difference of
            # two objective values, whose rounding would swamp D near convergence.
            dz = new_z - y_z
            bregman = (torch.log1p((probs * torch.expm1(dz)).sum(dim=1)) - (probs * dz).sum(dim=1)).mean()
            hd = h * d
            sq = (hd * d).sum()
            # (y - x+) . (x+ - x) > 0 means the momentum points uphill: restart it (O'Donoghue & Candes).
            uphill = -(hd * (new - x.theta)).sum()
            # The gradient mapping, a cheap estimate of the KKT residual at the new iterate.
            gmap = hd.abs().amax()
            # Rounding bound of D: a few ulps of the largest logit change.
            dz_max = d.abs().sum(dim=1).amax()
            bregman, sq, uphill, gmap, dz_max = torch.stack([bregman, sq, uphill, gmap, dz_max]).tolist()
            noise = 8 * eps * dz_max * prob.x_absmax
            if sq == 0.0 or -noise <= bregman <= sq / (2 * step) + noise:
                break
            # D is never negative: a negative or non-finite value means log1p met -1 in rounding, which only a
            # step far too long produces, so it fails the test too. Otherwise the measured curvature along the
            # step says how far to shrink it.
            step = min(0.5 * step, 0.9 * sq / (2 * bregman)) if bregman > 0 else 0.5 * step
        else:
            raise RuntimeError(
                f"the proximal gradient step search failed at lambda={lam:.4g} (step {step:.3g}); the features "
                "are probably badly scaled: normalise them, or solve in float64"
            )
        new_state = _State(new, new_z, step=step * _GROWTH)
        if gmap / step <= tol:
            violation = _kkt_at(prob, new_state, lam, alpha, group)[0]
            if violation <= tol:
                return new_state, it, violation
            # Not yet: restart the momentum from the iterate, whose gradient is now known.
            x, momentum = new_state, 1.0
            y_theta, y_z, probs = new, new_z, new_state.probs
        elif uphill > 0:
            x, momentum = new_state, 1.0
            y_theta, y_z, probs = new, new_z, None
        else:
            momentum_next = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * momentum * momentum))
            beta = (momentum - 1.0) / momentum_next
            # y = x+ + beta (x+ - x) as one lerp; logits are affine in the parameters, so no matmul is needed.
            y_theta = torch.lerp(x.theta, new, 1.0 + beta)
            y_z = torch.lerp(x.logits, new_z, 1.0 + beta)
            x, momentum, probs = new_state, momentum_next, None
        step *= _GROWTH
    return x, max_iter, _kkt_at(prob, x, lam, alpha, group)[0]


def _solve_point(
    prob: _Problem,
    state: _State,
    lam: float,
    alpha: float,
    group: bool,
    tol: float,
    max_iter: int,
    screen: Tensor | None = None,
) -> tuple[_State, int, float]:
    """One point of the path; the L1 path works on the active classes only while they are few.

    ``screen`` marks classes that the sequential strong rule cannot rule out. Classes outside the working
    set keep zero weights; the full KKT check afterwards adds any that want in, and the point is re-solved.
    """
    num_classes = prob.targets.shape[0]
    if group:
        return _fista(prob, state, lam, alpha, group, tol, max_iter)
    active = state.weight.ne(0).any(dim=1)
    if screen is not None:
        active |= screen
    if not active.any():
        # Nothing to start from: the start may already be optimal, else the classes that want in are active.
        violation, rows = _kkt_at(prob, state, lam, alpha, group)
        if violation <= tol:
            return state, 0, violation
        active = rows > tol
    used = 0
    while 0 < int(active.sum()) < _REDUCE_BELOW * num_classes and used < max_iter:
        idx = active.nonzero().flatten()
        sub, rest, log_share = prob.restrict(idx)
        merged = torch.logsumexp(state.bias[rest], dim=0, keepdim=True)
        row = state.theta.new_zeros(1, state.theta.shape[1])
        row[0, -1] = merged
        sub_state = _State(
            torch.cat([state.theta[idx], row]),
            torch.cat([state.logits[:, idx], merged.expand(prob.n, 1)], dim=1),
            step=state.step,
        )
        sub_state, n_iter, _ = _fista(sub, sub_state, lam, alpha, group, tol, max_iter - used)
        used += n_iter
        theta = torch.zeros_like(state.theta)
        theta[idx] = sub_state.theta[:-1]
        theta[rest, -1] = sub_state.theta[-1, -1] + log_share
        state = _State(theta, prob.X1 @ theta.t(), step=sub_state.step)
        violation, rows = _kkt_at(prob, state, lam, alpha, group)
        wanting = (rows > tol) & ~active
        if violation <= tol or not wanting.any():
            return state, used, violation
        active |= wanting
    state, n_iter, violation = _fista(prob, state, lam, alpha, group, tol, max(max_iter - used, 1))
    return state, used + n_iter, violation


def _extrapolate(prob: _Problem, state: _State, prev: _State, ratio: float) -> _State:
    """Warm start for the next lambda: linear extrapolation of the path in log(lambda).

    Weights that are zero stay zero and weights whose sign would flip stop at zero; the path is piecewise
    smooth, so this lands much closer to the next solution than the last one does.
    """
    theta = state.theta + ratio * (state.theta - prev.theta)
    keep = theta * state.theta > 0
    keep[:, -1] = True
    theta = torch.where(keep, theta, torch.zeros_like(theta))
    return _State(theta, prob.X1 @ theta.t(), step=state.step)


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
    """
    start = time.perf_counter()
    alpha = _check_alpha(alpha)
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    if tol <= 0 or max_iter < 1:
        raise ValueError(f"tol must be positive and max_iter at least 1, got tol={tol}, max_iter={max_iter}")
    X, y, num_classes = _check_problem(X, y, num_classes, dtype=dtype)
    if (X_val is None) != (y_val is None):
        raise ValueError("pass both X_val and y_val, or neither")
    if X_val is not None:
        X_val, y_val, _ = _check_problem(X_val, y_val, num_classes, name="X_val", dtype=dtype)
        if X_val.shape[1] != X.shape[1]:
            raise ValueError(f"X_val has {X_val.shape[1]} features but X has {X.shape[1]}")
        X_val, y_val = X_val.to(X.device), y_val.to(X.device)

    bias0, grad0 = _null_model(X, y, num_classes)
    scale = _null_scale(grad0, group)
    lam_max = scale / alpha
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

    prob = _Problem.build(X, y, num_classes)
    null = _null_state(prob, bias0)
    abs_tol, rounding = _absolute_tol(prob, null, grad0, tol, scale, group)
    null.step = _first_step(prob.X1)
    state, prev = null, None
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
            state = _State(null.theta.clone(), null.logits.clone(), step=state.step)
            n_iter, violation = 0, _kkt_at(prob, state, lam, alpha, group)[0]
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
            state, n_iter, violation = _solve_point(prob, start_state, lam, alpha, group, abs_tol, max_iter, screen)
        prev_lam = lam
        row = _summarise(X, y, X_val, y_val, state, lam, alpha, group)
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


def _accuracy(z: Tensor, y: Tensor) -> Tensor:
    # A gather and a max instead of argmax, which is several times slower on CPU; ties count as correct.
    return (z.gather(1, y[:, None]).squeeze(1) >= z.amax(dim=1)).to(z.dtype).mean()


def _summarise(
    X: Tensor,
    y: Tensor,
    X_val: Tensor | None,
    y_val: Tensor | None,
    state: _State,
    lam: float,
    alpha: float,
    group: bool,
) -> dict:
    stats = [_cross_entropy(state.logits, y), _penalty(state.weight, lam, alpha, group), _accuracy(state.logits, y)]
    if X_val is not None:
        z_val = torch.addmm(state.bias, X_val, state.weight.t())
        stats += [_cross_entropy(z_val, y_val), _accuracy(z_val, y_val)]
    nonzero = state.weight != 0
    stats += [nonzero.sum().to(X.dtype), nonzero.any(dim=0).sum().to(X.dtype)]
    values = torch.stack(stats).tolist()
    ce_v, pen_v, acc_v = values[:3]
    val_loss, val_acc = values[3:5] if X_val is not None else (math.nan, math.nan)
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
