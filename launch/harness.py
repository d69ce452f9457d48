"""The checkpointed-epoch harness: one DeepSpeed training run, epoch by epoch, resumable from disk.

A trial (`launch.worker`) and the supernet trainer (`launch.supernet`) are the same run with a
different epoch: each supplies an `EpochJob` (its model, its epoch step from `nas.engine` or
`nas.sandwich`, its metrics line, what it writes after a checkpoint) and `run_epochs` does the
rest, the same way for both: prepare the folder (keep the last checkpoint or start over), build
this worker's data shard and the DeepSpeed config, build the engine on this worker's own device
(`nas.ds_config.deepspeed_device_args`) with the input dtype the device can compute
(`nas.engine.model_input_dtype` refuses bf16 where it has none), restore the checkpoint, then
per epoch train inside `epoch_rng`, evaluate, checkpoint, log and report.

Checkpoints (`FOLDER/checkpoint/`): DeepSpeed writes tag folder `epoch_NNNN`; only when every
rank has finished (DeepSpeed's closing barrier) does rank 0 replace `state.json` (the epoch, the
recipe, what was trained and every epoch's metrics) and DeepSpeed's `latest` pointer, both
atomically, and delete older tags. A kill mid-save leaves the previous tag and pointers intact; the
next start deletes the partial folder. Resuming loads the tag `state.json` names, rewrites
`metrics.jsonl` from its history and continues at the next epoch; the data order, augmentation and
dropout draws of an epoch depend only on (seed, epoch, rank), so a resumed run repeats exactly what
an uninterrupted one would have done.

The process group must exist: Ray Train's, or `ensure_local_process_group` for one worker in the
caller's process. Every rank calls `report` after every epoch (Ray Train's `report` is a barrier).
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import random
import shutil
import socket
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from nas.data import build_datasets, build_loaders
from nas.ds_config import build_ds_config, deepspeed_device_args, micro_batch_size, write_ds_config
from nas.engine import TrainingDiverged, model_input_dtype
from nas.layout import (  # the folder's files, shared with launch.worker and launch.supernet
    CHECKPOINT_DIR,
    DS_CONFIG_FILE,
    FAILURE_FILE,
    LATEST_FILE,
    METRICS_FILE,
    STATE_FILE,
)
from search_spaces.training import TrainingConfig
from spvit.arch import ArchSpec
from spvit.errors import ConfigError
from spvit.io import atomic_write_bytes, atomic_write_json, atomic_write_text


@dataclass(frozen=True)
class WorkerSetup:
    """Where one worker sits in its run.

    Args:
        rank, world_size, local_rank: data-parallel position (from Ray Train or 0/1/0).
        device: torch device string (`cpu`, `cuda:0`).
        threads: torch intra-op threads, the CPUs given to this worker.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"
    threads: int = 1


# --------------------------------------------------------------------------- folder files
def remove_other_tags(ckpt: Path, keep: str | None) -> None:
    """Delete every checkpoint tag folder in `ckpt` but `keep`."""
    if not ckpt.is_dir():
        return
    for entry in ckpt.iterdir():
        if entry.is_dir() and entry.name != keep:
            shutil.rmtree(entry, ignore_errors=True)


def write_metrics(folder: Path, history: list[dict[str, Any]]) -> None:
    """Replace `metrics.jsonl` with `history`, atomically."""
    atomic_write_text(folder / METRICS_FILE,
                      "".join(json.dumps(line) + "\n" for line in history))


def append_metrics(folder: Path, line: dict[str, Any]) -> None:
    """Append one line to `metrics.jsonl` and flush it to disk."""
    with open(folder / METRICS_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_failure(trial_dir: str | os.PathLike, reason: str) -> None:
    """Record why a run failed (`failure.json`), atomically."""
    atomic_write_json(Path(trial_dir) / FAILURE_FILE, {"reason": reason})


def failure_reason(exc: BaseException) -> str:
    """One line describing `exc` for `failure.json`."""
    if isinstance(exc, TrainingDiverged):
        return exc.reason
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# --------------------------------------------------------------------------- process groups
def _weights_only_checkpoint_engine() -> Any:
    """DeepSpeed's torch checkpoint engine, loading with `torch.load(weights_only=True)`.

    DeepSpeed's own engine unpickles checkpoints in full (`weights_only=False`); trial folders
    can sit on shared storage, so loading must not run arbitrary code. Tensors, containers and
    the three small DeepSpeed classes its ZeRO optimizer states pickle (found by listing the
    globals of ZeRO 0-3 checkpoints, fp32 and bf16) are all that is allowed.
    """
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location: Any = None) -> Any:
            with torch.serialization.safe_globals([ZeroStageEnum, LossScaler, fragment_address]):
                return torch.load(path, map_location=map_location, weights_only=True)

    return WeightsOnlyCheckpointEngine()


def ensure_local_process_group(backend: str = "gloo") -> None:
    """Make this process a one-worker torch.distributed group (once per process).

    The rendezvous store is an in-memory `HashStore`: a `TCPStore` would listen on every
    interface (torch binds it to all of them, whatever address it is given) for the life of the
    process, accepting unauthenticated connections. With one process there is nobody to meet.
    gloo's own socket is bound to the loopback interface (`GLOO_SOCKET_IFNAME`, unless set).

    The group is kept for the life of the process: DeepSpeed caches its process groups, so a
    destroyed and re-created group would break the next engine built here.
    """
    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise RuntimeError(f"this process is already part of a {dist.get_world_size()}-worker"
                               " group; in-process training needs a one-worker group")
        return
    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("RANK", "0"), ("LOCAL_RANK", "0"),
                       ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)
    if backend == "gloo":
        os.environ.setdefault("GLOO_SOCKET_IFNAME", _loopback_interface())
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def _loopback_interface() -> str:
    """The name of the loopback network interface (`lo` on Linux, `lo0` on macOS)."""
    try:
        import psutil

        for name, addresses in psutil.net_if_addrs().items():
            if any(a.family == socket.AF_INET and a.address.startswith("127.")
                   for a in addresses):
                return name
    except ImportError:  # pragma: no cover - psutil comes with Ray
        pass
    return "lo"


# --------------------------------------------------------------------------- weights
def _unfused_fp32_masters(optimizer: Any) -> dict[int, torch.Tensor]:
    """bf16 without ZeRO: DeepSpeed's unfused optimizer keeps one fp32 copy per parameter,
    group by group (`fp16_groups[i][j]` <-> `fp32_groups[i][j]`). Empty for other optimizers."""
    low_groups = getattr(optimizer, "fp16_groups", None)
    high_groups = getattr(optimizer, "fp32_groups", None)
    if not low_groups or not high_groups or len(low_groups) != len(high_groups):
        return {}
    masters: dict[int, torch.Tensor] = {}
    for low, high in zip(low_groups, high_groups, strict=True):
        if not isinstance(low, (list, tuple)) or not isinstance(high, (list, tuple)) \
                or len(low) != len(high):
            return {}
        for p_low, p_high in zip(low, high, strict=True):
            if p_low.shape != p_high.shape:
                return {}
            masters[id(p_low)] = p_high
    return masters


def consolidated_state_dict(engine: Any) -> dict[str, torch.Tensor]:
    """The model's full fp32 state dict: master weights where DeepSpeed keeps them.

    Collective under ZeRO-3 (parameters are gathered), so every rank must call it.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    module = engine.module
    params = {id(p): p for p in module.parameters()}
    masters: dict[int, torch.Tensor] | None = None
    out: dict[str, torch.Tensor] = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        if id(tensor) in params:
            full = safe_get_full_fp32_param(tensor)  # ZeRO 1-3 and the bf16 ZeRO optimizer
            if full is None:
                if masters is None:
                    masters = _unfused_fp32_masters(getattr(engine, "optimizer", None))
                full = masters.get(id(tensor), tensor)
            tensor = full
        tensor = tensor.detach()
        if tensor.is_floating_point():
            tensor = tensor.float()
        out[name] = tensor.cpu().clone().contiguous()
    return out


def save_weights(path: Path, state: dict[str, torch.Tensor]) -> None:
    """`state` as a safetensors file, atomically."""
    from safetensors.torch import save

    atomic_write_bytes(path, save(state))


# --------------------------------------------------------------------------- epoch RNG
def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of one worker's epoch: its dropout, drop-path and augmentation draws."""
    return (seed * 1_000_003 + epoch * 7_919 + rank * 104_729) % (2**63 - 1)


@contextlib.contextmanager
def epoch_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Run the block on torch's and Python's RNGs seeded with `seed`, then give them back.

    Dropout and drop-path draw from torch's default generator (nn.Dropout takes no generator),
    so an epoch's draws are made reproducible by seeding it for the epoch only, inside
    `torch.random.fork_rng`; the process's RNG state is as before afterwards.
    """
    devices = [device.index or 0] if device.type == "cuda" else []
    python_state = random.getstate()
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        random.seed(seed)
        try:
            yield
        finally:
            random.setstate(python_state)


# --------------------------------------------------------------------------- the harness
@dataclass
class EpochContext:
    """What an `EpochJob`'s hooks are given: the engine and where it runs."""

    engine: Any
    loaders: Any
    setup: WorkerSetup
    device: torch.device
    input_dtype: torch.dtype
    folder: Path

    @property
    def rank0(self) -> bool:
        return self.setup.rank == 0


class EpochJob(ABC):
    """One kind of checkpointed training run, as `run_epochs` drives it.

    Contract: `run_epochs` calls, on every rank, `read_state` (when resuming) and
    `check_resumable`, `clear` / `on_prepared` (rank 0 only), `data_spec`, `build_model`,
    `start` once the checkpoint is restored, then per remaining epoch `train_epoch` (inside the
    epoch's RNG), `epoch_line`, `after_checkpoint` (collective: it may gather weights) and
    `report_line`; with no epoch left to train, `nothing_left` instead.

    Attributes:
        training: the recipe (epochs, seed, batch, optimizer, ZeRO, bf16).
        folder: where the run lives (shared by all workers).
        subnets_per_step: forward/backward passes per batch; DeepSpeed accumulates their
            gradients and steps once per batch.
        checkpoint_name, start_over: words of the message when a checkpoint cannot be loaded.
    """

    training: TrainingConfig
    folder: Path
    subnets_per_step: int = 1
    checkpoint_name: str = "checkpoint"
    start_over: str = "start over"

    @abstractmethod
    def read_state(self) -> Any | None:
        """The folder's last complete checkpoint state (`tag`, `epoch`, `metrics`), or None."""

    @abstractmethod
    def check_resumable(self, state: Any, world_size: int) -> None:
        """Raise `ConfigError` if `state` was trained differently from this run."""

    @abstractmethod
    def state_fields(self) -> dict[str, Any]:
        """What was trained, stored in `state.json` beside the recipe (e.g. `arch`)."""

    @abstractmethod
    def data_spec(self) -> ArchSpec:
        """The architecture whose input size and channels the data is built for."""

    @abstractmethod
    def build_model(self) -> nn.Module:
        """The model, with the same weights on every worker (from the recipe's seed)."""

    @abstractmethod
    def train_epoch(self, ctx: EpochContext, epoch: int) -> Any:
        """Train one epoch on this worker's shard; returns what `epoch_line` needs."""

    @abstractmethod
    def epoch_line(self, ctx: EpochContext, epoch: int, stats: Any,
                   wall_s: float) -> dict[str, Any]:
        """The epoch's `metrics.jsonl` line (evaluating as needed); `wall_s`: training time."""

    def clear(self) -> None:
        """Rank 0, starting over: delete the folder's earlier training state."""
        shutil.rmtree(self.folder / CHECKPOINT_DIR, ignore_errors=True)
        (self.folder / METRICS_FILE).unlink(missing_ok=True)

    def on_prepared(self) -> None:
        """Rank 0, once the folder is prepared (resumed or cleared)."""
        return None

    def start(self, ctx: EpochContext) -> None:
        """Every rank, once the engine is built and the checkpoint restored."""
        return None

    def after_checkpoint(self, ctx: EpochContext, epoch: int) -> None:
        """Every rank, after epoch `epoch`'s checkpoint and before its line is logged."""
        return None

    def report_line(self, line: dict[str, Any]) -> dict[str, Any]:
        """What `report` is given for an epoch's line."""
        return line

    def nothing_left(self, ctx: EpochContext, history: list[dict[str, Any]],
                     report: Callable[[dict[str, Any]], None] | None) -> None:
        """Every rank, when the checkpoint already holds the whole budget."""
        return None


def _prepare_folder(job: EpochJob, setup: WorkerSetup, resume: bool) -> Any | None:
    """Clear a failed or restarted run's folder (or keep its last checkpoint) on rank 0; every
    rank returns the checkpoint state to resume from."""
    rank0 = setup.rank == 0
    if rank0:
        job.folder.mkdir(parents=True, exist_ok=True)
        (job.folder / FAILURE_FILE).unlink(missing_ok=True)
    state = job.read_state() if resume else None
    if state is not None:
        job.check_resumable(state, setup.world_size)
    dist.barrier()  # nobody reads the folder while rank 0 clears it below
    if rank0:
        if state is None:
            job.clear()
        else:
            remove_other_tags(job.folder / CHECKPOINT_DIR, keep=state.tag)
        job.on_prepared()
    return state


def _build_data(job: EpochJob, setup: WorkerSetup) -> tuple[Any, dict[str, Any], list[Any]]:
    """This worker's loaders, the DeepSpeed config (written by rank 0) and every rank's shard."""
    training = job.training
    data = build_datasets(training, job.data_spec())
    micro = micro_batch_size(training, setup.world_size)
    loaders = build_loaders(data, micro_batch_size=micro, rank=setup.rank,
                            world_size=setup.world_size, seed=training.seed)
    ds_config = build_ds_config(training, world_size=setup.world_size,
                                steps_per_epoch=loaders.steps_per_epoch)
    if job.subnets_per_step > 1:
        # One micro-step per subnet on the same batch: DeepSpeed averages their gradients and
        # steps once per batch, so the schedule's length is unchanged.
        ds_config["gradient_accumulation_steps"] = job.subnets_per_step
        ds_config["train_batch_size"] = micro * job.subnets_per_step * setup.world_size
    if setup.rank == 0:
        write_ds_config(ds_config, job.folder / DS_CONFIG_FILE)
    # What each worker trains on, recorded in the checkpoint state for inspection.
    shards: list[Any] = [None] * setup.world_size
    dist.all_gather_object(shards, {
        "rank": setup.rank, "train_images": len(loaders.train_sampler),
        "steps_per_epoch": loaders.steps_per_epoch,
        "val_images": len(loaders.val.dataset.indices)})
    return loaders, ds_config, shards


def _build_engine(job: EpochJob, device: torch.device, ds_config: dict[str, Any]) -> Any:
    """The job's model in a DeepSpeed engine on `device` (not DeepSpeed's `cuda:$LOCAL_RANK`)."""
    import deepspeed
    from timm.optim import param_groups_weight_decay

    model = job.build_model()
    # No weight decay on norms, biases, embeddings and the priors: decaying the `mlp` prior's
    # output bias (initialised to 1) would pull SP towards 0, i.e. towards uniform attention,
    # over a long schedule.
    param_groups = param_groups_weight_decay(
        model, job.training.weight_decay, no_weight_decay_list=model.no_weight_decay())
    engine, _, _, _ = deepspeed.initialize(args=deepspeed_device_args(device), model=model,
                                           model_parameters=param_groups, config=ds_config,
                                           dist_init_required=False)
    return engine


def _restore(job: EpochJob, ctx: EpochContext, state: Any | None
             ) -> tuple[int, list[dict[str, Any]]]:
    """Load the checkpoint `state` names; return (epochs done, their metrics)."""
    if state is None:
        return 0, []
    ckpt = job.folder / CHECKPOINT_DIR
    ctx.engine.checkpoint_engine = _weights_only_checkpoint_engine()
    load_path, client = ctx.engine.load_checkpoint(str(ckpt), tag=state.tag)
    if load_path is None or (client or {}).get("epoch") != state.epoch:
        raise ConfigError(f"the {job.checkpoint_name} {ckpt / state.tag} could not be loaded."
                          f" Delete {ckpt} to {job.start_over}.")
    history = list(state.metrics)
    if ctx.rank0:
        write_metrics(job.folder, history)
    return state.epoch, history


def _save_checkpoint(job: EpochJob, ctx: EpochContext, epoch: int,
                     history: list[dict[str, Any]], shards: list[Any]) -> None:
    ckpt = job.folder / CHECKPOINT_DIR
    tag = f"epoch_{epoch:04d}"
    # Collective: every rank writes its shard; DeepSpeed ends with a barrier, so after it the
    # tag folder is complete on disk and rank 0 may point at it.
    ctx.engine.save_checkpoint(str(ckpt), tag=tag, client_state={"epoch": epoch},
                               save_latest=False)
    if ctx.rank0:
        atomic_write_json(ckpt / STATE_FILE, {
            "tag": tag, "epoch": epoch, "world_size": ctx.setup.world_size,
            "training": job.training.to_dict(), **job.state_fields(), "metrics": history,
            "shards": shards,
        })
        atomic_write_text(ckpt / LATEST_FILE, tag)
        remove_other_tags(ckpt, keep=tag)


def _train_epochs(job: EpochJob, ctx: EpochContext, shards: list[Any], start_epoch: int,
                  history: list[dict[str, Any]],
                  report: Callable[[dict[str, Any]], None] | None) -> None:
    """Train, evaluate, checkpoint, log and report each remaining epoch (appends to
    `history`). `after_checkpoint` runs before the epoch is reported, because a scheduler may
    stop the run on that report (ASHA stops every trial that reaches its `max_t`) and nothing
    after it would run."""
    training, setup = job.training, ctx.setup
    wall_before = history[-1]["wall_s"] if history else 0.0
    run_start = time.perf_counter()
    for epoch in range(start_epoch + 1, training.epochs + 1):
        with epoch_rng(epoch_seed(training.seed, epoch, setup.rank), ctx.device):
            ctx.loaders.set_epoch(epoch)  # a folder dataset seeds its transforms here, in the fork
            stats = job.train_epoch(ctx, epoch)
        line = job.epoch_line(ctx, epoch, stats, wall_before + time.perf_counter() - run_start)
        history.append(line)
        _save_checkpoint(job, ctx, epoch, history, shards)
        job.after_checkpoint(ctx, epoch)
        if ctx.rank0:
            append_metrics(job.folder, line)
        if report is not None:
            report(job.report_line(line))
    if start_epoch >= training.epochs and history:
        job.nothing_left(ctx, history, report)


def run_epochs(job: EpochJob, *, setup: WorkerSetup = WorkerSetup(), resume: bool = True,
               report: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any] | None:
    """Train `job` for `job.training.epochs` epochs as worker `setup.rank` of
    `setup.world_size`; returns the last epoch's metrics line (None only if there were no
    epochs to run and no history).

    Args:
        job: what is trained and how one epoch goes.
        setup: this worker's rank, device and threads.
        resume: continue from the folder's checkpoint if it holds one; otherwise start over.
        report: called on every rank after every epoch with `job.report_line(line)`.

    Raises:
        ConfigError: bf16 on a GPU without bf16 arithmetic, or a checkpoint of another run.
        TrainingDiverged: the loss became NaN/inf (`failure.json` is written first).
    """
    # Per-step INFO lines are noise, and WarmupCosineLR warns on every construction that it is
    # asked for a learning rate "before it has started" (it initialises the optimizer so).
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    torch.set_num_threads(max(1, setup.threads))
    device = torch.device(setup.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        input_dtype = model_input_dtype(job.training.bf16, device)  # before anything is built
        state = _prepare_folder(job, setup, resume)
        loaders, ds_config, shards = _build_data(job, setup)
        ctx = EpochContext(engine=_build_engine(job, device, ds_config), loaders=loaders,
                           setup=setup, device=device, input_dtype=input_dtype,
                           folder=job.folder)
        start_epoch, history = _restore(job, ctx, state)
        job.start(ctx)
        _train_epochs(job, ctx, shards, start_epoch, history, report)
        del ctx
        gc.collect()
        return history[-1] if history else None
    except Exception as e:
        # Not BaseException: Tune stops an early-stopped trial with SystemExit from its
        # report(), and Ctrl-C is an interruption; neither is a failure of the run.
        if setup.rank == 0 and job.folder.is_dir():
            write_failure(job.folder, failure_reason(e))
        raise
