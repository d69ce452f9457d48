"""The DeepSpeed configuration of a trial, built from its `TrainingConfig` (a plain dict).

Everything DeepSpeed needs to train one candidate comes from here, so the `ds_config.json` in a
trial folder is the whole recipe: AdamW (torch's implementation, `torch_adam`, which skips the
fused-Adam JIT build), DeepSpeed's `WarmupCosineLR` stepped once per optimizer step (linear
warm-up from `min_lr` to `lr` over `warmup_epochs`, then cosine decay to `min_lr` at the last
step), weight decay, gradient clipping, ZeRO stage, bf16, and the batch arithmetic
`train_batch_size = micro_batch x gradient_accumulation x world_size` with the global batch fixed
by `training.batch_size` whatever the worker count. No DeepSpeed import: the dict is data.

On a GPU, `deepspeed_device_args` pins the engine to the worker's own device: DeepSpeed would
otherwise put the model on `cuda:$LOCAL_RANK`, and under Ray Train a worker's GPU index among the
visible devices need not equal its local rank.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from search_spaces.training import TrainingConfig
from spvit.errors import ConfigError
from spvit.io import atomic_write_json


def micro_batch_size(training: TrainingConfig, world_size: int,
                     gradient_accumulation: int = 1) -> int:
    """Per-worker micro batch that keeps the global batch at `training.batch_size`."""
    if world_size < 1 or gradient_accumulation < 1:
        raise ConfigError(f"world size and gradient accumulation must be >= 1, but got"
                          f" {world_size} and {gradient_accumulation}. Use at least 1 of each.")
    per_step = world_size * gradient_accumulation
    if training.batch_size % per_step:
        raise ConfigError(
            f"training.batch_size {training.batch_size} is not divisible by {world_size}"
            f" workers x {gradient_accumulation} accumulation steps; the global batch is split"
            f" evenly. Pick a batch size that is a multiple of {per_step}."
        )
    return training.batch_size // per_step


def build_ds_config(training: TrainingConfig, *, world_size: int, steps_per_epoch: int,
                    gradient_accumulation: int = 1) -> dict[str, Any]:
    """A DeepSpeed config dict for `training` on `world_size` workers.

    Args:
        training: the recipe.
        world_size: number of data-parallel workers.
        steps_per_epoch: optimizer steps per epoch (micro-batches per worker and epoch divided
            by `gradient_accumulation`); sets the schedule's length.
        gradient_accumulation: micro-batches per optimizer step.
    """
    if steps_per_epoch < 1:
        raise ConfigError(f"an epoch must have at least one optimizer step, but got"
                          f" {steps_per_epoch}. Lower training.batch_size.")
    micro = micro_batch_size(training, world_size, gradient_accumulation)
    total_steps = training.epochs * steps_per_epoch
    warmup_steps = round(training.warmup_epochs * steps_per_epoch)
    ratio = training.min_lr / training.lr
    if warmup_steps < 1:
        # WarmupCosineLR always warms up over >= 2 steps; starting at ratio 1 makes them flat.
        warmup_steps, warmup_start = 1, 1.0
    else:
        warmup_start = ratio
    return {
        "train_batch_size": training.batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": gradient_accumulation,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": training.lr,
                "betas": [0.9, 0.999],
                "eps": 1e-8,
                "weight_decay": training.weight_decay,
                "torch_adam": True,
            },
        },
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": total_steps,
                "warmup_num_steps": warmup_steps,
                "warmup_min_ratio": warmup_start,
                "cos_min_ratio": ratio,
                "warmup_type": "linear",
            },
        },
        "gradient_clipping": training.grad_clip,
        "zero_optimization": {"stage": training.zero_stage},
        "bf16": {"enabled": training.bf16},
        "fp16": {"enabled": False},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def deepspeed_device_args(device: torch.device | str) -> SimpleNamespace | None:
    """The `args` of `deepspeed.initialize` that place the engine on `device`.

    On CUDA a namespace with `device_rank` (the device index, the current device for plain
    `cuda`; DeepSpeed's own default is `$LOCAL_RANK`); on CPU None (DeepSpeed's CPU accelerator
    has one device).
    """
    device = torch.device(device)
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    return SimpleNamespace(device_rank=index)


def write_ds_config(config: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write `config` as a standard DeepSpeed JSON file, atomically."""
    return atomic_write_json(path, config)
