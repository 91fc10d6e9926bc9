import logging

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from timm_qsenn.features import clear_feature_cache, dataset_fingerprint, extract_features


class Scale:
    """A transform whose repr names its setting, as torchvision's do."""

    def __init__(self, factor: float):
        self.factor = factor

    def __call__(self, x):
        return x * self.factor

    def __repr__(self):
        return f"Scale(factor={self.factor})"


class TinyImages(Dataset):
    """Twelve random 32 px images in three classes, with a content fingerprint."""

    def __init__(self, tag="v1", transform=None, n=12):
        self.tag = tag
        self.transform = transform
        gen = torch.Generator().manual_seed(0)
        self.images = torch.randn(n, 3, 32, 32, generator=gen)
        self.labels = torch.arange(n) % 3

    def fingerprint(self):
        return f"tiny-{self.tag}-{len(self)}"

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        image = self.images[i]
        return (self.transform(image) if self.transform else image), int(self.labels[i])


def loader_of(dataset, batch_size=5):
    return DataLoader(dataset, batch_size=batch_size, shuffle=False)


def count_forwards(model):
    calls = {"n": 0}
    original = model.forward_qsenn

    def counted(x):
        calls["n"] += 1
        return original(x)

    model.forward_qsenn = counted
    return calls


def test_features_match_an_eval_forward_and_the_mode_is_restored(tiny_cnn):
    dataset = TinyImages(transform=Scale(1.0))
    tiny_cnn.train()
    result = extract_features(tiny_cnn, loader_of(dataset))
    assert tiny_cnn.training and tiny_cnn.backbone.training
    tiny_cnn.eval()
    with torch.no_grad():
        expected = tiny_cnn.forward_qsenn(dataset.images).features
    assert result.features.shape == (12, 96) and result.features.dtype == torch.float32
    assert torch.allclose(result.features, expected, atol=1e-5)
    assert result.labels.tolist() == dataset.labels.tolist() and result.labels.dtype == torch.int64
    assert torch.allclose(result.mean, expected.mean(dim=0), atol=1e-5)
    assert torch.allclose(result.std, expected.std(dim=0, unbiased=False), atol=1e-5)
    assert len(result.key) == 64


def test_cache_hits_and_misses_on_model_dataset_transform_and_selection(tiny_cnn, tmp_path):
    calls = count_forwards(tiny_cnn)
    first = extract_features(tiny_cnn, loader_of(TinyImages(transform=Scale(1.0))), cache_dir=tmp_path)
    assert calls["n"] == 3 and len(list(tmp_path.iterdir())) == 1

    hit = extract_features(tiny_cnn, loader_of(TinyImages(transform=Scale(1.0))), cache_dir=tmp_path)
    assert calls["n"] == 3  # no forward pass: served from the cache
    assert hit.key == first.key and torch.equal(hit.features, first.features) and torch.equal(hit.std, first.std)

    extract_features(tiny_cnn, loader_of(TinyImages(transform=Scale(2.0))), cache_dir=tmp_path)
    assert calls["n"] == 6  # transform changed
    extract_features(tiny_cnn, loader_of(TinyImages(tag="v2", transform=Scale(1.0))), cache_dir=tmp_path)
    assert calls["n"] == 9  # dataset changed
    with torch.no_grad():
        next(tiny_cnn.backbone.parameters()).mul_(1.5)
    extract_features(tiny_cnn, loader_of(TinyImages(transform=Scale(1.0))), cache_dir=tmp_path)
    assert calls["n"] == 12  # model changed
    tiny_cnn.head.select([0, 5, 9])
    selected = extract_features(tiny_cnn, loader_of(TinyImages(transform=Scale(1.0))), cache_dir=tmp_path)
    assert calls["n"] == 15 and selected.features.shape == (12, 3)  # selection changed
    assert clear_feature_cache(tmp_path) == 5 and not list(tmp_path.iterdir())


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_cache_file_is_detected_and_recomputed(tiny_cnn, tmp_path, caplog, damage):
    dataset = TinyImages(transform=Scale(1.0))
    first = extract_features(tiny_cnn, loader_of(dataset), cache_dir=tmp_path)
    (path,) = tmp_path.iterdir()
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[-7] ^= 0xFF  # inside the tensor data, past the header
    path.write_bytes(bytes(data))
    calls = count_forwards(tiny_cnn)
    with caplog.at_level(logging.WARNING, logger="timm_qsenn.features"):
        again = extract_features(tiny_cnn, loader_of(dataset), cache_dir=tmp_path)
    assert calls["n"] == 3 and "recomputing" in caplog.text
    assert torch.equal(again.features, first.features)
    calls["n"] = 0
    extract_features(tiny_cnn, loader_of(dataset), cache_dir=tmp_path)
    assert calls["n"] == 0  # the recomputed file was written back and now hits


def test_non_finite_features_and_shuffled_loaders_are_errors(tiny_cnn, tmp_path):
    dataset = TinyImages()
    dataset.images[4] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf features in 1 rows"):
        extract_features(tiny_cnn, loader_of(dataset), cache_dir=tmp_path)
    assert not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match="shuffle=False"):
        extract_features(tiny_cnn, DataLoader(TinyImages(), batch_size=4, shuffle=True))
    with pytest.raises(TypeError, match="forward_qsenn"):
        extract_features(torch.nn.Linear(3, 3), loader_of(TinyImages()))


def test_generic_fingerprint_sees_tensor_content_and_item_lists(caplog):
    a = TensorDataset(torch.zeros(4, 2), torch.zeros(4))
    b = TensorDataset(torch.ones(4, 2), torch.zeros(4))
    assert dataset_fingerprint(a) != dataset_fingerprint(b)

    class Files(Dataset):
        def __init__(self, files):
            self.samples = [(f, 0) for f in files]

        def __len__(self):
            return len(self.samples)

    assert dataset_fingerprint(Files(["a.jpg", "b.jpg"])) != dataset_fingerprint(Files(["a.jpg", "c.jpg"]))

    class Opaque(Dataset):
        def __len__(self):
            return 3

    with caplog.at_level(logging.WARNING, logger="timm_qsenn.features"):
        dataset_fingerprint(Opaque())
    assert "fingerprint()" in caplog.text


def test_accelerator_gathers_every_row_in_dataset_order(tiny_cnn, tmp_path):
    accelerate = pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState

    dataset = TinyImages(transform=Scale(1.0))
    plain = extract_features(tiny_cnn, loader_of(dataset))
    try:
        accelerator = accelerate.Accelerator(cpu=True)
        model, loader = accelerator.prepare(tiny_cnn, loader_of(dataset))
        result = extract_features(model, loader, accelerator=accelerator, cache_dir=tmp_path)
        cached = extract_features(model, loader, accelerator=accelerator, cache_dir=tmp_path)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert result.labels.tolist() == dataset.labels.tolist()
    assert torch.allclose(result.features, plain.features, atol=1e-5)
    assert cached.key == result.key and torch.equal(cached.features, result.features)


def test_the_old_sparse_paths_still_work_with_a_deprecation_warning():
    import subprocess
    import sys

    import timm_qsenn.features as features

    # Importing sparse never loads the feature extraction (models and loaders): sparse works on tensors only.
    code = "import sys, timm_qsenn.sparse; assert 'timm_qsenn.features' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    import timm_qsenn.sparse as sparse

    for name in ("FeatureSet", "extract_features", "pooled_features", "clear_feature_cache"):
        with pytest.warns(DeprecationWarning, match=f"import {name} from timm_qsenn.features"):
            assert getattr(sparse, name) is getattr(features, name)
    for name in ("feature_cache_key", "dataset_fingerprint"):
        with pytest.warns(DeprecationWarning, match=f"timm_qsenn.sparse.features.{name} is deprecated"):
            from timm_qsenn.sparse import features as old

            assert getattr(old, name) is getattr(features, name)
    with pytest.raises(AttributeError, match="no attribute 'missing'"):
        sparse.missing  # noqa: B018


def _sharded_worker(rank: int, port: int, cache: str, out: str) -> None:
    import os

    import timm
    from accelerate import Accelerator

    import timm_qsenn  # noqa: F401

    torch.set_num_threads(1)  # two processes on a small CPU
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank))
    os.environ.update(WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    acc = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = timm.create_model("qsenn", backbone="test_resnet", num_classes=5).eval()
    loader = acc.prepare_data_loader(loader_of(TinyImages(n=13)))
    first = extract_features(model, loader, acc, cache_dir=cache, dtype=torch.float16, shard=True)
    calls = count_forwards(model)
    again = extract_features(model, loader, acc, cache_dir=cache, dtype=torch.float16, shard=True)
    torch.save(
        dict(
            features=first.features,
            row_index=first.row_index,
            mean=first.mean,
            std=first.std,
            labels=first.labels,
            hit=calls["n"] == 0 and torch.equal(again.features, first.features),
        ),
        f"{out}/rank{rank}.pt",
    )
    acc.wait_for_everyone()
    # A process group left to the interpreter's exit can abort in gloo's teardown.
    torch.distributed.destroy_process_group()


def test_sharded_features_stay_on_their_process_in_half_precision(tmp_path):
    import socket

    import timm
    import torch.multiprocessing as mp

    import timm_qsenn  # noqa: F401

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(
        _sharded_worker, args=(port, str(tmp_path / "cache"), str(tmp_path)), nprocs=2, start_method="spawn"
    )
    torch.manual_seed(0)
    model = timm.create_model("qsenn", backbone="test_resnet", num_classes=5).eval()
    whole = extract_features(model, loader_of(TinyImages(n=13)))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    # The one split rule of every per-process cache (_utils.shard_bounds), as the map cache splits its rows.
    assert [r["row_index"].tolist() for r in ranks] == [list(range(6)), list(range(6, 13))]
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2  # one file per process
    for r in ranks:
        assert r["features"].dtype == torch.float16 and r["hit"]  # the second call read its own cache file
        assert torch.equal(r["labels"], whole.labels[r["row_index"]])
        # float16 storage: within half an ulp of float16 (2^-11 relative) of the float32 features.
        assert torch.allclose(r["features"].float(), whole.features[r["row_index"]], rtol=2**-10, atol=1e-6)
        # The statistics are over every row of both processes, not over the shard.
        assert torch.allclose(r["mean"], whole.mean, rtol=2**-9, atol=1e-6)
        assert torch.allclose(r["std"], whole.std, rtol=2**-9, atol=1e-6)
