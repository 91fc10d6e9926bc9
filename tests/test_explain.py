import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from timm_qsenn.cli import main
from timm_qsenn.explain import (
    explain_image,
    feature_contributions,
    feature_gallery,
    global_explanation,
    heatmap_overlay,
    plot_class_sheet,
    plot_explanation,
    write_report,
)
from timm_qsenn.metrics import evaluate

from .conftest import make_ternary

CHROMIUM = Path("/usr/bin/chromium")
CLASS_NAMES = ["albatross", "bunting", "cormorant", "dove", "egret"]


def _ternary(model, channels, n_per_class=3, seed=0):
    model = make_ternary(model, channels, n_per_class, seed)
    model.pretrained_cfg["label_names"] = list(CLASS_NAMES)
    return model


@pytest.fixture
def ternary_cnn(tiny_cnn):
    return _ternary(tiny_cnn, list(range(0, 60, 4)))


def test_global_explanation_lists_signed_features_both_ways(ternary_cnn):
    explanation = global_explanation(ternary_cnn)
    weight = ternary_cnn.head.fc.weight
    for cls in explanation.classes:
        assert cls.name == CLASS_NAMES[cls.index]
        assert [u.index for u in cls.features] == sorted(
            weight[cls.index].nonzero().flatten().tolist(), key=lambda j: (-float(weight[cls.index, j]), j)
        )
        assert all(u.sign == int(torch.sign(weight[cls.index, u.index])) for u in cls.features)
        for use in cls.features:
            assert cls.index in explanation.feature_classes[use.index]
    assert json.loads(explanation.to_json())["feature_names"][0] == "feature 0"


@pytest.mark.parametrize("stage", ["ternary", "dense"])
def test_contributions_sum_to_logit_minus_bias_for_every_image(request, stage):
    model = _ternary(request.getfixturevalue("tiny_cnn"), list(range(0, 96, 6))) if stage == "ternary" else None
    if model is None:
        model = request.getfixturevalue("tiny_vit")  # dense head, token backbone
    images = torch.randn(6, 3, 48, 48)
    with torch.no_grad():
        out = model.forward_qsenn(images)
        logits = model(images)
    weight, bias = model.head.fc.weight.double(), model.head.fc.bias.double()
    contributions = feature_contributions(model, out.features)
    expected = torch.nn.functional.linear(model.head.normalize(out.features.double()), weight)
    assert torch.allclose(contributions.sum(dim=2), expected, rtol=0, atol=1e-12)
    assert torch.allclose(contributions.sum(dim=2) + bias, logits.double(), atol=1e-4)
    for image, image_logits in zip(images, logits):
        explanation = explain_image(model, image)
        total = sum(c.contribution for c in explanation.contributions)
        assert total == pytest.approx(explanation.logit - explanation.bias, rel=0, abs=1e-12)
        assert explanation.logit == pytest.approx(float(image_logits.max()), abs=1e-4)
        assert explanation.predicted == int(image_logits.argmax())
        assert explanation.runner_up == int(image_logits.topk(2).indices[1])
        margin = sum(s.margin for s in explanation.separating)
        assert margin + explanation.bias - explanation.runner_up_bias == pytest.approx(
            explanation.logit - explanation.runner_up_logit, abs=1e-12
        )


def test_local_explanation_data_maps_and_json(ternary_cnn):
    image = Image.fromarray((torch.rand(70, 90, 3) * 255).byte().numpy())
    explanation = explain_image(ternary_cnn, image, label=2, max_maps=3)
    height, width = explanation.image_size
    assert (height, width) == tuple(ternary_cnn.pretrained_cfg["input_size"][1:])
    assert (
        explanation.image.shape == (3, height, width) and 0 <= explanation.image.min() <= explanation.image.max() <= 1
    )
    assert explanation.label_name == "cormorant" and explanation.predicted_name in CLASS_NAMES
    assert 0 < len(explanation.feature_maps) <= 6
    assert all(m.shape == (height, width) for m in explanation.feature_maps.values())
    contributions = [c.contribution for c in explanation.contributions]
    assert contributions == sorted(contributions, reverse=True)
    for c in explanation.contributions:
        assert 0 <= c.peak[0] < height and 0 <= c.peak[1] < width
        assert c.contribution == pytest.approx(c.weight * c.normalized)
    data = json.loads(explanation.to_json())
    assert set(data) >= {"predicted", "contributions", "runner_up", "separating", "logit", "bias"}
    assert "feature_maps" not in data and "image" not in data
    with pytest.raises(ValueError, match="one image"):
        explain_image(ternary_cnn, torch.rand(2, 3, 32, 32))


def test_feature_names_reach_every_explanation(ternary_cnn):
    names = [f"part {j}" for j in range(ternary_cnn.head.num_features)]
    ternary_cnn.feature_names = names
    explanation = explain_image(ternary_cnn, torch.randn(3, 40, 40))
    assert all(c.name == names[c.index] for c in explanation.contributions)
    assert global_explanation(ternary_cnn).feature_names == names


def test_feature_gallery_keeps_the_most_activating_images(ternary_cnn):
    images, labels = torch.randn(11, 3, 40, 40), torch.randint(0, 5, (11,))
    loader = DataLoader(TensorDataset(images, labels), batch_size=4)
    gallery = feature_gallery(ternary_cnn, loader, top=3, size=32)
    with torch.no_grad():
        features = ternary_cnn.forward_qsenn(images).features
    used = ternary_cnn.head.fc.weight.ne(0).any(0).nonzero().flatten().tolist()
    assert sorted(gallery.features) == used
    for j, examples in gallery.features.items():
        # Compared by activation: a dead feature ties on every image.
        assert [e.activation for e in examples] == pytest.approx(features[:, j].topk(3).values.tolist(), abs=1e-6)
        assert all(e.activation == pytest.approx(float(features[e.index, j]), abs=1e-6) for e in examples)
        assert all(e.label == int(labels[e.index]) and max(e.thumbnail.size) == 32 for e in examples)
    assert json.loads(json.dumps(gallery.to_dict()))
    with pytest.raises(ValueError, match="shuffle"):
        feature_gallery(ternary_cnn, DataLoader(TensorDataset(images, labels), shuffle=True))


def test_heatmap_overlay_keeps_cold_pixels_and_colours_hot_ones():
    image = torch.full((3, 4, 4), 0.5)
    heat = torch.zeros(4, 4)
    heat[1, 2] = 3.0
    out = heatmap_overlay(image, heat)
    assert torch.equal(out[:, 0, 0], image[:, 0, 0])
    assert out[0, 1, 2] > 0.6 and out[2, 1, 2] < 0.4  # hottest pixel turns red


def test_figures(ternary_cnn, tmp_path):
    pytest.importorskip("matplotlib")
    explanation = explain_image(ternary_cnn, torch.randn(3, 48, 48))
    figure = plot_explanation(explanation, top=3)
    figure.savefig(tmp_path / "local.png")
    loader = DataLoader(TensorDataset(torch.randn(6, 3, 32, 32), torch.randint(0, 5, (6,))), batch_size=3)
    sheet = plot_class_sheet(ternary_cnn, 1, feature_gallery(ternary_cnn, loader, top=2, size=32))
    sheet.savefig(tmp_path / "sheet.png")
    plot_class_sheet(ternary_cnn, 0).savefig(tmp_path / "bars.png")
    assert all(Image.open(tmp_path / f).size[0] > 100 for f in ("local.png", "sheet.png", "bars.png"))
    with pytest.raises(ValueError, match="class_index"):
        plot_class_sheet(ternary_cnn, 5)


def test_figures_explain_a_missing_matplotlib(ternary_cnn, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    explanation = explain_image(ternary_cnn, torch.randn(3, 32, 32))
    with pytest.raises(ImportError, match=r"timm-qsenn\[plot\]"):
        plot_explanation(explanation)


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
