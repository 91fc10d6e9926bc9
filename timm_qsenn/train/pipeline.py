"""The Q-SENN pipeline in order: dense training, then per iteration features -> sparse fit -> quantisation ->
fine-tuning with the frozen ternary layer, then the final evaluation and save. Resumable inside every phase.

A run lives in one folder (see :mod:`timm_qsenn.train.run_folder` for the lock, the state and the checkpoints)::

    config.yaml, state.json, checkpoints/<n>/   the run itself; state.json names its checkpoint
    features/          cached pooled features, keyed by content
    maps/              with a frozen backbone: its cached maps of every split, keyed by content (map_cache)
    sparse/            each iteration's sparse fit: selection, path solution, ternary layer, threshold
    logs/              trackers (TensorBoard by default)
    model/             the trained Q-SENN model in timm's Hub layout (see ``timm_qsenn.hub``)
    summary.json       dense vs Q-SENN accuracy, features, weights per class, metrics, seconds, environment
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import timm
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors.torch import load_file, save_file
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch import nn

from .._utils import atomic_write, atomic_write_text, environment
from ..data import DataBundle, build_datasets, eval_loader, train_loader
from ..map_cache import CachedMaps, MapsInput, cache_maps
from ..qsenn import QSENN
from .config import OptimConfig, TrainConfig, load_config
from .distributed import on_every, on_main
from .loop import TrainModule, evaluate_accuracy, train_epoch
from .run_folder import RunExistsError, RunFolder, RunState
from .setup import build_accelerator, build_model, check_sparse_settings, describe_data
from .summary import tracker_config, warn_if_near_chance

__all__ = ["QSENNTrainer"]

_logger = logging.getLogger(__name__)

_TRAINER_STATE = "trainer.json"
_EMA_WEIGHTS = "ema.safetensors"


def _phases(config: TrainConfig) -> list[str]:
    """The training phases in order; features, sparse fit and evaluations run between them."""
    dense = [] if config.run.from_pretrained or config.dense.epochs == 0 else ["dense"]
    return dense + [f"finetune_{i}" for i in range(config.finetune.iterations)]


class QSENNTrainer:
    """Runs the whole pipeline for one config in one run folder; ``run()`` returns the summary."""

    def __init__(self, config: TrainConfig, overwrite: bool = False, accelerator: Accelerator | None = None):
        self.config = config
        self.run_dir = Path(config.run.output)
        self.folder = RunFolder(self.run_dir)
        self.overwrite = overwrite
        self.accelerator = accelerator
        self.state: RunState | None = None
        self.cached: CachedMaps | None = None  # the training maps, when a frozen backbone's maps are cached

    # -- the run folder ------------------------------------------------------------------------------------

    def _check_resumable(self, state: RunState | None) -> RunState | None:
        """The state to resume, None for a new run; a folder holding another or a finished run is refused."""
        if self.overwrite:
            if self.folder.is_foreign():
                _logger.warning("--overwrite: clearing %s, which holds files that are not a run", self.run_dir)
            return None
        if state is None:
            if self.folder.is_foreign():
                raise RunExistsError(
                    f"{self.run_dir} is not empty and holds no timm_qsenn run; choose another run.output "
                    "or pass --overwrite to clear it"
                )
            return None
        if state.fingerprint != self.config.fingerprint():
            differing = self.config.differences(load_config(self.folder.config_path)) if self.folder.holds_run() else []
            raise RunExistsError(
                f"{self.run_dir} holds another run (config differs in: {', '.join(differing) or 'unknown'}); "
                "choose another run.output, or pass --overwrite to replace it"
            )
        if state.finished:
            raise RunExistsError(
                f"{self.run_dir} holds a finished run (summary in {self.run_dir / 'summary.json'}); "
                "choose another run.output, or pass --overwrite to train it again"
            )
        return state

    def _first_look(self) -> RunState | None:
        """The state a run would resume, read without writing anything: a folder in use, holding another or a
        finished run, or foreign files is refused here, before any work is done."""
        self.folder.lock.check_free()
        return self._check_resumable(None if self.overwrite else self.folder.read_state())

    def _claim_run_dir(self) -> RunState:
        """Lock the run folder and start or resume the run in it (the main process writes, all get the state)."""

        def claim() -> RunState:
            self.folder.lock.acquire()
            try:
                # Read again under the lock: another run may have written the folder since the first look.
                state = self._check_resumable(None if self.overwrite else self.folder.read_state())
                if state is not None:
                    self.folder.remove_stale(state)  # a checkpoint a crash left half-made or unnamed
                    _logger.info("resuming the run in %s from %s", self.run_dir, state.checkpoint or "its start")
                    return state
                if self.overwrite and self.run_dir.is_dir():
                    self.folder.clear()
                state = RunState(self.config.fingerprint())
                self.folder.start(state, self.config.to_yaml())
                return state
            except BaseException:
                self.folder.lock.release()
                raise

        return on_main(self.accelerator, claim)

    def _save_state(self) -> None:
        on_main(self.accelerator, lambda: self.folder.write_state(self.state))

    # -- setup ---------------------------------------------------------------------------------------------

    def _build_data(self, backbone_cfg: dict[str, Any]) -> None:
        cfg = self.config
        self.data: DataBundle = build_datasets(cfg.data, backbone_cfg.get("mean"), backbone_cfg.get("std"))
        loader = train_loader(self.data.train, cfg.data, cfg.run.seed)
        self.sampler, self.augmentation = loader.sampler, loader.dataset
        acc = self.accelerator
        self.train_loader = acc.prepare_data_loader(loader)
        self.train_eval_loader = acc.prepare_data_loader(eval_loader(self.data.train_eval, cfg.data))
        self.test_loader = acc.prepare_data_loader(eval_loader(self.data.test, cfg.data))
        # The final metrics read images, also when training reads cached maps.
        self.image_loaders = (self.train_eval_loader, self.test_loader)

    def _read_cached_maps(self, model: QSENN) -> nn.Module:
        """A frozen backbone's maps of every split, computed once (or found in the cache); from here on training,
        evaluation and the sparse fit read them. Returns what their batches go through (adapter and head)."""
        cfg, acc = self.config, self.accelerator
        mc = cfg.model
        self._clock = time.perf_counter()

        def announce(size: int, folder: Path) -> None:
            print(f"caching the frozen backbone's maps ({mc.cache_maps}): {size / 1e6:.1f} MB in {folder}")

        common = dict(
            dtype=mc.cache_maps,
            seed=cfg.run.seed,
            batch_size=cfg.data.eval_batch_size,
            workers=cfg.data.workers,
            accelerator=acc,
            on_size=announce,
        )
        cache = self.run_dir / "maps"
        train_eval = cache_maps(model, self.data.train_eval, cache, **common)
        test = cache_maps(model, self.data.test, cache, **common)
        # No views: every epoch reads the un-augmented maps (DINO-QPM's precomputed features).
        train = (
            cache_maps(model, self.data.train, cache, views=mc.cache_views, **common) if mc.cache_views else train_eval
        )
        loader = train_loader(train, cfg.data, cfg.run.seed)
        self.sampler, self.augmentation, self.cached = loader.sampler, loader.dataset, train
        self.train_loader = acc.prepare_data_loader(loader)
        self.train_eval_loader = acc.prepare_data_loader(eval_loader(train_eval, cfg.data))
        self.test_loader = acc.prepare_data_loader(eval_loader(test, cfg.data))
        self._add_seconds("maps")
        return MapsInput(model)

    # -- checkpoints -----------------------------------------------------------------------------------------

    def _checkpoint(self, phase: str, epoch: int, batch: int, updates: int, scheduler, ema) -> None:
        """Write a checkpoint and commit it: the state names it only once every file of it is on disk."""
        acc = self.accelerator
        partial = on_main(self.accelerator, lambda: self.folder.next_partial(self.state))
        self._add_seconds(phase)
        info = {"phase": phase, "epoch": epoch, "batch": batch, "updates": updates}

        def commit() -> None:
            trainer = {"format": "timm_qsenn.trainer", "version": 1, "scheduler": scheduler.state_dict()}
            atomic_write_text(partial / _TRAINER_STATE, json.dumps(trainer, indent=1) + "\n")
            if ema is not None:
                save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, str(partial / _EMA_WEIGHTS))
            self.folder.commit(self.state, partial, info)

        try:
            on_every(self.accelerator, lambda: acc.save_state(str(partial)))
            on_main(self.accelerator, commit)
        except OSError as e:
            on_main(self.accelerator, lambda: self.folder.discard(partial))
            last = self.state.checkpoint
            where = f"phase {last['phase']}, epoch {last['epoch']}, batch {last['batch']}" if last else "its start"
            raise OSError(
                e.errno,
                f"could not write the checkpoint {partial} ({e.strerror or e}); the run keeps its previous "
                f"checkpoint ({where}) and resumes from it: free disk space or make the folder writable, then run "
                "the same command again",
            ) from e

    def _checkpoint_dir(self) -> Path:
        return self.folder.checkpoint_folder(self.state)

    def _restore_model(self, model: QSENN) -> None:
        """Load the checkpointed weights; this also reshapes the head to the checkpoint's stage."""
        weights = self._checkpoint_dir() / "model.safetensors"
        state = {k.removeprefix("model."): v for k, v in load_file(str(weights)).items()}
        model.load_state_dict(state)

    def _restore_trainer(self, scheduler, ema) -> None:
        """The scheduler and EMA of the committed checkpoint (JSON and safetensors, no pickle)."""
        folder = self._checkpoint_dir()
        trainer = json.loads((folder / _TRAINER_STATE).read_text())
        scheduler.load_state_dict(trainer["scheduler"])
        if ema is not None and (folder / _EMA_WEIGHTS).is_file():
            ema.load_state_dict(load_file(str(folder / _EMA_WEIGHTS)))

    def _add_seconds(self, phase: str) -> None:
        now = time.perf_counter()
        self.state.seconds[phase] = self.state.seconds.get(phase, 0.0) + now - self._clock
        self._clock = now

    # -- phases ----------------------------------------------------------------------------------------------

    def _optimizer(self, model: QSENN, optim: OptimConfig, lr: float):
        head = [p for p in model.head.fc.parameters() if p.requires_grad]
        head_ids = {id(p) for p in head}
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
        groups = [{"params": rest}]
        if head:
            groups.append({"params": head, "lr": optim.head_lr if optim.head_lr is not None else lr})
        # Weight decay on every parameter (normalisation included), as in the reference training.
        return create_optimizer_v2(
            groups, opt=optim.opt, lr=lr, weight_decay=optim.weight_decay, momentum=optim.momentum
        )

    def _train_phase(self, model: QSENN, phase: str, epochs: int, optim: OptimConfig, lr: float) -> None:
        """Train ``model`` for ``epochs`` in ``phase``, resuming from the checkpoint if it is inside the phase."""
        acc, cfg = self.accelerator, self.config
        self._clock = time.perf_counter()
        resume = self.state.checkpoint if (self.state.checkpoint or {}).get("phase") == phase else None
        optimizer = self._optimizer(model, optim, lr)
        updates_per_epoch = max(len(self.train_loader) // cfg.run.grad_accum, 1)
        scheduler, _ = create_scheduler_v2(
            optimizer,
            sched=optim.sched,
            num_epochs=max(epochs, 1),
            decay_epochs=optim.decay_epochs,
            decay_rate=optim.decay_rate,
            warmup_epochs=optim.warmup_epochs,
            updates_per_epoch=updates_per_epoch,
        )
        ema = ModelEmaV3(model, decay=optim.ema_decay) if optim.ema_decay else None
        acc.free_memory()
        train_module = TrainModule(
            model, optim.diversity_weight, frozen_backbone=cfg.model.freeze_backbone, from_maps=self.cached is not None
        )
        module, optimizer = acc.prepare(train_module, optimizer)
        if resume is not None:
            acc.load_state(str(self._checkpoint_dir()))
            self._restore_trainer(scheduler, ema)
            epoch, batch, updates = resume["epoch"], resume["batch"], resume["updates"]
        else:
            epoch, batch, updates = 0, 0, 0
            self._checkpoint(phase, 0, 0, 0, scheduler, ema)
        step_every = cfg.run.checkpoint_steps

        def on_update(batches_done: int, num_updates: int) -> None:
            if step_every and num_updates % step_every == 0 and batches_done < self._epoch_batches:
                self._checkpoint(phase, epoch, batches_done, num_updates, scheduler, ema)

        while epoch < epochs:
            self.sampler.start_epoch(epoch)
            self.augmentation.epoch = epoch
            if self.cached is not None:
                self.cached.epoch = epoch  # the cached view of this epoch
            # A run resumed inside the epoch skips the batches it trained on (their indices, not their data).
            loader = acc.skip_first_batches(self.train_loader, batch) if batch else self.train_loader
            self._epoch_batches = batch + len(loader)
            stats = train_epoch(
                acc,
                module,
                loader,
                optimizer,
                scheduler,
                num_updates=updates,
                start_batch=batch,
                clip_grad=optim.clip_grad,
                ema=ema,
                channels_last=cfg.run.channels_last,
                on_update=on_update,
                desc=f"{phase} epoch {epoch + 1}/{epochs}",
            )
            updates += stats.updates
            epoch, batch = epoch + 1, 0
            scheduler.step(epoch)
            logs = {f"{phase}/loss": stats.loss, f"{phase}/cross_entropy": stats.cross_entropy}
            logs[f"{phase}/diversity_loss"] = stats.diversity
            logs[f"{phase}/lr"] = optimizer.param_groups[0]["lr"]
            if cfg.run.eval_every and (epoch % cfg.run.eval_every == 0 or epoch == epochs):
                logs[f"{phase}/test_accuracy"] = evaluate_accuracy(acc, self.reader, self.test_loader, f"{phase} test")
            acc.log(logs, step=self.state.results.get("global_epoch", 0) + epoch)
            _logger.info("%s epoch %d/%d: %s", phase, epoch, epochs, {k: round(v, 4) for k, v in logs.items()})
            self._checkpoint(phase, epoch, 0, updates, scheduler, ema)
        if ema is not None:
            model.load_state_dict(ema.module.state_dict())
        self.state.results["global_epoch"] = self.state.results.get("global_epoch", 0) + epochs
        acc.free_memory()

    def _finetune_settings(self, model: QSENN) -> None:
        """Fine-tuning dropout and whether mean/std learn (not part of a checkpoint's weights)."""
        model.head.drop.p = self.config.finetune.drop_rate
        model.head.mean.requires_grad_(self.config.finetune.train_norm)
        model.head.std.requires_grad_(self.config.finetune.train_norm)

    def _sparsify(self, model: QSENN, iteration: int) -> None:
        """Features of the training set -> (selection) -> path -> ternary layer, computed once, installed everywhere."""
        from ..features import extract_features
        from ..sparse import sparsify

        acc, cfg = self.accelerator, self.config
        sc = cfg.sparse
        phase = f"sparse_{iteration}"
        self._clock = time.perf_counter()
        feature_dtype = getattr(torch, sc.feature_dtype)
        size_mb = len(self.train_eval_loader.dataset) * model.head.num_features * feature_dtype.itemsize / 2**20
        # Small feature matrices are gathered and solved once; large ones stay sharded and are solved together.
        shard = acc.num_processes > 1 and size_mb > sc.shard_above_mb
        features = extract_features(
            model,
            self.train_eval_loader,
            accelerator=acc,
            cache_dir=self.run_dir / "features",
            show_progress=acc.is_local_main_process,
            dtype=feature_dtype,
            shard=shard,
        )
        settings = dict(
            n_features=sc.n_features,
            n_per_class=sc.n_per_class,
            selection=None if model.head.stage == "dense" else model.head.selection.cpu(),
            select_alpha=sc.select_alpha,
            alpha=sc.alpha,
            n_lambdas=sc.n_lambdas,
            eps=sc.eps,
            val_fraction=sc.val_fraction,
            seed=cfg.run.seed,
            exact_per_class=sc.exact_per_class,
            binary=sc.binary,
            tol=sc.tol,
            dtype=getattr(torch, sc.dtype),
            progress=acc.is_local_main_process,
        )
        fit_path = self.run_dir / "sparse" / f"iteration_{iteration}.safetensors"
        if shard:
            # Every process solves on its shard with the sums all-reduced in rank order: the same head everywhere.
            sparse = sparsify(
                features.features,
                features.labels,
                row_index=features.row_index,
                process_group=torch.distributed.group.WORLD,
                **settings,
            )
            on_main(acc, lambda: _save_sparse_fit(sparse, fit_path))
        else:

            def fit() -> Any:
                # Solved once, on the main process, and broadcast: every process installs the same head.
                sparse = sparsify(features.features, features.labels, **settings)
                _save_sparse_fit(sparse, fit_path)
                return sparse

            sparse = on_main(acc, fit)
        head = model.head
        head.select(sparse.selection)
        head.set_normalization(sparse.mean.to(head.mean), sparse.std.to(head.std))
        head.set_class_layer(sparse.weight.to(head.mean), sparse.bias.to(head.mean), ternary=True)
        self._finetune_settings(model)
        nnz = int((sparse.weight != 0).sum())
        self.state.results[f"{phase}/weights"] = nnz
        self.state.results[f"{phase}/quantised_accuracy"] = evaluate_accuracy(acc, model, self.test_loader, phase)
        self._add_seconds(phase)
        _logger.info(
            "%s: %d features, %d weights (%.2f per class), test accuracy straight after quantisation %.4f",
            phase,
            head.num_features,
            nnz,
            nnz / head.num_classes,
            self.state.results[f"{phase}/quantised_accuracy"],
        )

    # -- the run ---------------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Train (or resume) the whole pipeline; returns the summary also written to ``summary.json``."""
        cfg = self.config
        if self.accelerator is None:
            self.accelerator = build_accelerator(cfg)
        set_seed(cfg.run.seed)
        # Everything that can be checked is checked before the run folder is touched: a wrong dataset path, a
        # corrupt weights file or a feature count the backbone lacks must not leave a run behind that the
        # corrected command would refuse to replace. This first look at the folder only reads.
        state = on_main(self.accelerator, self._first_look)
        resuming = state is not None and state.checkpoint is not None
        backbone_cfg = timm.get_pretrained_cfg(cfg.model.backbone.split(".", 1)[0])
        backbone_cfg = backbone_cfg.to_dict() if backbone_cfg is not None else {}
        self._build_data(backbone_cfg)
        model, head_trained = build_model(cfg, self.data.num_classes, load_pretrained=not resuming)
        check_sparse_settings(cfg, model, self.data.num_classes)
        describe_data(model, cfg, self.data)
        self.state = self._claim_run_dir()
        try:
            return self._run_phases(model, head_trained)
        finally:
            # Local, not collective: the process group may be gone (end_training) or broken by the error.
            if self.accelerator.is_main_process:
                self.folder.lock.release()

    def _run_phases(self, model: QSENN, head_trained: bool) -> dict[str, Any]:
        cfg, acc = self.config, self.accelerator
        if acc.is_main_process and acc.log_with:
            acc.init_trackers("qsenn", config=tracker_config(cfg.to_dict()))
        resuming = self.state.checkpoint is not None
        phases = _phases(cfg)
        if resuming:
            self._restore_model(model)
        else:
            self.state.results["dense_head_trained"] = "dense" in phases or head_trained
        model.to(acc.device)
        if cfg.run.channels_last:
            model.to(memory_format=torch.channels_last)
        # What the loaders' batches go through: the model, or its adapter and head for cached backbone maps.
        cached = cfg.model.freeze_backbone and cfg.model.cache_maps != "none"
        self.reader = self._read_cached_maps(model) if cached else model

        done = phases.index(self.state.checkpoint["phase"]) if resuming else -1
        checkpoint = self.state.checkpoint or {}
        resume_complete = resuming and checkpoint["epoch"] >= self._epochs(checkpoint["phase"])
        if resuming and checkpoint["phase"] != "dense":
            self._finetune_settings(model)
        if resume_complete:
            # Between phases nothing is prepared: this restores the random states the finished phase left.
            acc.free_memory()
            acc.load_state(str(self._checkpoint_dir()))
        for index, phase in enumerate(phases):
            if index < done or (index == done and resume_complete):
                continue
            inside = index == done  # resuming inside this phase: its sparse fit is in the checkpoint already
            if phase == "dense":
                self._train_phase(model, "dense", cfg.dense.epochs, cfg.dense, cfg.dense.lr)
                continue
            iteration = int(phase.split("_")[1])
            if "dense_accuracy" not in self.state.results:
                trained = self.state.results["dense_head_trained"]
                self.state.results["dense_accuracy"] = (
                    evaluate_accuracy(acc, self.reader, self.test_loader, "dense test") if trained else None
                )
                warn_if_near_chance(self.state.results["dense_accuracy"], self.data.num_classes)
            if not inside:
                self._sparsify(self.reader, iteration)
            ft = cfg.finetune
            lr = ft.lr * ft.lr_iteration_decay**iteration
            self._train_phase(model, phase, ft.epochs[iteration], ft, lr)
            self.state.results[f"{phase}/accuracy"] = evaluate_accuracy(
                acc, self.reader, self.test_loader, f"{phase} test"
            )
            self._save_state()
        return self._finish(model)

    def _epochs(self, phase: str) -> int:
        return self.config.dense.epochs if phase == "dense" else self.config.finetune.epochs[int(phase.split("_")[1])]

    def _finish(self, model: QSENN) -> dict[str, Any]:
        """Interpretability metrics, the saved model and the summary."""
        from ..hub import save_pretrained
        from ..metrics import evaluate

        acc, cfg = self.accelerator, self.config
        self._clock = time.perf_counter()
        model.eval()
        train_images, test_images = self.image_loaders
        metrics = evaluate(model, test_images, train_loader=train_images, accelerator=acc)
        metric_values = metrics.to_dict()
        weights = int((model.head.fc.weight != 0).sum())
        summary = {
            "dense_accuracy": self.state.results["dense_accuracy"],
            "qsenn_accuracy": metric_values["accuracy"],
            "n_features": model.head.num_features,
            "weights_per_class": weights / model.num_classes,
            "scale": float(model.head.fc.weight.abs().max()),
            "iterations": {k: v for k, v in self.state.results.items() if "/" in k},
            "metrics": metric_values,
            "backbone": cfg.model.backbone,
            "dataset": cfg.data.dataset,
            "num_classes": model.num_classes,
            "train_images": len(self.data.train),
            "test_images": len(self.data.test),
            "processes": acc.num_processes,
        }
        summary["environment"] = environment(acc.device)

        def save() -> None:
            save_pretrained(
                acc.unwrap_model(model),
                self.run_dir / "model",
                metrics={k: v for k, v in metric_values.items() if isinstance(v, int | float)}
                | ({"dense_accuracy": summary["dense_accuracy"]} if summary["dense_accuracy"] is not None else {}),
                recipe=cfg.to_dict(),
                dataset=cfg.data.dataset,
                overwrite=True,
                environment=summary["environment"],
            )
            self._add_seconds("final")
            summary["seconds"] = {**self.state.seconds, "total": sum(self.state.seconds.values())}
            atomic_write_text(self.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
            # Finished only once the model and the summary are on disk: a failure above leaves a resumable run.
            self.state.finished = True
            self.folder.write_state(self.state)
            return summary

        try:
            summary = on_main(self.accelerator, save)
        except OSError as e:
            raise OSError(
                e.errno,
                f"could not save the trained model in {self.run_dir / 'model'} ({e.strerror or e}); the run keeps "
                "its last checkpoint and finishes from it: free disk space or make the folder writable, then run "
                "the same command again",
            ) from e
        acc.end_training()
        return summary


def _save_sparse_fit(sparse: Any, path: Path) -> None:
    """Keep an iteration's sparse fit (the path solution before and after quantisation) for inspection."""
    tensors = {
        name: getattr(sparse, name).contiguous()
        for name in ("selection", "mean", "std", "weight", "bias", "dense_weight", "dense_bias", "lambdas", "nnz")
    }
    metadata = {"threshold": repr(sparse.threshold), "scale": repr(sparse.scale), "ternary": str(sparse.ternary)}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
