"""A tiny, learnable image dataset and the config of a seconds-long Q-SENN run on it."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from timm_qsenn.train import QSENNTrainer, load_config

CLASSES = 4


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
