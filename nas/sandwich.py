"""One supernet training epoch under the sandwich rule with in-place distillation.

`train_sandwich_epoch` is the supernet's counterpart of `nas.engine.train_one_epoch` and drives
the same engine shape (`nas.engine.TrainEngine`, whose `module` is an
`spvit.supernet.SPViTSupernet`): for every batch it trains the subnets of
`nas.oneshot.SandwichSampler.step(epoch, step)`, the largest with cross-entropy on the labels,
the smallest and the random ones against the largest's (detached) soft predictions, or on the
labels too while `distill` is off (a teacher near chance teaches nothing but uniform
predictions). The engine accumulates their gradients (`gradient_accumulation_steps` = subnets
per step, so the loss is their mean) and steps the optimizer and the schedule once per batch.
`launch.supernet` runs it inside the checkpointed-epoch harness (`launch.harness`).

`ActiveSubnet` is the engine with one subnet active, shaped for `nas.engine.evaluate`.
No DeepSpeed import here: the launch package passes the engine in.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from spvit.arch import ArchSpec

from .engine import TrainEngine, TrainingDiverged, sum_across_workers
from .oneshot import SandwichSampler


@dataclass(frozen=True)
class SandwichStats:
    """Training side of one supernet epoch, identical on every worker.

    Args:
        loss: the largest subnet's mean cross-entropy (with label smoothing) over all workers.
        distill_loss: the other subnets' mean loss (distillation, or labels while not
            distilling) over all workers.
        images: training images seen by all workers together (once per batch, not per subnet).
        subnets_per_step: forward/backward passes per batch.
        seconds: wall time of the epoch's training loop.
    """

    loss: float
    distill_loss: float
    images: int
    subnets_per_step: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        """Subnet-images per second: every image passes through every subnet of its step."""
        return self.images * self.subnets_per_step / self.seconds if self.seconds > 0 else 0.0


def distill_loss(logits: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against the teacher's probabilities (in-place distillation)."""
    return -(teacher * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()


class ActiveSubnet:
    """The engine with subnet `spec` active, shaped for `nas.engine.evaluate`."""

    def __init__(self, engine: Any, spec: ArchSpec) -> None:
        self.engine, self.spec = engine, spec

    def eval(self) -> None:
        self.engine.eval()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.engine.module.set_active(self.spec)
        return self.engine(x)


def train_sandwich_epoch(engine: TrainEngine, loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
                         sampler: SandwichSampler, *, epoch: int, device: torch.device,
                         input_dtype: torch.dtype = torch.float32, label_smoothing: float = 0.0,
                         distill: bool = True) -> SandwichStats:
    """Train the supernet in `engine.module` for one pass over `loader` (this worker's shard).

    Args:
        engine: the DeepSpeed engine with `gradient_accumulation_steps == sampler.per_step`.
        loader: yields `(images, labels)` micro-batches.
        sampler: the subnets of each step; every worker draws the same ones.
        epoch: 1-based epoch number (the sampler's seed, and messages).
        device: where the batches go.
        input_dtype: dtype of the images fed to the model (bf16 under DeepSpeed bf16).
        label_smoothing: the largest subnet's cross-entropy label smoothing (and the others'
            while not distilling).
        distill: the smaller subnets learn from the largest's predictions, not the labels.

    Raises:
        TrainingDiverged: a loss became NaN/inf on any worker (all workers raise together).
    """
    engine.train()
    started = time.perf_counter()
    per_step = sampler.per_step
    sums = [0.0, 0.0, 0.0]  # largest CE * n, distillation * n, n
    for step, (images, labels) in enumerate(loader, start=1):
        images = images.to(device, dtype=input_dtype)
        labels = labels.to(device)
        teacher = None
        for k, spec in enumerate(sampler.step(epoch, step)):
            engine.module.set_active(spec)
            logits = engine(images)
            if teacher is None or not distill:
                loss = F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
                if teacher is None:
                    teacher = logits.detach().float().softmax(-1)
                    ce = loss.detach()
            else:
                loss = distill_loss(logits, teacher)
            # Every worker must stop at the same step, or the others would wait forever in the
            # gradient all-reduce.
            step_loss = sum_across_workers([loss.item()], device)[0]
            if not math.isfinite(step_loss):
                raise TrainingDiverged(
                    f"supernet loss became {step_loss} at epoch {epoch} step {step} (subnet"
                    f" {k}); lower training.lr or enable training.grad_clip")
            if k > 0:
                sums[1] += loss.item() * labels.shape[0] / (per_step - 1)
            engine.backward(loss)
            engine.step()
        sums[0] += ce.item() * labels.shape[0]
        sums[2] += labels.shape[0]
    seconds = time.perf_counter() - started
    total = sum_across_workers(sums, device)
    return SandwichStats(loss=total[0] / max(total[2], 1), distill_loss=total[1] / max(total[2], 1),
                         images=int(total[2]), subnets_per_step=per_step, seconds=seconds)
