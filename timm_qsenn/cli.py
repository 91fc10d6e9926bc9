"""The ``qsenn`` command: train, eval, explain, report, push, pull, demo, and a runner for timm's scripts.

Each sub-command is a pair ``_add_<name>(subparsers)`` / ``_cmd_<name>(args)`` registered in ``COMMANDS``.
Heavy modules are imported inside the command functions so ``qsenn --help`` stays fast.
"""

from __future__ import annotations

import argparse
import runpy
import sys
from collections.abc import Callable
from pathlib import Path

__all__ = ["main"]


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="run a timm script (train.py, validate.py, inference.py, benchmark.py) with Q-SENN models registered",
        description="Imports timm_qsenn, then runs SCRIPT unmodified with ARGS, as `python SCRIPT ARGS` would.",
    )
    p.add_argument("script", help="path to the script, e.g. pytorch-image-models/validate.py")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the script unchanged")


def _cmd_run(args: argparse.Namespace) -> int:
    script = Path(args.script)
    if not script.is_file():
        raise SystemExit(f"qsenn run: script {script} does not exist; timm's scripts live in its git repository")
    import timm_qsenn  # noqa: F401  (registers the models before the script creates one)

    sys.argv = [str(script), *args.args]
    sys.path.insert(0, str(script.resolve().parent))
    runpy.run_path(str(script), run_name="__main__")
    return 0


COMMANDS: list[tuple[Callable[[argparse._SubParsersAction], None], Callable[[argparse.Namespace], int]]] = [
    (_add_run, _cmd_run),
]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``qsenn`` command."""
    parser = argparse.ArgumentParser(prog="qsenn", description="Q-SENN for timm: train, explain and share")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    handlers = {}
    for add, run in COMMANDS:
        before = set(sub.choices)
        add(sub)
        for name in set(sub.choices) - before:
            handlers[name] = run
    parser.set_defaults(_handlers=handlers)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``qsenn`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    sys.exit(args._handlers[args.command](args) or 0)
