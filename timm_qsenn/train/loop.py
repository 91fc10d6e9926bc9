"""One training epoch (dense and fine-tuning phases alike) and test accuracy, on whatever Accelerate prepared."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from timm.utils import ModelEmaV3
from torch import nn
from tqdm.auto import tqdm

from .._utils import eval_mode, forward_batches, gather
from ..losses import qsenn_loss
from ..qsenn import QSENN

__all__ = ["TrainModule", "EpochStats", "train_epoch", "evaluate_accuracy"]


class TrainModule(nn.Module):
    """What the accelerator wraps for training: the Q-SENN forward and its loss.

    The loss is computed inside ``forward`` so that DDP and FSDP see every use of the class weights (the
    feature diversity loss reads them, and FSDP only gathers them inside the wrapped forward).
    """

    def __init__(
        self, model: QSENN, diversity_weight: float = 0.0, frozen_backbone: bool = False, from_maps: bool = False
    ):
        """``from_maps``: batches hold cached backbone maps (``forward_backbone``), not images."""
        super().__init__()
        self.model = model
        self.diversity_weight = diversity_weight
        self.frozen_backbone = frozen_backbone
        self.from_maps = from_maps

    def train(self, mode: bool = True) -> TrainModule:
        super().train(mode)
        if self.frozen_backbone:
            # A frozen backbone computes what it was trained to: no dropout, its normalisation statistics kept.
            self.model.backbone.eval()
        return self

    def forward(self, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, cross-entropy, diversity loss) of a batch of images, or of backbone maps with ``from_maps``."""
        out = self.model.forward_qsenn_from_maps(inputs) if self.from_maps else self.model.forward_qsenn(inputs)
        return qsenn_loss(out, labels, self.model.head.fc.weight, self.diversity_weight)


@dataclass
class EpochStats:
    """Mean losses of an epoch, averaged over every process."""

    loss: float
    cross_entropy: float
    diversity: float
    updates: int


def train_epoch(
    accelerator: Accelerator,
    module: nn.Module,
    loader,
    optimizer,
    scheduler,
    *,
    num_updates: int,
    start_batch: int = 0,
    clip_grad: float | None = None,
    ema: ModelEmaV3 | None = None,
    channels_last: bool = False,
    on_update: Callable[[int, int], None] | None = None,
    desc: str = "",
) -> EpochStats:
    """Train ``module`` (a prepared :class:`TrainModule`) for one pass over ``loader``.

    The loss is cross-entropy plus the feature diversity loss on the maps the class layer reads, with the live
    class weights (trainable while dense, the frozen ternary layer in fine-tuning). ``on_update(batches_done,
    num_updates)`` runs after every optimizer step, e.g. to checkpoint.
    """
    model = accelerator.unwrap_model(module).model
    module.train()
    sums = torch.zeros(3, device=accelerator.device)
    seen = 0
    updates = 0
    bar = tqdm(
        loader,
        desc=desc,
        initial=start_batch,
        total=start_batch + len(loader),
        disable=not accelerator.is_local_main_process,
        leave=False,
        dynamic_ncols=True,
    )
    for batch, (images, labels) in enumerate(bar, start=start_batch):
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with accelerator.accumulate(module):
            loss, cross_entropy, diversity = module(images, labels)
            accelerator.backward(loss)
            if accelerator.sync_gradients and clip_grad:
                accelerator.clip_grad_norm_([p for p in module.parameters() if p.requires_grad], clip_grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        sums += torch.stack([loss.detach(), cross_entropy.detach(), diversity.detach()]).float()
        seen += 1
        if accelerator.sync_gradients:
            updates += 1
            num_updates += 1
            scheduler.step_update(num_updates=num_updates)
            if ema is not None:
                ema.update(model, step=num_updates)
            if updates % _REPORT_EVERY == 0:  # reading the loss waits for the device: not on every step
                _check_finite(sums[0] / seen, batch, desc)
                bar.set_postfix(loss=f"{float(sums[0]) / seen:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
            if on_update is not None:
                on_update(batch + 1, num_updates)
    bar.close()
    totals = accelerator.reduce(torch.cat([sums, torch.tensor([float(seen)], device=sums.device)]), "sum")
    count = max(float(totals[3]), 1.0)
    _check_finite(totals[0] / count, start_batch + seen, desc)
    return EpochStats(*(float(v) / count for v in totals[:3]), updates=updates)


_REPORT_EVERY = 20


def _check_finite(loss: torch.Tensor, batch: int, desc: str) -> None:
    if not math.isfinite(float(loss)):
        raise FloatingPointError(
            f"the training loss became {float(loss)} by batch {batch} ({desc}); lower the learning rate, "
            "clip gradients (clip_grad) or train in full precision"
        )


@torch.no_grad()
def evaluate_accuracy(accelerator: Accelerator, model: QSENN, loader, desc: str = "evaluate") -> float:
    """Top-1 accuracy (a fraction) over a prepared loader, every image counted once across processes."""
    correct = total = 0
    with eval_mode(model):
        batches = forward_batches(
            model, loader, device=accelerator.device, accelerator=accelerator, progress=True, desc=desc
        )
        for out, labels in batches:
            predictions, labels = gather(accelerator, (out.logits.argmax(dim=1), labels))
            correct += int((predictions == labels).sum())
            total += labels.numel()
    return correct / max(total, 1)
