"""One training epoch and one evaluation pass, with typed arguments.

`train_one_epoch` drives anything shaped like a DeepSpeed engine (`TrainEngine`: call it for the
forward pass, `backward(loss)`, `step()`, `get_lr()`); the engine owns the optimizer, the
per-step learning-rate schedule, gradient clipping and accumulation. `TorchEngine` gives a plain
module and optimizer that shape (the one-shot scorer's fine-tuning steps). `evaluate` runs any
module.
With several workers, each sees its own shard; the loss check, the epoch's training loss and the
validation counts are summed over workers with `torch.distributed.all_reduce`, so every worker
returns the same numbers and stops at the same step. A non-finite loss on any worker stops all of
them with `TrainingDiverged`, whose message says where and what to change.

Placement (`process_group_backend`, `inprocess_device`, `model_input_dtype`): CPU workers use gloo,
GPU workers nccl with one GPU each; a one-worker trial in the caller's process trains on `cuda:0`,
the first GPU this process sees (under Ray, the GPU Ray gave the trial, through
`CUDA_VISIBLE_DEVICES`). Nothing here fixes a GPU index, a memory size or a batch per device.

No DeepSpeed import here: the launch package passes the engine in.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F

from spvit.errors import ConfigError


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; `reason` says where and what to change."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class TrainEngine(Protocol):
    """The part of `deepspeed.DeepSpeedEngine` the training loop uses."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...
    def backward(self, loss: torch.Tensor) -> Any: ...
    def step(self) -> Any: ...
    def train(self, mode: bool = True) -> Any: ...
    def get_lr(self) -> list[float]: ...


class TorchEngine:
    """A plain module, optimizer and per-step schedule shaped like a DeepSpeed engine, so that
    `train_one_epoch` drives a short in-process training (the one-shot scorer's fine-tuning)
    with the trials' loss, loss check and statistics.

    `step()` clips the gradient norm to `grad_clip` (0: off), steps the optimizer and the
    schedule, and clears the gradients, as the engine does after each micro-batch with
    gradient accumulation 1.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler | None = None, *,
                 grad_clip: float = 0.0) -> None:
        self.module = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.grad_clip = grad_clip
        optimizer.zero_grad(set_to_none=True)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def train(self, mode: bool = True) -> TorchEngine:
        self.module.train(mode)
        return self

    def get_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]


@dataclass(frozen=True)
class EpochStats:
    """Training side of one epoch, identical on every worker.

    Args:
        loss: mean training loss (with label smoothing) over all workers' samples.
        images: training images seen by all workers together.
        steps: micro-batches per worker.
        seconds: wall time of the epoch's training loop.
        lr: learning rate of the last step.
    """

    loss: float
    images: int
    steps: int
    seconds: float
    lr: float

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class EvalStats:
    """Validation metrics over all workers' shards: each image counted once."""

    loss: float
    acc1: float
    acc5: float
    count: int


def process_group_backend(use_gpu: bool) -> str:
    """The torch.distributed backend of a trial's workers: `nccl` on GPUs, `gloo` on CPUs."""
    return "nccl" if use_gpu else "gloo"


def inprocess_device(use_gpu: bool) -> torch.device:
    """Where a one-worker trial trains in the caller's process: `cuda:0` or `cpu`.

    `cuda:0` is the first GPU visible to this process; inside a Ray trial that is the GPU Ray
    assigned (Ray sets `CUDA_VISIBLE_DEVICES`), elsewhere pick one with `CUDA_VISIBLE_DEVICES`.

    Raises:
        ConfigError: a GPU was asked for but torch sees none (or lacks NCCL).
    """
    if not use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("training on a GPU was requested, but torch sees no CUDA device"
                          f" (torch {torch.__version__}). Train on CPU (no GPU per worker) or"
                          " install a CUDA build of torch.")
    if not dist.is_nccl_available():
        raise ConfigError("training on a GPU uses the nccl backend, which this torch build lacks."
                          " Install a CUDA build of torch with NCCL, or train on CPU.")
    return torch.device("cuda", 0)


def model_input_dtype(bf16: bool, device: torch.device | str) -> torch.dtype:
    """dtype of the images fed to the model: bf16 under DeepSpeed bf16, else fp32.

    Raises:
        ConfigError: bf16 on a GPU without bf16 arithmetic (compute capability < 8.0).
    """
    device = torch.device(device)
    if not bf16:
        return torch.float32
    if device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        name = torch.cuda.get_device_name(device)
        raise ConfigError(f"training.bf16 needs a GPU with bf16 arithmetic (compute capability"
                          f" >= 8.0), but {name} has none. Set training.bf16: false.")
    return torch.bfloat16


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def sum_across_workers(values: list[float], device: torch.device) -> list[float]:
    """`values` summed over all workers in float64 (as given with one worker)."""
    if _world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def topk_correct(logits: torch.Tensor, target: torch.Tensor,
                 ks: Iterable[int] = (1, 5)) -> list[int]:
    """Number of rows whose target is among the top-k logits, for each k (k capped at classes).

    Rows with a negative target (padding) are never counted.
    """
    ks = list(ks)
    kmax = min(max(ks), logits.shape[-1])
    top = logits.topk(kmax, dim=-1).indices  # (B, kmax)
    hits = top.eq(target.unsqueeze(-1))  # (B, kmax)
    return [int(hits[:, :min(k, kmax)].any(dim=-1).sum()) for k in ks]


def train_one_epoch(engine: TrainEngine, loader: Iterable[tuple[torch.Tensor, torch.Tensor]], *,
                    epoch: int, device: torch.device, input_dtype: torch.dtype = torch.float32,
                    label_smoothing: float = 0.0,
                    on_step: Callable[[int, float], None] | None = None) -> EpochStats:
    """Train for one pass over `loader` (this worker's shard).

    Args:
        engine: the DeepSpeed engine (or anything with the same methods).
        loader: yields `(images, labels)` micro-batches.
        epoch: 1-based epoch number, used in messages.
        device: where the batches go.
        input_dtype: dtype of the images fed to the model (bf16 under DeepSpeed bf16).
        label_smoothing: cross-entropy label smoothing.
        on_step: called after every step with `(step, loss)` (1-based step, this worker's loss).

    Raises:
        TrainingDiverged: the loss became NaN/inf on any worker (all workers raise together).
    """
    engine.train()
    start = time.perf_counter()
    loss_sum, count, step = 0.0, 0, 0
    for step, (images, labels) in enumerate(loader, start=1):
        images = images.to(device, dtype=input_dtype, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        logits = engine(images)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
        # One small collective per step: every worker must stop at the same step, or the
        # others would wait forever in the gradient all-reduce.
        step_loss, step_count = sum_across_workers(
            [loss.detach().item() * labels.shape[0], float(labels.shape[0])], device)
        if not torch.isfinite(torch.tensor(step_loss)):
            what = "nan" if step_loss != step_loss else "inf"
            raise TrainingDiverged(
                f"loss became {what} at epoch {epoch} step {step}; lower training.lr or enable"
                " grad_clip (training.grad_clip > 0)")
        engine.backward(loss)
        engine.step()
        loss_sum += step_loss
        count += int(step_count)
        if on_step is not None:
            on_step(step, loss.detach().item())
    seconds = time.perf_counter() - start
    lr = float(engine.get_lr()[0])
    return EpochStats(loss=loss_sum / max(count, 1), images=count, steps=step, seconds=seconds,
                      lr=lr)


@torch.no_grad()
def evaluate(model: Callable[[torch.Tensor], torch.Tensor],
             loader: Iterable[tuple[torch.Tensor, torch.Tensor]], *, device: torch.device,
             input_dtype: torch.dtype = torch.float32) -> EvalStats:
    """Cross-entropy, top-1 and top-5 accuracy over all workers' validation shards.

    Samples labelled -1 (shard padding) run through the model, so every worker makes the same
    number of forward passes, but are not counted.
    """
    if hasattr(model, "eval"):
        model.eval()
    loss_sum, correct1, correct5, count = 0.0, 0, 0, 0
    for images, labels in loader:
        images = images.to(device, dtype=input_dtype, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        logits = model(images).float()
        loss_sum += F.cross_entropy(logits, labels, ignore_index=-1, reduction="sum").item()
        c1, c5 = topk_correct(logits, labels, (1, 5))
        correct1, correct5 = correct1 + c1, correct5 + c5
        count += int((labels >= 0).sum())
    loss_sum, correct1, correct5, count = sum_across_workers(
        [loss_sum, float(correct1), float(correct5), float(count)], device)
    if count == 0:
        return EvalStats(loss=float("nan"), acc1=0.0, acc5=0.0, count=0)
    return EvalStats(loss=loss_sum / count, acc1=correct1 / count, acc5=correct5 / count,
                     count=int(count))
