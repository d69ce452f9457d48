"""Training a weight-sharing supernet with DeepSpeed: the sandwich rule with in-place distillation.

`train_supernet(space, out, ...)` is what `spvit-nas supernet train` calls. One worker trains in
this process on a one-process gloo (GPU: nccl) group, as a one-worker trial does
(`launch.worker.ensure_local_process_group`); several run under a Ray Train `TorchTrainer`, each
on its own data shard (`nas.data.build_loaders`), DeepSpeed reusing Ray Train's process group.
ZeRO stage and bf16 come from the space's `training:` block (ZeRO-3 is refused: it partitions
the very tensors the supernet slices).

A worker is the checkpointed-epoch harness of trials (`launch.harness.run_epochs`: the folder,
the engine on the worker's own device, bf16 only where the device computes it, the checkpoints,
the per-epoch RNG and the resume) with the supernet's epoch (`_SupernetJob`):
`nas.sandwich.train_sandwich_epoch` trains the subnets of
`nas.oneshot.SandwichSampler.step(epoch, step)` on each batch, every one of them feasible: the
largest with cross-entropy on the labels, the smallest and the random ones against the largest's
(detached) soft predictions (in-place distillation), or on the labels too during the first
`label_epochs` epochs. DeepSpeed accumulates their gradients (`gradient_accumulation_steps` =
subnets per step, so the loss is their mean) and steps the optimizer and the cosine schedule once.

The folder (`--out`): `space.yaml` (the resolved space), `supernet.json` (choices, the sandwich's
largest / smallest subnets, epochs trained), `ds_config.json`, `metrics.jsonl` (per epoch:
`epoch`, `train_loss` (the largest subnet's), `distill_loss`, `val_acc_largest`,
`val_acc_smallest`, `lr`, `images_per_s`, `wall_s`), `checkpoint/` (DeepSpeed tag of the last
epoch with its optimizer and schedule state, plus `state.json` with each worker's shard) and
`supernet.safetensors` (fp32 weights, rewritten after every epoch so a partly trained supernet
can already score).
`--resume` continues at the epoch after the checkpoint's, up to the epochs the folder records
(`supernet.json`'s `epochs`) unless the caller changes them; it refuses a folder without a
checkpoint. The `--out` is checked by `nas.outputs.check_output` first: a search's run folder,
a trial folder, an export, or a folder inside one of them is refused.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from nas.engine import evaluate
from nas.layout import SupernetDir
from nas.oneshot import (
    SandwichSampler,
    space_identity,
    supernet_choices,
    write_supernet_info,
)
from nas.sandwich import ActiveSubnet, SandwichStats, train_sandwich_epoch
from search_spaces.space import SearchSpace
from spvit.arch import ArchSpec
from spvit.errors import ConfigError
from spvit.io import read_json_lines

from .harness import (
    EpochContext,
    EpochJob,
    WorkerSetup,
    consolidated_state_dict,
    ensure_local_process_group,
    remove_other_tags,
    run_epochs,
    save_weights,
)

# Recipe fields that may change between a checkpoint and the run resuming it.
_RESUMABLE_CHANGES = ("epochs", "workers_per_trial")


@dataclass(frozen=True)
class SupernetState:
    """`checkpoint/state.json` of a supernet folder."""

    tag: str
    epoch: int
    world_size: int
    training: dict[str, Any]
    space: dict[str, Any]
    metrics: list[dict[str, Any]]
    shards: list[dict[str, int]] = dataclasses.field(default_factory=list)


def read_state(out: str | os.PathLike) -> SupernetState | None:
    """The last complete checkpoint of a supernet folder, or None."""
    folder = SupernetDir(out)
    ckpt, path = folder.checkpoint, folder.checkpoint_state
    if not path.is_file():
        return None
    try:
        state = SupernetState(**json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as e:
        raise ConfigError(f"checkpoint state {path} is not a readable supernet checkpoint"
                          f" ({e}); the folder cannot be continued. Choose another --out to"
                          " train a supernet from scratch.") from None
    if not (ckpt / state.tag).is_dir():
        raise ConfigError(f"checkpoint state {path} names tag {state.tag!r}, which is missing;"
                          " the folder cannot be continued. Choose another --out to train a"
                          " supernet from scratch.")
    return state


def target_epochs(out: str | os.PathLike) -> int | None:
    """The epochs a supernet folder was started for: `supernet.json`'s `epochs`, else (folders
    written before it was recorded) its checkpoint's recipe; None if the folder records none."""
    try:
        info = json.loads(SupernetDir(out).info.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        info = None
    epochs = info.get("epochs") if isinstance(info, dict) else None
    if isinstance(epochs, int) and not isinstance(epochs, bool) and epochs >= 1:
        return epochs
    try:
        state = read_state(out)
    except ConfigError:
        return None  # `train_supernet` refuses the folder with its reason
    epochs = state.training.get("epochs") if state is not None else None
    return epochs if isinstance(epochs, int) and not isinstance(epochs, bool) else None


def check_resumable(state: SupernetState, space: SearchSpace, world_size: int) -> None:
    """`ConfigError` if the checkpoint was trained on another space or recipe."""
    if state.space != space_identity(space):
        raise ConfigError("the supernet checkpoint was trained on another search space (its"
                          " fixed fields or dimensions differ). Resume with the folder's"
                          " space.yaml or train into a new --out.")
    now = space.training.to_dict()
    for key, then in state.training.items():
        if key not in _RESUMABLE_CHANGES and now.get(key) != then:
            raise ConfigError(f"the supernet checkpoint was trained with training.{key}="
                              f"{then!r}, but this run has {now.get(key)!r}. Resume with the"
                              " same recipe (only epochs may change) or use a new --out.")
    if world_size != state.world_size and space.training.zero_stage > 0:
        raise ConfigError(f"the checkpoint holds ZeRO-{space.training.zero_stage} optimizer"
                          f" shards of {state.world_size} workers, but this run has"
                          f" {world_size}. Resume with {state.world_size} workers.")


class _SupernetJob(EpochJob):
    """The supernet of `space` as the harness runs it: sandwich epochs, both extremes
    evaluated, the weights and `supernet.json` rewritten after every epoch."""

    def __init__(self, space: SearchSpace, out: Path, *, random_subnets: int,
                 label_epochs: int) -> None:
        self.space, self.training, self.folder = space, space.training, out
        self.files = SupernetDir(out)
        self.sampler = SandwichSampler(space, seed=space.training.seed,
                                       random_subnets=random_subnets)
        self.label_epochs = label_epochs
        self.subnets_per_step = self.sampler.per_step
        self.checkpoint_name, self.start_over = "supernet checkpoint", "train from scratch"

    def read_state(self) -> SupernetState | None:
        return read_state(self.folder)

    def check_resumable(self, state: SupernetState, world_size: int) -> None:
        check_resumable(state, self.space, world_size)

    def state_fields(self) -> dict[str, Any]:
        return {"space": space_identity(self.space)}

    def clear(self) -> None:
        # The space, supernet.json and failure.json are the caller's (`train_supernet`); only
        # the training state of an earlier, checkpoint-less start goes.
        remove_other_tags(self.files.checkpoint, keep=None)
        self.files.metrics.unlink(missing_ok=True)

    def data_spec(self) -> ArchSpec:
        return self.sampler.largest

    def build_model(self) -> nn.Module:
        from spvit.supernet import SPViTSupernet

        return SPViTSupernet(supernet_choices(self.space), seed=self.training.seed)

    def train_epoch(self, ctx: EpochContext, epoch: int) -> SandwichStats:
        return train_sandwich_epoch(ctx.engine, ctx.loaders.train, self.sampler, epoch=epoch,
                                    device=ctx.device, input_dtype=ctx.input_dtype,
                                    label_smoothing=self.training.label_smoothing,
                                    distill=epoch > self.label_epochs)

    def epoch_line(self, ctx: EpochContext, epoch: int, stats: SandwichStats,
                   wall_s: float) -> dict[str, Any]:
        val = {which: evaluate(ActiveSubnet(ctx.engine, spec), ctx.loaders.val,
                               device=ctx.device, input_dtype=ctx.input_dtype)
               for which, spec in (("largest", self.sampler.largest),
                                   ("smallest", self.sampler.smallest))}
        return {
            "epoch": epoch,
            "train_loss": stats.loss,
            "distill_loss": stats.distill_loss,
            "val_acc_largest": val["largest"].acc1,
            "val_acc_smallest": val["smallest"].acc1,
            "lr": float(ctx.engine.get_lr()[0]),
            "subnets_per_step": stats.subnets_per_step,
            "distilled": epoch > self.label_epochs,
            "images_per_s": stats.images_per_s,
            "wall_s": wall_s,
        }

    def after_checkpoint(self, ctx: EpochContext, epoch: int) -> None:
        # Every epoch, so that a partly trained supernet can already score.
        weights = consolidated_state_dict(ctx.engine)
        if ctx.rank0:
            save_weights(self.files.weights, weights)
            write_supernet_info(self.folder, self.space, self.sampler, epochs_trained=epoch,
                                extra={"epochs": self.training.epochs})


def train_supernet_worker(space: SearchSpace, out: str | os.PathLike, *,
                          setup: WorkerSetup = WorkerSetup(), resume: bool = False,
                          random_subnets: int = 2, label_epochs: int = 0,
                          report: Callable[[dict[str, Any]], None] | None = None
                          ) -> dict[str, Any] | None:
    """Train the supernet of `space` as worker `setup.rank` (the process group must exist).

    During the first `label_epochs` epochs every subnet learns from the labels; afterwards the
    smaller ones learn from the largest's predictions (in-place distillation).

    Returns the last epoch's metrics line (None if no epoch ran and none is recorded).

    Raises:
        ConfigError: bf16 on a GPU without bf16 arithmetic, or a checkpoint of another run.
        TrainingDiverged: a loss became NaN/inf (`failure.json` is written first).
    """
    job = _SupernetJob(space, Path(out), random_subnets=random_subnets,
                       label_epochs=label_epochs)
    return run_epochs(job, setup=setup, resume=resume, report=report)


def ray_supernet_loop(config: dict[str, Any]) -> None:
    """`train_loop_per_worker` of the supernet's `TorchTrainer`."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    setup = WorkerSetup(rank=ctx.get_world_rank(), world_size=ctx.get_world_size(),
                        local_rank=ctx.get_local_rank(), device=str(ray.train.torch.get_device()),
                        threads=int(config.get("threads", 1)))
    space = SearchSpace.from_dict(config["space"], check_feasible=False)
    train_supernet_worker(space, config["out"], setup=setup, resume=bool(config["resume"]),
                          random_subnets=int(config["random_subnets"]),
                          label_epochs=int(config.get("label_epochs", 0)),
                          report=ray.train.report)


def train_supernet(space: SearchSpace, out: str | os.PathLike, *, workers: int = 1,
                   resume: bool = False, use_gpu: bool = False, random_subnets: int = 2,
                   label_epochs: int = 0, cpus_per_worker: float = 1.0,
                   ray_address: str | None = None,
                   on_epoch: Callable[[dict[str, Any]], None] | None = None,
                   on_start: Callable[[int], None] | None = None) -> dict[str, Any] | None:
    """Train (or, with `resume`, continue) the supernet of `space` into `out`.

    `on_start(first_epoch)` is called once the request is checked, before training starts;
    `on_epoch(line)` after every epoch with its `metrics.jsonl` line.

    Raises `ConfigError` on bad input before anything is trained: a folder holding a
    checkpoint without `resume`, a checkpoint of another space or recipe, ZeRO-3, a batch
    that does not split over the workers.
    """
    from nas.data import check_compatible, describe_dataset
    from nas.ds_config import micro_batch_size
    from nas.outputs import check_output

    from .cmd_train import check_local_resources
    from .ray_env import resolve_address

    out = check_output(out, command="supernet", resume=resume)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"--workers must be an integer >= 1, but got {workers!r}."
                          " Use e.g. --workers 2.")
    if space.training.zero_stage >= 3:
        raise ConfigError("training.zero_stage 3 partitions the parameters the supernet slices"
                          " per subnet; use zero_stage 0, 1 or 2 for supernet training.")
    if isinstance(label_epochs, bool) or not isinstance(label_epochs, int) or label_epochs < 0:
        raise ConfigError(f"--label-epochs must be an integer >= 0, but got {label_epochs!r}."
                          " Use 0 to distil from the first epoch.")
    if random_subnets < 2:
        raise ConfigError(f"the sandwich rule trains at least 2 random subnets per step, but"
                          f" got {random_subnets}. Use --random-subnets 2 or more.")
    if isinstance(cpus_per_worker, bool) or not isinstance(cpus_per_worker, (int, float)) \
            or not math.isfinite(cpus_per_worker) or cpus_per_worker <= 0:
        raise ConfigError(f"--cpus-per-worker must be > 0, but got {cpus_per_worker!r}. Pass"
                          " e.g. --cpus-per-worker 1.")
    micro_batch_size(space.training, workers)
    if workers == 1 or resolve_address(ray_address) is None:
        # One worker trains in this process; several on a local instance need this machine's
        # CPUs/GPUs (Ray would wait for missing ones forever).
        check_local_resources(workers=workers, cpus_per_worker=cpus_per_worker,
                              use_gpu=use_gpu, flag="--workers")
    folder = SupernetDir(out)
    state = read_state(out)
    if state is not None and not resume:
        raise ConfigError(f"--out {out} already holds a supernet checkpoint (epoch"
                          f" {state.epoch}). Pass --resume to continue it, or choose another"
                          " --out.")
    if resume and state is None:
        raise ConfigError(f"--resume: {out} holds no supernet checkpoint to resume (no"
                          f" {folder.checkpoint_state.relative_to(out)}). Drop --resume to"
                          " train from scratch, or pass the folder an earlier `spvit-nas"
                          " supernet train` wrote.")
    if resume:
        check_resumable(state, space, workers)
    out.mkdir(parents=True, exist_ok=True)
    folder.failure.unlink(missing_ok=True)
    sampler = SandwichSampler(space, seed=space.training.seed, random_subnets=random_subnets)
    check_compatible(describe_dataset(space.training.dataset), sampler.largest)
    space.save(folder.space)
    # The target epochs are recorded, so that a resume without --epochs trains to them.
    write_supernet_info(out, space, sampler, epochs_trained=state.epoch if state else 0,
                        extra={"epochs": space.training.epochs})
    if on_start is not None:
        on_start(state.epoch + 1 if state else 1)
    if workers == 1:
        ensure_local_process_group("nccl" if use_gpu else "gloo")
        setup = WorkerSetup(device="cuda:0" if use_gpu else "cpu",
                            threads=max(1, math.floor(cpus_per_worker)))
        return train_supernet_worker(space, out, setup=setup, resume=resume,
                                     random_subnets=random_subnets,
                                     label_epochs=label_epochs, report=on_epoch)
    _train_ray(space, out, workers=workers, resume=resume, use_gpu=use_gpu,
               random_subnets=random_subnets, label_epochs=label_epochs,
               cpus_per_worker=cpus_per_worker,
               ray_address=ray_address)
    lines = read_json_lines(folder.metrics)
    if on_epoch is not None:
        for line in lines[state.epoch if state else 0:]:
            on_epoch(line)
    return lines[-1] if lines else None


def _train_ray(space: SearchSpace, out: Path, *, workers: int, resume: bool, use_gpu: bool,
               random_subnets: int, label_epochs: int, cpus_per_worker: float,
               ray_address: str | None) -> None:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from .ray_env import init_ray
    from .trial import check_cluster_resources

    started = not ray.is_initialized()
    if started:
        init_ray(ray_address)
    try:
        check_cluster_resources(workers=workers, cpus_per_worker=cpus_per_worker,
                                use_gpu=use_gpu)
    except ConfigError:
        if started:
            ray.shutdown()
        raise
    trainer = TorchTrainer(
        ray_supernet_loop,
        train_loop_config={"space": space.to_dict(), "out": str(out), "resume": resume,
                           "random_subnets": random_subnets, "label_epochs": label_epochs,
                           "threads": max(1, math.floor(cpus_per_worker))},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpus_per_worker}),
        run_config=RunConfig(name=f"supernet-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}",
                             storage_path=str(SupernetDir(out).ray_train)))
    try:
        trainer.fit()
    finally:
        if started:
            ray.shutdown()
