"""nas.layout: the run, trial, export and supernet folders, and the readers they share (trial
numbers from folder names, run.json, the journal a storage entry names). No Ray, no training."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from nas import journal, outputs, run
from nas.layout import (
    ExportFolder,
    NotARunFolder,
    RunFolder,
    SupernetDir,
    TrialFolder,
    parse_trial_number,
    trial_dir_of,
    trial_folder_name,
)
from spvit.errors import ConfigError


# ---------------------------------------------------------------------------- trial numbers
@pytest.mark.parametrize("number, name", [(0, "0000"), (7, "0007"), (1234, "1234"),
                                          (12345, "12345")])
def test_trial_folder_names_round_trip(number, name):
    assert trial_folder_name(number) == name
    assert parse_trial_number(name) == number
    assert trial_dir_of(number) == f"trials/{name}"
    assert RunFolder("RUN").trial(number).number == number


@pytest.mark.parametrize("name", ["7", "007", "00007", "0007.bak", "-001", "abcd", "", "00 7",
                                  "\u0660\u0660\u0660\u0667"])  # Arabic-Indic digits
def test_only_the_written_form_is_a_trial_number(name):
    assert parse_trial_number(name) is None
    assert TrialFolder(Path("RUN/trials") / (name or "x")).number is None


@pytest.mark.parametrize("number", [-1, True, 1.0, "7"])
def test_a_trial_number_is_an_integer_from_zero(number):
    with pytest.raises(ValueError, match="integer >= 0"):
        trial_folder_name(number)


def test_trial_numbers_lists_the_trial_folders_on_disk(tmp_path):
    folder = RunFolder(tmp_path)
    assert folder.trial_numbers() == []  # no trials/ yet
    for name in ("0010", "0002", "12345", "7", "0003.old", "notes"):
        (folder.trials / name).mkdir(parents=True)
    (folder.trials / "0004").write_text("a file, not a trial folder")
    assert folder.trial_numbers() == [2, 10, 12345]


def test_a_trial_folder_is_where_the_study_says(tmp_path):
    folder = RunFolder(tmp_path)
    assert folder.trial_at(None, 3).path == tmp_path / "trials" / "0003"
    assert folder.trial_at("", 3).path == tmp_path / "trials" / "0003"
    assert folder.trial_at("trials/0009", 3).path == tmp_path / "trials" / "0009"
    elsewhere = tmp_path.parent / "earlier" / "trials" / "0001"  # a warm-started trial
    assert folder.trial_at(str(elsewhere), 3).path == elsewhere


# ---------------------------------------------------------------------------- the folders
def test_folders_are_frozen_values_around_a_path(tmp_path):
    a, b = RunFolder(str(tmp_path)), RunFolder(tmp_path)
    assert a == b and hash(a) == hash(b) and isinstance(a.path, Path)
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.path = tmp_path / "other"
    trial = a.trial(1)
    assert {trial.metrics.name, trial.arch.name, trial.weights.name, trial.training.name,
            trial.ds_config.name, trial.failure.name} == {
        "metrics.jsonl", "arch.yaml", "model.safetensors", "training.yaml", "ds_config.json",
        "failure.json"}
    assert trial.checkpoint_state.relative_to(trial.path).as_posix() == "checkpoint/state.json"
    assert trial.checkpoint_latest.parent == trial.checkpoint
    assert [p.name for p in (a.run_json, a.space, a.journal, a.trials, a.drivers, a.tune,
                             a.reports, a.export, a.oneshot)] == [
        "run.json", "space.yaml", "study.journal", "trials", "drivers", "tune", "reports",
        "export", "oneshot"]
    assert all(p.parent == a.path for p in (a.run_json, a.journal, a.trials, a.oneshot))
    sn = SupernetDir(tmp_path)
    assert (sn.info.name, sn.weights.name) == ("supernet.json", "supernet.safetensors")


def test_each_marker_makes_its_kind_of_folder(tmp_path):
    for i, name in enumerate(TrialFolder.MARKERS):
        path = tmp_path / f"trial{i}" / name
        path.parent.mkdir(parents=True)
        path.write_text("{}")
        assert outputs.kind_of(tmp_path / f"trial{i}") == "trial folder", name
    for i, name in enumerate(RunFolder.MARKERS):
        (tmp_path / f"run{i}").mkdir()
        (tmp_path / f"run{i}" / name).write_text("{}")
        assert outputs.kind_of(tmp_path / f"run{i}") == "run folder", name
    SupernetDir(tmp_path / "sn").path.mkdir()
    SupernetDir(tmp_path / "sn").info.write_text("{}")
    assert outputs.kind_of(tmp_path / "sn") == "supernet folder"


def test_an_export_is_its_files_and_nothing_else(tmp_path):
    assert outputs.EXPORT_FILES == ExportFolder.ALL_FILES
    assert ExportFolder.ALL_FILES - set(ExportFolder.FILES) == {ExportFolder(tmp_path).marker.name}
    old = ExportFolder(tmp_path / "old")  # exported before the marker existed
    old.path.mkdir()
    for name in ExportFolder.FILES:
        (old.path / name).write_text("x")
    assert outputs.is_export(old.path)
    (old.path / "notes.txt").write_text("x")
    assert not outputs.is_export(old.path)
    partial = tmp_path / "partial"
    partial.mkdir()
    ExportFolder(partial).arch.write_text("x")
    assert not outputs.is_export(partial)  # the weights are required


def test_failure_reason_is_read_leniently(tmp_path):
    trial = TrialFolder(tmp_path)
    assert trial.read_failure_reason() is None
    for damaged in (b"{oops", b"\xff\xfe", b"[1]", b'{"reason": ""}'):
        trial.failure.write_bytes(damaged)
        assert trial.read_failure_reason() is None, damaged
    trial.failure.write_text(json.dumps({"reason": "TrainingDiverged: loss nan"}))
    assert trial.read_failure_reason() == "TrainingDiverged: loss nan"


# ---------------------------------------------------------------------------- journal
@pytest.mark.parametrize("storage, expected", [
    (None, "RUN/study.journal"), ("", "RUN/study.journal"), ("other.journal", "RUN/other.journal"),
    ("sub/s.journal", "RUN/sub/s.journal"), ("/abs/s.journal", "/abs/s.journal"),
])
def test_the_journal_a_storage_entry_names(storage, expected):
    assert RunFolder("RUN").journal_at(storage).as_posix() == expected


@pytest.mark.parametrize("storage", ["sqlite:///x.db", "postgresql://u@h/db"])
def test_a_database_has_no_journal(storage):
    assert journal.run_journal("RUN", storage) is None


def test_the_journal_of_a_home_path_is_expanded(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert RunFolder("RUN").journal_at("~/s.journal") == tmp_path / "s.journal"
    assert journal.run_journal("RUN", "~/s.journal") == tmp_path / "s.journal"


# ---------------------------------------------------------------------------- run.json
def test_read_run_json_returns_the_object(tmp_path):
    RunFolder(tmp_path).run_json.write_text(json.dumps({"study_name": "s", "storage": None}))
    assert RunFolder(tmp_path).read_run_json() == {"study_name": "s", "storage": None}


def _damaged(tmp_path):
    file = tmp_path / "file"
    file.write_text("x")
    cases = [(tmp_path / "missing", NotARunFolder, "does not exist"),
             (file, NotARunFolder, "is a file, not a folder"),
             (tmp_path / "empty", NotARunFolder, "run.json is missing")]
    (tmp_path / "empty").mkdir()
    for name, data, needle in (("bad", b"{oops", "is not valid JSON (Expecting"),
                               ("binary", b"\xff\xfe\x00", "is not valid JSON (not UTF-8 text)"),
                               ("list", b"[1, 2]", "must hold a JSON object")):
        (tmp_path / name).mkdir()
        RunFolder(tmp_path / name).run_json.write_bytes(data)
        cases.append((tmp_path / name, ConfigError, needle))
    return cases


def test_read_run_json_refuses_with_one_line(tmp_path):
    for path, error, needle in _damaged(tmp_path):
        with pytest.raises(error, match=re.escape(needle)) as info:
            RunFolder(path).read_run_json()
        message = str(info.value)
        assert "\n" not in message and str(path) in message, message
        assert isinstance(info.value, ConfigError)  # the CLI prints it as one line, exit 2


def test_the_run_readers_share_the_reader(tmp_path):
    """`nas.run` reads run.json through the layout: same refusals, each with its own advice."""
    for path, _, needle in _damaged(tmp_path):
        with pytest.raises(ConfigError, match=re.escape(needle)):
            run.read_run_info(path)
    (tmp_path / "list2").mkdir()
    RunFolder(tmp_path / "list2").run_json.write_text('{"storage": null}')
    with pytest.raises(ConfigError, match="string `study_name`"):
        run.read_run_info(tmp_path / "list2")
    with pytest.raises(ConfigError, match="cannot resume: .* does not exist.*Drop `resume`"):
        run.RunInfo.load(tmp_path / "empty")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        run.RunInfo.load(tmp_path / "bad")
