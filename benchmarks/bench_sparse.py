"""Sparsification speed against the best solvers: glm-saga (the reference's), scikit-learn's saga and adelie.

Every solver gets the same CUB-shaped synthetic problem in the same process: 5994 pooled features of 2048
channels, 200 classes (non-negative, correlated, class-dependent means), normalised with the full-set mean and
population std and split 90/10 as the reference does, so the path fits 5395 x 50 and the selection 5395 x 2048.
Objectives are compared at the same lambda by one float64 function (:func:`timm_qsenn.sparse.objective`).

* Path, against glm-saga with the reference settings (alpha 0.99, 100 lambdas + lambda=0, eps 1e-3, lr 0.1,
  batch 256, tol 1e-4, lookbehind 5), and against scikit-learn's ``LogisticRegression(solver="saga")`` with the
  same elastic-net penalty (``C = 1 / (n * lambda)``, ``l1_ratio = alpha``), warm-started down our lambda grid
  at tol 1e-6. Both are stopped after a wall-time cap; our path is then fitted on exactly the lambdas they
  finished, and the solvers are compared on time for those steps and on the objective at each of them.
* Selection of 50 features, against adelie's group elastic net (C++, multinomial GLM, one group per feature
  column, alpha 0.8, float64, its default tolerance) on our lambda grid down to where our 50th feature entered;
  compared on time, the features in common and the objective at that lambda.

    python benchmarks/bench_sparse.py --quick          # about 4 min on a 2-core CPU
    python benchmarks/bench_sparse.py --device cuda    # full run on a GPU (the competitors stay on the CPU)

glm-saga, scikit-learn and adelie come with ``pip install -e ".[bench]"``; ``--skip-adelie`` and
``--skip-sklearn`` leave one out. The last line printed is the speed ratio against glm-saga.
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

from timm_qsenn.sparse import (
    elastic_net_path,
    lambda_grid,
    lambda_max,
    normalize_features,
    objective,
    selection_path,
    sparsify,
    split_indices,
)

SELECTION_ALPHA = 0.8  # the selection's group share of the penalty, Q-SENN's default


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


def run_sklearn_saga(x: torch.Tensor, y: torch.Tensor, lambdas: list[float], cap: float, tol: float = 1e-6) -> dict:
    """scikit-learn's saga on our elastic-net objective, warm-started down ``lambdas``, stopped after ``cap`` s."""
    try:
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression
    except ImportError as error:
        raise SystemExit('scikit-learn is needed: pip install -e ".[bench]", or pass --skip-sklearn') from error
    features, labels = x.double().numpy(), y.numpy()
    # sklearn minimises C * sum(cross-entropy) + l1_ratio * |w|_1 + (1 - l1_ratio) / 2 * |w|^2, our objective
    # times 1 / (C * n) at C = 1 / (n * lambda).
    model = LogisticRegression(l1_ratio=0.99, solver="saga", tol=tol, max_iter=10_000, warm_start=True)
    steps: list[dict] = []
    start = time.perf_counter()
    for lam in lambdas:
        model.set_params(C=1.0 / (features.shape[0] * lam))
        began = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(features, labels)
        steps.append(
            dict(
                lam=lam,
                seconds=time.perf_counter() - began,
                weight=torch.from_numpy(model.coef_).float(),
                bias=torch.from_numpy(model.intercept_).float(),
                converged=int(model.n_iter_.max()) < model.max_iter,
            )
        )
        if time.perf_counter() - start > cap:
            break
    return dict(steps=steps, finished=len(steps), total=sum(s["seconds"] for s in steps))


def compare_on_steps(steps: list[dict], x: torch.Tensor, y: torch.Tensor, device: torch.device) -> dict:
    """Our path on exactly the lambdas of another solver's finished ``steps``: time and objective gaps."""
    lambdas = [s["lam"] for s in steps]
    x_dev, y_dev = x.to(device), y.to(device)
    elastic_net_path(x_dev, y_dev, lambdas=lambdas[:2])  # warm-up: allocator, kernels, thread pool
    start = time.perf_counter()
    ours = elastic_net_path(x_dev, y_dev, lambdas=lambdas)
    seconds = time.perf_counter() - start
    x64 = x.double()
    gaps = []
    for i, step in enumerate(steps):
        theirs = objective(x64, y, step["weight"], step["bias"], step["lam"])
        mine = objective(x64, y, ours.weights[i], ours.biases[i], step["lam"])
        gaps.append((mine - theirs) / abs(theirs))
    theirs_seconds = sum(s["seconds"] for s in steps)
    return dict(
        ours_seconds=seconds,
        theirs_seconds=theirs_seconds,
        ratio=theirs_seconds / seconds,
        iterations=int(ours.n_iter.sum()),
        gap_max=max(gaps),
        gap_min=min(gaps),
        worse=sum(g > 1e-6 for g in gaps),
        steps=len(gaps),
    )


def describe(comparison: dict) -> str:
    """One line: our time on the same lambdas and the objective gaps against the other solver."""
    c = comparison
    return (
        f"ours on the same {c['steps']} lambdas: {c['ours_seconds']:.3f} s ({c['iterations']} iterations), "
        f"{c['ratio']:.0f}x faster; objective lower or equal at {c['steps'] - c['worse']}/{c['steps']} steps, "
        f"relative difference ours - theirs: max {c['gap_max']:+.2e}, min {c['gap_min']:+.2e}"
    )


def run_adelie_selection(
    normalized: torch.Tensor, labels: torch.Tensor, train: torch.Tensor, device: torch.device
) -> dict:
    """Our 50-feature selection and adelie's group elastic net down the same lambdas, on the same rows."""
    try:
        import adelie
    except ImportError as error:
        raise SystemExit('adelie is needed: pip install -e ".[bench]", or pass --skip-adelie') from error
    import numpy as np

    x_dev, y_dev = normalized.to(device), labels.to(device)
    selection_path(x_dev, y_dev, 5, normalize=False)  # warm-up
    ours = selection_path(x_dev, y_dev, 50, normalize=False)
    x, y = normalized[train], labels[train]
    num_classes = int(y.max()) + 1
    grid = lambda_grid(lambda_max(x, y, alpha=SELECTION_ALPHA, group=True))
    last = float(ours.entry_lambdas[-1])
    lambdas = grid[grid >= last * (1 - 1e-9)]

    threads = torch.get_num_threads()
    onehot = np.zeros((x.shape[0], num_classes))
    onehot[np.arange(x.shape[0]), y.numpy()] = 1.0
    start = time.perf_counter()
    state = adelie.grpnet(
        adelie.matrix.dense(np.asfortranarray(x.double().numpy()), method="naive", n_threads=threads),
        adelie.glm.multinomial(onehot),
        alpha=SELECTION_ALPHA,
        penalty=np.ones(x.shape[1]),
        # adelie's multinomial loss is the mean cross-entropy divided by the number of classes.
        lmda_path=lambdas.numpy() / num_classes,
        early_exit=False,
        n_threads=threads,
        progress_bar=False,
    )
    adelie_seconds = time.perf_counter() - start
    weight = torch.from_numpy(state.betas[-1].toarray().reshape(x.shape[1], num_classes).T.copy())
    bias = torch.from_numpy(np.asarray(state.intercepts[-1]).copy())
    theirs_features = set(weight.abs().sum(dim=0).nonzero().flatten().tolist())

    # Our weights at the same lambda: the selection's restricted problem, solved as the selection solves it.
    restricted = elastic_net_path(
        x_dev[train.to(device)][:, ours.indices.to(device)],
        y_dev[train.to(device)],
        lambdas=[last],
        alpha=SELECTION_ALPHA,
        group=True,
    )
    ours_weight = torch.zeros(num_classes, x.shape[1])
    ours_weight[:, ours.indices] = restricted.weights[0]
    x64 = x.double()
    mine = objective(x64, y, ours_weight, restricted.biases[0], last, SELECTION_ALPHA, group=True)
    theirs = objective(x64, y, weight.float(), bias.float(), last, SELECTION_ALPHA, group=True)
    return dict(
        ours_seconds=ours.seconds,
        adelie_seconds=adelie_seconds,
        ratio=adelie_seconds / ours.seconds,
        lambdas=len(lambdas),
        common=len(theirs_features & set(ours.indices.tolist())),
        adelie_features=len(theirs_features),
        gap=(mine - theirs) / abs(theirs),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="glm-saga capped at 60 s, one path in the Q-SENN run")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (both solvers run there)")
    parser.add_argument("--glm-cap", type=float, default=None, help="glm-saga wall-time cap in seconds")
    parser.add_argument("--sklearn-cap", type=float, default=None, help="scikit-learn saga wall-time cap in s")
    parser.add_argument("--skip-sklearn", action="store_true", help="leave out the scikit-learn saga path")
    parser.add_argument("--skip-adelie", action="store_true", help="leave out the selection against adelie")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cap = args.glm_cap if args.glm_cap is not None else (60.0 if args.quick else 600.0)
    sklearn_cap = args.sklearn_cap if args.sklearn_cap is not None else (60.0 if args.quick else 600.0)
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
    against_glm = compare_on_steps([s for s in glm["steps"] if s["lam"] > 0], x_train, y_train, device)
    print(
        f"glm-saga (lr 0.1, batch 256, tol 1e-4, lookbehind 5), capped at {cap:.0f} s: {k} of 101 steps in "
        f"{glm['total']:.1f} s ({glm['total'] / max(k, 1):.2f} s/step)"
    )
    print(describe(against_glm))
    report["glm_saga"] = dict(against_glm, finished=k, total_seconds=glm["total"])

    # -- our full path ---------------------------------------------------------------------------------
    x_dev, y_dev = x_train.to(device), y_train.to(device)
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

    # -- scikit-learn's saga down our grid, then ours on the lambdas it finished -------------------------------
    if not args.skip_sklearn:
        saga = run_sklearn_saga(x_train, y_train, full.lambdas.tolist(), sklearn_cap)
        against_saga = compare_on_steps(saga["steps"], x_train, y_train, device)
        converged = sum(s["converged"] for s in saga["steps"])
        print(
            f"scikit-learn saga (tol 1e-6, warm-started), capped at {sklearn_cap:.0f} s: {saga['finished']} of "
            f"{len(full)} lambdas in {saga['total']:.1f} s, {converged} converged"
        )
        print(describe(against_saga))
        report["sklearn_saga"] = dict(
            against_saga, finished=saga["finished"], total_seconds=saga["total"], converged=converged
        )

    # -- the selection against adelie ---------------------------------------------------------------------
    if not args.skip_adelie:
        against_adelie = run_adelie_selection(normalize_features(features)[0], labels, train, device)
        a = against_adelie
        print(
            f"selection of 50 of {features.shape[1]} features ({len(train)} rows, alpha {SELECTION_ALPHA}, "
            f"{a['lambdas']} lambdas): ours {a['ours_seconds']:.2f} s, adelie {a['adelie_seconds']:.2f} s "
            f"({a['ratio']:.1f}x); {a['common']} of 50 features in common (adelie: {a['adelie_features']} active); "
            f"objective at the last lambda, ours - adelie: {a['gap']:+.2e} relative"
        )
        report["adelie_selection"] = against_adelie

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
    worse = against_glm["worse"]
    verdict = "at equal or lower objective" if worse == 0 else f"but a higher objective at {worse} steps"
    print(f"speedup vs glm-saga: {against_glm['ratio']:.0f}x {verdict}")


if __name__ == "__main__":
    main()
