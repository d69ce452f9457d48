"""OS and database locks of a run: which drivers are alive, and one change at a time.

A driver holds an OS file lock on `RUN_DIR/drivers/<lease id>.lock` for as long as its process
lives (`nas.storage.DriverLease`); the kernel drops it the moment the process dies, however it
dies, so `live_leases` is exact, with no timeout. `lease_owner_is_dead` sees, by pid, a driver of
this host that is gone, whatever the storage. `study_mutex` serialises check-then-act steps of
all the drivers of one study: a database lock on PostgreSQL/MySQL (drivers on any machine), an
OS lock in the run folder for the journal and SQLite (one machine). Pure Optuna + SQLAlchemy;
`nas.storage` builds stale-trial detection and ownership changes on these.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import socket
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import RDBStorage

from nas import optuna_compat
from nas.layout import DRIVERS_DIR, RunFolder  # noqa: F401  (DRIVERS_DIR re-exported)
from nas.settings import SettingError


def lease_dir(run_dir: str | os.PathLike) -> Path:
    """The folder of a run's driver lock files: `RUN_DIR/drivers`."""
    return RunFolder(run_dir).drivers


def _lock_is_held(path: Path) -> bool:
    """True if some live process holds the `flock` on `path` (False if absent or free)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return True
        raise
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def live_leases(run_dir: str | os.PathLike) -> list[str]:
    """Ids of the driver leases of the run whose process is alive (journal storage)."""
    folder = lease_dir(run_dir)
    if not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.glob("*.lock") if _lock_is_held(p))


def lease_owner_is_dead(owner: Any) -> bool:
    """True when a lease id `host-pid-token` names a process of THIS host that is gone (exact,
    whatever the storage; False for other hosts, whose processes cannot be seen from here)."""
    if not isinstance(owner, str) or owner.count("-") < 2:
        return False
    host, pid, _ = owner.rsplit("-", 2)
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


@contextlib.contextmanager
def file_mutex(path: Path):
    """An exclusive OS lock on `path` (released by the kernel if the process dies)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)



def _study_key(study_name: str) -> int:
    """A signed 64-bit key naming the study (PostgreSQL advisory locks take one)."""
    name = f"spvit-nas:{study_name}"
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


@contextlib.contextmanager
def study_mutex(study: optuna.Study, run_dir: str | os.PathLike):
    """A lock shared by every driver of `study`, for check-then-act steps such as "launch
    another trial only if the budget is not spent yet" (count, then `study.ask()`).

    PostgreSQL: a session advisory lock keyed by the study (drivers on any machine; the server
    drops it if the holder's connection dies). MySQL: `GET_LOCK`. Journal and SQLite (one
    machine): an OS file lock in the run folder. Not re-entrant; hold it briefly.
    """
    storage = optuna_compat.study_storage(study)
    if not isinstance(storage, RDBStorage) or storage.engine.dialect.name == "sqlite":
        with file_mutex(lease_dir(run_dir) / f"study-{_study_key(study.study_name)}.mutex"):
            yield
        return
    import sqlalchemy as sa

    name = f"spvit-nas:{study.study_name}"
    key = _study_key(study.study_name)
    dialect = storage.engine.dialect.name
    if dialect == "postgresql":
        take, drop = "SELECT pg_advisory_lock(:key)", "SELECT pg_advisory_unlock(:key)"
        params: dict[str, Any] = {"key": key}
    elif dialect in ("mysql", "mariadb"):
        take, drop = "SELECT GET_LOCK(:name, -1)", "SELECT RELEASE_LOCK(:name)"
        params = {"name": name[:64]}
    else:
        raise SettingError("storage", f"the study storage {dialect} has no cross-machine lock"
                                      " this project knows; use PostgreSQL (`storage`"
                                      " postgresql://...) for several drivers.")
    with storage.engine.connect() as conn:
        conn.execute(sa.text(take), params)
        conn.commit()
        try:
            yield
        finally:
            conn.execute(sa.text(drop), params)
            conn.commit()

