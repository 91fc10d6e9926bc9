"""Work that one process does for all (file writes, the sparse fit) without leaving the others waiting."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object

__all__ = ["on_main", "on_every"]


def on_main(accelerator: Accelerator, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on the main process only; every process gets its result, or raises its error."""
    result = error = None
    if accelerator.is_main_process:
        try:
            result = fn()
        except Exception as e:  # handed to every process below, which all raise it
            error = e
    if accelerator.num_processes > 1:
        result, error = broadcast_object_list([result, error], from_process=0)
    if error is not None:
        raise error
    return result


def on_every(accelerator: Accelerator, fn: Callable[[], Any]) -> None:
    """Run ``fn`` on every process; if it fails anywhere, every process raises the first error."""
    error = None
    try:
        fn()
    except Exception as e:  # gathered below so that no process waits forever for a failed one
        error = e
    errors = gather_object([error]) if accelerator.num_processes > 1 else [error]
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise first
