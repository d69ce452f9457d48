"""Sampler strategies of a search, and proposals that stay inside the feasible region.

A search's sampler is chosen by name (`sampler`, `search.sampler`). Each name maps to a small
`SamplerStrategy` with a written contract: `build(seed=..., n_trials=..., ...)` returns a fresh,
seeded Optuna sampler for a multi-objective study (`maximize val_acc, minimize gflops, minimize
params`, see `nas.study`). The registry `STRATEGIES` holds `random`, `nsga2`, `tpe`, `gp`, `qmc`
and `auto` (rules in `AutoStrategy`); `make_sampler(name, ...)` is the one entry point and
`nas.study.make_sampler` delegates to it.

`FeasibleSampler` wraps any of them so that the space's analytic constraints (exact and cheap:
`spvit.cost.estimate`) shape the proposal before a trial holds any parameter. Without it, a
sample that breaks a constraint is told FAIL and re-asked; NSGA-II builds parents from COMPLETE
trials only and TPE reads COMPLETE/PRUNED ones, so those rejections never reach a decision. With
it, each new trial's full architecture is drawn by the wrapped sampler itself (its relative
sample, then its independent samples for the remaining parameters, in the space's define-by-run
order), checked with the cost model, and redrawn from the same sampler until it is feasible;
only then is it handed to the trial as its relative sample. The trial's parameters are thus a
draw of the wrapped sampler conditioned on feasibility. After `max_attempts` infeasible draws a
uniform feasible member of the space is used instead (recorded on the trial). `SearchStudy`
still checks every candidate, so an infeasible architecture is never trained even if a wrapped
sampler misbehaves.
"""

from __future__ import annotations

import abc
import random
import warnings
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial, TrialState

from nas import optuna_compat
from nas.settings import SettingError
from search_spaces.fields import whole_number
from search_spaces.search_defaults import DEFAULT_SAMPLER
from spvit.errors import ConfigError

__all__ = ["DEFAULT_SAMPLER"]  # re-exported: the default is the space loader's
# AutoStrategy: below this many trials TPE, from it on NSGA-II (the threshold Optuna's
# AutoSampler uses for categorical / multi-objective spaces).
AUTO_TPE_MAX_TRIALS = 250
# FeasibleSampler: draws of the wrapped sampler per trial before a uniform feasible member.
DEFAULT_MAX_ATTEMPTS = 32
# FeasibleSampler: relative samples of a wrapped GPSampler per trial (each one fits the GP models
# and optimises the acquisition); other samplers draw a relative sample on every attempt.
GP_RELATIVE_DRAWS = 2
# System attr of a trial: {"attempts": draws of the wrapped sampler, "fallback": bool}.
PROPOSAL_ATTR = "spvit:proposal"

ConstraintsFunc = Callable[[FrozenTrial], Sequence[float]]


def default_population_size(trials: int) -> int:
    """NSGA-II generation size for a budget of `trials`: about four generations, 4 to 50."""
    return max(4, min(50, int(trials) // 4))


def _check_seed(seed: Any) -> int:
    return whole_number("seed", seed, 0, "Use e.g. 0.")


# ---------------------------------------------------------------------------------------- contract
class SamplerStrategy(abc.ABC):
    """How one `sampler` name becomes an Optuna sampler.

    Contract of `build`: returns a new sampler (never shared between studies) seeded with
    `seed`, fit for a multi-objective study with categorical, define-by-run parameters.
    `n_trials` is the search's budget of trained trials (None: unknown); `concurrent` the trials
    that run at the same time (strategies that model running trials use it); `population_size`
    concerns generation-based samplers only (None: the strategy's default). Constraints normally
    reach the sampler through `Trial.set_constraint`, which `nas.study.SearchStudy` calls on every
    asked trial; `constraints_func` is passed on only where given (Optuna 5 deprecates it).
    Bad arguments raise `ConfigError` with the rule, the value and the fix.
    """

    name: ClassVar[str]
    summary: ClassVar[str]

    @abc.abstractmethod
    def build(self, *, seed: int, n_trials: int | None = None,
              constraints_func: ConstraintsFunc | None = None,
              population_size: int | None = None, concurrent: int = 1) -> BaseSampler:
        """A fresh, seeded sampler (see the class docstring)."""


def _constraints_kwargs(constraints_func: ConstraintsFunc | None) -> dict[str, Any]:
    return {} if constraints_func is None else {"constraints_func": constraints_func}


class RandomStrategy(SamplerStrategy):
    name = "random"
    summary = "uniform per choice (the baseline every other sampler must beat)"

    def build(self, *, seed, n_trials=None, constraints_func=None, population_size=None,
              concurrent=1):
        return optuna.samplers.RandomSampler(seed=seed)


class NSGA2Strategy(SamplerStrategy):
    name = "nsga2"
    summary = "NSGA-II; population_size given, else about four generations over n_trials"

    def build(self, *, seed, n_trials=None, constraints_func=None, population_size=None,
              concurrent=1):
        if population_size is None:
            size = default_population_size(n_trials) if n_trials is not None else 50
        else:
            size = population_size
        whole_number("population_size", size, 2, "Use e.g. 8.")
        return optuna.samplers.NSGAIISampler(population_size=size, seed=seed,
                                             **_constraints_kwargs(constraints_func))


class TPEStrategy(SamplerStrategy):
    name = "tpe"
    summary = ("multivariate TPE over groups of co-occurring parameters (define-by-run),"
               " constant liar for concurrent trials")

    def build(self, *, seed, n_trials=None, constraints_func=None, population_size=None,
              concurrent=1):
        # Ten random start-up trials are a third of a 30-trial search: scale them with the
        # budget (at least 4, Optuna's 10 from 40 trials on).
        startup = 10 if n_trials is None else max(4, min(10, int(n_trials) // 4))
        return optuna.samplers.TPESampler(
            seed=seed, multivariate=True, group=True, constant_liar=concurrent > 1,
            n_startup_trials=startup, **_constraints_kwargs(constraints_func))


class GPStrategy(SamplerStrategy):
    name = "gp"
    summary = ("Gaussian-process BO (Optuna's GPSampler: log-EHVI, constrained log-CEHVI with"
               " set_constraint, categorical kernels)")

    def build(self, *, seed, n_trials=None, constraints_func=None, population_size=None,
              concurrent=1):
        startup = 10 if n_trials is None else max(4, min(10, int(n_trials) // 4))
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup,
                                         warn_independent_sampling=False,
                                         **_constraints_kwargs(constraints_func))


class QMCStrategy(SamplerStrategy):
    name = "qmc"
    summary = "scrambled Sobol points over the fixed parameters, random for conditional ones"

    def build(self, *, seed, n_trials=None, constraints_func=None, population_size=None,
              concurrent=1):
        return optuna.samplers.QMCSampler(
            seed=seed, scramble=True,
            independent_sampler=optuna.samplers.RandomSampler(seed=seed),
            warn_independent_sampling=False, warn_asynchronous_seeding=False)


class AutoStrategy(SamplerStrategy):
    """Rules (every space of the house is categorical and multi-objective):

    * `n_trials` unknown or below `AUTO_TPE_MAX_TRIALS` (250): `tpe` (TPE models few
      observations of categorical, conditional choices well; NSGA-II needs several full
      generations before it leaves random sampling);
    * from 250 trials on: `nsga2` with `default_population_size(n_trials)` (or the given
      population), whose cost per proposal does not grow with the history.

    GP is not chosen automatically: its kernels are built for continuous parameters and its
    cost per proposal grows cubically with the history.
    """

    name = "auto"
    summary = "tpe below 250 trials, nsga2 from 250 on"

    def choose(self, n_trials: int | None) -> SamplerStrategy:
        if n_trials is not None and n_trials >= AUTO_TPE_MAX_TRIALS:
            return STRATEGIES["nsga2"]
        return STRATEGIES["tpe"]

    def build(self, *, seed, n_trials=None, constraints_func=None, population_size=None,
              concurrent=1):
        chosen = self.choose(n_trials)
        return chosen.build(seed=seed, n_trials=n_trials, constraints_func=constraints_func,
                            population_size=population_size if chosen.name == "nsga2" else None,
                            concurrent=concurrent)


STRATEGIES: dict[str, SamplerStrategy] = {
    s.name: s for s in (NSGA2Strategy(), TPEStrategy(), GPStrategy(), RandomStrategy(),
                        QMCStrategy(), AutoStrategy())}
SAMPLER_NAMES: tuple[str, ...] = tuple(STRATEGIES)


def get_strategy(name: str) -> SamplerStrategy:
    try:
        return STRATEGIES[name]
    except (KeyError, TypeError):
        raise SettingError("sampler", f"sampler must be one of {list(SAMPLER_NAMES)}, but got"
                                      f" {name!r}. Use `sampler` {DEFAULT_SAMPLER} (the default)"
                                      " or another of them.") from None


def make_sampler(name: str, *, seed: int, n_trials: int | None = None,
                 population_size: int | None = None, concurrent: int = 1,
                 constraints_func: ConstraintsFunc | None = None) -> BaseSampler:
    """The sampler of strategy `name`, seeded (see `SamplerStrategy.build`)."""
    strategy = get_strategy(name)
    _check_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return strategy.build(seed=seed, n_trials=n_trials, constraints_func=constraints_func,
                              population_size=population_size, concurrent=concurrent)


# ---------------------------------------------------------------------------------------- feasible
class _Recorder:
    """A stand-in for an Optuna trial that records what `space.suggest` asks and answers each
    question with `choose(name, distribution)`."""

    def __init__(self, choose: Callable[[str, CategoricalDistribution], Any]) -> None:
        self.choose = choose
        self.params: dict[str, Any] = {}
        self.distributions: dict[str, BaseDistribution] = {}

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any:
        dist = CategoricalDistribution(list(choices))
        value = self.choose(name, dist)
        self.params[name] = value
        self.distributions[name] = dist
        return value


class FeasibleSampler(BaseSampler):
    """Wraps `base` so that every new trial's parameters form a feasible architecture of
    `space` (module docstring). Trials that already hold fixed parameters (enqueued ones) and
    re-asked RUNNING trials are left to `base`.

    Args:
        base: the sampler that proposes (any Optuna sampler).
        space: the search space (`suggest(trial_like)`, `constraints.violations(spec, cost)`,
            `sample_feasible`'s rules).
        estimate: the cost model (`spvit.cost.estimate`).
        max_attempts: draws of `base` per trial before a uniform feasible member is used.
        seed: seed of the uniform fallback (its generator is advanced per fallback).
        max_relative_draws: relative samples of `base` per trial (None: `GP_RELATIVE_DRAWS`
            for a GPSampler, else `max_attempts`).
    """

    def __init__(self, base: BaseSampler, *, space: Any, estimate: Callable[[Any], Any],
                 max_attempts: int = DEFAULT_MAX_ATTEMPTS, seed: int = 0,
                 max_relative_draws: int | None = None) -> None:
        whole_number("max_attempts", max_attempts, 1, f"Use e.g. {DEFAULT_MAX_ATTEMPTS}.")
        self.base = base
        self.space = space
        self.estimate = estimate
        self.max_attempts = max_attempts
        if max_relative_draws is None:
            gp = isinstance(base, optuna.samplers.GPSampler)
            max_relative_draws = GP_RELATIVE_DRAWS if gp else max_attempts
        self.max_relative_draws = max(1, int(max_relative_draws))
        self._rng = random.Random(seed)
        self._pending: dict[int, tuple[dict[str, BaseDistribution], dict[str, Any]]] = {}
        self.attempts_total = 0
        self.fallbacks = 0

    @classmethod
    def wrap(cls, sampler: BaseSampler, **kwargs: Any) -> FeasibleSampler:
        """`sampler` wrapped (a FeasibleSampler is re-wrapped around its base, never nested)."""
        if isinstance(sampler, FeasibleSampler):
            sampler = sampler.base
        return cls(sampler, **kwargs)

    # ------------------------------------------------------------------ proposing
    def _feasible(self, recorder: _Recorder | None, spec: Any) -> bool:
        if spec is None:
            return False
        return not list(self.space.constraints.violations(spec, self.estimate(spec)))

    def _draw(self, choose: Callable[[str, CategoricalDistribution], Any]) -> tuple[
            _Recorder, Any]:
        recorder = _Recorder(choose)
        try:
            spec = self.space.suggest(recorder)
        except ConfigError:
            spec = None  # an invalid combination counts as infeasible
        return recorder, spec

    def _propose(self, study: optuna.Study, trial: FrozenTrial) -> tuple[
            dict[str, BaseDistribution], dict[str, Any], int, bool]:
        relative_space = self.base.infer_relative_search_space(study, trial)
        recorder: _Recorder | None = None
        relative: dict[str, Any] | None = None
        relative_draws = 0
        attempt = 0
        while attempt < self.max_attempts:
            attempt += 1
            # A relative sample can be costly (GP fits its models and optimises the
            # acquisition): draw it at most `max_relative_draws` times, then redraw only the
            # independent parameters.
            if relative is None or relative_draws < self.max_relative_draws:
                relative = self.base.sample_relative(study, trial, relative_space)
                relative_draws += 1
            independent: list[str] = []

            def choose(name: str, dist: CategoricalDistribution,
                       relative: dict[str, Any] = relative,
                       independent: list[str] = independent) -> Any:
                if name in relative and relative_space.get(name) == dist \
                        and relative[name] in dist.choices:
                    return relative[name]
                independent.append(name)
                return self.base.sample_independent(study, trial, name, dist)

            recorder, spec = self._draw(choose)
            if self._feasible(recorder, spec):
                return recorder.distributions, recorder.params, attempt, False
            if not independent and relative_draws >= self.max_relative_draws:
                break  # every parameter is relative and the relative sample is spent
        tries = getattr(getattr(self.space, "search", None), "max_infeasible", 200)
        for _ in range(tries):
            recorder, spec = self._draw(
                lambda name, dist: dist.choices[self._rng.randrange(len(dist.choices))])
            if self._feasible(recorder, spec):
                return recorder.distributions, recorder.params, attempt, True
        # Nothing feasible found: hand over the last draw; SearchStudy rejects it as today.
        assert recorder is not None
        return recorder.distributions, recorder.params, attempt, True

    # ------------------------------------------------------------------ sampler protocol
    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.base.before_trial(study, trial)
        if trial.system_attrs.get("fixed_params") or trial.params:
            return
        dists, params, attempts, fallback = self._propose(study, trial)
        self._pending[optuna_compat.trial_id(trial)] = (dists, params)
        self.attempts_total += attempts
        self.fallbacks += int(fallback)
        optuna_compat.set_trial_system_attr(study, trial, PROPOSAL_ATTR,
                                            {"attempts": attempts, "fallback": fallback})

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial
                                    ) -> dict[str, BaseDistribution]:
        pending = self._pending.get(optuna_compat.trial_id(trial))
        if pending is None:
            return self.base.infer_relative_search_space(study, trial)
        return dict(pending[0])

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        pending = self._pending.get(optuna_compat.trial_id(trial))
        if pending is None:
            return self.base.sample_relative(study, trial, search_space)
        return {k: v for k, v in pending[1].items() if k in search_space}

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        return self.base.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState,
                    values: Sequence[float] | None) -> None:
        self._pending.pop(optuna_compat.trial_id(trial), None)
        self.base.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.base.reseed_rng()
        self._rng.seed()
