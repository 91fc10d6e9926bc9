"""Sharing through the Hub, all offline: save/load round trips on every timm path, the packed ternary layer,
model cards, push/pull through a loopback fake Hub, the plugin-free folded export, and bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import timm_qsenn  # noqa: F401  (registers the Q-SENN models)
from timm_qsenn import QSENN, hub, quantize_ternary, ternary_bias
from timm_qsenn.explain import global_explanation
from timm_qsenn.qsenn import HUB_CONFIGS_ENV

FAKE_HUB = Path(__file__).with_name("fake_hub.py")
CLASSES = ["albatross", "blue jay", "cardinal", "dove | rock", "eagle"]
FEATURES = ["wing bar", "red crown", "hooked beak", "long tail", "webbed feet", "eye ring"]
METRICS = {"accuracy": 85.9, "sid@5": 0.71, "class_independence": 0.93, "contrastiveness": 0.88}


def _make_ternary(model: QSENN, channels: list[int], n_per_class: float = 2.0) -> QSENN:
    """Move a fresh model's head to the ternary stage with random statistics and weights."""
    g = torch.Generator().manual_seed(1)
    n = len(channels)
    model.head.select(channels)
    model.head.set_normalization(torch.rand(n, generator=g), torch.rand(n, generator=g) + 0.5)
    t = quantize_ternary(torch.randn(model.num_classes, n, generator=g), n_per_class)
    model.head.set_class_layer(t.weight, ternary_bias(t.codes, torch.randn(model.num_classes, generator=g)))
    return model.eval()


def _subprocess(script: str, env: dict[str, str], timeout: float = 120) -> str:
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


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A ternary Q-SENN on test_resnet with names, saved once: (model, folder, input, logits)."""
    torch.manual_seed(0)
    model = timm.create_model("qsenn", backbone="test_resnet", num_classes=5)
    model = _make_ternary(model, [3, 17, 40, 41, 64, 90])
    model.feature_names = list(FEATURES)
    model.pretrained_cfg["label_names"] = list(CLASSES)
    folder = tmp_path_factory.mktemp("saved") / "tiny"
    hub.save_pretrained(model, folder, metrics=METRICS, recipe={"seed": 3, "n_features": 6}, dataset="cub200")
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = model(x)
    return model, folder, x, logits


def _logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


# -- layout and round trips ----------------------------------------------------------------------------------


def test_save_pretrained_writes_timm_layout_with_qsenn_metadata(saved):
    model, folder, _, _ = saved
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "qsenn"
    assert config["label_names"] == CLASSES
    args = config["model_args"]
    assert args["backbone"] == "test_resnet" and args["pretrained_backbone"] is False
    assert args["feature_names"] == FEATURES and args["num_classes"] == 5
    meta = config["qsenn"]
    assert meta["stage"] == "ternary" and meta["n_features"] == 6 and meta["backbone_channels"] == 96
    assert meta["selection"] == [3, 17, 40, 41, 64, 90]
    assert meta["n_per_class"] == pytest.approx(model.head.fc.weight.count_nonzero().item() / 5)
    assert meta["scale"] == pytest.approx(model.head.ternary_codes()[1])
    assert meta["metrics"] == METRICS and meta["recipe"]["seed"] == 3 and meta["dataset"] == "cub200"
    assert meta["package_version"] == timm_qsenn.__version__
    assert "qsenn" not in config["pretrained_cfg"]  # Q-SENN keys stay out of timm's PretrainedCfg
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        metadata = f.metadata()
        keys = set(f.keys())
    assert metadata["timm_qsenn.class_layer_format"] == "qsenn-ternary-2bit"
    assert metadata["timm_qsenn.class_layer_format_version"] == "1"
    assert metadata["timm_qsenn.format_version"] == str(hub.FORMAT_VERSION)
    assert "head.fc.weight_packed" in keys and "head.fc.weight" not in keys


def test_local_dir_round_trip_is_exact(saved):
    model, folder, x, logits = saved
    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True)
    assert torch.equal(_logits(loaded, x), logits)
    assert loaded.head.stage == "ternary"
    assert loaded.feature_names == FEATURES
    assert loaded.pretrained_cfg["label_names"] == CLASSES


def test_load_model_reads_folders_and_run_folders(saved, tmp_path):
    _, folder, x, logits = saved
    run = tmp_path / "run"
    shutil.copytree(folder, run / "model")
    for source in (folder, str(folder), run, f"local-dir:{folder}"):
        loaded = hub.load_model(source)
        assert isinstance(loaded, QSENN)
        assert torch.equal(_logits(loaded, x), logits)
        assert loaded.feature_names == FEATURES


def test_checkpoint_path_round_trip(saved):
    _, folder, x, logits = saved
    loaded = timm.create_model(
        "qsenn", backbone="test_resnet", num_classes=5, checkpoint_path=str(folder / "model.safetensors")
    )
    assert loaded.head.stage == "ternary"
    assert torch.equal(_logits(loaded, x), logits)


def test_other_num_classes_drops_only_the_class_layer(saved):
    model, folder, x, _ = saved
    with torch.no_grad():
        features = model.forward_head(model.forward_features(x), pre_logits=True)
    loaders = [
        lambda: timm.create_model(f"local-dir:{folder}", pretrained=True, num_classes=3),
        lambda: hub.load_model(folder, num_classes=3),
        # what train.py --pretrained-path does
        lambda: timm.create_model(
            "qsenn",
            backbone="test_resnet",
            pretrained=True,
            num_classes=3,
            pretrained_cfg_overlay={"file": str(folder / "model.safetensors"), "num_classes": -1},
        ),
    ]
    for load in loaders:
        loaded = load().eval()
        assert loaded.num_classes == 3 and loaded.head.stage == "selected"
        assert loaded.head.selection.tolist() == [3, 17, 40, 41, 64, 90]
        with torch.no_grad():
            assert torch.equal(loaded.forward_head(loaded.forward_features(x), pre_logits=True), features)
            assert loaded(x).shape == (2, 3)


def test_dense_model_and_directly_built_model_round_trip(tmp_path):
    dense = timm.create_model("qsenn", backbone="test_resnet", num_classes=4).eval()
    hub.save_pretrained(dense, tmp_path / "dense")
    config = json.loads((tmp_path / "dense" / "config.json").read_text())
    assert config["qsenn"]["class_layer_format"] == "float" and config["qsenn"]["selection"] is None
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(_logits(hub.load_model(tmp_path / "dense"), x), _logits(dense, x))
    direct = _make_ternary(QSENN("test_resnet", num_classes=3), [0, 1, 2, 3])
    hub.save_pretrained(direct, tmp_path / "direct")
    assert torch.equal(_logits(hub.load_model(tmp_path / "direct"), x), _logits(direct, x))


def test_save_never_overwrites_a_non_empty_folder(saved, tmp_path):
    model, folder, _, _ = saved
    target = tmp_path / "occupied"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty.*overwrite=True"):
        hub.save_pretrained(model, target)
    assert sorted(p.name for p in target.iterdir()) == ["notes.txt"]
    hub.save_pretrained(model, target, overwrite=True)
    assert (target / "notes.txt").read_text() == "mine" and (target / "model.safetensors").is_file()


# -- compact storage -----------------------------------------------------------------------------------------


def test_packed_class_layer_takes_at_most_2_1_bits_per_weight(tmp_path):
    model = timm.create_model("qsenn", backbone="test_resnet", num_classes=200)
    model = _make_ternary(model, list(range(50)), n_per_class=5)
    hub.save_pretrained(model, tmp_path / "packed")
    hub.save_pretrained(model, tmp_path / "float", compact=False)
    path = tmp_path / "packed" / "model.safetensors"
    raw = path.read_bytes()
    header = json.loads(raw[8 : 8 + struct.unpack("<Q", raw[:8])[0]])
    layer = {k: v for k, v in header.items() if k.startswith("head.fc.weight")}
    data_bytes = sum(v["data_offsets"][1] - v["data_offsets"][0] for v in layer.values())
    header_bytes = sum(len(json.dumps({k: v}, separators=(",", ":"))) for k, v in layer.items())
    bits = 8 * data_bytes / (200 * 50)
    print(
        f"\n200x50 ternary layer: {data_bytes} bytes of tensors ({bits:.4f} bits/weight) + {header_bytes} "
        f"bytes of safetensors header entries; float32 would take {200 * 50 * 4} bytes"
    )
    assert data_bytes == 2500 + 16 + 4 + 8
    assert bits <= 2.1
    saved_float = (tmp_path / "float" / "model.safetensors").stat().st_size
    assert saved_float - path.stat().st_size > 200 * 50 * 4 - 2 * 2528
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(_logits(hub.load_model(tmp_path / "packed"), x), _logits(model, x))


# -- model card ----------------------------------------------------------------------------------------------


def test_model_card_front_matter_results_and_global_explanation(saved):
    from huggingface_hub import ModelCard

    model, folder, _, _ = saved
    card = ModelCard.load(folder / "README.md")
    data = card.data
    assert data.library_name == "timm" and data.pipeline_tag == "image-classification"
    assert {"timm", "q-senn", "timm_qsenn", "image-classification"} <= set(data.tags)
    assert data.datasets == ["cub200"]
    assert set(data.metrics) == set(METRICS)
    assert data.base_model == "timm/test_resnet.r160_in1k"
    text = card.text
    assert "import timm_qsenn" in text and 'timm.create_model("local-dir:' in text
    for key, value in METRICS.items():
        assert f"| {key} | {value:.4g} |" in text
    for cls in global_explanation(model).classes:
        name = cls.name.replace("|", "\\|")
        row = next(line for line in text.splitlines() if line.startswith(f"| {name} |"))
        for use in cls.features:
            assert f"{'+' if use.sign > 0 else '-'}{use.name}" in row
    for name in FEATURES:
        assert name in text
    assert hub._is_generated_card((folder / "README.md").read_text())
    assert not hub._is_generated_card((folder / "README.md").read_text().replace("Q-SENN", "QSENN", 1))


# -- Hub cache (offline) -------------------------------------------------------------------------------------


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
    assert torch.equal(_logits(loaded, x), logits)
    assert torch.equal(_logits(hub.load_model("hf-hub:qsenn-test/tiny-cub", cache_dir=cache), x), logits)

    configs = tmp_path / "hub_configs"
    written = hub.write_hub_config(folder, "qsenn-test/tiny-cub", "tinycub", configs)
    assert written.name == "qsenn.tinycub.json"
    torch.save({"x": x, "logits": logits}, tmp_path / "expected.pt")
    out = _subprocess(
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


# -- push and pull through a loopback fake Hub --------------------------------------------------------------


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
    out = _subprocess(
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
    out = _subprocess(
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


# -- folded export -------------------------------------------------------------------------------------------


def test_folded_export_layout_and_sidecar(saved, tmp_path):
    model, _, x, logits = saved
    folder = hub.export_folded(model, tmp_path / "folded", metrics=METRICS, dataset="cub200")
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "test_resnet" and "qsenn" not in config
    assert config["label_names"] == CLASSES
    sidecar = json.loads((folder / hub.SIDECAR_NAME).read_text())
    assert sidecar["selection"] == [3, 17, 40, 41, 64, 90] and sidecar["feature_names"] == FEATURES
    explanation = global_explanation(model)
    for cls, entry in zip(explanation.classes, sidecar["classes"]):
        assert [(u["channel"], u["sign"]) for u in entry["features"]] == [(u.channel, u.sign) for u in cls.features]
    weight = load_file(folder / "model.safetensors")["fc.weight"]
    unused = sorted(set(range(96)) - set(sidecar["selection"]))
    assert weight[:, unused].count_nonzero() == 0
    assert (folder / "README.md").read_text().count("import timm_qsenn") == 0
    plain = timm.create_model(f"local-dir:{folder}", pretrained=True)
    assert torch.allclose(_logits(plain, x), logits, atol=1e-5)


def test_vit_folds_with_average_pooling(tiny_vit):
    model = _make_ternary(tiny_vit, [0, 5, 9, 33, 60])
    plain, kwargs = hub.fold(model)
    assert kwargs["global_pool"] == "avg" and kwargs["fc_norm"] is False
    x = torch.randn(2, 3, 64, 64)
    assert torch.allclose(_logits(plain, x), _logits(model, x), atol=1e-5)


def test_convnext_cannot_be_folded():
    model = _make_ternary(timm.create_model("qsenn", backbone="test_convnext", num_classes=3), [1, 2, 3])
    with pytest.raises(ValueError, match="test_convnext cannot be folded.*save_pretrained"):
        hub.fold(model)


# -- bad input -----------------------------------------------------------------------------------------------


def _copy(folder: Path, tmp_path: Path, name: str) -> Path:
    target = tmp_path / name
    shutil.copytree(folder, target)
    return target


def _rewrite_weights(folder: Path, edit_tensors=None, edit_metadata=None) -> None:
    path = folder / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    if edit_tensors:
        edit_tensors(tensors)
    if edit_metadata:
        edit_metadata(metadata)
    save_file(tensors, path, metadata=metadata)


def test_corrupt_and_truncated_weights_are_named(saved, tmp_path):
    _, folder, _, _ = saved
    corrupt = _copy(folder, tmp_path, "corrupt")
    (corrupt / "model.safetensors").write_bytes(os.urandom(4096))
    truncated = _copy(folder, tmp_path, "truncated")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    for bad in (corrupt, truncated):
        path = str(bad / "model.safetensors")
        with pytest.raises(ValueError, match="corrupt or truncated") as info:
            hub.load_model(bad)
        assert path in str(info.value)
    with pytest.raises(ValueError, match="corrupt or truncated"):
        hub.push_to_hub(corrupt, "org/never-uploaded")  # checked before anything leaves the machine
    missing = _copy(folder, tmp_path, "missing")
    (missing / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing"):
        hub.load_model(missing)


def test_unknown_packed_format_version_is_refused(saved, tmp_path):
    _, folder, _, _ = saved
    future = _copy(folder, tmp_path, "future")

    def bump(tensors):
        tensors["head.fc.weight_format_version"] = torch.tensor(99)

    _rewrite_weights(future, bump, lambda m: m.update({"timm_qsenn.class_layer_format_version": "99"}))
    path = str(future / "model.safetensors")
    with pytest.raises(ValueError, match="version 99.*upgrade timm_qsenn") as info:
        hub.load_model(future)
    assert path in str(info.value)
    # timm's own loaders never see the header; the packed tensors carry the version too.
    with pytest.raises(ValueError, match="format version 99"):
        timm.create_model(f"local-dir:{future}", pretrained=True)
    newer = _copy(folder, tmp_path, "newer")
    config = json.loads((newer / "config.json").read_text())
    config["qsenn"]["format_version"] = 99
    (newer / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="format version 99.*upgrade timm_qsenn") as info:
        hub.load_model(newer)
    assert str(newer / "config.json") in str(info.value)


def test_config_of_another_architecture_is_refused(tmp_path):
    from timm.models import save_for_hf

    save_for_hf(timm.create_model("test_resnet", num_classes=3), tmp_path / "plain", safe_serialization=True)
    with pytest.raises(ValueError, match="'test_resnet', not a Q-SENN model") as info:
        hub.load_model(tmp_path / "plain")
    assert str(tmp_path / "plain" / "config.json") in str(info.value)


def test_selected_channels_beyond_the_backbone_are_refused(saved, tmp_path):
    _, folder, _, _ = saved
    wide = _copy(folder, tmp_path, "wide")

    def widen(tensors):
        tensors["head.selection"] = torch.tensor([3, 17, 40, 41, 64, 500])

    _rewrite_weights(wide, widen)
    with pytest.raises(ValueError, match="selects channel 500 but the backbone has only 96") as info:
        hub.load_model(wide)
    assert str(wide / "model.safetensors") in str(info.value)


def test_plain_weights_and_missing_folders_are_named(saved, tmp_path):
    _, folder, _, _ = saved
    plain = _copy(folder, tmp_path, "plain-weights")
    save_file({"conv1.weight": torch.zeros(1)}, plain / "model.safetensors")
    with pytest.raises(ValueError, match="holds no Q-SENN weights") as info:
        hub.load_model(plain)
    assert str(plain / "model.safetensors") in str(info.value)
    with pytest.raises(FileNotFoundError, match="no model folder at"):
        hub.load_model(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="holds no config.json"):
        hub.load_model(tmp_path)
