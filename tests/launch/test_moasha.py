"""launch.moasha: the multi-objective promotion rule and the scheduler's decisions (no Ray
instance is started)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from launch.moasha import MOASHAScheduler, non_dominated_fronts, promote, ranking
from nas import pareto
from nas import study as nas_study
from nas.storage import make_storage
from search_spaces.space import SearchSpace
from spvit.errors import ConfigError
from tests.tiny_space import changed, small_space, write_space


def _dominates(a, b) -> bool:
    """Plain reference: a is at least as good everywhere and better somewhere
    (accuracy up, gflops and params down)."""
    ge = a[0] >= b[0] and a[1] <= b[1] and a[2] <= b[2]
    gt = a[0] > b[0] or a[1] < b[1] or a[2] < b[2]
    return ge and gt


def _reference_fronts(points):
    rank = {}
    left = set(range(len(points)))
    level = 0
    while left:
        front = {i for i in left if not any(_dominates(points[j], points[i]) for j in left)}
        for i in front:
            rank[i] = level
        left -= front
        level += 1
    return rank


def test_fronts_match_a_plain_reference_on_random_points():
    rng = random.Random(0)
    for _ in range(30):
        pts = [(rng.choice([0.5, 0.7, 0.9]), rng.choice([1.0, 2.0]), rng.choice([10.0, 20.0]))
               for _ in range(rng.randint(1, 9))]
        ref = _reference_fronts(pts)
        for level, front in enumerate(non_dominated_fronts(pts)):
            assert all(ref[i] == level for i in front)
        assert sorted(ranking(pts)) == list(range(len(pts)))


def test_a_cheap_less_accurate_trial_is_promoted_where_accuracy_alone_would_stop_it():
    rung = [(0.90, 0.010, 9e4), (0.85, 0.012, 1e5), (0.60, 0.011, 9.5e4), (0.70, 0.001, 1e4)]
    # ASHA's rule: stop below the median accuracy of the trials recorded before (0.85)
    assert 0.70 < sorted(p[0] for p in rung[:3])[1]
    assert promote(rung, 3, 2.0)          # on the first front, so among the top 2
    assert not promote(rung, 1, 2.0)      # dominated by trial 0
    assert not promote(rung, 2, 2.0)


def test_crowding_breaks_ties_within_a_front():
    # all on one front; the middle point of the three-point curve is the most crowded
    rung = [(0.9, 3.0, 3.0), (0.8, 2.0, 2.0), (0.7, 1.0, 1.0), (0.85, 2.5, 2.5)]
    order = ranking(rung)
    assert set(order[:2]) == {0, 2}  # extremes first (infinite crowding distance)
    keep = math.ceil(4 / 3)
    assert [promote(rung, i, 3.0) for i in range(4)] == [i in order[:keep] for i in range(4)]


def test_promote_rejects_a_bad_index():
    with pytest.raises(IndexError):
        promote([(0.5, 1.0, 1.0)], 1, 2.0)


def _scheduler(costs, **kwargs) -> MOASHAScheduler:
    return MOASHAScheduler(max_t=8, cost_of=lambda config: costs[config["id"]], **kwargs)


class _Trial:
    def __init__(self, trial_id: str) -> None:
        self.trial_id = trial_id
        self.config = {"id": trial_id}


def test_rungs_and_decisions_of_the_scheduler():
    costs = {"a": (0.01, 9e4), "b": (0.012, 1e5), "c": (0.001, 1e4)}
    s = _scheduler(costs)
    assert s.milestones == [1, 2, 4]
    for t in costs:
        s.on_trial_add(None, _Trial(t))
    assert s.on_trial_result(None, _Trial("a"), {"epoch": 1, "val_acc": 0.9}) == "CONTINUE"
    assert s.on_trial_result(None, _Trial("b"), {"epoch": 1, "val_acc": 0.8}) == "STOP"
    assert s.on_trial_result(None, _Trial("c"), {"epoch": 1, "val_acc": 0.5}) == "CONTINUE"
    assert s.stopped == {"b": 1}
    # between rungs and at the full budget nothing is decided
    assert s.on_trial_result(None, _Trial("a"), {"epoch": 1, "val_acc": 0.1}) == "CONTINUE"
    assert s.on_trial_result(None, _Trial("c"), {"epoch": 8, "val_acc": 0.1}) == "CONTINUE"


def test_a_paused_trial_is_promoted_once_weaker_trials_reach_its_rung():
    # a, then b and c at rung 1 (rf 2): b is paused on arrival (keep 1 of 2); c is dominated by
    # both, so with 3 points b is in the top 2 and is promoted; c never is.
    costs = {"a": (0.001, 1e4), "b": (0.002, 2e4), "c": (0.003, 3e4)}
    s = _scheduler(costs)
    for t in costs:
        s.on_trial_add(None, _Trial(t))
    assert s.on_trial_result(None, _Trial("a"), {"epoch": 1, "val_acc": 0.9}) == "CONTINUE"
    assert s.on_trial_result(None, _Trial("b"), {"epoch": 1, "val_acc": 0.8}) == "STOP"
    assert s.is_paused("b") and s.take_promotion() is None  # 1 of 2 kept: still a
    assert s.on_trial_result(None, _Trial("c"), {"epoch": 1, "val_acc": 0.7}) == "STOP"
    assert s.take_promotion(ready={"c"}) is None  # only what the caller holds
    assert s.take_promotion() == "b" and not s.is_paused("b") and s.promoted == {"b": [1]}
    assert s.take_promotion() is None and s.is_paused("c")
    # the promoted trial, resumed at epoch 2, is decided at rung 2, not again at rung 1
    assert s.on_trial_result(None, _Trial("b"), {"epoch": 2, "val_acc": 0.85}) == "CONTINUE"
    stopping = _scheduler(costs, promotion=False)
    for t in costs:
        stopping.on_trial_add(None, _Trial(t))
    for t, acc in (("a", 0.9), ("b", 0.8), ("c", 0.7)):
        stopping.on_trial_result(None, _Trial(t), {"epoch": 1, "val_acc": acc})
    assert stopping.take_promotion() is None and not stopping.is_paused("b")


def test_bad_settings_say_the_rule():
    with pytest.raises(ConfigError, match="reduction_factor must be > 1"):
        MOASHAScheduler(max_t=4, reduction_factor=1)
    with pytest.raises(ConfigError, match="grace_period must be in"):
        MOASHAScheduler(max_t=4, grace_period=5)


SPACE = small_space(constraints=None, training={"epochs": 4}, search={"trials": 6})


def test_stopped_trials_end_pruned_with_their_fidelity_and_never_on_the_front(tmp_path: Path):
    """The searcher's path for a stopped trial (tell_result with the rung's epoch), driven by
    the scheduler's decisions on a study."""
    space = SearchSpace.load(write_space(tmp_path / "space.yaml", SPACE))
    study = nas_study.open_study(make_storage(None, tmp_path), study_name="s",
                                 sampler=optuna.samplers.RandomSampler(seed=0), resume=False)
    ss = nas_study.SearchStudy(study, space, run_dir=tmp_path, budget=4)
    candidates = [ss.ask() for _ in range(6)]
    costs = {str(c.number): (c.gflops, float(c.params)) for c in candidates}
    sched = MOASHAScheduler(max_t=4, cost_of=lambda config: costs[config["id"]])
    rng = random.Random(1)
    for c in candidates:
        sched.on_trial_add(None, _Trial(str(c.number)))
    for c in candidates:
        last = None
        for epoch in range(1, 5):
            acc = round(0.3 + 0.1 * epoch * rng.random(), 4)
            last = {"epoch": epoch, "val_acc": acc}
            ss.record_epoch(c, last)
            if sched.on_trial_result(None, _Trial(str(c.number)), last) == "STOP":
                break
        ss.tell_result(c, last)
    assert sched.stopped  # some trials were stopped early
    front = {t.number for t in pareto.pareto_trials(study)}
    for c in candidates:
        t = ss._frozen(c.number)
        if str(c.number) in sched.stopped:
            assert t.state == TrialState.PRUNED
            assert t.user_attrs["fidelity"] == sched.stopped[str(c.number)] < 4
            assert c.number not in front
        else:
            assert t.state == TrialState.COMPLETE
    assert front and all(ss._frozen(n).state == TrialState.COMPLETE for n in front)


def _moasha_search(tmp_path: Path, name: str, reduction_factor: float):
    """A 4-trial MOASHA search over SPACE at 2 epochs, one trial at a time: (run_dir, study)."""
    from launch.search import EXIT_OK, SearchRequest, run_search

    path = write_space(tmp_path / "space.yaml",
                       changed(SPACE, training={"epochs": 2, "augment": False}))
    run_dir = tmp_path / name
    outcome = run_search(SearchRequest(out=run_dir, space=path, trials=4, concurrent=1,
                                       scheduler="moasha",
                                       asha_reduction_factor=reduction_factor,
                                       export=False),
                         say=lambda line: None)
    assert outcome.exit_code == EXIT_OK, outcome.message
    return run_dir, optuna.load_study(study_name=name, storage=make_storage(None, run_dir))


@pytest.mark.slow
def test_a_search_with_moasha_prunes_by_rung_and_keeps_the_front_full_budget(tmp_path,
                                                                           ray_local):
    run_dir, study = _moasha_search(tmp_path, "moasha", 4)
    assert nas_study.RunInfo.load(run_dir).scheduler == "moasha"
    trials = [t for t in study.trials if t.user_attrs.get("duplicate_of") is None]
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert pruned, "with rf 4 a rung keeps one of its first four trials"
    assert all(t.user_attrs["fidelity"] == 1 and t.values is None for t in pruned)
    front = pareto.pareto_trials(study)
    assert front and all(pareto.is_full_fidelity(t) for t in front)
    assert not {t.number for t in front} & {t.number for t in pruned}


@pytest.mark.slow
def test_a_promoted_trial_resumes_from_its_checkpoint_and_pruned_ones_never_reach_the_front(
        tmp_path, ray_local, monkeypatch):
    """The real path (Ray Tune, DeepSpeed): rungs ranked by arrival (deterministic), 4 trials
    one at a time, rf 2, a rung at epoch 1 of 2. The second trial is paused at epoch 1 and
    promoted when the third arrives; it finishes in a second process that resumes from its
    epoch-1 checkpoint (its two epochs carry two start-up times)."""
    from launch import moasha

    monkeypatch.setattr(moasha, "ranking", lambda points: list(range(len(points))))
    run_dir, study = _moasha_search(tmp_path, "promote", 2)
    trials = sorted((t for t in study.trials if t.user_attrs.get("duplicate_of") is None
                     and not t.user_attrs.get("infeasible")), key=lambda t: t.number)
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.COMPLETE,
                                         TrialState.PRUNED, TrialState.PRUNED]
    promoted = trials[1]
    assert promoted.user_attrs["paused_at"] == 1 and promoted.user_attrs["fidelity"] == 2
    lines = [json.loads(x) for x in (run_dir / promoted.user_attrs["trial_dir"]
                                     / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2]
    assert lines[0]["startup_s"] != lines[1]["startup_s"]  # two processes: resumed, not rerun
    for t in trials[2:]:
        assert t.values is None and t.user_attrs["fidelity"] == 1 == t.user_attrs["paused_at"]
    front = pareto.pareto_trials(study)
    assert front and {t.number for t in front} <= {trials[0].number, trials[1].number}
