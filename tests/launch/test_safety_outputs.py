"""One output guard for every command that writes into an `--out` (`nas.outputs.check_output`):
`supernet train` refuses a search's run folder, a folder inside one, an export and a trial folder
as `export`, `train` and `search` do, and the others refuse a supernet folder. In-process; the
refusals come before any training, so nothing here starts Ray or DeepSpeed."""

from __future__ import annotations

import importlib.util
import json

import pytest
import yaml

from launch import cli
from nas.outputs import COMMANDS, check_output, kind_of, write_export_marker
from spvit.errors import ConfigError
from tests.launch.test_safety import one_line, snapshot, spvit_nas
from tests.messages import assert_names_value_and_fix
from tests.nas.test_pareto import make_run
from tests.tiny_space import tiny_space


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
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_space()))
    return path


def supernet_folder(path):
    """What `supernet train` leaves after one epoch, as far as the guard looks."""
    (path / "checkpoint" / "epoch_0001").mkdir(parents=True)
    (path / "checkpoint" / "state.json").write_text(json.dumps({"tag": "epoch_0001"}))
    (path / "supernet.json").write_text(json.dumps({"epochs_trained": 1, "epochs": 2}))
    (path / "metrics.jsonl").write_text(json.dumps({"epoch": 1}) + "\n")
    (path / "space.yaml").write_text("name: tiny\n")
    return path


def train_folder(path):
    """What `spvit-nas train` leaves (a trial folder with its recipe)."""
    (path / "checkpoint" / "epoch_0001").mkdir(parents=True)
    (path / "checkpoint" / "state.json").write_text(json.dumps({"tag": "epoch_0001"}))
    (path / "training.yaml").write_text("epochs: 2\n")
    (path / "metrics.jsonl").write_text(json.dumps({"epoch": 1}) + "\n")
    return path


def exported(path):
    """What `spvit-nas export` leaves, as far as the guard looks."""
    path.mkdir(parents=True)
    write_export_marker(path)
    for name in ("arch.yaml", "model.safetensors", "training.yaml"):
        (path / name).write_text("x")
    return path


@pytest.mark.parametrize("where, needle", [
    (lambda run: run, "already exists and is a run folder"),
    (lambda run: run / "sub", "lies inside the run folder"),
    (lambda run: run / "trials" / "0001", "lies inside the run folder"),
    (lambda run: run.parent, "contains the run folder"),
])
def test_supernet_train_never_writes_into_a_run(run_dir, space_file, capsys, where, needle):
    before = snapshot(run_dir)
    code, _, err = spvit_nas(capsys, "supernet", "train", "--space", space_file, "--out",
                             where(run_dir))
    line = one_line(code, err, needle)
    assert_names_value_and_fix(line, where(run_dir).resolve())
    assert "`supernet train`" in line or "lies inside" in line
    assert snapshot(run_dir) == before  # space.yaml, trials and weights untouched
    assert not (run_dir / "sub").exists()


def test_supernet_train_refuses_an_export_and_a_trial_folder(run_dir, tmp_path, space_file,
                                                             capsys):
    export = exported(tmp_path / "model")
    trained = train_folder(tmp_path / "trained")
    for out, needle in ((export, "already exists and is an export"),
                        (export / "sub", "lies inside the export"),
                        (trained, "already exists and is a trial folder"),
                        (trained / "sub", "lies inside the trial folder")):
        before = snapshot(out.parent if out.name == "sub" else out)
        for resume in ([], ["--resume"]):
            code, _, err = spvit_nas(capsys, "supernet", "train", "--space", space_file,
                                     "--out", out, *resume)
            line = one_line(code, err, needle)
            # the advice is another --out, never deleting the folder's checkpoint
            assert "Delete" not in line and "Choose" in line
            assert_names_value_and_fix(line, out.resolve())
        assert snapshot(out.parent if out.name == "sub" else out) == before


def test_the_other_commands_refuse_a_supernet_folder(run_dir, tmp_path, space_file, capsys):
    sn = supernet_folder(tmp_path / "sn")
    before = snapshot(sn)
    for argv, needle in (
            (["train", "--arch", "spvit_test", "--out", sn], "already exists and is a supernet"
                                                            " folder"),
            (["train", "--arch", "spvit_test", "--out", sn, "--resume"],
             "already exists and is a supernet folder"),
            (["train", "--arch", "spvit_test", "--out", sn / "x"], "lies inside the supernet"),
            (["search", "--space", space_file, "--out", sn], "already exists and is a supernet"),
            (["export", run_dir, "--trial", 1, "--out", sn, "--overwrite"],
             "already exists and is a supernet folder")):
        code, _, err = spvit_nas(capsys, *argv)
        one_line(code, err, needle)
    assert snapshot(sn) == before


def test_one_guard_knows_every_writing_command(tmp_path):
    assert set(COMMANDS) == {"export", "train", "search", "supernet"}
    sn = supernet_folder(tmp_path / "sn")
    assert kind_of(sn) == "supernet folder"
    # its own folder: a supernet is continued there (the command then asks for --resume)
    assert check_output(sn, command="supernet", resume=True) == sn.resolve()
    assert check_output(sn, command="supernet") == sn.resolve()
    for command in ("export", "train", "search"):
        with pytest.raises(ConfigError, match="is a supernet folder"):
            check_output(sn, command=command)
    with pytest.raises(ConfigError, match="lies inside the supernet folder"):
        check_output(sn / "inner", command="supernet")
    assert check_output(tmp_path / "new", command="supernet") == (tmp_path / "new").resolve()
    assert not (tmp_path / "new").exists()  # checks only


# ---------------------------------------------------------------------------- search: before Ray
@pytest.fixture
def no_ray(monkeypatch):
    """Fails the test if the search gets as far as starting or joining Ray."""
    import launch.search

    def connect(*args, **kwargs):
        raise AssertionError("the search started Ray before refusing its input")

    monkeypatch.setattr(launch.search, "_connect", connect)


def _damaged_runs(tmp_path):
    tmp_path.mkdir()
    missing = tmp_path / "no-such-run"
    empty = tmp_path / "empty"
    empty.mkdir()
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a run")
    bad_json = make_run(tmp_path / "bad-json")
    (bad_json / "run.json").write_text("{ this is not json")
    binary = make_run(tmp_path / "binary")
    (binary / "run.json").write_bytes(b"\xff\xfe\x00\x9c\x80 garbage")
    no_journal = make_run(tmp_path / "no-journal")
    (no_journal / "study.journal").unlink()
    bad_journal = make_run(tmp_path / "bad-journal")
    lines = (bad_journal / "study.journal").read_bytes().splitlines(keepends=True)
    (bad_journal / "study.journal").write_bytes(b"".join(lines[:3] + [b"garbage\n"] + lines[3:]))
    return [(missing, "does not exist"), (empty, "run.json does not exist"),
            (a_file, "is a file, not a run folder"), (bad_json, "is not valid JSON"),
            (binary, "is not valid JSON (not UTF-8 text)"),
            (no_journal, "study journal"), (bad_journal, "is corrupt at line 4")]


def test_warm_start_is_checked_before_ray_and_before_any_file(tmp_path, space_file, capsys,
                                                              no_ray):
    out = tmp_path / "run"
    for path, needle in _damaged_runs(tmp_path / "earlier"):
        code, _, err = spvit_nas(capsys, "search", "--space", space_file, "--out", out,
                                 "--warm-start", path)
        line = one_line(code, err, needle)
        assert_names_value_and_fix(line, "--warm-start", path)
        assert not out.exists(), path  # no run.json, space.yaml, journal or drivers/ left
    # the corrected command is not refused by what a failed one left behind
    good = make_run(tmp_path / "earlier" / "good")
    with pytest.raises(AssertionError, match="started Ray"):
        spvit_nas(capsys, "search", "--space", space_file, "--out", out, "--warm-start", good)


def test_warm_start_with_resume_is_refused_before_ray(tmp_path, space_file, capsys, no_ray):
    code, _, err = spvit_nas(capsys, "search", "--out", tmp_path / "run", "--resume",
                             "--warm-start", make_run(tmp_path / "earlier"))
    assert code == 2 and "Traceback" not in err


@pytest.mark.parametrize("flags, needle", [
    (["--asha", "--scheduler", "fifo"], "--asha and --scheduler fifo"),
    (["--asha", "--scheduler", "moasha"], "--asha and --scheduler moasha"),
])
def test_conflicting_scheduler_flags_are_refused(tmp_path, space_file, capsys, no_ray, flags,
                                                 needle):
    out = tmp_path / "run"
    code, _, err = spvit_nas(capsys, "search", "--space", space_file, "--out", out, *flags)
    line = one_line(code, err, needle)
    assert_names_value_and_fix(line, flags[-1])
    assert not out.exists()


def test_search_help_names_the_real_default_sampler(capsys):
    from search_spaces.search_defaults import DEFAULT_SAMPLER, SearchDefaults

    assert SearchDefaults().sampler == DEFAULT_SAMPLER == "auto"
    with pytest.raises(SystemExit):
        cli.main(["search", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: search.sampler, else auto)" in text
    assert "else nsga2" not in text
