"""Images per second of an adapter epoch read from the map cache divided by an epoch through the frozen backbone.

Same model (frozen backbone, adapter, Q-SENN head with its diversity loss), data, batch, optimizer and device, in
one process. Both epochs read their inputs through a DataLoader (images from memory; maps memory-mapped from the
cache), and the two kinds of epoch alternate so that drifts in machine load hit both; the ratio of the median
epoch times is reported, with the one-off cost of building the cache.

    python benchmarks/bench_frozen.py --quick                 # CPU: DINOv2 ViT-S/14 at 112 px, about a minute
    python benchmarks/bench_frozen.py --device cuda --backbone vit_base_patch14_reg4_dinov2 --img-size 224 \
        --adapter 4,2048,512 --images 1024 --batch-size 64     # DINO-QPM's shape, on synthetic data
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import timm
import torch
from torch.utils.data import DataLoader, TensorDataset

import timm_qsenn  # noqa: F401
from timm_qsenn.map_cache import cache_maps
from timm_qsenn.train.loop import TrainModule


def _epoch(module, optimizer, loader, device) -> float:
    """Seconds of one training epoch over ``loader``."""
    start = time.perf_counter()
    for inputs, labels in loader:
        loss, _, _ = module(inputs.to(device), labels.to(device))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="vit_small_patch14_dinov2 at 112 px, 128 images")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backbone", default="vit_small_patch14_dinov2")
    parser.add_argument("--img-size", type=int, default=None)
    parser.add_argument("--images", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--adapter", default="4,512,256", help="depth,hidden,out_features")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "float32"], default="bf16", help="cache dtype")
    parser.add_argument("--rounds", type=int, default=3, help="epochs of each kind, alternating")
    parser.add_argument("--num-classes", type=int, default=200)
    args = parser.parse_args()
    size = args.img_size or (112 if args.quick else 224)
    count = args.images or (128 if args.quick else 1024)
    device = torch.device(args.device)
    depth, hidden, out = (int(v) for v in args.adapter.split(","))
    torch.manual_seed(0)
    model = timm.create_model(
        "qsenn",
        backbone=args.backbone,
        num_classes=args.num_classes,
        img_size=size,
        adapter={"depth": depth, "hidden": hidden, "out_features": out},
    ).to(device)
    model.backbone.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    images = TensorDataset(torch.randn(count, 3, size, size, generator=g), torch.arange(count) % args.num_classes)
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        maps = cache_maps(model, images, folder, dtype=args.dtype, batch_size=args.batch_size)
        build = time.perf_counter() - start
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        runs = {}
        for name, dataset, from_maps in (("backbone", images, False), ("cache", maps, True)):
            module = TrainModule(model, 0.196, frozen_backbone=True, from_maps=from_maps).train()
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
            loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True)
            runs[name] = (module, optimizer, loader)
        seconds = {name: [] for name in runs}
        _epoch(*runs["cache"], device)  # warm-up: the first reads of the memory map
        for _ in range(args.rounds):
            for name, (module, optimizer, loader) in runs.items():
                seconds[name].append(_epoch(module, optimizer, loader, device))
    seen = (count // args.batch_size) * args.batch_size
    rate = {name: seen / statistics.median(times) for name, times in seconds.items()}
    print(
        f"{args.backbone} {size}px, adapter {depth}x{hidden}->{out}, {count} images, batch {args.batch_size}, "
        f"{args.device}, cache {args.dtype} {maps.shape}"
    )
    print(f"  cache build (one backbone pass): {build:.2f} s")
    for name, times in seconds.items():
        print(f"  epoch {name:<8}: {rate[name]:8.1f} images/s  (epochs: {', '.join(f'{t:.2f}' for t in times)} s)")
    print(f"  ratio cache / backbone: {rate['cache'] / rate['backbone']:.1f}x")
    if device.type == "cuda":
        print(f"  peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
