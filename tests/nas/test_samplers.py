"""nas.samplers: the strategy registry, the auto rules and feasible proposals (no Ray)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from nas import samplers
from nas import study as nas_study
from nas.storage import make_storage
from search_spaces.space import Constraints, SearchSpace
from spvit.cost import estimate
from spvit.errors import ConfigError
from tests.tiny_space import small_space, write_space

SPACE = small_space(dimensions={"depth": [1, 2, 3], "embed_dim": [16, 32, 48]},
                    search={"concurrent": 2, "population_size": 2})


@pytest.fixture
def space(tmp_path: Path) -> SearchSpace:
    return SearchSpace.load(write_space(tmp_path / "space.yaml", SPACE))


def _search_study(run_dir: Path, space: SearchSpace, sampler: optuna.samplers.BaseSampler,
                  **kwargs) -> nas_study.SearchStudy:
    study = nas_study.open_study(make_storage(None, run_dir), study_name="s", sampler=sampler,
                                 resume=False)
    return nas_study.SearchStudy(study, space, run_dir=run_dir, budget=1, **kwargs)


def _proxy_accuracy(params: int) -> float:
    return 1.0 - math.exp(-params / 5000)


# ------------------------------------------------------------------------------------ registry
@pytest.mark.parametrize("name, cls", [
    ("nsga2", optuna.samplers.NSGAIISampler), ("tpe", optuna.samplers.TPESampler),
    ("gp", optuna.samplers.GPSampler), ("random", optuna.samplers.RandomSampler),
    ("qmc", optuna.samplers.QMCSampler), ("auto", optuna.samplers.TPESampler)])
def test_every_name_builds_its_sampler(name, cls):
    assert type(samplers.make_sampler(name, seed=1, n_trials=30)) is cls
    assert samplers.get_strategy(name).name == name


def test_study_make_sampler_delegates_to_the_registry():
    assert nas_study.SAMPLERS == samplers.SAMPLER_NAMES
    assert type(nas_study.make_sampler("auto", seed=0, n_trials=300)) is \
        optuna.samplers.NSGAIISampler


def test_tpe_is_multivariate_grouped_and_lies_only_for_concurrent_trials():
    alone = samplers.make_sampler("tpe", seed=0, n_trials=30, concurrent=1)
    together = samplers.make_sampler("tpe", seed=0, n_trials=30, concurrent=2)
    assert alone._multivariate and alone._group
    assert not alone._constant_liar and together._constant_liar
    assert alone._n_startup_trials == 7  # 30 // 4, at most Optuna's 10


def test_auto_rule_switches_from_tpe_to_nsga2_at_250_trials():
    auto = samplers.STRATEGIES["auto"]
    assert auto.choose(None).name == "tpe"
    assert auto.choose(249).name == "tpe"
    assert auto.choose(250).name == "nsga2"
    big = samplers.make_sampler("auto", seed=0, n_trials=400)
    assert big._population_size == samplers.default_population_size(400) == 50


def test_nsga2_population_follows_the_budget_unless_given():
    assert samplers.make_sampler("nsga2", seed=0, n_trials=30)._population_size == 7
    assert samplers.make_sampler("nsga2", seed=0, n_trials=30,
                                 population_size=6)._population_size == 6
    assert samplers.make_sampler("nsga2", seed=0)._population_size == 50


def test_bad_names_seeds_and_populations_say_the_rule():
    with pytest.raises(ConfigError, match="sampler must be one of"):
        samplers.make_sampler("cmaes", seed=0)
    with pytest.raises(ConfigError, match="seed must be an integer >= 0"):
        samplers.make_sampler("tpe", seed=-1)
    with pytest.raises(ConfigError, match="population_size must be an integer >= 2"):
        samplers.make_sampler("nsga2", seed=0, population_size=1)


# ------------------------------------------------------------------------------------ feasible
def _run(ss: nas_study.SearchStudy, n: int) -> list:
    out = []
    for _ in range(n):
        c = ss.ask()
        ss.tell_result(c, {"epoch": 1, "val_acc": _proxy_accuracy(c.params)})
        out.append(c)
    return out


@pytest.mark.parametrize("name", ["random", "nsga2", "tpe"])
def test_feasible_proposals_leave_no_rejected_trial(tmp_path, space, name):
    before = _search_study(tmp_path / "a", space,
                           samplers.make_sampler(name, seed=0, n_trials=16, population_size=4),
                           feasible_proposals=False, max_infeasible_tries=40)
    try:
        _run(before, 16)
    except ConfigError:
        pass  # plain TPE here keeps proposing the infeasible region it cannot learn of
    after = _search_study(tmp_path / "b", space,
                          samplers.make_sampler(name, seed=0, n_trials=16, population_size=4))
    candidates = _run(after, 16)
    assert before.infeasible_count > 0  # the space rejects a good share of plain proposals
    assert after.infeasible_count == 0
    for c in candidates:
        assert estimate(c.spec).params <= 15000  # the constraint, checked independently
    trials = after.study.get_trials(deepcopy=False)
    assert all(t.state == TrialState.COMPLETE or t.user_attrs.get("duplicate_of") is not None
               for t in trials)
    assert all(samplers.PROPOSAL_ATTR in t.system_attrs for t in trials)


def test_wrapping_does_not_change_proposals_where_everything_is_feasible(tmp_path, space):
    free = dataclasses.replace(space, constraints=Constraints())
    plain = _search_study(tmp_path / "a", free, optuna.samplers.RandomSampler(seed=5),
                          feasible_proposals=False)
    wrapped = _search_study(tmp_path / "b", free, optuna.samplers.RandomSampler(seed=5))
    assert isinstance(wrapped.study.sampler, samplers.FeasibleSampler)
    assert [c.spec for c in _run(plain, 6)] == [c.spec for c in _run(wrapped, 6)]


def test_wrapping_twice_never_nests(space):
    base = optuna.samplers.RandomSampler(seed=0)
    once = samplers.FeasibleSampler.wrap(base, space=space, estimate=estimate)
    twice = samplers.FeasibleSampler.wrap(once, space=space, estimate=estimate)
    assert twice.base is base


def test_an_infeasible_only_sampler_falls_back_to_a_feasible_member(tmp_path, space):
    class Widest(optuna.samplers.RandomSampler):
        """Always the last (largest) choice: depth 3, width 48 break max_params."""

        def sample_independent(self, study, trial, name, dist):
            return dist.choices[-1]

    ss = _search_study(tmp_path, space, Widest(seed=0))
    c = ss.ask()
    assert estimate(c.spec).params <= 15000 and ss.infeasible_count == 0
    proposal = ss._frozen(c.number).system_attrs[samplers.PROPOSAL_ATTR]
    assert proposal == {"attempts": samplers.DEFAULT_MAX_ATTEMPTS, "fallback": True}


def test_nothing_feasible_is_still_rejected_and_never_trained(tmp_path, space):
    strict = dataclasses.replace(space, constraints=Constraints(max_params=10))
    ss = _search_study(tmp_path, strict, optuna.samplers.RandomSampler(seed=0),
                       max_infeasible_tries=3)
    with pytest.raises(ConfigError, match="rejected 3 samples in a row"):
        ss.ask()
    trials = ss.study.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.FAIL] * 3
    assert all("trial_dir" not in t.user_attrs for t in trials)


def test_sampler_names_agree_with_the_space_loader():
    from search_spaces.search_defaults import SAMPLERS

    assert tuple(samplers.SAMPLER_NAMES) == SAMPLERS
