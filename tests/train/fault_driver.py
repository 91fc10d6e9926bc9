"""Runs ``qsenn ARGS`` and SIGKILLs itself at a chosen file operation: fault injection for crash-consistency tests.

``QSENN_KILL_AT=op:name:k`` kills the process right before the k-th call of ``os.<op>`` whose target's file name
ends with ``name`` (``any`` for any op, an empty name for any target). Only this process is instrumented: the
operations are the boundaries a crash can fall between (renames, replaces, flushes, folder changes).
"""

import os
import signal
import sys

OPERATIONS = ("replace", "rename", "fsync", "unlink", "rmdir", "mkdir")


def _instrument(op: str, name: str, k: int) -> None:
    count = 0

    def wrap(fn_name, fn):
        def inner(*args, **kwargs):
            nonlocal count
            target = args[1] if fn_name in ("replace", "rename") else args[0]
            target = "" if isinstance(target, int) else os.path.basename(os.fspath(target))
            if op in ("any", fn_name) and target.endswith(name):
                count += 1
                if count == k:
                    os.kill(os.getpid(), signal.SIGKILL)
            return fn(*args, **kwargs)

        return inner

    for fn_name in OPERATIONS:
        setattr(os, fn_name, wrap(fn_name, getattr(os, fn_name)))


if __name__ == "__main__":
    op, name, k = os.environ["QSENN_KILL_AT"].split(":")
    _instrument(op, name, int(k))
    from timm_qsenn.cli import main

    sys.argv = ["qsenn", *sys.argv[1:]]
    main()
