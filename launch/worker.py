"""The trial's worker: train one candidate on this worker's data shard, epoch by epoch.

`train_worker` is the same code on every worker and for both ways a trial runs (see
`launch.trial`): in the caller's process on a one-process gloo group (`ensure_local_process_group`),
or as the `train_loop_per_worker` of a Ray Train `TorchTrainer` (`ray_train_loop`), where DeepSpeed
reuses the process group Ray Train set up. It is the checkpointed-epoch harness
(`launch.harness.run_epochs`, which owns the folder, the engine on the worker's own device, the
checkpoints, the per-epoch RNG and the resume) with a trial's epoch (`_TrialJob`): per epoch it
trains (`nas.engine.train_one_epoch`), evaluates on the validation shards, saves a checkpoint,
appends a line to `metrics.jsonl` (rank 0) and calls `report` (every rank). After the last epoch,
before reporting it, it writes the consolidated fp32 weights (`model.safetensors`) and
`arch.yaml`: a scheduler that stops the trial on its last report must not leave a full-budget
trial without weights. `checkpoint/state.json` holds the epoch, the recipe, the architecture and
every epoch's metrics.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from nas.engine import EpochStats, TrainingDiverged, evaluate, train_one_epoch
from nas.layout import (  # noqa: F401  (the file names: launch.trial, .cmd_train, .search)
    CHECKPOINT_DIR,
    FAILURE_FILE,
    METRICS_FILE,
    WEIGHTS_FILE,
    TrialFolder,
)
from search_spaces.training import TrainingConfig
from spvit.arch import ArchSpec
from spvit.errors import ConfigError
from spvit.init import attention_mass_metrics

# The harness's names, imported from here by the trial runner, the CLI and the search.
from .harness import (  # noqa: F401
    EpochContext,
    EpochJob,
    WorkerSetup,
    consolidated_state_dict,
    ensure_local_process_group,
    epoch_rng,
    epoch_seed,
    failure_reason,
    run_epochs,
    save_weights,
    write_failure,
)

METRIC_KEYS = ("epoch", "val_acc", "val_acc5", "val_loss", "train_loss", "lr", "images_per_s",
               "wall_s", "startup_s")
# Added to every line of a model with an impulse init (`spvit.init.attention_mass_metrics`).
INIT_METRIC_KEYS = ("init_mass_min", "init_mass_mean", "init_heads_short")
# Added to the line of the last epoch of the full budget (the held-out test split, evaluated once).
TEST_METRIC_KEYS = ("test_acc", "test_acc5", "test_loss")

# Training fields that may differ between a checkpoint and the run resuming it: a longer or
# shorter budget stretches the cosine schedule from the restored step on.
_RESUMABLE_CHANGES = ("epochs", "workers_per_trial")


@dataclass(frozen=True)
class CheckpointState:
    """`checkpoint/state.json`: what the last complete checkpoint holds."""

    tag: str
    epoch: int
    world_size: int
    training: dict[str, Any]
    arch: dict[str, Any]
    metrics: list[dict[str, Any]]
    shards: list[dict[str, int]] = field(default_factory=list)


# --------------------------------------------------------------------------- checkpoint files
def read_checkpoint_state(trial_dir: str | os.PathLike) -> CheckpointState | None:
    """The last complete checkpoint of `trial_dir`, or None if it has none."""
    folder = TrialFolder(trial_dir)
    ckpt, path = folder.checkpoint, folder.checkpoint_state
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        state = CheckpointState(**raw)
    except (json.JSONDecodeError, TypeError) as e:
        raise ConfigError(f"checkpoint state {path} is unreadable ({e}). Delete"
                          f" {ckpt} to start the trial over.") from None
    if not (ckpt / state.tag).is_dir():
        raise ConfigError(f"checkpoint state {path} names tag {state.tag!r}, but {ckpt / state.tag}"
                          f" is missing. Delete {ckpt} to start the trial over.")
    return state


def check_resumable(state: CheckpointState, spec: ArchSpec, training: TrainingConfig,
                    world_size: int) -> None:
    """Raise `ConfigError` if the checkpoint was trained differently from this run."""
    if ArchSpec.from_dict(state.arch) != spec:
        raise ConfigError("the checkpoint was trained for a different architecture than the one"
                          " given. Resume with the checkpoint's arch.yaml or use a new output"
                          " folder.")
    now = training.to_dict()
    for key, then in state.training.items():
        if key not in _RESUMABLE_CHANGES and now.get(key) != then:
            raise ConfigError(
                f"the checkpoint was trained with training.{key}={then!r}, but this run has"
                f" {now.get(key)!r}. Resume with the same training settings (only epochs may"
                " change) or use a new output folder."
            )
    if world_size != state.world_size and training.zero_stage > 0:
        raise ConfigError(
            f"the checkpoint holds ZeRO-{training.zero_stage} optimizer shards of"
            f" {state.world_size} workers, but this run has {world_size}. Resume with"
            f" {state.world_size} workers."
        )


def clear_trial(trial_dir: str | os.PathLike) -> None:
    """Delete a trial folder's training state (checkpoint, metrics, weights) to start over."""
    folder = TrialFolder(trial_dir)
    shutil.rmtree(folder.checkpoint, ignore_errors=True)
    for path in (folder.metrics, folder.weights):
        path.unlink(missing_ok=True)


# --------------------------------------------------------------------------- the trial's epoch
class _TrialJob(EpochJob):
    """A trial as the harness runs it: `spec` trained with `nas.engine.train_one_epoch`."""

    def __init__(self, spec: ArchSpec, training: TrainingConfig, trial_dir: Path, *,
                 started_at: float) -> None:
        self.spec, self.training, self.folder = spec, training, trial_dir
        self.files = TrialFolder(trial_dir)
        self.started_at = started_at
        self.checkpoint_name, self.start_over = "checkpoint", "start the trial over"
        self.init_metrics: dict[str, float] = {}
        self.startup: list[float] = []

    def read_state(self) -> CheckpointState | None:
        return read_checkpoint_state(self.folder)

    def check_resumable(self, state: CheckpointState, world_size: int) -> None:
        check_resumable(state, self.spec, self.training, world_size)

    def state_fields(self) -> dict[str, Any]:
        return {"arch": self.spec.to_flat()}

    def clear(self) -> None:
        clear_trial(self.folder)

    def on_prepared(self) -> None:
        self.spec.save(self.files.arch)

    def data_spec(self) -> ArchSpec:
        return self.spec

    def build_model(self) -> nn.Module:
        import spvit

        return spvit.create_model(self.spec, seed=self.training.seed)

    def start(self, ctx: EpochContext) -> None:
        # The attention mass an impulse init reached per head (empty for other inits), kept in
        # every epoch's line so a candidate whose heads fell short of the target can be told
        # apart.
        self.init_metrics = attention_mass_metrics(ctx.engine.module)

    def train_epoch(self, ctx: EpochContext, epoch: int) -> EpochStats:
        def first_step(step: int, loss: float) -> None:
            if not self.startup:
                self.startup.append(time.time() - self.started_at)

        return train_one_epoch(ctx.engine, ctx.loaders.train, epoch=epoch, device=ctx.device,
                               input_dtype=ctx.input_dtype,
                               label_smoothing=self.training.label_smoothing,
                               on_step=None if self.startup else first_step)

    def epoch_line(self, ctx: EpochContext, epoch: int, stats: EpochStats,
                   wall_s: float) -> dict[str, Any]:
        val = evaluate(ctx.engine, ctx.loaders.val, device=ctx.device,
                       input_dtype=ctx.input_dtype)
        line = {
            "epoch": epoch,
            "val_acc": val.acc1,
            "val_acc5": val.acc5,
            "val_loss": val.loss,
            "train_loss": stats.loss,
            "lr": stats.lr,
            "images_per_s": stats.images_per_s,
            "wall_s": wall_s,
            "startup_s": self.startup[0],  # every epoch has >= 1 step (build_loaders)
            **self.init_metrics,
        }
        if epoch == self.training.epochs and ctx.loaders.test is not None:
            # The held-out split, once, after the full budget: reported beside the front, never
            # an objective (the sampler and schedulers read `val_acc` only).
            test = evaluate(ctx.engine, ctx.loaders.test, device=ctx.device,
                            input_dtype=ctx.input_dtype)
            line.update(test_acc=test.acc1, test_acc5=test.acc5, test_loss=test.loss)
        return line

    def after_checkpoint(self, ctx: EpochContext, epoch: int) -> None:
        if epoch == self.training.epochs:
            self._write_final(ctx)

    def report_line(self, line: dict[str, Any]) -> dict[str, Any]:
        return {**line, "fidelity": line["epoch"]}

    def nothing_left(self, ctx: EpochContext, history: list[dict[str, Any]],
                     report: Callable[[dict[str, Any]], None] | None) -> None:
        # Nothing left to train: write the weights of the checkpoint and tell the caller where
        # the trial stands.
        self._write_final(ctx)
        if report is not None:
            report(self.report_line(history[-1]))

    def _write_final(self, ctx: EpochContext) -> None:
        """The consolidated fp32 weights and arch.yaml (collective under ZeRO-3)."""
        weights = consolidated_state_dict(ctx.engine)
        if ctx.rank0:
            save_weights(self.files.weights, weights)
            self.spec.save(self.files.arch)


def train_worker(spec: ArchSpec, training: TrainingConfig, trial_dir: str | os.PathLike, *,
                 setup: WorkerSetup = WorkerSetup(), resume: bool = True,
                 started_at: float | None = None,
                 report: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any] | None:
    """Train `spec` for `training.epochs` epochs as worker `setup.rank` of `setup.world_size`.

    The process group must exist (Ray Train's, or `ensure_local_process_group`). Returns the
    last epoch's metrics (None only if there were no epochs to run and no history). The steps
    are the harness's (`launch.harness.run_epochs`): prepare the folder, build the data, build
    the engine, restore the checkpoint, train the remaining epochs, write the final weights.

    Args:
        spec, training: what to train and how.
        trial_dir: the trial folder (shared by all workers).
        setup: this worker's rank, device and threads.
        resume: continue from `trial_dir/checkpoint` if it holds one; otherwise start over.
        started_at: `time.time()` when the trial was requested; the first step's delay from it
            is reported as `startup_s`.
        report: called on every rank after every epoch with the epoch's metrics plus
            `fidelity` (epochs completed).

    Raises:
        ConfigError: bf16 on a GPU without bf16 arithmetic, or a checkpoint of another run.
        TrainingDiverged: the loss became NaN/inf (`failure.json` is written first).
    """
    job = _TrialJob(spec, training, Path(trial_dir),
                    started_at=time.time() if started_at is None else started_at)
    return run_epochs(job, setup=setup, resume=resume, report=report)


def ray_train_loop(config: dict[str, Any]) -> None:
    """`train_loop_per_worker` of the trial's `TorchTrainer`.

    `config`: `arch` (flat ArchSpec), `training` (TrainingConfig dict), `trial_dir`, `resume`,
    `started_at`, `threads`. A diverged loss returns normally after `failure.json` is written:
    it would diverge again, so Ray Train must not spend its retries (`FailureConfig`) on it;
    other errors propagate and are retried from the last checkpoint.
    """
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    setup = WorkerSetup(rank=ctx.get_world_rank(), world_size=ctx.get_world_size(),
                        local_rank=ctx.get_local_rank(),
                        device=str(ray.train.torch.get_device()),
                        threads=int(config.get("threads", 1)))
    try:
        train_worker(ArchSpec.from_dict(config["arch"]),
                     TrainingConfig.from_dict(config["training"]), config["trial_dir"],
                     setup=setup, resume=bool(config.get("resume", True)),
                     started_at=config.get("started_at"), report=ray.train.report)
    except TrainingDiverged:
        return
