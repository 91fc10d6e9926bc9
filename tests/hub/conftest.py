"""Shared setup of the hub tests: a ternary model saved once, its logits, and a runner for fresh processes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import timm
import torch

import timm_qsenn  # noqa: F401  (registers the Q-SENN models)
from timm_qsenn import hub

from ..conftest import make_ternary

CLASSES = ["albatross", "blue jay", "cardinal", "dove | rock", "eagle"]
FEATURES = ["wing bar", "red crown", "hooked beak", "long tail", "webbed feet", "eye ring"]
METRICS = {"accuracy": 85.9, "sid@5": 0.71, "class_independence": 0.93, "contrastiveness": 0.88}


def run_python(script: str, env: dict[str, str], timeout: float = 120) -> str:
    """Run ``script`` in a fresh Python process with ``env`` added; return its stdout, failing on an error."""
    # Same thread count as this process, so that logits can be compared bit for bit.
    script = f"import torch\ntorch.set_num_threads({torch.get_num_threads()})\n" + textwrap.dedent(script)
    result = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, "HF_HUB_DISABLE_TELEMETRY": "1", **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, f"subprocess failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def logits_of(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's logits for ``x`` in eval mode."""
    with torch.no_grad():
        return model.eval()(x)


@pytest.fixture(scope="package")
def saved(tmp_path_factory):
    """A ternary Q-SENN on test_resnet with names, saved once: (model, folder, input, logits)."""
    torch.manual_seed(0)
    model = timm.create_model("qsenn", backbone="test_resnet", num_classes=5)
    model = make_ternary(model, [3, 17, 40, 41, 64, 90], n_per_class=2.0, seed=1)
    model.feature_names = list(FEATURES)
    model.pretrained_cfg["label_names"] = list(CLASSES)
    folder = tmp_path_factory.mktemp("saved") / "tiny"
    hub.save_pretrained(model, folder, metrics=METRICS, recipe={"seed": 3, "n_features": 6}, dataset="cub200")
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = model(x)
    return model, folder, x, logits
