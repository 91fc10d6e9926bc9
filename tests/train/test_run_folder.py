"""Run folders: a crash at any moment resumes exactly, one writer at a time, failed writes lose nothing, no pickles."""

import errno
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import save_file

from timm_qsenn.hub import load_model
from timm_qsenn.train import QSENNTrainer, load_config

from .conftest import ENV, final_weights, run_cli, tiny_overrides

DRIVER = Path(__file__).with_name("fault_driver.py")

# Where the fault driver kills the run (see fault_driver.py): a random file operation anywhere in the run; inside
# a checkpoint being written; at the commit point (the checkpoint folder is renamed, state.json not yet replaced);
# and inside the export of the trained model at the end.
_rng = random.Random(20261202)
KILL_POINTS = [
    f"any::{_rng.randint(100, 1500)}",
    f"replace:trainer.json:{_rng.randint(2, 50)}",
    f"replace:state.json:{_rng.randint(3, 50)}",
    "replace:README.md:1",
]


def _assert_same_result(reference: Path, output: Path) -> None:
    expected, actual = final_weights(reference), final_weights(output)
    assert expected.keys() == actual.keys()
    different = [k for k in expected if not torch.equal(expected[k], actual[k])]
    assert not different, f"the resumed run differs in {different[:5]}"
    summaries = [json.loads((run / "summary.json").read_text()) for run in (reference, output)]
    assert summaries[1]["qsenn_accuracy"] == pytest.approx(summaries[0]["qsenn_accuracy"])


def _committed_only(output: Path) -> None:
    """The checkpoints folder holds exactly the checkpoint state.json names, nothing half-made."""
    committed = json.loads((output / "state.json").read_text())["checkpoint"]["folder"]
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == [committed]


@pytest.mark.parametrize("kill_at", KILL_POINTS)
def test_a_run_killed_at_any_moment_resumes_to_identical_weights(finished_run, toy_folder, tmp_path, kill_at):
    reference, _ = finished_run
    output = tmp_path / "run"
    args = tiny_overrides(toy_folder, output) + ["run.checkpoint_steps=1"]
    killed = run_cli(args, dict(ENV, QSENN_KILL_AT=kill_at), launcher=[str(DRIVER)])
    out, _ = killed.communicate(timeout=300)
    assert killed.returncode == -signal.SIGKILL, f"the run was not killed at {kill_at}:\n{out[-3000:]}"
    resumed = run_cli(args)
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out[-3000:]
    assert "resuming the run" in out
    # The killed process held the lock: the kernel dropped it, and the new run says whose lock it took over.
    assert f"left by process {killed.pid}, which is no longer running" in out
    _assert_same_result(reference, output)
    _committed_only(output)
    assert load_model(str(output)).head.stage == "ternary"


def test_a_second_run_on_a_folder_in_use_stops_at_once_naming_the_first(toy_folder, tmp_path):
    output = tmp_path / "run"
    args = tiny_overrides(toy_folder, output) + ["run.checkpoint_steps=1"]
    first = run_cli(args)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            holder = json.loads((output / ".lock").read_text() or "{}")
        except (FileNotFoundError, json.JSONDecodeError):
            holder = {}
        if holder.get("pid") == first.pid or first.poll() is not None:
            break
        time.sleep(0.05)
    assert first.poll() is None, "the first run ended before the second could start"
    second = subprocess.run(
        [sys.executable, "-m", "timm_qsenn", "train", *args], env=ENV, capture_output=True, text=True, timeout=120
    )
    assert second.returncode != 0
    assert f"is in use by process {first.pid}" in second.stderr, second.stderr[-2000:]
    assert "Traceback" not in second.stderr
    assert first.poll() is None, "the second run must stop before the first one ends"
    out, _ = first.communicate(timeout=300)
    assert first.returncode == 0, out[-3000:]
    assert json.loads((output / "summary.json").read_text())["processes"] == 1


def _failing_after(calls: int, error: OSError):
    """A replacement for a method that works ``calls`` times, then raises ``error``."""
    count = {"n": 0}

    def install(original):
        def method(*args, **kwargs):
            count["n"] += 1
            if count["n"] > calls:
                raise error
            return original(*args, **kwargs)

        return method

    return install


def _single_threaded_run(config) -> dict:
    # The reference run is single-threaded: CPU kernels sum in a thread-dependent order.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return QSENNTrainer(config).run()
    finally:
        torch.set_num_threads(threads)


def test_a_failed_checkpoint_write_keeps_the_previous_checkpoint_and_the_run_resumes(
    finished_run, toy_folder, tmp_path, monkeypatch
):
    reference, _ = finished_run
    output = tmp_path / "run"
    config = load_config(overrides=tiny_overrides(toy_folder, output) + ["run.checkpoint_steps=1"])
    disk_full = OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(Accelerator, "save_state", _failing_after(6, disk_full)(Accelerator.save_state))
    with pytest.raises(OSError, match=r"000006\.partial \(No space left on device\).*resumes from it"):
        _single_threaded_run(config)
    state = json.loads((output / "state.json").read_text())
    assert state["checkpoint"]["folder"] == "000005" and not state["finished"]
    assert (output / "checkpoints" / "000005" / "model.safetensors").is_file()
    _committed_only(output)
    monkeypatch.undo()
    _single_threaded_run(config)
    _assert_same_result(reference, output)


def test_a_failed_model_save_leaves_a_resumable_run(finished_run, toy_folder, tmp_path, monkeypatch):
    import timm_qsenn.hub

    reference, _ = finished_run
    output = tmp_path / "run"
    config = load_config(overrides=tiny_overrides(toy_folder, output) + ["run.checkpoint_steps=1"])
    read_only = OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(timm_qsenn.hub, "save_pretrained", _failing_after(0, read_only)(timm_qsenn.hub.save_pretrained))
    with pytest.raises(OSError, match=rf"trained model in {output / 'model'} \(Read-only file system\).*finishes"):
        _single_threaded_run(config)
    assert not json.loads((output / "state.json").read_text())["finished"]
    assert not (output / "summary.json").exists()
    monkeypatch.undo()
    _single_threaded_run(config)
    _assert_same_result(reference, output)


def test_checkpoints_hold_no_pickle_of_the_packages_own(finished_run):
    output, _ = finished_run
    folder = output / "checkpoints" / json.loads((output / "state.json").read_text())["checkpoint"]["folder"]
    names = {p.name for p in folder.iterdir()}
    # Accelerate's own files: the model (safetensors), the optimizer (read back with weights_only=True) and the
    # random states (the one exception, see the README); the trainer's state is JSON.
    assert names == {"model.safetensors", "optimizer.bin", "random_states_0.pkl", "trainer.json"}, names
    torch.load(folder / "optimizer.bin", weights_only=True)
    assert json.loads((folder / "trainer.json").read_text())["scheduler"]
    package = Path(__file__).parents[2] / "timm_qsenn"
    unsafe = [str(p) for p in package.rglob("*.py") if "weights_only=False" in p.read_text()]
    assert not unsafe, unsafe


def _bad_weights(tmp_path: Path, finished_run) -> list[tuple[Path, str]]:
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 5)
    whole = (finished_run[0] / "model" / "model.safetensors").read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(whole[: len(whole) // 2])
    foreign = tmp_path / "foreign.safetensors"
    save_file({"backbone.stem.weight": torch.zeros(3, 3), "head.fc.bias": torch.zeros(4)}, str(foreign))
    return [(junk, "cannot be read"), (truncated, "cannot be read"), (foreign, "does not fit backbone test_resnet")]


def test_a_bad_from_pretrained_file_ends_with_one_line_and_no_folder(finished_run, toy_folder, tmp_path):
    for path, message in _bad_weights(tmp_path, finished_run):
        output = tmp_path / f"run_{path.stem}"
        args = tiny_overrides(toy_folder, output) + [f"run.from_pretrained={path}"]
        result = subprocess.run(
            [sys.executable, "-m", "timm_qsenn", "train", *args], env=ENV, capture_output=True, text=True
        )
        assert result.returncode != 0
        assert message in result.stderr and str(path) in result.stderr, result.stderr[-2000:]
        assert "Traceback" not in result.stderr
        assert not output.exists(), path


def test_a_budget_larger_than_the_layer_is_warned_about_before_the_run(toy_folder, tmp_path, caplog):
    short = ["dense.epochs=1", "finetune.iterations=1", "finetune.epochs=[1]", "sparse.n_per_class=100"]
    config = load_config(overrides=tiny_overrides(toy_folder, tmp_path / "run") + short)
    with caplog.at_level("WARNING", logger="timm_qsenn.train.setup"), pytest.warns(UserWarning, match="budget"):
        QSENNTrainer(config).run()
    assert "sparse.n_per_class=100.0 asks for at least as many weights per class as there are features" in caplog.text
