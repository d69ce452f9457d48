"""The Optuna side of a search: the study, its sampler, and the ask/tell conventions of the house.

Optuna is the ranking brain of a search and Ray only executes (see `launch/search.py`). This
module holds everything that decides *what* is tried and *how it is recorded*, with no Ray import,
so it can be driven and tested on its own:

* `make_sampler` (`nas.samplers`, re-exported): an explicit, seeded sampler (`nsga2` by default;
  Optuna 5 changed its own default); constraints reach it as each trial's constraint values
  (`nas.optuna_compat.set_constraints`), not the deprecated `constraints_func`;
* `open_study`: the multi-objective study (`maximize val_acc, minimize gflops, minimize params`)
  in a persistent storage (`nas.storage.make_storage`), refusing to overwrite or to invent one;
* `RunInfo` (`nas.run`, re-exported here): `RUN_DIR/run.json`;
* `ask_feasible`: the proposal rule of every study that proposes architectures (this one and the
  one-shot proxy study, `nas.oneshot`): constraint values on each asked trial, infeasible ones
  told FAIL, a `ConfigError` after too many in a row;
* `SearchStudy`: ask/tell with the conventions of docs/architecture.md. Constraint-violating
  samples are rejected before any launch (told FAIL with user attr `infeasible`) and re-proposed;
  only full-budget results are told COMPLETE; shorter ones are PRUNED with their `fidelity`;
  failures are FAIL with `fail_reason`. On resume it adopts the RUNNING trials of a dead driver
  under their own numbers so they continue from their checkpoints.

User attrs of a trial: `arch` (flat ArchSpec), `gflops`, `params`, `budget`, `fidelity`,
`wall_s`, `trial_dir` (relative to RUN_DIR), and `fail_reason` / `infeasible` where they apply.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import optuna
from optuna.trial import FrozenTrial, TrialState

from nas import optuna_compat, samplers
from nas.layout import TrialFolder
from nas.run import (  # noqa: F401  (RunInfo and the run-folder names are re-exported)
    DIRECTIONS,
    LAST_VAL_ACC_ATTR,
    OBJECTIVES,
    RUN_FILE,
    SPACE_FILE,
    TRIALS_DIR,
    RunInfo,
    trial_dir_of,
)
from nas.samplers import make_sampler  # noqa: F401  (re-exported: the one sampler factory)
from nas.settings import SettingError
from search_spaces.fields import whole_number
from search_spaces.search_defaults import DEFAULT_MAX_INFEASIBLE, DEFAULT_SAMPLER  # noqa: F401
from spvit.arch import ArchSpec
from spvit.errors import ConfigError

SAMPLERS: tuple[str, ...] = samplers.SAMPLER_NAMES

DEFAULT_MAX_INFEASIBLE_TRIES = DEFAULT_MAX_INFEASIBLE
# Re-proposals of an already trained architecture replaced per `ask` before one is trained again.
MAX_DUPLICATE_TRIES = 25

# A resumed driver must not replay the proposals of the first one: the sampler's seed for a
# session is derived from the search's `seed` and the number of trials the study already holds.
_SEED_STRIDE = 1_000_003


class Space(Protocol):
    """What the study needs from a search space (`search_spaces.SearchSpace`): `suggest`, and
    `constraints` with `values(spec, cost)` (Optuna convention, <= 0 feasible) and
    `violations(spec, cost)` (one line per broken constraint)."""

    constraints: Any

    def suggest(self, trial: optuna.Trial) -> ArchSpec: ...


class Cost(Protocol):
    params: int
    gflops: float


Estimator = Callable[[ArchSpec], Cost]


def _default_estimate(spec: ArchSpec) -> Cost:
    from spvit.cost import estimate

    return estimate(spec)


# ---------------------------------------------------------------------------------------- samplers
def session_seed(seed: int, existing_trials: int) -> int:
    """The sampler seed of one driver session: `seed` for a new study, a different but
    reproducible one for a study that already holds `existing_trials` trials."""
    return (int(seed) + _SEED_STRIDE * int(existing_trials)) % (2**32)


# ---------------------------------------------------------------------------------------- study
def default_study_name(run_dir: str | os.PathLike) -> str:
    """The study name of a run: the run folder's name (`runs/digits` -> `digits`)."""
    name = Path(run_dir).resolve().name
    return name or "spvit-search"


def _study_names(storage: Any) -> list[str]:
    return [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]


def open_study(storage: Any, *, study_name: str, sampler: optuna.samplers.BaseSampler,
               resume: bool) -> optuna.Study:
    """Create the run's study (`resume=False`) or load it (`resume=True`).

    A new run refuses a name that already exists in the storage, and a resumed one a name that
    does not: neither ever overwrites or invents a study.
    """
    exists = study_name in _study_names(storage)
    if resume and not exists:
        raise SettingError("resume", f"cannot resume: study {study_name!r} is not in the"
                                     " storage. Check `storage` (the real URL, with its"
                                     " password) or start a new search without `resume`.")
    if not resume and exists:
        raise SettingError("resume", f"study {study_name!r} already exists in the storage. Set"
                                     " `resume` to continue it, or choose another run folder"
                                     " (`out`) or `study_name`.")
    if resume:
        study = optuna.load_study(study_name=study_name, storage=storage, sampler=sampler)
        if [d.name.lower() for d in study.directions] != list(DIRECTIONS):
            raise SettingError("study_name", f"study {study_name!r} has directions"
                                             f" {[d.name.lower() for d in study.directions]},"
                                             f" not {list(DIRECTIONS)} over {list(OBJECTIVES)};"
                                             " it is not a search study. Point `storage` and"
                                             " `study_name` at the search's study.")
        return study
    study = optuna.create_study(study_name=study_name, storage=storage, sampler=sampler,
                                directions=list(DIRECTIONS))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(list(OBJECTIVES))
    return study


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).astimezone().isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------- ask/tell
@dataclass(frozen=True)
class Proposal:
    """A feasible architecture proposed by a RUNNING trial of an Optuna study, with its cost."""

    trial: optuna.Trial
    spec: ArchSpec
    cost: Cost


def stored_arch(value: Any) -> ArchSpec | None:
    """The architecture a study stores (a trial's user attr `arch` or `proxy_arch`: the flat
    form `propose` writes), or None when there is none or it is not a valid one. Compare and
    key trials' architectures by it: `ArchSpec` equality is their identity."""
    if not isinstance(value, Mapping):
        return None
    try:
        return ArchSpec.from_dict(value)
    except ConfigError:
        return None


def propose(study: optuna.Study, space: Space, trial: optuna.Trial, *,
            estimate: Estimator | None = None, set_constraints: bool = True) -> Proposal | str:
    """The architecture `trial` proposes, or why it is infeasible (one line per broken
    constraint, or `invalid architecture: ...`).

    Sets user attrs `arch`, `gflops` and `params` once the architecture is valid, and, with
    `set_constraints` (a newly asked trial), its constraint values
    (`nas.optuna_compat.set_constraints`, which the constrained samplers and optuna-dashboard
    read)."""
    try:
        spec = space.suggest(trial)
    except ConfigError as e:
        return f"invalid architecture: {e}"
    cost = (estimate or _default_estimate)(spec)
    trial.set_user_attr("arch", spec.to_flat())
    trial.set_user_attr("gflops", float(cost.gflops))
    trial.set_user_attr("params", int(cost.params))
    if set_constraints:
        optuna_compat.set_constraints(study, trial, space.constraints.values(spec, cost))
    violations = list(space.constraints.violations(spec, cost))
    if violations:
        return "; ".join(violations)
    return Proposal(trial=trial, spec=spec, cost=cost)


def reject_infeasible(study: optuna.Study, trial: optuna.Trial, reason: str) -> None:
    """Tell `trial` FAIL as infeasible (never trained, never scored): user attrs `infeasible`
    (the reason) and `fail_reason`."""
    trial.set_user_attr("infeasible", reason)
    trial.set_user_attr("fail_reason", f"infeasible: {reason}")
    study.tell(trial, state=TrialState.FAIL)


def ask_feasible(study: optuna.Study, space: Space, *, max_tries: int | None = None,
                 estimate: Estimator | None = None,
                 on_ask: Callable[[optuna.Trial], None] | None = None,
                 on_reject: Callable[[optuna.Trial], None] | None = None) -> Proposal:
    """Ask `study` until a trial proposes a member of `space` that meets its constraints.

    The house's rule for every study that proposes architectures (the search's `SearchStudy`
    and the one-shot proxy study, `nas.oneshot.run_proxy_search`): each asked trial goes
    through `propose`; a rejected one is told FAIL (`reject_infeasible`) and another is asked.
    `on_ask` sees each asked trial first, `on_reject` each rejected one after its FAIL.
    `ConfigError` after `max_tries` (default: the space's `search.max_infeasible`) rejections
    in a row.
    """
    tries = space.search.max_infeasible if max_tries is None else max_tries
    reason = ""
    for _ in range(tries):
        trial = study.ask()
        if on_ask is not None:
            on_ask(trial)
        proposal = propose(study, space, trial, estimate=estimate)
        if isinstance(proposal, Proposal):
            return proposal
        reason = proposal
        reject_infeasible(study, trial, reason)
        if on_reject is not None:
            on_reject(trial)
    raise ConfigError(
        f"the space's constraints rejected {tries} samples in a row (last: {reason}); the"
        " feasible region is empty or tiny. Loosen the `constraints:` block or narrow the"
        " space's choices to feasible ones.")


@dataclass(frozen=True)
class Candidate:
    """One trial to train: its Optuna number, architecture, analytic cost and folder."""

    number: int
    trial_id: int
    spec: ArchSpec
    gflops: float
    params: int
    trial_dir: str
    resumed: bool = False

    def config(self, run_dir: str | os.PathLike) -> dict[str, Any]:
        return {"arch": self.spec.to_flat(),
                "trial_dir": str(Path(run_dir).resolve() / self.trial_dir)}


def _is_finite(value: Any) -> bool:
    return (not isinstance(value, bool) and isinstance(value, (int, float))
            and math.isfinite(value))


class SearchStudy:
    """Ask/tell over the run's study, with the house's conventions (module docstring).

    Args:
        study: the run's study (`open_study`).
        space: the search space (proposes an ArchSpec from an Optuna trial; has `constraints`).
        run_dir: the run folder (trial folders are `RUN_DIR/trials/NNNN`).
        budget: the full training budget in epochs; only trials that reach it are COMPLETE.
        lease: the driver's `nas.storage.DriverLease`, if any: every trial this driver runs is
            claimed after ask/adopt and released after tell.
        estimate: the cost model (default `spvit.cost.estimate`).
        max_infeasible_tries: consecutive constraint rejections in one `ask` before giving up.
        feasible_proposals: wrap the study's sampler in `nas.samplers.FeasibleSampler`, so that
            it proposes feasible architectures only (rejections then stay a safety net).
    """

    def __init__(self, study: optuna.Study, space: Space, *, run_dir: str | os.PathLike,
                 budget: int, lease: Any = None, estimate: Estimator | None = None,
                 max_infeasible_tries: int = DEFAULT_MAX_INFEASIBLE_TRIES,
                 feasible_proposals: bool = True) -> None:
        whole_number("the training budget", budget, 1, "Set training.epochs (`epochs`).",
                     rule="an integer >= 1 epoch")
        whole_number("max_infeasible_tries", max_infeasible_tries, 1, "Use e.g. 200.")
        self.study = study
        self.space = space
        self.run_dir = Path(run_dir)
        self.budget = budget
        self.lease = lease
        self.estimate = estimate or _default_estimate
        self.max_infeasible_tries = max_infeasible_tries
        if feasible_proposals:
            study.sampler = samplers.FeasibleSampler.wrap(
                study.sampler, space=space, estimate=self.estimate,
                seed=len(study.get_trials(deepcopy=False)))
        self.infeasible_count = 0
        self.duplicate_count = 0
        self.consecutive_failures = 0

    # ------------------------------------------------------------------ bookkeeping
    def _trial(self, trial_id: int) -> optuna.Trial:
        return optuna.Trial(self.study, trial_id)

    def _frozen(self, number: int) -> FrozenTrial:
        return next(t for t in self.study.get_trials(deepcopy=False) if t.number == number)

    def _claim(self, trial_id: int) -> None:
        if self.lease is not None:
            self.lease.claim(trial_id)

    def _release(self, trial_id: int) -> None:
        if self.lease is not None:
            self.lease.release(trial_id)

    def counted_trials(self) -> int:
        """Trials that count towards the search's `trials`: finished ones (COMPLETE, PRUNED,
        FAIL) and RUNNING ones, but neither constraint rejections, duplicates of earlier trials,
        trials seeded from earlier runs (`nas.warm_start`), nor stale trials that were
        re-queued as a copy (the copy counts once it runs)."""
        trials = self.study.get_trials(deepcopy=False)
        retried = {t.system_attrs.get("failed_trial") for t in trials}
        return sum(1 for t in trials
                   if t.state != TrialState.WAITING
                   and not t.user_attrs.get("infeasible")
                   and t.user_attrs.get("duplicate_of") is None
                   and t.user_attrs.get("warm_start") is None  # seeded by nas.warm_start
                   and not (t.state == TrialState.FAIL and t.number in retried))

    # ------------------------------------------------------------------ proposing
    def _on_ask(self, trial: optuna.Trial) -> None:
        self._claim(optuna_compat.trial_id(trial))
        trial.set_user_attr("budget", self.budget)

    def _on_reject(self, trial: optuna.Trial) -> None:
        self._release(optuna_compat.trial_id(trial))
        self.infeasible_count += 1

    def _candidate(self, proposal: Proposal, *, resumed: bool) -> Candidate:
        """A feasible proposal as a Candidate, its folder (a resumed trial keeps its own) and
        `fidelity` recorded."""
        trial = proposal.trial
        rel = trial.user_attrs.get("trial_dir") if resumed else None
        rel = rel if isinstance(rel, str) and rel else trial_dir_of(trial.number)
        trial.set_user_attr("trial_dir", rel)
        if not resumed:
            trial.set_user_attr("fidelity", 0)
        return Candidate(number=trial.number, trial_id=optuna_compat.trial_id(trial),
                         spec=proposal.spec, gflops=float(proposal.cost.gflops),
                         params=int(proposal.cost.params), trial_dir=rel, resumed=resumed)

    def _duplicate_of(self, candidate: Candidate) -> int | None:
        """The number of an earlier trial that trains (or trained) the same architecture:
        COMPLETE, PRUNED or RUNNING. Failed ones may be retried."""
        flat = candidate.spec.to_flat()
        for t in self.study.get_trials(deepcopy=False, states=(
                TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)):
            if t.number != candidate.number and t.user_attrs.get("arch") == flat:
                return t.number
        return None

    def _reject_duplicate(self, candidate: Candidate, original: int) -> None:
        trial = self._trial(candidate.trial_id)
        trial.set_user_attr("duplicate_of", original)
        trial.set_user_attr("fail_reason", f"duplicate of trial {original} (same architecture,"
                                           " never trained twice)")
        self.study.tell(trial, state=TrialState.FAIL)
        self._release(candidate.trial_id)
        self.duplicate_count += 1

    def ask(self) -> Candidate:
        """A new feasible candidate (`ask_feasible`). Samples that break a constraint are told
        FAIL with user attr `infeasible` (never trained) and replaced; after
        `max_infeasible_tries` in a row a `ConfigError` says the constraints leave (almost)
        nothing. A sample identical to a trial that is trained or training (samplers re-propose
        points, NSGA-II often on small spaces) is told FAIL with user attr `duplicate_of` and
        replaced too, up to `MAX_DUPLICATE_TRIES` times per call; after that it is trained
        again."""
        duplicates = 0
        while True:
            proposal = ask_feasible(self.study, self.space, max_tries=self.max_infeasible_tries,
                                    estimate=self.estimate, on_ask=self._on_ask,
                                    on_reject=self._on_reject)
            candidate = self._candidate(proposal, resumed=False)
            original = self._duplicate_of(candidate)
            if original is None or duplicates >= MAX_DUPLICATE_TRIES:
                return candidate
            duplicates += 1
            self._reject_duplicate(candidate, original)

    def adoptable(self) -> list[FrozenTrial]:
        """RUNNING trials no live driver runs any more (a killed or lost driver left them):
        stale per `nas.storage.stale_trials`, or owned by a process of this host that is gone.
        Call before opening this driver's lease."""
        from nas import storage as run_storage

        running = self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if not running:
            return []
        stale = {t.number for t in run_storage.stale_trials(self.study, self.run_dir)}
        return [t for t in running
                if t.number in stale
                or run_storage.lease_owner_is_dead(t.system_attrs.get(run_storage.OWNER_ATTR))]

    def adopt(self, trial: FrozenTrial) -> Candidate | None:
        """Take over a RUNNING trial of a dead driver under its own number: it is trained again
        in its own folder, so it continues from its last checkpoint. Returns None when its
        architecture now breaks a constraint (it is then told FAIL as infeasible)."""
        live = self._trial(optuna_compat.trial_id(trial))
        if self.lease is not None and not self.lease.adopt(optuna_compat.trial_id(trial)):
            return None  # another driver took it over first, or its driver is alive
        live.set_user_attr("budget", self.budget)
        proposal = propose(self.study, self.space, live, estimate=self.estimate,
                           set_constraints=False)
        if isinstance(proposal, Proposal):
            return self._candidate(proposal, resumed=True)
        reject_infeasible(self.study, live, proposal)
        self._on_reject(live)
        return None

    # ------------------------------------------------------------------ telling
    def record_epoch(self, candidate: Candidate, metrics: Mapping[str, Any]) -> None:
        """Note one epoch's report: `fidelity` and `val_acc_last` (user attrs).

        Not an Optuna intermediate value: `Trial.report` refuses multi-objective studies, and a
        PRUNED trial that carries intermediate values crashes Optuna 5's TPE in a
        multi-objective study (`_get_pruned_trial_score` asks for the single direction)."""
        epoch = metrics.get("epoch")
        if not _is_finite(epoch):
            return
        trial = self._trial(candidate.trial_id)
        trial.set_user_attr("fidelity", int(epoch))
        acc = metrics.get("val_acc")
        if _is_finite(acc):
            trial.set_user_attr(LAST_VAL_ACC_ATTR, float(acc))

    def _finish_attrs(self, candidate: Candidate, fidelity: Any, wall_s: float | None) -> None:
        trial = self._trial(candidate.trial_id)
        if _is_finite(fidelity):
            trial.set_user_attr("fidelity", int(fidelity))
        if wall_s is not None:
            before = self._frozen(candidate.number).user_attrs.get("wall_s")
            total = float(wall_s) + (float(before) if candidate.resumed and _is_finite(before)
                                     else 0.0)
            trial.set_user_attr("wall_s", round(total, 3))

    def note_pause(self, candidate: Candidate, metrics: Mapping[str, Any], *,
                   wall_s: float | None = None) -> None:
        """A trial paused by a scheduler at a rung: it stays RUNNING (a later promotion
        resumes it from its checkpoint); its epoch, `fidelity`, `wall_s` so far and
        `paused_at` (the epoch) are recorded."""
        self.record_epoch(candidate, metrics)  # fidelity and val_acc_last
        self._finish_attrs(candidate, None, wall_s)
        fidelity = metrics.get("epoch")
        if _is_finite(fidelity):
            self._trial(candidate.trial_id).set_user_attr("paused_at", int(fidelity))

    def tell_result(self, candidate: Candidate, metrics: Mapping[str, Any] | None, *,
                    wall_s: float | None = None) -> TrialState:
        """Tell a trial that ended without error: COMPLETE with (val_acc, gflops, params) if it
        trained the full budget, PRUNED with its fidelity if it stopped earlier, FAIL if its last
        accuracy is not a finite number.

        The objective is the validation accuracy alone. A full-budget trial's held-out
        `test_acc` (evaluated once, after its last epoch) is kept as a user attr for reports and
        exports; it is never an objective and never reaches the sampler.
        """
        metrics = metrics or {}
        fidelity = metrics.get("epoch")
        acc = metrics.get("val_acc")
        if _is_finite(acc):
            self._trial(candidate.trial_id).set_user_attr(LAST_VAL_ACC_ATTR, float(acc))
        if not _is_finite(fidelity) or int(fidelity) < self.budget:
            self._finish_attrs(candidate, fidelity if _is_finite(fidelity) else 0, wall_s)
            self.study.tell(candidate.number, state=TrialState.PRUNED)
            self._release(candidate.trial_id)
            self.consecutive_failures = 0
            return TrialState.PRUNED
        if not _is_finite(acc):
            return self.tell_fail(candidate, f"val_acc is {acc!r} after the full budget",
                                  fidelity=fidelity, wall_s=wall_s)
        self._finish_attrs(candidate, fidelity, wall_s)
        test_acc = metrics.get("test_acc")
        if _is_finite(test_acc):
            self._trial(candidate.trial_id).set_user_attr("test_acc", float(test_acc))
        self.study.tell(candidate.number, [float(acc), candidate.gflops, float(candidate.params)])
        self._release(candidate.trial_id)
        self.consecutive_failures = 0
        return TrialState.COMPLETE

    def tell_fail(self, candidate: Candidate, reason: str, *, fidelity: Any = None,
                  wall_s: float | None = None) -> TrialState:
        """Tell a trial that crashed, diverged or ran out of memory: FAIL with `fail_reason`."""
        self._finish_attrs(candidate, fidelity, wall_s)
        self._trial(candidate.trial_id).set_user_attr("fail_reason", str(reason)[:2000])
        self.study.tell(candidate.number, state=TrialState.FAIL)
        self._release(candidate.trial_id)
        self.consecutive_failures += 1
        return TrialState.FAIL


def read_failure_reason(trial_dir: str | os.PathLike) -> str | None:
    """The `reason` of a trial folder's failure.json, or None if there is none or it is
    unreadable (`TrialFolder.read_failure_reason`)."""
    return TrialFolder(trial_dir).read_failure_reason()
