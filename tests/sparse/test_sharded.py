"""The sharded solve: 2 gloo processes, each with its own (uneven, interleaved) shard of the rows, give the
1-process answer, and the same bits on both ranks."""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from timm_qsenn.sparse import sparsify
from timm_qsenn.sparse.rows import Rows

from .conftest import structured_problem

# float64 solved to 1e-8 of lambda_max: the sharded and the whole-matrix solve differ only in the order of their
# sums, so their weights agree far within 1e-4 of the largest; a shard left out of a sum moves them by O(1).
SETTINGS = dict(n_features=6, n_per_class=2, n_lambdas=10, eps=1e-2, dtype=torch.float64, tol=1e-8)


def _problem():
    return structured_problem(n=300, num_features=20, num_classes=4, informative=8, seed=3, dtype=torch.float64)


def _shard(rank: int) -> torch.Tensor:
    # Uneven and interleaved: rank 0 holds every third row, rank 1 the rest.
    every = torch.arange(300)
    return every[every % 3 == 0] if rank == 0 else every[every % 3 != 0]


def _worker(rank: int, init: str, out: str) -> None:
    torch.set_num_threads(1)  # two processes on a small CPU: oversubscribed threads would make gloo crawl
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        x, y = _problem()
        index = _shard(rank)
        rows = Rows(x[index], chunk_rows=29, process_group=dist.group.WORLD)
        partial = torch.tensor([float(rank + 1)], dtype=torch.float64)
        sums = [rows.n_total, float(rows.sum(partial))]
        sh = sparsify(x[index], y[index], row_index=index, chunk_rows=29, process_group=dist.group.WORLD, **SETTINGS)
        torch.save(
            dict(
                sums=sums,
                order=sh.selection_order,
                weight=sh.dense_weight,
                bias=sh.dense_bias,
                ternary=sh.weight,
                val_acc=sh.val_acc,
            ),
            os.path.join(out, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_give_the_one_process_answer(tmp_path):
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.start_processes(_worker, args=(init, str(tmp_path)), nprocs=2, start_method="spawn", join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    x, y = _problem()
    one = sparsify(x, y, **SETTINGS)
    assert ranks[0]["sums"] == [300, 3.0]
    for key in ("order", "weight", "bias", "ternary", "val_acc"):
        assert torch.equal(ranks[0][key], ranks[1][key]), key  # bitwise the same iterates on every rank
    shard = ranks[0]
    assert torch.equal(shard["order"], one.selection_order)
    scale = float(one.dense_weight.abs().max())
    assert float((shard["weight"] - one.dense_weight).abs().max()) <= 1e-4 * scale
    assert float((shard["bias"] - one.dense_bias).abs().max()) <= 1e-4 * max(float(one.dense_bias.abs().max()), 1.0)
    assert torch.allclose(shard["val_acc"], one.val_acc)
