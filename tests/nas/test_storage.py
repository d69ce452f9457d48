"""Study storage: journal default, RDB URLs (a real PostgreSQL server), stale-trial recovery."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import optuna
import pytest

from nas import optuna_compat
from nas.storage import (
    OWNER_ATTR,
    DriverLease,
    RunJournalStorage,
    is_rdb,
    live_leases,
    make_storage,
    recover_stale_trials,
    stale_trials,
    storage_url,
)
from spvit.errors import ConfigError
from tests.nas.test_optuna_compat import backdate_heartbeat
from tests.postgres_fixture import free_port, postgres_server, postgres_url  # noqa: F401

optuna.logging.set_verbosity(optuna.logging.WARNING)
REPO = Path(__file__).resolve().parents[2]


def _study(storage, name="s"):
    return optuna.create_study(storage=storage, study_name=name, load_if_exists=True,
                               directions=["maximize", "minimize"])


def _ask(study):
    trial = study.ask()
    trial.suggest_int("depth", 1, 12)
    trial.suggest_categorical("prior_0", ["none", "mlp", "gaussian"])
    return trial


# The driver processes below use nas.storage alone. `spvit` is registered as a bare package so
# that `spvit.errors` loads without `spvit/__init__.py`, which imports torch and timm (seconds
# per interpreter, and these tests start many); nas.storage itself is imported unchanged.
_PRELUDE = f"""
import sys, types
_spvit = types.ModuleType("spvit")
_spvit.__path__ = [{str(REPO / "spvit")!r}]
sys.modules["spvit"] = _spvit
"""


def _run_py(code: str, *, wait: bool = True, **fmt) -> subprocess.Popen | str:
    """Run `code` in a fresh interpreter (another driver process) in the repository root."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    source = _PRELUDE + textwrap.dedent(code).format(**fmt)
    proc = subprocess.Popen([sys.executable, "-c", source],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    if not wait:
        return proc
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    return out


_DRIVER_THAT_DIES = """
    import socket, time, optuna
    if {remote!r}:  # a driver on another machine: its pid cannot be checked from here
        socket.gethostname = lambda: "node-b"
    from nas.storage import make_storage, DriverLease
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = make_storage({url!r}, {run_dir!r}, heartbeat_interval=1, grace_period=2)
    study = optuna.load_study(study_name="s", storage=storage)
    lease = DriverLease(study, {run_dir!r}); lease.open()
    trial = study.ask(); trial.suggest_int("depth", 1, 12)
    trial.set_user_attr("trial_dir", "trials/%04d" % trial.number)
    lease.claim(trial)
    print(trial.number, flush=True)
    time.sleep(600)
"""


def _start_dying_driver(url, run_dir, *, remote=False) -> tuple[subprocess.Popen, int]:
    proc = _run_py(_DRIVER_THAT_DIES, wait=False, url=url, run_dir=str(run_dir), remote=remote)
    line = proc.stdout.readline()
    assert line.strip().isdigit(), proc.stderr.read()[-3000:]
    return proc, int(line)


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def _wait_until(condition, failure: str, *, timeout: float = 20) -> None:
    """Poll `condition()` until it holds (a background thread's progress, not a clock)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, failure
        time.sleep(0.05)


def _trial_id(study, number):
    return optuna_compat.trial_id(study.trials[number])


# ------------------------------------------------------------------------------ URLs and errors
def test_journal_is_the_default_and_lives_in_the_run_folder(tmp_path):
    run_dir = tmp_path / "run"
    storage = make_storage(None, run_dir)
    assert isinstance(storage, RunJournalStorage) and not is_rdb(storage)
    study = _study(storage)
    study.tell(_ask(study), [0.5, 1.0])
    assert (run_dir / "study.journal").stat().st_size > 0
    assert storage_url(None, run_dir) == str((run_dir / "study.journal").resolve())
    again = optuna.load_study(study_name="s", storage=make_storage(None, run_dir))
    assert [t.values for t in again.trials] == [[0.5, 1.0]]


def test_storage_url_masks_passwords():
    shown = storage_url("postgresql://nas:s3cret@db.example:5432/nas?sslmode=require"
                        "&password=other", ".")
    assert "s3cret" not in shown and "other" not in shown
    assert shown.startswith("postgresql+psycopg2://nas:***@db.example:5432/nas")
    assert "sslmode=require" in shown
    assert storage_url("sqlite:///x.db", ".") == "sqlite:///x.db"


@pytest.mark.parametrize("url, words", [
    ("not a url", "is not a database URL"),
    ("nosuchdialect://h/db", "no database driver"),
    ("", "non-empty string"),
    ("postgresql://nas:***@127.0.0.1:5432/nas", "masked password"),
])
def test_malformed_urls_are_config_errors_that_create_nothing(tmp_path, url, words):
    with pytest.raises(ConfigError) as info:
        make_storage(url, tmp_path)
    assert words in str(info.value)
    assert list(tmp_path.iterdir()) == []  # no journal, no database file, no lease folder


def test_unreachable_server_is_a_config_error_without_the_password(tmp_path):
    port = free_port()  # nothing listens there (how long it takes: bench/core_timing.py)
    with pytest.raises(ConfigError) as info:
        make_storage(f"postgresql://nas:topsecret@127.0.0.1:{port}/nas", tmp_path)
    message = str(info.value)
    assert "cannot open the study database" in message and str(port) in message
    assert "topsecret" not in message


def test_bad_heartbeat_settings_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="grace_period"):
        make_storage("sqlite:///" + str(tmp_path / "a.db"), tmp_path, heartbeat_interval=5,
                     grace_period=5)
    with pytest.raises(ConfigError, match="heartbeat_interval"):
        make_storage(None, tmp_path, heartbeat_interval=0)
    with pytest.raises(ConfigError, match="max_retry"):
        make_storage(None, tmp_path, max_retry=-1)


@pytest.mark.slow  # driver subprocesses
def test_journal_is_shared_by_processes_on_one_machine(tmp_path):
    _study(make_storage(None, tmp_path))
    code = """
        import optuna
        from nas.storage import make_storage
        study = optuna.load_study(study_name="s", storage=make_storage(None, {run_dir!r}))
        for _ in range(8):
            t = study.ask(); study.tell(t, [t.suggest_float("x", 0, 1), 1.0])
    """
    procs = [_run_py(code, wait=False, run_dir=str(tmp_path)) for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-3000:]
    numbers = [t.number for t in optuna.load_study(study_name="s",
                                                   storage=make_storage(None, tmp_path)).trials]
    assert sorted(numbers) == list(range(16))


# ------------------------------------------------------------------------------ PostgreSQL
def test_postgres_storage_round_trip(postgres_url, tmp_path):  # noqa: F811
    storage = make_storage(postgres_url, tmp_path, heartbeat_interval=1, grace_period=2)
    assert is_rdb(storage)
    assert storage.engine.dialect.name == "postgresql"
    assert storage.get_heartbeat_interval() == 1 and storage.grace_period == 2
    study = _study(storage)
    trial = _ask(study)
    trial.set_user_attr("arch", {"depth": 3})
    study.tell(trial, [0.75, 0.1])
    # what the `optuna` CLI / optuna-dashboard are given (password from PGPASSWORD when masked)
    plain = storage_url(postgres_url, tmp_path, hide_password=False)
    assert plain.startswith("postgresql+psycopg2://")
    loaded = optuna.load_study(study_name="s", storage=plain)
    assert loaded.trials[0].values == [0.75, 0.1]
    assert loaded.trials[0].user_attrs["arch"] == {"depth": 3}


def test_postgres_stale_trial_of_a_killed_driver_is_failed_and_retried(postgres_url, tmp_path):  # noqa: F811
    storage = make_storage(postgres_url, tmp_path, heartbeat_interval=1, grace_period=2,
                           max_retry=1)
    study = _study(storage)
    with DriverLease(study, tmp_path) as lease:  # a live driver running trial 0
        alive = _ask(study)
        lease.claim(alive)
        proc, dead_number = _start_dying_driver(postgres_url, tmp_path, remote=True)
        assert _owner(study, dead_number).startswith("node-b-")
        _wait_until(lambda: lease.beats >= 1, "the live lease never beat")
        assert recover_stale_trials(study, tmp_path) == []  # both beat: nothing is stale
        _kill(proc)  # the driver (say, its node) dies mid-trial
        assert not stale_trials(study, tmp_path)  # a remote death shows only through heartbeats
        # its last beat was a minute ago: the grace (2 s) is long over for it, but not for the
        # trial of the live lease, which keeps beating
        backdate_heartbeat(storage, _trial_id(study, dead_number), 60)
        assert [t.number for t in stale_trials(study, tmp_path)] == [dead_number]
        _wait_until(lambda: lease.beats >= 2, "the live lease stopped beating")
        assert recover_stale_trials(study, tmp_path) == [dead_number]
        assert recover_stale_trials(study, tmp_path) == []  # idempotent
        trials = {t.number: t for t in study.get_trials()}
        assert trials[alive.number].state == optuna.trial.TrialState.RUNNING
        dead = trials[dead_number]
        assert dead.state == optuna.trial.TrialState.FAIL
        assert "no heartbeat for 2s" in dead.user_attrs["fail_reason"]
        (retry,) = [t for t in trials.values() if t.state == optuna.trial.TrialState.WAITING]
        assert retry.system_attrs["failed_trial"] == dead_number
        assert retry.params == dead.params
        assert retry.user_attrs["trial_dir"] == f"trials/{dead_number:04d}"
        assert OWNER_ATTR not in retry.system_attrs and "fail_reason" not in retry.user_attrs
        # the next ask of any driver resumes the retried candidate, with the same parameters
        again = study.ask()
        assert again.number == retry.number and again.params == dead.params
        lease.claim(again)
        study.tell(alive, [0.5, 1.0])
        study.tell(again, [0.6, 1.0])
        lease.release(alive)
        lease.release(again)
    states = sorted(t.state.name for t in study.get_trials())
    assert states == ["COMPLETE", "COMPLETE", "FAIL"]


def test_postgres_retries_stop_after_max_retry(postgres_url, tmp_path):  # noqa: F811
    storage = make_storage(postgres_url, tmp_path, heartbeat_interval=30, max_retry=1)
    study = _study(storage)
    first = _ask(study)
    storage.record_heartbeat(optuna_compat.trial_id(first))  # beats once, then its driver is gone
    assert recover_stale_trials(study, tmp_path) == []  # within the grace (90 s)
    backdate_heartbeat(storage, optuna_compat.trial_id(first), 600)  # ... ten minutes ago
    assert recover_stale_trials(study, tmp_path) == [first.number]
    second = study.ask()  # the retry, popped and then also abandoned
    storage.record_heartbeat(optuna_compat.trial_id(second))
    backdate_heartbeat(storage, optuna_compat.trial_id(second), 600)
    assert recover_stale_trials(study, tmp_path) == [second.number]
    states = [t.state for t in study.get_trials()]
    assert states == [optuna.trial.TrialState.FAIL] * 2  # no third copy: max_retry=1


def test_postgres_study_shared_by_concurrent_processes(postgres_url, tmp_path):  # noqa: F811
    _study(make_storage(postgres_url, tmp_path))
    code = """
        import json, optuna
        from nas.storage import make_storage
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.load_study(study_name="s", storage=make_storage({url!r}, {run_dir!r}))
        done = []
        for _ in range(10):
            t = study.ask(); x = t.suggest_float("x", 0, 1)
            study.tell(t, [x, 1 - x]); done.append(t.number)
        print(json.dumps(done))
    """
    procs = [_run_py(code, wait=False, url=postgres_url, run_dir=str(tmp_path))
             for _ in range(2)]
    told = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-3000:]
        told += json.loads(out)
    trials = optuna.load_study(study_name="s", storage=make_storage(postgres_url, tmp_path)).trials
    assert sorted(told) == sorted(t.number for t in trials) == list(range(20))
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)


# ------------------------------------------------------------------------------ journal staleness
@pytest.mark.slow  # driver subprocesses
def test_journal_trial_of_a_killed_driver_is_stale_at_once(tmp_path):
    study = _study(make_storage(None, tmp_path, max_retry=2))
    proc, dead_number = _start_dying_driver(None, tmp_path)
    with DriverLease(study, tmp_path) as lease:
        mine = _ask(study)
        lease.claim(mine)
        assert sorted(live_leases(tmp_path)) == sorted([lease.id, _owner(study, dead_number)])
        assert recover_stale_trials(study, tmp_path) == []  # both drivers alive
        _kill(proc)  # the kernel drops its lock: no timeout to wait for
        assert live_leases(tmp_path) == [lease.id]
        assert recover_stale_trials(study, tmp_path) == [dead_number]
        trials = {t.number: t for t in study.get_trials()}
        assert trials[mine.number].state == optuna.trial.TrialState.RUNNING
        assert "is gone" in trials[dead_number].user_attrs["fail_reason"]
        (retry,) = [t for t in trials.values() if t.state == optuna.trial.TrialState.WAITING]
        assert retry.system_attrs["failed_trial"] == dead_number
        assert OWNER_ATTR not in retry.system_attrs
        assert recover_stale_trials(study, tmp_path) == []  # an unclaimed WAITING copy stays
    # this driver closed its lease without telling `mine`: now that one is stale too
    assert recover_stale_trials(study, tmp_path) == [mine.number]


def test_journal_unowned_running_trial_is_stale_only_without_live_drivers(tmp_path):
    study = _study(make_storage(None, tmp_path, max_retry=0))
    orphan = _ask(study)  # asked by a driver that never took a lease
    with DriverLease(study, tmp_path):
        assert stale_trials(study, tmp_path) == []  # it may be that live driver's
    assert [t.number for t in stale_trials(study, tmp_path)] == [orphan.number]
    assert recover_stale_trials(study, tmp_path) == [orphan.number]
    assert [t.state for t in study.get_trials()] == [optuna.trial.TrialState.FAIL]  # max_retry=0


def _owner(study, number):
    return study.trials[number].system_attrs[OWNER_ATTR]


def test_postgres_driver_that_died_on_this_host_is_stale_at_once(postgres_url, tmp_path):  # noqa: F811
    study = _study(make_storage(postgres_url, tmp_path, heartbeat_interval=30))
    proc, number = _start_dying_driver(postgres_url, tmp_path)
    assert not stale_trials(study, tmp_path)
    _kill(proc)  # no need to wait out the 90 s grace: the pid is gone from this host
    assert [t.number for t in stale_trials(study, tmp_path)] == [number]
    assert "is gone" in _recover_reason(study, tmp_path, number)


def _recover_reason(study, run_dir, number):
    assert recover_stale_trials(study, run_dir) == [number]
    return study.trials[number].user_attrs["fail_reason"]


_ADOPTER = """
    import json, pathlib, time, optuna
    from nas import optuna_compat
    from nas.storage import make_storage, DriverLease
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name="s", storage=make_storage({url!r}, {run_dir!r}))
    numbers = [t.number for t in study.get_trials(states=(optuna.trial.TrialState.RUNNING,))]
    barrier = pathlib.Path({barrier!r})

    def meet(stage):  # both drivers are alive (leases open) from the first stage to the last
        (barrier / f"{{stage}}-{me}").touch()
        while len(list(barrier.glob(f"{{stage}}-*"))) < 2:
            time.sleep(0.02)

    with DriverLease(study, {run_dir!r}) as lease:
        meet("ready")
        won = [n for n in numbers if lease.adopt(study.trials[n])]
        assert lease.claimed == sorted(optuna_compat.trial_id(study.trials[n]) for n in won)
        meet("done")
    print(json.dumps(won), flush=True)
"""


def _orphan_trials(study, count):
    """`count` RUNNING trials whose owner was a driver process of this host that has exited."""
    exited = subprocess.Popen(["true"])
    exited.wait()
    owner = f"{socket.gethostname()}-{exited.pid}-deadbeef"
    numbers = []
    for _ in range(count):
        trial = _ask(study)
        optuna_compat.study_storage(study).set_trial_system_attr(
            optuna_compat.trial_id(trial), OWNER_ATTR, owner)
        numbers.append(trial.number)
    return numbers


def _adopt_concurrently(url, run_dir):
    barrier = run_dir / "barrier"
    barrier.mkdir()
    procs = [_run_py(_ADOPTER, wait=False, url=url, run_dir=str(run_dir), barrier=str(barrier),
                     me=i) for i in range(2)]
    won = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-3000:]
        won.append(json.loads(out))
    return won


@pytest.mark.slow  # driver subprocesses
@pytest.mark.parametrize("backend", ["journal", "postgres"])
def test_two_drivers_never_adopt_the_same_trial(backend, request, tmp_path):
    url = request.getfixturevalue("postgres_url") if backend == "postgres" else None
    study = _study(make_storage(url, tmp_path))
    numbers = _orphan_trials(study, 8)
    first, second = _adopt_concurrently(url, tmp_path)
    assert not set(first) & set(second)  # no trial adopted twice ...
    assert sorted(first + second) == numbers  # ... and none left behind
    owners = {study.trials[n].system_attrs[OWNER_ATTR] for n in numbers}
    assert len(owners) == (2 if first and second else 1)
    assert not any(o.endswith("-deadbeef") for o in owners)
    with DriverLease(study, tmp_path) as late:  # those drivers exited: their trials are stale
        assert all(late.adopt(study.trials[n]) for n in numbers)
        with DriverLease(study, tmp_path) as other:  # ... until a live driver has them
            assert not any(other.adopt(study.trials[n]) for n in numbers)


_BUDGETED_DRIVER = """
    import json, pathlib, time, optuna
    from nas.storage import make_storage, study_mutex
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name="s", storage=make_storage({url!r}, {run_dir!r}))
    barrier = pathlib.Path({barrier!r})
    (barrier / "ready-{me}").touch()
    while len(list(barrier.glob("ready-*"))) < 2:  # both drivers start together
        time.sleep(0.02)
    mine = []
    while True:
        with {mutex}:  # count-then-ask must be one step for all drivers
            if len(study.get_trials(deepcopy=False)) >= {budget}:
                break
            time.sleep(0.05)  # the gap in which another driver could count the same number
            trial = study.ask()
        x = trial.suggest_float("x", 0, 1)
        study.tell(trial, [x, 1 - x])
        mine.append(trial.number)
    print(json.dumps(mine))
"""


def _budgeted_drivers(url, run_dir, *, budget, mutex="study_mutex(study, {run_dir!r})"):
    barrier = run_dir / "barrier"
    barrier.mkdir()
    procs = [_run_py(_BUDGETED_DRIVER.replace("{mutex}", mutex), wait=False, url=url,
                     run_dir=str(run_dir), budget=budget, barrier=str(barrier), me=i)
             for i in range(2)]
    launched = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-3000:]
        launched.append(json.loads(out))
    return launched


@pytest.mark.slow  # driver subprocesses
@pytest.mark.parametrize("backend", ["journal", "postgres"])
def test_study_mutex_lets_concurrent_drivers_share_one_budget(backend, request, tmp_path):
    url = request.getfixturevalue("postgres_url") if backend == "postgres" else None
    study = _study(make_storage(url, tmp_path))
    first, second = _budgeted_drivers(url, tmp_path, budget=10)
    assert sorted(first + second) == list(range(10))  # exactly the budget: none twice, no extra
    assert first and second  # both drivers took part
    assert len(study.trials) == 10
