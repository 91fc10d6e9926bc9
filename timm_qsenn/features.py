"""Pooled features of a Q-SENN model over a loader, their statistics, and an on-disk cache keyed by content.

The cache key is a digest of everything that determines the result: the model's state dict (weights, buffers
and the head's selection), the dataset's identity, the dataset transform, the loader's row set and the
precision. A changed setting therefore never reuses a stale result, which the reference (cached by seed
folder) did.

Features are stored in float32, or in float16/bfloat16 at half the memory. With ``shard=True`` under several
processes each process computes, caches and keeps only its consecutive share of the rows, and a cache file is
read back memory-mapped, so nothing is loaded until the solver reads it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from ._utils import SAFETENSORS_DTYPES, atomic_write, eval_mode, forward_batches, gather, is_shuffled, shard_bounds
from .sparse.rows import Rows

__all__ = [
    "FeatureSet",
    "extract_features",
    "pooled_features",
    "clear_feature_cache",
    "feature_cache_key",
    "dataset_fingerprint",
]

_logger = logging.getLogger(__name__)

_FORMAT = "timm_qsenn.features"
_FORMAT_VERSION = "1"
_PREFIX = "qsenn-features-"
_TENSORS = ("features", "labels", "mean", "std", "row_index")
_DTYPES = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}
# Attributes that list a dataset's items in common dataset classes (torchvision, timm readers, custom ones).
_ITEM_LISTS = ("samples", "imgs", "files", "file_list", "filenames", "image_paths", "_image_files")


@dataclass
class FeatureSet:
    """Pooled features of every row of a dataset (or of this process's shard), with their per-feature mean and
    population std over every row."""

    features: Tensor  # N x F (float32, float16 or bfloat16), CPU, in dataset order; possibly memory-mapped
    labels: Tensor  # N, int64
    mean: Tensor  # F, float32
    std: Tensor  # F, float32, population (divided by N)
    key: str  # content key of the cache entry
    row_index: Tensor | None = None  # with shard=True: the dataset indices of this process's rows

    def __len__(self) -> int:
        return self.features.shape[0]


# -- cache key ---------------------------------------------------------------------------------------------


def _hash_tensor(h: Any, tensor: Tensor) -> None:
    t = tensor.detach().to("cpu").contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)


def _hash_text(value: Any) -> str:
    return hashlib.sha256(repr(value).encode()).hexdigest()


def _state_digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        _hash_tensor(h, tensor)
    return h.hexdigest()


def dataset_fingerprint(dataset: Any) -> str:
    """Identity of a dataset: its own ``fingerprint()`` when it has one, else type, length and item lists."""
    custom = getattr(dataset, "fingerprint", None)
    if callable(custom):
        return f"fingerprint:{custom()}"
    parts = [f"{type(dataset).__module__}.{type(dataset).__qualname__}", f"len={len(dataset)}"]
    known = False
    if isinstance(dataset, Subset):
        parts += [f"indices={_hash_text(list(dataset.indices))}", f"of={dataset_fingerprint(dataset.dataset)}"]
        known = True
    if isinstance(dataset, TensorDataset):
        h = hashlib.sha256()
        for tensor in dataset.tensors:
            _hash_tensor(h, tensor)
        parts.append(f"tensors={h.hexdigest()}")
        known = True
    for attr in _ITEM_LISTS:
        value = getattr(dataset, attr, None)
        if callable(value):
            try:
                value = value()
            except TypeError:
                continue
        if isinstance(value, Iterable) and not isinstance(value, (str, bytes)):
            parts.append(f"{attr}={_hash_text(list(value))}")
            known = True
    reader = getattr(dataset, "reader", None)
    if reader is not None and getattr(reader, "samples", None) is not None:
        parts.append(f"reader.samples={_hash_text(list(reader.samples))}")
        known = True
    if not known:
        _logger.warning(
            "dataset %s has no fingerprint() and no item list; its feature cache key only knows its type and "
            "length, so give it a fingerprint() method that changes with its content",
            parts[0],
        )
    return "|".join(parts)


def _transform_repr(dataset: Any) -> str:
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return f"{getattr(dataset, 'transform', None)!r}|{getattr(dataset, 'target_transform', None)!r}"


def feature_cache_key(model: nn.Module, loader: DataLoader, precision: str = "no") -> str:
    """Content key of the features ``model`` computes over ``loader``: weights, data, transform, selection."""
    dataset = loader.dataset
    head = getattr(model, "head", None)
    selection = getattr(head, "selection", None)
    parts = [
        f"{_FORMAT}/{_FORMAT_VERSION}",
        f"model={type(model).__qualname__}:{_state_digest(model)}",
        f"dataset={dataset_fingerprint(dataset)}",
        f"transform={_transform_repr(dataset)}",
        f"selection={selection.tolist() if isinstance(selection, Tensor) else None}",
        f"drop_last={getattr(loader, 'drop_last', False)}:{getattr(loader, 'batch_size', None)}",
        f"precision={precision}",
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


# -- cache files -------------------------------------------------------------------------------------------


def _cache_path(cache_dir: str | os.PathLike, key: str) -> Path:
    return Path(cache_dir) / f"{_PREFIX}{key[:32]}.safetensors"


def _checksum(tensors: dict[str, Tensor]) -> str:
    h = hashlib.sha256()
    for name in _TENSORS:
        if name in tensors:
            h.update(name.encode())
            _hash_tensor(h, tensors[name])
    return h.hexdigest()


def _map_file(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors of a safetensors file as views of a private memory map (pages are read when used)."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    raw = torch.from_file(str(path), shared=False, size=path.stat().st_size, dtype=torch.uint8)
    tensors = {}
    for name, info in header.items():
        if name != "__metadata__":
            start, stop = (8 + size + offset for offset in info["data_offsets"])
            tensors[name] = raw[start:stop].view(_DTYPES[info["dtype"]]).reshape(info["shape"])
    return tensors, header.get("__metadata__", {})


def _load_cache(path: Path, key: str) -> FeatureSet | None:
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt"):
            pass  # the header and the file size are checked here, before any tensor is mapped
        tensors, meta = _map_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError, KeyError) as exc:
        _logger.warning("feature cache %s is unreadable (%s); recomputing it", path, exc)
        return None
    if meta.get("format") != _FORMAT or meta.get("version") != _FORMAT_VERSION or meta.get("key") != key:
        _logger.warning("feature cache %s belongs to another format or key; recomputing it", path)
        return None
    if meta.get("sha256") != _checksum(tensors):
        _logger.warning("feature cache %s failed its checksum (corrupt or truncated); recomputing it", path)
        return None
    _logger.info("feature cache hit: %s", path)
    return FeatureSet(key=key, **tensors)


def _save_cache(path: Path, result: FeatureSet) -> None:
    tensors = {name: getattr(result, name).contiguous() for name in _TENSORS if getattr(result, name) is not None}
    meta = {"format": _FORMAT, "version": _FORMAT_VERSION, "key": result.key, "sha256": _checksum(tensors)}
    # A crash mid-write never leaves a file that looks complete.
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def clear_feature_cache(cache_dir: str | os.PathLike) -> int:
    """Delete every feature cache file under ``cache_dir``; return how many were removed."""
    root = Path(cache_dir)
    if not root.is_dir():
        return 0
    removed = 0
    for path in root.glob(f"{_PREFIX}*"):
        path.unlink(missing_ok=True)
        removed += 1
    return removed


# -- extraction --------------------------------------------------------------------------------------------


def pooled_features(
    model: nn.Module,
    loader: Iterable,
    accelerator: Any = None,
    progress: bool = False,
    *,
    dtype: torch.dtype = torch.float32,
    gather_rows: bool = True,
) -> tuple[Tensor, Tensor]:
    """N x F pooled features (in ``dtype``, CPU) and N labels over a loader of ``(images, labels)``, in loader order.

    Runs in eval mode under ``no_grad`` and restores every module's mode; holds only the pooled features, never
    the maps, each batch converted to ``dtype`` as it comes. With an ``accelerator`` the batches of a sharded
    loader are gathered, each row once, unless ``gather_rows`` is False (each process keeps its own rows).
    """
    net = accelerator.unwrap_model(model) if accelerator is not None else model
    if not hasattr(net, "forward_qsenn"):
        raise TypeError(
            f"model must be a timm_qsenn QSENN model with forward_qsenn(), got {type(net).__name__}; create it "
            "with timm.create_model('<backbone>_qsenn', ...)"
        )
    device = accelerator.device if accelerator is not None else next(net.parameters()).device
    features, labels = [], []
    with eval_mode(model), torch.no_grad():
        batches = forward_batches(
            net, loader, device=device, accelerator=accelerator, progress=progress, desc="features"
        )
        for out, target in batches:
            pooled = out.features.float()
            if gather_rows:
                # Drops the samples a sharded loader repeats to even out the last batch: rows end up exactly
                # once each, in dataset order, on every rank.
                pooled, target = gather(accelerator, (pooled, target))
            features.append(pooled.to(device="cpu", dtype=dtype))
            labels.append(target.cpu())
    if not features:
        raise ValueError("the loader yielded no batches; pass a loader over a non-empty dataset")
    return torch.cat(features), torch.cat(labels)


def _shard_loader(loader: DataLoader, rank: int, world: int) -> tuple[DataLoader, Tensor]:
    """A plain loader over process ``rank``'s consecutive share of ``loader``'s dataset, and its row indices."""
    index = torch.arange(*shard_bounds(rank, world, len(loader.dataset)))
    batch_size = loader.batch_size or getattr(loader.batch_sampler, "batch_size", 1)
    shard = DataLoader(
        Subset(loader.dataset, index.tolist()),
        batch_size=batch_size,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
    )
    return shard, index


def extract_features(
    model: nn.Module,
    loader: DataLoader,
    accelerator: Any = None,
    cache_dir: str | os.PathLike | None = None,
    show_progress: bool = False,
    *,
    dtype: torch.dtype = torch.float32,
    shard: bool = False,
) -> FeatureSet:
    """Pooled features (``model.forward_qsenn(x).features``) of every row of ``loader``, with statistics.

    The model runs in eval mode under ``no_grad`` and gets its train/eval modes back afterwards. ``loader``
    must yield ``(images, labels)`` in dataset order (no shuffling) with the test transform. With an
    ``accelerator`` the loader is the prepared, sharded one; features are gathered so that every rank returns
    all N rows in dataset order, and only the main process writes the cache. With ``shard=True`` and several
    processes nothing is gathered: each process computes, caches (one file per process) and returns only its
    consecutive share of the dataset's rows, with their indices in ``row_index``; the statistics are over all
    rows. ``dtype`` (float32, float16 or bfloat16) is the storage dtype of the features. ``cache_dir=None``
    disables the cache; otherwise results are stored under a content key (see :func:`feature_cache_key`), read
    back memory-mapped, and a corrupt cache file is detected by its checksum and recomputed.
    """
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"dtype must be torch.float32, torch.float16 or torch.bfloat16, got {dtype}")
    if is_shuffled(loader):
        raise ValueError(
            "the loader shuffles (RandomSampler); build it with shuffle=False so that features come back in "
            "dataset order and match the cache"
        )
    net = accelerator.unwrap_model(model) if accelerator is not None else model
    precision = str(getattr(accelerator, "mixed_precision", "no")) if accelerator is not None else "no"
    world = accelerator.num_processes if accelerator is not None else 1
    sharded = shard and world > 1
    key = feature_cache_key(net, loader, precision)
    if dtype != torch.float32 or sharded:
        # A float32 cache of all rows keeps the key it always had; any other layout is another entry.
        rank = accelerator.process_index if sharded else 0
        variant = f"{key}|dtype={dtype}|shard={rank}/{world if sharded else 1}|split=balanced"
        key = hashlib.sha256(variant.encode()).hexdigest()
    path = _cache_path(cache_dir, key) if cache_dir is not None else None

    cached = _load_cache(path, key) if path is not None else None
    if accelerator is not None and accelerator.num_processes > 1:
        # Every rank must take the same branch, or the gathers of the ranks that recompute would hang.
        flag = torch.tensor([1 if cached is not None else 0], device=accelerator.device)
        if int(accelerator.gather(flag).min()) == 0:
            cached = None
    if cached is not None:
        return cached

    row_index = None
    if sharded:
        shard_loader, row_index = _shard_loader(loader, accelerator.process_index, world)
        features, labels = pooled_features(
            model, shard_loader, accelerator, show_progress, dtype=dtype, gather_rows=False
        )
    else:
        features, labels = pooled_features(model, loader, accelerator, show_progress, dtype=dtype)
    finite = torch.isfinite(features)
    if not finite.all():
        rows = int((~finite).any(dim=1).sum())
        cols = (~finite).any(dim=0).nonzero().flatten().tolist()
        raise ValueError(
            f"the model produced NaN or inf features in {rows} rows (feature columns {cols[:10]}"
            f"{'...' if len(cols) > 10 else ''}); check the model's weights or run in float32 instead of fp16"
        )
    group = dist.group.WORLD if sharded else None
    mean, std = (value.to(torch.float32) for value in Rows(features, process_group=group).statistics())
    result = FeatureSet(features=features, labels=labels, mean=mean, std=std, key=key, row_index=row_index)
    if path is not None:
        if accelerator is None or accelerator.is_main_process or sharded:
            _save_cache(path, result)
        if accelerator is not None:
            accelerator.wait_for_everyone()
    return result
