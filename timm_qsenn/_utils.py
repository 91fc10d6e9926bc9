"""Package-private helpers that several modules share: eval mode, one pass over a loader, JSON, atomic writes.

Everything here is internal to timm_qsenn (the module name says so); the names are public so that every
module imports the same helper instead of keeping a copy.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "SAFETENSORS_DTYPES",
    "shard_bounds",
    "eval_mode",
    "forward_batches",
    "gather",
    "is_shuffled",
    "read_table",
    "write_json",
    "atomic_write",
    "atomic_write_text",
    "sync_folder",
    "flatten_dict",
    "package_version",
    "environment",
]

# The dtype names of the safetensors header, for the two caches that write or map such files by hand.
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64"}


def shard_bounds(rank: int, world: int, n: int) -> tuple[int, int]:
    """The consecutive rows ``start, stop`` of ``n`` that process ``rank`` of ``world`` holds: in rank order,
    sizes differing by at most one. The one split rule of every per-process cache."""
    return rank * n // world, (rank + 1) * n // world


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Put ``module`` in eval mode for the block and give every submodule its own mode back afterwards."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training


def forward_batches(
    model: nn.Module,
    loader: Iterable,
    *,
    device: torch.device | str,
    accelerator: Any | None = None,
    progress: bool = False,
    desc: str = "",
) -> Iterator[tuple[Any, Tensor]]:
    """``(model.forward_qsenn(images), labels)`` for every ``(images, labels)`` batch of ``loader``, on ``device``.

    The caller sets the mode (``eval_mode``) and the grad mode; with an ``accelerator`` the forward runs under
    its autocast (``forward_qsenn`` bypasses the autocast Accelerate wraps around ``forward``). Shows a tqdm
    bar with ``progress`` (on the main process only).
    """
    batches = loader
    if progress and (accelerator is None or accelerator.is_main_process):
        from tqdm.auto import tqdm

        batches = tqdm(loader, desc=desc or None, leave=False, dynamic_ncols=True)
    autocast = accelerator.autocast if accelerator is not None else contextlib.nullcontext
    for batch in batches:
        if not isinstance(batch, list | tuple) or len(batch) < 2:
            raise TypeError(f"the loader must yield (images, labels) batches, got {type(batch).__name__}")
        images = batch[0].to(device, non_blocking=True)  # a no-op for the batches of a prepared loader
        labels = torch.as_tensor(batch[1]).to(device=device, dtype=torch.int64, non_blocking=True)
        with autocast():
            out = model.forward_qsenn(images)
        yield out, labels


def gather(accelerator: Any | None, tensors: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """The tensors of every process, each row once (``gather_for_metrics``); unchanged without an accelerator."""
    if accelerator is None:
        return tensors
    return tuple(accelerator.gather_for_metrics(tensors))


def is_shuffled(loader: Iterable) -> bool:
    """Whether a loader (plain or prepared by Accelerate) draws its samples in random order."""
    samplers = [getattr(loader, "sampler", None)]
    batch_sampler = getattr(loader, "batch_sampler", None)
    while batch_sampler is not None:
        samplers.append(getattr(batch_sampler, "sampler", None))
        batch_sampler = getattr(batch_sampler, "batch_sampler", None)
    return any(isinstance(s, torch.utils.data.RandomSampler) for s in samplers)


def read_table(path: Path) -> list[list[str]]:
    """The whitespace-separated rows of one of a dataset's official text files (CUB, FGVC-Aircraft)."""
    if not path.is_file():
        raise FileNotFoundError(f"missing {path.name} in {path.parent}; the dataset's official files are incomplete")
    return [line.split() for line in path.read_text().splitlines() if line.strip()]


def write_json(data: Any, path: str | os.PathLike | None = None) -> str:
    """``data`` as indented JSON text, also written (atomically) to ``path`` when given."""
    text = json.dumps(data, indent=2)
    if path is not None:
        atomic_write_text(path, text + "\n")
    return text


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Write a file so that ``path`` holds either its old content or the complete new one, even after a crash.

    ``write(tmp)`` writes the content to a temporary file in the same folder; it is flushed to disk and then
    renamed over ``path``, and the folder entry is flushed too. A failed write leaves ``path`` untouched.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    sync_folder(target.parent)
    return target


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """:func:`atomic_write` of a UTF-8 text."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def sync_folder(folder: str | os.PathLike) -> None:
    """Flush a folder's entries (renames, new files) to disk, where the platform allows it."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def flatten_dict(tree: Mapping[str, Any], prefix: str = "", keep: Iterable[str] = ()) -> dict[str, Any]:
    """Nested mappings as one level of dotted keys; mappings under a key named in ``keep`` stay values."""
    keep = frozenset(keep)
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and key not in keep:
            flat.update(flatten_dict(value, f"{prefix}{key}.", keep))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def package_version() -> str:
    """The installed timm_qsenn version (from the package metadata, so no module imports the package's face)."""
    try:
        return metadata.version("timm-qsenn")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def environment(device: torch.device | str | None = None) -> dict[str, Any]:
    """The software and hardware that produced a result: versions, the device and the CPU model."""
    import accelerate
    import timm

    device = torch.device(device) if device is not None else torch.device("cpu")
    info: dict[str, Any] = {
        "timm_qsenn": package_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "accelerate": accelerate.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "cpu": _cpu_model(),
        "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
