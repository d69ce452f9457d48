"""launch.searcher and the planning half of launch.search, driven by hand (no Ray instance)."""

from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path
from types import SimpleNamespace

import pytest
from optuna.trial import TrialState
from ray.tune.search import Searcher

from launch.search import SearchRequest, plan_search
from launch.searcher import StudySearcher, TrialErrors, summarize_error
from nas import study as nas_study
from nas.storage import make_storage
from search_spaces.space import Constraints, SearchSpace
from spvit.arch import ArchSpec
from spvit.errors import ConfigError
from tests.tiny_space import changed, small_space, write_space

SPACE = small_space(search={"trials": 5, "concurrent": 2, "population_size": 2,
                            "max_consecutive_failures": 2})


@pytest.fixture
def space_file(tmp_path: Path) -> Path:
    return write_space(tmp_path / "tiny.yaml", SPACE)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _searcher(run_dir: Path, space_file: Path, *, trials: int = 3, space=None, **kwargs):
    space = space or SearchSpace.load(space_file)
    study = nas_study.open_study(make_storage(None, run_dir), study_name="s",
                                 sampler=nas_study.make_sampler("random", seed=0), resume=False)
    ss = nas_study.SearchStudy(study, space, run_dir=run_dir, budget=2)
    clock = Clock()
    searcher = StudySearcher(ss, trials=trials, base_config={"training": {"epochs": 2},
                                                             "workers": 1, "use_gpu": False},
                             clock=clock, **kwargs)
    return searcher, ss, clock


def _state(ss, number):
    return ss._frozen(number)


def test_suggest_builds_trial_configs_until_the_budget_is_spent(tmp_path, space_file):
    searcher, ss, _ = _searcher(tmp_path, space_file, trials=3)
    configs = [searcher.suggest(f"t{i}") for i in range(3)]
    assert searcher.suggest("t3") == Searcher.FINISHED
    numbers = searcher.launched
    assert len(numbers) == len(set(numbers)) == 3
    for number, config in zip(numbers, configs, strict=True):
        assert config["training"] == {"epochs": 2} and config["workers"] == 1
        assert config["use_gpu"] is False
        assert config["trial_dir"] == str(tmp_path.resolve() / f"trials/{number:04d}")
        assert ArchSpec.from_dict(config["arch"]).to_flat() == config["arch"]
    # proposals are drawn inside the feasible region (nas.samplers.FeasibleSampler): nothing
    # is rejected on the way (rejections that do happen are not counted: tests/nas/test_study)
    infeasible = [t for t in ss.study.get_trials() if t.user_attrs.get("infeasible")]
    assert infeasible == []
    assert ss.counted_trials() == 3


def test_results_are_told_by_fidelity_and_failures_by_reason(tmp_path, space_file):
    errors = {"tid-crash": "ray.exceptions.OutOfMemoryError: Task was killed"}
    searcher, ss, clock = _searcher(tmp_path, space_file, trials=5,
                                    error_lookup=errors.get, max_consecutive_failures=5)
    ids = ["tid-full", "tid-asha", "tid-nan", "tid-crash", "tid-quiet"]
    for tid in ids:
        searcher.suggest(tid)
    number = dict(zip(ids, searcher.launched, strict=True))
    for tid in ids:
        if tid != "tid-asha":  # Tune does not pass on the result a scheduler stops on
            searcher.on_trial_result(tid, {"epoch": 1, "val_acc": 0.25})
    clock.now += 7.0
    searcher.on_trial_complete("tid-full", {"epoch": 2, "val_acc": 0.5})
    searcher.on_trial_complete("tid-asha", {"epoch": 1, "val_acc": 0.25})  # stopped by ASHA
    nan_dir = tmp_path / f"trials/{number['tid-nan']:04d}"
    nan_dir.mkdir(parents=True)
    (nan_dir / "failure.json").write_text(json.dumps({"reason": "loss is nan at epoch 1"}))
    searcher.on_trial_complete("tid-nan", None, error=True)
    searcher.on_trial_complete("tid-crash", None, error=True)
    searcher.on_trial_complete("tid-quiet", None, error=True)

    full = _state(ss, number["tid-full"])
    assert full.state == TrialState.COMPLETE and full.values[0] == 0.5
    assert full.user_attrs["wall_s"] == 7.0 and full.user_attrs["val_acc_last"] == 0.5
    pruned = _state(ss, number["tid-asha"])
    assert pruned.state == TrialState.PRUNED and pruned.user_attrs["fidelity"] == 1
    assert pruned.user_attrs["val_acc_last"] == 0.25 and pruned.intermediate_values == {}
    assert _state(ss, number["tid-nan"]).user_attrs["fail_reason"] == "loss is nan at epoch 1"
    assert "OutOfMemoryError" in _state(ss, number["tid-crash"]).user_attrs["fail_reason"]
    assert "without a failure.json" in _state(ss, number["tid-quiet"]).user_attrs["fail_reason"]
    assert searcher.outcomes == {"COMPLETE": 1, "PRUNED": 1, "FAIL": 3}
    assert not searcher.stopped and searcher.live_numbers == []


def test_a_failure_json_turns_a_normal_return_into_a_failure(tmp_path, space_file):
    searcher, ss, _ = _searcher(tmp_path, space_file)
    searcher.suggest("a")
    number = searcher.launched[0]
    folder = tmp_path / f"trials/{number:04d}"
    folder.mkdir(parents=True)
    (folder / "failure.json").write_text(json.dumps({"reason": "loss is inf at epoch 1"}))
    searcher.on_trial_complete("a", {"epoch": 1, "val_acc": 0.1})
    frozen = _state(ss, number)
    assert frozen.state == TrialState.FAIL
    assert frozen.user_attrs["fail_reason"] == "loss is inf at epoch 1"


def test_consecutive_failures_stop_the_search(tmp_path, space_file):
    searcher, ss, _ = _searcher(tmp_path, space_file, trials=5, max_consecutive_failures=2,
                                error_lookup=lambda tid: "RuntimeError: boom")
    for tid in ("a", "b", "c"):
        searcher.suggest(tid)
    searcher.on_trial_complete("a", None, error=True)
    assert not searcher.stopped
    searcher.on_trial_complete("b", None, error=True)
    assert searcher.stopped and "2 trials failed in a row" in searcher.stop_reason
    assert "RuntimeError: boom" in searcher.stop_reason
    assert searcher.suggest("d") == Searcher.FINISHED
    # the trial still in flight is left RUNNING: a resumed search continues it
    assert _state(ss, searcher.launched[2]).state == TrialState.RUNNING


def test_an_unsatisfiable_space_ends_the_search_with_its_error(tmp_path, space_file):
    strict = dataclasses.replace(SearchSpace.load(space_file),
                                 constraints=Constraints(max_params=10))
    searcher, ss, _ = _searcher(tmp_path, space_file, space=strict)
    ss.max_infeasible_tries = 4
    assert searcher.suggest("a") == Searcher.FINISHED
    assert isinstance(searcher.error, ConfigError) and searcher.stopped
    assert "rejected 4 samples in a row" in str(searcher.error)


def test_adopted_trials_run_first_and_are_not_counted_twice(tmp_path, space_file):
    searcher, ss, _ = _searcher(tmp_path, space_file, trials=3)
    searcher.suggest("a")
    searcher.suggest("b")
    searcher.on_trial_complete("a", {"epoch": 2, "val_acc": 0.4})
    orphan = searcher.launched[1]  # left RUNNING, as by a killed driver
    space = SearchSpace.load(space_file)
    study = nas_study.open_study(make_storage(None, tmp_path), study_name="s",
                                 sampler=nas_study.make_sampler("random", seed=1), resume=True)
    ss2 = nas_study.SearchStudy(study, space, run_dir=tmp_path, budget=2)
    adopt = ss2.adoptable()
    resumed = StudySearcher(ss2, trials=3, base_config={}, adopt=adopt)
    assert resumed.remaining == 1
    first = resumed.suggest("x")
    assert resumed.launched == [orphan]
    assert first["trial_dir"].endswith(f"trials/{orphan:04d}")
    resumed.suggest("y")
    assert resumed.suggest("z") == Searcher.FINISHED
    assert len(resumed.launched) == 2 and ss2.counted_trials() == 3


def test_summarize_error_picks_the_exception_line():
    dump = ("ray::ImplicitFunc.train() (pid=1, ip=127.0.0.1)\n"
            '  File "x.py", line 3, in f\n    raise TrialFailed(reason)\n'
            "launch.trial.TrialFailed: loss is nan at epoch 1, step 4\n")
    assert summarize_error(dump) == "launch.trial.TrialFailed: loss is nan at epoch 1, step 4"
    assert summarize_error("no exception here\nlast words\n") == "last words"
    assert summarize_error("") == ""


def test_trial_errors_reads_the_error_file_tune_wrote(tmp_path):
    path = tmp_path / "error.txt"
    path.write_text("Failure # 1\nTraceback...\nValueError: bad shape\n", encoding="utf-8")
    errors = TrialErrors()
    errors.on_trial_start(0, [], SimpleNamespace(trial_id="t1", error_file=str(path)))
    errors.on_trial_start(0, [], SimpleNamespace(trial_id="t2", error_file=None))
    assert errors.error_of("t1") == "ValueError: bad shape"
    assert errors.error_of("t2") is None and errors.error_of("nope") is None


def test_searcher_and_callback_are_ray_tune_classes_that_pickle_by_name(tmp_path, space_file):
    """Built on Ray Tune's bases at first lookup, yet importable (and so picklable, as Tune
    pickles its searcher into tuner.pkl) under their own names."""
    from ray.tune.callback import Callback

    import launch.searcher

    searcher, _, _ = _searcher(tmp_path, space_file, trials=1)
    assert isinstance(searcher, Searcher) and isinstance(TrialErrors(), Callback)
    assert launch.searcher.StudySearcher is StudySearcher
    assert f"{StudySearcher.__module__}.{StudySearcher.__qualname__}" == \
        "launch.searcher.StudySearcher"
    assert launch.searcher.FINISHED == Searcher.FINISHED
    copy = pickle.loads(pickle.dumps(searcher))
    assert type(copy) is StudySearcher and copy.trials == 1
    assert copy.metric == "val_acc" and copy.mode == "max"
    assert type(pickle.loads(pickle.dumps(TrialErrors()))) is TrialErrors
    with pytest.raises(AttributeError, match="no attribute 'Nothing'"):
        launch.searcher.Nothing  # noqa: B018


# ------------------------------------------------------------------------------------ planning
def test_plan_takes_defaults_from_the_space_and_flags_over_them(tmp_path, space_file):
    plan = plan_search(SearchRequest(out=tmp_path / "run", space=space_file))
    info = plan.info
    assert (info.trials, info.concurrent, info.epochs, info.sampler) == (5, 2, 2, "auto")
    assert info.population_size == 2 and info.max_consecutive_failures == 2
    assert info.study_name == "run" and info.storage.endswith("run/study.journal")
    plan = plan_search(SearchRequest(out=tmp_path / "run", space=space_file, trials=7,
                                     epochs=3, sampler="tpe", seed=4))
    assert (plan.info.trials, plan.info.epochs, plan.space.training.epochs) == (7, 3, 3)
    assert plan.info.sampler == "tpe" and plan.info.population_size is None
    assert plan.info.training["epochs"] == 3
    off = plan_search(SearchRequest(out=tmp_path / "run", space=space_file,
                                    feasible_proposals=False))
    assert off.info.feasible_proposals is False
    assert not (tmp_path / "run").exists()  # planning touches nothing


@pytest.mark.parametrize("request_changes, message", [
    ({"trials": 0}, "--trials must be an integer >= 1"),
    ({"gpus_per_worker": 0.5}, "--gpus-per-worker must be 0"),
    ({"asha_reduction_factor": 1.0}, "--asha-reduction-factor must be a number > 1"),
    ({"space": None}, "a new search needs a space"),
])
def test_plan_rejects_bad_requests(tmp_path, space_file, request_changes, message):
    kwargs = {"out": tmp_path / "run", "space": space_file, **request_changes}
    with pytest.raises(ConfigError, match=message):
        plan_search(SearchRequest(**kwargs))


def test_plan_refuses_a_folder_holding_a_study_and_resume_checks_it(tmp_path, space_file):
    run_dir = tmp_path / "run"
    plan = plan_search(SearchRequest(out=run_dir, space=space_file))
    run_dir.mkdir()
    plan.space.save(run_dir / "space.yaml")
    plan.info.save(run_dir)
    journal = run_dir / "study.journal"
    journal.write_bytes(b"")
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    with pytest.raises(ConfigError, match="already holds a search.*--resume"):
        plan_search(SearchRequest(out=run_dir, space=space_file))
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before
    resumed = plan_search(SearchRequest(out=run_dir, resume=True, trials=9))
    assert resumed.info.trials == 9 and resumed.url is None
    assert resumed.space.to_dict() == plan.space.to_dict()
    with pytest.raises(ConfigError, match="--epochs 5 differs from 2"):
        plan_search(SearchRequest(out=run_dir, resume=True, epochs=5))
    other = write_space(tmp_path / "other.yaml", changed(SPACE, dimensions={"depth": [1, 3]}))
    with pytest.raises(ConfigError, match="differs from the run's resolved"):
        plan_search(SearchRequest(out=run_dir, resume=True, space=other))
    plan_search(SearchRequest(out=run_dir, resume=True, space=space_file))
    with pytest.raises(ConfigError, match="keeps its study in"):
        plan_search(SearchRequest(out=run_dir, resume=True, storage="sqlite:///x.db"))
    assert plan.info.feasible_proposals is True
    with pytest.raises(ConfigError, match="--no-feasible-proposals False differs from True.*"
                                          "Drop --no-feasible-proposals"):
        plan_search(SearchRequest(out=run_dir, resume=True, feasible_proposals=False))
    with pytest.raises(ConfigError, match="cannot resume"):
        plan_search(SearchRequest(out=tmp_path / "empty", resume=True))


# ------------------------------------------------------------------------------------ promotion
def test_paused_trials_are_resumed_when_promoted_and_pruned_when_never(tmp_path, space_file,
                                                                       monkeypatch):
    """MOASHA's promotion with the searcher, driven by hand: rungs ranked by arrival (a
    deterministic stand-in for non-dominated sorting), 4 trials, rf 2, a rung at epoch 1 of 2.
    t0 goes on; t1 and t2 are paused; t2's arrival puts t1 in the top 2, so t1 is launched again
    on its own folder (a resumed trial) and completes; t2 and t3 end PRUNED at epoch 1."""
    from launch import moasha

    monkeypatch.setattr(moasha, "ranking", lambda points: list(range(len(points))))
    sched = moasha.MOASHAScheduler(max_t=2, reduction_factor=2, cost_of=lambda c: (0.1, 1e4))
    searcher, ss, clock = _searcher(tmp_path, space_file, trials=4, promotions=sched)
    trial = SimpleNamespace

    def run(tid, config, epochs):
        t = trial(trial_id=tid, config=config)
        sched.on_trial_add(None, t)
        for epoch in epochs:
            result = {"epoch": epoch, "val_acc": 0.5}
            clock.now += 3.0
            decision = sched.on_trial_result(None, t, result)
            if decision == "STOP":
                searcher.on_trial_complete(tid, result)  # Tune skips on_trial_result here
                return "STOP"
            searcher.on_trial_result(tid, result)
        searcher.on_trial_complete(tid, result)
        return "DONE"

    c0 = searcher.suggest("t0")
    assert run("t0", c0, [1, 2]) == "DONE"
    c1 = searcher.suggest("t1")
    assert run("t1", c1, [1]) == "STOP"
    n1 = searcher.launched[-1]
    t1 = _state(ss, n1)
    assert t1.state == TrialState.RUNNING and t1.user_attrs["paused_at"] == 1
    assert t1.user_attrs["wall_s"] == 3.0
    c2 = searcher.suggest("t2")  # t1 is not in the top 1 of 2: a new trial
    assert c2["trial_dir"] != c1["trial_dir"]
    assert run("t2", c2, [1]) == "STOP"
    again = searcher.suggest("t1-again")  # now t1 ranks 2nd of 3, in the top 2
    assert again == c1 and searcher.resumed_promotions == [n1]
    assert run("t1-again", again, [2]) == "DONE"
    t1 = _state(ss, n1)
    assert t1.state == TrialState.COMPLETE and t1.user_attrs["wall_s"] == 6.0  # both sessions
    c3 = searcher.suggest("t3")
    assert run("t3", c3, [1]) == "STOP"
    n0, _, n2, _, n3 = searcher.launched  # t1 was launched twice
    assert searcher.paused_numbers == sorted([n2, n3])
    assert searcher.suggest("t4") == Searcher.FINISHED  # budget spent, nothing runs
    states = {n: _state(ss, n) for n in set(searcher.launched)}
    pruned = [n for n, t in states.items() if t.state == TrialState.PRUNED]
    assert len(pruned) == 2 and all(states[n].user_attrs["fidelity"] == 1 for n in pruned)
    assert sum(t.state == TrialState.COMPLETE for t in states.values()) == 2
    assert searcher.paused_numbers == [] and sched.promoted == {c1["trial_dir"]: [1]}
    assert searcher.outcomes == {"COMPLETE": 2, "PRUNED": 2}


def test_a_paused_trial_waits_while_another_runs(tmp_path, space_file, monkeypatch):
    from launch import moasha

    monkeypatch.setattr(moasha, "ranking", lambda points: list(range(len(points))))
    sched = moasha.MOASHAScheduler(max_t=2, reduction_factor=2, cost_of=lambda c: (0.1, 1e4))
    searcher, ss, _ = _searcher(tmp_path, space_file, trials=2, promotions=sched)
    a, b = searcher.suggest("a"), searcher.suggest("b")
    for tid, config in (("a", a), ("b", b)):
        sched.on_trial_add(None, SimpleNamespace(trial_id=tid, config=config))
    assert sched.on_trial_result(None, SimpleNamespace(trial_id="a", config=a),
                                 {"epoch": 1, "val_acc": 0.4}) == "CONTINUE"
    assert sched.on_trial_result(None, SimpleNamespace(trial_id="b", config=b),
                                 {"epoch": 1, "val_acc": 0.4}) == "STOP"
    searcher.on_trial_complete("b", {"epoch": 1, "val_acc": 0.4})
    # the budget is spent, but "a" still runs: wait (None), do not finish yet
    assert searcher.suggest("c") is None
    searcher.on_trial_complete("a", {"epoch": 2, "val_acc": 0.6})
    assert searcher.suggest("d") == Searcher.FINISHED
    assert searcher.outcomes == {"COMPLETE": 1, "PRUNED": 1}
