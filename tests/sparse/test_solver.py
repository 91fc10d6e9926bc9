import contextlib
import io
import warnings

import pytest
import torch

from timm_qsenn.sparse import elastic_net_path, kkt_violation, lambda_grid, lambda_max, objective

from .conftest import standardize, structured_problem

# Stated tolerance: every returned point satisfies the KKT conditions to tol * alpha * lambda_max (tol = 1e-4 by
# default, i.e. relative to the largest gradient of the all-zero model), raised to at least 4 times the rounding of
# the solver's float32 gradient where that is larger. An independent float64 check differs from the solver's own
# float32 check by that rounding, measured once per path (path.rounding); allow three times the sample.
ROUNDING_SAMPLES = 3


@pytest.mark.parametrize("group", [False, True])
@pytest.mark.parametrize("problem", ["structured", "random_problem"])
def test_kkt_conditions_hold_at_every_lambda(problem, group, request):
    x, y = request.getfixturevalue(problem)
    alpha = 0.8 if group else 0.99
    path = elastic_net_path(x, y, alpha=alpha, n_lambdas=25, eps=1e-2, group=group)
    assert path.converged.all()
    assert (path.kkt <= path.tol).all()
    assert path.tol == pytest.approx(1e-4 * alpha * lambda_max(x, y, alpha, group=group), rel=1e-5)
    x64 = x.double()
    for k in range(len(path)):
        independent = kkt_violation(x64, y, path.weights[k], path.biases[k], float(path.lambdas[k]), alpha, group)
        assert independent <= path.tol + ROUNDING_SAMPLES * path.rounding, (k, independent, path.tol)
    # All zero at lambda_max; the optimal objective decreases with lambda.
    assert path.nnz[0] == 0 and path.nnz[-1] > 0
    assert (path.objective.diff() < 0).all()


def test_lambda_max_gives_exact_zeros_and_just_below_does_not(structured):
    x, y = structured
    for group in (False, True):
        lam = lambda_max(x, y, alpha=0.99, group=group)
        path = elastic_net_path(x, y, lambdas=[lam, 0.98 * lam], group=group)
        assert torch.count_nonzero(path.weights[0]) == 0
        assert kkt_violation(x, y, path.weights[0], path.biases[0], lam, group=group) <= path.tol
        assert torch.count_nonzero(path.weights[1]) > 0
        # The all-zero model is not optimal below lambda_max: it violates the KKT conditions there.
        assert kkt_violation(x, y, path.weights[0], path.biases[0], 0.98 * lam, group=group) > 10 * path.tol


def test_group_penalty_zeroes_whole_columns(structured):
    x, y = structured
    path = elastic_net_path(x, y, alpha=0.8, group=True, n_lambdas=30, eps=0.05)
    saw_partial = False
    for weight in path.weights:
        column_nonzero = weight.ne(0).any(dim=0)
        # A column is either exactly zero or has every class weight non-zero.
        assert (weight.ne(0).all(dim=0) == column_nonzero).all()
        saw_partial |= bool(0 < int(column_nonzero.sum()) < weight.shape[1])
    assert saw_partial
    assert (path.n_active.diff() >= 0).all()


def test_float32_and_float64_agree(structured):
    x, y = structured
    # Asked for more than float32 resolves on these features: the solver raises its tolerance to four times the
    # measured rounding of its gradient (how much that is depends on the BLAS and the CPU) and says so.
    p32 = elastic_net_path(x, y, n_lambdas=20, eps=1e-2, tol=1e-6)
    p64 = elastic_net_path(x.double(), y, n_lambdas=20, eps=1e-2, tol=1e-8, dtype=torch.float64)
    assert p64.weights.dtype == torch.float64 and p32.weights.dtype == torch.float32
    assert torch.allclose(p32.lambdas, p64.lambdas, rtol=1e-5)
    assert p32.converged.all() and p64.converged.all()
    assert p32.tol >= 1e-6 * lambda_max(x, y) * 0.99
    # Each float32 point meets its stated tolerance in exact (float64) arithmetic, up to the float32 rounding of
    # the solver's own check.
    assert p32.tol >= 4 * p32.rounding
    for k in range(len(p32)):
        exact = kkt_violation(x.double(), y, p32.weights[k], p32.biases[k], float(p32.lambdas[k]))
        assert exact <= p32.tol + ROUNDING_SAMPLES * p32.rounding, (k, exact, p32.tol)
    # Objectives agree to second order in the tolerance, and the supports are the same.
    assert torch.allclose(p32.objective, p64.objective, rtol=1e-5)
    assert torch.equal(p32.nnz, p64.nnz)


def test_a_tolerance_below_float32_rounding_is_raised_with_a_warning(structured, caplog):
    x, y = structured
    lam = lambda_max(x, y)
    with caplog.at_level("WARNING", logger="timm_qsenn.sparse.problem"):
        path = elastic_net_path(x, y, n_lambdas=3, eps=0.5, tol=1e-12)
    assert "below the rounding of float32 gradients" in caplog.text
    assert path.tol > 1e-12 * lam and path.converged.all()
    caplog.clear()
    with caplog.at_level("WARNING", logger="timm_qsenn.sparse.problem"):
        exact = elastic_net_path(x.double(), y, n_lambdas=3, eps=0.5, tol=1e-9, dtype=torch.float64)
    assert not caplog.text and exact.tol == pytest.approx(1e-9 * 0.99 * lam, rel=1e-6)


def test_objective_no_worse_than_glm_saga():
    elasticnet = pytest.importorskip("glm_saga.elasticnet", reason="glm-saga (the benchmark extra) is not installed")
    from torch.utils.data import DataLoader

    x, y = structured_problem(n=256, num_features=8, num_classes=4)
    x = standardize(x)
    linear = torch.nn.Linear(8, 4)
    torch.nn.init.zeros_(linear.weight)
    torch.nn.init.zeros_(linear.bias)
    loader = DataLoader(elasticnet.IndexedTensorDataset(x, y), batch_size=256)
    # Generous settings: one full batch per epoch (SAGA is then plain proximal gradient), many epochs, tight tol.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        out = elasticnet.glm_saga(
            linear, loader, 1.0, 2000, 0.99, k=5, epsilon=0.05, tol=1e-6, do_zero=False, n_ex=256, n_classes=4
        )
    lams = [float(point["lam"]) for point in out["path"]]
    ours = elastic_net_path(x, y, lambdas=lams)
    for k, point in enumerate(out["path"]):
        theirs = objective(x, y, point["weight"], point["bias"], lams[k])
        mine = objective(x, y, ours.weights[k], ours.biases[k], lams[k])
        assert mine <= theirs * 1.005, (lams[k], mine, theirs)


def test_stop_at_nnz_and_validation_columns(structured):
    x, y = structured
    path = elastic_net_path(x[:300], y[:300], X_val=x[300:], y_val=y[300:], n_lambdas=40, stop_at_nnz=10)
    assert path.nnz[-1] >= 10 and (path.nnz[:-1] < 10).all()
    assert len(path) < 40 and path.weights.shape[0] == len(path)
    assert torch.isfinite(path.val_acc).all() and torch.isfinite(path.val_loss).all()
    plain = elastic_net_path(x, y, n_lambdas=3)
    assert torch.isnan(plain.val_acc).all()


def test_lambda_grid():
    grid = lambda_grid(2.0, 100, 1e-3)
    assert grid.shape == (100,)
    assert grid[0] == pytest.approx(2.0) and grid[-1] == pytest.approx(2e-3)
    assert (grid.diff() < 0).all()


def test_explicit_lambdas_are_sorted_and_float64_objective_matches(random_problem):
    x, y = random_problem
    lam = lambda_max(x, y)
    path = elastic_net_path(x, y, lambdas=[0.1 * lam, 0.5 * lam])
    assert path.lambdas.tolist() == pytest.approx([0.5 * lam, 0.1 * lam])
    for k in range(2):
        assert path.objective[k] == pytest.approx(
            objective(x.double(), y, path.weights[k], path.biases[k], float(path.lambdas[k])), rel=1e-5
        )


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda x, y: (x.clone().index_fill_(0, torch.tensor([3]), float("nan")), y), ValueError, "NaN or inf"),
        (lambda x, y: (x.clone().index_fill_(1, torch.tensor([2]), float("inf")), y), ValueError, "columns \\[2\\]"),
        (lambda x, y: (x, torch.zeros_like(y)), ValueError, "single class"),
        (lambda x, y: (x, torch.where(y == 1, 2, y)), ValueError, "classes \\[1\\] have no rows"),
        (lambda x, y: (x, y[:-1]), ValueError, "one entry per row"),
        (lambda x, y: (x, y.float()), TypeError, "integer class indices"),
        (lambda x, y: (x.long(), y), TypeError, "floating point"),
        (lambda x, y: (x[0], y), ValueError, "2-D"),
        (lambda x, y: (x, y - 1), ValueError, "non-negative"),
    ],
)
def test_invalid_inputs_raise_clear_errors(random_problem, make, error, message):
    x, y = make(*random_problem)
    with pytest.raises(error, match=message):
        elastic_net_path(x, y, n_lambdas=2)


def test_invalid_options_raise(random_problem):
    x, y = random_problem
    with pytest.raises(ValueError, match="alpha"):
        elastic_net_path(x, y, alpha=0.0)
    with pytest.raises(ValueError, match="positive finite"):
        elastic_net_path(x, y, lambdas=[0.1, 0.0])
    with pytest.raises(TypeError, match="dtype"):
        elastic_net_path(x, y, dtype=torch.float16)
    with pytest.raises(ValueError, match="both X_val and y_val"):
        elastic_net_path(x, y, X_val=x)
    with pytest.raises(ValueError, match="num_classes"):
        elastic_net_path(x, y, num_classes=2)


def test_check_input_false_skips_the_scan_and_fits_the_same_path(structured):
    x, y = structured
    checked = elastic_net_path(x, y, n_lambdas=5, eps=0.1)
    unchecked = elastic_net_path(x, y, n_lambdas=5, eps=0.1, num_classes=5, check_input=False)
    assert torch.equal(checked.weights, unchecked.weights) and torch.equal(checked.n_iter, unchecked.n_iter)
    with pytest.raises(ValueError, match="alpha"):  # the options are still checked
        elastic_net_path(x, y, alpha=2.0, check_input=False)
