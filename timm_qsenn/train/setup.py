"""Building what a run needs from its config, and checking it before the run folder is touched: the accelerator,
the model with its starting weights, the description of the data in the model's cfg, the sparse settings."""

from __future__ import annotations

import logging
from pathlib import Path

import timm
from accelerate import Accelerator

from ..backbone import check_backbone_name
from ..data import DataBundle
from ..pretrained import backbone_cfg, inspect_checkpoint
from ..qsenn import QSENN
from .config import TrainConfig

__all__ = ["build_accelerator", "weights_file", "build_model", "describe_data", "check_sparse_settings"]

_logger = logging.getLogger(__name__)


def build_accelerator(config: TrainConfig) -> Accelerator:
    """The accelerator of a run: its precision, accumulation and trackers (TensorBoard only if installed)."""
    trackers = list(config.run.log_with)
    if "tensorboard" in trackers:
        from accelerate.utils import is_tensorboard_available

        if not is_tensorboard_available():
            _logger.warning("tensorboard is not installed; training runs without it (pip install tensorboard)")
            trackers.remove("tensorboard")
    return Accelerator(
        mixed_precision=config.run.mixed_precision,
        gradient_accumulation_steps=config.run.grad_accum,
        log_with=trackers or None,
        project_dir=str(Path(config.run.output) / "logs"),
    )


def weights_file(config: TrainConfig) -> str | None:
    """The weights file a new run starts from: ``run.from_pretrained`` (a file, or a model or run folder) or
    ``model.pretrained_file``; None for the backbone's own timm weights (or none)."""
    source = config.run.from_pretrained
    if not source:
        return config.model.pretrained_file
    path = Path(source).expanduser()
    if path.is_dir():
        for candidate in (path / "model.safetensors", path / "model" / "model.safetensors"):
            if candidate.is_file():
                return str(candidate)
    elif path.is_file():
        return str(path)
    raise FileNotFoundError(
        f"run.from_pretrained {source!r} is neither a model folder nor a weights file; pass a folder written by "
        "qsenn train or save_pretrained, or a .safetensors/.pth file"
    )


def build_model(config: TrainConfig, num_classes: int, load_pretrained: bool) -> tuple[QSENN, bool]:
    """The model, with its starting weights unless a checkpoint will provide them; and whether those weights
    bring a trained dense class layer for these classes (so the starting model has a dense accuracy)."""
    model_cfg = config.model
    check_backbone_name(model_cfg.backbone)
    arch = model_cfg.backbone.split(".", 1)[0]
    name, kwargs = f"{arch}_qsenn", {}
    if not timm.is_model(name):
        name, kwargs = "qsenn", {"backbone": model_cfg.backbone}
    elif "." in model_cfg.backbone:
        name = f"{name}.{model_cfg.backbone.split('.', 1)[1]}"
    if backbone_cfg(model_cfg.backbone).fixed_input_size:
        # Built for one input size (ViT-like): build it for the run's (timm resamples position embeddings).
        kwargs["img_size"] = config.data.img_size
    file = weights_file(config) if load_pretrained else None
    # Read (and so check) the file before anything is built from it: a corrupt one is a clear error.
    info = inspect_checkpoint(file) if file else None
    try:
        model = timm.create_model(
            name,
            pretrained=load_pretrained and (model_cfg.pretrained or file is not None),
            pretrained_cfg_overlay={"file": file} if file else None,
            num_classes=num_classes,
            drop_rate=config.dense.drop_rate,
            backbone_kwargs=model_cfg.backbone_kwargs or None,
            adapter=model_cfg.adapter or None,
            **kwargs,
        )
    except (RuntimeError, ValueError) as e:
        if file is None:
            raise
        # Keys or shapes of another architecture.
        raise ValueError(f"{file} does not fit backbone {model_cfg.backbone}: {e}") from e
    if model_cfg.freeze_backbone:
        # A training-time choice: the model itself has no frozen parameters (what a user creates trains fully).
        model.backbone.requires_grad_(False)
    if config.run.from_pretrained and load_pretrained:
        _logger.info("starting from %s; the dense phase is skipped", config.run.from_pretrained)
    head_trained = info is not None and info.stage == "dense" and info.num_classes == num_classes
    return model, head_trained


def describe_data(model: QSENN, config: TrainConfig, data: DataBundle) -> None:
    """Record the dataset's input pipeline in the model's pretrained cfg, as timm's scripts read it."""
    size = config.data.img_size
    model.pretrained_cfg.update(
        input_size=(model.in_chans, size, size),
        mean=data.mean,
        std=data.std,
        interpolation="bilinear",
        crop_pct=1.0,
        crop_mode="squash" if config.data.crop_gt else "center",
        num_classes=data.num_classes,
        label_names=data.classes,
        test_input_size=None,
        test_crop_pct=None,
        fixed_input_size=False,
    )


def check_sparse_settings(config: TrainConfig, model: QSENN, num_classes: int) -> None:
    """A feature count the backbone lacks is an error; a weight budget the layer cannot hold, a warning."""
    sc = config.sparse
    if sc.feature_dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(
            f"sparse.feature_dtype={sc.feature_dtype!r} is not a feature storage dtype; choose float32, float16 "
            "or bfloat16"
        )
    if sc.n_features > model.num_features:
        source = f"backbone {config.model.backbone}"
        if config.model.adapter:
            source = f"the adapter (model.adapter.out_features) on {source}"
        raise ValueError(
            f"sparse.n_features={sc.n_features} exceeds the {model.num_features} channels of {source}; choose "
            f"sparse.n_features <= {model.num_features}"
        )
    if sc.n_per_class >= sc.n_features:
        _logger.warning(
            "sparse.n_per_class=%s asks for at least as many weights per class as there are features "
            "(sparse.n_features=%d): every non-zero weight of the sparse fit is kept, %d classes x %d features",
            sc.n_per_class,
            sc.n_features,
            num_classes,
            sc.n_features,
        )
