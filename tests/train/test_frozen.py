"""A frozen backbone: training from cached maps, resume inside an adapter epoch, two processes."""

import copy
import json

import pytest
import timm
import torch
from accelerate import Accelerator
from timm.scheduler import create_scheduler_v2
from torch.utils.data import DataLoader, TensorDataset

from timm_qsenn.data import build_datasets
from timm_qsenn.hub import load_model
from timm_qsenn.map_cache import CachedMaps, cache_maps
from timm_qsenn.train import QSENNTrainer, load_config
from timm_qsenn.train.loop import TrainModule, train_epoch

from .conftest import final_weights, kill_when, run_cli, tiny_overrides, train_two_processes

# A frozen random test_resnet, an adapter, AdamW (SGD at the toy's learning rates diverges through an adapter
# whose inputs are the tiny maps of a random backbone).
FROZEN = [
    "model.freeze_backbone=true",
    "model.adapter={depth: 2, hidden: 32, out_features: 16}",
    "model.cache_maps=float32",
    "dense.epochs=4",
    "dense.opt=adamw",
    "dense.lr=0.01",
    "dense.head_lr=null",
    "dense.weight_decay=0.01",
    "finetune.opt=adamw",
    "finetune.lr=0.001",
    "finetune.weight_decay=0.01",
]


def _train(model, dataset, from_maps: bool) -> dict[str, torch.Tensor]:
    """Two epochs of the trainer's loop (dropout and the diversity loss on) over ``dataset`` in order."""
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(1)  # the dropout masks
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    scheduler, _ = create_scheduler_v2(optimizer, sched="step", num_epochs=2, updates_per_epoch=4)
    module = TrainModule(model, 0.196, frozen_backbone=True, from_maps=from_maps)
    module, optimizer = accelerator.prepare(module, optimizer)
    updates = 0
    for _ in range(2):
        loader = DataLoader(dataset, batch_size=6, shuffle=False)
        updates += train_epoch(accelerator, module, loader, optimizer, scheduler, num_updates=updates).updates
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# float32 (an adapter with batch norm): the cached maps differ from the maps of the training batches only by the
# backbone's summation order (batches of 5 when cached, 6 in training), a few float32 ulps; eight steps keep
# that well below 1e-4 of each tensor's largest value. fp16/bf16 (no norm: batch statistics of a 16-wide layer
# amplify input rounding into its bias): maps rounded to the dtype's eps relative, and the gradients are linear
# in the maps, so the weights agree to that eps of each tensor's largest value.
@pytest.mark.parametrize(
    "dtype, norm, rtol",
    [
        ("float32", "batchnorm", 1e-4),
        ("fp16", None, torch.finfo(torch.float16).eps),
        ("bf16", None, torch.finfo(torch.bfloat16).eps),
    ],
)
def test_training_from_the_cache_gives_the_weights_of_training_through_the_frozen_backbone(tmp_path, dtype, norm, rtol):
    model = timm.create_model(
        "qsenn", backbone="test_resnet", num_classes=4, adapter={"depth": 2, "hidden": 16, "norm": norm}
    )
    model.backbone.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    images = TensorDataset(torch.randn(24, 3, 48, 48, generator=g), torch.arange(24) % 4)
    maps = cache_maps(model, images, tmp_path, dtype=dtype, batch_size=5)
    twin, start = copy.deepcopy(model), model.adapter.layers[0].weight.detach().clone()
    through = _train(model, images, from_maps=False)
    cached = _train(twin, maps, from_maps=True)
    assert through.keys() == cached.keys()
    for key, value in through.items():
        if key.startswith("backbone."):
            assert torch.equal(value, cached[key]), f"the frozen backbone changed: {key}"
        elif value.is_floating_point():
            scale = value.abs().max().clamp_min(1e-12)
            assert float((value - cached[key]).abs().max() / scale) <= rtol, key
        else:
            assert torch.equal(value, cached[key]), key
    assert not torch.allclose(through["adapter.layers.0.weight"], start), "the adapter trained"


@pytest.fixture(scope="module")
def frozen_run(toy_folder, tmp_path_factory):
    """An uninterrupted frozen run with cached maps, checkpointed every step: the reference for the resume."""
    output = tmp_path_factory.mktemp("frozen") / "uninterrupted"
    config = load_config(overrides=tiny_overrides(toy_folder, output) + FROZEN + ["run.checkpoint_steps=1"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the killed and resumed runs (OMP_NUM_THREADS=1)
    try:
        summary = QSENNTrainer(config).run()
    finally:
        torch.set_num_threads(threads)
    return output, summary


def test_a_frozen_run_trains_the_adapter_and_head_on_cached_maps(frozen_run):
    output, summary = frozen_run
    assert summary["qsenn_accuracy"] >= 0.4 and summary["dense_accuracy"] >= 0.4, summary  # chance is 0.25
    model = load_model(str(output)).eval()
    assert model.head.stage == "ternary" and model.adapter.out_features == 16 == model.num_features
    # The backbone is the one the maps were cached from: the saved model recomputes the cached test maps.
    entries = [json.loads(p.read_text()) for p in (output / "maps").glob("*/index.json")]
    assert len(entries) == 2, "training (un-augmented) and test maps, each cached once"
    test = next(e for e in entries if e["shards"][0]["stop"] == summary["test_images"])
    cached = CachedMaps(next((output / "maps").glob(f"*{test['key'][:32]}")), test)
    config = load_config(output / "config.yaml")
    images = build_datasets(config.data, model.pretrained_cfg["mean"], model.pretrained_cfg["std"]).test
    with torch.no_grad():
        maps = model.forward_backbone(torch.stack([images[i][0] for i in range(4)]))
    assert torch.allclose(maps, torch.stack([cached[i][0] for i in range(4)]), rtol=1e-5, atol=1e-6)


def test_a_frozen_run_killed_inside_an_adapter_epoch_resumes_to_identical_weights(frozen_run, toy_folder, tmp_path):
    reference, _ = frozen_run
    output = tmp_path / "killed"
    args = tiny_overrides(toy_folder, output) + FROZEN + ["run.checkpoint_steps=1"]
    killed_at = kill_when(run_cli(args), output / "state.json", "dense", 1, 2)
    assert not (output / "summary.json").exists()
    resumed = run_cli(args)
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out[-3000:]
    assert "resuming the run" in out and killed_at["phase"] in out
    assert "caching the frozen backbone's maps" not in out, "the resumed run reads the cache the first one wrote"
    expected, actual = final_weights(reference), final_weights(output)
    different = [k for k in expected if not torch.equal(expected[k], actual[k])]
    assert not different, f"resumed run differs in {different[:5]}"


def test_two_processes_build_and_read_the_cache_and_train(toy_folder, tmp_path):
    output = tmp_path / "two"
    args = tiny_overrides(toy_folder, output) + FROZEN + ["data.batch_size=4", "model.cache_views=2"]
    result = train_two_processes(args, port=29561)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    summary = json.loads((output / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["n_features"] == 8
    indexes = [json.loads(p.read_text()) for p in (output / "maps").glob("*/index.json")]
    # Train-eval, test and the 2-view training maps; each written as one shard per process.
    assert sorted(e["views"] for e in indexes) == [1, 1, 2]
    for index in indexes:
        assert [s["file"] for s in index["shards"]] == ["shard-000-of-002.safetensors", "shard-001-of-002.safetensors"]
    assert load_model(str(output)).head.stage == "ternary"


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.cache_maps=int8", "model.cache_maps must be bf16, fp16, float32 or none"),
        ("model.cache_views=-1", "model.cache_views must be 0"),
        ("model.adapter=[4, 512]", "model.adapter must be a mapping"),
    ],
)
def test_bad_frozen_settings_name_the_problem(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(overrides=[override])


def test_a_frozen_adapter_that_the_sparse_fit_cannot_use_fails_before_the_run_folder(toy_folder, tmp_path):
    output = tmp_path / "run"
    args = tiny_overrides(toy_folder, output) + FROZEN + ["model.adapter={depth: 1, out_features: 4}"]
    with pytest.raises(ValueError, match="exceeds the 4 channels of the adapter"):
        QSENNTrainer(load_config(overrides=args)).run()
    assert not output.exists()
