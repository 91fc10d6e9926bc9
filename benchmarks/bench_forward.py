"""Eval-mode forward time of a Q-SENN model divided by the same backbone with its plain timm head.

Both models run in the same process on the same inputs, interleaved step by step so that drifts in machine
load hit both; the ratio of the median step times is reported. Target: <= 1.02.

    python benchmarks/bench_forward.py --quick            # CPU, under a minute
    python benchmarks/bench_forward.py --device cuda --amp bf16 --channels-last --batch-size 256
"""

from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch

import timm_qsenn  # noqa: F401
from timm_qsenn.ternary import quantize_ternary, ternary_bias

FULL = [("resnet50", 224), ("convnext_tiny", 224), ("vit_small_patch16_224", 224)]
QUICK = [("resnet18", 160), ("vit_small_patch16_224", 128)]


def backbone_kwargs(backbone: str) -> dict:
    """Constructor arguments that let a backbone run at any benchmark input size (ViTs fix theirs otherwise)."""
    return {"dynamic_img_size": True} if "vit" in backbone else {}


def ternary_qsenn(backbone: str, num_classes: int, n_features: int, **kwargs) -> torch.nn.Module:
    """A Q-SENN model in its final (ternary) stage with random weights: selected features, frozen layer."""
    model = timm.create_model("qsenn", backbone=backbone, num_classes=num_classes, **kwargs)
    channels = torch.randperm(model.num_features)[:n_features]
    model.head.select(channels)
    t = quantize_ternary(torch.randn(num_classes, n_features), n_per_class=5)
    model.head.set_class_layer(t.weight, ternary_bias(t.codes, torch.randn(num_classes)))
    return model


def _step_time(model: torch.nn.Module, x: torch.Tensor, device: torch.device, dtype: torch.dtype | None) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        model(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def bench(backbone: str, img_size: int, args: argparse.Namespace) -> float:
    """Median Q-SENN step time over median plain-timm step time for one backbone."""
    device = torch.device(args.device)
    dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    kwargs = backbone_kwargs(backbone)
    plain = timm.create_model(backbone, num_classes=args.num_classes, **kwargs)
    qsenn = ternary_qsenn(backbone, args.num_classes, args.n_features, backbone_kwargs=kwargs)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    models = [m.to(device=device, memory_format=memory_format).eval() for m in (plain, qsenn)]
    x = torch.randn(args.batch_size, 3, img_size, img_size, device=device).to(memory_format=memory_format)
    times: list[list[float]] = [[], []]
    for step in range(args.warmup + args.steps):
        for i in (0, 1) if step % 2 else (1, 0):  # alternate who goes first
            t = _step_time(models[i], x, device, dtype)
            if step >= args.warmup:
                times[i].append(t)
    plain_t, qsenn_t = (statistics.median(t) for t in times)
    print(
        f"{backbone:>24} {img_size:>4}px  plain {plain_t * 1e3:8.2f} ms  qsenn {qsenn_t * 1e3:8.2f} ms  "
        f"ratio {qsenn_t / plain_t:.3f}  ({args.batch_size / plain_t:.0f} vs {args.batch_size / qsenn_t:.0f} img/s)"
    )
    return qsenn_t / plain_t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small models and inputs, under a minute on CPU")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--num-classes", type=int, default=200)
    parser.add_argument("--n-features", type=int, default=50)
    args = parser.parse_args()
    args.batch_size = args.batch_size or (8 if args.quick else 32)
    args.steps = args.steps or (12 if args.quick else 30)
    torch.manual_seed(0)
    print(f"device {args.device}, amp {args.amp}, batch {args.batch_size}, torch {torch.__version__}")
    ratios = {name: bench(name, size, args) for name, size in (QUICK if args.quick else FULL)}
    worst = max(ratios, key=ratios.get)
    print(f"forward time ratio Q-SENN / plain timm (eval, worst of {len(ratios)}): {ratios[worst]:.3f} ({worst})")


if __name__ == "__main__":
    main()
