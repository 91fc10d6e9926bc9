import pytest
import torch

from timm_qsenn.sparse import sparsify

from .conftest import structured_problem


@pytest.fixture(scope="module")
def problem():
    return structured_problem(n=600, num_features=40, num_classes=6, informative=12, seed=1)


def test_end_to_end_gives_a_sparse_ternary_head_well_above_chance(problem):
    x, y = problem
    sh = sparsify(x, y, n_features=10, n_per_class=3)
    assert sh.selection.shape == (10,) and sh.selection.unique().numel() == 10
    assert sorted(sh.selection_order.tolist()) == sh.selection.tolist()
    assert sh.weight.shape == (6, 10) and sh.bias.shape == (6,)
    assert int(sh.weight.count_nonzero()) <= 3 * 6
    magnitudes = sh.weight.abs().unique().tolist()
    assert len(magnitudes) == 2 and magnitudes[0] == 0.0 and magnitudes[1] == pytest.approx(sh.scale)
    assert sh.mean.shape == sh.std.shape == (10,) and (sh.std > 0).all()
    assert sh.dense_weight.shape == (6, 10) and int(sh.dense_weight.count_nonzero()) > 18
    accuracy = (sh.logits(x[:, sh.selection]).argmax(dim=1) == y).float().mean()
    assert accuracy > 0.5  # chance is 1/6
    assert sh.lambdas.shape == sh.nnz.shape == sh.train_acc.shape == sh.val_acc.shape == (100,)
    assert sh.train_acc[-1] > 0.8 and torch.isfinite(sh.val_acc).all()
    assert set(sh.seconds) == {"select", "path", "quantize"}


def test_given_selection_skips_selection_and_real_weights_keep_the_path_bias(problem):
    x, y = problem
    selection = torch.tensor([3, 0, 7, 11, 5])
    sh = sparsify(x[:, selection], y, selection=selection, n_per_class=2, ternary=False, n_lambdas=30)
    assert sh.selection.tolist() == selection.tolist() and sh.selection_order is None
    assert "select" not in sh.seconds
    assert sh.scale is None and not sh.ternary
    assert int(sh.weight.count_nonzero()) <= 12
    kept = sh.weight != 0
    assert torch.equal(sh.weight[kept], sh.dense_weight[kept])
    assert torch.equal(sh.bias, sh.dense_bias)
    assert torch.allclose(sh.mean, x[:, selection].mean(dim=0), atol=1e-5)
    assert torch.allclose(sh.std, x[:, selection].std(dim=0, unbiased=False), rtol=1e-5)


def test_selection_length_must_match_the_columns(problem):
    x, y = problem
    with pytest.raises(ValueError, match="selection names 3 channels but features has 40 columns"):
        sparsify(x, y, selection=[1, 2, 3])


def test_empty_class_in_the_split_and_non_finite_features_are_errors(problem):
    x, y = problem
    with pytest.raises(ValueError, match="NaN or inf"):
        sparsify(torch.full_like(x, float("nan")), y, selection=list(range(40)))
    with pytest.raises(ValueError, match="single class"):
        sparsify(x[:, :5], torch.zeros_like(y), selection=list(range(5)))


def test_installs_into_a_qsenn_head(tiny_cnn):
    x, y = structured_problem(n=200, num_features=96, num_classes=5, informative=20, seed=4)
    sh = sparsify(x, y, n_features=8, n_per_class=2, n_lambdas=20)
    head = tiny_cnn.head
    head.select(sh.selection)
    head.set_normalization(sh.mean, sh.std)
    head.set_class_layer(sh.weight, sh.bias, ternary=True)
    assert head.stage == "ternary"
    codes, scale = head.ternary_codes()
    assert scale == pytest.approx(sh.scale) and int(codes.count_nonzero()) == int(sh.weight.count_nonzero())
    features = x[:, sh.selection]
    assert torch.allclose(head.classify(features), sh.logits(features), atol=1e-4)


def test_the_data_is_validated_once_and_split_once(problem, monkeypatch):
    import importlib

    # The package's names shadow its modules sparsify and select: look the modules up by their full names.
    select_module = importlib.import_module("timm_qsenn.sparse.select")
    sparsify_module = importlib.import_module("timm_qsenn.sparse.sparsify")

    x, y = problem
    scans, splits = [], []
    isfinite, split = torch.isfinite, sparsify_module.split_indices
    monkeypatch.setattr(torch, "isfinite", lambda t: scans.append(tuple(t.shape)) or isfinite(t))
    monkeypatch.setattr(sparsify_module, "split_indices", lambda *a: splits.append(a) or split(*a))
    monkeypatch.setattr(select_module, "split_indices", lambda *a: pytest.fail("the selection drew a split"))
    sh = sparsify(x, y, n_features=6, n_per_class=2, n_lambdas=10)
    assert [s for s in scans if s[:1] == x.shape[:1]] == [tuple(x.shape)]  # one scan of the N rows, all columns
    assert len(splits) == 1 and sh.selection.numel() == 6
