"""The plan of a search: the request (what `spvit-nas search`'s flags asked for) resolved, before
anything is touched, into the run's settings, its space and its storage.

`SearchRequest` mirrors the CLI's flags (None: not given). `resolve_settings` is the one place
where they meet the space's `search:` and `training:` blocks (a new run) or the run's run.json
(`--resume`): each flag given is one setting of `nas.settings.SearchSettings` (`FLAGS`), over the
space's defaults, or, resumed, over run.json's values, where a setting the run keeps
(`SearchSettings.FIXED`) may not change. The settings check their own values and name the
setting; the message the user reads names the flag instead (`launch.flags`). `plan_search` adds
the checks of what no setting holds: flag combinations without effect, --out, the dataset and a
local machine's CPUs and GPUs. This module knows the flags; `nas.settings` does not.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launch.flags import FLAGS, flag_message, flags_named
from nas import study as nas_study
from nas.layout import RunFolder
from nas.run import RunInfo
from nas.settings import OneShotOptions, SearchSettings, SettingError
from nas.storage import is_url
from spvit.errors import ConfigError


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
        scheduler: early stopping: `fifo` (none), `asha` (on val_acc per epoch) or `moasha`
            (multi-objective successive halving, `launch.moasha`).
        asha: `--asha`, the same as `scheduler="asha"`.
        moasha: the same as `scheduler="moasha"`.
        asha_reduction_factor: ASHA's and MOASHA's reduction factor (keep the top 1/rf at each
            rung).
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
        finetune_steps: fine-tuning steps before the proxy front is re-scored (with `oneshot`).
        rescore: how many of the proxy front are re-scored (with `finetune_steps`).
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
    scheduler: str | None = None
    asha: bool | None = None
    moasha: bool | None = None
    asha_reduction_factor: float | None = None
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
class Plan:
    """A resolved search: its run folder, space, settings and the real storage URL."""

    run_dir: Path
    space: Any
    info: RunInfo
    url: str | None  # the real storage URL (None: the run's journal)
    trial_retries: int = 0
    concurrent: int | None = None  # trials at once, once the cluster is known


# ---------------------------------------------------------------------------- flags
def positive_int(flag: str, value: Any, minimum: int = 1) -> int:
    """A flag's integer value, at least `minimum` (for flags that are no setting)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{flag} must be an integer >= {minimum}, but got {value!r}."
                          f" Pass e.g. {flag} {max(minimum, 2)}.")
    return value


def flag_names(request: SearchRequest) -> dict[str, str]:
    """The flag of each setting for this request."""
    return FLAGS if request.strategy != "oneshot" else {**FLAGS, "trials": "--retrain"}


def requested_scheduler(request: SearchRequest) -> str | None:
    """The scheduler the request names (None: not given); `--asha` is `--scheduler asha`, and
    two different names contradict each other, so neither may silently win."""
    named = [name for name, on in (("asha", request.asha), ("moasha", request.moasha)) if on]
    if request.asha and request.scheduler not in (None, "asha"):
        raise ConfigError(f"--asha and --scheduler {request.scheduler} ask for two different"
                          " early-stopping rules (--asha is --scheduler asha). Drop --asha, or"
                          f" drop --scheduler {request.scheduler}.")
    if len(set(named) | {request.scheduler} - {None}) > 1:
        raise ConfigError("--asha and --scheduler moasha are two early-stopping rules; pick one"
                          " (moasha ranks by accuracy, GFLOPs and params together).")
    return request.scheduler or (named[0] if named else None)


def requested_settings(request: SearchRequest) -> dict[str, Any]:
    """The settings the request's flags give (`FLAGS`), each value checked; flags not given are
    absent."""
    values = {
        "study_name": request.study_name, "sampler": request.sampler, "seed": request.seed,
        "trials": request.trials, "concurrent": request.concurrent, "epochs": request.epochs,
        "workers_per_trial": request.workers_per_trial,
        "scheduler": requested_scheduler(request),
        "reduction_factor": request.asha_reduction_factor,
        "feasible_proposals": request.feasible_proposals,
        "gpus_per_worker": request.gpus_per_worker,
        "max_consecutive_failures": request.max_consecutive_failures,
    }
    if request.strategy == "oneshot" and request.retrain is not None:
        values["trials"] = request.retrain
    given = {key: SearchSettings.check_value(key, value)
             for key, value in values.items() if value is not None}
    if request.strategy == "oneshot" and not request.resume:
        from nas.oneshot import DEFAULT_CANDIDATES

        given["oneshot"] = OneShotOptions(
            supernet=str(Path(request.supernet).expanduser().resolve()),
            candidates=DEFAULT_CANDIDATES if request.candidates is None else request.candidates,
            finetune_steps=request.finetune_steps or 0, rescore=request.rescore)
    return given


def check_request(request: SearchRequest) -> None:
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
    if request.warm_start:
        if request.resume:
            raise ConfigError("--warm-start seeds a new study only; a resumed search already"
                              " holds its trials. Drop --warm-start or --resume.")
        from nas.warm_start import check_runs

        check_runs(request.warm_start)  # missing, a file, no or a damaged run.json / journal
    if request.num_cpus is not None:
        positive_int("--num-cpus", request.num_cpus)
        from launch.ray_env import resolve_address

        if resolve_address(request.address) is not None:
            raise ConfigError(f"--num-cpus {request.num_cpus} sizes a local Ray instance, but"
                              " the search joins a cluster (--address / RAY_ADDRESS), whose"
                              " nodes bring their own CPUs. Drop --num-cpus.")


# ---------------------------------------------------------------------------- resolution
def resolve_settings(request: SearchRequest, run_dir: Path) -> Plan:
    """The run's settings, space and storage: the request's flags over run.json (`--resume`) or
    over the space's defaults (a new run). Touches nothing."""
    previous = RunInfo.load(run_dir) if request.resume else None  # its errors name run.json
    try:
        given = requested_settings(request)
        scheduler = given.get("scheduler", previous.scheduler if previous else "fifo")
        if "reduction_factor" in given and scheduler == "fifo":
            raise ConfigError(f"--asha-reduction-factor {given['reduction_factor']:g} applies to"
                              " successive halving (--asha or --scheduler moasha), which is off."
                              " Add one, or drop --asha-reduction-factor.")
        if previous is not None:
            space = _resumed_space(request, run_dir, previous)
            storage, url = _resumed_storage(request, run_dir, previous)
            info = previous.resumed_with({**given, "storage": storage})
        else:
            space, defaults = _new_run(request, run_dir, given)
            info = RunInfo(**{**defaults, **given}, created=nas_study.now_iso())
            nas_study.make_sampler(info.sampler, seed=info.seed,
                                   population_size=info.population_size)
            url = request.storage
            if info.oneshot is not None:
                from nas.oneshot import open_supernet

                # A missing folder or another space's supernet exits here, before anything is
                # written.
                open_supernet(info.oneshot.supernet).check_space(space)
    except SettingError as e:
        raise ConfigError(flag_message(e, flag_names(request))) from None
    return Plan(run_dir=run_dir, space=space, info=info, url=url)


def _load_space(path: Path, **kwargs: Any) -> Any:
    from search_spaces.space import SearchSpace

    return SearchSpace.load(path, **kwargs)


def _with_training(space: Any, given: dict[str, Any]) -> Any:
    """`space` with the epochs and workers per trial that `given` holds."""
    changes = {key: given[key] for key in ("epochs", "workers_per_trial") if key in given}
    if not changes:
        return space
    return dataclasses.replace(space, training=space.training.replace(**changes))


def _new_run(request: SearchRequest, run_dir: Path,
             given: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """A new run's space and its settings' defaults (the space's blocks)."""
    from nas.storage import storage_url

    held = next((name for name in RunFolder.MARKERS if (run_dir / name).exists()), None)
    if held:
        raise ConfigError(f"{run_dir} already holds a search ({held}); a new search would mix"
                          " with it. Pass --resume to continue it, or choose another --out.")
    if request.space is None:
        raise ConfigError("a new search needs a space: pass --space PATH, e.g."
                          " --space search_spaces/digits.yaml.")
    space = _with_training(_load_space(Path(request.space)), given)
    search = space.search
    sampler = given.get("sampler", search.sampler)
    population = search.population_size
    if sampler == "nsga2" and population is None:
        population = nas_study.default_population_size(given.get("trials", search.trials))
    return space, dict(
        study_name=nas_study.default_study_name(run_dir),
        storage=storage_url(request.storage, run_dir), sampler=search.sampler,
        seed=search.seed, trials=search.trials, concurrent=search.concurrent,
        epochs=space.training.epochs, workers_per_trial=space.training.workers_per_trial,
        space=str(Path(request.space).expanduser().resolve()),
        training=space.training.to_dict(),
        max_consecutive_failures=search.max_consecutive_failures,
        # `auto` keeps a given population for the NSGA-II it picks from 250 trials on
        population_size=population if sampler in ("nsga2", "auto") else None)


def _resumed_space(request: SearchRequest, run_dir: Path, info: RunInfo) -> Any:
    """The run's resolved space; a --space given must be the same."""
    space_file = RunFolder(run_dir).space
    if not space_file.is_file():
        raise ConfigError(f"cannot resume: {space_file} is missing. Restore it from the run;"
                          " the resolved space defines the candidates of the study.")
    space = _load_space(space_file, check_feasible=False)
    if request.space is not None:
        given = _with_training(_load_space(Path(request.space), check_feasible=False),
                               {"epochs": info.epochs, "workers_per_trial": info.workers_per_trial})
        if given.to_dict() != space.to_dict():
            raise ConfigError(f"--space {request.space} differs from the run's resolved"
                              f" {space_file}; a resumed search keeps its space. Drop --space"
                              " (the run's copy is used) or start a new search with another"
                              " --out.")
    return space


def _resumed_storage(request: SearchRequest, run_dir: Path,
                     info: RunInfo) -> tuple[str, str | None]:
    """(the storage run.json records, the real URL to open, None for the run's journal)."""
    from nas.storage import storage_url

    if is_url(info.storage):
        url = request.storage or info.storage
        if storage_url(url, run_dir) != info.storage:
            raise ConfigError(f"--storage {storage_url(url, run_dir)} is not the run's storage"
                              f" {info.storage}; a resumed search keeps its study. Pass the"
                              " run's URL (with the real password) or drop --storage.")
        return info.storage, url
    if request.storage is not None:
        raise ConfigError(f"--storage {storage_url(request.storage, run_dir)} given, but the"
                          f" run keeps its study in {info.storage}. Drop --storage.")
    return storage_url(None, run_dir), None  # the folder may have been moved or copied


# ---------------------------------------------------------------------------- the plan
def plan_search(request: SearchRequest) -> Plan:
    """Resolve `request` against the space / the run folder, without touching anything."""
    from nas.outputs import check_output

    with flags_named(flag_names(request)):  # --out, --warm-start
        run_dir = check_output(request.out, command="search", resume=request.resume)
        check_request(request)
    plan = resolve_settings(request, run_dir)
    _check_data(plan.space)
    _check_local_resources(plan, request)
    return plan


def _check_data(space: Any) -> None:
    """The space's dataset is there and fits its fixed architecture fields (classes, channels,
    image size), before Ray starts or a trial is launched."""
    from types import SimpleNamespace

    from nas.data import check_compatible, describe_dataset

    fixed = space.fixed
    shape = SimpleNamespace(num_classes=fixed["num_classes"], in_chans=fixed["in_chans"],
                            img_size=fixed["img_size"])
    check_compatible(describe_dataset(space.training.dataset), shape)


def _check_local_resources(plan: Plan, request: SearchRequest) -> None:
    """A local instance must hold one trial: its CPUs (`--num-cpus`, else the machine's) and
    GPUs. A cluster is checked once joined (`launch.search`)."""
    from launch.cmd_train import check_local_resources
    from launch.ray_env import resolve_address

    if resolve_address(request.address) is not None:
        return
    info = plan.info
    check_local_resources(workers=info.workers_per_trial, cpus_per_worker=1.0,
                          use_gpu=info.gpus_per_worker > 0, flag="--workers-per-trial",
                          num_cpus=request.num_cpus, cpus_flag=None)


__all__ = ["FLAGS", "Plan", "SearchRequest", "flag_message", "flags_named", "plan_search",
           "resolve_settings"]
