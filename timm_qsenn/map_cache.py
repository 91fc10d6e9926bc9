"""A cache of frozen-backbone maps: one backbone pass over a dataset, then every epoch reads the maps from disk.

The maps (``QSENN.forward_backbone``, B x C x H x W) are stored in bf16, fp16 or float32, under a content key:
the backbone's weights and layout, the dataset's identity and transform (the pooled-feature cache's
:func:`~timm_qsenn.features.feature_cache_key`), the storage dtype, the precision and the augmented views.

Layout of one entry, a folder ``qsenn-maps-<key>/``:

* ``shard-<r>-of-<P>.safetensors``: rows ``[r*N/P, (r+1)*N/P)``, written by process ``r`` of ``P`` (each process
  computes and writes its own shard; no maps cross processes). Tensors ``maps`` (V x n x C x H x W) and
  ``labels`` (n). The file is streamed batch by batch in the safetensors layout, so building never holds the
  maps in memory, and written atomically.
* ``index.json``: the commit point, written by the main process once every shard is on disk. An entry without
  it is incomplete and rebuilt.

Reading memory-maps the shards (``safe_open``): a cache larger than RAM works, and every process reads any row.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import json
import logging
import math
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from ._utils import SAFETENSORS_DTYPES, atomic_write, atomic_write_text, eval_mode, shard_bounds
from .data import SeededAugmentation
from .features import feature_cache_key

__all__ = ["CACHE_DTYPES", "CachedMaps", "MapsInput", "cache_maps", "map_cache_key", "map_cache_bytes"]

_logger = logging.getLogger(__name__)

_FORMAT = "timm_qsenn.maps"
_FORMAT_VERSION = "1"
_PREFIX = "qsenn-maps-"
_INDEX = "index.json"
CACHE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "float32": torch.float32}


def _check_dtype(dtype: str) -> torch.dtype:
    if dtype not in CACHE_DTYPES:
        raise ValueError(f"map cache dtype must be one of {', '.join(CACHE_DTYPES)}, got {dtype!r}")
    return CACHE_DTYPES[dtype]


def map_cache_key(
    model: nn.Module, dataset: Dataset, *, dtype: str, views: int, seed: int, batch_size: int, precision: str = "no"
) -> str:
    """Content key of the maps of ``model.backbone`` over ``dataset``: weights, data, transform, dtype, views."""
    _check_dtype(dtype)
    # The pooled-feature cache's key of the backbone alone over this dataset: weights, dataset, transform.
    base = feature_cache_key(model.backbone, DataLoader(dataset, batch_size=batch_size), precision)
    parts = [
        f"{_FORMAT}/{_FORMAT_VERSION}",
        base,
        f"backbone={model.backbone_name}:{model.feature_layout}:{model.num_prefix_tokens}",
        f"dtype={dtype}",
        # views=0: the dataset's own transform; V > 0: V augmented views seeded by (seed, view, index).
        f"views={views}:{seed if views else None}",
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def map_cache_bytes(rows: int, views: int, shape: tuple[int, ...], dtype: str) -> int:
    """Size on disk of the maps of ``rows`` images (``views`` views each) of one map ``shape`` (C, H, W)."""
    itemsize = torch.empty(0, dtype=_check_dtype(dtype)).element_size()
    return max(views, 1) * rows * math.prod(shape) * itemsize + 8 * rows


class CachedMaps(Dataset):
    """The cached backbone maps of a dataset, memory-mapped: ``(maps float32 C x H x W, label)`` per row.

    ``epoch`` chooses the view of an augmented cache (``epoch % views``), as the training loader's epoch
    chooses an augmentation.
    """

    def __init__(self, folder: str | os.PathLike, index: dict[str, Any]):
        self.folder = Path(folder)
        self.key = index["key"]
        self.views = int(index["views"])
        self.shape = tuple(index["shape"])
        self.shards = [(s["file"], int(s["start"]), int(s["stop"])) for s in index["shards"]]
        self._starts = [start for _, start, _ in self.shards]
        self.length = self.shards[-1][2] if self.shards else 0
        self.epoch = 0
        self._handles: dict[str, Any] = {}
        self.labels = torch.cat([self._handle(file).get_tensor("labels") for file, _, _ in self.shards])

    def _handle(self, file: str) -> Any:
        if file not in self._handles:
            self._handles[file] = safe_open(str(self.folder / file), framework="pt")
        return self._handles[file]

    def __getstate__(self) -> dict[str, Any]:
        # Memory maps are per process: a worker process opens its own.
        return {**self.__dict__, "_handles": {}}

    def fingerprint(self) -> str:
        """The content key: what the pooled-feature cache keys features of these maps by."""
        return self.key

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        if not 0 <= index < self.length:
            raise IndexError(f"row {index} is outside the {self.length} cached rows")
        shard = bisect.bisect_right(self._starts, index) - 1
        file, start, _ = self.shards[shard]
        view, row = self.epoch % max(self.views, 1), index - start
        maps = self._handle(file).get_slice("maps")[view : view + 1, row : row + 1]
        return maps.reshape(self.shape).float(), int(self.labels[index])


class MapsInput(nn.Module):
    """A QSENN read from cached backbone maps: ``forward_qsenn(maps)`` runs only the adapter and the head.

    For the code that calls ``forward_qsenn`` on a loader's batches (accuracy, pooled features, the sparse fit);
    the model itself is unchanged, so its weights and checkpoints are the QSENN's.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @property
    def head(self) -> nn.Module:
        """The model's Q-SENN head (the sparse fit installs its selection and class layer here)."""
        return self.model.head

    def forward_qsenn(self, maps: Tensor) -> Any:
        return self.model.forward_qsenn_from_maps(maps)


# -- building ---------------------------------------------------------------------------------------------


def _entry(cache_dir: str | os.PathLike, key: str) -> Path:
    return Path(cache_dir) / f"{_PREFIX}{key[:32]}"


def _shard(rank: int, world: int, rows: int) -> dict[str, Any]:
    """The file and the contiguous rows that process ``rank`` of ``world`` computes and writes."""
    start, stop = shard_bounds(rank, world, rows)
    return {"file": f"shard-{rank:03d}-of-{world:03d}.safetensors", "start": start, "stop": stop}


def _open(folder: Path, key: str) -> CachedMaps | None:
    index_path = folder / _INDEX
    if not index_path.is_file():
        return None
    try:
        index = json.loads(index_path.read_text())
        if index.get("format") != _FORMAT or index.get("version") != _FORMAT_VERSION or index.get("key") != key:
            _logger.warning("map cache %s belongs to another format or key; rebuilding it", folder)
            return None
        maps = CachedMaps(folder, index)
        for file, start, stop in maps.shards:
            with safe_open(str(folder / file), framework="pt") as f:
                shape = f.get_slice("maps").get_shape()
                if (f.metadata() or {}).get("key") != key or shape != [maps.views, stop - start, *maps.shape]:
                    raise ValueError(f"shard {file} holds maps of shape {shape} for another key")
    except (OSError, ValueError, KeyError, RuntimeError, json.JSONDecodeError) as exc:
        _logger.warning("map cache %s is unreadable (%s); rebuilding it", folder, exc)
        return None
    _logger.info("map cache hit: %s", folder)
    return maps


def _write_shard(
    path: Path,
    batches: Callable[[int], Any],
    *,
    rows: int,
    views: int,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    key: str,
) -> None:
    """Stream V x rows maps into a safetensors file: header first (shapes are known), then batch by batch."""
    itemsize = torch.empty(0, dtype=dtype).element_size()
    maps_bytes = views * rows * math.prod(shape) * itemsize
    header = {
        "maps": {"dtype": SAFETENSORS_DTYPES[dtype], "shape": [views, rows, *shape], "data_offsets": [0, maps_bytes]},
        "labels": {"dtype": "I64", "shape": [rows], "data_offsets": [maps_bytes, maps_bytes + 8 * rows]},
        "__metadata__": {"format": _FORMAT, "version": _FORMAT_VERSION, "key": key},
    }
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(text)))
            f.write(text)
            labels, written = [], 0
            for view in range(views):
                for maps, target in batches(view):
                    f.write(maps.to("cpu", dtype).contiguous().view(torch.uint8).numpy().tobytes())
                    written += maps.shape[0]
                    if view == 0:
                        labels.append(torch.as_tensor(target, dtype=torch.int64).cpu())
            if written != views * rows:
                raise RuntimeError(f"the loader yielded {written} maps for {views} x {rows} rows")
            f.write(torch.cat(labels).numpy().tobytes() if labels else b"")

    atomic_write(path, write)


def cache_maps(
    model: nn.Module,
    dataset: Dataset,
    cache_dir: str | os.PathLike,
    *,
    dtype: str = "bf16",
    views: int = 0,
    seed: int = 0,
    batch_size: int = 64,
    workers: int = 0,
    accelerator: Any = None,
    on_size: Callable[[int, Path], None] | None = None,
) -> CachedMaps:
    """The backbone maps of every row of ``dataset``, from the cache or computed once and stored.

    ``views=0`` stores the maps of the dataset as it is (its own transform); ``views=V`` stores V augmented views
    of each image, view ``v`` drawn as the training loader draws epoch ``v`` (``SeededAugmentation`` with
    ``seed``). With an ``accelerator`` every process computes and writes its own contiguous shard of rows, and
    all processes return the same cache. ``on_size(bytes, folder)`` runs on the main process before anything is
    written (the trainer prints it).
    """
    storage = _check_dtype(dtype)
    if len(dataset) == 0:
        raise ValueError("the dataset is empty; there are no maps to cache")
    precision = str(getattr(accelerator, "mixed_precision", "no")) if accelerator is not None else "no"
    key = map_cache_key(model, dataset, dtype=dtype, views=views, seed=seed, batch_size=batch_size, precision=precision)
    folder = _entry(cache_dir, key)
    cached = _open(folder, key)
    many = accelerator is not None and accelerator.num_processes > 1
    if many:
        # Every process takes the same branch, or the ones that build would wait for the others forever.
        flag = torch.tensor([1 if cached is not None else 0], device=accelerator.device)
        if int(accelerator.gather(flag).min()) == 0:
            cached = None
    if cached is not None:
        return cached

    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
    n = len(dataset)
    mine = _shard(rank, world, n)
    start, stop = mine["start"], mine["stop"]
    source = SeededAugmentation(dataset, seed) if views else dataset
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    autocast = accelerator.autocast if accelerator is not None else contextlib.nullcontext

    def batches(view: int) -> Any:
        source.epoch = view
        loader = DataLoader(Subset(source, range(start, stop)), batch_size=batch_size, num_workers=workers)
        for images, target in loader:
            with autocast():
                yield model.forward_backbone(images.to(device)), target

    with eval_mode(model), torch.no_grad():
        # The map shape, from one image (the shards' headers are written before their maps).
        shape = tuple(model.forward_backbone(dataset[0][0][None].to(device)).shape[1:]) if stop > start else None
        if many:
            # Every process needs the map shape, also one with no rows (more processes than images).
            shapes = [None] * world
            torch.distributed.all_gather_object(shapes, shape)
            shape = next(s for s in shapes if s is not None)
        total = map_cache_bytes(n, views, shape, dtype)
        if on_size is not None and (accelerator is None or accelerator.is_main_process):
            on_size(total, folder)
        _logger.info(
            "caching the backbone maps of %d images (%s %s) in %s: %.1f MB", n, shape, dtype, folder, total / 1e6
        )
        _write_shard(
            folder / mine["file"],
            batches,
            rows=stop - start,
            views=max(views, 1),
            shape=shape,
            dtype=storage,
            key=key,
        )
    if accelerator is not None:
        accelerator.wait_for_everyone()
    index = {
        "format": _FORMAT,
        "version": _FORMAT_VERSION,
        "key": key,
        "views": max(views, 1),
        "shape": list(shape),
        "dtype": dtype,
        "shards": [_shard(r, world, n) for r in range(world)],
    }
    if accelerator is None or accelerator.is_main_process:
        atomic_write_text(folder / _INDEX, json.dumps(index, indent=1) + "\n")
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return CachedMaps(folder, index)
