"""Integrity of a run's Optuna journal file (`RUN_DIR/study.journal`), checked before it is read.

Optuna's `JournalFileBackend` keeps one JSON object per line, each an operation with an integer
`op_code` (`optuna.storages.journal.JournalOperation`) and the keys that operation needs. Optuna
replays the file on open and fails deep inside with a `JSONDecodeError`, `UnicodeDecodeError`,
`KeyError` or `AssertionError` on a damaged line, or silently skips a last line that lacks its
newline. `scan_journal` reads the file the same way and says exactly where it stops being
readable; `check_journal` turns that into one line naming the file, the line and byte offset and
the way out (`spvit-nas repair-journal RUN_DIR`), and `repair_journal` truncates the file to its
last good line, keeping the original as a backup.

A torn last line (a writer killed in the middle of an append: bytes that start a record but never
reach their newline) is the one case recovered without asking: Optuna wrote nothing after it, so
dropping it loses only the operation that was being written. This happens under Optuna's own lock
of the file (no append can be in progress then), after a backup, and is reported.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from spvit.errors import ConfigError

# The keys each operation's replay reads unconditionally (optuna/storages/journal/_storage.py).
# `worker_id` is read by every operation.
REQUIRED_KEYS: dict[int, tuple[str, ...]] = {
    0: ("study_name", "directions"),                      # CREATE_STUDY
    1: ("study_id",),                                     # DELETE_STUDY
    2: ("study_id", "user_attr"),                         # SET_STUDY_USER_ATTR
    3: ("study_id", "system_attr"),                       # SET_STUDY_SYSTEM_ATTR
    4: ("study_id", "datetime_start"),                    # CREATE_TRIAL
    5: ("trial_id", "param_name", "param_value_internal", "distribution"),  # SET_TRIAL_PARAM
    6: ("trial_id", "state", "values"),                   # SET_TRIAL_STATE_VALUES
    7: ("trial_id", "step", "intermediate_value"),        # SET_TRIAL_INTERMEDIATE_VALUE
    8: ("trial_id", "user_attr"),                         # SET_TRIAL_USER_ATTR
    9: ("trial_id", "system_attr"),                       # SET_TRIAL_SYSTEM_ATTR
    10: (),                                               # DISCARD_TRIALS (skipped by Optuna)
}
BACKUP_INFIX = ".bak-"


class JournalCorrupt(ConfigError):
    """The journal cannot be read completely; the message says where and how to recover."""


@dataclass(frozen=True)
class JournalScan:
    """What `scan_journal` found.

    Attributes:
        path: the journal file.
        good_lines: complete, valid operations from the start of the file.
        good_bytes: the byte length of those lines (the offset of the first bad byte).
        size: the file's size.
        problem: why reading stops at `good_bytes` (None: the whole file is valid).
        torn: the problem is a torn last line (a record cut short by a killed writer).
    """

    path: Path
    good_lines: int
    good_bytes: int
    size: int
    problem: str | None = None
    torn: bool = False

    @property
    def ok(self) -> bool:
        return self.problem is None


def _line_problem(raw: bytes) -> str | None:
    """Why one newline-terminated journal line cannot be replayed, or None."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"bytes that are not UTF-8 text (at byte {e.start} of the line)"
    try:
        log = json.loads(text)
    except json.JSONDecodeError as e:
        return f"not a JSON record ({e.msg} at column {e.colno})"
    if not isinstance(log, dict):
        return f"a JSON {type(log).__name__}, not an operation record"
    op = log.get("op_code")
    if isinstance(op, bool) or not isinstance(op, int) or op not in REQUIRED_KEYS:
        return f"unknown op_code {op!r} (known: 0..{max(REQUIRED_KEYS)})"
    missing = [key for key in ("worker_id", *REQUIRED_KEYS[op]) if key not in log]
    if missing:
        return f"op_code {op} without {', '.join(missing)}"
    return None


_RECORD_START = '{"op_code":'


def _looks_like_record_start(tail: bytes) -> bool:
    """Optuna writes every record as ASCII JSON starting with `{"op_code":`; a writer killed
    mid-append leaves a prefix of one. NUL padding or binary junk is not that."""
    if not tail or any(b < 0x20 or b > 0x7E for b in tail):
        return False
    text = tail.decode("ascii")
    return text.startswith(_RECORD_START) or _RECORD_START.startswith(text)


def scan_journal(path: str | os.PathLike) -> JournalScan:
    """Read `path` as Optuna would and report the longest valid prefix (see `JournalScan`)."""
    path = Path(path)
    data = path.read_bytes()
    offset = 0
    line_no = 0
    while offset < len(data):
        end = data.find(b"\n", offset)
        if end < 0:
            tail = data[offset:]
            torn = _looks_like_record_start(tail)
            what = ("a torn last line (a record cut short, no newline)" if torn
                    else "trailing bytes that are not a journal record")
            return JournalScan(path, line_no, offset, len(data), what, torn=torn)
        problem = _line_problem(data[offset:end + 1])
        if problem is not None:
            return JournalScan(path, line_no, offset, len(data), problem)
        line_no += 1
        offset = end + 1
    return JournalScan(path, line_no, offset, len(data))


def describe(scan: JournalScan) -> str:
    """One line: the file, where reading stops and why, and how to recover."""
    lost = scan.size - scan.good_bytes
    return (f"study journal {scan.path} is corrupt at line {scan.good_lines + 1} (byte offset"
            f" {scan.good_bytes}): {scan.problem}; the {scan.good_lines} line(s) before it are"
            f" intact. Run `spvit-nas repair-journal {scan.path.parent}` to truncate it to"
            f" them ({lost} byte(s) dropped, the original kept as a backup), or restore the file"
            " from a copy.")


class _JournalLock:
    """Optuna's own lock of the journal file, so no append is in progress while it is changed."""

    def __init__(self, path: Path) -> None:
        from optuna.storages.journal import JournalFileSymlinkLock

        self._lock = JournalFileSymlinkLock(str(path))

    def __enter__(self) -> _JournalLock:
        self._lock.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


def _backup(path: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    backup = path.with_name(f"{path.name}{BACKUP_INFIX}{stamp}")
    n = 1
    while backup.exists():
        n += 1
        backup = path.with_name(f"{path.name}{BACKUP_INFIX}{stamp}-{n}")
    # A copy (not a rename): the original stays in place until the truncation below.
    backup.write_bytes(path.read_bytes())
    with open(backup, "rb") as f:
        os.fsync(f.fileno())
    return backup


def _truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)
        f.flush()
        os.fsync(f.fileno())


def repair_journal(path: str | os.PathLike) -> tuple[JournalScan, Path | None]:
    """Truncate `path` to its last good line, keeping the original as `NAME.bak-STAMP`.

    Returns the scan before the repair and the backup (None if the file was intact).
    """
    path = Path(path)
    with _JournalLock(path):
        scan = scan_journal(path)
        if scan.ok:
            return scan, None
        backup = _backup(path)
        _truncate(path, scan.good_bytes)
    return scan, backup


def check_journal(path: str | os.PathLike, *,
                  say: Callable[[str], None] | None = None) -> JournalScan | None:
    """Raise `JournalCorrupt` if `path` cannot be read completely; recover a torn last line.

    Returns the scan, or None if there is no file at `path` (nothing to check). A torn last line
    is cut off (under Optuna's lock, after a backup) and `say` is told so.
    """
    path = Path(path)
    if not path.is_file():
        return None
    scan = scan_journal(path)
    if scan.ok:
        return scan
    if not scan.torn:
        raise JournalCorrupt(describe(scan))
    with _JournalLock(path):
        scan = scan_journal(path)  # again under the lock: the append may have completed
        if scan.ok:
            return scan
        if not scan.torn:
            raise JournalCorrupt(describe(scan))
        backup = _backup(path)
        _truncate(path, scan.good_bytes)
    if say is not None:
        say(f"note: {path} ended in a torn line (a writer killed mid-write,"
            f" {scan.size - scan.good_bytes} byte(s) at byte offset {scan.good_bytes});"
            f" dropped it and kept {scan.good_lines} intact line(s); the original is {backup}.")
    return scan_journal(path)


def run_journal(run_dir: str | os.PathLike, storage: str | None = None) -> Path | None:
    """The journal file a run's study lives in, or None if it lives in a database.

    `storage` is the run's storage entry or a `--storage` override: None/empty means
    RUN_DIR/study.journal, a URL (`scheme://...`) a database, anything else a journal path
    (relative paths are relative to the run folder).
    """
    run_dir = Path(run_dir)
    if storage in (None, ""):
        return run_dir / "study.journal"
    from nas.storage import is_url

    if is_url(storage):
        return None
    path = Path(str(storage)).expanduser()
    return path if path.is_absolute() else run_dir / path


def check_run_journal(run_dir: str | os.PathLike, storage: str | None = None, *,
                      say: Callable[[str], None] | None = None) -> JournalScan | None:
    """`check_journal` on the journal of the run at `run_dir` (None if it has none)."""
    path = run_journal(run_dir, storage)
    return None if path is None else check_journal(path, say=say)


__all__ = [
    "JournalCorrupt",
    "JournalScan",
    "check_journal",
    "check_run_journal",
    "describe",
    "repair_journal",
    "run_journal",
    "scan_journal",
]
