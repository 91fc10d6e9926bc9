import json
import re
import subprocess
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from timm_qsenn.cli import main
from timm_qsenn.explain import write_report
from timm_qsenn.metrics import evaluate

from .conftest import CLASS_NAMES

CHROMIUM = Path("/usr/bin/chromium")


def _chromium(*args, tmp_path):
    command = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--enable-logging=stderr",
        "--v=0",
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=True)


@pytest.mark.skipif(not CHROMIUM.exists(), reason="headless Chromium (/usr/bin/chromium) is not installed")
def test_report_renders_in_headless_chromium(ternary_cnn, tmp_path):
    images, labels = torch.randn(9, 3, 48, 48), torch.randint(0, 5, (9,))
    loader = DataLoader(TensorDataset(images, labels), batch_size=4)
    metrics = evaluate(ternary_cnn, loader, k=2)
    ternary_cnn.feature_names = [f"<b>part</b> {j}" for j in range(ternary_cnn.head.num_features)]
    index = write_report(ternary_cnn, loader, tmp_path / "report", metrics=metrics, top=3)
    page = index.read_text()
    assert "<b>part</b>" not in page and "&lt;b&gt;part&lt;/b&gt; 0" in page  # names are escaped
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert sources and all(not Path(s).is_absolute() and (index.parent / s).is_file() for s in sources)
    assert json.loads((index.parent / "metrics.json").read_text())["accuracy"] == metrics.accuracy
    assert json.loads((index.parent / "explanation.json").read_text())["classes"][0]["name"] == "albatross"

    # A copy of the page with a probe that records, after loading, how many images failed to decode.
    probe = index.parent / "probe.html"
    probe.write_text(
        page.replace(
            "</body>",
            "<script>window.addEventListener('load', () => { const images = [...document.images];"
            "document.body.dataset.images = images.length; document.body.dataset.broken = "
            "images.filter(i => !(i.complete && i.naturalWidth > 0)).length; });</script></body>",
        )
    )
    dom = _chromium("--virtual-time-budget=5000", "--dump-dom", probe.as_uri(), tmp_path=tmp_path)
    assert f'data-images="{len(sources)}"' in dom.stdout and 'data-broken="0"' in dom.stdout
    assert ":CONSOLE" not in dom.stderr, dom.stderr  # no script or console errors

    screenshot = tmp_path / "report.png"
    shot = _chromium(f"--screenshot={screenshot}", "--window-size=1280,1600", index.as_uri(), tmp_path=tmp_path)
    assert ":CONSOLE" not in shot.stderr
    picture = Image.open(screenshot)
    assert picture.size == (1280, 1600)
    assert len(picture.convert("RGB").resize((64, 80)).getcolors(maxcolors=64 * 80)) > 20  # something was drawn


def test_cli_explain_report_and_eval(ternary_cnn, tmp_path, capsys):
    checkpoint = tmp_path / "model.pth"
    torch.save(ternary_cnn.state_dict(), checkpoint)
    picture = tmp_path / "bird.jpg"
    Image.fromarray((torch.rand(50, 60, 3) * 255).byte().numpy()).save(picture)
    data = tmp_path / "data"
    for split in ("train", "val"):
        for c, name in enumerate(CLASS_NAMES):
            (data / split / name).mkdir(parents=True)
            for i in range(2):
                Image.fromarray((torch.rand(40, 40, 3) * 255).byte().numpy()).save(data / split / name / f"{c}{i}.jpg")
    model_args = ["qsenn", "--checkpoint", str(checkpoint), "--backbone", "test_resnet", "--device", "cpu"]

    with pytest.raises(SystemExit) as done:
        main(["explain", *model_args, str(picture), "--out", str(tmp_path / "explained"), "--top", "2"])
    assert done.value.code == 0
    assert (tmp_path / "explained" / "bird.png").is_file()
    assert json.loads((tmp_path / "explained" / "bird.json").read_text())["contributions"]

    with pytest.raises(SystemExit) as done:
        args = ["eval", *model_args, "--data", str(data), "--batch-size", "4", "--workers", "0", "--k", "2"]
        main([*args, "--out", str(tmp_path / "metrics.json")])
    assert done.value.code == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["num_images"] == 10 and metrics["feature_split"] == "train" and metrics["num_feature_images"] == 10
    assert "SID@2 (QPM)" in capsys.readouterr().out

    with pytest.raises(SystemExit) as done:
        main(
            ["report", *model_args, "--data", str(data), "--workers", "0", "--out", str(tmp_path / "report")]
            + ["--metrics", str(tmp_path / "metrics.json"), "--top", "2"]
        )
    assert done.value.code == 0
    page = (tmp_path / "report" / "index.html").read_text()
    assert "bunting" in page  # class names come from the image folder when the model has none

    with pytest.raises(SystemExit, match="qsenn explain"):
        main(["explain", str(tmp_path / "no-such-model"), str(picture), "--out", str(tmp_path)])
