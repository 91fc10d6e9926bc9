"""The public per-point API that the path and the selection are built from."""

import pytest
import torch

from timm_qsenn.sparse import elastic_net_path, kkt_violation, lambda_max
from timm_qsenn.sparse.point import solve_point
from timm_qsenn.sparse.problem import Problem, Solution, check_alpha, check_settings, kkt_tolerance, null_model


@pytest.mark.parametrize("group", [False, True])
def test_one_point_solved_by_hand_is_the_paths_point(structured, group):
    x, y = structured
    alpha = 0.8 if group else 0.99
    prob = Problem.build(x, y, 5)
    null = null_model(prob, alpha, group)
    assert null.lambda_max == lambda_max(x, y, alpha, group=group)
    assert null.scale == pytest.approx(alpha * null.lambda_max, rel=1e-12)
    tol, rounding = kkt_tolerance(prob, null, 1e-4, group)
    start = prob.start(null.bias)
    assert torch.count_nonzero(start.weight) == 0 and prob.kkt(start, null.lambda_max, alpha, group)[0] <= tol
    start.step = prob.first_step()
    lam = 0.5 * null.lambda_max
    solution, n_iter, violation = solve_point(prob, start, lam, alpha=alpha, group=group, tol=tol, max_iter=20000)
    assert n_iter > 0 and violation <= tol
    assert kkt_violation(x.double(), y, solution.weight, solution.bias, lam, alpha, group) <= tol + 3 * rounding
    path = elastic_net_path(x, y, alpha=alpha, group=group, lambdas=[null.lambda_max, lam])
    assert path.tol == tol and path.rounding == rounding
    if group:  # no screening on the group path: the same start, so the same iterates
        assert int(path.n_iter[1]) == n_iter and torch.equal(path.weights[1], solution.weight)
    else:
        assert torch.equal(path.weights[1] != 0, solution.weight != 0)


def test_columns_and_restrict_keep_the_bias_column(structured):
    x, y = structured
    prob = Problem.build(x, y, 5)
    sub = prob.columns(torch.tensor([3, 1]))
    assert sub.rows.X.shape == (x.shape[0], 2) and torch.equal(sub.rows.X, x[:, [3, 1]])
    theta = torch.randn(5, 3, dtype=x.dtype)
    assert torch.allclose(sub.logits(theta), x[:, [3, 1]] @ theta[:, :2].t() + theta[:, 2])  # the ones column
    assert torch.equal(sub.targets, prob.targets[:, [3, 1, -1]])
    merged, rest, log_share = prob.restrict(torch.tensor([0, 2]))
    assert merged.frozen_last and merged.targets.shape[0] == 3 and rest.tolist() == [1, 3, 4]
    assert log_share.exp().sum() == pytest.approx(1.0)
    grad = merged.gradient(
        Solution(torch.zeros(3, x.shape[1] + 1, dtype=x.dtype), probs=torch.full((x.shape[0], 3), 1 / 3))
    )
    assert torch.equal(grad[-1], torch.zeros_like(grad[-1]))  # the merged class never moves


def test_settings_are_checked_with_clear_errors():
    assert check_alpha(1) == 1.0
    with pytest.raises(ValueError, match="alpha must lie in \\(0, 1\\]"):
        check_alpha(1.5)
    with pytest.raises(TypeError, match="torch.float32 or torch.float64"):
        check_settings(torch.float16, 1e-4, 10)
    with pytest.raises(ValueError, match="tol must be positive and max_iter at least 1"):
        check_settings(torch.float32, 1e-4, 0)
