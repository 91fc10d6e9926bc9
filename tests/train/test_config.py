import pytest
import yaml

from timm_qsenn.train.config import TrainConfig, load_config


def test_defaults_are_the_papers():
    c = TrainConfig()
    assert (c.dense.epochs, c.dense.lr, c.dense.head_lr, c.dense.momentum, c.dense.weight_decay) == (
        150, 0.005, 0.01, 0.9, 5e-4
    )  # fmt: skip
    dense = (c.dense.decay_epochs, c.dense.decay_rate, c.dense.drop_rate, c.dense.diversity_weight)
    assert dense == (30, 0.4, 0.2, 0.196)
    assert c.data.img_size == 448 and c.data.batch_size == 16
    assert (c.sparse.n_features, c.sparse.n_per_class, c.sparse.select_alpha, c.sparse.alpha) == (50, 5, 0.8, 0.99)
    assert (c.sparse.n_lambdas, c.sparse.eps, c.sparse.val_fraction) == (100, 1e-3, 0.1)
    ft = c.finetune
    assert (ft.iterations, ft.epochs, ft.lr, ft.lr_iteration_decay) == (4, [10, 10, 10, 40], 1e-4, 0.9)
    assert ft.momentum == 0.95
    assert (ft.decay_epochs, ft.decay_rate, ft.drop_rate, ft.train_norm) == (10, 0.4, 0.1, True)


def test_yaml_round_trip_and_override_precedence(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"dense": {"epochs": 7, "lr": 1}, "data": {"mean": [0.5, 0.5, 0.5]}}))
    c = load_config(path, ["dense.epochs=9", "finetune.epochs=[1, 2]", "finetune.iterations=2", "sparse.tol=1e-6"])
    assert c.dense.epochs == 9 and c.dense.lr == 1.0 and isinstance(c.dense.lr, float)
    assert c.sparse.tol == 1e-6
    assert c.finetune.epochs == [1, 2] and c.data.mean == [0.5, 0.5, 0.5]
    again = tmp_path / "again.yaml"
    again.write_text(c.to_yaml())
    assert load_config(again).to_dict() == c.to_dict()
    assert load_config(again).fingerprint() == c.fingerprint()


def test_fingerprint_ignores_operational_keys():
    a = load_config(overrides=["data.workers=0", "run.output=/tmp/a"])
    b = load_config(overrides=["data.workers=8", "run.output=/tmp/b"])
    assert a.fingerprint() == b.fingerprint()
    c = load_config(overrides=["sparse.n_features=40"])
    assert c.fingerprint() != a.fingerprint() and a.differences(c) == ["sparse.n_features"]


@pytest.mark.parametrize(
    "override, message",
    [
        ("dense.epoch=3", "unknown config key 'dense.epoch'; did you mean dense.epochs"),
        ("dens.epochs=3", "unknown config key 'dens'"),
        ("dense.epochs=abc", "dense.epochs must be int"),
        ("dense.epochs=true", "dense.epochs must be int"),
        ("sparse.tol=small", "sparse.tol must be float"),
        ("finetune.epochs=[1, 2]", "2 epoch counts for 4 iterations"),
        ("run.mixed_precision=fp8", "no, bf16 or fp16"),
        ("sparse.n_features=0", "must be positive"),
        ("finetune.iterations=0", "at least 1"),
        ("dense=3", "dense must be a mapping"),
        ("dense.epochs", "section.key=value"),
    ],
)
def test_bad_configs_name_the_problem(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(overrides=[override])


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_shipped_configs_load():
    from pathlib import Path

    configs = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        assert load_config(path).fingerprint()
