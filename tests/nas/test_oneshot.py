"""One-shot search: proxy study, selection for retraining, only stand-alone results on the front."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import optuna
import pytest

from nas import optuna_compat, pareto
from nas import study as nas_study
from nas.oneshot import (
    PROXY_ATTR,
    _crowding,
    _ranks,
    ask_feasible,
    enqueue_for_retrain,
    run_proxy_search,
    select_for_retrain,
    summarise_proxy,
    supernet_choices,
)
from search_spaces.space import SearchSpace
from spvit.arch import ArchSpec
from spvit.errors import ConfigError

SPACES = Path(__file__).resolve().parents[2] / "search_spaces"


def _fake_score(spec: ArchSpec) -> dict[str, float]:
    # a deterministic stand-in for inherited-weight accuracy
    return {"val_acc": 0.5 + spec.embed_dim / 200 + 0.05 * spec.depth
            - 0.01 * sum(b.pool for b in spec.blocks)}


def test_ranks_and_crowding_match_a_hand_worked_example():
    losses = np.array([[0, 3], [1, 1], [3, 0], [2, 2], [3, 3], [1.5, 1.5]], dtype=float)
    # (1.5, 1.5) dominates (2, 2), which dominates (3, 3)
    assert _ranks(losses).tolist() == [0, 0, 0, 2, 3, 1]
    front = losses[:3]
    crowd = _crowding(front)
    assert np.isinf(crowd[0]) and np.isinf(crowd[2])
    # middle point: (3 - 0) / 3 per objective, summed over both
    assert crowd[1] == pytest.approx(2.0)


def test_proxy_search_counts_feasible_candidates_and_reuses_scores():
    space = SearchSpace.load(SPACES / "digits.yaml")
    calls = []

    def scorer(spec):
        calls.append(spec)
        return _fake_score(spec)

    study = run_proxy_search(space, scorer, candidates=40, seed=0)
    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    assert len(done) == 40
    for t in done:
        spec = ArchSpec.from_dict(t.user_attrs["arch"])
        assert not space.constraints.violations(spec)
        assert t.values[0] == pytest.approx(_fake_score(spec)["val_acc"])
    assert len(calls) == len({json.dumps(t.user_attrs["arch"], sort_keys=True) for t in done})
    summary = summarise_proxy(study)
    assert summary.candidates == 40 and summary.seconds_per_candidate >= 0


def test_infeasible_proposals_are_told_fail_and_never_scored():
    data = SearchSpace.load(SPACES / "digits.yaml").to_dict()
    data["constraints"]["max_params"] = 60000  # rejects a good part of the digits space
    space = SearchSpace.from_dict(data)
    calls = []

    def scorer(spec):
        calls.append(spec)
        return _fake_score(spec)

    study = run_proxy_search(space, scorer, candidates=30, seed=2)
    trials = study.get_trials(deepcopy=False)
    failed = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 30 and failed
    assert len(failed) + len(complete) == len(trials)  # nothing PRUNED or left RUNNING
    for t in failed:
        spec = ArchSpec.from_dict(t.user_attrs["arch"])
        assert space.constraints.violations(spec)
        assert t.user_attrs["infeasible"] and t.user_attrs["fail_reason"].startswith("infeasible")
        assert optuna_compat.constraint_values(t)["max_params"] > 0
    for t in complete:
        assert optuna_compat.constraint_values(t)["max_params"] <= 0
    assert all(not space.constraints.violations(s) for s in calls)


def test_ask_feasible_gives_up_with_one_line_when_nothing_fits():
    data = SearchSpace.load(SPACES / "digits.yaml").to_dict()
    space = SearchSpace.from_dict(data)
    data["constraints"]["max_params"] = 10  # nothing fits
    impossible = SearchSpace.from_dict(data, check_feasible=False)
    study = optuna.create_study(directions=list(nas_study.DIRECTIONS),
                                sampler=nas_study.make_sampler("random", seed=0))
    with pytest.raises(ConfigError, match=r"rejected 5 proposals in a row .*max_params"):
        ask_feasible(study, impossible, max_tries=5)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.FAIL] * 5
    proposal = ask_feasible(study, space)
    assert proposal.trial.number == 5 and not space.constraints.violations(proposal.spec)


def test_only_stand_alone_results_reach_the_main_front(tmp_path):
    space = SearchSpace.load(SPACES / "digits.yaml")
    proxy = run_proxy_search(space, _fake_score, candidates=60, seed=1)
    complete = proxy.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    picks = select_for_retrain(complete, 5)
    assert len(picks) == 5
    assert len({json.dumps(t.user_attrs["arch"], sort_keys=True) for t in picks}) == 5
    # the picks start with the proxy front
    losses = np.array([[-t.values[0], t.values[1], t.values[2]] for t in complete])
    front = {t.number for t, keep in zip(complete, pareto.non_dominated(losses), strict=True)
             if keep}
    front_archs = {json.dumps(t.user_attrs["arch"], sort_keys=True) for t in complete
                   if t.number in front}
    assert json.dumps(picks[0].user_attrs["arch"], sort_keys=True) in front_archs

    main = nas_study.open_study(optuna.storages.InMemoryStorage(), study_name="main",
                                sampler=nas_study.make_sampler("random", seed=0), resume=False)
    assert enqueue_for_retrain(main, picks, proxy_study=proxy.study_name) == 5
    assert enqueue_for_retrain(main, picks, proxy_study=proxy.study_name) == 0  # no doubles
    search = nas_study.SearchStudy(main, space, run_dir=tmp_path, budget=2)
    trained = {}
    for i in range(5):
        candidate = search.ask()
        # stand-alone accuracy: deliberately unlike the proxy score
        acc = 0.3 + 0.1 * i
        trained[candidate.number] = acc
        search.tell_result(candidate, {"epoch": 2, "val_acc": acc})
    trials = main.get_trials(deepcopy=False)
    assert {json.dumps(t.user_attrs["arch"], sort_keys=True) for t in trials} == \
        {json.dumps(t.user_attrs["arch"], sort_keys=True) for t in picks}
    for t in pareto.pareto_trials(main):
        assert t.values[0] == trained[t.number]  # the stand-alone result, never the proxy
        assert PROXY_ATTR in t.user_attrs and t.user_attrs["proxy_study"] == proxy.study_name
    proxies = {t.number: t.values[0] for t in picks}
    assert all(t.user_attrs[PROXY_ATTR] == proxies[t.user_attrs["proxy_trial"]] for t in trials)


def test_select_refuses_bad_k():
    with pytest.raises(ValueError, match="--retrain must be an integer >= 1"):
        select_for_retrain([SimpleNamespace(values=[0.5, 1, 1], user_attrs={"arch": {}})], 0)


def test_free_pool_spaces_give_every_schedule():
    data = SearchSpace.load(SPACES / "digits.yaml").to_dict()
    data["dimensions"]["pool"] = {"free": True, "max_pools": 2, "from_block": 1}
    space = SearchSpace.from_dict(data)
    schedules = supernet_choices(space).pool_schedules
    assert () in schedules and (1, 3) in schedules and (1, 2, 3) not in schedules


def test_choices_of_the_shipped_spaces_follow_the_new_fields():
    choices = supernet_choices(SearchSpace.load(SPACES / "cifar.yaml"))
    assert choices.pos_embeds == ("learned_sincos",)
    assert "decay" in choices.prior_types
    # the spaces do not search residual scaling or the conv pos placement: ArchSpec defaults
    assert choices.skip_lams == (1.0,) and choices.conv_pos_places == ("before_attn",)
