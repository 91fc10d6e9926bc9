"""Typed training configs with the paper's defaults: YAML in, YAML out, dotted command-line overrides."""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .._utils import flatten_dict
from ..data.config import DataConfig

__all__ = [
    "ModelConfig",
    "DataConfig",
    "DenseConfig",
    "SparseConfig",
    "FinetuneConfig",
    "RunConfig",
    "TrainConfig",
    "load_config",
]


@dataclass
class ModelConfig:
    """The backbone and where its starting weights come from."""

    backbone: str = "resnet50"  # any timm model name, optionally with a weight tag
    pretrained: bool = True  # the backbone's ImageNet weights through timm
    pretrained_file: str | None = None  # a local weights file of the backbone (or of a Q-SENN model)
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    # A frozen backbone: only the adapter and the head train, the backbone stays in eval mode (DINO-QPM).
    freeze_backbone: bool = False
    adapter: dict[str, Any] | None = None  # MapAdapter kwargs: depth, hidden, out_features, act, norm; null: none
    cache_maps: str = "bf16"  # frozen backbone: its maps cached once as bf16, fp16 or float32; none: no cache
    cache_views: int = 0  # augmented views cached per training image (0: the un-augmented maps, every epoch)


@dataclass
class OptimConfig:
    """Optimiser, schedule and losses of one training phase."""

    opt: str = "sgd"  # any timm optimizer name
    lr: float = 0.005
    head_lr: float | None = 0.01  # class layer learning rate (None: same as lr)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    sched: str = "step"  # any timm scheduler name
    decay_epochs: int = 30
    decay_rate: float = 0.4
    warmup_epochs: int = 0
    drop_rate: float = 0.2  # dropout on the pooled features
    diversity_weight: float = 0.196  # beta of the feature diversity loss (0 turns it off)
    clip_grad: float | None = None
    ema_decay: float | None = None  # timm ModelEmaV3; its weights replace the model's at the end of the phase


@dataclass
class DenseConfig(OptimConfig):
    """Dense training with cross-entropy plus the feature diversity loss (method notes 1.3)."""

    epochs: int = 150


@dataclass
class SparseConfig:
    """Feature selection, the elastic-net path and quantisation (method notes 1.4-1.7)."""

    n_features: int = 50
    n_per_class: float = 5
    select_alpha: float = 0.8
    alpha: float = 0.99
    n_lambdas: int = 100
    eps: float = 1e-3
    val_fraction: float = 0.1
    exact_per_class: bool = False
    binary: bool = False
    tol: float = 1e-4  # KKT tolerance of each path point, relative to the largest gradient at lambda_max
    dtype: str = "float32"
    feature_dtype: str = "float32"  # storage of the pooled-feature cache: float32, float16 or bfloat16
    shard_above_mb: float = 1024.0  # with several processes, larger feature matrices stay sharded (0: always)


@dataclass
class FinetuneConfig(OptimConfig):
    """Iterative fine-tuning with the frozen ternary layer (method notes 1.8)."""

    iterations: int = 4
    epochs: list[int] = field(default_factory=lambda: [10, 10, 10, 40])
    lr: float = 1e-4
    head_lr: float | None = None
    lr_iteration_decay: float = 0.9  # the base learning rate of iteration i is lr * decay**i
    momentum: float = 0.95
    decay_epochs: int = 10
    drop_rate: float = 0.1
    train_norm: bool = True  # mean and std learn, as in Q-SENN (QPM freezes them)


@dataclass
class RunConfig:
    """Where the run lives and how it uses the hardware."""

    output: str = "runs/qsenn"
    seed: int = 0
    mixed_precision: str = "no"  # no, bf16, fp16
    grad_accum: int = 1
    channels_last: bool = False
    log_with: list[str] = field(default_factory=lambda: ["tensorboard"])  # accelerate trackers; [] for none
    checkpoint_steps: int = 0  # also checkpoint every N optimizer steps (0: at the end of every epoch only)
    eval_every: int = 5  # test accuracy every N epochs during training (0: never)
    from_pretrained: str | None = None  # skip dense training: a Q-SENN model folder/checkpoint or backbone weights


@dataclass
class TrainConfig:
    """The whole Q-SENN pipeline."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    dense: DenseConfig = field(default_factory=DenseConfig)
    sparse: SparseConfig = field(default_factory=SparseConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    run: RunConfig = field(default_factory=RunConfig)

    # Keys that change how a run executes but not what it computes; a resumed run may change them.
    OPERATIONAL = ("data.workers", "run.log_with", "run.checkpoint_steps", "run.output")

    def __post_init__(self) -> None:
        _coerce_fields(self, "")
        self.validate()

    def validate(self) -> None:
        """Check values that would only fail deep inside the run."""
        ft = self.finetune
        if ft.iterations < 1:
            raise ValueError("finetune.iterations must be at least 1: Q-SENN quantises in its fine-tuning iterations")
        if len(ft.epochs) != ft.iterations:
            raise ValueError(
                f"finetune.epochs lists {len(ft.epochs)} epoch counts for {ft.iterations} iterations; "
                "give one count per iteration"
            )
        if self.run.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"run.mixed_precision must be no, bf16 or fp16, got {self.run.mixed_precision!r}")
        for name, value in (("sparse.n_features", self.sparse.n_features), ("data.img_size", self.data.img_size)):
            if value < 1:
                raise ValueError(f"{name} must be positive, got {value}")
        mc = self.model
        if mc.cache_maps not in ("bf16", "fp16", "float32", "none"):
            raise ValueError(f"model.cache_maps must be bf16, fp16, float32 or none, got {mc.cache_maps!r}")
        if mc.cache_views < 0:
            raise ValueError(
                f"model.cache_views must be 0 (no augmentation) or a number of views, got {mc.cache_views}"
            )
        if self.sparse.n_per_class <= 0:
            raise ValueError(f"sparse.n_per_class must be positive, got {self.sparse.n_per_class}")

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML/JSON-ready)."""
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        """The resolved config as YAML."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def fingerprint(self) -> str:
        """Digest of everything that determines the run's results (operational keys excluded)."""
        flat = {k: v for k, v in _flatten_config(self.to_dict()).items() if k not in self.OPERATIONAL}
        return hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()[:16]

    def differences(self, other: TrainConfig) -> list[str]:
        """Keys (dotted) whose values differ from ``other``'s, operational keys excluded."""
        mine, theirs = _flatten_config(self.to_dict()), _flatten_config(other.to_dict())
        keys = (mine.keys() | theirs.keys()) - set(self.OPERATIONAL)
        return sorted(k for k in keys if mine.get(k) != theirs.get(k))


def _flatten_config(tree: dict[str, Any]) -> dict[str, Any]:
    # backbone_kwargs and adapter are one value each: their keys are the model's, not config keys.
    return flatten_dict(tree, keep=("backbone_kwargs", "adapter"))


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check (and widen int -> float) a YAML value against a dataclass field annotation."""
    hint = annotation
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0])
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ValueError(f"{where} must be a list, got {value!r}")
        (item,) = typing.get_args(hint)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        # YAML 1.1 reads exponents without a dot ("1e-6") as strings.
        try:
            return float(value)
        except ValueError:
            pass
    is_bool_as_int = hint is int and isinstance(value, bool)
    if hint is Any or (isinstance(hint, type) and isinstance(value, hint) and not is_bool_as_int):
        return value
    raise ValueError(f"{where} must be {getattr(hint, '__name__', hint)}, got {value!r}")


def _coerce_fields(obj: Any, where: str) -> None:
    """Give every field its annotated type (e.g. an int default of a float field becomes a float)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _coerce_fields(value, f"{where}{f.name}.")
        else:
            setattr(obj, f.name, _coerce(value, hints[f.name], f"{where}{f.name}"))


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    if not isinstance(values, dict):
        raise ValueError(f"{where.rstrip('.') or 'the config'} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        path = f"{where}{key}"
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f"; did you mean {where}{close[0]}?" if close else f"; valid keys: {', '.join(fields)}"
            raise ValueError(f"unknown config key {path!r}{hint}")
        hint_type = hints[key]
        if dataclasses.is_dataclass(hint_type):
            kwargs[key] = _build(hint_type, value, f"{path}.")
        else:
            kwargs[key] = _coerce(value, hint_type, path)
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"cannot set {dotted!r}: {part!r} is not a section")
    node[leaf] = value


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, base: dict[str, Any] | None = None
) -> TrainConfig:
    """Resolve a config: defaults, then ``base``, then the YAML file, then ``key.sub=value`` overrides."""
    tree: dict[str, Any] = json.loads(json.dumps(base or {}))
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {path} must hold a mapping of sections, got {type(loaded).__name__}")
        for dotted, value in _flatten_config(loaded).items():
            _set_dotted(tree, dotted, value)
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} must look like section.key=value, e.g. dense.epochs=10")
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw.strip() else "")
    return _build(TrainConfig, tree, "")
