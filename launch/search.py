"""The search driver: Optuna decides (`nas.study`), Ray Tune executes, the run folder remembers.

`run_search(SearchRequest(...))` is what `spvit-nas search` calls. It

1. resolves the request into the run's settings (`launch.search_plan`: the flags over the
   space's `search:` block for a new run, over the run's `run.json` with `--resume`), refusing a
   run folder that already holds a study unless resuming;
2. checks the journal of a resumed run (`nas.journal.check_run_journal`), starts or joins Ray
   for a new one, then opens the study in its persistent storage (`nas.storage.make_storage`:
   RUN_DIR/study.journal by default), prints the storage URL and study name, and writes
   `run.json` and the resolved `space.yaml` atomically;
3. (joining Ray through `launch.ray_env.init_ray` if not done yet) runs one Tune experiment in
   RUN_DIR/tune: `tune.with_resources(candidate_trainable, trainable_resources(W, use_gpu))`
   driven by `launch.searcher.StudySearcher`, at most `--concurrent` trials at a time, with a
   progress table, retries through `FailureConfig`, and the run's `scheduler`: ASHA early
   stopping on `val_acc` per `epoch`, or MOASHA (`launch.moasha`);
4. ends with the Pareto table of full-budget trials, the reports (`nas.report`) and the knee
   trial exported to RUN_DIR/export (`nas.export`; `launch.search_report`).

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
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from nas import study as nas_study
from nas.layout import RunFolder
from spvit.errors import ConfigError

from .search_plan import Plan, SearchRequest, plan_search, positive_int
from .search_report import (
    EXIT_FAILURES,
    EXIT_INTERRUPTED,
    EXIT_OK,
    SearchOutcome,
    check_success,
    failure_files,
    finish_search,
)

_check_success = check_success  # the name the safety tests import
__all__ = ["EXIT_FAILURES", "EXIT_INTERRUPTED", "EXIT_OK", "SearchOutcome", "SearchRequest",
           "plan_search", "run_search"]


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
    if info.scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler

        return ASHAScheduler(time_attr="epoch", metric="val_acc", mode="max",
                             max_t=info.epochs, grace_period=1,
                             reduction_factor=info.reduction_factor)
    if info.scheduler == "moasha":
        from launch.moasha import MOASHAScheduler

        return MOASHAScheduler(time_attr="epoch", metric="val_acc", max_t=info.epochs,
                               grace_period=1, reduction_factor=info.reduction_factor)
    return None


def _make_tuner(plan: Plan, searcher: Any, trial_errors: Any, num_samples: int,
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
def _print_start(plan: Plan, say: Callable[[str], None]) -> None:
    info = plan.info
    say(f"study: {info.study_name}")
    say(f"storage: {info.storage}")
    say(f"  watch it: optuna-dashboard {info.storage}   |   optuna trials --storage"
        f" {info.storage} --study-name {info.study_name}")
    say(f"run folder: {plan.run_dir}   (space {info.space})")
    halving = (f", {info.scheduler.upper()} rf {info.reduction_factor:g}"
               if info.successive_halving else "")
    say(f"budget: {info.trials} trials x {info.epochs} epochs, {info.concurrent} at a time,"
        f" {info.workers_per_trial} worker(s) each, sampler {info.sampler} (seed {info.seed}"
        f"{', population ' + str(info.population_size) if info.population_size else ''})"
        f"{halving}")


def _cluster_concurrency(plan: Plan, say: Callable[[str], None]) -> int:
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
    plan.trial_retries = positive_int("--trial-retries", request.trial_retries, 0)
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


def _connect(plan: Plan, request: SearchRequest, say: Callable[[str], None]) -> int:
    """Start or join Ray (checked: shared run folder, authentication mode) and return how many
    trials run at once."""
    from launch.ray_env import init_ray

    init_ray(request.address, num_cpus=request.num_cpus, storage_path=plan.run_dir)
    return _cluster_concurrency(plan, say)


def _search(plan: Plan, request: SearchRequest, say: Callable[[str], None],
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
    plan.info = info = info.with_session(nas_study.now_iso())
    plan.space.save(RunFolder(plan.run_dir).space)
    info.save(plan.run_dir)
    _print_start(plan, say)

    oneshot = info.oneshot
    if oneshot is not None and not request.resume:
        from nas.oneshot import prepare_oneshot

        prepare_oneshot(study, plan.space, oneshot.supernet, run_dir=plan.run_dir,
                        retrain=info.trials, candidates=oneshot.candidates, seed=info.seed,
                        finetune_steps=oneshot.finetune_steps, rescore=oneshot.rescore, say=say)
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
                               f" see {failure_files(plan.run_dir)}, fix the cause and"
                               " continue with --resume (a higher --max-consecutive-failures"
                               " goes on regardless).")
        elif searcher.remaining > 0 or searcher.pending_adoptions or searcher.live_numbers:
            outcome.exit_code = EXIT_INTERRUPTED
            outcome.message = ("search interrupted before its budget was spent; continue it"
                               " with --resume (completed trials are kept).")
    if outcome.exit_code == EXIT_OK:
        check_success(plan, study, searcher, outcome)
    finish_search(plan, study, outcome, say, export=request.export)
    outcome.wall_s = time.monotonic() - started
    say(f"wall time {outcome.wall_s:.0f}s")
    if outcome.message:
        say(outcome.message)
    return outcome


def _repair_weights(plan: Plan, study: Any, request: SearchRequest,
                    say: Callable[[str], None]) -> None:
    """Write the weights of COMPLETE trials that lack them from their final checkpoint.

    Trials once wrote their weights only after reporting their last epoch, so a scheduler that
    stopped them on that report (ASHA does, at the budget) left them COMPLETE without
    `model.safetensors`; their checkpoint holds the trained state. One worker in this process
    does it (the checkpoint's workers under Ray Train where ZeRO shards need them)."""
    from launch.trial import TrialFailed, run_candidate
    from launch.worker import read_checkpoint_state
    from nas.run import trial_folder
    from nas.warm_start import is_warm_start
    from search_spaces.training import TrainingConfig
    from spvit.arch import ArchSpec

    info = plan.info
    for t in study.get_trials(deepcopy=False):
        if t.state.name != "COMPLETE" or is_warm_start(t):
            continue
        trial = trial_folder(plan.run_dir, t)
        folder = trial.path
        if trial.weights.is_file():
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
            say(f"note: trial {t.number} is COMPLETE but has no {trial.weights.name}, and it cannot"
                f" be written: {e}")
            continue
        say(f"trial {t.number}: wrote its missing {trial.weights.name} from its final checkpoint")


def _run_tune(plan: Plan, search_study: nas_study.SearchStudy, adopt: list, request:
              SearchRequest, num_samples: int, say: Callable[[str], None]) -> Any:
    from launch.searcher import StudySearcher, TrialErrors

    info = plan.info
    trial_errors = TrialErrors()
    scheduler = _make_scheduler(info)
    promotions = scheduler if info.scheduler == "moasha" else None
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
