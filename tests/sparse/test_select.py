import logging

import pytest
import torch

from timm_qsenn.sparse import normalize_features, select_features, selection_path, split_indices

from .conftest import structured_problem


def test_selects_exactly_n_distinct_sorted_features_deterministically():
    x, y = structured_problem(n=500, num_features=40, num_classes=5, seed=3)
    first = selection_path(x, y, 8, seed=7)
    again = selection_path(x, y, 8, seed=7)
    assert first.indices.shape == (8,) and first.indices.dtype == torch.int64
    assert first.indices.unique().numel() == 8
    assert torch.equal(first.indices, first.indices.sort().values)
    assert sorted(first.order.tolist()) == first.indices.tolist()
    assert torch.equal(first.order, again.order)
    # One feature per step: entry lambdas never increase, and all lie below lambda_max.
    assert (first.entry_lambdas.diff() <= 0).all() and (first.entry_lambdas < first.lambda_max).all()
    assert torch.equal(select_features(x, y, 8, seed=7), first.indices)


def test_informative_features_are_selected_first():
    x, y = structured_problem(n=600, num_features=30, num_classes=5, informative=4, seed=5)
    chosen = select_features(x, y, 4, val_fraction=0.0)
    assert chosen.tolist() == [0, 1, 2, 3]


def test_more_features_than_columns_is_an_error():
    x, y = structured_problem(n=100, num_features=6, num_classes=3)
    with pytest.raises(ValueError, match="n_features must lie in \\[1, 6\\]"):
        select_features(x, y, 7)
    with pytest.raises(ValueError, match="n_features"):
        select_features(x, y, 0)


def test_constant_columns_fill_up_with_a_warning(caplog):
    x, y = structured_problem(n=200, num_features=3, num_classes=3, seed=2)
    x = torch.cat([x, torch.ones(200, 3)], dim=1)
    with caplog.at_level(logging.WARNING, logger="timm_qsenn.sparse.select"):
        chosen = select_features(x, y, 5, n_lambdas=10, eps=0.1)
    assert chosen.unique().numel() == 5 and set(range(3)) <= set(chosen.tolist())
    assert "grid ended" in caplog.text


def test_split_matches_the_reference_sizes_and_seed():
    train, val = split_indices(5994, 0.1, seed=0)
    assert (train.numel(), val.numel()) == (5395, 599)
    assert torch.cat([train, val]).sort().values.equal(torch.arange(5994))
    assert torch.equal(split_indices(5994, 0.1, seed=0)[0], train)
    assert not torch.equal(split_indices(5994, 0.1, seed=1)[0], train)
    all_rows, none = split_indices(10, 0.0)
    assert all_rows.tolist() == list(range(10)) and none.numel() == 0
    with pytest.raises(ValueError, match="val_fraction"):
        split_indices(10, 1.0)


def test_empty_class_in_the_training_split_is_an_error():
    x, y = structured_problem(n=40, num_features=5, num_classes=3)
    y[0] = 3  # class 3 has a single row
    seed = next(s for s in range(100) if 0 in split_indices(40, 0.5, s)[1].tolist())
    with pytest.raises(ValueError, match="classes \\[3\\] have no rows in the training split"):
        select_features(x, y, 2, val_fraction=0.5, seed=seed)


def test_normalize_features_uses_population_std_and_clamps():
    x = torch.tensor([[1.0, 5.0], [3.0, 5.0]])
    normalized, mean, std = normalize_features(x)
    assert mean.tolist() == [2.0, 5.0]
    assert std.tolist() == pytest.approx([1.0, 1e-5])
    assert normalized.tolist() == [[-1.0, 0.0], [1.0, 0.0]]
