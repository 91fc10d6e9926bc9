"""Training throughput of the Q-SENN dense and fine-tuning steps divided by a plain timm cross-entropy step.

Same backbone, batch, precision and device, in one process; the three steps are interleaved so that drifts in
machine load hit all of them, and the ratio of median step times is reported. Target: >= 0.97.

    python benchmarks/bench_train_step.py --quick                       # CPU, under a minute
    python benchmarks/bench_train_step.py --device cuda --backbone resnet50 --img-size 448 --batch-size 64 \
        --amp bf16 --channels-last                                      # the GPU check
"""

from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch
import torch.nn.functional as F
from bench_forward import backbone_kwargs, ternary_qsenn  # benchmarks/ is the script's folder, first on sys.path

import timm_qsenn  # noqa: F401
from timm_qsenn.train.loop import TrainModule


def _plain_step(model, optimizer, images, labels, dtype):
    with torch.autocast(images.device.type, dtype=dtype, enabled=dtype is not None):
        loss = F.cross_entropy(model(images).float(), labels)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _qsenn_step(module, optimizer, images, labels, dtype):
    with torch.autocast(images.device.type, dtype=dtype, enabled=dtype is not None):
        loss, _, _ = module(images, labels)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="resnet18 at 96 px on CPU, under a minute")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backbone", default=None)
    parser.add_argument("--img-size", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--num-classes", type=int, default=200)
    parser.add_argument("--n-features", type=int, default=50)
    args = parser.parse_args()
    backbone = args.backbone or ("resnet18" if args.quick else "resnet50")
    size = args.img_size or (96 if args.quick else 224)
    batch = args.batch_size or (16 if args.quick else 32)
    steps = args.steps or (8 if args.quick else 30)
    device = torch.device(args.device)
    dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    torch.manual_seed(0)

    kwargs = backbone_kwargs(backbone)
    plain = timm.create_model(backbone, num_classes=args.num_classes, **kwargs)
    dense_model = timm.create_model("qsenn", backbone=backbone, num_classes=args.num_classes, backbone_kwargs=kwargs)
    dense = TrainModule(dense_model, 0.196)
    finetune = TrainModule(ternary_qsenn(backbone, args.num_classes, args.n_features, backbone_kwargs=kwargs), 0.196)
    variants = {}
    for name, model, step in (
        ("plain timm CE", plain, _plain_step),
        ("Q-SENN dense", dense, _qsenn_step),
        ("Q-SENN fine-tune", finetune, _qsenn_step),
    ):
        model.to(device=device, memory_format=memory_format).train()
        params = [p for p in model.parameters() if p.requires_grad]
        variants[name] = (model, torch.optim.SGD(params, lr=1e-3, momentum=0.9), step)
    images = torch.randn(batch, 3, size, size, device=device).to(memory_format=memory_format)
    labels = torch.randint(0, args.num_classes, (batch,), device=device)
    times: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants)
    for i in range(args.warmup + steps):
        for name in order[i % 3 :] + order[: i % 3]:  # rotate who goes first
            model, optimizer, step = variants[name]
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            step(model, optimizer, images, labels, dtype)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - start)
    print(f"{backbone} {size}px, batch {batch}, {args.device}, amp {args.amp}, channels_last {args.channels_last}")
    rates = {name: batch / statistics.median(t) for name, t in times.items()}
    for name, rate in rates.items():
        print(f"  {name:<18} {rate:8.1f} img/s")
    base = rates["plain timm CE"]
    ratios = {name: rates[name] / base for name in ("Q-SENN dense", "Q-SENN fine-tune")}
    print(", ".join(f"{name} {ratio:.3f}" for name, ratio in ratios.items()))
    print(f"train step throughput Q-SENN / plain timm (worst of dense, fine-tune): {min(ratios.values()):.3f}")


if __name__ == "__main__":
    main()
