"""One point of a (group) elastic-net path, solved from a warm start to a KKT tolerance.

Each point is solved full batch (over row chunks, and over processes when the rows are sharded), on the device
of the problem's rows, by accelerated proximal gradient (FISTA) under a diagonal metric, with backtracking, a
growing step size and adaptive momentum restarts, and stopped when the KKT optimality conditions hold to the
tolerance. Every product with the rows goes through :class:`~timm_qsenn.sparse.problem.Problem`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .problem import Problem, Solution

__all__ = ["solve_point"]

# Step growth per accepted iteration; backtracking takes back an overshoot.
_GROWTH = 1.1
# The L1 path is solved on the classes with a non-zero weight row (the others merged into one) while they are
# fewer than this share of all classes; early in the path that makes an iteration several times cheaper.
_REDUCE_BELOW = 0.75
# Halvings of the step before the search gives up; 2^-100 of any sane step is below any curvature scale.
_MAX_BACKTRACKS = 100


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


def _fista(
    prob: Problem, state: Solution, lam: float, alpha: float, group: bool, tol: float, max_iter: int
) -> tuple[Solution, int, float]:
    """Solve one point of the path from a warm start; return the solution, iterations and KKT violation.

    FISTA under a diagonal (Jacobi) metric fixed for the solve, with a step that grows by ``_GROWTH`` per
    iteration and backtracks on the exact Bregman divergence, and momentum restarts when it points uphill.
    It stops when the KKT conditions hold to ``tol``.
    """
    l1, l2 = lam * alpha, lam * (1.0 - alpha)
    eps = torch.finfo(prob.dtype).eps
    x = state
    h = prob.curvature(x, group)
    inv_h = h.reciprocal()
    # The penalty's per-parameter scale under the metric; zero on the unpenalised bias column.
    penalised = inv_h[:1].clone() if group else inv_h.clone()
    penalised[:, -1] = 0.0
    y = x
    step = state.step
    momentum = 1.0
    for it in range(1, max_iter + 1):
        grad = prob.gradient(y)
        for _ in range(_MAX_BACKTRACKS):
            new = prob.point(
                _prox(
                    torch.addcmul(y.theta, inv_h, grad, value=-step),
                    (step * l1) * penalised,
                    (step * l2) * penalised,
                    group,
                )
            )
            d = new.theta - y.theta
            # Backtracking on the exact Bregman divergence of the CE in logit space.
            bregman = prob.bregman(y, new)
            hd = h * d
            sq = (hd * d).sum()
            # (y - x+) . (x+ - x) > 0 means the momentum points uphill: restart it (O'Donoghue & Candes).
            uphill = -(hd * (new.theta - x.theta)).sum()
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
        new.step = step * _GROWTH
        if gmap / step <= tol:
            violation = prob.kkt(new, lam, alpha, group)[0]
            if violation <= tol:
                return new, it, violation
            # Not yet: restart the momentum from the iterate, whose gradient is now known.
            x = y = new
            momentum = 1.0
        elif uphill > 0:
            x = y = new
            momentum = 1.0
        else:
            momentum_next = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * momentum * momentum))
            beta = (momentum - 1.0) / momentum_next
            # y = x+ + beta (x+ - x) as one lerp; held logits are affine in the parameters, so need no product.
            held = x.logits is not None and new.logits is not None
            logits = torch.lerp(x.logits, new.logits, 1.0 + beta) if held else None
            y = Solution(torch.lerp(x.theta, new.theta, 1.0 + beta), logits)
            x, momentum = new, momentum_next
        step *= _GROWTH
    return x, max_iter, prob.kkt(x, lam, alpha, group)[0]


def solve_point(
    prob: Problem,
    state: Solution,
    lam: float,
    *,
    alpha: float,
    group: bool,
    tol: float,
    max_iter: int,
    screen: Tensor | None = None,
) -> tuple[Solution, int, float]:
    """Solve one point of a path from the warm start ``state`` until its KKT violation is at most ``tol``.

    Returns the solution, the iterations used and its KKT violation (above ``tol`` only when ``max_iter`` ran
    out); ``state`` may be changed (its probabilities and gradient cached). The L1 path works on the active
    classes only while they are few: ``screen`` marks classes that the sequential strong rule cannot rule
    out. Classes outside the working set keep zero weights; the full KKT check afterwards adds any that want
    in, and the point is re-solved.
    """
    num_classes = prob.num_classes
    if group:
        return _fista(prob, state, lam, alpha, group, tol, max_iter)
    active = state.weight.ne(0).any(dim=1)
    if screen is not None:
        active |= screen
    if not active.any():
        # Nothing to start from: the start may already be optimal, else the classes that want in are active.
        violation, rows = prob.kkt(state, lam, alpha, group)
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
        sub_state = sub.point(torch.cat([state.theta[idx], row]), step=state.step)
        sub_state, n_iter, _ = _fista(sub, sub_state, lam, alpha, group, tol, max_iter - used)
        used += n_iter
        theta = torch.zeros_like(state.theta)
        theta[idx] = sub_state.theta[:-1]
        theta[rest, -1] = sub_state.theta[-1, -1] + log_share
        state = prob.point(theta, step=sub_state.step)
        violation, rows = prob.kkt(state, lam, alpha, group)
        wanting = (rows > tol) & ~active
        if violation <= tol or not wanting.any():
            return state, used, violation
        active |= wanting
    state, n_iter, violation = _fista(prob, state, lam, alpha, group, tol, max(max_iter - used, 1))
    return state, used + n_iter, violation
