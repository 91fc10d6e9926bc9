"""A run's folder: one writer at a time, and checkpoints that a crash at any moment cannot leave half-made.

Layout::

    .lock              held (flock) by the one process that writes the run; names it for a second one
    config.yaml        the resolved config; a different config in the folder is refused (another run)
    state.json         the commit point: progress, results, and the checkpoint folder it belongs to
    checkpoints/<n>/   the checkpoint state.json names (Accelerate state + trainer.json + ema.safetensors)

A checkpoint is written into ``checkpoints/<n>.partial``, flushed to disk, renamed to ``checkpoints/<n>`` and
only then named by ``state.json``, itself replaced atomically. Whatever a SIGKILL interrupts, ``state.json``
names a complete checkpoint (or none), and everything else under ``checkpoints/`` is removed on the next start.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .._utils import atomic_write_text, sync_folder

__all__ = ["RunExistsError", "RunInUseError", "RunState", "RunLock", "RunFolder", "STATE_FORMAT_VERSION"]

_logger = logging.getLogger(__name__)

# 2: checkpoints are named by state.json and hold no pickle of the trainer's own (version 1 had checkpoints/last
# with a trainer.pt).
STATE_FORMAT_VERSION = 2
_PARTIAL = ".partial"


class RunExistsError(FileExistsError):
    """The output folder holds another run, a finished one, or files that are not a run."""


class RunInUseError(RunExistsError):
    """Another process is writing the run in this folder."""


@dataclass
class RunState:
    """Progress of a run, persisted in ``state.json``: the commit point of every checkpoint."""

    fingerprint: str
    checkpoint: dict[str, Any] | None = None  # {"folder", "phase", "epoch", "batch", "updates"}: what runs next
    results: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    finished: bool = False
    format_version: int = STATE_FORMAT_VERSION


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """An exclusive lock on a run folder, held through an ``flock`` on ``<folder>/.lock``.

    The kernel drops an ``flock`` when its process dies, so a lock left behind by a killed run is simply taken
    over; the file names the process that holds (or last held) the lock, for the message a second run prints.
    """

    def __init__(self, folder: Path):
        self.path = Path(folder) / ".lock"
        self._fd: int | None = None

    def _holder(self) -> dict[str, Any]:
        with contextlib.suppress(OSError, ValueError):
            return json.loads(self.path.read_text() or "{}")
        return {}

    def _in_use(self) -> RunInUseError:
        holder = self._holder()
        who = f"process {holder.get('pid', '?')} on {holder.get('host', '?')}"
        since = f" since {holder['started']}" if holder.get("started") else ""
        return RunInUseError(
            f"{self.path.parent} is in use by {who}{since} ({holder.get('command', 'another qsenn train')}); "
            "wait for it to finish, or choose another run.output"
        )

    def check_free(self) -> None:
        """Raise :class:`RunInUseError` if another process holds the lock; changes nothing on disk."""
        if not self.path.exists():
            return
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise self._in_use() from None
        finally:
            os.close(fd)

    def acquire(self) -> None:
        """Take the lock or raise :class:`RunInUseError` naming the process that holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise self._in_use() from None
        previous = self._holder()
        if previous.get("pid") and previous.get("host") == socket.gethostname() and not _pid_alive(previous["pid"]):
            _logger.warning(
                "taking over the lock of %s left by process %s, which is no longer running", self.path, previous["pid"]
            )
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(sys.argv[:1] + sys.argv[1:4]),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        """Give the lock up (the file stays, emptied, so a next run sees no holder)."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)
        os.close(self._fd)  # closing drops the flock
        self._fd = None


class RunFolder:
    """The files of one run: config, state (the commit point) and the checkpoint it names.

    Only the main process of a run writes; every method here is plain file handling for that process.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.lock = RunLock(self.path)

    config_path = property(lambda self: self.path / "config.yaml")
    state_path = property(lambda self: self.path / "state.json")
    checkpoints = property(lambda self: self.path / "checkpoints")

    def holds_run(self) -> bool:
        """Whether the folder holds a timm_qsenn run (a state or config file)."""
        return self.state_path.exists() or self.config_path.exists()

    def is_foreign(self) -> bool:
        """Whether the folder exists with files in it but holds no run (somebody else's files)."""
        if not self.path.is_dir() or self.holds_run():
            return False
        return any(p.name != self.lock.path.name for p in self.path.iterdir())

    def read_state(self) -> RunState | None:
        """The committed state, or None for a folder without one."""
        if not self.state_path.exists():
            return None
        try:
            data = json.loads(self.state_path.read_text())
            state = RunState(**data)
        except (ValueError, TypeError) as e:
            raise RunExistsError(
                f"{self.state_path} is corrupt ({e}); the run in {self.path} cannot be resumed: pass --overwrite to "
                "train again, or choose another run.output"
            ) from e
        if state.format_version != STATE_FORMAT_VERSION:
            raise RunExistsError(
                f"{self.path} holds a run written by another timm_qsenn version (run folder format "
                f"{state.format_version}, this version writes {STATE_FORMAT_VERSION}); it cannot be resumed: pass "
                "--overwrite to train it again, or choose another run.output"
            )
        return state

    def write_state(self, state: RunState) -> None:
        """Replace ``state.json`` atomically: the run's commit point."""
        atomic_write_text(self.state_path, json.dumps(asdict(state), indent=2) + "\n")

    def start(self, state: RunState, config_yaml: str) -> None:
        """Write a new run's config and first state into the (locked) folder."""
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.config_path, config_yaml)
        self.write_state(state)

    def clear(self) -> None:
        """Remove everything in the folder except the lock (for ``--overwrite``)."""
        for path in self.path.iterdir():
            if path == self.lock.path:
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()

    # -- checkpoints -----------------------------------------------------------------------------------------

    def checkpoint_folder(self, state: RunState) -> Path | None:
        """The folder of the committed checkpoint, or None."""
        if not state.checkpoint:
            return None
        folder = self.checkpoints / state.checkpoint["folder"]
        if not folder.is_dir():
            raise RunExistsError(
                f"{self.state_path} names checkpoint {folder}, which is missing; the run cannot be resumed: pass "
                "--overwrite to train again, or choose another run.output"
            )
        return folder

    def next_partial(self, state: RunState) -> Path:
        """The (empty) folder to write the next checkpoint into."""
        index = int(state.checkpoint["folder"]) + 1 if state.checkpoint else 0
        partial = self.checkpoints / f"{index:06d}{_PARTIAL}"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        return partial

    def commit(self, state: RunState, partial: Path, info: dict[str, Any]) -> None:
        """Make the written checkpoint ``partial`` the run's checkpoint: flush, rename, name it in the state."""
        for path in partial.iterdir():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        sync_folder(partial)
        final = partial.with_name(partial.name.removesuffix(_PARTIAL))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        sync_folder(self.checkpoints)
        previous = state.checkpoint
        state.checkpoint = {"folder": final.name, **info}
        try:
            self.write_state(state)
        except BaseException:
            state.checkpoint = previous
            raise
        self.remove_stale(state)

    def discard(self, partial: Path) -> None:
        """Remove a checkpoint folder whose writing failed."""
        shutil.rmtree(partial, ignore_errors=True)

    def remove_stale(self, state: RunState) -> None:
        """Delete every checkpoint folder the state does not name (older ones, or one a crash left unnamed)."""
        if not self.checkpoints.is_dir():
            return
        keep = state.checkpoint["folder"] if state.checkpoint else None
        for path in self.checkpoints.iterdir():
            if path.name != keep:
                shutil.rmtree(path, ignore_errors=True)
