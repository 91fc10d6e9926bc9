"""The Q-SENN pipeline in order: dense training, then per iteration features -> sparse fit -> quantisation ->
fine-tuning with the frozen ternary layer, then the final evaluation and save. Resumable inside every phase.

A run lives in one folder::

    config.yaml        the resolved config; a different config in the folder is refused (another run)
    state.json         progress: last checkpoint (phase, epoch, batch), results, seconds per phase
    checkpoints/last/  Accelerate state (model, optimizer, RNG) + trainer.pt (scheduler, EMA)
    features/          cached pooled features, keyed by content
    sparse/            each iteration's sparse fit: selection, path solution, ternary layer, threshold
    logs/              trackers (TensorBoard by default)
    model/             the trained Q-SENN model in timm's Hub layout (see ``timm_qsenn.hub``)
    summary.json       dense vs Q-SENN accuracy, features, weights per class, metrics, seconds per phase
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed
from safetensors.torch import load_file, save_file
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3

from .._utils import flatten_dict
from ..data import DataBundle, build_datasets, eval_loader, train_loader
from ..qsenn import QSENN
from .config import OptimConfig, TrainConfig, load_config
from .loop import TrainModule, evaluate_accuracy, train_epoch

__all__ = ["RunState", "QSENNTrainer", "RunExistsError", "format_summary"]

_logger = logging.getLogger(__name__)


class RunExistsError(FileExistsError):
    """The output folder holds another run, or a finished one."""


@dataclass
class RunState:
    """Progress of a run, persisted in ``state.json`` after every checkpoint."""

    fingerprint: str
    checkpoint: dict[str, Any] | None = None  # {"phase", "epoch", "batch", "updates"}: what runs next
    results: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    finished: bool = False

    @classmethod
    def load(cls, path: Path) -> RunState:
        try:
            return cls(**json.loads(path.read_text()))
        except (ValueError, TypeError) as e:
            raise RunExistsError(
                f"{path} is corrupt ({e}); the run in {path.parent} cannot be resumed: pass --overwrite to train "
                "again, or choose another run.output"
            ) from e

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        tmp.replace(path)


def _phases(config: TrainConfig) -> list[str]:
    """The training phases in order; features, sparse fit and evaluations run between them."""
    dense = [] if config.run.from_pretrained or config.dense.epochs == 0 else ["dense"]
    return dense + [f"finetune_{i}" for i in range(config.finetune.iterations)]


class QSENNTrainer:
    """Runs the whole pipeline for one config in one run folder; ``run()`` returns the summary."""

    def __init__(self, config: TrainConfig, overwrite: bool = False, accelerator: Accelerator | None = None):
        self.config = config
        self.run_dir = Path(config.run.output)
        self.overwrite = overwrite
        self.accelerator = accelerator
        self.state: RunState | None = None

    # -- the run folder ------------------------------------------------------------------------------------

    def _claim_run_dir(self) -> RunState:
        """Start or resume the run in ``run_dir``; refuse a folder holding another or a finished run."""
        config_path, state_path = self.run_dir / "config.yaml", self.run_dir / "state.json"
        fingerprint = self.config.fingerprint()
        if state_path.exists() and not self.overwrite:
            state = RunState.load(state_path)
            if state.fingerprint != fingerprint:
                differing = self.config.differences(load_config(config_path)) if config_path.exists() else []
                raise RunExistsError(
                    f"{self.run_dir} holds another run (config differs in: {', '.join(differing) or 'unknown'}); "
                    "choose another run.output, or pass --overwrite to replace it"
                )
            if state.finished:
                raise RunExistsError(
                    f"{self.run_dir} holds a finished run (summary in {self.run_dir / 'summary.json'}); "
                    "choose another run.output, or pass --overwrite to train it again"
                )
            _logger.info("resuming the run in %s from %s", self.run_dir, state.checkpoint or "its start")
            return state
        if self.run_dir.exists() and any(self.run_dir.iterdir()):
            if not self.overwrite:
                raise RunExistsError(
                    f"{self.run_dir} is not empty and holds no timm_qsenn run; choose another run.output "
                    "or pass --overwrite to clear it"
                )
            if self._is_main:
                shutil.rmtree(self.run_dir)
        self._wait()
        if self._is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            config_path.write_text(self.config.to_yaml())
            RunState(fingerprint).save(state_path)
        self._wait()
        return RunState(fingerprint)

    def _existing_checkpoint(self) -> bool:
        """Whether ``run_dir`` holds a resumable checkpoint of this very config (read-only peek)."""
        state_path = self.run_dir / "state.json"
        if self.overwrite or not state_path.exists():
            return False
        state = RunState.load(state_path)
        return state.fingerprint == self.config.fingerprint() and state.checkpoint is not None

    @property
    def _is_main(self) -> bool:
        return self.accelerator is None or self.accelerator.is_main_process

    def _wait(self) -> None:
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()

    def _save_state(self) -> None:
        if self._is_main:
            self.state.save(self.run_dir / "state.json")
        self._wait()

    # -- setup ---------------------------------------------------------------------------------------------

    def _setup(self) -> None:
        cfg = self.config
        if self.accelerator is None:
            trackers = list(cfg.run.log_with)
            if "tensorboard" in trackers:
                from accelerate.utils import is_tensorboard_available

                if not is_tensorboard_available():
                    _logger.warning("tensorboard is not installed; training runs without it (pip install tensorboard)")
                    trackers.remove("tensorboard")
            self.accelerator = Accelerator(
                mixed_precision=cfg.run.mixed_precision,
                gradient_accumulation_steps=cfg.run.grad_accum,
                log_with=trackers or None,
                project_dir=str(self.run_dir / "logs"),
            )
        set_seed(cfg.run.seed)

    def _build_data(self, backbone_cfg: dict[str, Any]) -> None:
        cfg = self.config
        self.data: DataBundle = build_datasets(cfg.data, backbone_cfg.get("mean"), backbone_cfg.get("std"))
        loader = train_loader(self.data.train, cfg.data, cfg.run.seed)
        self.sampler, self.augmentation = loader.sampler, loader.dataset
        acc = self.accelerator
        self.train_loader = acc.prepare_data_loader(loader)
        self.train_eval_loader = acc.prepare_data_loader(eval_loader(self.data.train_eval, cfg.data))
        self.test_loader = acc.prepare_data_loader(eval_loader(self.data.test, cfg.data))

    def _build_model(self, num_classes: int, load_pretrained: bool) -> QSENN:
        cfg = self.config
        arch = cfg.model.backbone.split(".", 1)[0]
        name, kwargs = f"{arch}_qsenn", {}
        if not timm.is_model(name):
            name, kwargs = "qsenn", {"backbone": cfg.model.backbone}
        elif "." in cfg.model.backbone:
            name = f"{name}.{cfg.model.backbone.split('.', 1)[1]}"
        overlay = {"file": cfg.model.pretrained_file} if cfg.model.pretrained_file else None
        model = timm.create_model(
            name,
            pretrained=load_pretrained and (cfg.model.pretrained or bool(overlay)),
            pretrained_cfg_overlay=overlay,
            num_classes=num_classes,
            drop_rate=cfg.dense.drop_rate,
            backbone_kwargs=cfg.model.backbone_kwargs or None,
            **kwargs,
        )
        return model

    def _describe_data(self, model: QSENN) -> None:
        """Record the dataset's input pipeline in the model's pretrained cfg, as timm's scripts read it."""
        size = self.config.data.img_size
        model.pretrained_cfg.update(
            input_size=(model.in_chans, size, size),
            mean=self.data.mean,
            std=self.data.std,
            interpolation="bilinear",
            crop_pct=1.0,
            crop_mode="squash" if self.config.data.crop_gt else "center",
            num_classes=self.data.num_classes,
            label_names=self.data.classes,
            test_input_size=None,
            test_crop_pct=None,
            fixed_input_size=False,
        )

    def _load_from_pretrained(self, model: QSENN, source: str) -> bool:
        """Load a trained backbone (and its head where it fits); returns whether a trained head came with it."""
        path = Path(source)
        if path.is_dir():
            from ..hub import load_model

            state = load_model(str(path)).state_dict()
        elif path.is_file():
            state = timm.models.load_state_dict(str(path))
        else:
            raise FileNotFoundError(f"run.from_pretrained {source!r} is neither a model folder nor a weights file")
        if not any(k.startswith("backbone.") for k in state):
            model.backbone.load_state_dict(state)
            _logger.info("started from the backbone weights in %s; the dense phase is skipped", source)
            return False
        own = model.state_dict()
        head_fits = all(state.get(k, own[k]).shape == own[k].shape for k in ("head.fc.weight", "head.fc.bias"))
        if not head_fits:  # trained for other classes: keep its features, not its class layer
            state = {k: v for k, v in state.items() if not k.startswith("head.fc.")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or [k for k in missing if not k.startswith("head.fc.")]:
            raise ValueError(
                f"{source} does not fit backbone {self.config.model.backbone}: unexpected {unexpected[:5]}, "
                f"missing {missing[:5]}"
            )
        _logger.info("started from %s; the dense phase is skipped", source)
        return head_fits

    # -- checkpoints -----------------------------------------------------------------------------------------

    def _checkpoint(self, phase: str, epoch: int, batch: int, updates: int, scheduler, ema) -> None:
        """Write the checkpoint atomically (tmp, then swap), then record it in state.json."""
        acc = self.accelerator
        root = self.run_dir / "checkpoints"
        tmp, last, old = root / "tmp", root / "last", root / "old"
        if self._is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        self._wait()
        acc.save_state(str(tmp))
        self._wait()  # every process has written its RNG state before the folder is swapped in
        if self._is_main:
            extra = {"scheduler": scheduler.state_dict(), "ema": ema.state_dict() if ema is not None else None}
            torch.save(extra, tmp / "trainer.pt")
            shutil.rmtree(old, ignore_errors=True)
            if last.exists():
                last.rename(old)
            tmp.rename(last)
            shutil.rmtree(old, ignore_errors=True)
        self._add_seconds(phase)
        self.state.checkpoint = {"phase": phase, "epoch": epoch, "batch": batch, "updates": updates}
        self._save_state()

    def _restore_model(self, model: QSENN) -> None:
        """Load the checkpointed weights; this also reshapes the head to the checkpoint's stage."""
        weights = self.run_dir / "checkpoints" / "last" / "model.safetensors"
        state = {k.removeprefix("model."): v for k, v in load_file(str(weights)).items()}
        model.load_state_dict(state)

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
        module, optimizer = acc.prepare(TrainModule(model, optim.diversity_weight), optimizer)
        if resume is not None:
            ckpt = self.run_dir / "checkpoints" / "last"
            acc.load_state(str(ckpt))
            extra = torch.load(ckpt / "trainer.pt", weights_only=False)
            scheduler.load_state_dict(extra["scheduler"])
            if ema is not None and extra["ema"] is not None:
                ema.load_state_dict(extra["ema"])
            epoch, batch, updates = resume["epoch"], resume["batch"], resume["updates"]
        else:
            epoch, batch, updates = 0, 0, 0
            self._checkpoint(phase, 0, 0, 0, scheduler, ema)
        step_every = cfg.run.checkpoint_steps

        def on_update(batches_done: int, num_updates: int) -> None:
            if step_every and num_updates % step_every == 0 and batches_done < self._epoch_batches:
                self._checkpoint(phase, epoch, batches_done, num_updates, scheduler, ema)

        while epoch < epochs:
            batch_size = cfg.data.batch_size * acc.num_processes
            self.sampler.start_epoch(epoch, skip=batch * batch_size)
            self.augmentation.epoch = epoch
            self._epoch_batches = batch + len(self.train_loader)
            stats = train_epoch(
                acc,
                module,
                self.train_loader,
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
                logs[f"{phase}/test_accuracy"] = evaluate_accuracy(acc, model, self.test_loader, f"{phase} test")
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
        phase = f"sparse_{iteration}"
        self._clock = time.perf_counter()
        features = extract_features(
            model,
            self.train_eval_loader,
            accelerator=acc,
            cache_dir=self.run_dir / "features",
            show_progress=acc.is_local_main_process,
        )
        result = [None]
        if acc.is_main_process:
            sc = cfg.sparse
            result[0] = sparsify(
                features.features,
                features.labels,
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
        sparse = broadcast_object_list(result, from_process=0)[0]
        if acc.is_main_process:
            _save_sparse_fit(sparse, self.run_dir / "sparse" / f"iteration_{iteration}.safetensors")
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
        self._setup()
        # Everything that can be checked is checked before the run folder is claimed: a wrong dataset path
        # or feature count must not leave a run behind that the corrected command would refuse to replace.
        existing = self._existing_checkpoint()
        backbone_cfg = timm.get_pretrained_cfg(cfg.model.backbone.split(".", 1)[0])
        backbone_cfg = backbone_cfg.to_dict() if backbone_cfg is not None else {}
        self._build_data(backbone_cfg)
        model = self._build_model(self.data.num_classes, load_pretrained=not existing)
        if cfg.sparse.n_features > model.num_features:
            raise ValueError(
                f"sparse.n_features={cfg.sparse.n_features} exceeds the {model.num_features} channels of backbone "
                f"{cfg.model.backbone}; choose sparse.n_features <= {model.num_features}"
            )
        self._describe_data(model)
        self.state = self._claim_run_dir()
        acc = self.accelerator
        if acc.is_main_process and acc.log_with:
            acc.init_trackers("qsenn", config=_scalars(cfg.to_dict()))
        resuming = self.state.checkpoint is not None
        phases = _phases(cfg)
        if resuming:
            self._restore_model(model)
        elif cfg.run.from_pretrained:
            self.state.results["dense_head_trained"] = self._load_from_pretrained(model, cfg.run.from_pretrained)
        else:
            self.state.results["dense_head_trained"] = "dense" in phases
        model.to(acc.device)
        if cfg.run.channels_last:
            model.to(memory_format=torch.channels_last)

        done = phases.index(self.state.checkpoint["phase"]) if resuming else -1
        checkpoint = self.state.checkpoint or {}
        resume_complete = resuming and checkpoint["epoch"] >= self._epochs(checkpoint["phase"])
        if resuming and checkpoint["phase"] != "dense":
            self._finetune_settings(model)
        if resume_complete:
            # Between phases nothing is prepared: this restores the random states the finished phase left.
            acc.free_memory()
            acc.load_state(str(self.run_dir / "checkpoints" / "last"))
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
                    evaluate_accuracy(acc, model, self.test_loader, "dense test") if trained else None
                )
                _warn_if_near_chance(self.state.results["dense_accuracy"], self.data.num_classes)
            if not inside:
                self._sparsify(model, iteration)
            ft = cfg.finetune
            lr = ft.lr * ft.lr_iteration_decay**iteration
            self._train_phase(model, phase, ft.epochs[iteration], ft, lr)
            self.state.results[f"{phase}/accuracy"] = evaluate_accuracy(acc, model, self.test_loader, f"{phase} test")
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
        metrics = evaluate(model, self.test_loader, train_loader=self.train_eval_loader, accelerator=acc)
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
        if acc.is_main_process:
            save_pretrained(
                acc.unwrap_model(model),
                self.run_dir / "model",
                metrics={k: v for k, v in metric_values.items() if isinstance(v, int | float)}
                | ({"dense_accuracy": summary["dense_accuracy"]} if summary["dense_accuracy"] is not None else {}),
                recipe=cfg.to_dict(),
                dataset=cfg.data.dataset,
                overwrite=True,
            )
        self._add_seconds("final")
        summary["seconds"] = {**self.state.seconds, "total": sum(self.state.seconds.values())}
        self.state.finished = True
        if acc.is_main_process:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        self._save_state()
        acc.end_training()
        return summary


def _save_sparse_fit(sparse: Any, path: Path) -> None:
    """Keep an iteration's sparse fit (the path solution before and after quantisation) for inspection."""
    tensors = {
        name: getattr(sparse, name).contiguous()
        for name in ("selection", "mean", "std", "weight", "bias", "dense_weight", "dense_bias", "lambdas", "nnz")
    }
    metadata = {"threshold": repr(sparse.threshold), "scale": repr(sparse.scale), "ternary": str(sparse.ternary)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)


def _scalars(tree: dict[str, Any]) -> dict[str, Any]:
    """Flatten a config for trackers, which accept only scalars."""
    return {k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in flatten_dict(tree).items()}


def _warn_if_near_chance(accuracy: float | None, num_classes: int) -> None:
    """Q-SENN selects and quantises the dense model's features: a dense model that learned little dooms it."""
    if accuracy is not None and accuracy < 1.5 / num_classes:
        _logger.warning(
            "the dense model reaches %.1f %% test accuracy, close to chance (%.1f %%); the Q-SENN features come from "
            "it, so expect a poor result: train it longer (dense.epochs, dense.lr) or check the data",
            100 * accuracy,
            100 / num_classes,
        )


def format_summary(summary: dict[str, Any]) -> str:
    """The one-screen summary printed at the end of a run."""

    def pct(value: float | None) -> str:
        return "n/a" if value is None else f"{100 * value:.2f}%"

    dense, qsenn = summary["dense_accuracy"], summary["qsenn_accuracy"]
    gap = "" if dense is None else f"  ({100 * (qsenn - dense):+.2f} points)"
    lines = [
        f"Q-SENN on {summary['backbone']} / {summary['dataset']}: {summary['num_classes']} classes, "
        f"{summary['train_images']} training and {summary['test_images']} test images",
        f"  dense accuracy      {pct(dense)}",
        f"  Q-SENN accuracy     {pct(qsenn)}{gap}",
    ]
    metrics = summary.get("metrics", {})
    used = metrics.get("num_features")
    lines += [
        f"  features            {summary['n_features']} selected"
        + ("" if used is None else f", {used} used by the class layer"),
        f"  weights per class   {summary['weights_per_class']:.2f}  (ternary, a = {summary['scale']:.4g})",
    ]
    k = metrics.get("k", 5)
    shown = {
        "diversity_at_k": f"diversity@{k}",
        "sid_at_k": f"SID@{k}",
        "dependence": "dependence",
        "class_independence": "class-independence",
        "contrastiveness": "contrastiveness",
    }
    values = [f"{label} {metrics[key]:.3f}" for key, label in shown.items() if metrics.get(key) is not None]
    if values:
        lines.append("  interpretability    " + ", ".join(values))
    seconds = summary["seconds"]
    phases = ", ".join(f"{k} {v:.0f}s" for k, v in seconds.items() if k != "total")
    lines.append(f"  time                {seconds['total']:.0f}s  ({phases})")
    return "\n".join(lines)
