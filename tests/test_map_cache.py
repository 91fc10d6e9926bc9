"""The cache of frozen-backbone maps: what it stores, when it hits and misses, and its views."""

import json

import pytest
import timm
import torch
from torch.utils.data import Dataset, TensorDataset

import timm_qsenn  # noqa: F401
from timm_qsenn.data import SeededAugmentation
from timm_qsenn.map_cache import CachedMaps, MapsInput, cache_maps, map_cache_bytes


class _Images(Dataset):
    """Seeded random images with a transform, as a dataset with a fingerprint."""

    def __init__(self, count: int = 10, seed: int = 0, transform=None):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn(count, 3, 32, 32, generator=g)
        self.labels = torch.arange(count) % 3
        self.seed, self.transform = seed, transform

    def fingerprint(self) -> str:
        return f"images-{self.seed}-{len(self.images)}"

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        image = self.images[index]
        return (self.transform(image) if self.transform is not None else image), int(self.labels[index])


class _Flip:
    """A random horizontal flip (from torch's RNG), with a repr naming it."""

    def __call__(self, image):
        return image.flip(-1) if torch.rand(()) < 0.5 else image

    def __repr__(self) -> str:
        return "Flip()"


class _Scale:
    def __init__(self, factor: float):
        self.factor = factor

    def __call__(self, image):
        return image * self.factor

    def __repr__(self) -> str:
        return f"Scale({self.factor})"


def _model(seed: int = 0):
    torch.manual_seed(seed)
    return timm.create_model("qsenn", backbone="test_resnet", num_classes=3, adapter={"depth": 2, "hidden": 8})


def _entries(folder) -> set[str]:
    return {p.name for p in folder.iterdir()}


def test_the_cache_holds_the_backbone_maps_in_the_chosen_dtype(tmp_path):
    model, data = _model().eval(), _Images()
    with torch.no_grad():
        expected = model.forward_backbone(data.images)
    sizes = []
    for dtype, storage in (("float32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        maps = cache_maps(model, data, tmp_path, dtype=dtype, batch_size=4, on_size=lambda n, f: sizes.append(n))
        assert len(maps) == 10 and maps.labels.tolist() == data.labels.tolist()
        got = torch.stack([maps[i][0] for i in range(len(maps))])
        # Stored values are the maps rounded to the storage dtype (batches of 4 vs 10: float32 summation order).
        assert torch.allclose(got, expected.to(storage).float(), rtol=2 * torch.finfo(storage).eps, atol=1e-6)
        assert maps[3][1] == int(data.labels[3])
    shape = tuple(expected.shape[1:])
    assert sizes == [map_cache_bytes(10, 0, shape, d) for d in ("float32", "bf16", "fp16")]
    # Reported sizes are the files' sizes, up to their (short) JSON headers.
    files = sorted(p.stat().st_size for p in tmp_path.glob("*/shard-*.safetensors"))
    assert all(0 < file - size < 1024 for file, size in zip(files, sorted(sizes)))


def test_the_cache_hits_for_the_same_content_and_misses_when_backbone_data_or_transform_change(tmp_path):
    model, data = _model(), _Images(transform=_Scale(1.0))
    first = cache_maps(model, data, tmp_path, batch_size=4)
    written = (tmp_path / first.folder.name / "index.json").stat().st_mtime_ns
    # Same backbone weights in another model (another adapter and head): the same entry, not rewritten.
    other_head = _model(seed=5)
    other_head.backbone.load_state_dict(model.backbone.state_dict())
    again = cache_maps(other_head, _Images(transform=_Scale(1.0)), tmp_path, batch_size=4)
    assert again.key == first.key and (again.folder / "index.json").stat().st_mtime_ns == written
    changed = {
        "backbone": cache_maps(_model(seed=1), data, tmp_path, batch_size=4),
        "data": cache_maps(model, _Images(seed=1, transform=_Scale(1.0)), tmp_path, batch_size=4),
        "transform": cache_maps(model, _Images(transform=_Scale(2.0)), tmp_path, batch_size=4),
        "dtype": cache_maps(model, data, tmp_path, dtype="fp16", batch_size=4),
    }
    keys = {first.key} | {maps.key for maps in changed.values()}
    assert len(keys) == 5, "every change is a new entry"
    assert len(_entries(tmp_path)) == 5


def test_an_entry_without_its_index_is_rebuilt(tmp_path):
    model, data = _model(), _Images()
    maps = cache_maps(model, data, tmp_path, dtype="float32", batch_size=4)
    reference = maps[2][0]
    (maps.folder / "index.json").unlink()  # a build that died before its commit point
    rebuilt = cache_maps(model, data, tmp_path, dtype="float32", batch_size=4)
    assert torch.equal(rebuilt[2][0], reference) and (rebuilt.folder / "index.json").is_file()
    index = json.loads((rebuilt.folder / "index.json").read_text())
    index["key"] = "0" * 64
    (rebuilt.folder / "index.json").write_text(json.dumps(index))
    assert torch.equal(cache_maps(model, data, tmp_path, dtype="float32", batch_size=4)[2][0], reference)


def test_views_are_the_augmentations_of_the_training_loader_epochs(tmp_path):
    model, data = _model().eval(), _Images(transform=_Flip())
    maps = cache_maps(model, data, tmp_path, dtype="float32", views=3, seed=7, batch_size=4)
    assert maps.views == 3
    augmented = SeededAugmentation(data, seed=7)
    seen = []
    for epoch in range(4):  # epoch 3 reads view 0 again
        maps.epoch, augmented.epoch = epoch, epoch % 3
        with torch.no_grad():
            expected = model.forward_backbone(torch.stack([augmented[i][0] for i in range(len(data))]))
        seen.append(torch.stack([maps[i][0] for i in range(len(maps))]))
        assert torch.allclose(seen[-1], expected, rtol=1e-5, atol=1e-6), epoch
    assert torch.equal(seen[3], seen[0])
    assert not torch.allclose(seen[0], seen[1]) and not torch.allclose(seen[1], seen[2]), "different augmentations"


def test_cached_maps_read_through_the_adapter_and_head_give_the_models_outputs(tmp_path):
    model = _model().eval()
    data = TensorDataset(torch.randn(6, 3, 32, 32), torch.arange(6) % 3)
    maps = cache_maps(model, data, tmp_path, dtype="float32", batch_size=6)
    batch = torch.stack([maps[i][0] for i in range(6)])
    with torch.no_grad():
        out, expected = MapsInput(model).forward_qsenn(batch), model.forward_qsenn(data.tensors[0])
    assert torch.allclose(out.logits, expected.logits, rtol=1e-5, atol=1e-6)
    assert MapsInput(model).head is model.head
    assert isinstance(maps, CachedMaps) and maps.fingerprint() == maps.key


def test_bad_cache_settings_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="must be one of bf16, fp16, float32"):
        cache_maps(_model(), _Images(), tmp_path, dtype="int8")
    with pytest.raises(ValueError, match="empty"):
        cache_maps(_model(), _Images(count=0), tmp_path)
