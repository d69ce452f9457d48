"""What the commands refuse so that a user's work is never lost or hidden: destructive --out
paths, corrupt journals, results that do not reach the study, silent failures, flags without
effect, closed pipes. All in-process, without Ray or training."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from optuna.trial import TrialState

from launch import cli
from launch.search import SearchOutcome, SearchRequest, _check_success, plan_search
from launch.searcher import StudySearcher, TrialErrors, summarize_error
from nas import study as nas_study
from nas.journal import JournalCorrupt, check_journal, scan_journal
from nas.outputs import EXPORT_MARKER, check_output
from nas.storage import make_storage
from search_spaces.space import SearchSpace
from spvit.errors import ConfigError
from tests.nas.test_pareto import ARCHS, make_run
from tests.tiny_space import changed, small_space, write_space

SPACE = small_space(search={"trials": 3, "population_size": 2, "max_consecutive_failures": 2})


@pytest.fixture(autouse=True)
def _available_commands(monkeypatch):
    monkeypatch.setattr(cli, "COMMANDS", {
        name: entry for name, entry in cli.COMMANDS.items()
        if importlib.util.find_spec(entry[0]) is not None})


@pytest.fixture
def run_dir(tmp_path):
    return make_run(tmp_path / "runs", weights=True)


@pytest.fixture
def space_file(tmp_path):
    return write_space(tmp_path / "tiny.yaml", SPACE)


def spvit_nas(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line(code, err, needle):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], err
    assert "Traceback" not in err
    return lines[0]


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------- outputs
@pytest.mark.parametrize("where, needle", [
    (lambda run: run, "already exists and is a run folder"),
    (lambda run: run / "trials", "lies inside the run folder"),
    (lambda run: run / "trials" / "0001", "lies inside the run folder"),
    (lambda run: run.parent, "contains the run folder"),
])
def test_export_overwrite_never_destroys_a_run(run_dir, capsys, where, needle):
    other = make_run(run_dir.parent / "other")  # an unrelated run next to it
    before, before_other = snapshot(run_dir), snapshot(other)
    code, _, err = spvit_nas(capsys, "export", run_dir, "--trial", 1, "--out", where(run_dir),
                             "--overwrite")
    one_line(code, err, needle)
    assert snapshot(run_dir) == before and snapshot(other) == before_other


def test_overwrite_replaces_only_a_previous_export(run_dir, tmp_path, capsys):
    out = tmp_path / "model"
    assert spvit_nas(capsys, "export", run_dir, "--trial", 1, "--out", out)[0] == 0
    assert (out / EXPORT_MARKER).is_file()
    code, _, err = spvit_nas(capsys, "export", run_dir, "--trial", 2, "--out", out)
    one_line(code, err, "Set --overwrite")
    assert spvit_nas(capsys, "export", run_dir, "--trial", 2, "--out", out,
                     "--overwrite")[0] == 0
    assert yaml.safe_load((out / "arch.yaml").read_text())["embed_dim"] == ARCHS[2].embed_dim
    # a folder of the user's own is never replaced, even with --overwrite
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    code, _, err = spvit_nas(capsys, "export", run_dir, "--trial", 1, "--out", mine,
                             "--overwrite")
    one_line(code, err, "--overwrite replaces only a previous export")
    assert (mine / "notes.txt").read_text() == "keep me"
    # an export with extra files is not replaced either
    (out / "results.csv").write_text("1,2\n")
    code, _, err = spvit_nas(capsys, "export", run_dir, "--trial", 1, "--out", out,
                             "--overwrite")
    one_line(code, err, "also holds ['results.csv']")


def test_the_default_export_inside_the_run_is_allowed(run_dir):
    assert check_output(run_dir / "export", command="export") == (run_dir / "export").resolve()
    (run_dir / "export").mkdir()
    (run_dir / "export" / EXPORT_MARKER).write_text("{}")
    (run_dir / "export" / "arch.yaml").write_text("x")
    check_output(run_dir / "export", command="export", overwrite=True)
    with pytest.raises(ConfigError, match="lies inside the run folder"):
        check_output(run_dir / "reports" / "x", command="export")


def test_train_refuses_an_export_a_run_and_a_search_trial(run_dir, tmp_path, capsys):
    export = tmp_path / "model"
    assert spvit_nas(capsys, "export", run_dir, "--trial", 1, "--out", export)[0] == 0
    before = snapshot(export)
    for out, needle in ((export, "already exists and is an export"),
                        (run_dir, "already exists and is a run folder"),
                        (run_dir / "trials" / "0001", "lies inside the run folder")):
        code, _, err = spvit_nas(capsys, "train", "--arch", export / "arch.yaml", "--out", out,
                                 "--epochs", 1)
        one_line(code, err, needle)
    assert snapshot(export) == before  # its own training.yaml (the recipe) included


def test_train_resume_with_nothing_to_resume(tmp_path, capsys):
    code, _, err = spvit_nas(capsys, "train", "--arch", "spvit_test", "--out", tmp_path / "new",
                             "--resume")
    one_line(code, err, "holds no checkpoint to resume")
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("command", ["train", "search"])
def test_an_existing_file_as_out(tmp_path, space_file, capsys, command):
    target = tmp_path / "file.txt"
    target.write_text("mine")
    argv = (["train", "--arch", "spvit_test"] if command == "train"
            else ["search", "--space", space_file])
    code, _, err = spvit_nas(capsys, *argv, "--out", target)
    one_line(code, err, "is an existing file, not a folder")
    assert target.read_text() == "mine"


# ---------------------------------------------------------------------------- before launch
@pytest.mark.parametrize("flags, needle", [
    (["--dataset", "cifar10:/nonexistent/cifar"], "/nonexistent/cifar"),
    (["--dataset", "digts"], "Did you mean 'digits'?"),
    (["--cpus-per-worker", "0"], "--cpus-per-worker must be > 0"),
    (["--workers", "64"], "needs 64 CPUs"),
])
def test_train_checks_before_writing_anything(tmp_path, capsys, flags, needle):
    out = tmp_path / "train"
    code, _, err = spvit_nas(capsys, "train", "--arch", "spvit_test", "--out", out, *flags)
    one_line(code, err, needle)
    assert not out.exists()  # no training.yaml, no folder


def test_train_with_gpus_on_a_machine_without_enough_refuses_at_once(tmp_path, capsys,
                                                                     monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = spvit_nas(capsys, "train", "--arch", "spvit_test", "--out",
                             tmp_path / "train", "--workers", 2, "--use-gpu")
    one_line(code, err, "need 2 GPU(s), but this machine has 0")
    assert not (tmp_path / "train").exists()


@pytest.mark.parametrize("flags, needle", [
    (["--num-cpus", "0"], "--num-cpus must be an integer >= 1"),
    (["--asha-reduction-factor", "3"], "Add one, or drop --asha-reduction-factor"),
    (["--study-name", ""], "--study-name must be a non-empty name"),
    (["--workers-per-trial", "64"], "needs 64 CPUs"),
])
def test_search_refuses_before_anything_is_written(tmp_path, space_file, capsys, flags, needle):
    out = tmp_path / "run"
    code, _, err = spvit_nas(capsys, "search", "--space", space_file, "--out", out, *flags)
    one_line(code, err, needle)
    assert not out.exists()


def test_search_checks_the_dataset_before_launch(tmp_path, capsys):
    space = write_space(tmp_path / "cifar.yaml",
                        changed(SPACE, arch={"in_chans": 3, "img_size": 32},
                                training={"dataset": f"cifar10:{tmp_path}/no-data"}))
    out = tmp_path / "run"
    code, _, err = spvit_nas(capsys, "search", "--space", space, "--out", out)
    one_line(code, err, "no-data")
    assert not out.exists()
    write_space(space, changed(SPACE, arch={"num_classes": 7}))
    code, _, err = spvit_nas(capsys, "search", "--space", space, "--out", out)
    one_line(code, err, "has 10 classes, but the architecture has num_classes 7")


def test_pareto_priors_trial_needs_plot(run_dir, capsys):
    code, _, err = spvit_nas(capsys, "pareto", run_dir, "--priors-trial", 1)
    one_line(code, err, "--plot is not given")


# ---------------------------------------------------------------------------- closed pipe
def test_closed_pipe_ends_quietly(run_dir, capsys, monkeypatch):
    class ClosedPipe(io.StringIO):
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def fileno(self):
            raise io.UnsupportedOperation

    monkeypatch.setattr("sys.stdout", ClosedPipe())
    assert cli.main(["pareto", str(run_dir)]) == cli.EXIT_BROKEN_PIPE
    assert "Traceback" not in capsys.readouterr().err


# ---------------------------------------------------------------------------- journals
def _journal_lines(run_dir: Path) -> list[bytes]:
    return (run_dir / "study.journal").read_bytes().splitlines(keepends=True)


@pytest.mark.parametrize("damage, needle", [
    (lambda lines: lines[:5] + [b"this is not json\n"] + lines[5:], "not a JSON record"),
    (lambda lines: lines[:5] + [b"\xff\xfe\x00\x9c random \x80\n"] + lines[5:], "not UTF-8"),
    (lambda lines: lines[:5] + [b'{"op_code": 99, "worker_id": "w"}\n'] + lines[5:],
     "unknown op_code 99"),
    (lambda lines: lines[:5] + [b'{"op_code": 6, "worker_id": "w"}\n'] + lines[5:],
     "op_code 6 without trial_id"),
])
@pytest.mark.parametrize("command", ["pareto", "export"])
def test_a_corrupt_journal_is_reported_with_its_place(run_dir, tmp_path, capsys, damage,
                                                      needle, command):
    journal = run_dir / "study.journal"
    lines = _journal_lines(run_dir)
    journal.write_bytes(b"".join(damage(lines)))
    offset = sum(len(line) for line in lines[:5])
    argv = [command, run_dir] + (["--trial", 1, "--out", tmp_path / "x"]
                                 if command == "export" else [])
    code, out, err = spvit_nas(capsys, *argv)
    line = one_line(code, err, needle)
    assert f"{journal}" in line and "line 6" in line and f"byte offset {offset}" in line
    assert f"spvit-nas repair-journal {run_dir}" in line
    assert out == "" and not (tmp_path / "x").exists()

    # repair: drop the damaged record, keep every intact one (and the original)
    damaged = journal.read_bytes()
    code, out, _ = spvit_nas(capsys, "repair-journal", run_dir)
    assert code == 0 and "dropped line 6 (damaged:" in out
    backups = list(run_dir.glob("study.journal.bak-*"))
    assert len(backups) == 1 and backups[0].read_bytes() == damaged
    assert journal.read_bytes() == b"".join(lines)
    assert scan_journal(journal).ok


def test_a_torn_last_line_is_dropped_and_said(run_dir, capsys):
    journal = run_dir / "study.journal"
    code, full, _ = spvit_nas(capsys, "pareto", run_dir, "--json")
    intact = journal.read_bytes()
    journal.write_bytes(intact + b'{"op_code":8,"worker_id":"abc","trial_id":3,"us')
    code, out, err = spvit_nas(capsys, "pareto", run_dir, "--json")
    assert code == 0 and json.loads(out) == json.loads(full)
    assert "ended in a torn line" in err and "dropped it" in err
    assert journal.read_bytes() == intact
    assert len(list(run_dir.glob("study.journal.bak-*"))) == 1


def test_a_journal_cut_mid_line_is_not_silently_shorter(run_dir, capsys):
    journal = run_dir / "study.journal"
    lines = _journal_lines(run_dir)
    # a cut that leaves a complete-looking first half and garbage after it
    journal.write_bytes(b"".join(lines[:8]) + lines[8][:10] + b"\x00\x00\x00\x00" * 300)
    code, _, err = spvit_nas(capsys, "pareto", run_dir)
    one_line(code, err, "line 9")


def test_check_journal_passes_an_intact_file_and_ignores_a_missing_one(run_dir, tmp_path):
    scan = check_journal(run_dir / "study.journal")
    assert scan.ok and scan.good_bytes == scan.size
    assert check_journal(tmp_path / "missing.journal") is None
    (tmp_path / "j").write_bytes(b"[1, 2]\n")
    with pytest.raises(JournalCorrupt, match="a JSON list, not an operation record"):
        check_journal(tmp_path / "j")


def test_search_resume_checks_the_journal_before_opening_it(tmp_path, space_file, capsys):
    run = tmp_path / "run"
    plan = plan_search(SearchRequest(out=run, space=space_file))
    storage = make_storage(None, run)
    nas_study.open_study(storage, study_name=plan.info.study_name,
                         sampler=nas_study.make_sampler("random", seed=0), resume=False)
    plan.space.save(run / "space.yaml")
    plan.info.save(run)
    journal = run / "study.journal"
    journal.write_bytes(journal.read_bytes() + b"garbage\n")
    code, _, err = spvit_nas(capsys, "search", "--out", run, "--resume")
    one_line(code, err, "is corrupt at line")


# ---------------------------------------------------------------------------- lost results
def _searcher(run_dir: Path, space_file: Path, **kwargs):
    space = SearchSpace.load(space_file)
    study = nas_study.open_study(make_storage(None, run_dir), study_name="s",
                                 sampler=nas_study.make_sampler("random", seed=0), resume=False)
    ss = nas_study.SearchStudy(study, space, run_dir=run_dir, budget=2)
    waits: list[float] = []
    searcher = StudySearcher(ss, trials=3, base_config={"training": {"epochs": 2}},
                             sleep=waits.append, **kwargs)
    return searcher, ss, waits


class FlakyTell:
    """Makes the study's storage raise on `set_trial_state_values` `times` times."""

    def __init__(self, storage, times):
        self.storage, self.times, self.calls = storage, times, 0
        self.real = storage.set_trial_state_values

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.times is None or self.calls <= self.times:
            raise OSError("disk quota exceeded")
        return self.real(*args, **kwargs)


def test_a_tell_that_fails_once_is_retried(tmp_path, space_file):
    searcher, ss, waits = _searcher(tmp_path, space_file)
    searcher.suggest("a")
    number = searcher.launched[0]
    storage = ss.study._storage
    storage.set_trial_state_values = FlakyTell(storage, 1)
    searcher.on_trial_complete("a", {"epoch": 2, "val_acc": 0.5})
    assert ss._frozen(number).state == TrialState.COMPLETE
    assert waits == [0.5] and not searcher.stopped and searcher.outcomes == {"COMPLETE": 1}


def test_a_tell_that_always_fails_stops_the_search_and_keeps_the_trial(tmp_path, space_file):
    searcher, ss, waits = _searcher(tmp_path, space_file)
    searcher.suggest("a")
    number = searcher.launched[0]
    storage = ss.study._storage
    storage.set_trial_state_values = FlakyTell(storage, None)
    searcher.on_trial_complete("a", {"epoch": 2, "val_acc": 0.5})
    assert waits == [0.5, 1.0, 2.0]  # doubling backoff, 4 attempts
    assert searcher.stopped and searcher.record_error is not None
    assert f"trial {number}" in searcher.record_error
    assert "OSError: disk quota exceeded" in searcher.record_error
    assert "--resume" in searcher.record_error
    # the trial stays RUNNING (a resumed search adopts it and records it from its folder)
    storage.set_trial_state_values = storage.set_trial_state_values.real
    assert ss._frozen(number).state == TrialState.RUNNING
    assert searcher.suggest("b") == "FINISHED"


def test_the_searcher_checkpoint_is_written_atomically(tmp_path, space_file, monkeypatch):
    searcher, _, _ = _searcher(tmp_path, space_file)
    path = tmp_path / "searcher-state.json"
    searcher.save(str(path))
    old = path.read_text()
    searcher.suggest("a")

    def crash(*args, **kwargs):
        raise OSError("killed mid-write")

    monkeypatch.setattr("os.replace", crash)
    with pytest.raises(OSError):
        searcher.save(str(path))
    assert path.read_text() == old and json.loads(old)["launched"] == []


# ---------------------------------------------------------------------------- silent failures
def test_a_search_whose_trials_all_failed_exits_1_with_the_first_cause(tmp_path, space_file):
    searcher, ss, _ = _searcher(tmp_path, space_file, max_consecutive_failures=5,
                                error_lookup={"a": "ray.exceptions.ActorDiedError: The actor"
                                              " died (The actor never ran - it was cancelled"
                                              " before it started running.)"}.get)
    for tid in ("a", "b"):
        searcher.suggest(tid)
        searcher.on_trial_complete(tid, None, error=True)
    outcome = SearchOutcome(run_dir=tmp_path, study_name="s", storage="x", exit_code=0,
                            message="")
    _check_success(SimpleNamespace(run_dir=tmp_path), ss.study, searcher, outcome)
    assert outcome.exit_code == 1
    assert outcome.message.startswith("search failed: all 2 launched trial(s) failed; first"
                                      f" cause: trial {searcher.launched[0]}:")
    assert "The actor never ran" in outcome.message


def test_a_search_without_a_full_budget_trial_exits_1(tmp_path, space_file):
    searcher, ss, _ = _searcher(tmp_path, space_file)
    searcher.suggest("a")
    searcher.on_trial_complete("a", {"epoch": 1, "val_acc": 0.3})  # PRUNED
    outcome = SearchOutcome(run_dir=tmp_path, study_name="s", storage="x", exit_code=0,
                            message="")
    _check_success(SimpleNamespace(run_dir=tmp_path), ss.study, searcher, outcome)
    assert outcome.exit_code == 1 and "without a full-budget trial" in outcome.message
    assert "'PRUNED': 1" in outcome.message


def test_trial_errors_know_trials_whose_actor_never_started(tmp_path):
    path = tmp_path / "error.txt"
    path.write_text("Failure # 1 (occurred at 2026-01-01)\n"
                    "ray.exceptions.ActorDiedError: The actor died unexpectedly before"
                    " finishing this task.\n\tclass_name: ImplicitFunc\n"
                    "The actor never ran - it was cancelled before it started running.\n")
    errors = TrialErrors()
    errors.on_step_begin(0, [SimpleNamespace(trial_id="t1", error_file=str(path))])
    reason = errors.error_of("t1")
    assert reason.startswith("ray.exceptions.ActorDiedError") and "never ran" in reason


def test_summarize_error_keeps_what_happened_to_the_node():
    dump = ("ray.exceptions.ActorDiedError: The actor died unexpectedly.\n"
            "The actor died because its node has died. Node Id: abc\n")
    assert "its node has died" in summarize_error(dump)


def test_auth_mode_mismatch_says_which_side_to_change():
    from launch.ray_env import auth_mismatch

    line = auth_mismatch("token", [("127.0.0.1", "token", ""), ("127.0.0.2", "disabled", "")])
    assert "this driver runs with RAY_AUTH_MODE=token, but node(s) 127.0.0.2 run with" \
           " disabled" in line and "Restart those nodes with RAY_AUTH_MODE=token" in line
    line = auth_mismatch("disabled", [("10.0.0.1", "token", "")])
    assert "Unset RAY_AUTH_MODE=disabled for this driver" in line
    line = auth_mismatch("token", [("10.0.0.1", None, "no answer within 60s")])
    assert "did not run a probe task" in line and "RAY_AUTH_MODE=token" in line
    assert auth_mismatch("token", [("10.0.0.1", "token", "")]) is None


def test_the_guard_only_reads(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    check_output(tmp_path / "a" / "b" / "c", command="train")
    check_output(tmp_path / "a", command="search")
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    shutil.rmtree(tmp_path / "a")


def test_pareto_into_head_has_no_traceback(run_dir):
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    for _ in range(3):
        proc = subprocess.run(f"'{sys.executable}' -m launch.cli pareto '{run_dir}' | head -2;"
                              " exit ${PIPESTATUS[0]}", shell=True, executable="/bin/bash",
                              env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode in (0, cli.EXIT_BROKEN_PIPE), proc.stderr
        assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr
        assert len(proc.stdout.splitlines()) == 2
