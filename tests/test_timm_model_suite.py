"""timm's own model tests (``tests/test_models.py`` of the installed timm's sdist) for every ``*_qsenn`` model.

The sdist comes from PyPI (the one download a test makes, a pinned package from a registry) and is kept in the
user cache, so a second run reads it from disk. Set ``TIMM_QSENN_TIMM_SDIST`` to a local ``timm-X.tar.gz`` to
run without the registry.
"""

import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import timm

VERSION = timm.__version__
SELECTION = "qsenn and not pretrained"


def _sdist(download_to: Path) -> Path:
    local = os.environ.get("TIMM_QSENN_TIMM_SDIST")
    if local:
        return Path(local)
    download_to.mkdir(parents=True, exist_ok=True)
    found = sorted(download_to.glob(f"timm-{VERSION}.tar.gz"))
    if found:
        return found[0]
    result = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", f"timm=={VERSION}", "-d"]
        + [str(download_to)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    found = sorted(download_to.glob(f"timm-{VERSION}.tar.gz"))
    assert result.returncode == 0 and found, (
        f"could not download the timm {VERSION} sdist from PyPI (needed for timm's own model tests); set "
        f"TIMM_QSENN_TIMM_SDIST to a local copy.\n{result.stderr[-2000:]}"
    )
    return found[0]


def _timm_tests(tmp_path: Path) -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "timm_qsenn" / "sdist"
    with tarfile.open(_sdist(cache)) as archive:
        members = [m for m in archive.getmembers() if m.name.startswith(f"timm-{VERSION}/tests/")]
        archive.extractall(tmp_path, members=members, filter="data")
    tests = tmp_path / f"timm-{VERSION}" / "tests"
    # The only change to timm's tests: the plugin is imported, so that its models are registered.
    with open(tests / "conftest.py", "a") as f:
        f.write("\nimport timm_qsenn  # noqa: E402,F401\n")
    return tests


@pytest.mark.slow
def test_timms_own_model_tests_pass_for_every_qsenn_model(tmp_path):
    tests = _timm_tests(tmp_path)
    package_root = Path(__file__).parents[1]
    # Two workers of one thread each: most of these tests are Python-bound (building, tracing, scripting).
    env = dict(os.environ, PYTHONPATH=str(package_root), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "test_models.py", "-k", SELECTION, "-q", "-p", "no:cacheprovider"]
        + ["-n", "2", "-W", "ignore", "--no-header", "-rf"],
        cwd=tests,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else result.stderr[-2000:]
    assert result.returncode == 0, result.stdout[-6000:]
    passed = int(re.search(r"(\d+) passed", summary).group(1))
    assert "failed" not in summary and "error" not in summary, summary
    # Every *_qsenn model and tag takes part: timm's suite selects about 250 tests for them.
    assert passed >= 200, summary
    shutil.rmtree(tests, ignore_errors=True)
    print(f"timm {VERSION} tests/test_models.py -k '{SELECTION}': {summary}")
