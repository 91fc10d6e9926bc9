"""Registered tags (hub/tags.py) and hf-hub: loading, both from an offline Hub cache."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import timm
import torch

from timm_qsenn import hub
from timm_qsenn.qsenn import HUB_CONFIGS_ENV

from .conftest import FEATURES, logits_of, run_python


def _hand_made_cache(cache: Path, repo_id: str, folder: Path) -> None:
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    shutil.copytree(folder, repo / "snapshots" / sha, ignore=shutil.ignore_patterns("README.md"))


def test_hf_hub_and_registered_tag_from_an_offline_cache(saved, tmp_path):
    _, folder, x, logits = saved
    cache = tmp_path / "hub"
    _hand_made_cache(cache, "qsenn-test/tiny-cub", folder)
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    loaded = timm.create_model("hf-hub:qsenn-test/tiny-cub", pretrained=True, cache_dir=cache)
    assert torch.equal(logits_of(loaded, x), logits)
    assert torch.equal(logits_of(hub.load_model("hf-hub:qsenn-test/tiny-cub", cache_dir=cache), x), logits)

    configs = tmp_path / "hub_configs"
    written = hub.write_hub_config(folder, "qsenn-test/tiny-cub", "tinycub", configs)
    assert written.name == "qsenn.tinycub.json"
    torch.save({"x": x, "logits": logits}, tmp_path / "expected.pt")
    out = run_python(
        f"""
        import torch, timm, timm_qsenn
        from timm_qsenn import hub
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        assert "qsenn.tinycub" in timm.list_pretrained("qsenn.*")
        for model in (timm.create_model("qsenn.tinycub", pretrained=True), hub.load_model("qsenn.tinycub")):
            with torch.no_grad():
                assert torch.equal(model.eval()(expected["x"]), expected["logits"])
            assert model.feature_names == {FEATURES!r}
        print("tag ok")
        """,
        {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), HUB_CONFIGS_ENV: str(configs)},
    )
    assert "tag ok" in out
