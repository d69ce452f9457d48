"""The DeepSpeed worker loop: train one candidate on this worker's data shard, epoch by epoch.

`train_worker` is the same code on every worker and for both ways a trial runs (see
`launch.trial`): in the caller's process on a one-process gloo group (`ensure_local_process_group`),
or as the `train_loop_per_worker` of a Ray Train `TorchTrainer` (`ray_train_loop`), where DeepSpeed
reuses the process group Ray Train set up. Per epoch it trains, evaluates on the validation shards,
saves a DeepSpeed checkpoint, appends a line to `metrics.jsonl` (rank 0) and calls `report` (every
rank; Ray Train's `report` is a barrier). After the last epoch, before reporting it, it writes
the consolidated fp32 weights (`model.safetensors`) and `arch.yaml`: a scheduler that stops the
trial on its last report must not leave a full-budget trial without weights.

Checkpoints (`TRIAL/checkpoint/`): DeepSpeed writes tag folder `epoch_NNNN`; only when every
rank has finished (DeepSpeed's closing barrier) does rank 0 replace `state.json` (the epoch, the
recipe, the architecture and every epoch's metrics) and DeepSpeed's `latest` pointer, both
atomically, and delete older tags. A kill mid-save leaves the previous tag and pointers intact; the
next start deletes the partial folder. Resuming loads the tag `state.json` names, rewrites
`metrics.jsonl` from its history and continues at the next epoch; the data order, augmentation and
dropout draws of an epoch depend only on (seed, epoch, rank), so a resumed run repeats exactly what
an uninterrupted one would have done.
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from timm.optim import param_groups_weight_decay

from nas.data import build_datasets, build_loaders
from nas.ds_config import build_ds_config, deepspeed_device_args, micro_batch_size, write_ds_config
from nas.engine import TrainingDiverged, evaluate, model_input_dtype, train_one_epoch
from search_spaces.training import TrainingConfig
from spvit.arch import ArchSpec
from spvit.errors import ConfigError
from spvit.init import attention_mass_metrics
from spvit.io import atomic_write_bytes, atomic_write_json, atomic_write_text

CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "state.json"
LATEST_FILE = "latest"
METRICS_FILE = "metrics.jsonl"
FAILURE_FILE = "failure.json"
WEIGHTS_FILE = "model.safetensors"
ARCH_FILE = "arch.yaml"
DS_CONFIG_FILE = "ds_config.json"
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
class WorkerSetup:
    """Where one worker sits in its trial.

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
    ckpt = Path(trial_dir) / CHECKPOINT_DIR
    path = ckpt / STATE_FILE
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


def _save_checkpoint(engine: Any, trial_dir: Path, epoch: int, world_size: int,
                     training: TrainingConfig, spec: ArchSpec, history: list[dict[str, Any]],
                     shards: list[dict[str, int]], rank: int) -> None:
    ckpt = trial_dir / CHECKPOINT_DIR
    tag = f"epoch_{epoch:04d}"
    # Collective: every rank writes its shard; DeepSpeed ends with a barrier, so after it the
    # tag folder is complete on disk and rank 0 may point at it.
    engine.save_checkpoint(str(ckpt), tag=tag, client_state={"epoch": epoch}, save_latest=False)
    if rank == 0:
        atomic_write_json(ckpt / STATE_FILE, {
            "tag": tag, "epoch": epoch, "world_size": world_size,
            "training": training.to_dict(), "arch": spec.to_flat(), "metrics": history,
            "shards": shards,
        })
        atomic_write_text(ckpt / LATEST_FILE, tag)
        _remove_other_tags(ckpt, keep=tag)


def _remove_other_tags(ckpt: Path, keep: str | None) -> None:
    if not ckpt.is_dir():
        return
    for entry in ckpt.iterdir():
        if entry.is_dir() and entry.name != keep:
            shutil.rmtree(entry, ignore_errors=True)


def clear_trial(trial_dir: str | os.PathLike) -> None:
    """Delete a trial folder's training state (checkpoint, metrics, weights) to start over."""
    trial_dir = Path(trial_dir)
    shutil.rmtree(trial_dir / CHECKPOINT_DIR, ignore_errors=True)
    for name in (METRICS_FILE, WEIGHTS_FILE):
        (trial_dir / name).unlink(missing_ok=True)


def _write_metrics(trial_dir: Path, history: list[dict[str, Any]]) -> None:
    atomic_write_text(trial_dir / METRICS_FILE,
                      "".join(json.dumps(line) + "\n" for line in history))


def _append_metrics(trial_dir: Path, line: dict[str, Any]) -> None:
    with open(trial_dir / METRICS_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_failure(trial_dir: str | os.PathLike, reason: str) -> None:
    """Record why a trial failed (`failure.json`), atomically."""
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


def _save_weights(path: Path, state: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save

    atomic_write_bytes(path, save(state))


# --------------------------------------------------------------------------- the loop
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


@dataclass
class _Run:
    """What the steps of `train_worker` share."""

    spec: ArchSpec
    training: TrainingConfig
    trial_dir: Path
    setup: WorkerSetup
    device: torch.device
    started_at: float
    report: Callable[[dict[str, Any]], None] | None

    @property
    def rank0(self) -> bool:
        return self.setup.rank == 0


def _prepare_folder(run: _Run, resume: bool) -> CheckpointState | None:
    """Clear a failed or restarted trial's folder (or keep its last checkpoint) on rank 0; every
    rank returns the checkpoint to resume from."""
    if run.rank0:
        run.trial_dir.mkdir(parents=True, exist_ok=True)
        (run.trial_dir / FAILURE_FILE).unlink(missing_ok=True)
    state = read_checkpoint_state(run.trial_dir) if resume else None
    if state is not None:
        check_resumable(state, run.spec, run.training, run.setup.world_size)
    dist.barrier()  # nobody reads the folder while rank 0 clears it below
    if run.rank0:
        if state is None:
            clear_trial(run.trial_dir)
        else:
            _remove_other_tags(run.trial_dir / CHECKPOINT_DIR, keep=state.tag)
        run.spec.save(run.trial_dir / ARCH_FILE)
    return state


def _build_data(run: _Run) -> tuple[Any, dict[str, Any], list[Any]]:
    """This worker's loaders, the DeepSpeed config (written by rank 0) and every rank's shard."""
    setup, training = run.setup, run.training
    data = build_datasets(training, run.spec)
    loaders = build_loaders(data, micro_batch_size=micro_batch_size(training, setup.world_size),
                            rank=setup.rank, world_size=setup.world_size, seed=training.seed)
    ds_config = build_ds_config(training, world_size=setup.world_size,
                                steps_per_epoch=loaders.steps_per_epoch)
    if run.rank0:
        write_ds_config(ds_config, run.trial_dir / DS_CONFIG_FILE)
    # What each worker trains on, recorded in the checkpoint state for inspection.
    shards: list[Any] = [None] * setup.world_size
    dist.all_gather_object(shards, {
        "rank": setup.rank, "train_images": len(loaders.train_sampler),
        "steps_per_epoch": loaders.steps_per_epoch,
        "val_images": len(loaders.val.dataset.indices)})
    return loaders, ds_config, shards


def _build_engine(run: _Run, ds_config: dict[str, Any]) -> Any:
    """The model (same weights on every worker, from the recipe's seed) in a DeepSpeed engine."""
    import deepspeed

    import spvit

    model = spvit.create_model(run.spec, seed=run.training.seed)
    # No weight decay on norms, biases, embeddings and the priors: decaying the `mlp` prior's
    # output bias (initialised to 1) would pull SP towards 0, i.e. towards uniform attention,
    # over a long schedule.
    param_groups = param_groups_weight_decay(
        model, run.training.weight_decay, no_weight_decay_list=model.no_weight_decay())
    engine, _, _, _ = deepspeed.initialize(args=deepspeed_device_args(run.device), model=model,
                                           model_parameters=param_groups, config=ds_config,
                                           dist_init_required=False)
    return engine


def _restore(run: _Run, engine: Any, state: CheckpointState | None
             ) -> tuple[int, list[dict[str, Any]]]:
    """Load the checkpoint `state` names; return (epochs done, their metrics)."""
    if state is None:
        return 0, []
    ckpt = run.trial_dir / CHECKPOINT_DIR
    engine.checkpoint_engine = _weights_only_checkpoint_engine()
    load_path, client = engine.load_checkpoint(str(ckpt), tag=state.tag)
    if load_path is None or (client or {}).get("epoch") != state.epoch:
        raise ConfigError(f"the checkpoint {ckpt / state.tag} could not be loaded. Delete"
                          f" {ckpt} to start the trial over.")
    history = list(state.metrics)
    if run.rank0:
        _write_metrics(run.trial_dir, history)
    return state.epoch, history


def _train_epochs(run: _Run, engine: Any, loaders: Any, shards: list[Any], start_epoch: int,
                  history: list[dict[str, Any]]) -> None:
    """Train, evaluate, checkpoint, log and report each remaining epoch (appends to
    `history`); the final weights are written before the last epoch is reported, because a
    scheduler may stop the trial on that report (ASHA stops every trial that reaches its
    `max_t`) and nothing after it would run."""
    training, setup = run.training, run.setup
    input_dtype = model_input_dtype(training.bf16, run.device)
    # The attention mass an impulse init reached per head (empty for other inits), kept in every
    # epoch's line so a candidate whose heads fell short of the target can be told apart.
    init_metrics = attention_mass_metrics(engine.module)
    wall_before = history[-1]["wall_s"] if history else 0.0
    run_start = time.perf_counter()
    startup: list[float] = []

    def first_step(step: int, loss: float) -> None:
        if not startup:
            startup.append(time.time() - run.started_at)

    for epoch in range(start_epoch + 1, training.epochs + 1):
        with epoch_rng(epoch_seed(training.seed, epoch, setup.rank), run.device):
            loaders.set_epoch(epoch)  # a folder dataset seeds its transforms here, in the fork
            stats = train_one_epoch(engine, loaders.train, epoch=epoch, device=run.device,
                                    input_dtype=input_dtype,
                                    label_smoothing=training.label_smoothing,
                                    on_step=None if startup else first_step)
        val = evaluate(engine, loaders.val, device=run.device, input_dtype=input_dtype)
        line = {
            "epoch": epoch,
            "val_acc": val.acc1,
            "val_acc5": val.acc5,
            "val_loss": val.loss,
            "train_loss": stats.loss,
            "lr": stats.lr,
            "images_per_s": stats.images_per_s,
            "wall_s": wall_before + time.perf_counter() - run_start,
            "startup_s": startup[0],  # every epoch has >= 1 step (build_loaders)
            **init_metrics,
        }
        if epoch == training.epochs and loaders.test is not None:
            # The held-out split, once, after the full budget: reported beside the front, never
            # an objective (the sampler and schedulers read `val_acc` only).
            test = evaluate(engine, loaders.test, device=run.device, input_dtype=input_dtype)
            line.update(test_acc=test.acc1, test_acc5=test.acc5, test_loss=test.loss)
        history.append(line)
        _save_checkpoint(engine, run.trial_dir, epoch, setup.world_size, training, run.spec,
                         history, shards, setup.rank)
        if run.rank0:
            _append_metrics(run.trial_dir, line)
        if epoch == training.epochs:
            _write_final(run, engine)
        if run.report is not None:
            run.report({**line, "fidelity": epoch})
    if start_epoch >= training.epochs and history:
        # Nothing left to train: write the weights of the checkpoint and tell the caller where
        # the trial stands.
        _write_final(run, engine)
        if run.report is not None:
            run.report({**history[-1], "fidelity": history[-1]["epoch"]})


def _write_final(run: _Run, engine: Any) -> None:
    """The consolidated fp32 weights and arch.yaml (collective under ZeRO-3)."""
    weights = consolidated_state_dict(engine)
    if run.rank0:
        _save_weights(run.trial_dir / WEIGHTS_FILE, weights)
        run.spec.save(run.trial_dir / ARCH_FILE)


def train_worker(spec: ArchSpec, training: TrainingConfig, trial_dir: str | os.PathLike, *,
                 setup: WorkerSetup = WorkerSetup(), resume: bool = True,
                 started_at: float | None = None,
                 report: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any] | None:
    """Train `spec` for `training.epochs` epochs as worker `setup.rank` of `setup.world_size`.

    The process group must exist (Ray Train's, or `ensure_local_process_group`). Returns the
    last epoch's metrics (None only if there were no epochs to run and no history). The steps:
    prepare the folder, build the data, build the engine, restore the checkpoint, train the
    remaining epochs, write the final weights.

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
        TrainingDiverged: the loss became NaN/inf (`failure.json` is written first).
    """
    # Per-step INFO lines are noise, and WarmupCosineLR warns on every construction that it is
    # asked for a learning rate "before it has started" (it initialises the optimizer so).
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    torch.set_num_threads(max(1, setup.threads))
    device = torch.device(setup.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    run = _Run(spec=spec, training=training, trial_dir=Path(trial_dir), setup=setup,
               device=device, started_at=time.time() if started_at is None else started_at,
               report=report)
    try:
        state = _prepare_folder(run, resume)
        loaders, ds_config, shards = _build_data(run)
        engine = _build_engine(run, ds_config)
        start_epoch, history = _restore(run, engine, state)
        _train_epochs(run, engine, loaders, shards, start_epoch, history)  # + final weights
        del engine
        gc.collect()
        return history[-1] if history else None
    except Exception as e:
        # Not BaseException: Tune stops an early-stopped trial with SystemExit from its
        # report(), and Ctrl-C is an interruption; neither is a failure of the trial.
        if run.rank0:
            write_failure(run.trial_dir, failure_reason(e))
        raise


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
