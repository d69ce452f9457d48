"""nas.study: samplers, the study, run.json and the ask/tell conventions (no Ray)."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from nas import optuna_compat, samplers
from nas import study as nas_study
from nas.storage import OWNER_ATTR, DriverLease, lease_owner_is_dead, make_storage
from search_spaces.space import SearchSpace
from spvit.arch import ArchSpec
from spvit.cost import estimate
from spvit.errors import ConfigError
from tests.tiny_space import small_space, write_space

SPACE = small_space(search={"concurrent": 2, "population_size": 2})


@pytest.fixture
def space(tmp_path: Path) -> SearchSpace:
    return SearchSpace.load(write_space(tmp_path / "space.yaml", SPACE))


def _study(run_dir: Path, *, sampler: str = "random", seed: int = 0, name: str = "s"):
    storage = make_storage(None, run_dir)
    return nas_study.open_study(storage, study_name=name,
                                sampler=nas_study.make_sampler(sampler, seed=seed), resume=False)


def _search_study(run_dir: Path, space: SearchSpace, **kwargs) -> nas_study.SearchStudy:
    return nas_study.SearchStudy(_study(run_dir), space, run_dir=run_dir, budget=2, **kwargs)


# ------------------------------------------------------------------------------------ samplers
@pytest.mark.parametrize("name, cls", [
    ("nsga2", optuna.samplers.NSGAIISampler), ("tpe", optuna.samplers.TPESampler),
    ("gp", optuna.samplers.GPSampler), ("random", optuna.samplers.RandomSampler),
    ("qmc", optuna.samplers.QMCSampler)])
def test_make_sampler_returns_the_named_sampler(name, cls):
    assert type(nas_study.make_sampler(name, seed=3)) is cls


def test_the_default_is_auto_tpe_below_250_trials_nsga2_with_its_population_from_250():
    assert nas_study.DEFAULT_SAMPLER == "auto"
    for n_trials in (None, 30, 249):
        sampler = nas_study.make_sampler(nas_study.DEFAULT_SAMPLER, seed=0, n_trials=n_trials,
                                         population_size=6)
        assert isinstance(sampler, optuna.samplers.TPESampler)
    sampler = nas_study.make_sampler(nas_study.DEFAULT_SAMPLER, seed=0, n_trials=250,
                                     population_size=6)
    assert isinstance(sampler, optuna.samplers.NSGAIISampler)
    assert sampler._population_size == 6


def test_make_sampler_rejects_unknown_names_and_bad_seeds():
    with pytest.raises(ConfigError, match="sampler must be one of"):
        nas_study.make_sampler("cmaes", seed=0)
    with pytest.raises(ConfigError, match="seed must be an integer >= 0"):
        nas_study.make_sampler("random", seed=-1)


def _first_params(tmp_path: Path, space: SearchSpace, sampler: str, seed: int) -> list[dict]:
    run_dir = tmp_path / f"{sampler}-{seed}-{len(list(tmp_path.iterdir()))}"
    ss = nas_study.SearchStudy(_study(run_dir, sampler=sampler, seed=seed), space,
                               run_dir=run_dir, budget=2)
    return [ss.ask().spec.to_flat() for _ in range(3)]


def test_seeded_samplers_repeat_and_session_seeds_differ(tmp_path, space):
    assert _first_params(tmp_path, space, "random", 5) == _first_params(tmp_path, space,
                                                                        "random", 5)
    assert nas_study.session_seed(7, 0) == 7
    seeds = {nas_study.session_seed(7, n) for n in range(5)}
    assert len(seeds) == 5


def test_default_population_size_is_bounded():
    assert samplers.default_population_size(16) == 4
    assert samplers.default_population_size(2) == 4
    assert samplers.default_population_size(1000) == 50


# ------------------------------------------------------------------------------------ the study
def test_open_study_creates_then_refuses_to_create_again(tmp_path):
    study = _study(tmp_path, name="run")
    assert [d.name.lower() for d in study.directions] == list(nas_study.DIRECTIONS)
    assert study.metric_names == list(nas_study.OBJECTIVES)
    storage = make_storage(None, tmp_path)
    sampler = nas_study.make_sampler("random", seed=0)
    with pytest.raises(ConfigError, match="already exists.*`resume`"):
        nas_study.open_study(storage, study_name="run", sampler=sampler, resume=False)
    with pytest.raises(ConfigError, match="cannot resume: study 'other'"):
        nas_study.open_study(storage, study_name="other", sampler=sampler, resume=True)
    again = nas_study.open_study(storage, study_name="run", sampler=sampler, resume=True)
    assert optuna_compat.study_id(again) == optuna_compat.study_id(study)


def test_open_study_refuses_a_study_with_other_directions(tmp_path):
    storage = make_storage(None, tmp_path)
    optuna.create_study(study_name="single", storage=storage, direction="maximize")
    with pytest.raises(ConfigError, match="not a search study"):
        nas_study.open_study(storage, study_name="single",
                             sampler=nas_study.make_sampler("random", seed=0), resume=True)


# ------------------------------------------------------------------------------------ run.json
def _info(**changes) -> nas_study.RunInfo:
    base = dict(study_name="s", storage="/x/study.journal", sampler="nsga2", seed=0, trials=4,
                concurrent=2, epochs=2, workers_per_trial=1, space="/x/space.yaml",
                training={"epochs": 2}, population_size=4)
    base.update(changes)
    return nas_study.RunInfo(**base)


def test_run_info_round_trips_and_guards_fixed_settings(tmp_path):
    info = _info(sessions=["t0"])
    info.save(tmp_path)
    loaded = nas_study.RunInfo.load(tmp_path)
    assert loaded == info
    assert loaded.to_dict()["budget"] == 2
    resumed = loaded.resumed_with({"epochs": 2, "sampler": None, "trials": 99})
    assert (resumed.trials, resumed.sessions, loaded.trials) == (99, ("t0",), 4)
    with pytest.raises(ConfigError, match="`epochs` 3 differs from 2"):
        loaded.resumed_with({"epochs": 3})
    with pytest.raises(ConfigError, match="`sampler` tpe differs from nsga2"):
        loaded.resumed_with({"sampler": "tpe"})


def test_run_info_stores_paths_relative_to_the_run_folder(tmp_path):
    run_dir = tmp_path / "runs" / "a"
    run_dir.mkdir(parents=True)
    journal = run_dir / "study.journal"
    info = _info(storage=str(journal), space=str(tmp_path / "spaces" / "s.yaml"))
    info.save(run_dir)
    on_disk = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    assert on_disk["storage"] == "study.journal"
    assert on_disk["space"] == os.path.join("..", "..", "spaces", "s.yaml")
    assert nas_study.RunInfo.load(run_dir) == info
    moved = tmp_path / "elsewhere"
    shutil.copytree(run_dir, moved)
    assert nas_study.RunInfo.load(moved).storage == str((moved / "study.journal").resolve())
    url = _info(storage="postgresql://nas:***@db:5432/nas")
    url.save(run_dir)
    assert json.loads((run_dir / "run.json").read_text())["storage"] == url.storage


def test_run_info_reads_old_absolute_paths(tmp_path):
    data = _info().to_dict()
    (tmp_path / "run.json").write_text(json.dumps(data), encoding="utf-8")
    loaded = nas_study.RunInfo.load(tmp_path)
    assert loaded.storage == "/x/study.journal" and loaded.space == "/x/space.yaml"


def test_run_info_load_errors_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        nas_study.RunInfo.load(tmp_path)
    (tmp_path / "run.json").write_text("{broken", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid JSON"):
        nas_study.RunInfo.load(tmp_path)
    (tmp_path / "run.json").write_text('{"study_name": "x"}', encoding="utf-8")
    with pytest.raises(ConfigError, match="lacks"):
        nas_study.RunInfo.load(tmp_path)


# ------------------------------------------------------------------------------------ ask
def test_ask_rejects_infeasible_samples_before_launch(tmp_path, space):
    # the safety net behind feasible proposals (nas.samplers.FeasibleSampler), on its own
    ss = _search_study(tmp_path, space, feasible_proposals=False)
    candidates = [ss.ask() for _ in range(4)]
    trials = ss.study.get_trials(deepcopy=False)
    rejected = [t for t in trials if t.user_attrs.get("infeasible")]
    assert ss.infeasible_count == len(rejected) > 0
    for t in rejected:
        assert t.state == TrialState.FAIL
        assert "max_params" in t.user_attrs["infeasible"]
        assert t.user_attrs["fail_reason"].startswith("infeasible: ")
        assert "trial_dir" not in t.user_attrs
        assert optuna_compat.constraint_values(t)["max_params"] > 0
        assert list(t.constraints.values()) == t.system_attrs["constraints"]  # what Optuna reads
        spec = ArchSpec.from_dict(t.user_attrs["arch"])
        assert estimate(spec).params > 15000
    for c in candidates:
        frozen = ss._frozen(c.number)
        assert frozen.state == TrialState.RUNNING
        assert c.params == estimate(c.spec).params <= 15000
        assert math.isclose(c.gflops, estimate(c.spec).gflops)
        assert frozen.user_attrs["trial_dir"] == f"trials/{c.number:04d}" == c.trial_dir
        assert frozen.user_attrs["budget"] == 2 and frozen.user_attrs["fidelity"] == 0
        assert ArchSpec.from_dict(frozen.user_attrs["arch"]) == c.spec
        assert optuna_compat.constraint_values(frozen)["max_params"] <= 0
        assert all(v <= 0 for v in frozen.constraints.values())
        assert space.contains(c.spec)
    assert ss.counted_trials() == 4


def test_ask_gives_up_with_a_clear_error_when_nothing_is_feasible(tmp_path, space):
    import dataclasses

    from search_spaces.space import Constraints

    strict = dataclasses.replace(space, constraints=Constraints(max_params=10))
    ss = _search_study(tmp_path, strict, max_infeasible_tries=5)
    with pytest.raises(ConfigError, match="rejected 5 samples in a row"):
        ss.ask()
    states = [t.state for t in ss.study.get_trials(deepcopy=False)]
    assert states == [TrialState.FAIL] * 5
    assert ss.counted_trials() == 0


# ------------------------------------------------------------------------------------ tell
def test_full_budget_is_complete_with_cost_model_objectives(tmp_path, space):
    ss = _search_study(tmp_path, space)
    c = ss.ask()
    ss.record_epoch(c, {"epoch": 1, "val_acc": 0.4})
    assert ss._frozen(c.number).user_attrs["fidelity"] == 1
    state = ss.tell_result(c, {"epoch": 2, "val_acc": 0.75}, wall_s=12.5)
    t = ss._frozen(c.number)
    assert state == t.state == TrialState.COMPLETE
    cost = estimate(c.spec)
    assert t.values == [0.75, cost.gflops, float(cost.params)]
    assert t.user_attrs["fidelity"] == 2 and t.user_attrs["wall_s"] == 12.5
    assert t.user_attrs["val_acc_last"] == 0.75 and t.intermediate_values == {}


def test_test_accuracy_is_kept_beside_and_never_reaches_the_sampler(tmp_path, space,
                                                                     monkeypatch):
    ss = _search_study(tmp_path, space)
    told = []
    real_tell = ss.study.tell

    def spy(*args, **kwargs):
        told.append((args, kwargs))
        return real_tell(*args, **kwargs)

    monkeypatch.setattr(ss.study, "tell", spy)
    c = ss.ask()
    ss.record_epoch(c, {"epoch": 1, "val_acc": 0.4})
    ss.tell_result(c, {"epoch": 2, "val_acc": 0.5, "test_acc": 0.875})
    t = ss._frozen(c.number)
    assert t.values[0] == 0.5 and t.user_attrs["test_acc"] == 0.875
    # What the study (and so every sampler) was told holds no test accuracy.
    told_values = [v for args, kw in told for v in (kw.get("values") or
                                                    (args[1] if len(args) > 1 else []) or [])]
    assert 0.875 not in told_values and t.user_attrs["val_acc_last"] == 0.5
    # A pruned trial has no test accuracy, even if one was (wrongly) reported.
    p = ss.ask()
    ss.tell_result(p, {"epoch": 1, "val_acc": 0.3, "test_acc": 0.9})
    assert "test_acc" not in ss._frozen(p.number).user_attrs


def test_reproposed_architectures_are_never_trained_twice(tmp_path, space):
    ss = _search_study(tmp_path, space)
    first = ss.ask()
    ss.tell_result(first, {"epoch": 2, "val_acc": 0.5})
    ss.study.enqueue_trial(ss._frozen(first.number).params)  # the sampler proposes it again
    second = ss.ask()
    assert second.spec != first.spec
    dups = [t for t in ss.study.get_trials() if t.user_attrs.get("duplicate_of") is not None]
    assert dups and {t.user_attrs["duplicate_of"] for t in dups} == {first.number}
    assert all(t.state == TrialState.FAIL for t in dups)
    assert "duplicate of trial" in dups[0].user_attrs["fail_reason"]
    assert ss.counted_trials() == 2  # duplicates do not use up the budget


def test_short_runs_are_pruned_with_fidelity_never_complete(tmp_path, space):
    ss = _search_study(tmp_path, space)
    c = ss.ask()
    ss.record_epoch(c, {"epoch": 1, "val_acc": 0.3})
    assert ss.tell_result(c, {"epoch": 1, "val_acc": 0.3}) == TrialState.PRUNED
    t = ss._frozen(c.number)
    assert t.state == TrialState.PRUNED and t.values is None
    assert t.user_attrs["fidelity"] == 1 and t.user_attrs["budget"] == 2


def test_failures_carry_their_reason_and_count_in_a_row(tmp_path, space):
    ss = _search_study(tmp_path, space)
    a, b, c, d = (ss.ask() for _ in range(4))
    ss.tell_fail(a, "loss is nan at epoch 1, step 3")
    assert ss.consecutive_failures == 1
    # a NaN accuracy after the full budget is a failure too
    assert ss.tell_result(b, {"epoch": 2, "val_acc": float("nan")}) == TrialState.FAIL
    assert ss.consecutive_failures == 2
    ss.tell_result(c, {"epoch": 2, "val_acc": 0.5})
    assert ss.consecutive_failures == 0
    ss.tell_result(d, {"epoch": 1, "val_acc": 0.5})
    assert ss.consecutive_failures == 0
    fa, fb = ss._frozen(a.number), ss._frozen(b.number)
    assert fa.state == fb.state == TrialState.FAIL
    assert fa.user_attrs["fail_reason"] == "loss is nan at epoch 1, step 3"
    assert "val_acc is nan" in fb.user_attrs["fail_reason"]


def test_read_failure_reason(tmp_path):
    assert nas_study.read_failure_reason(tmp_path) is None
    (tmp_path / "failure.json").write_text('{"reason": "out of memory"}', encoding="utf-8")
    assert nas_study.read_failure_reason(tmp_path) == "out of memory"


# ------------------------------------------------------------------------------------ resume
def test_running_trials_of_a_dead_driver_are_adopted_under_their_numbers(tmp_path, space):
    ss = _search_study(tmp_path, space)
    done = ss.ask()
    ss.tell_result(done, {"epoch": 2, "val_acc": 0.5})
    orphan = ss.ask()  # RUNNING, no live lease: its driver is gone
    # a second driver session on the same study
    resumed = nas_study.SearchStudy(
        nas_study.open_study(make_storage(None, tmp_path), study_name="s",
                             sampler=nas_study.make_sampler("random", seed=1), resume=True),
        space, run_dir=tmp_path, budget=2)
    adoptable = resumed.adoptable()
    assert [t.number for t in adoptable] == [orphan.number]
    with DriverLease(resumed.study, tmp_path) as lease:
        resumed.lease = lease
        again = resumed.adopt(adoptable[0])
        assert again.resumed and again.number == orphan.number
        assert again.spec == orphan.spec and again.trial_dir == orphan.trial_dir
        frozen = resumed._frozen(orphan.number)
        assert frozen.system_attrs[OWNER_ATTR] == lease.id
        # while this driver holds it, nobody else may adopt it
        assert nas_study.SearchStudy(resumed.study, space, run_dir=tmp_path,
                                     budget=2).adoptable() == []
        resumed.tell_result(again, {"epoch": 2, "val_acc": 0.6}, wall_s=3.0)
    numbers = [t.number for t in resumed.study.get_trials(deepcopy=False)
               if not t.user_attrs.get("infeasible")]
    assert sorted(numbers) == sorted({done.number, orphan.number})
    assert resumed.counted_trials() == 2


def test_dead_local_owner_is_recognised(tmp_path):
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead = int(proc.stdout)
    host = socket.gethostname()
    assert lease_owner_is_dead(f"{host}-{dead}-abcd1234")
    assert not lease_owner_is_dead(f"{host}-{os.getpid()}-abcd1234")
    assert not lease_owner_is_dead(f"elsewhere-{dead}-abcd1234")
    assert not lease_owner_is_dead(None)


def test_retried_stale_trials_count_once(tmp_path, space):
    ss = _search_study(tmp_path, space)
    c = ss.ask()
    ss.tell_fail(c, "stale: the driver running it is gone")
    assert ss.counted_trials() == 1
    frozen = ss._frozen(c.number)
    ss.study.add_trial(optuna.trial.create_trial(
        state=TrialState.WAITING, params=frozen.params, distributions=frozen.distributions,
        system_attrs={"failed_trial": c.number}))
    assert ss.counted_trials() == 0  # the WAITING copy counts once it runs
    copy = ss.ask()
    assert copy.spec == c.spec and copy.number != c.number
    assert ss.counted_trials() == 1


def test_rdb_trial_of_a_dead_local_driver_is_adopted_before_its_heartbeat_expires(tmp_path,
                                                                                   space):
    storage = make_storage(f"sqlite:///{tmp_path / 'study.db'}", tmp_path)
    study = nas_study.open_study(storage, study_name="s", resume=False,
                                 sampler=nas_study.make_sampler("random", seed=0))
    ss = nas_study.SearchStudy(study, space, run_dir=tmp_path, budget=2)
    c = ss.ask()
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    host = socket.gethostname()
    storage = optuna_compat.study_storage(study)
    storage.set_trial_system_attr(c.trial_id, OWNER_ATTR, f"{host}-{proc.stdout.strip()}-t")
    storage.record_heartbeat(c.trial_id)  # fresh: not stale by the grace period yet
    assert [t.number for t in ss.adoptable()] == [c.number]
    storage.set_trial_system_attr(c.trial_id, OWNER_ATTR, f"{host}-{os.getpid()}-t")
    assert ss.adoptable() == []  # a live driver (this process) still runs it


@pytest.mark.parametrize("sampler", ["tpe", "auto", "gp", "nsga2", "random"])
def test_every_sampler_proposes_after_pruned_trials(tmp_path, space, sampler):
    """Early-stopped (PRUNED) trials, with the epochs they reported, must not break a sampler's
    next proposal: Optuna 5's TPE crashes on a multi-objective study whose PRUNED trials carry
    intermediate values, so the per-epoch accuracy is kept as a user attr instead."""
    study = optuna.create_study(storage=make_storage(None, tmp_path),
                                directions=list(nas_study.DIRECTIONS),
                                sampler=nas_study.make_sampler(sampler, seed=0, n_trials=8))
    ss = nas_study.SearchStudy(study, space, run_dir=tmp_path, budget=3)
    for k in range(6):
        c = ss.ask()
        ss.record_epoch(c, {"epoch": 1, "val_acc": 0.1 + 0.05 * k})
        if k % 2:
            assert ss.tell_result(c, {"epoch": 1, "val_acc": 0.1 + 0.05 * k}) \
                == TrialState.PRUNED
        else:
            assert ss.tell_result(c, {"epoch": 3, "val_acc": 0.3 + 0.05 * k}) \
                == TrialState.COMPLETE
    assert ss.ask() is not None  # past every sampler's start-up, with pruned trials present
    pruned = [t for t in study.trials if t.state == TrialState.PRUNED]
    assert pruned and all(t.intermediate_values == {} and t.user_attrs["val_acc_last"] > 0
                          for t in pruned)
