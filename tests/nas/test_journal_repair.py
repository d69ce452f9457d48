"""`nas.journal.repair_journal` and `spvit-nas repair-journal`: a damaged record costs that record
(and the records that update a trial whose creation it was), never the intact records after it;
the result replays in Optuna with every other trial as it was, under its own number."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from launch import cli
from nas.journal import JournalCorrupt, check_journal, repair_journal, scan_journal
from spvit.errors import ConfigError
from tests.messages import assert_names_value_and_fix

optuna.logging.set_verbosity(optuna.logging.WARNING)
STUDY = "demo"


def make_run(run_dir: Path, trials: int) -> Path:
    """A run folder whose journal holds `trials` trials told through ask/tell, as a search
    writes them: one record to create each trial, then its params, user attrs and result."""
    run_dir.mkdir(parents=True)
    storage = JournalStorage(JournalFileBackend(str(run_dir / "study.journal")))
    study = optuna.create_study(storage=storage, study_name=STUDY,
                                directions=["maximize", "minimize", "minimize"],
                                sampler=optuna.samplers.RandomSampler(seed=0))
    for i in range(trials):
        trial = study.ask()
        depth = trial.suggest_int("depth", 1, 8)
        width = trial.suggest_categorical("width", [16, 32])
        trial.set_user_attr("trial_dir", f"trials/{trial.number:04d}")
        trial.set_user_attr("budget", 2)
        trial.set_user_attr("fidelity", 2)
        study.tell(trial, [0.5 + 0.001 * i, 0.01 * depth, 1000.0 * width])
    (run_dir / "run.json").write_text(json.dumps({"study_name": STUDY,
                                                  "storage": "study.journal"}))
    return run_dir


def trials_of(path: Path) -> dict[int, optuna.trial.FrozenTrial]:
    storage = JournalStorage(JournalFileBackend(str(path)))
    study = optuna.load_study(study_name=STUDY, storage=storage)
    return {t.number: t for t in study.get_trials(deepcopy=False)}


def same_trial(a: optuna.trial.FrozenTrial, b: optuna.trial.FrozenTrial) -> bool:
    return (a.number, a.state, a.values, a.params, a.user_attrs) == \
        (b.number, b.state, b.values, b.params, b.user_attrs)


def garble(path: Path, line_number: int, *, byte: int = 10, value: int = 0xFF) -> bytes:
    """Replace one byte of line `line_number` (1-based); returns the original line."""
    lines = path.read_bytes().split(b"\n")
    original = lines[line_number - 1]
    damaged = bytearray(original)
    damaged[byte] = value
    lines[line_number - 1] = bytes(damaged)
    path.write_bytes(b"\n".join(lines))
    return original


def op_lines(path: Path, op_code: int) -> list[int]:
    return [i for i, line in enumerate(path.read_bytes().splitlines(), start=1)
            if json.loads(line)["op_code"] == op_code]


@pytest.fixture(scope="module")
def big_run(tmp_path_factory) -> Path:
    """2,150 lines: one study, 307 trials of 7 records each."""
    return make_run(tmp_path_factory.mktemp("big") / "run", trials=307)


@pytest.fixture
def run_dir(tmp_path, big_run) -> Path:
    copy = tmp_path / "run"
    copy.mkdir()
    for name in ("study.journal", "run.json"):
        (copy / name).write_bytes((big_run / name).read_bytes())
    return copy


# ---------------------------------------------------------------------------- a lost creation
def test_a_garbled_creation_on_line_51_costs_one_trial_not_the_rest(run_dir):
    journal = run_dir / "study.journal"
    before = trials_of(journal)
    total = len(journal.read_bytes().splitlines())
    assert total > 2100
    line = op_lines(journal, 4)[7]  # the creation of trial 7
    assert line == 51
    garble(journal, line)
    damaged = journal.read_bytes()
    with pytest.raises(JournalCorrupt, match="line 51"):
        check_journal(journal)

    repair = repair_journal(journal)

    assert repair.changed and repair.backup.read_bytes() == damaged
    assert [n for n, _ in repair.damaged] == [51] and "not UTF-8" in repair.damaged[0][1]
    # the records that updated trial 7 (its params, attrs and result) went with it
    assert repair.dependent == tuple(range(52, 58))
    assert repair.placeholders == {7: 51}
    assert repair.kept == total - 7 + 1  # 7 records dropped, one placeholder
    after = trials_of(journal)
    assert len(after) == len(before) == repair.trials[STUDY]
    # every other trial is as it was, under its own number (the folder it names agrees)
    for number, trial in before.items():
        if number != 7:
            assert same_trial(after[number], trial), number
            assert after[number].user_attrs["trial_dir"] == f"trials/{number:04d}"
    lost = after[7]
    assert lost.state == TrialState.FAIL and "line 51" in lost.user_attrs["fail_reason"]
    assert scan_journal(journal).ok


def test_a_garbled_update_costs_that_update_only(run_dir):
    journal = run_dir / "study.journal"
    before = trials_of(journal)
    line = op_lines(journal, 8)[40]  # a user attr of some trial
    number = json.loads(journal.read_bytes().splitlines()[line - 1])["trial_id"]
    # break the JSON after the trial id, so the line still names its trial
    raw = journal.read_bytes().splitlines()[line - 1]
    garble(journal, line, byte=len(raw) - 3, value=ord("@"))

    repair = repair_journal(journal)

    assert [n for n, _ in repair.damaged] == [line] and repair.dependent == ()
    assert repair.placeholders == {} and repair.touched == {number: (line,)}
    after = trials_of(journal)
    assert len(after) == len(before)
    changed = [n for n in before if not same_trial(after[n], before[n])]
    assert changed == [number]
    assert after[number].values == before[number].values  # only one attribute is missing


def test_several_damaged_lines_and_a_torn_tail(run_dir):
    journal = run_dir / "study.journal"
    before = trials_of(journal)
    creations = op_lines(journal, 4)
    garble(journal, creations[3])
    garble(journal, creations[100], byte=0, value=ord("x"))
    journal.write_bytes(journal.read_bytes() + b'{"op_code":8,"worker_id":"w","trial_id":3,"us')

    repair = repair_journal(journal)

    assert [n for n, _ in repair.damaged][:2] == [creations[3], creations[100]]
    assert set(repair.placeholders) == {3, 100}
    after = trials_of(journal)
    assert len(after) == len(before)
    assert all(same_trial(after[n], before[n]) for n in before if n not in (3, 100))


def test_an_intact_journal_is_left_alone(run_dir):
    journal = run_dir / "study.journal"
    data = journal.read_bytes()
    repair = repair_journal(journal)
    assert not repair.changed and repair.backup is None
    assert journal.read_bytes() == data and not list(run_dir.glob("*.bak-*"))


def test_a_lost_study_creation_is_refused_and_the_file_kept(run_dir):
    journal = run_dir / "study.journal"
    garble(journal, 1, byte=0, value=ord("?"))
    damaged = journal.read_bytes()
    with pytest.raises(ConfigError) as info:
        repair_journal(journal)
    assert_names_value_and_fix(str(info.value), "study id 0")
    assert journal.read_bytes() == damaged and not list(run_dir.glob("*.bak-*"))
    assert not list(run_dir.glob(".study.journal.repair-*"))


@pytest.mark.parametrize("record, needle", [
    ({"op_code": 5, "worker_id": "w", "trial_id": 0, "param_name": "x",
      "param_value_internal": 1, "distribution": "not json"}, "Optuna cannot read"),
    ({"op_code": 6, "worker_id": "w", "trial_id": 0, "state": 1, "values": [1],
      "datetime_complete": "yesterday"}, "without a valid datetime_complete"),
    ({"op_code": 8, "worker_id": "w", "trial_id": "7", "user_attr": {"a": 1}},
     "trial_id that is not an integer"),
])
def test_records_optuna_cannot_replay_are_found_before_it_fails(run_dir, record, needle):
    journal = run_dir / "study.journal"
    lines = journal.read_bytes().splitlines(keepends=True)
    journal.write_bytes(b"".join(lines[:9]) + json.dumps(record).encode() + b"\n"
                        + b"".join(lines[9:]))
    scan = scan_journal(journal)
    assert scan.good_lines == 9 and needle in scan.problem
    repair = repair_journal(journal)
    assert [n for n, _ in repair.damaged] == [10]
    assert journal.read_bytes() == b"".join(lines)


# ---------------------------------------------------------------------------- the command
def test_repair_journal_says_what_was_lost(run_dir, capsys):
    journal = run_dir / "study.journal"
    garble(journal, 51)
    code = cli.main(["repair-journal", str(run_dir)])
    out, err = capsys.readouterr()
    assert code == 0, err
    first, second, third = out.strip().splitlines()
    assert "dropped line 51 (damaged: bytes that are not UTF-8" in first
    assert "lines 52, 53, 54, 55, 56, 57, which updated a lost trial" in first
    assert "Optuna replays 307 trial(s) of study 'demo'" in first
    assert second.startswith("trials affected: 7 (created on a lost line")
    assert "study.journal.bak-" in third and "--resume" in third
    code = cli.main(["pareto", str(run_dir)])
    assert code == 0, capsys.readouterr().err


def test_a_file_without_one_intact_record_is_refused_and_kept(tmp_path):
    journal = tmp_path / "study.journal"
    junk = bytes(range(256)) * 8 + b"\n" + b"\x00\x01\n"
    journal.write_bytes(junk)
    with pytest.raises(ConfigError) as info:
        repair_journal(journal)
    assert_names_value_and_fix(str(info.value), journal, "no intact journal record")
    assert journal.read_bytes() == junk and not list(tmp_path.glob("*.bak-*"))
