"""Push and pull (hub/remote.py) through a loopback fake Hub, and the folded export read by plain timm."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from timm_qsenn import hub

from .conftest import CLASSES, run_python

FAKE_HUB = Path(__file__).with_name("fake_hub.py")


@pytest.fixture
def fake_hub(tmp_path):
    """A Hub-compatible server on 127.0.0.1 for this test: (endpoint, storage folder); stopped by pid."""
    root = tmp_path / "fake-hub"
    server = subprocess.Popen(
        [sys.executable, str(FAKE_HUB), str(root)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        line = server.stdout.readline()
        assert line.startswith("PORT "), f"fake hub did not start: {line!r}"
        yield f"http://127.0.0.1:{int(line.split()[1])}", root
    finally:
        os.kill(server.pid, signal.SIGTERM)
        server.wait(timeout=10)
        server.stdout.close()


def test_push_pull_and_folded_export_through_a_fake_hub(saved, fake_hub, tmp_path):
    _, folder, x, logits = saved
    endpoint, storage = fake_hub
    run = tmp_path / "run"
    shutil.copytree(folder, run / "model")
    torch.save({"x": x, "logits": logits}, tmp_path / "expected.pt")
    env = {"HF_ENDPOINT": endpoint, "HF_TOKEN": "fake-token", "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf")}
    out = run_python(
        f"""
        import torch, timm, timm_qsenn
        from huggingface_hub import HfApi
        from timm_qsenn import cli, hub

        def run_cli(*argv):
            try:
                cli.main(list(argv))
            except SystemExit as e:
                assert e.code == 0, e

        expected = torch.load({str(tmp_path / "expected.pt")!r})
        def same(model):
            with torch.no_grad():
                return torch.equal(model.eval()(expected["x"]), expected["logits"])

        run_cli("push", {str(run)!r}, "org/tiny", "--private")
        assert same(timm.create_model("hf-hub:org/tiny", pretrained=True))
        assert same(hub.load_model("hf-hub:org/tiny"))

        # A README written by a person on the Hub survives pushes unless asked.
        api = HfApi()
        api.create_repo("org/carded", exist_ok=True)
        api.upload_file(path_or_fileobj=b"# written by hand\\n", path_in_repo="README.md", repo_id="org/carded")
        hub.push_to_hub({str(folder)!r}, "org/carded")
        assert same(timm.create_model("hf-hub:org/carded", pretrained=True))
        open({str(tmp_path / "kept.md")!r}, "wb").write(open({str(storage)!r} + "/org/carded/README.md", "rb").read())
        hub.push_to_hub({str(folder)!r}, "org/carded", overwrite_card=True)

        hub.push_to_hub(hub.load_model({str(folder)!r}), "org/direct", commit_message="from memory")
        assert same(hub.load_model("hf-hub:org/direct"))

        run_cli("push", {str(run)!r}, "org/tiny-folded", "--folded")
        run_cli("pull", "org/tiny", {str(tmp_path / "pulled")!r})
        assert same(hub.load_model({str(tmp_path / "pulled")!r}))
        print("push ok")
        """,
        env,
    )
    assert "push ok" in out
    assert (tmp_path / "kept.md").read_text() == "# written by hand\n"
    replaced = (storage / "org" / "carded" / "README.md").read_text()
    assert "import timm_qsenn" in replaced and 'create_model("hf-hub:org/carded"' in replaced
    for repo in ("tiny", "tiny-folded", "carded", "direct"):
        names = {p.name for p in (storage / "org" / repo).iterdir()}
        assert not any(n.endswith((".bin", ".pth", ".pt", ".pkl")) for n in names), names
    assert {"config.json", "model.safetensors", "README.md", hub.SIDECAR_NAME} <= {
        p.name for p in (storage / "org" / "tiny-folded").iterdir()
    }

    # The folded export, from the fake Hub and from a local folder, in a process that never imports timm_qsenn.
    hub.export_folded(saved[0], tmp_path / "folded")
    out = run_python(
        f"""
        import sys, torch, timm
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        for name in ("hf-hub:org/tiny-folded", {"local-dir:" + str(tmp_path / "folded")!r}):
            model = timm.create_model(name, pretrained=True).eval()
            with torch.no_grad():
                error = (model(expected["x"]) - expected["logits"]).abs().max().item()
            assert error < 1e-4, (name, error)
            print(type(model).__name__, model.pretrained_cfg["label_names"][3], error)
        assert "timm_qsenn" not in sys.modules
        print("plain ok")
        """,
        env,
    )
    assert "plain ok" in out and f"ResNet {CLASSES[3]}" in out
