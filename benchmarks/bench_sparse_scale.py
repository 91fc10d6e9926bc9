"""Sparse fitting at scale: wall time and peak memory of the feature selection and of one path against n.

Synthetic pooled-feature-like data (as ``bench_sparse.py``: class-dependent means on 30% of the channels, 8
shared factors, ReLU), n x 2048 with 200 classes, generated chunk by chunk straight into the storage dtype
(float16 by default), so that no float32 copy of the matrix ever exists. Every measurement runs in a fresh
subprocess and reports the RSS before the data existed (the baseline: Python, torch, the interpreter) and the
peak RSS of the solve: the kernel's high-water mark (``VmHWM``) is reset once the data exist, so the peak
holds the matrix and everything the solver adds, not the generator's temporaries (where the kernel cannot
reset it, the process's lifetime peak stands in, an upper bound). With ``--processes 2`` two gloo processes
each generate and hold only their half of the rows and solve together.

    python benchmarks/bench_sparse_scale.py                          # selection at 6k, 25k, 100k, 400k
    python benchmarks/bench_sparse_scale.py --sizes 6000 25000 --path-sizes 6000 --wide 25000 --processes 1 2

Selection: 50 features by the one-at-a-time group path (``selection_path``, 100 lambdas). Path: one 100-lambda
elastic-net path on n x 50 standardised features (``elastic_net_path``). Wide: the selection with 1000 classes.
The last lines are the fitted exponent of time against n, one per task and process count, and the time it
predicts at ImageNet's 1,281,167 rows (``--extrapolate``).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

_CHUNK = 8192  # rows generated per seeded chunk: any process can produce any rows, the same on every layout


def _status_bytes(field: str) -> int:
    """A memory figure of this process from ``/proc/self/status`` (``VmRSS``, ``VmHWM``), in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field} line")


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux 4.0+); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


def synthetic_rows(start: int, stop: int, num_features: int, num_classes: int, dtype: torch.dtype, seed: int = 0):
    """Rows ``start:stop`` of the synthetic problem (features in ``dtype``, labels), generated chunk by chunk."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(num_classes, num_features, generator=gen) < 0.3
    means = 2.0 * torch.randn(num_classes, num_features, generator=gen) * mask
    loadings = torch.randn(8, num_features, generator=gen) * 0.5
    features = torch.empty(stop - start, num_features, dtype=dtype)
    labels = torch.empty(stop - start, dtype=torch.int64)
    for first in range(start - start % _CHUNK, stop, _CHUNK):
        g = torch.Generator().manual_seed(seed * 1_000_003 + first // _CHUNK + 1)
        y = torch.randint(0, num_classes, (_CHUNK,), generator=g)
        x = torch.relu(
            means[y] + torch.randn(_CHUNK, 8, generator=g) @ loadings + torch.randn(_CHUNK, num_features, generator=g)
        )
        lo, hi = max(first, start), min(first + _CHUNK, stop)
        features[lo - start : hi - start] = x[lo - first : hi - first]
        labels[lo - start : hi - start] = y[lo - first : hi - first]
    return features, labels


def worker(args: argparse.Namespace) -> dict:
    """One measurement in this process (one rank of ``args.world``); returns the figures."""
    import torch.distributed as dist

    from timm_qsenn.sparse import elastic_net_path, selection_path

    group = None
    if args.world > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // args.world))
        dist.init_process_group("gloo", init_method=args.init, rank=args.rank, world_size=args.world)
        group = dist.group.WORLD
    base = _status_bytes("VmRSS")
    dtype = getattr(torch, args.storage)
    shard = math.ceil(args.n / args.world)
    start, stop = args.rank * shard, min(args.n, (args.rank + 1) * shard)
    num_features = 50 if args.task == "path" else args.features
    x, y = synthetic_rows(start, stop, num_features, args.classes, dtype)
    gc.collect()
    data = _status_bytes("VmRSS")
    reset = _reset_peak()
    t0 = time.perf_counter()
    if args.task == "path":
        # Standardise as sparsify does, with the statistics of all rows (a small n x 50 matrix).
        from timm_qsenn.sparse.rows import Rows

        mean, std = Rows(x, process_group=group).statistics()
        xs = ((x.double() - mean) / std.clamp_min(1e-5)).float()
        path = elastic_net_path(xs, y, num_classes=args.classes, n_lambdas=100, process_group=group)
        extra = dict(n_iter=int(path.n_iter.sum()), converged=int(path.converged.sum()), nnz=int(path.nnz[-1]))
    else:
        sel = selection_path(x, y, 50, process_group=group)
        extra = dict(n_iter=sel.n_iter, first=sel.order[:5].tolist())
    seconds = time.perf_counter() - t0
    if group is not None:
        dist.destroy_process_group()
    matrix = x.numel() * x.element_size()
    lifetime = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    peak = _status_bytes("VmHWM") if reset else lifetime
    return dict(seconds=seconds, peak=peak, lifetime=lifetime, base=base, data=data, matrix=matrix, **extra)


def measure(task: str, n: int, classes: int, processes: int, args: argparse.Namespace) -> dict:
    """Run one measurement in ``processes`` fresh subprocesses; the slowest rank's time, the largest peak."""
    with tempfile.TemporaryDirectory() as tmp:
        common = [sys.executable, __file__, "--worker", "--task", task, "--n", str(n), "--classes", str(classes)]
        common += ["--features", str(args.features), "--storage", args.storage, "--world", str(processes)]
        common += ["--init", f"file://{tmp}/rendezvous"]
        procs = [
            subprocess.Popen(common + ["--rank", str(r)], stdout=subprocess.PIPE, text=True) for r in range(processes)
        ]
        outs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        return dict(task=task, n=n, classes=classes, processes=processes, failed=[p.returncode for p in procs])
    ranks = [json.loads(out.strip().splitlines()[-1]) for out in outs]
    row = dict(task=task, n=n, classes=classes, processes=processes, **ranks[0])
    row["seconds"] = max(r["seconds"] for r in ranks)
    row["peak"] = max(r["peak"] for r in ranks)
    # Memory above the baseline in units of this process's feature shard.
    row["extra_over_shard"] = max((r["peak"] - r["base"]) / r["matrix"] for r in ranks)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="*", default=[6000, 25000, 100000, 400000])
    parser.add_argument("--path-sizes", type=int, nargs="*", default=[6000, 25000, 100000])
    parser.add_argument("--wide", type=int, nargs="*", default=[25000], help="sizes of the 1000-class selection")
    parser.add_argument("--processes", type=int, nargs="+", default=[1])
    parser.add_argument("--features", type=int, default=2048)
    parser.add_argument("--classes", type=int, default=200)
    parser.add_argument("--storage", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    parser.add_argument("--extrapolate", type=int, default=1_281_167, help="n to estimate the time at (ImageNet)")
    # The worker side of a measurement.
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--task", default="select", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--init", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return

    jobs = [("select", n, args.classes) for n in args.sizes] + [("path", n, args.classes) for n in args.path_sizes]
    jobs += [("select", n, 1000) for n in args.wide]
    rows = []
    print(
        f"{'task':>7} {'n':>8} {'C':>5} {'procs':>5} {'seconds':>9} {'peak GB':>8} {'shard GB':>8} {'extra/shard':>11}"
    )
    for task, n, classes in jobs:
        for processes in args.processes:
            row = measure(task, n, classes, processes, args)
            rows.append(row)
            if "failed" in row:
                print(f"{task:>7} {n:>8} {classes:>5} {processes:>5}   failed with exit codes {row['failed']}")
                continue
            print(
                f"{task:>7} {n:>8} {classes:>5} {processes:>5} {row['seconds']:9.1f} {row['peak'] / 1e9:8.2f} "
                f"{row['matrix'] / 1e9:8.2f} {row['extra_over_shard']:11.2f}",
                flush=True,
            )
    for task in ("select", "path"):
        for processes in args.processes:
            points = [
                (r["n"], r["seconds"])
                for r in rows
                if r["task"] == task
                and r["processes"] == processes
                and r["classes"] == args.classes
                and "failed" not in r
            ]
            if len(points) >= 2:
                logn = torch.tensor([math.log(n) for n, _ in points], dtype=torch.float64)
                logt = torch.tensor([math.log(t) for _, t in points], dtype=torch.float64)
                slope = float(((logn - logn.mean()) * (logt - logt.mean())).sum() / (logn - logn.mean()).square().sum())
                largest, seconds = max(points)
                estimate = seconds * (args.extrapolate / largest) ** slope
                print(
                    f"{task} with {processes} process(es): time ~ n^{slope:.2f}; at n = {args.extrapolate:,} "
                    f"about {estimate / 60:.0f} min (extrapolated from n = {largest:,})"
                )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
