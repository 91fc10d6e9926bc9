"""Q-SENN models inside timm's own scripts: `--device-modules timm_qsenn` and the `qsenn run` runner.

timm's train.py, validate.py, inference.py and benchmark.py live only in timm's git repository, not in its
wheel. The tests that run them need a checkout named by $TIMM_SCRIPTS_DIR; the runner and the calls those
scripts make are tested without one.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import resolve_data_config

import timm_qsenn  # noqa: F401

SCRIPTS = os.environ.get("TIMM_SCRIPTS_DIR")
ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="2")
QSENN = str(Path(sys.executable).with_name("qsenn"))  # the console script installed beside this Python


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def test_runner_registers_models_before_the_script_runs(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(
        "import sys, timm\n"
        "m = timm.create_model(sys.argv[1], backbone='test_resnet', num_classes=int(sys.argv[2]))\n"
        "print('OK', type(m).__name__, m.num_classes, __name__)\n"
    )
    for launcher in ([QSENN], [sys.executable, "-m", "timm_qsenn"]):
        out = _run(*launcher, "run", str(script), "qsenn", "4", cwd=tmp_path).stdout
        assert "OK QSENN 4 __main__" in out
    missing = subprocess.run([QSENN, "run", str(tmp_path / "nope.py")], capture_output=True, text=True)
    assert missing.returncode != 0 and "does not exist" in missing.stderr


def test_the_calls_timm_scripts_make():
    # train.py passes every option, unset ones as None, then resolves the data config from the model.
    model = timm.create_model(
        "qsenn",
        pretrained=False,
        in_chans=3,
        num_classes=3,
        drop_rate=0.0,
        drop_path_rate=None,
        drop_block_rate=None,
        global_pool=None,
        bn_momentum=None,
        bn_eps=None,
        scriptable=False,
        checkpoint_path=None,
        backbone="test_resnet",
    )
    config = resolve_data_config({}, model=model)
    assert config["input_size"] == (3, 160, 160) and config["mean"] == (0.5, 0.5, 0.5)
    assert model.get_classifier().weight.shape == (3, model.num_features)
    model.set_grad_checkpointing()
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 3)


def _image_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "validation"):
        for c in range(3):
            folder = root / split / f"c{c}"
            folder.mkdir(parents=True)
            for i in range(6):
                pixels = (rng.random((40, 40, 3)) * 80 + c * 80).astype("uint8")
                Image.fromarray(pixels).save(folder / f"{c}_{i}.png")
    return root


@pytest.mark.skipif(not SCRIPTS, reason="set TIMM_SCRIPTS_DIR to a pytorch-image-models checkout")
def test_timm_scripts_end_to_end(tmp_path):
    scripts = Path(SCRIPTS)
    data = _image_folder(tmp_path / "data")
    common = ["--model", "qsenn", "--model-kwargs", "backbone=test_resnet", "--num-classes", "3"]
    common += ["--img-size", "64", "--device", "cpu", "--workers", "0"]
    _run(
        sys.executable, str(scripts / "train.py"), "--device-modules", "timm_qsenn", "--data-dir", str(data),
        *common, "--batch-size", "6", "--epochs", "1", "--output", str(tmp_path / "out"), "--opt", "sgd",
        "--lr", "0.01", "--no-prefetcher", "--experiment", "qs", cwd=tmp_path,
    )  # fmt: skip
    checkpoint = tmp_path / "out" / "qs" / "last.pth.tar"
    assert checkpoint.is_file()
    out = _run(
        QSENN, "run", str(scripts / "validate.py"), str(data), "--split", "validation", *common,
        "--checkpoint", str(checkpoint), "--batch-size", "6", "--no-prefetcher", "--results-file",
        str(tmp_path / "val.json"), "--results-format", "json", cwd=tmp_path,
    )  # fmt: skip
    results = json.loads((tmp_path / "val.json").read_text())
    assert results["model"] == "qsenn" and 0 <= results["top1"] <= 100, out.stdout[-500:]
    _run(
        QSENN, "run", str(scripts / "inference.py"), str(data / "validation"), *common, "--checkpoint",
        str(checkpoint), "--batch-size", "6", "--topk", "2", "--fullname", "--results-dir",
        str(tmp_path / "inference"), cwd=tmp_path,
    )  # fmt: skip
    assert len((tmp_path / "inference" / "qsenn-64.csv").read_text().splitlines()) == 1 + 18
    out = _run(
        QSENN, "run", str(scripts / "benchmark.py"), *common[:-2], "--bench", "inference",
        "--num-bench-iter", "5", "--num-warm-iter", "1", "--batch-size", "4", cwd=tmp_path,
    )  # fmt: skip
    assert "infer_samples_per_sec" in out.stdout
