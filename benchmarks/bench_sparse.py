"""Sparsification speed: our elastic-net path against glm-saga (the reference solver), and Q-SENN end to end.

Both solvers get the same CUB-shaped synthetic problem in the same process on the same device: 5994 pooled
features of 2048 channels, 200 classes (non-negative, correlated, class-dependent means), normalised with the
full-set mean and population std and split 90/10 as the reference does, so the path fits 5395 x 50.

glm-saga runs with the reference settings (alpha 0.99, 100 lambdas + lambda=0, eps 1e-3, lr 0.1, batch 256,
tol 1e-4, lookbehind 5) and is stopped after a wall-time cap; our path is then fitted on exactly the lambdas it
finished, and the two are compared on time for those steps and on the objective at each of those lambdas.

    python benchmarks/bench_sparse.py --quick          # < 2 min on a 2-core CPU
    python benchmarks/bench_sparse.py --device cuda    # full run on a GPU

The last line printed is the speed ratio against glm-saga.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import time
import warnings

import torch
from torch.utils.data import DataLoader

from timm_qsenn.sparse import elastic_net_path, normalize_features, objective, sparsify, split_indices


class _CapReached(Exception):
    pass


def cub_like_features(
    n: int = 5994, num_features: int = 2048, num_classes: int = 200, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled-feature-like data: each class raises a random 30% of the channels, 8 shared factors correlate
    the channels, and a ReLU makes them non-negative (a dense path on 50 of them reaches ~73% validation
    accuracy, about what Q-SENN's glm step sees on CUB)."""
    gen = torch.Generator().manual_seed(seed)
    labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=gen)]
    mask = torch.rand(num_classes, num_features, generator=gen) < 0.3
    means = 2.0 * torch.randn(num_classes, num_features, generator=gen) * mask
    shared = torch.randn(n, 8, generator=gen) @ torch.randn(8, num_features, generator=gen) * 0.5
    features = torch.relu(means[labels] + shared + torch.randn(n, num_features, generator=gen))
    return features, labels


def run_glm_saga(x: torch.Tensor, y: torch.Tensor, num_classes: int, cap: float, device: str) -> dict:
    """glm-saga with the reference settings, stopped at the first step end after ``cap`` seconds."""
    from glm_saga import elasticnet

    steps: list[dict] = []
    original = elasticnet.elastic_loss_and_acc_loader
    start = 0.0

    def record(linear, loader, lam, alpha, **kwargs):
        # glm-saga evaluates every finished lambda with this function: a step boundary to time and to stop at.
        result = original(linear, loader, lam, alpha, **kwargs)
        steps.append(
            dict(
                lam=float(lam),
                end=time.perf_counter(),
                weight=linear.weight.detach().cpu().clone(),
                bias=linear.bias.detach().cpu().clone(),
            )
        )
        if time.perf_counter() - start > cap:
            raise _CapReached
        return result

    linear = torch.nn.Linear(x.shape[1], num_classes).to(device)
    torch.nn.init.zeros_(linear.weight)
    torch.nn.init.zeros_(linear.bias)
    loader = DataLoader(elasticnet.IndexedTensorDataset(x, y), batch_size=256, shuffle=True)
    elasticnet.elastic_loss_and_acc_loader = record
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            start = time.perf_counter()
            elasticnet.glm_saga(
                linear,
                loader,
                max_lr=0.1,
                nepochs=2000,
                alpha=0.99,
                k=100,
                epsilon=1e-3,
                tol=1e-4,
                lookbehind=5,
                do_zero=True,
                n_ex=x.shape[0],
                n_classes=num_classes,
            )
    except _CapReached:
        pass
    finally:
        elasticnet.elastic_loss_and_acc_loader = original
    ends = [start] + [s["end"] for s in steps]
    for step, (before, after) in zip(steps, zip(ends[:-1], ends[1:])):
        step["seconds"] = after - before
    return dict(steps=steps, finished=len(steps), total=sum(s["seconds"] for s in steps))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="glm-saga capped at 60 s, one path in the Q-SENN run")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (both solvers run there)")
    parser.add_argument("--glm-cap", type=float, default=None, help="glm-saga wall-time cap in seconds")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cap = args.glm_cap if args.glm_cap is not None else (60.0 if args.quick else 600.0)
    n_paths = 1 if args.quick else 4
    report: dict = dict(device=str(device), threads=torch.get_num_threads(), torch=torch.__version__, cap=cap)
    if device.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(device)
    where = report.get("gpu", f"{report['threads']} CPU threads")
    print(f"device {device} ({where}), torch {torch.__version__}")

    features, labels = cub_like_features(seed=args.seed)
    num_classes = int(labels.max()) + 1
    gen = torch.Generator().manual_seed(args.seed)
    columns = torch.randperm(features.shape[1], generator=gen)[:50]
    normalized = normalize_features(features[:, columns])[0]
    train, val = split_indices(features.shape[0], 0.1, args.seed)
    x_train, y_train = normalized[train], labels[train]
    print(f"path problem: {x_train.shape[0]} x {x_train.shape[1]}, {num_classes} classes, alpha 0.99, eps 1e-3")

    # -- glm-saga, then ours on the lambdas it finished ---------------------------------------------------
    glm = run_glm_saga(x_train, y_train, num_classes, cap, str(device))
    k = glm["finished"]
    # glm-saga appends lambda=0 to its path; the comparison uses the positive lambdas (Q-SENN drops 0 too).
    finished = [s for s in glm["steps"] if s["lam"] > 0]
    positive = [s["lam"] for s in finished]
    glm_seconds = sum(s["seconds"] for s in finished)
    x_dev, y_dev = x_train.to(device), y_train.to(device)
    elastic_net_path(x_dev, y_dev, lambdas=positive[:2])  # warm-up: allocator, kernels, thread pool
    start = time.perf_counter()
    ours = elastic_net_path(x_dev, y_dev, lambdas=positive)
    ours_total = time.perf_counter() - start
    x64 = x_train.double()
    gaps = []
    for i, step in enumerate(finished):
        theirs = objective(x64, y_train, step["weight"], step["bias"], step["lam"])
        mine = objective(x64, y_train, ours.weights[i], ours.biases[i], step["lam"])
        gaps.append((mine - theirs) / abs(theirs))
    worse = sum(g > 1e-6 for g in gaps)
    ratio = glm_seconds / ours_total
    print(
        f"glm-saga (lr 0.1, batch 256, tol 1e-4, lookbehind 5), capped at {cap:.0f} s: {k} of 101 steps in "
        f"{glm['total']:.1f} s ({glm['total'] / max(k, 1):.2f} s/step)"
    )
    print(
        f"ours on the same {len(positive)} lambdas: {ours_total:.3f} s ({1e3 * ours_total / len(positive):.1f} "
        f"ms/step, {int(ours.n_iter.sum())} iterations); objective lower or equal at {len(gaps) - worse}/"
        f"{len(gaps)} steps, relative difference ours - glm-saga: max {max(gaps):+.2e}, min {min(gaps):+.2e}"
    )
    report.update(
        glm_steps=k,
        glm_seconds=glm_seconds,
        ours_seconds_same_steps=ours_total,
        ratio=ratio,
        objective_gap_max=max(gaps),
        objective_gap_min=min(gaps),
        steps_worse=worse,
    )

    # -- our full path ---------------------------------------------------------------------------------
    start = time.perf_counter()
    full = elastic_net_path(x_dev, y_dev, X_val=normalized[val].to(device), y_val=labels[val].to(device))
    full_seconds = time.perf_counter() - start
    print(
        f"ours, full path (100 lambdas): {full_seconds:.2f} s ({1e3 * full_seconds / len(full):.0f} ms/step, "
        f"{int(full.n_iter.sum())} iterations), converged {int(full.converged.sum())}/{len(full)}, max KKT "
        f"{float(full.kkt.max()):.1e} (tol {full.tol:.1e}); last point: nnz {int(full.nnz[-1])}, train acc "
        f"{float(full.train_acc[-1]):.3f}, val acc {float(full.val_acc[-1]):.3f}"
    )
    report.update(full_path_seconds=full_seconds, full_path_iterations=int(full.n_iter.sum()))

    # -- Q-SENN sparsification end to end ----------------------------------------------------------------
    all_features = features.to(device)
    y_all = labels.to(device)
    start = time.perf_counter()
    head = sparsify(all_features, y_all, n_features=50, n_per_class=5)
    seconds = [head.seconds]
    for iteration in range(1, n_paths):
        # Later iterations refit on the selected channels of a fine-tuned backbone: simulated by small noise.
        noise = torch.randn(features.shape[0], 50, generator=gen).to(device) * 0.05 * iteration
        refit = sparsify(all_features[:, head.selection.to(device)] + noise, y_all, selection=head.selection)
        seconds.append(refit.seconds)
    total = time.perf_counter() - start
    paths = sum(s["path"] for s in seconds)
    accuracy = float((head.logits(features[:, head.selection]).argmax(dim=1) == labels).float().mean())
    print(
        f"Q-SENN sparsification ({features.shape[0]} x {features.shape[1]} -> 50 features, {n_paths} path "
        f"fit{'s' if n_paths > 1 else ''}, quantisation to 5 per class): {total:.1f} s (select "
        f"{seconds[0]['select']:.1f} s, paths {paths:.1f} s); ternary head train acc {accuracy:.3f}"
    )
    report.update(qsenn_seconds=total, qsenn_paths=n_paths, select_seconds=seconds[0]["select"])

    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    verdict = "at equal or lower objective" if worse == 0 else f"but a higher objective at {worse} steps"
    print(f"speedup vs glm-saga: {ratio:.0f}x {verdict}")


if __name__ == "__main__":
    main()
