"""Rows: every product over row chunks (chunk sizes that do not divide n), low-precision storage, on-the-fly
standardisation and a row subset, against the same product on the whole float64 matrix."""

import sys

import pytest
import torch

from timm_qsenn.sparse import elastic_net_path, objective, selection_path, sparsify, split_indices
from timm_qsenn.sparse.problem import Problem
from timm_qsenn.sparse.rows import Rows
from timm_qsenn.sparse.select import candidate_rows, fit_selection

from .conftest import structured_problem

# float32 products of n rows: each entry is a sum of n terms, off by at most ~n * eps of the sum of magnitudes;
# the sums here are over 103 rows of O(1) values, so 1e-4 relative to the largest entry is a loose, safe bound.
RTOL32 = 1e-4


def _dense(x, index=None, shift=None, scale=None):
    x = x.double()
    if index is not None:
        x = x[index]
    if shift is not None:
        x = (x - shift.double()) / scale.double()
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)


def _close(a, b, rtol=RTOL32):
    a, b = a.double(), b.double()
    return float((a - b).abs().max()) <= rtol * max(float(b.abs().max()), 1.0)


@pytest.mark.parametrize("storage", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("chunk_rows", [1, 7, 103, None])
@pytest.mark.parametrize("cache_bytes", [0, 1 << 30], ids=["streamed", "kept"])
def test_chunked_products_match_the_whole_matrix(storage, chunk_rows, cache_bytes):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(131, 9, generator=gen) * 2 + 1).to(storage)
    original = x.clone()
    index = torch.randperm(131, generator=gen)[:103]
    shift, scale = torch.randn(9, generator=gen), torch.rand(9, generator=gen) + 0.5
    rows = Rows(x, index=index, shift=shift, scale=scale, chunk_rows=chunk_rows, cache_bytes=cache_bytes)
    x1 = _dense(x, index, shift, scale)
    assert rows.n == rows.n_total == 103
    theta = torch.randn(4, 10, generator=gen)
    R = torch.rand(103, 4, generator=gen)
    y = torch.randint(0, 4, (103,), generator=gen)
    assert _close(rows.logits(theta), x1 @ theta.double().t())
    seen = []

    def residual(local, block):
        seen.append((local.stop - local.start, block.shape[0]))
        return R[local]

    assert _close(rows.residual_product(residual, 4, max_rows=5), R.double().t() @ x1)
    assert all(n == m <= 5 for n, m in seen) and sum(n for n, _ in seen) == 103
    assert _close(rows.residual_product(residual, 4, square=True), R.double().t() @ x1.square())
    assert _close(rows.class_sums(y, 4), torch.nn.functional.one_hot(y, 4).double().t() @ x1)
    u = torch.randn(10, generator=gen)
    assert _close(rows.gram_product(u), x1.t() @ (x1 @ u.double()))
    assert _close(rows.square_mean(), x1.square().mean(dim=0))
    assert rows.abs_max() == pytest.approx(float(x1.abs().max()), rel=RTOL32)
    cols = torch.tensor([7, 2, 2, 0])
    picked = torch.cat([chunk.index_select(1, cols) for _, chunk in rows.chunks()])
    assert torch.equal(rows.gather_columns(cols), picked)  # the same operations as a whole chunk's, bit for bit
    out = torch.zeros(103, 6)
    rows.gather_columns(cols[:2], out=out[:, 3:5])
    assert torch.equal(out[:, 3:5], picked[:, :2]) and not out[:, [0, 1, 2, 5]].any()
    assert torch.equal(
        rows.columns(cols).logits(theta[:, [0, 1, 2, 3, 9]]),
        rows.columns(cols, picked).logits(theta[:, [0, 1, 2, 3, 9]]),
    )
    mean, std = Rows(x, index=index, chunk_rows=chunk_rows, cache_bytes=cache_bytes).statistics()
    plain = x.double()[index]
    assert torch.allclose(mean, plain.mean(dim=0)) and torch.allclose(std, plain.std(dim=0, unbiased=False))
    wide = x.double()
    Rows(wide, dtype=torch.float64, chunk_rows=chunk_rows, cache_bytes=cache_bytes).statistics()
    assert torch.equal(wide, x.double())  # the statistics never write into a matrix they read as views
    assert torch.equal(x, original)  # the standardisation never wrote into the stored matrix
    kept = Rows(x, shift=shift, scale=scale, chunk_rows=chunk_rows, cache_bytes=cache_bytes)
    chunks = [chunk.clone() for _, chunk in kept.chunks()]  # streamed chunks share a buffer: copies outlive it
    assert _close(torch.cat(chunks), _dense(x, None, shift, scale)[:, :-1])
    assert torch.equal(x, original)


def _status_bytes(field):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(field + ":"))


def test_streamed_statistics_hold_one_chunk_and_one_float64_block():
    # A float64 sum of a whole float32 chunk converts all of it first: 8 bytes per value beside the chunk's 4,
    # the largest allocation of a 400k x 2048 selection (issue 13). Measured by the kernel's peak-RSS mark,
    # which only new memory raises (memory this process freed before is reused unseen, so never too high).
    if not sys.platform.startswith("linux"):
        pytest.skip("needs /proc/self/clear_refs")
    x = torch.randn(16384, 2048).half()
    rows = Rows(x, index=torch.arange(16384), chunk_rows=8192, cache_bytes=0)
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        pytest.skip("this kernel does not let the process reset its peak-RSS mark")
    before = _status_bytes("VmRSS")
    rows.statistics()
    grown = _status_bytes("VmHWM") - before
    chunk = 8192 * 2048 * 4
    block = rows.temporary_rows * 2048
    # The chunk in float32, one float64 block and one float16 gathered block, plus 16 MiB for everything else.
    assert grown <= chunk + block * 8 + block * 2 + (16 << 20), f"{grown / 2**20:.0f} MiB"


def test_a_bad_chunk_size_is_an_error():
    with pytest.raises(ValueError, match="chunk_rows must be a positive number of rows, got 0"):
        Rows(torch.zeros(3, 2), chunk_rows=0)


@pytest.fixture(scope="module")
def problem():
    return structured_problem(n=600, num_features=40, num_classes=6, informative=12, seed=1, dtype=torch.float64)


def test_chunked_selection_and_path_match_the_whole_matrix(problem):
    # float64 and a tight tolerance: two solves that both meet the KKT conditions to 1e-8 of lambda_max agree
    # far closer than 1e-4, while any product over the wrong rows would move the answer by O(1).
    x, y = problem
    settings = dict(n_features=8, n_lambdas=20, dtype=torch.float64, tol=1e-8)
    whole = selection_path(x, y, **settings)
    chunked = selection_path(x, y, chunk_rows=37, **settings)  # 540 training rows: 37 does not divide it
    assert torch.equal(whole.order, chunked.order)
    assert torch.allclose(whole.entry_lambdas, chunked.entry_lambdas)
    sel = whole.indices
    kwargs = dict(n_lambdas=10, eps=1e-2, dtype=torch.float64, tol=1e-8, X_val=x[:50, sel], y_val=y[:50])
    a = elastic_net_path(x[:, sel], y, **kwargs)
    b = elastic_net_path(x[:, sel], y, chunk_rows=37, **kwargs)
    scale = float(a.weights.abs().max())
    assert float((a.weights - b.weights).abs().max()) <= 1e-4 * scale
    assert torch.allclose(a.objective, b.objective, rtol=1e-8) and torch.allclose(a.val_loss, b.val_loss)


def test_large_problems_never_form_the_n_by_classes_logits(problem, monkeypatch):
    # Above one chunk of rows the logits exist only block by block: a whole n x C matrix is never formed, so
    # memory is one chunk plus small blocks however many rows there are (issue 13).
    x, y = problem
    held = selection_path(x, y, n_features=4, n_lambdas=10, dtype=torch.float64)

    def refuse(self, theta):
        raise AssertionError(f"formed the whole {self.n} x {theta.shape[0]} logits")

    monkeypatch.setattr(Rows, "logits", refuse)
    blocked = selection_path(x, y, n_features=4, n_lambdas=10, dtype=torch.float64, chunk_rows=100)
    assert torch.equal(held.order, blocked.order)
    path = elastic_net_path(x[:, held.indices], y, n_lambdas=5, X_val=x[:50, held.indices], y_val=y[:50], chunk_rows=64)
    assert bool(path.converged.all())
    with pytest.raises(AssertionError, match="formed the whole"):
        elastic_net_path(x[:, held.indices], y, n_lambdas=5)  # one chunk: held logits, as before


def test_admitting_a_feature_reads_one_column_not_every_row(problem, monkeypatch):
    # Streamed candidate rows are converted whole at every pass (at 400k x 2048, ~4 s and a chunk of memory
    # each). The selection needs one pass per gradient of every column, to choose the next feature; admitting
    # a feature and re-solving must add none, however many features enter.
    x, y = problem
    train = torch.arange(540)
    mean, std = x[train].mean(dim=0), x[train].std(dim=0, unbiased=False)
    convert, gradient = Rows._convert, Problem.gradient
    passes = {"gradient": 0, "other": 0}
    inside = []

    def counted_convert(self, reuse):
        if self.num_columns == x.shape[1]:
            passes["gradient" if inside else "other"] += 1
        return convert(self, reuse)

    def counted_gradient(self, *args, **kwargs):
        inside.append(True)
        try:
            return gradient(self, *args, **kwargs)
        finally:
            inside.pop()

    monkeypatch.setattr(Rows, "_convert", counted_convert)
    monkeypatch.setattr(Problem, "gradient", counted_gradient)
    other = {}
    for n_features in (2, 6):
        passes.update(gradient=0, other=0)
        streamed = Rows(x, index=train, shift=mean, scale=std, dtype=torch.float64, cache_bytes=0, chunk_rows=97)
        result = fit_selection(streamed, y[train], 6, n_features, alpha=0.8, n_lambdas=20)
        assert passes["gradient"] >= n_features
        other[n_features] = passes["other"]
        kept = Rows(x, index=train, shift=mean, scale=std, dtype=torch.float64, chunk_rows=97)
        assert torch.equal(result.order, fit_selection(kept, y[train], 6, n_features, alpha=0.8, n_lambdas=20).order)
    # A fixed few (the class sums, the largest entry): not the 31 of a power iteration over all F columns.
    assert other[2] == other[6] <= 3


def test_float16_features_give_the_selection_of_their_float32_values(problem):
    x, y = problem
    half = x.to(torch.float16)
    a = sparsify(half, y, n_features=6, n_lambdas=15, n_per_class=2, chunk_rows=64)
    b = sparsify(half.float(), y, n_features=6, n_lambdas=15, n_per_class=2)
    assert torch.equal(a.selection_order, b.selection_order)
    # Two float32 solves to the KKT tolerance need not have close weights (the elastic net is nearly flat along
    # correlated columns), but their objectives on the fitted rows agree far closer: measured 3e-6 and 1e-5
    # relative (block-wise and whole-matrix logits) on a CPU where the weights differed by 2e-3 and 8e-3.
    train, _ = split_indices(x.shape[0], 0.1, 0)

    def fitted_objective(head):
        z = (half.double()[:, head.selection] - head.mean.double()) / head.std.double()
        weight, bias = head.dense_weight.double(), head.dense_bias.double()
        return objective(z[train], y[train], weight, bias, float(head.lambdas[-1]))

    assert fitted_objective(a) == pytest.approx(fitted_objective(b), rel=1e-4)


def test_a_default_chunk_size_is_sized_again_for_the_selected_columns():
    # The selection's restricted problems hold a few columns of the candidate rows; their chunks (and whether
    # their solutions hold the n x C logits) must follow their own width, not the 2048-wide matrix's.
    x = torch.randn(50, 300)
    train = torch.arange(40)
    narrow = candidate_rows(x, train, None, Rows(x, cache_bytes=0)).columns(torch.tensor([0, 1]))
    assert narrow.chunk_rows == Rows(torch.randn(40, 2)).chunk_rows > Rows(x).chunk_rows
    requested = candidate_rows(x, train, None, Rows(x, chunk_rows=7, cache_bytes=0)).columns(torch.tensor([0, 1]))
    assert requested.chunk_rows == 7
