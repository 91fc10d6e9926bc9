"""The whole Q-SENN pipeline on tiny data: end to end, kill-and-resume, two processes, bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from timm_qsenn.hub import load_model
from timm_qsenn.train import QSENNTrainer, RunExistsError, load_config

from .conftest import CLASSES, ENV, final_weights, kill_when, run_cli, tiny_overrides, train_two_processes


def test_end_to_end_gives_a_ternary_head_that_learned(finished_run):
    output, summary = finished_run
    assert json.loads((output / "summary.json").read_text()) == summary
    for key in ("dense_accuracy", "qsenn_accuracy", "n_features", "weights_per_class", "seconds"):
        assert key in summary
    for phase in ("dense", "sparse_0", "finetune_0", "sparse_3", "finetune_3", "final"):
        assert summary["seconds"][phase] >= 0
    model = load_model(str(output))
    head = model.head
    assert head.stage == "ternary" and head.num_features == 8 == summary["n_features"]
    weight = head.fc.weight
    magnitudes = weight[weight != 0].abs().unique()
    assert magnitudes.numel() == 1, "one global magnitude a"
    assert int((weight != 0).sum()) <= 2 * CLASSES
    assert summary["weights_per_class"] <= 2
    assert summary["qsenn_accuracy"] >= 0.6, summary  # chance is 0.25
    assert summary["dense_accuracy"] >= 0.6, summary


@pytest.mark.parametrize("phase, epoch, batch", [("dense", 1, 2), ("finetune_1", 0, 2)])
def test_killed_run_resumes_to_identical_weights(finished_run, toy_folder, tmp_path, phase, epoch, batch):
    reference, _ = finished_run
    output = tmp_path / "killed"
    args = tiny_overrides(toy_folder, output) + ["run.checkpoint_steps=1"]
    killed_at = kill_when(run_cli(args), output / "state.json", phase, epoch, batch)
    assert not (output / "summary.json").exists()
    resumed = run_cli(args)
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out[-3000:]
    assert "resuming the run" in out and killed_at["phase"] in out
    expected, actual = final_weights(reference), final_weights(output)
    assert expected.keys() == actual.keys()
    different = [k for k in expected if not torch.equal(expected[k], actual[k])]
    assert not different, f"resumed run differs in {different[:5]}"
    assert json.loads((output / "summary.json").read_text())["qsenn_accuracy"] == pytest.approx(
        json.loads((reference / "summary.json").read_text())["qsenn_accuracy"]
    )


# What 2 processes reproduce of 1 (stated in the README): the sparse fit of given features is solved on one
# process and broadcast, so it is the same on every process; trained weights differ by float summation order
# (DDP averages two half-batch gradients), amplified by training, and agree to TRAINED_RTOL of each tensor's
# largest value; ternary codes agree wherever the path solution's magnitude is further than TRAINED_RTOL of
# its largest from the quantisation threshold (nearer, float noise may decide which side it falls).
TRAINED_RTOL = 1e-2


def _relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / a.double().abs().max().clamp_min(1e-12))


def test_two_processes_match_one(toy_folder, tmp_path):
    """torchrun with 2 CPU processes (gloo) x batch 4 against 1 process x batch 8, as stated above."""
    common = tiny_overrides(toy_folder, tmp_path, backbone="test_vit") + [
        "model.backbone_kwargs={dynamic_img_size: true}",
        "dense.drop_rate=0",
        "finetune.drop_rate=0",
        "data.eval_batch_size=8",
        # Tiny float differences between 1 and 2 processes must not be amplified by a loosely solved path.
        "sparse.tol=1e-6",
    ]
    one = run_cli(common + [f"run.output={tmp_path / 'one'}", "data.batch_size=8"])
    out, _ = one.communicate(timeout=300)
    assert one.returncode == 0, out[-3000:]
    two = train_two_processes(
        common
        # Features sharded over the two processes and the sparse fit solved by both together (the default only
        # above 1 GiB of features): the 1-process run gathers and solves alone, so this compares the two paths.
        + [f"run.output={tmp_path / 'two'}", "data.batch_size=4", "sparse.shard_above_mb=0"],
        port=29517,
    )
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]
    summaries = [json.loads((tmp_path / name / "summary.json").read_text()) for name in ("one", "two")]
    assert summaries[1]["processes"] == 2
    # One feature cache file per process and extraction when sharded, one per extraction when gathered.
    caches = [len(list((tmp_path / name / "features").glob("*.safetensors"))) for name in ("one", "two")]
    assert caches[0] > 0 and caches[1] == 2 * caches[0], caches
    same_codes = True
    for iteration in range(4):
        fits = [
            load_file(str(tmp_path / name / "sparse" / f"iteration_{iteration}.safetensors")) for name in ("one", "two")
        ]
        assert torch.equal(fits[0]["selection"], fits[1]["selection"]), iteration
        dense = fits[0]["dense_weight"]
        assert _relative_difference(dense, fits[1]["dense_weight"]) <= TRAINED_RTOL, iteration
        with safe_open(str(tmp_path / "one" / "sparse" / f"iteration_{iteration}.safetensors"), "pt") as f:
            threshold = float(f.metadata()["threshold"])
        clear = (dense.abs() - threshold).abs() > TRAINED_RTOL * dense.abs().max()
        codes = [torch.sign(fit["weight"]) for fit in fits]
        assert torch.equal(codes[0][clear], codes[1][clear]), iteration
        if not torch.equal(codes[0], codes[1]):
            same_codes = False  # a weight tied at the threshold went the other way: later phases may differ
            break
    if same_codes:
        finals = [final_weights(tmp_path / name) for name in ("one", "two")]
        for key, value in finals[0].items():
            if value.is_floating_point():
                assert _relative_difference(value, finals[1][key]) <= TRAINED_RTOL, key
        test_images = summaries[0]["test_images"]
        assert abs(summaries[0]["qsenn_accuracy"] - summaries[1]["qsenn_accuracy"]) <= 1 / test_images


def _snapshot(folder: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def test_a_folder_holding_another_or_a_finished_run_is_refused(finished_run, toy_folder):
    output, _ = finished_run
    before = _snapshot(output)
    same = load_config(overrides=tiny_overrides(toy_folder, output))
    with pytest.raises(RunExistsError, match="finished run"):
        QSENNTrainer(same).run()
    other = load_config(overrides=tiny_overrides(toy_folder, output) + ["sparse.n_per_class=3"])
    with pytest.raises(RunExistsError, match="another run .*sparse.n_per_class"):
        QSENNTrainer(other).run()
    assert _snapshot(output) == before, "a refused run must not touch the folder"


def test_a_foreign_non_empty_folder_is_refused(toy_folder, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(RunExistsError, match="not empty"):
        QSENNTrainer(load_config(overrides=tiny_overrides(toy_folder, tmp_path))).run()
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    "override, error, message",
    [
        ("sparse.n_features=500", ValueError, "exceeds the 96 channels of backbone test_resnet"),
        ("data.root=/nonexistent/data", FileNotFoundError, "no train sub-folder in '/nonexistent/data'"),
    ],
)
def test_bad_input_fails_before_the_run_folder_is_made(toy_folder, tmp_path, override, error, message):
    output = tmp_path / "run"
    config = load_config(overrides=tiny_overrides(toy_folder, output) + [override])
    with pytest.raises(error, match=message):
        QSENNTrainer(config).run()
    assert not output.exists()


def test_cli_reports_config_errors_without_a_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "timm_qsenn", "train", "dense.epoch=3", "--output", str(tmp_path / "r")],
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert "unknown config key 'dense.epoch'; did you mean dense.epochs?" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_reports_a_missing_dataset_without_a_traceback(toy_folder, tmp_path):
    args = tiny_overrides(toy_folder, tmp_path / "run") + ["data.root=/nonexistent/data"]
    result = subprocess.run(
        [sys.executable, "-m", "timm_qsenn", "train", *args], env=ENV, capture_output=True, text=True
    )
    assert result.returncode != 0
    assert "no train sub-folder in '/nonexistent/data'" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()


def test_from_pretrained_skips_the_dense_phase(finished_run, toy_folder, tmp_path):
    """A trained backbone file starts at selection; a Q-SENN model folder also brings its features and head."""
    reference, _ = finished_run
    trained = load_model(str(reference / "model"))
    backbone_file = tmp_path / "backbone.safetensors"
    save_file(trained.backbone.state_dict(), str(backbone_file))
    short = ["finetune.iterations=1", "finetune.epochs=[1]"]
    for source, name in ((backbone_file, "from_backbone"), (reference / "model", "from_model")):
        overrides = tiny_overrides(toy_folder, tmp_path / name) + short + [f"run.from_pretrained={source}"]
        summary = QSENNTrainer(load_config(overrides=overrides)).run()
        assert "dense" not in summary["seconds"] and summary["dense_accuracy"] is None
        model = load_model(str(tmp_path / name))
        assert model.head.stage == "ternary" and model.head.num_features == 8
        assert summary["qsenn_accuracy"] >= 0.6, (name, summary)
    # Started from a Q-SENN model, the run keeps its selected features.
    assert torch.equal(model.head.selection, trained.head.selection)
    with pytest.raises(FileNotFoundError, match="neither a model folder nor a weights file"):
        QSENNTrainer(
            load_config(
                overrides=tiny_overrides(toy_folder, tmp_path / "x")
                + [f"run.from_pretrained={tmp_path / 'missing.safetensors'}"]
            )
        ).run()


def test_a_dense_model_near_chance_is_warned_about(caplog):
    from timm_qsenn.train.summary import warn_if_near_chance

    with caplog.at_level("WARNING", logger="timm_qsenn.train.summary"):
        warn_if_near_chance(0.12, 10)
        assert "close to chance (10.0 %)" in caplog.text
        caplog.clear()
        warn_if_near_chance(0.5, 10)
        warn_if_near_chance(None, 10)
        assert not caplog.text
