"""Where a search's Optuna study lives, and how trials orphaned by a dead driver are recovered.

Two kinds of storage, chosen by the `storage` URL:

* none given: a journal file, `RUN_DIR/study.journal` (`optuna.storages.JournalStorage` over a
  `JournalFileBackend`). One file in the run folder, safe for several processes on ONE machine;
  the single-machine default.
* any SQLAlchemy URL (`postgresql://user@host:5432/db`, `sqlite:///path.db`): an
  `optuna.storages.RDBStorage` with heartbeats, for clusters and for several drivers on several
  machines. PostgreSQL is the cluster choice; SQLite is for tests and single machines.

A trial is RUNNING in the study while a driver trains it. Each driver holds a `DriverLease`
(id `<host>-<pid>-<token>`, stored in the trial's system attr `spvit:driver` when it claims a
trial). If that driver dies (its machine went away, it was killed), nothing would ever finish its
trials; they must be detected as *stale*. What "stale" means depends on the storage:

* RDB: the trial's heartbeat is older than `grace_period` seconds. The lease keeps the heartbeat
  of every trial it runs fresh (Optuna itself only beats inside `Study.optimize`, which an
  ask/tell driver does not use).
* journal: the trial's owner no longer holds its lock file `RUN_DIR/drivers/<lease id>.lock`.
  The lock is an OS file lock (`fcntl.flock`), which the kernel drops the moment the process
  dies, however it dies; so "stale" is exact, with no timeout. A RUNNING trial without an owner
  is stale when no lease of the run is alive at all.
* both: an owner that is a process of this very host that no longer exists (checked by pid),
  at once, without waiting out the grace period.

A stale trial is then either adopted by a live driver (`DriverLease.adopt`: it continues under
its own number from the checkpoint in its trial folder) or recovered (`recover_stale_trials`:
failed with `fail_reason` and re-queued as a WAITING copy - same parameters and user attrs,
system attr `failed_trial` = the original number - that the next `study.ask()` returns). Both go
through one atomic change of owner (a compare-and-set UPDATE on the database; an OS lock in the
run folder for the journal), so two drivers never take the same trial.

This module is pure Optuna + SQLAlchemy (no Ray); `launch/` calls it. What a storage URL is and
how it is shown live in `nas.storage_urls`, the lock files and study locks in `nas.locks`.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import os
import socket
import threading
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import (
    BaseStorage,
    JournalStorage,
    RDBStorage,
    RetryHeartbeatStaleTrialCallback,
)
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

from nas import optuna_compat
from nas.layout import JOURNAL_FILE, RunFolder

# The URL rules and the locks live in their own modules; their public names are re-exported
# here, where launch/ and the docs have always found them.
from nas.locks import (  # noqa: F401
    DRIVERS_DIR,
    lease_dir,
    lease_owner_is_dead,
    live_leases,
    study_mutex,
)
from nas.settings import SettingError
from nas.storage_urls import (  # noqa: F401
    MASK,
    check_database_exists,
    first_line,
    is_url,
    masked,
    parse_url,
)
from search_spaces.fields import whole_number
from spvit.errors import ConfigError

JOURNAL_NAME = JOURNAL_FILE  # the name launch/ and the docs have always imported
OWNER_ATTR = "spvit:driver"

DEFAULT_HEARTBEAT_INTERVAL = 30
DEFAULT_MAX_RETRY = 2
DEFAULT_CONNECT_TIMEOUT = 10

STALE_REASON_RDB = ("stale: no heartbeat for {grace}s (the driver running it, or its machine,"
                    " went away)")
STALE_REASON_JOURNAL = "stale: the driver running it (lease {owner}) is gone"

StaleCallback = Callable[[optuna.Study, FrozenTrial], None]


# ---------------------------------------------------------------------------------------- retry
class RetryStaleTrial(RetryHeartbeatStaleTrialCallback):
    """Re-queue a stale trial as a WAITING copy, at most `max_retry` times per original trial.

    Optuna's `RetryHeartbeatStaleTrialCallback`, minus the dead owner: the copy must not carry the
    lease id of the driver that died, or it would look stale again before a live driver claims it.
    `max_retry=None` retries forever; 0 never retries (the trial just stays FAIL).
    """

    def __init__(self, max_retry: int | None = DEFAULT_MAX_RETRY) -> None:
        if max_retry is not None:
            whole_number("max_retry", max_retry, 0, "Use e.g. max_retry=2 (0 disables retries).",
                         rule="an integer >= 0 or None")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            super().__init__(max_retry=max_retry)

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        trial = copy.deepcopy(trial)
        trial.system_attrs.pop(OWNER_ATTR, None)
        trial.user_attrs.pop("fail_reason", None)
        super().__call__(study, trial)


class RunJournalStorage(JournalStorage):
    """The run's journal-file study, plus the callback applied to trials found stale."""

    def __init__(self, path: Path, *, stale_trial_callback: StaleCallback | None) -> None:
        self.path = Path(path)
        self.stale_trial_callback = stale_trial_callback
        super().__init__(JournalFileBackend(str(self.path)))


# ---------------------------------------------------------------------------------------- storage
def journal_path(run_dir: str | os.PathLike) -> Path:
    """The default study file of a run: `RUN_DIR/study.journal` (`RunFolder.journal`)."""
    return RunFolder(run_dir).journal


def storage_url(url: str | None, run_dir: str | os.PathLike, *,
                hide_password: bool = True) -> str:
    """A printable name of the study storage, for logs, `run.json`, the `optuna` CLI and
    optuna-dashboard: the absolute journal path when `url` is None, else the URL with its database
    driver made explicit and any password shown as `***` (tools then take the real password from
    PGPASSWORD or ~/.pgpass; `hide_password=False` keeps it, for passing on, never printing)."""
    if url is None:
        return str(journal_path(run_dir).resolve())
    parsed = parse_url(url)
    return masked(parsed) if hide_password else parsed.render_as_string(hide_password=False)


def make_storage(url: str | None, run_dir: str | os.PathLike, *,
                 heartbeat_interval: int = DEFAULT_HEARTBEAT_INTERVAL,
                 grace_period: int | None = None,
                 max_retry: int | None = DEFAULT_MAX_RETRY,
                 connect_timeout: int = DEFAULT_CONNECT_TIMEOUT) -> BaseStorage:
    """The study storage of a run.

    Args:
        url: None for the run's journal file (`RUN_DIR/study.journal`, created with its folder),
            or any SQLAlchemy URL for an `RDBStorage` (PostgreSQL for clusters).
        run_dir: the run folder.
        heartbeat_interval: seconds between heartbeats of a running trial (RDB only).
        grace_period: seconds without a heartbeat after which a RUNNING trial is stale (RDB only);
            default 3 x `heartbeat_interval`.
        max_retry: how often a stale trial is re-queued as a WAITING copy (None: always, 0: never).
        connect_timeout: seconds to wait for a database server before giving up.

    Raises:
        ConfigError: malformed URL, missing database driver, unreachable or refusing server.
    """
    for name, value in (("heartbeat_interval", heartbeat_interval),
                        ("connect_timeout", connect_timeout)):
        whole_number(name, value, 1, f"Use e.g. {name}=30.",
                     rule="a whole number of seconds >= 1")
    if grace_period is None:
        grace_period = 3 * heartbeat_interval
    whole_number("grace_period", grace_period, heartbeat_interval + 1,
                 "A shorter grace would fail live trials. Use e.g. 3 x heartbeat_interval.",
                 rule=f"a whole number of seconds > heartbeat_interval ({heartbeat_interval})")
    callback = RetryStaleTrial(max_retry)
    if url is None:
        path = journal_path(run_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        return RunJournalStorage(path, stale_trial_callback=callback)
    return _make_rdb(url, heartbeat_interval=heartbeat_interval, grace_period=grace_period,
                     callback=callback, connect_timeout=connect_timeout)


def _make_rdb(url: str, *, heartbeat_interval: int, grace_period: int,
              callback: StaleCallback, connect_timeout: int) -> RDBStorage:
    import sqlalchemy.exc

    parsed = parse_url(url)
    shown = masked(parsed)
    if parsed.password == MASK:
        raise SettingError("storage", f"the storage URL {shown} has a masked password ('***', as"
                                      " printed in logs and run.json). Give the real URL as"
                                      " `storage`, or leave the password out and set PGPASSWORD"
                                      " or ~/.pgpass.")
    backend = parsed.get_backend_name()
    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if backend == "postgresql":
        engine_kwargs["connect_args"] = {"connect_timeout": connect_timeout}
    elif backend == "mysql":
        engine_kwargs["connect_args"] = {"connect_timeout": connect_timeout}
    elif backend == "sqlite":
        engine_kwargs["connect_args"] = {"timeout": connect_timeout}
    # `DriverLease` beats for ask/tell drivers; Optuna's warning that heartbeats belong to
    # `Study.optimize` does not apply to them.
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with",
                            category=UserWarning)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return RDBStorage(parsed.render_as_string(hide_password=False),
                              engine_kwargs=engine_kwargs,
                              heartbeat_interval=heartbeat_interval, grace_period=grace_period,
                              heartbeat_stale_trial_callback=callback)
    except (ImportError, sqlalchemy.exc.NoSuchModuleError) as e:
        raise ConfigError(f"no database driver for the storage URL {shown} ({first_line(e)})."
                          " Install the driver (psycopg2-binary for postgresql://) or use"
                          " another URL.") from None
    except sqlalchemy.exc.DatabaseError as e:  # OperationalError, and "file is not a database"
        raise SettingError("storage", f"cannot open the study database {shown}:"
                                      f" {first_line(e.orig or e)}. Start the server / check host,"
                                      " port, database name and credentials, or leave `storage`"
                                      " unset for the run's journal file.") from None
    except sqlalchemy.exc.ArgumentError as e:
        raise ConfigError(f"the storage URL {shown} was refused: {first_line(e)}."
                          " Fix the URL, e.g. postgresql://nas@db:5432/nas.") from None


def is_rdb(storage: BaseStorage | optuna.Study) -> bool:
    """True when a storage (or a study's storage) is a database (`RDBStorage`)."""
    if isinstance(storage, optuna.Study):
        storage = optuna_compat.study_storage(storage)
    return isinstance(storage, RDBStorage)


# ---------------------------------------------------------------------------------------- leases
def _transfer_owner(study: optuna.Study, run_dir: str | os.PathLike, trial_id: int,
                    expected: str | None, new_owner: str) -> bool:
    """Atomically set the owner of a RUNNING trial from `expected` (None: no owner yet) to
    `new_owner`. False when the trial finished or another driver changed its owner first.

    The check and the change happen under `study_mutex` (a database lock on PostgreSQL/MySQL,
    so drivers on different machines cannot both win; an OS lock in the run folder for the
    journal and SQLite), through Optuna's public storage calls."""
    storage = optuna_compat.study_storage(study)
    with study_mutex(study, run_dir):
        trial = storage.get_trial(trial_id)
        if trial.state != TrialState.RUNNING or trial.system_attrs.get(OWNER_ATTR) != expected:
            return False
        storage.set_trial_system_attr(trial_id, OWNER_ATTR, new_owner)
        return True


class DriverLease:
    """This driver's claim on the trials it runs; keeps them from being recovered as stale.

    Open it (a context manager) once per driver process, after creating the study. Then
    `claim(trial)` each trial right after `study.ask()`, `adopt(trial)` a stale trial another
    driver left behind (only if it returns True is it this driver's), and `release(trial)` after
    `study.tell()`. On an RDB storage a daemon thread records the heartbeat of every claimed
    trial each `heartbeat_interval` seconds; on both storages the lease holds an OS lock on
    `RUN_DIR/drivers/<id>.lock` for as long as the process lives (what the journal's staleness
    rule reads). The id is `<host>-<pid>-<token>`.
    """

    def __init__(self, study: optuna.Study, run_dir: str | os.PathLike) -> None:
        self.study = study
        self.run_dir = Path(run_dir)
        self.storage = optuna_compat.study_storage(study)
        self.id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._trial_ids: set[int] = set()
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock_fd: int | None = None
        self.beats = 0

    @property
    def lock_path(self) -> Path:
        return lease_dir(self.run_dir) / f"{self.id}.lock"

    @property
    def heartbeat_interval(self) -> int | None:
        return self.storage.get_heartbeat_interval() if isinstance(self.storage, RDBStorage) \
            else None

    def __enter__(self) -> DriverLease:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        if self._lock_fd is not None:
            return
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            # Some network file systems have no locks. The journal's staleness rule needs
            # them; a database's uses heartbeats and pids, so there the lock is a courtesy.
            if not isinstance(self.storage, RDBStorage):
                os.close(fd)
                raise SettingError("storage", f"the run folder {self.run_dir} has no file locks"
                                              f" ({e.strerror}), which the journal study storage"
                                              " needs. Put the run folder (`out`) on a local disk"
                                              " or use `storage` postgresql://...") from None
            warnings.warn(f"no file lock on {self.lock_path} ({e.strerror}); heartbeats alone"
                          " mark this driver's trials as alive", RuntimeWarning, stacklevel=2)
        os.write(fd, f"{self.id}\n".encode())
        self._lock_fd = fd
        if self.heartbeat_interval is not None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._beat_loop, name="spvit-heartbeat",
                                            daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Stop the heartbeats and drop the lock (claimed trials then count as stale)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._lock_fd is not None:
            with contextlib.suppress(FileNotFoundError):
                self.lock_path.unlink()
            os.close(self._lock_fd)
            self._lock_fd = None

    def _require_open(self) -> None:
        if self._lock_fd is None:
            raise RuntimeError("DriverLease used before open(); use `with DriverLease(...)`.")

    def _track(self, trial_id: int) -> None:
        if self.heartbeat_interval is not None:
            self.storage.record_heartbeat(trial_id)
        with self._mutex:
            self._trial_ids.add(trial_id)

    def claim(self, trial: optuna.Trial | FrozenTrial | int) -> None:
        """Mark a trial this driver just asked for (a Trial, FrozenTrial or storage trial id) as
        run by this driver. For a trial another driver may also want, use `adopt`."""
        self._require_open()
        trial_id = _trial_id(trial)
        self.storage.set_trial_system_attr(trial_id, OWNER_ATTR, self.id)
        self._track(trial_id)

    def adopt(self, trial: FrozenTrial | int) -> bool:
        """Take over a RUNNING trial whose driver is gone (`is_stale`), atomically: True if this
        driver now runs it; False if it is not stale (any more), finished, or another driver
        adopted it first. Safe when several drivers, on one or many machines, try at once."""
        self._require_open()
        trial_id = _trial_id(trial)
        current = self.storage.get_trial(trial_id)
        if current.state != TrialState.RUNNING:
            return False
        owner = current.system_attrs.get(OWNER_ATTR)
        if owner == self.id:
            self._track(trial_id)
            return True
        if not is_stale(self.study, self.run_dir, current, ignore=self.id):
            return False
        if not _transfer_owner(self.study, self.run_dir, trial_id, owner, self.id):
            return False
        self._track(trial_id)
        return True

    def release(self, trial: optuna.Trial | FrozenTrial | int) -> None:
        """Stop beating for `trial` (call after telling its result)."""
        trial_id = _trial_id(trial)
        with self._mutex:
            self._trial_ids.discard(trial_id)

    @property
    def claimed(self) -> list[int]:
        with self._mutex:
            return sorted(self._trial_ids)

    def _beat_loop(self) -> None:
        interval = self.heartbeat_interval
        assert interval is not None
        while not self._stop.wait(timeout=interval):
            for trial_id in self.claimed:
                try:
                    self.storage.record_heartbeat(trial_id)
                    self.beats += 1
                except Exception as e:  # the database may blink; the next beat retries
                    warnings.warn(f"heartbeat of trial id {trial_id} failed: {first_line(e)}",
                                  RuntimeWarning, stacklevel=1)


_trial_id = optuna_compat.trial_id


# ---------------------------------------------------------------------------------------- recovery
def _rdb_stale_ids(storage: RDBStorage, study: optuna.Study) -> set[int]:
    return optuna_compat.stale_trial_ids(storage, study)


def is_stale(study: optuna.Study, run_dir: str | os.PathLike, trial: FrozenTrial, *,
             ignore: str | None = None) -> bool:
    """Whether a RUNNING trial is one nobody runs any more (see the module docstring).
    `ignore`: a lease id not to count as a live driver (the caller's own)."""
    storage = optuna_compat.study_storage(study)
    rdb_stale = _rdb_stale_ids(storage, study) if isinstance(storage, RDBStorage) else None
    return _is_stale(run_dir, trial, ignore=ignore, rdb_stale=rdb_stale)


def _is_stale(run_dir: str | os.PathLike, trial: FrozenTrial, *, ignore: str | None,
              rdb_stale: set[int] | None) -> bool:
    if trial.state != TrialState.RUNNING:
        return False
    owner = trial.system_attrs.get(OWNER_ATTR)
    if lease_owner_is_dead(owner):
        return True
    if rdb_stale is not None:
        return _trial_id(trial) in rdb_stale
    leases = set(live_leases(run_dir)) - {ignore}
    return owner not in leases if owner is not None else not leases


def stale_trials(study: optuna.Study, run_dir: str | os.PathLike) -> list[FrozenTrial]:
    """RUNNING trials of `study` nobody runs any more (see the module docstring)."""
    storage = optuna_compat.study_storage(study)
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    if not running:
        return []
    rdb_stale = _rdb_stale_ids(storage, study) if isinstance(storage, RDBStorage) else None
    return [t for t in running if _is_stale(run_dir, t, ignore=None, rdb_stale=rdb_stale)]


def recover_stale_trials(study: optuna.Study, run_dir: str | os.PathLike) -> list[int]:
    """Fail every stale RUNNING trial (user attr `fail_reason`) and re-queue it per the storage's
    retry policy (a WAITING copy that the next `study.ask()` returns). Safe to call from several
    drivers at once, and against drivers adopting the same trials: a trial is failed only by the
    caller that took it over atomically.

    Returns the numbers of the trials this call failed.
    """
    storage = optuna_compat.study_storage(study)
    if isinstance(storage, RDBStorage):
        callback = storage.get_heartbeat_stale_trial_callback()
        grace = storage.grace_period or 2 * (storage.get_heartbeat_interval() or 0)
    else:
        callback = getattr(storage, "stale_trial_callback", None)
        grace = None
    recoverer = f"recovery-{uuid.uuid4().hex[:8]}"
    failed: list[int] = []
    for trial in stale_trials(study, run_dir):
        owner = trial.system_attrs.get(OWNER_ATTR)
        if not _transfer_owner(study, run_dir, _trial_id(trial), owner, recoverer):
            continue  # another driver adopted or recovered it first
        if lease_owner_is_dead(owner) or grace is None:
            reason = STALE_REASON_JOURNAL.format(owner=owner or "none")
        else:
            reason = STALE_REASON_RDB.format(grace=grace)
        try:
            storage.set_trial_user_attr(_trial_id(trial), "fail_reason", reason)
            if not storage.set_trial_state_values(_trial_id(trial), state=TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
        failed.append(trial.number)
        if callback is not None:
            callback(study, storage.get_trial(_trial_id(trial)))
    return failed
