"""A tiny, learnable image dataset, the config of a seconds-long Q-SENN run on it, and runs of `qsenn train`."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from timm_qsenn.train import QSENNTrainer, load_config

CLASSES = 4
# Child runs: no Hub, one thread each (two processes share two cores), output as it comes.
ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _toy_image(label: int, rng: np.random.Generator) -> Image.Image:
    """A noisy image whose class sets both the colour and the corner of a bright square."""
    pixels = rng.normal(0.35, 0.12, (32, 32, 3))
    pixels[..., label % 3] += 0.25
    y, x = divmod(label, 2)
    pixels[4 + 16 * y : 12 + 16 * y, 4 + 16 * x : 12 + 16 * x] += 0.5
    return Image.fromarray((np.clip(pixels, 0, 1) * 255).astype("uint8"))


@pytest.fixture(scope="session")
def toy_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("toy")
    rng = np.random.default_rng(0)
    for split, count in (("train", 16), ("test", 8)):
        for label in range(CLASSES):
            folder = root / split / f"class_{label}"
            folder.mkdir(parents=True)
            for i in range(count):
                _toy_image(label, rng).save(folder / f"{i}.png")
    return root


def tiny_overrides(root: Path, output: Path, backbone: str = "test_resnet") -> list[str]:
    """A whole Q-SENN run (dense, selection, 4 iterations) on the toy data in seconds."""
    return [
        f"model.backbone={backbone}",
        "model.pretrained=false",
        "data.dataset=folder",
        f"data.root={root}",
        "data.img_size=32",
        "data.augment=light",
        "data.batch_size=8",
        "data.eval_batch_size=16",
        "data.workers=0",
        "dense.epochs=3",
        "dense.lr=0.05",
        "dense.head_lr=0.05",
        "dense.decay_epochs=2",
        "sparse.n_features=8",
        "sparse.n_per_class=2",
        "sparse.n_lambdas=20",
        "finetune.epochs=[1, 1, 1, 2]",
        "finetune.lr=0.002",
        "run.log_with=[]",
        "run.eval_every=0",
        f"run.output={output}",
    ]


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    """The weights of the checkpoint that the run's state.json commits to."""
    folder = json.loads((run / "state.json").read_text())["checkpoint"]["folder"]
    return load_file(str(run / "checkpoints" / folder / "model.safetensors"))


@pytest.fixture(scope="session")
def finished_run(toy_folder, tmp_path_factory):
    """An uninterrupted tiny run, checkpointed every step: the reference for resumed and failed runs."""
    output = tmp_path_factory.mktemp("runs") / "uninterrupted"
    config = load_config(overrides=tiny_overrides(toy_folder, output) + ["run.checkpoint_steps=1"])
    # The killed and resumed runs below run with OMP_NUM_THREADS=1; CPU kernels sum in a thread-dependent order.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = QSENNTrainer(config).run()
    finally:
        torch.set_num_threads(threads)
    return output, summary


def run_cli(args: list[str], env: dict[str, str] | None = None, launcher: list[str] | None = None) -> subprocess.Popen:
    """`qsenn train ARGS` in a child process (or ``launcher ... train ARGS``), stdout and stderr together."""
    return subprocess.Popen(
        [sys.executable, *(launcher or ["-m", "timm_qsenn"]), "train", *args],
        env=env or ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def train_two_processes(args: list[str], port: int) -> subprocess.CompletedProcess:
    """`qsenn train ARGS` under torchrun with 2 CPU processes; the test asserts on its return code."""
    return subprocess.run(
        # torchrun from this interpreter: a venv's bin folder need not be on PATH.
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
        + ["-m", "timm_qsenn", "train", *args],
        env=dict(ENV, ACCELERATE_USE_CPU="true"),
        capture_output=True,
        text=True,
        timeout=400,
    )


def kill_when(proc: subprocess.Popen, state_path: Path, phase: str, epoch: int, batch: int) -> dict:
    """SIGKILL the run once state.json records a checkpoint at or past (phase, epoch, batch)."""
    deadline = time.time() + 240
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before it could be killed:\n{proc.stdout.read()[-3000:]}")
        try:
            checkpoint = json.loads(state_path.read_text())["checkpoint"] or {}
        except (FileNotFoundError, json.JSONDecodeError):
            checkpoint = {}
        if checkpoint.get("phase") == phase and (checkpoint["epoch"], checkpoint["batch"]) >= (epoch, batch):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return checkpoint
        time.sleep(0.02)
    proc.kill()
    raise AssertionError("timed out waiting for the checkpoint")
