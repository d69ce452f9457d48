"""One trial: train one candidate with W DeepSpeed workers, report each epoch, keep a trial folder.

Contract (used by the search driver and by `spvit-nas train`):

* `run_candidate(spec, training, trial_dir, *, workers=1, use_gpu=False, resume=True,
  on_epoch=None) -> dict` trains `spec` with the recipe `training` and returns the last epoch's
  metrics. Two ways to run, chosen by `default_path(workers)` (by measured start-up): one
  worker trains in this process on a one-process gloo (GPU: nccl) group; several workers run
  under a Ray Train `TorchTrainer` (CPU: gloo, GPU: nccl with one GPU each), DeepSpeed reusing
  Ray Train's process group, `FailureConfig(max_failures)` restarting crashed workers from the
  last checkpoint. `on_epoch(metrics)` is called in this process once per epoch with the
  per-epoch keys below plus `fidelity` (under Ray Train from a thread that follows
  `metrics.jsonl`; what it raises then fails the trial once the workers are done). The trial
  folder is read and written by every worker, so on a multi-node cluster it must be on storage
  all nodes share. Ray Train's own run records go to `trial_dir/ray_train/`.
* `candidate_trainable(config)` is a Ray Tune function trainable. `config`: `arch` (flat ArchSpec,
  `ArchSpec.to_flat()`), `training` (`TrainingConfig.to_dict()`), `trial_dir` (absolute path),
  `workers` (int), `use_gpu` (bool), optionally `cpus_per_worker` (float, default 1) and
  `max_failures` (int, default 1). It reports every epoch with `ray.tune.report`: in-process
  directly, under Ray Train by forwarding rank 0's reports (`TuneReportCallback`). Wrap it as
  `tune.with_resources(candidate_trainable, trainable_resources(workers, use_gpu))`: the Ray
  Train path must run in a Tune function with a token CPU share, or the nested Train workers
  starve.
* Per-epoch metrics (`metrics.jsonl` lines and reports): `epoch` (1-based, = epochs completed),
  `val_acc`, `val_acc5` (0..1), `val_loss`, `train_loss`, `lr` (of the epoch's last step),
  `images_per_s` (training images of all workers per second of training), `wall_s` (training
  seconds so far, summed over resumed runs, start-up excluded), `startup_s` (seconds from the
  call to the first training step of the run that trained this epoch); reports add `fidelity`.
* The trial folder: `arch.yaml`, `ds_config.json`, `metrics.jsonl`, `checkpoint/` (last epoch
  only), `model.safetensors` (consolidated fp32 weights, at the end) and, on failure,
  `failure.json` `{"reason": ...}`. A trial started again on the same folder resumes from its
  checkpoint at the next epoch (optimizer and schedule state included) unless `resume=False`.
* Failures raise `TrialFailed` (`.reason`, the line in `failure.json`); a NaN/inf loss is not
  retried (it would diverge again). Bad input raises `ConfigError` before anything starts.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nas.data import check_compatible, describe_dataset
from nas.ds_config import micro_batch_size
from nas.engine import TrainingDiverged, inprocess_device, process_group_backend
from nas.layout import TrialFolder
from search_spaces.training import TrainingConfig
from spvit.arch import ArchSpec
from spvit.errors import ConfigError
from spvit.io import read_json_lines

from .worker import (
    METRICS_FILE,
    WorkerSetup,
    check_resumable,
    clear_trial,
    ensure_local_process_group,
    failure_reason,
    ray_train_loop,
    read_checkpoint_state,
    train_worker,
    write_failure,
)

PATHS = ("inprocess", "ray_train")
TOKEN_CPU = 0.01


class TrialFailed(RuntimeError):
    """Training a candidate failed; `reason` is the line written to `failure.json`."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def default_path(workers: int) -> str:
    """How a trial with `workers` workers runs: in-process for one, Ray Train for several.

    Measured from the call to the first training step, 2 CPU cores, tiny candidate, Ray already
    running: in-process 2.2 s in a fresh process (DeepSpeed import and engine set-up; 0.1 s for
    the next trial in the same process); `TorchTrainer` 12.7 s with one worker and 14.5 s with
    two. One worker therefore never goes through Ray Train.
    """
    return "inprocess" if workers == 1 else "ray_train"


def trainable_resources(workers: int, use_gpu: bool, *, cpus_per_worker: float = 1.0
                        ) -> dict[str, float]:
    """The `tune.with_resources` spec of `candidate_trainable` for `workers` workers.

    In-process: the trial's actor does the training, so it holds the worker's CPUs (and a GPU).
    Ray Train: the Tune function only waits on the `TorchTrainer`, whose workers request their
    own resources, so it holds a token CPU share.
    """
    if default_path(workers) == "ray_train":
        return {"cpu": TOKEN_CPU}
    return {"cpu": cpus_per_worker, **({"gpu": 1} if use_gpu else {})}


def _read_metrics(trial_dir: Path) -> list[dict[str, Any]]:
    return read_json_lines(trial_dir / METRICS_FILE)


class _MetricsFollower(threading.Thread):
    """Calls `on_epoch` for each new line of `metrics.jsonl` while Ray Train workers run."""

    def __init__(self, trial_dir: Path, on_epoch: Callable[[dict[str, Any]], None],
                 after_epoch: int, interval_s: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.trial_dir = trial_dir
        self.on_epoch = on_epoch
        self.last = after_epoch
        self.interval_s = interval_s
        self.error: BaseException | None = None
        self._halt = threading.Event()

    def poll(self) -> None:
        for line in _read_metrics(self.trial_dir):
            if line.get("epoch", 0) > self.last and self.error is None:
                self.last = line["epoch"]
                try:
                    self.on_epoch({**line, "fidelity": line["epoch"]})
                except Exception as e:  # surfaced by stop(), once the workers are done
                    self.error = e

    def run(self) -> None:
        while not self._halt.wait(self.interval_s):
            self.poll()

    def stop(self) -> None:
        """Stop following, report the last lines, and raise what `on_epoch` raised, if any."""
        self._halt.set()
        self.join()
        self.poll()
        if self.error is not None:
            raise self.error


def check_cluster_resources(*, workers: int, cpus_per_worker: float, use_gpu: bool) -> None:
    """Refuse a Ray Train request the joined cluster can never hold (Ray would wait for it
    forever, "No available node types can fulfill resource request")."""
    import ray

    have = ray.cluster_resources()
    need = {"CPU": workers * cpus_per_worker, **({"GPU": float(workers)} if use_gpu else {})}
    for key, amount in need.items():
        if have.get(key, 0.0) < amount:
            gpu = ", drop the GPU request" if key == "GPU" else ""
            raise ConfigError(f"{workers} worker(s) need {amount:g} {key} in total, but the Ray"
                              f" cluster has {have.get(key, 0.0):g}. Lower the workers or"
                              f" --cpus-per-worker{gpu}"
                              ", or add nodes.")


def _run_ray_train(spec: ArchSpec, training: TrainingConfig, trial_dir: Path, *, workers: int,
                   use_gpu: bool, resume: bool, started_at: float, cpus_per_worker: float,
                   max_failures: int, in_tune: bool,
                   on_epoch: Callable[[dict[str, Any]], None] | None,
                   ray_address: str | None) -> None:
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from .ray_env import init_ray

    started_ray = False
    if not ray.is_initialized():
        init_ray(ray_address)
        started_ray = True
    try:
        check_cluster_resources(workers=workers, cpus_per_worker=cpus_per_worker,
                                use_gpu=use_gpu)
    except ConfigError:
        if started_ray:
            ray.shutdown()
        raise
    callbacks = []
    if in_tune:
        from ray.tune.integration.ray_train import TuneReportCallback

        callbacks.append(TuneReportCallback())
    state = read_checkpoint_state(trial_dir) if resume else None
    follower = None
    if on_epoch is not None:
        # A finished trial reports its last epoch again, as the in-process path does.
        after = 0 if state is None else min(state.epoch, training.epochs - 1)
        follower = _MetricsFollower(trial_dir, on_epoch, after)
        follower.start()
    trainer = TorchTrainer(
        ray_train_loop,
        train_loop_config={
            "arch": spec.to_flat(), "training": training.to_dict(), "trial_dir": str(trial_dir),
            "resume": resume, "started_at": started_at,
            "threads": max(1, math.floor(cpus_per_worker)),
        },
        torch_config=TorchConfig(backend=process_group_backend(use_gpu)),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpus_per_worker}),
        run_config=RunConfig(name=f"train-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}",
                             storage_path=str(TrialFolder(trial_dir).ray_train),
                             failure_config=FailureConfig(max_failures=max_failures),
                             callbacks=callbacks),
    )
    try:
        trainer.fit()
    finally:
        try:
            if follower is not None:
                follower.stop()
        finally:
            if started_ray:
                ray.shutdown()


def _run(spec: ArchSpec, training: TrainingConfig, trial_dir: str | os.PathLike, *, workers: int,
         use_gpu: bool, resume: bool, on_epoch: Callable[[dict[str, Any]], None] | None,
         path: str | None, cpus_per_worker: float, max_failures: int, in_tune: bool,
         ray_address: str | None) -> dict[str, Any]:
    started_at = time.time()
    trial_dir = Path(trial_dir).expanduser().resolve()
    path = path or default_path(workers)
    try:
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ConfigError(f"workers must be an integer >= 1, but got {workers!r}."
                              " Use e.g. --workers 2.")
        if path not in PATHS:
            raise ConfigError(f"path must be one of {list(PATHS)}, but got {path!r}.")
        if path == "inprocess" and workers != 1:
            raise ConfigError(f"in-process training runs exactly one worker, but got {workers}."
                              " Use path='ray_train' for several workers.")
        if not cpus_per_worker > 0:
            raise ConfigError(f"cpus_per_worker must be > 0, but got {cpus_per_worker}.")
        micro_batch_size(training, workers)
        check_compatible(describe_dataset(training.dataset), spec)
        state = read_checkpoint_state(trial_dir) if resume else None
        if state is not None:
            check_resumable(state, spec, training, workers)
        trial_dir.mkdir(parents=True, exist_ok=True)
        TrialFolder(trial_dir).failure.unlink(missing_ok=True)
        if not resume:
            clear_trial(trial_dir)

        if path == "inprocess":
            device = inprocess_device(use_gpu)  # ConfigError if no GPU is there
            ensure_local_process_group(process_group_backend(use_gpu))
            setup = WorkerSetup(device=str(device),
                                threads=max(1, math.floor(cpus_per_worker)))
            last = train_worker(spec, training, trial_dir, setup=setup, resume=resume,
                                started_at=started_at, report=on_epoch)
        else:
            _run_ray_train(spec, training, trial_dir, workers=workers, use_gpu=use_gpu,
                           resume=resume, started_at=started_at,
                           cpus_per_worker=cpus_per_worker, max_failures=max_failures,
                           in_tune=in_tune, on_epoch=on_epoch, ray_address=ray_address)
            reason = TrialFolder(trial_dir).read_failure_reason()
            if reason is not None:
                raise TrialFailed(reason)
            lines = _read_metrics(trial_dir)
            last = lines[-1] if lines else None
    except ConfigError:
        raise  # bad input: nothing was trained (a worker's own ConfigError wrote failure.json)
    except TrialFailed as e:
        write_failure(trial_dir, e.reason)
        raise
    except TrainingDiverged as e:
        write_failure(trial_dir, e.reason)
        raise TrialFailed(e.reason) from e
    except Exception as e:
        reason = TrialFolder(trial_dir).read_failure_reason() or failure_reason(e)
        write_failure(trial_dir, reason)
        raise TrialFailed(reason) from e
    if last is None:
        raise TrialFailed("training finished without a single epoch of metrics")
    return {**last, "fidelity": last["epoch"]}


def run_candidate(spec: ArchSpec, training: TrainingConfig, trial_dir: str | os.PathLike, *,
                  workers: int = 1, use_gpu: bool = False, resume: bool = True,
                  on_epoch: Callable[[dict[str, Any]], None] | None = None,
                  path: str | None = None, cpus_per_worker: float = 1.0, max_failures: int = 1,
                  ray_address: str | None = None) -> dict[str, Any]:
    """Train `spec` into `trial_dir`; return the last epoch's metrics (with `fidelity`).

    Args:
        spec: the candidate.
        training: the recipe (`training.epochs` is the budget).
        trial_dir: the trial folder; created if missing.
        workers: DeepSpeed data-parallel workers; the global batch stays `training.batch_size`.
        use_gpu: one GPU per worker (nccl) instead of CPU (gloo).
        resume: continue from the folder's checkpoint; False starts over (the old checkpoint,
            metrics and weights are deleted).
        on_epoch: called in this process after each epoch with that epoch's metrics.
        path: `inprocess` or `ray_train`; default `default_path(workers)`.
        cpus_per_worker: CPUs per worker (Ray resources; torch threads = its integer part, >= 1).
        max_failures: Ray Train restarts of crashed workers (from the last checkpoint).
        ray_address: Ray cluster to join when Ray is not running yet (default: a local one,
            shut down again afterwards).

    Raises:
        ConfigError: bad input (architecture vs data, batch vs workers, incompatible checkpoint).
        TrialFailed: training failed; `failure.json` holds the same reason.
    """
    return _run(spec, training, trial_dir, workers=workers, use_gpu=use_gpu, resume=resume,
                on_epoch=on_epoch, path=path, cpus_per_worker=cpus_per_worker,
                max_failures=max_failures, in_tune=False, ray_address=ray_address)


def candidate_trainable(config: dict[str, Any]) -> None:
    """Ray Tune function trainable: train one candidate, `ray.tune.report` every epoch.

    See the module docstring for `config` and for the resources to wrap it with.
    """
    import ray.tune

    spec = ArchSpec.from_dict(config["arch"])
    training = TrainingConfig.from_dict(config["training"])
    workers = int(config.get("workers", training.workers_per_trial))
    path = default_path(workers)
    _run(spec, training, config["trial_dir"], workers=workers,
         use_gpu=bool(config.get("use_gpu", False)), resume=True,
         on_epoch=ray.tune.report if path == "inprocess" else None, path=path,
         cpus_per_worker=float(config.get("cpus_per_worker", 1.0)),
         max_failures=int(config.get("max_failures", 1)), in_tune=True, ray_address=None)
