"""The search driver: Optuna decides (`nas.study`), Ray Tune executes, the run folder remembers.

`run_search(SearchRequest(...))` is what `spvit-nas search` calls. It

1. resolves the request against the space's `search:` block (a new run) or the run's `run.json`
   (`--resume`), refusing a run folder that already holds a study unless resuming;
2. checks the journal of a resumed run (`nas.journal.check_run_journal`), starts or joins Ray
   for a new one, then opens the study in its persistent storage (`nas.storage.make_storage`:
   RUN_DIR/study.journal by default), prints the storage URL and study name, and writes
   `run.json` and the resolved `space.yaml` atomically;
3. (joining Ray through `launch.ray_env.init_ray` if not done yet) runs one Tune experiment in
   RUN_DIR/tune: `tune.with_resources(candidate_trainable, trainable_resources(W, use_gpu))`
   driven by `launch.searcher.StudySearcher`, at most `--concurrent` trials at a time, with a
   progress table, retries through `FailureConfig`, and ASHA early stopping on `val_acc` per
   `epoch` with `--asha`;
4. ends with the Pareto table of full-budget trials, the reports (`nas.report`) and the knee
   trial exported to RUN_DIR/export (`nas.export`).

Resume. The study, not Tune's folder, is the source of truth. Each driver session runs a fresh
Tune session in the same experiment folder; COMPLETE trials are never proposed again, RUNNING
trials a dead driver left behind are adopted under their own numbers and continue from the
checkpoint in their trial folder, and only the missing number of new trials is asked for.

Failures. A trial that crashes, diverges or runs out of memory is told FAIL with its reason and
the search goes on; after `--max-consecutive-failures` failures in a row the driver stops Tune
and exits 1, leaving the study intact (trials cut short stay RUNNING and continue on --resume).
A search whose launched trials all failed, or that ends without a full-budget trial, exits 1 with
the count and the first cause; so does one whose result could not be written to the study
(`StudySearcher` retries first; the trial stays RUNNING and --resume records it).

Checks. Everything that can be checked is checked before Ray starts or a file is written
(`plan_search`: --out, flag combinations, the dataset, a local machine's CPUs/GPUs), and a new
search meets the cluster (resources, shared folder, authentication mode) before it creates its
study; a resumed one reads its journal through `nas.journal` before Optuna does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nas import study as nas_study
from nas.storage import JOURNAL_NAME, is_url
from spvit.errors import ConfigError

TUNE_EXPERIMENT = "tune"
EXPORT_DIR = "export"
DEFAULT_ASHA_REDUCTION_FACTOR = 2.0

# exit codes of a search that did not fail on bad input (ConfigError exits 2 through the CLI)
EXIT_OK = 0
EXIT_FAILURES = 1
EXIT_INTERRUPTED = 130


@dataclass(frozen=True)
class SearchRequest:
    """What the user asked for; None means "not given" (the space's or run's value applies).

    Args:
        out: the run folder.
        space: the search-space file (required for a new run; optional with `resume`, where it
            must match the run's space.yaml).
        trials: trials to launch in total (constraint rejections do not count).
        concurrent: trials trained at the same time.
        epochs: full training budget per trial (overrides `training.epochs`).
        workers_per_trial: DeepSpeed workers per trial (overrides `training.workers_per_trial`).
        sampler: one of `nas.study.SAMPLERS`.
        storage: study storage URL (None: RUN_DIR/study.journal).
        address: Ray cluster to join (None: a local instance, or RAY_ADDRESS).
        seed: sampler seed.
        resume: continue the study of an existing run folder.
        asha: ASHA early stopping on val_acc per epoch.
        asha_reduction_factor: ASHA's reduction factor (keep the top 1/rf at each rung); also
            MOASHA's.
        moasha: multi-objective successive halving (`launch.moasha`) instead of ASHA.
        feasible_proposals: the sampler's proposals are redrawn until the cost model accepts
            them (`nas.samplers.FeasibleSampler`, the default); False lets it propose
            infeasible candidates, which are told FAIL untrained (for comparisons).
        gpus_per_worker: 0 (CPU) or 1 (one GPU per worker).
        max_consecutive_failures: stop after this many failed trials in a row.
        trial_retries: Tune restarts of a crashed trial before it counts as failed.
        study_name: the study's name (default: the run folder's name).
        num_cpus: CPUs of a local Ray instance (default: the machine's).
        export: export the knee trial to RUN_DIR/export at the end.
        warm_start: earlier run folders whose compatible completed trials seed a new study
            (`nas.warm_start`); never trained again.
        strategy: `full` (every proposal trained to the budget) or `oneshot` (a supernet scores
            `candidates` subnets with inherited weights; the top `retrain` of that proxy front
            are trained stand-alone, and only they reach the study's front; `nas.oneshot`).
        supernet: the folder of `spvit-nas supernet train` (with `oneshot`).
        retrain: how many of the proxy front to train stand-alone (with `oneshot`; default:
            the space's `search.trials`).
        candidates: subnets the supernet scores (with `oneshot`).
    """

    out: Path
    space: Path | None = None
    trials: int | None = None
    concurrent: int | None = None
    epochs: int | None = None
    workers_per_trial: int | None = None
    sampler: str | None = None
    storage: str | None = None
    address: str | None = None
    seed: int | None = None
    resume: bool = False
    asha: bool | None = None
    asha_reduction_factor: float | None = None
    moasha: bool | None = None
    feasible_proposals: bool | None = None
    gpus_per_worker: float | None = None
    max_consecutive_failures: int | None = None
    trial_retries: int = 0
    study_name: str | None = None
    num_cpus: int | None = None
    export: bool = True
    warm_start: tuple[Path, ...] = ()
    strategy: str = "full"
    supernet: Path | None = None
    retrain: int | None = None
    candidates: int | None = None
    finetune_steps: int | None = None
    rescore: int | None = None


@dataclass
class SearchOutcome:
    """What a search did (also printed)."""

    run_dir: Path
    study_name: str
    storage: str
    exit_code: int
    message: str
    launched: list[int] = field(default_factory=list)
    outcomes: dict[str, int] = field(default_factory=dict)
    pareto: list[int] = field(default_factory=list)
    reports: list[Path] = field(default_factory=list)
    export_dir: Path | None = None
    wall_s: float = 0.0


# ---------------------------------------------------------------------------------------- checks
def _positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        flag = "--" + name.replace("_", "-")
        raise ConfigError(f"{flag} must be an integer >= {minimum}, but got {value!r}."
                          f" Pass e.g. {flag} {max(minimum, 2)}.")
    return value


def _check_gpus(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value not in (0, 1):
        raise ConfigError(f"--gpus-per-worker must be 0 (CPU) or 1 (one GPU per worker), but got"
                          f" {value!r}. Pass --gpus-per-worker 1 on a GPU cluster.")
    return float(value)


def _check_reduction_factor(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 1 \
            or not math.isfinite(value):
        raise ConfigError(f"--asha-reduction-factor must be a number > 1, but got {value!r}."
                          " Use e.g. 2 (keep the better half at each rung) or 3.")
    return float(value)


def _holds_study(run_dir: Path) -> str | None:
    for name in (nas_study.RUN_FILE, JOURNAL_NAME):
        if (run_dir / name).exists():
            return name
    return None


# ---------------------------------------------------------------------------------------- plan
@dataclass
class _Plan:
    run_dir: Path
    space: Any
    info: nas_study.RunInfo
    url: str | None  # the real storage URL (None: the run's journal)
    trial_retries: int = 0
    concurrent: int | None = None  # trials at once, once the cluster is known


def _load_space(path: Path, **kwargs: Any) -> Any:
    from search_spaces.space import SearchSpace

    return SearchSpace.load(path, **kwargs)


def _with_training(space: Any, *, epochs: int | None, workers: int | None) -> Any:
    changes = {}
    if epochs is not None:
        changes["epochs"] = _positive_int("epochs", epochs)
    if workers is not None:
        changes["workers_per_trial"] = _positive_int("workers_per_trial", workers)
    if not changes:
        return space
    return dataclasses.replace(space, training=space.training.replace(**changes))


def plan_search(request: SearchRequest) -> _Plan:
    """Resolve `request` against the space / the run folder, without touching anything."""
    from nas.outputs import check_output

    run_dir = check_output(request.out, command="search", resume=request.resume)
    _check_flags(request)
    if request.resume:
        plan = _plan_resume(request, run_dir)
    else:
        plan = _plan_new(request, run_dir)
    _check_data(plan.space)
    _check_local_resources(plan, request)
    return plan


def _check_flags(request: SearchRequest) -> None:
    """Flags that would have no effect in this combination are refused, not ignored."""
    if request.strategy not in ("full", "oneshot"):
        raise ConfigError(f"--strategy must be full or oneshot, but got {request.strategy!r}."
                          " Drop --strategy (full) or pass --strategy oneshot --supernet DIR.")
    oneshot_only = [flag for flag, value in (("--supernet", request.supernet),
                                             ("--retrain", request.retrain),
                                             ("--candidates", request.candidates),
                                             ("--finetune-steps", request.finetune_steps),
                                             ("--rescore", request.rescore))
                    if value is not None]
    if request.strategy != "oneshot" and oneshot_only:
        raise ConfigError(f"{oneshot_only[0]} applies to --strategy oneshot only. Add"
                          f" --strategy oneshot, or drop {oneshot_only[0]}.")
    if request.strategy == "oneshot":
        if request.resume:
            raise ConfigError("--strategy oneshot starts a new search (its candidates are queued"
                              " in the study once); a resumed search trains what is queued."
                              " Drop --strategy/--supernet with --resume.")
        if request.supernet is None:
            raise ConfigError("--strategy oneshot needs a trained supernet: pass --supernet DIR"
                              " (made by `spvit-nas supernet train --space SPACE --out DIR`).")
        for name in ("retrain", "candidates"):
            if getattr(request, name) is not None:
                _positive_int(name, getattr(request, name))
        from nas.oneshot import check_finetune_steps, rescore_count

        steps = request.finetune_steps
        if steps is not None:
            check_finetune_steps(steps)
        if request.rescore is not None:
            if not steps:
                raise ConfigError(f"--rescore {request.rescore} re-scores the proxy front after"
                                  " fine-tuning, but --finetune-steps is not set. Add"
                                  " --finetune-steps S (e.g. 60) or drop --rescore.")
            rescore_count(request.retrain or 1, request.rescore)
    if request.warm_start:
        if request.resume:
            raise ConfigError("--warm-start seeds a new study only; a resumed search already"
                              " holds its trials. Drop --warm-start or --resume.")
        from nas.warm_start import check_runs

        check_runs(request.warm_start)  # missing, a file, no or a damaged run.json / journal
    if request.study_name is not None and not str(request.study_name).strip():
        raise ConfigError("--study-name must be a non-empty name, but got ''. Drop --study-name"
                          " (the run folder's name is used) or pass e.g. --study-name digits.")
    if request.num_cpus is not None:
        _positive_int("num_cpus", request.num_cpus)
        from launch.ray_env import resolve_address

        if resolve_address(request.address) is not None:
            raise ConfigError(f"--num-cpus {request.num_cpus} sizes a local Ray instance, but"
                              " the search joins a cluster (--address / RAY_ADDRESS), whose"
                              " nodes bring their own CPUs. Drop --num-cpus.")


def _check_data(space: Any) -> None:
    """The space's dataset is there and fits its fixed architecture fields (classes, channels,
    image size), before Ray starts or a trial is launched."""
    from types import SimpleNamespace

    from nas.data import check_compatible, describe_dataset

    fixed = space.fixed
    shape = SimpleNamespace(num_classes=fixed["num_classes"], in_chans=fixed["in_chans"],
                            img_size=fixed["img_size"])
    check_compatible(describe_dataset(space.training.dataset), shape)


def _check_local_resources(plan: _Plan, request: SearchRequest) -> None:
    """A local instance must hold one trial: its CPUs (`--num-cpus`, else the machine's) and
    GPUs. A cluster is checked once joined (`_cluster_concurrency`)."""
    from launch.cmd_train import check_local_resources
    from launch.ray_env import resolve_address

    if resolve_address(request.address) is not None:
        return
    info = plan.info
    check_local_resources(workers=info.workers_per_trial, cpus_per_worker=1.0,
                          use_gpu=info.gpus_per_worker > 0, flag="--workers-per-trial",
                          num_cpus=request.num_cpus, cpus_flag=None)


def _plan_new(request: SearchRequest, run_dir: Path) -> _Plan:
    from nas.storage import storage_url

    held = _holds_study(run_dir)
    if held:
        raise ConfigError(f"{run_dir} already holds a search ({held}); a new search would mix"
                          " with it. Pass --resume to continue it, or choose another --out.")
    if request.space is None:
        raise ConfigError("a new search needs a space: pass --space PATH, e.g."
                          " --space search_spaces/digits.yaml.")
    if request.asha_reduction_factor is not None and not (request.asha or request.moasha):
        _check_reduction_factor(request.asha_reduction_factor)
        raise ConfigError(f"--asha-reduction-factor {request.asha_reduction_factor:g} applies to"
                          " successive halving (--asha or --scheduler moasha), which is off. Add"
                          " one, or drop --asha-reduction-factor.")
    space = _with_training(_load_space(Path(request.space)), epochs=request.epochs,
                           workers=request.workers_per_trial)
    defaults = space.search
    trials = _positive_int("trials", request.trials if request.trials is not None
                           else defaults.trials)
    if request.strategy == "oneshot":
        from nas.oneshot import open_supernet

        # A missing folder or another space's supernet exits here, before anything is written.
        open_supernet(request.supernet).check_space(space)
        if request.retrain is not None:
            trials = request.retrain
    sampler = request.sampler or defaults.sampler
    population = defaults.population_size
    if sampler == "nsga2" and population is None:
        population = nas_study.default_population_size(trials)
    info = nas_study.RunInfo(
        study_name=request.study_name or nas_study.default_study_name(run_dir),
        storage=storage_url(request.storage, run_dir),
        sampler=sampler,
        seed=_positive_int("seed", request.seed if request.seed is not None else defaults.seed,
                           0),
        trials=trials,
        concurrent=_positive_int("concurrent", request.concurrent
                                 if request.concurrent is not None else defaults.concurrent),
        epochs=space.training.epochs,
        workers_per_trial=space.training.workers_per_trial,
        space=str(Path(request.space).expanduser().resolve()),
        training=space.training.to_dict(),
        asha=bool(request.asha),
        moasha=bool(request.moasha),
        feasible_proposals=request.feasible_proposals is not False,
        asha_reduction_factor=_check_reduction_factor(
            request.asha_reduction_factor if request.asha_reduction_factor is not None
            else DEFAULT_ASHA_REDUCTION_FACTOR),
        gpus_per_worker=_check_gpus(request.gpus_per_worker or 0),
        max_consecutive_failures=_positive_int(
            "max_consecutive_failures", request.max_consecutive_failures
            if request.max_consecutive_failures is not None
            else defaults.max_consecutive_failures),
        # `auto` keeps a given population for the NSGA-II it picks from 250 trials on
        population_size=population if sampler in ("nsga2", "auto") else None,
        tune_experiment=TUNE_EXPERIMENT,
        created=nas_study.now_iso(),
    )
    nas_study.make_sampler(info.sampler, seed=info.seed, population_size=info.population_size)
    if info.asha and info.moasha:
        raise ConfigError("--asha and --scheduler moasha are two early-stopping rules; pick one"
                          " (moasha ranks by accuracy, GFLOPs and params together).")
    return _Plan(run_dir=run_dir, space=space, info=info, url=request.storage)


def _plan_resume(request: SearchRequest, run_dir: Path) -> _Plan:
    from nas.storage import storage_url

    info = nas_study.RunInfo.load(run_dir)
    if request.asha_reduction_factor is not None and not (info.asha or request.asha):
        raise ConfigError(f"--asha-reduction-factor {request.asha_reduction_factor:g} applies to"
                          " ASHA early stopping, which this run does not use. Drop"
                          " --asha-reduction-factor.")
    info.check_resume({"sampler": request.sampler, "seed": request.seed,
                       "epochs": request.epochs, "workers_per_trial": request.workers_per_trial,
                       "asha": request.asha, "moasha": request.moasha,
                       "feasible_proposals": request.feasible_proposals,
                       "asha_reduction_factor": request.asha_reduction_factor})
    if request.study_name is not None and request.study_name != info.study_name:
        raise ConfigError(f"--study-name {request.study_name} differs from {info.study_name} in"
                          f" the run's {nas_study.RUN_FILE}; a resumed search keeps its study."
                          " Drop --study-name.")
    space_file = run_dir / nas_study.SPACE_FILE
    if not space_file.is_file():
        raise ConfigError(f"cannot resume: {space_file} is missing. Restore it from the run;"
                          " the resolved space defines the candidates of the study.")
    space = _load_space(space_file, check_feasible=False)
    if request.space is not None:
        given = _with_training(_load_space(Path(request.space), check_feasible=False),
                               epochs=info.epochs, workers=info.workers_per_trial)
        if given.to_dict() != space.to_dict():
            raise ConfigError(f"--space {request.space} differs from the run's resolved"
                              f" {space_file}; a resumed search keeps its space. Drop --space"
                              " (the run's copy is used) or start a new search with another"
                              " --out.")
    if is_url(info.storage):
        url = request.storage or info.storage
        if storage_url(url, run_dir) != info.storage:
            raise ConfigError(f"--storage {storage_url(url, run_dir)} is not the run's storage"
                              f" {info.storage}; a resumed search keeps its study. Pass the"
                              " run's URL (with the real password) or drop --storage.")
    else:
        if request.storage is not None:
            raise ConfigError(f"--storage {storage_url(request.storage, run_dir)} given, but the"
                              f" run keeps its study in {info.storage}. Drop --storage.")
        url = None
        info.storage = storage_url(None, run_dir)  # the folder may have been moved or copied
    if request.trials is not None:
        info.trials = _positive_int("trials", request.trials)
    if request.concurrent is not None:
        info.concurrent = _positive_int("concurrent", request.concurrent)
    if request.max_consecutive_failures is not None:
        info.max_consecutive_failures = _positive_int("max_consecutive_failures",
                                                      request.max_consecutive_failures)
    if request.gpus_per_worker is not None:
        info.gpus_per_worker = _check_gpus(request.gpus_per_worker)
    return _Plan(run_dir=run_dir, space=space, info=info, url=url)


# ---------------------------------------------------------------------------------------- Tune
def _trial_label(trial: Any) -> str:
    """Tune's name of a trial: the Optuna number (`trial_0007`)."""
    return f"trial_{Path(trial.config['trial_dir']).name}"


def _trial_dirname(trial: Any) -> str:
    """Tune's folder of a trial: number plus Tune id (a resumed number gets a new folder)."""
    return f"{_trial_label(trial)}_{trial.trial_id}"


def _abort_stopper(searcher: Any) -> Any:
    from ray.tune.stopper import Stopper

    class _StopWhenSearcherStops(Stopper):
        """Stops the whole experiment once the searcher gave up (consecutive failures, an
        unsatisfiable space)."""

        def __init__(self, owner: Any) -> None:
            self.owner = owner

        def __call__(self, trial_id: str, result: dict) -> bool:
            return False

        def stop_all(self) -> bool:
            return bool(getattr(self.owner, "stop_reason", None))

    return _StopWhenSearcherStops(searcher)


@contextlib.contextmanager
def _legacy_progress_output() -> Iterator[None]:
    """Ray's default output engine ignores `progress_reporter`; the classic one prints the
    table we configure. Scoped to the fit so the process environment is left as found."""
    old = os.environ.get("RAY_AIR_NEW_OUTPUT")
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = old


def _make_scheduler(info: nas_study.RunInfo) -> Any:
    """The run's early-stopping scheduler: ASHA, MOASHA (which pauses and promotes; the
    searcher resumes what it promotes) or None."""
    if info.asha:
        from ray.tune.schedulers import ASHAScheduler

        return ASHAScheduler(time_attr="epoch", metric="val_acc", mode="max",
                             max_t=info.epochs, grace_period=1,
                             reduction_factor=info.asha_reduction_factor)
    if info.moasha:
        from launch.moasha import MOASHAScheduler

        return MOASHAScheduler(time_attr="epoch", metric="val_acc", max_t=info.epochs,
                               grace_period=1, reduction_factor=info.asha_reduction_factor)
    return None


def _make_tuner(plan: _Plan, searcher: Any, trial_errors: Any, num_samples: int,
                concurrent: int, scheduler: Any = None) -> Any:
    from ray import tune
    from ray.tune import CLIReporter

    from launch.trial import candidate_trainable, trainable_resources

    info = plan.info
    use_gpu = info.gpus_per_worker > 0
    trainable = tune.with_resources(candidate_trainable,
                                    trainable_resources(info.workers_per_trial, use_gpu))
    reporter = CLIReporter(
        metric_columns={"epoch": "epoch", "val_acc": "val_acc", "val_loss": "val_loss",
                        "images_per_s": "img/s"},
        parameter_columns={"arch/depth": "depth", "arch/embed_dim": "width"},
        max_report_frequency=30, max_progress_rows=max(20, concurrent + 4))
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher, scheduler=scheduler, num_samples=num_samples,
            max_concurrent_trials=concurrent, trial_name_creator=_trial_label,
            # A trial's actor is kept for the next one: no new process, no second import of
            # torch/DeepSpeed. Measured on 2 cores (4 tiny trials, 2 at a time): the Tune loop
            # took 21 s instead of 40 s, with bit-identical metrics.
            reuse_actors=True,
            trial_dirname_creator=_trial_dirname),
        run_config=tune.RunConfig(
            name=info.tune_experiment, storage_path=str(plan.run_dir),
            failure_config=tune.FailureConfig(max_failures=plan.trial_retries),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            callbacks=[trial_errors], stop=_abort_stopper(searcher),
            progress_reporter=reporter, verbose=1),
    )


# ---------------------------------------------------------------------------------------- driver
def _print_start(plan: _Plan, say: Callable[[str], None]) -> None:
    info = plan.info
    say(f"study: {info.study_name}")
    say(f"storage: {info.storage}")
    say(f"  watch it: optuna-dashboard {info.storage}   |   optuna trials --storage"
        f" {info.storage} --study-name {info.study_name}")
    say(f"run folder: {plan.run_dir}   (space {info.space})")
    asha = f", ASHA rf {info.asha_reduction_factor:g}" if info.asha else ""
    asha = f", MOASHA rf {info.asha_reduction_factor:g}" if info.moasha else asha
    say(f"budget: {info.trials} trials x {info.epochs} epochs, {info.concurrent} at a time,"
        f" {info.workers_per_trial} worker(s) each, sampler {info.sampler} (seed {info.seed}"
        f"{', population ' + str(info.population_size) if info.population_size else ''})"
        f"{asha}")


def _cluster_concurrency(plan: _Plan, say: Callable[[str], None]) -> int:
    """How many trials the Ray cluster can train at once, at most `--concurrent`.

    A trial holds `workers_per_trial` CPUs (one per DeepSpeed worker, in-process or under Ray
    Train) and as many GPUs with `--gpus-per-worker 1`. Launching more Ray Train trials than fit
    would leave their worker groups waiting for resources, so the session runs fewer at once.
    """
    import ray

    info = plan.info
    need = {"CPU": float(info.workers_per_trial)}
    if info.gpus_per_worker > 0:
        need["GPU"] = float(info.workers_per_trial)
    have = ray.cluster_resources()
    fits = info.concurrent
    for key, per_trial in need.items():
        if have.get(key, 0) < per_trial:
            raise ConfigError(f"one trial needs {per_trial:g} {key} but the Ray cluster has"
                              f" {have.get(key, 0):g}. Lower --workers-per-trial, set"
                              " --gpus-per-worker 0, or add nodes.")
        fits = min(fits, int(have[key] // per_trial))
    if fits < info.concurrent:
        say(f"note: the cluster fits {fits} trial(s) of {info.workers_per_trial} worker(s) at a"
            f" time, fewer than --concurrent {info.concurrent}; running {fits} at a time.")
    return fits


def run_search(request: SearchRequest, *, say: Callable[[str], None] = print) -> SearchOutcome:
    """Run (or resume) a search; see the module docstring. Raises `ConfigError` on bad input."""
    import ray

    started = time.monotonic()
    plan = plan_search(request)
    plan.trial_retries = _positive_int("trial_retries", request.trial_retries, 0)
    if request.resume:
        from nas.journal import check_run_journal

        check_run_journal(plan.run_dir, plan.url or plan.info.storage, say=say)
    existed = plan.run_dir.exists()
    started_ray = not ray.is_initialized()
    try:
        if not request.resume:
            # A new search meets the cluster before it creates its study: a cluster that
            # cannot run a trial must not leave a run folder that blocks the next search.
            try:
                plan.concurrent = _connect(plan, request, say)
            except BaseException:
                if not existed:
                    with contextlib.suppress(OSError):
                        plan.run_dir.rmdir()  # only if still empty
                raise
        return _search(plan, request, say, started)
    finally:
        if started_ray and ray.is_initialized():
            ray.shutdown()


def _connect(plan: _Plan, request: SearchRequest, say: Callable[[str], None]) -> int:
    """Start or join Ray (checked: shared run folder, authentication mode) and return how many
    trials run at once."""
    from launch.ray_env import init_ray

    init_ray(request.address, num_cpus=request.num_cpus, storage_path=plan.run_dir)
    return _cluster_concurrency(plan, say)


def _search(plan: _Plan, request: SearchRequest, say: Callable[[str], None],
            started: float) -> SearchOutcome:
    from nas.storage import DriverLease, make_storage, study_mutex

    info = plan.info
    storage = make_storage(plan.url, plan.run_dir)
    placeholder = nas_study.make_sampler("random", seed=0)
    study = nas_study.open_study(storage, study_name=info.study_name, sampler=placeholder,
                                 resume=request.resume)

    # Each driver session of the study gets its own index, even when several start at once,
    # so that concurrent drivers do not propose the same candidates.
    with study_mutex(study, plan.run_dir):
        session = int(study.user_attrs.get("spvit:sessions", 0))
        study.set_user_attr("spvit:sessions", session + 1)
    study.sampler = nas_study.make_sampler(
        info.sampler, seed=nas_study.session_seed(info.seed, session),
        population_size=info.population_size, n_trials=info.trials,
        concurrent=info.concurrent)
    info.sessions.append(nas_study.now_iso())
    plan.space.save(plan.run_dir / nas_study.SPACE_FILE)
    info.save(plan.run_dir)
    _print_start(plan, say)

    if request.strategy == "oneshot":
        from nas.oneshot import DEFAULT_CANDIDATES, prepare_oneshot

        prepare_oneshot(study, plan.space, request.supernet, run_dir=plan.run_dir,
                        retrain=info.trials, candidates=request.candidates or DEFAULT_CANDIDATES,
                        seed=info.seed, finetune_steps=request.finetune_steps or 0,
                        rescore=request.rescore, say=say)
    if request.warm_start:
        from nas.warm_start import warm_start

        warm_start(study, plan.space, request.warm_start, training=info.training,
                   budget=info.epochs, say=say)
    search_study = nas_study.SearchStudy(study, plan.space, run_dir=plan.run_dir,
                                         budget=info.epochs,
                                         max_infeasible_tries=plan.space.search.max_infeasible,
                                         feasible_proposals=info.feasible_proposals)
    adopt = search_study.adoptable()
    counted = search_study.counted_trials()
    if request.resume:
        finished = Counter(t.state.name for t in study.get_trials(deepcopy=False)
                           if not t.user_attrs.get("infeasible"))
        say(f"resuming: {dict(finished)} in the study; {len(adopt)} interrupted trial(s)"
            f" continue from their checkpoints, {max(0, info.trials - counted)} new trial(s)"
            " to go")
        _repair_weights(plan, study, request, say)
    searcher = None
    lease = DriverLease(study, plan.run_dir)
    with lease:
        search_study.lease = lease
        to_run = len(adopt) + max(0, info.trials - counted)
        if to_run > 0:
            searcher = _run_tune(plan, search_study, adopt, request, to_run, say)
    outcome = SearchOutcome(run_dir=plan.run_dir, study_name=info.study_name,
                            storage=info.storage, exit_code=EXIT_OK, message="")
    if searcher is not None:
        outcome.launched = list(searcher.launched)
        outcome.outcomes = dict(searcher.outcomes)
        if searcher.error is not None:
            raise searcher.error
        if searcher.record_error is not None:
            outcome.exit_code = EXIT_FAILURES
            outcome.message = f"search stopped: {searcher.record_error}."
        elif searcher.stopped:
            outcome.exit_code = EXIT_FAILURES
            outcome.message = (f"search stopped: {searcher.stop_reason}. The study is intact;"
                               f" see {plan.run_dir}/trials/*/failure.json, fix the cause and"
                               " continue with --resume (a higher --max-consecutive-failures"
                               " goes on regardless).")
        elif searcher.remaining > 0 or searcher.pending_adoptions or searcher.live_numbers:
            outcome.exit_code = EXIT_INTERRUPTED
            outcome.message = ("search interrupted before its budget was spent; continue it"
                               " with --resume (completed trials are kept).")
    if outcome.exit_code == EXIT_OK:
        _check_success(plan, study, searcher, outcome)
    _finish(plan, study, request, outcome, say)
    outcome.wall_s = time.monotonic() - started
    say(f"wall time {outcome.wall_s:.0f}s")
    if outcome.message:
        say(outcome.message)
    return outcome


def _repair_weights(plan: _Plan, study: Any, request: SearchRequest,
                    say: Callable[[str], None]) -> None:
    """Write the weights of COMPLETE trials that lack them from their final checkpoint.

    Trials once wrote their weights only after reporting their last epoch, so a scheduler that
    stopped them on that report (ASHA does, at the budget) left them COMPLETE without
    `model.safetensors`; their checkpoint holds the trained state. One worker in this process
    does it (the checkpoint's workers under Ray Train where ZeRO shards need them)."""
    from launch.trial import TrialFailed, run_candidate
    from launch.worker import WEIGHTS_FILE, read_checkpoint_state
    from nas.pareto import trial_dir
    from nas.warm_start import is_warm_start
    from search_spaces.training import TrainingConfig
    from spvit.arch import ArchSpec

    info = plan.info
    for t in study.get_trials(deepcopy=False):
        if t.state.name != "COMPLETE" or is_warm_start(t):
            continue
        folder = trial_dir(plan.run_dir, t)
        if (folder / WEIGHTS_FILE).is_file():
            continue
        try:
            state = read_checkpoint_state(folder)
            if state is None or state.epoch < info.epochs:
                raise ConfigError(f"its folder {folder} holds no checkpoint of epoch"
                                  f" {info.epochs}")
            training = TrainingConfig.from_dict(state.training)
            run_candidate(ArchSpec.from_dict(state.arch), training, folder,
                          workers=1 if training.zero_stage == 0 else state.world_size,
                          use_gpu=info.gpus_per_worker > 0, resume=True,
                          ray_address=request.address)
        except (ConfigError, TrialFailed) as e:
            say(f"note: trial {t.number} is COMPLETE but has no {WEIGHTS_FILE}, and it cannot"
                f" be written: {e}")
            continue
        say(f"trial {t.number}: wrote its missing {WEIGHTS_FILE} from its final checkpoint")


def _check_success(plan: _Plan, study: Any, searcher: Any, outcome: SearchOutcome) -> None:
    """A search whose launched trials all failed, or that ends without one full-budget
    trial, did not succeed: exit 1 with the count and the first cause."""
    trials = [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get("infeasible")]
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    failed = [t for t in trials if t.state.name == "FAIL"]
    first = getattr(searcher, "first_failure", None)
    if first is None and failed:
        first_trial = min(failed, key=lambda t: t.number)
        first = f"trial {first_trial.number}: {first_trial.user_attrs.get('fail_reason', '?')}"
    cause = f"; first cause: {first}" if first else ""
    where = (f" Fix the cause (see {plan.run_dir}/trials/*/failure.json) and continue with"
             " --resume.")
    told = sum(getattr(searcher, "outcomes", {}).values()) if searcher is not None else 0
    session_fails = getattr(searcher, "outcomes", {}).get("FAIL", 0) if searcher else 0
    if told and session_fails == told:
        outcome.exit_code = EXIT_FAILURES
        outcome.message = f"search failed: all {told} launched trial(s) failed{cause}.{where}"
    elif not complete:
        counts = dict(Counter(t.state.name for t in trials))
        outcome.exit_code = EXIT_FAILURES
        outcome.message = (f"search ended without a full-budget trial ({len(trials)} trial(s):"
                           f" {counts}){cause}.{where}")


def _run_tune(plan: _Plan, search_study: nas_study.SearchStudy, adopt: list, request:
              SearchRequest, num_samples: int, say: Callable[[str], None]) -> Any:
    from launch.searcher import StudySearcher, TrialErrors

    info = plan.info
    trial_errors = TrialErrors()
    scheduler = _make_scheduler(info)
    promotions = scheduler if info.moasha else None
    if promotions is not None:
        # every promotion is one more Tune trial (at most one per rung and trial)
        num_samples += info.trials * len(promotions.milestones)
    searcher = StudySearcher(
        search_study, trials=info.trials,
        base_config={"training": dict(info.training), "workers": info.workers_per_trial,
                     "use_gpu": info.gpus_per_worker > 0},
        adopt=adopt, max_consecutive_failures=info.max_consecutive_failures,
        error_lookup=trial_errors.error_of, promotions=promotions)
    if plan.concurrent is None:
        plan.concurrent = _connect(plan, request, say)
    tuner = _make_tuner(plan, searcher, trial_errors, num_samples, plan.concurrent, scheduler)
    with _legacy_progress_output():
        tuner.fit()
    return searcher


def _finish(plan: _Plan, study: Any, request: SearchRequest, outcome: SearchOutcome,
            say: Callable[[str], None]) -> None:
    """Pareto table, reports, export (each only if its module is installed)."""
    trials = study.get_trials(deepcopy=False)
    counts = Counter(t.state.name for t in trials if not t.user_attrs.get("infeasible"))
    infeasible = sum(1 for t in trials if t.user_attrs.get("infeasible"))
    say(f"study {plan.info.study_name}: {dict(counts)}, {infeasible} infeasible sample(s)"
        " rejected before launch")
    overhead = orchestration_overhead(plan.run_dir, trials)
    if overhead is not None:
        trial_s, train_s = overhead
        share = 1.0 - train_s / trial_s if trial_s > 0 else 0.0
        say(f"trial time {trial_s:.0f}s, of which training epochs {train_s:.0f}s"
            f" ({100 * share:.0f}% start-up, evaluation and orchestration)")
    from nas import export, pareto, report

    front = pareto.pareto_trials(study)
    outcome.pareto = [t.number for t in front]
    say(f"Pareto set ({len(front)} full-budget trial(s)):")
    say(pareto.format_table(front))
    if outcome.exit_code != EXIT_OK:
        return
    outcome.reports = list(report.write_reports(plan.run_dir, storage=plan.url))
    say(f"reports: {plan.run_dir / 'reports'}")
    if request.export and front:
        try:
            path, trial, why = export.export_pick(plan.run_dir, plan.run_dir / EXPORT_DIR,
                                                  method="knee", overwrite=True,
                                                  storage=plan.url)
        except ConfigError as e:  # e.g. RUN_DIR/export holds files of the user's own
            say(f"export skipped: {e}")
            return
        outcome.export_dir = Path(path)
        say(f"exported trial {trial.number} to {path} ({why})")


def orchestration_overhead(run_dir: Path, trials: list) -> tuple[float, float] | None:
    """(sum of the trials' wall seconds as the driver saw them, sum of their training seconds)
    over the trials that recorded both, or None.

    A trial's training seconds are the last `wall_s` of its metrics.jsonl: the time from its
    first epoch's start to its last epoch's end (training steps, validation and checkpoints,
    summed over resumed sessions), without process start, data loading or model set-up. The
    rest of the driver-side wall time is start-up and orchestration.
    """
    from nas.pareto import read_metrics, trial_dir

    trial_s = train_s = 0.0
    for t in trials:
        wall = t.user_attrs.get("wall_s")
        if not isinstance(wall, (int, float)):
            continue
        rows = read_metrics(trial_dir(run_dir, t) / "metrics.jsonl")
        epoch_walls = [float(r["wall_s"]) for r in rows
                       if isinstance(r.get("wall_s"), (int, float))]
        if not epoch_walls:
            continue
        trial_s += float(wall)
        train_s += max(epoch_walls)
    return (trial_s, train_s) if trial_s > 0 else None
