"""The data of one fit and what is computed from it: validation, the problem, a solution, the null model, the
KKT tolerance. The path and the feature selection are both built from these pieces and :func:`solve_point`.

Internally the weights and the bias are one parameter matrix theta = [W | b] (C x (F + 1)) acting on the
features with a column of ones appended: one matmul gives all logits, one the whole gradient, and the
per-iteration bookkeeping runs on one small tensor instead of two. The products of the rows with the
parameters (logits, gradient, curvature, KKT residuals, the first step size) are methods of :class:`Problem`,
so that the solvers above it never touch the rows themselves.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from .rows import Rows

__all__ = [
    "Problem",
    "Solution",
    "block_logits",
    "fit_sums",
    "NullModel",
    "check_alpha",
    "check_settings",
    "check_problem",
    "check_classes",
    "check_counts",
    "null_model",
    "kkt_tolerance",
]

_logger = logging.getLogger(__name__)

# Entries of the diagonal (Jacobi) metric are floored at this share of their mean, so that a coordinate
# with almost no curvature does not get an unbounded step.
_METRIC_FLOOR = 0.3
# A KKT violation below this many times the measured gradient rounding cannot be told from zero.
_ROUNDING_MARGIN = 4.0
# Rows per block of the finiteness scan.
_SCAN_ROWS = 1 << 14
# A block of an n x C quantity (logits, probabilities, residuals) takes at most this many bytes; a product
# forms a few such blocks at a time.
BLOCK_BYTES = 4 << 20
# Solutions hold their n x C logits and probabilities while one such tensor takes at most this many bytes
# (a solve then holds about six of them); above it they are formed block by block at every use.
HELD_LOGITS_BYTES = 64 << 20


# -- validation, once at each public boundary --------------------------------------------------------------


def check_alpha(alpha: float) -> float:
    """``alpha`` as a float, checked to lie in (0, 1]."""
    if not 0.0 < float(alpha) <= 1.0:
        raise ValueError(f"alpha must lie in (0, 1] (the L1 share of the penalty), got {alpha}")
    return float(alpha)


def check_settings(dtype: torch.dtype, tol: float, max_iter: int) -> None:
    """Check the solver settings: a float32 or float64 solve, a positive tolerance, at least one iteration."""
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    if tol <= 0 or max_iter < 1:
        raise ValueError(f"tol must be positive and max_iter at least 1, got tol={tol}, max_iter={max_iter}")


def check_problem(
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
    # In row blocks, so that the scan of a large (or memory-mapped) matrix never allocates an n x F mask.
    bad_columns = torch.zeros(X.shape[1], dtype=torch.bool, device=X.device)
    for start in range(0, X.shape[0], _SCAN_ROWS):
        bad_columns |= ~torch.isfinite(X[start : start + _SCAN_ROWS]).all(dim=0)
    if bad_columns.any():
        bad = bad_columns.nonzero().flatten().tolist()
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


def check_classes(y: Tensor, num_classes: int, name: str = "X") -> Tensor:
    """Class frequencies; every class must occur, or its unpenalised bias would diverge to -inf."""
    return check_counts(torch.bincount(y, minlength=num_classes), name)


def check_counts(counts: Tensor, name: str = "X") -> Tensor:
    """``counts``, the rows per class, checked to hold at least two classes, each with a row."""
    num_classes = counts.numel()
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


# -- a solution and the problem ----------------------------------------------------------------------------


@dataclass
class Solution:
    """A point ``theta = [W | b]``, with its logits and probabilities where the problem holds them (see
    :attr:`Problem.holds_logits`), and its smooth gradient once known."""

    theta: Tensor  # C x (F + 1)
    logits: Tensor | None = None  # n x C, held only while the rows are few
    probs: Tensor | None = None  # n x C, likewise
    grad: Tensor | None = None
    step: float = 1.0  # the step size the next solve starts from

    @property
    def weight(self) -> Tensor:
        """The class weights W (C x F), a view of theta."""
        return self.theta[:, :-1]

    @property
    def bias(self) -> Tensor:
        """The biases b (C), a view of theta."""
        return self.theta[:, -1]


def block_logits(theta: Tensor, block: Tensor, columns: Tensor | None = None) -> Tensor:
    """The logits ``[block | 1] @ theta.T`` of a block of rows (of the feature columns ``columns`` only)."""
    if columns is not None:
        block = block.index_select(1, columns)
    return torch.addmm(theta[:, -1], block, theta[:, :-1].t())


@dataclass
class Problem:
    """Training rows with the constants every gradient needs; optionally with its last class frozen.

    A frozen last class stands for several classes merged into one (see :meth:`restrict`): its weights stay
    zero and its bias stays put. Softmax ignores a common shift of the biases, so fixing that one bias only
    fixes the shift; letting it move instead would put its gradient, a difference of two numbers near 1 when
    the merged class holds most of the probability, at the mercy of float32 rounding.

    The rows may be this process's shard of a matrix sharded over a process group (see :class:`Rows`): then
    ``y`` and every n x C tensor hold the local rows, and every sum over rows is over all processes.

    Every n x C quantity (logits, probabilities, residuals) is formed block by block, from blocks of at most
    :attr:`block_rows` rows, so that at scale a product needs memory for one chunk of the rows plus a few
    small blocks, never for n x C. While the logits of all rows fit in one chunk and in
    :data:`HELD_LOGITS_BYTES`, solutions hold them instead (:attr:`holds_logits`), which spares a product
    per evaluation.
    """

    rows: Rows  # the features, with the column of ones appended implicitly
    y: Tensor  # local n
    targets: Tensor  # C x (F + 1): X1^T Y, the constant part of the gradient (class sums and class counts)
    x_absmax: float  # largest |X1| entry, for rounding bounds
    frozen_last: bool = False

    @classmethod
    def build(cls, X: Tensor | Rows, y: Tensor, num_classes: int) -> Problem:
        """The problem of validated features ``X`` (n x F, or its :class:`Rows`) and labels in ``[0, num_classes)``."""
        rows = X if isinstance(X, Rows) else Rows(X, dtype=X.dtype)
        return cls(rows, y, rows.class_sums(y, num_classes), rows.abs_max())

    @property
    def n(self) -> int:
        """The number of rows, over all processes."""
        return self.rows.n_total

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the solve."""
        return self.rows.dtype

    @property
    def num_classes(self) -> int:
        """The number of classes (a merged rest counts as one)."""
        return self.targets.shape[0]

    @property
    def block_rows(self) -> int:
        """Rows per block of an n x C quantity: blocks of about :data:`BLOCK_BYTES`."""
        itemsize = torch.finfo(self.dtype).bits // 8
        return max(1, BLOCK_BYTES // (itemsize * self.num_classes))

    @property
    def holds_logits(self) -> bool:
        """Whether solutions hold their n x C logits and probabilities: while the local rows are one chunk and
        their logits take at most :data:`HELD_LOGITS_BYTES`."""
        itemsize = torch.finfo(self.dtype).bits // 8
        fits = self.rows.n * self.num_classes * itemsize <= HELD_LOGITS_BYTES
        return fits and self.rows.n <= self.rows.chunk_rows

    def columns(self, cols: Tensor, values: Tensor | None = None) -> Problem:
        """The same problem on the feature columns ``cols`` only (their ``values`` if the caller holds them, see
        :meth:`Rows.columns`)."""
        cols = cols.to(self.targets.device)
        keep = torch.cat([cols, cols.new_full((1,), self.rows.num_columns)])
        return Problem(self.rows.columns(cols, values), self.y, self.targets[:, keep], self.x_absmax)

    def restrict(self, active: Tensor) -> tuple[Problem, Tensor, Tensor]:
        """The problem on the ``active`` classes plus one frozen class merging the rest.

        With every weight row of the rest at zero their logits are their biases, the same on every row, so
        they act as one class whose bias is their logsumexp; at any optimum their biases split as
        ``log(counts)``. Returns the problem, the rest's class indices and their log shares of that class.
        """
        num_classes = self.num_classes
        device = self.targets.device
        rest = torch.ones(num_classes, dtype=torch.bool, device=device)
        rest[active] = False
        rest = rest.nonzero().flatten()
        label_map = torch.full((num_classes,), active.numel(), dtype=torch.int64, device=device)
        label_map[active] = torch.arange(active.numel(), device=device)
        targets = torch.cat([self.targets[active], self.targets[rest].sum(dim=0, keepdim=True)])
        rest_counts = self.targets[rest, -1]
        log_share = (rest_counts / rest_counts.sum()).log()
        return Problem(self.rows, label_map[self.y], targets, self.x_absmax, True), rest, log_share

    def point(self, theta: Tensor, step: float = 1.0) -> Solution:
        """The solution at ``theta``, with its logits if this problem holds them."""
        return Solution(theta, self.rows.logits(theta) if self.holds_logits else None, step=step)

    def start(self, bias: Tensor) -> Solution:
        """The all-zero-weight solution with ``bias``: the null model, where a path starts."""
        theta = bias.new_zeros(bias.shape[0], self.rows.num_columns + 1)
        theta[:, -1] = bias
        return self.point(theta)

    def logits(self, theta: Tensor) -> Tensor:
        """The (local) n x C logits of the parameters ``theta``; for checks on small problems."""
        return self.rows.logits(theta)

    def probabilities(self, solution: Solution) -> None:
        """Fill in the probabilities of a solution that holds its logits."""
        if solution.probs is None and solution.logits is not None:
            solution.probs = torch.softmax(solution.logits, dim=1)

    def _block_probs(self, solution: Solution, rows: slice, block: Tensor, columns: Tensor | None) -> Tensor:
        """The probabilities of ``solution`` on the rows ``rows`` (``block``): held, or computed now."""
        if solution.probs is not None:
            return solution.probs[rows]
        if solution.logits is not None:
            return torch.softmax(solution.logits[rows], dim=1)
        return torch.softmax(block_logits(solution.theta, block, columns), dim=1)

    def _block_logits(self, solution: Solution, rows: slice, block: Tensor) -> Tensor:
        """The logits of ``solution`` on the rows ``rows`` (``block``): held, or computed now."""
        if solution.logits is not None:
            return solution.logits[rows]
        return block_logits(solution.theta, block)

    def row_mean(self, values: Tensor) -> Tensor:
        """The mean over all processes' rows of a per-row quantity (local n, or its local sum as a scalar)."""
        return self.rows.sum(values.sum()) / self.n

    def gradient(self, solution: Solution, ridge: float = 0.0, columns: Tensor | None = None) -> Tensor:
        """Gradient of the mean cross-entropy at ``solution`` (plus ``ridge * W``), weights and bias.

        ``X1^T (P - Y) / n`` with the constant ``X1^T Y`` precomputed: no n x C one-hot residual is formed.
        ``solution`` may be one of this problem on the feature columns ``columns`` only (see :meth:`columns`).
        """
        self.probabilities(solution)

        def residual(rows: slice, block: Tensor) -> Tensor:
            return self._block_probs(solution, rows, block, columns)

        grad = self.rows.residual_product(residual, self.num_classes, max_rows=self.block_rows)
        grad.sub_(self.targets).div_(self.n)
        if ridge:
            grad[:, :-1].add_(solution.weight, alpha=ridge)
        if self.frozen_last:
            grad[-1] = 0.0
        return grad

    def curvature(self, solution: Solution, group: bool) -> Tensor:
        """Diagonal of the CE Hessian at ``solution`` (Jacobi preconditioner), one entry per parameter.

        The L1 prox stays an elementwise soft threshold under a diagonal metric; the group prox needs one scale
        per column, so with ``group`` the weight columns are averaged over classes.
        """
        self.probabilities(solution)

        def residual(rows: slice, block: Tensor) -> Tensor:
            p = self._block_probs(solution, rows, block, None)
            return p * (1.0 - p)

        h = self.rows.residual_product(residual, self.num_classes, square=True, max_rows=self.block_rows)
        h.div_(self.n)
        if group:
            h[:, :-1] = h[:, :-1].mean(dim=0, keepdim=True)
        floor = max(_METRIC_FLOOR * float(h.mean()), torch.finfo(h.dtype).eps)
        return h.clamp_min(floor)

    def bregman(self, base: Solution, new: Solution) -> Tensor:
        """The Bregman divergence of the mean CE from ``base`` to ``new`` in logit space, as a 0-d tensor.

        ``D = mean_i [log sum_c p_ic e^dz_ic - sum_c p_ic dz_ic]`` with ``p`` at ``base`` and ``dz`` the logit
        change, by expm1/log1p instead of a difference of two objective values, whose rounding would swamp
        ``D`` near convergence.
        """
        self.probabilities(base)
        total = torch.zeros((), dtype=self.dtype, device=self.rows.device)
        for rows, block in self.rows.chunks(self.block_rows):
            p = self._block_probs(base, rows, block, None)
            # In place on the block's temporaries: one block's worth of memory each.
            dz = self._block_logits(new, rows, block) - self._block_logits(base, rows, block)
            spread = torch.expm1(dz).mul_(p).sum(dim=1)
            total += torch.log1p(spread).sub_(dz.mul_(p).sum(dim=1)).sum()
        return self.rows.sum(total) / self.n

    def fit_sums(self, solution: Solution) -> tuple[Tensor, Tensor]:
        """Mean cross-entropy and accuracy of ``solution`` over all processes' rows."""
        return fit_sums(self.rows, solution.theta, self.y, self.block_rows)

    def kkt(self, solution: Solution, lam: float, alpha: float, group: bool) -> tuple[float, Tensor]:
        """Largest KKT violation at ``solution`` and its parts (see :func:`_violations`).

        Stores the smooth gradient (and held probabilities) on ``solution``, for the solve that may follow.
        """
        solution.grad = self.gradient(solution, lam * (1.0 - alpha))
        parts = _violations(solution.grad, solution.theta, lam, alpha, group)
        return float(parts.max()), parts

    def first_step(self, iters: int = 30) -> float:
        """A first step size under the Jacobi metric: the inverse of the largest eigenvalue of the Gram matrix
        of ``X1`` with unit diagonal (features as correlated as they are), by power iteration; the search
        adapts it."""
        diag = self.rows.square_mean().clamp_min(torch.finfo(self.dtype).tiny).sqrt()
        gen = torch.Generator(device="cpu").manual_seed(0)
        v = torch.randn(self.rows.num_columns + 1, generator=gen, dtype=self.dtype).to(diag.device)
        sigma = 1.0
        for _ in range(iters):
            w = self.rows.gram_product(v / diag) / (self.n * diag)
            sigma = float(w.norm())
            if sigma == 0.0:
                return 1.0
            v = w / sigma
        return 1.0 / sigma


def fit_sums(rows: Rows, theta: Tensor, y: Tensor, block_rows: int) -> tuple[Tensor, Tensor]:
    """Mean cross-entropy and accuracy of the parameters ``theta`` on ``rows`` (labels ``y``) over all
    processes' rows, from blocks of at most ``block_rows`` rows."""
    sums = torch.zeros(2, dtype=rows.dtype, device=rows.device)
    for local, block in rows.chunks(block_rows):
        z = block_logits(theta, block)
        labels = y[local]
        # A gather and a max instead of argmax, which is several times slower on CPU; ties count as correct.
        correct = (z.gather(1, labels[:, None]).squeeze(1) >= z.amax(dim=1)).to(z.dtype).sum()
        sums += torch.stack([torch.nn.functional.cross_entropy(z, labels, reduction="sum"), correct])
    sums = rows.sum(sums)
    return sums[0] / rows.n_total, sums[1] / rows.n_total


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


# -- the null model and the tolerance ----------------------------------------------------------------------


@dataclass
class NullModel:
    """The all-zero-weight model, optimal (exactly, by the KKT conditions) for every lambda >= ``lambda_max``."""

    bias: Tensor  # C: log class frequencies, centred
    grad: Tensor  # C x F: the cross-entropy gradient w.r.t. W there
    scale: float  # its largest entry (largest column L2 norm with group): alpha * lambda_max
    lambda_max: float


def null_model(problem: Problem, alpha: float, group: bool) -> NullModel:
    """The null model of ``problem`` (unrestricted, every class present): the one place lambda_max is computed.

    ``lambda_max = max_{c,j} |X^T (Y - Ybar)|_{jc} / (n * alpha)``, or with ``group`` the largest column L2
    norm over classes; as in glm-saga, computed on the matrix as given.
    """
    counts = check_counts(problem.targets[:, -1])
    freq = counts / problem.n
    bias = freq.log()
    bias = bias - bias.mean()
    # X^T (P - Y) / n with P the class frequencies on every row, from the class sums: no n x C one-hot matrix.
    class_sums = problem.targets[:, :-1]
    grad = freq[:, None] * (class_sums.sum(dim=0) / problem.n)[None, :] - class_sums / problem.n
    scale = float(grad.norm(dim=0).max() if group else grad.abs().max())
    return NullModel(bias, grad, scale, scale / alpha)


def kkt_tolerance(problem: Problem, null: NullModel, tol: float, group: bool) -> tuple[float, float]:
    """The KKT tolerance ``tol * alpha * lambda_max``, raised to what the solver's arithmetic can resolve on
    ``problem``, and the measured rounding of the gradient it is based on.

    The gradient at the null model is known twice: from class sums (``null.grad``) and from the GEMM every
    iteration uses, whose summation order depends on the BLAS and the CPU. Their difference, and the bias
    gradient there (exactly zero in exact arithmetic), measure the rounding of the gradient on these
    features; a violation below a few times that is noise, so asking for less could never be met.
    """
    requested = tol * null.scale if null.scale > 0 else tol
    grad = problem.gradient(problem.start(null.bias))
    diff = grad[:, :-1] - null.grad
    weight_error = float(diff.norm(dim=0).max() if group else diff.abs().max())
    rounding = max(weight_error, float(grad[:, -1].abs().max()))
    floor = _ROUNDING_MARGIN * rounding
    if floor <= requested:
        return requested, rounding
    _logger.warning(
        "KKT tolerance %.3g is below the rounding of %s gradients on these features (%.3g); solving to %.3g "
        "instead (dtype=torch.float64 resolves tighter tolerances)",
        requested,
        str(problem.dtype).removeprefix("torch."),
        rounding,
        floor,
    )
    return floor, rounding
