"""The numerically sensitive tests also under MKL's other code paths, whatever CPU this suite runs on.

MKL picks its kernels by CPU (AVX-512 or not), and summation order, hence rounding, follows. ``MKL_CBWR``
forces a path, so every CI machine also checks the paths its own CPU would not take.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

SENSITIVE = ["tests/sparse", "tests/test_ternary.py", "tests/test_losses.py"]


@pytest.mark.parametrize("path", ["COMPATIBLE", "AVX2"])
def test_sparse_and_quantisation_tests_pass_on_another_mkl_path(path):
    root = Path(__file__).parents[1]
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *SENSITIVE],
        cwd=root,
        env=dict(os.environ, MKL_CBWR=path, PYTHONPATH=str(root)),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, f"MKL_CBWR={path}:\n{result.stdout[-4000:]}"
