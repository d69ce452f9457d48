"""Integrity of a run's Optuna journal file (`RUN_DIR/study.journal`), checked before it is read,
and its repair.

Optuna's `JournalFileBackend` keeps one JSON object per line, each an operation with an integer
`op_code` (`optuna.storages.journal.JournalOperation`) and the keys that operation needs. Optuna
replays the file on open and fails deep inside with a `JSONDecodeError`, `UnicodeDecodeError`,
`KeyError` or `AssertionError` on a damaged line, or silently skips a last line that lacks its
newline. `scan_journal` reads the file the same way and says exactly where it stops being
readable; `check_journal` turns that into one line naming the file, the line and byte offset and
the way out (`spvit-nas repair-journal RUN_DIR`).

`repair_journal` drops the damaged records and keeps every intact one, because the file is an
operation log: the records after a damaged line still replay. Trials and studies are numbered by
the order of their creation records, so a lost creation would renumber every later trial (and
point their updates at the wrong trials); where later records show that a damaged line created a
trial (they update a trial id that no surviving record creates), it is replaced by a FAIL
placeholder trial in the same place, so later trials keep their numbers, and the records that
update the lost trial are dropped with it. The repaired file is replayed with Optuna's own
`JournalStorage` and its trial counts compared with the plan before it replaces the original (a
backup copy is kept); the result names the dropped lines and the trials they touched.

A torn last line (a writer killed in the middle of an append: bytes that start a record but never
reach their newline) is the one case recovered without asking: Optuna wrote nothing after it, so
dropping it loses only the operation that was being written. This happens under Optuna's own lock
of the file (no append can be in progress then), after a backup, and is reported.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from nas.layout import RunFolder
from search_spaces.fields import is_whole
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
    if not is_whole(op) or op not in REQUIRED_KEYS:
        return f"unknown op_code {op!r} (known: 0..{max(REQUIRED_KEYS)})"
    missing = [key for key in ("worker_id", *REQUIRED_KEYS[op]) if key not in log]
    if missing:
        return f"op_code {op} without {', '.join(missing)}"
    return _value_problem(op, log)


def _value_problem(op: int, log: dict) -> str | None:
    """Why Optuna's replay would fail on the values of an otherwise well-formed record."""
    from datetime import datetime

    from optuna.distributions import json_to_distribution

    def bad_time(key: str, required: bool) -> bool:
        value = log.get(key)
        if value is None:
            return required
        try:
            datetime.fromisoformat(value)
        except (TypeError, ValueError):
            return True
        return False

    for key in ("study_id", "trial_id"):
        if key in log and not is_whole(log[key]):
            return f"op_code {op} with a {key} that is not an integer ({log[key]!r})"
    for key in ("user_attr", "system_attr"):
        if key in log and not (isinstance(log[key], dict) and len(log[key]) == 1):
            return f"op_code {op} whose {key} is not one key and value"
    try:
        if op == 0:
            if not isinstance(log["directions"], list) or not all(
                    d in (0, 1, 2) and not isinstance(d, bool) for d in log["directions"]):
                return f"op_code 0 with directions {log['directions']!r}"
        elif op == 4:
            if bad_time("datetime_start", False) or bad_time("datetime_complete", False):
                return "op_code 4 with a date that is not ISO 8601"
            distributions = {k: json_to_distribution(v)
                             for k, v in (log.get("distributions") or {}).items()}
            if not set(log.get("params") or {}) <= set(distributions):
                return "op_code 4 with params that have no distribution"
            if log.get("state", 0) not in (0, 1, 2, 3, 4):
                return f"op_code 4 with state {log.get('state')!r}"
        elif op == 5:
            json_to_distribution(log["distribution"])
        elif op == 6:
            state = log["state"]
            if isinstance(state, bool) or state not in (0, 1, 2, 3, 4):
                return f"op_code 6 with state {state!r}"
            if state == 0 and bad_time("datetime_start", True):
                return "op_code 6 (RUNNING) without a valid datetime_start"
            if state in (1, 2, 3) and bad_time("datetime_complete", True):
                return "op_code 6 (finished) without a valid datetime_complete"
    except (TypeError, ValueError, KeyError, AttributeError, json.JSONDecodeError) as e:
        return f"op_code {op} with values Optuna cannot read ({type(e).__name__})"
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
            f" intact. Run `spvit-nas repair-journal {scan.path.parent}` to drop the damaged"
            f" record(s) and keep every intact one (the {lost} byte(s) from there on are"
            " checked; the original is kept as a backup), or restore the file from a copy.")


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


PLACEHOLDER_WORKER = "spvit-nas-repair-journal"
_TRIAL_ID = re.compile(rb'"trial_id"\s*:\s*(\d+)')


@dataclass(frozen=True)
class JournalRepair:
    """What `repair_journal` did.

    Attributes:
        path: the journal file.
        backup: the copy of the original (None: the file was intact and is unchanged).
        lines: records (lines) in the original.
        kept: records in the repaired file (placeholders included).
        damaged: 1-based numbers of the lines that could not be read, each with why.
        dependent: 1-based numbers of intact lines dropped because they update a lost trial.
        placeholders: trial number -> the damaged line that created it (a FAIL placeholder now).
        touched: trial number -> damaged lines that probably updated it (their `trial_id`).
        trials: trials per study name after the repair (as Optuna's replay reads them).
    """

    path: Path
    backup: Path | None
    lines: int
    kept: int
    damaged: tuple[tuple[int, str], ...] = ()
    dependent: tuple[int, ...] = ()
    placeholders: dict[int, int] = field(default_factory=dict)
    touched: dict[int, tuple[int, ...]] = field(default_factory=dict)
    trials: dict[str, int] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        return self.backup is not None


@dataclass
class _Line:
    number: int                # 1-based
    raw: bytes                 # without its newline
    record: dict | None        # None: damaged
    problem: str | None = None


def _split(data: bytes) -> list[_Line]:
    lines: list[_Line] = []
    parts = data.split(b"\n")
    tail = parts.pop()  # after the last newline: b"" unless the last line is torn
    for i, raw in enumerate(parts, start=1):
        problem = _line_problem(raw + b"\n")
        lines.append(_Line(i, raw, None if problem else json.loads(raw), problem))
    if tail:
        lines.append(_Line(len(parts) + 1, tail, None, "a last line without its newline (torn)"))
    return lines


def _placeholder(study_id: int, when: str, line: int) -> dict:
    return {"op_code": 4, "worker_id": PLACEHOLDER_WORKER, "study_id": study_id,
            "datetime_start": when, "datetime_complete": when, "state": 3, "value": None,
            "values": None, "params": {}, "distributions": {}, "system_attrs": {},
            "intermediate_values": {},
            "user_attrs": {"fail_reason": f"lost: its record on line {line} of the study journal"
                                          " was damaged (spvit-nas repair-journal)"}}


class _Studies:
    """Study ids as Optuna's replay gives them: in creation order, a name at most once alive."""

    def __init__(self) -> None:
        self.names: dict[int, str] = {}   # alive study id -> name
        self.next_id = 0

    def apply(self, log: dict) -> None:
        if log["op_code"] == 0 and log["study_name"] not in self.names.values():
            self.names[self.next_id] = log["study_name"]
            self.next_id += 1
        elif log["op_code"] == 1:
            self.names.pop(log["study_id"], None)

    def lost(self, log: dict) -> bool:
        """The record names a study id that was never created."""
        return log["op_code"] in (1, 2, 3, 4) and log["study_id"] >= self.next_id


def _plan_repair(lines: list[_Line]) -> tuple[list[bytes], dict[int, int], set[int],
                                              dict[str, int]]:
    """(the lines to write, intact ones byte for byte; placeholder trial id -> its damaged
    line; the numbers of dependent lines to drop; trials per study name after the replay)."""
    # Pass 1: which damaged lines created trials. Trial ids are given in creation order, so an
    # update of an id that no surviving record has created yet belongs to a trial whose creation
    # is among the damaged lines before it: the nearest one (Optuna writes a trial's updates
    # right after creating it).
    studies = _Studies()
    created = 0
    last_study = 0
    open_damage: list[int] = []
    lost: dict[int, list[int]] = {}  # damaged line number -> study ids of the trials it created
    for line in lines:
        log = line.record
        if log is None:
            open_damage.append(line.number)
            continue
        if studies.lost(log) and any(x.record is None for x in lines[:line.number - 1]):
            raise ConfigError(
                f"line {line.number} of the journal refers to study id {log['study_id']}, whose"
                " creation record is among the damaged lines; every record of that study"
                " depends on it, so no repair keeps it. Restore the file from a copy.")
        studies.apply(log)
        op = log["op_code"]
        if op == 4 and log["study_id"] in studies.names:
            created += 1
            last_study = log["study_id"]
        elif op in (5, 6, 7, 8, 9) and log["trial_id"] >= created and open_damage:
            need = log["trial_id"] - created + 1
            lost.setdefault(open_damage.pop(), []).extend([last_study] * need)
            created += need
    # Pass 2: the records to keep, placeholders in the places of the lost creations.
    studies = _Studies()
    out: list[bytes] = []
    trial_study: list[int] = []
    placeholder_ids: dict[int, int] = {}
    dependent: set[int] = set()
    when = "1970-01-01T00:00:00+00:00"
    for line in lines:
        log = line.record
        if log is None:
            for study_id in lost.get(line.number, []):
                placeholder_ids[len(trial_study)] = line.number
                trial_study.append(study_id)
                out.append(json.dumps(_placeholder(study_id, when, line.number),
                                      separators=(",", ":")).encode() + b"\n")
            continue
        when = log.get("datetime_complete") or log.get("datetime_start") or when
        studies.apply(log)
        op = log["op_code"]
        if op == 4 and log["study_id"] in studies.names:
            trial_study.append(log["study_id"])
        elif op in (5, 6, 7, 8, 9) and log["trial_id"] in placeholder_ids:
            dependent.add(line.number)
            continue
        out.append(line.raw + b"\n")
    expected = dict.fromkeys(studies.names.values(), 0)
    for study_id in trial_study:
        if study_id in studies.names:
            expected[studies.names[study_id]] += 1
    return out, placeholder_ids, dependent, expected


def _replay(path: Path) -> tuple[dict[str, int], dict[int, int]]:
    """(trials per study, trial id -> number) as Optuna's own `JournalStorage` reads `path`."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    from nas import optuna_compat

    storage = JournalStorage(JournalFileBackend(str(path)))
    counts: dict[str, int] = {}
    numbers: dict[int, int] = {}
    for study in storage.get_all_studies():
        trials = optuna.load_study(study_name=study.study_name,
                                   storage=storage).get_trials(deepcopy=False)
        counts[study.study_name] = len(trials)
        numbers.update({optuna_compat.trial_id(t): t.number for t in trials})
    return counts, numbers


def repair_journal(path: str | os.PathLike) -> JournalRepair:
    """Drop the damaged records of `path` and those that depend on them, keep every other one.

    The repaired file is written beside the original, replayed with Optuna's `JournalStorage`
    (its trial counts must be those planned), then moved over the original, which is kept as
    `NAME.bak-STAMP`; all under Optuna's lock of the file. `ConfigError` (and the file
    unchanged) when no consistent repair exists.
    """
    path = Path(path)
    with _JournalLock(path):
        data = path.read_bytes()
        lines = _split(data)
        damaged = [line for line in lines if line.record is None]
        if not damaged:
            return JournalRepair(path, None, len(lines), len(lines))
        if len(damaged) == len(lines):
            raise ConfigError(f"{path} holds no intact journal record ({len(lines)} damaged"
                              " line(s)): it is not a study journal or is damaged throughout;"
                              " the file is unchanged. Restore it from a copy.")
        records, placeholder_ids, dependent, expected = _plan_repair(lines)
        text = b"".join(records)
        tmp = path.with_name(f".{path.name}.repair-{os.getpid()}")
        try:
            tmp.write_bytes(text)
            try:
                counts, numbers = _replay(tmp)
            except Exception as e:  # Optuna's replay raises many kinds; report, change nothing
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise ConfigError(f"the repaired journal of {path} does not replay in Optuna"
                                  f" ({type(e).__name__}: {first}); the file is unchanged."
                                  " Restore it from a copy.") from None
            if counts != expected:
                raise ConfigError(f"the repaired journal of {path} replays to {counts} trials,"
                                  f" not the {expected} planned; the file is unchanged. Restore"
                                  " it from a copy.")
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            backup = _backup(path)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    touched: dict[int, list[int]] = {}
    for line in damaged:
        if line.number in placeholder_ids.values():
            continue
        match = _TRIAL_ID.search(line.raw)
        if match and int(match.group(1)) in numbers:
            touched.setdefault(numbers[int(match.group(1))], []).append(line.number)
    return JournalRepair(
        path, backup, len(lines), len(records),
        damaged=tuple((line.number, line.problem or "") for line in damaged),
        dependent=tuple(sorted(dependent)),
        placeholders={numbers[i]: n for i, n in placeholder_ids.items()},
        touched={k: tuple(v) for k, v in sorted(touched.items())},
        trials=counts)


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

    `storage` is the run's storage entry or an overriding `storage` setting: None/empty means
    RUN_DIR/study.journal, a URL (`scheme://...`) a database, anything else a journal path
    (relative paths are relative to the run folder).
    """
    from nas.storage import is_url

    return None if is_url(storage) else RunFolder(run_dir).journal_at(storage)


def check_run_journal(run_dir: str | os.PathLike, storage: str | None = None, *,
                      say: Callable[[str], None] | None = None) -> JournalScan | None:
    """`check_journal` on the journal of the run at `run_dir` (None if it has none)."""
    path = run_journal(run_dir, storage)
    return None if path is None else check_journal(path, say=say)


__all__ = [
    "JournalCorrupt",
    "JournalRepair",
    "JournalScan",
    "check_journal",
    "check_run_journal",
    "describe",
    "repair_journal",
    "run_journal",
    "scan_journal",
]
