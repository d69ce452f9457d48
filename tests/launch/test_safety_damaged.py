"""Damaged inputs every reading command refuses with one line: truncated or foreign weights files
(one error path, `spvit.io.load_safetensors`, for the supernet, its one-shot search and exports),
a scoring device this machine does not have. All in-process, without Ray or training."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import yaml
from safetensors.torch import save_file

from launch import cli
from nas.oneshot import (
    SPACE_FILE,
    WEIGHTS_FILE,
    SandwichSampler,
    supernet_choices,
    write_supernet_info,
)
from search_spaces.space import SearchSpace
from spvit.supernet import SPViTSupernet
from tests.launch.test_safety import one_line, spvit_nas
from tests.messages import assert_names_value_and_fix
from tests.nas.test_pareto import make_run
from tests.tiny_space import tiny_space


@pytest.fixture(autouse=True)
def _available_commands(monkeypatch):
    monkeypatch.setattr(cli, "COMMANDS", {
        name: entry for name, entry in cli.COMMANDS.items()
        if importlib.util.find_spec(entry[0]) is not None})


@pytest.fixture
def space_file(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_space()), encoding="utf-8")
    return path


@pytest.fixture
def supernet(tmp_path, space_file):
    """An (untrained) supernet folder as `spvit-nas supernet train` leaves it."""
    space = SearchSpace.load(space_file)
    folder = tmp_path / "sn"
    folder.mkdir()
    space.save(folder / SPACE_FILE)
    write_supernet_info(folder, space, SandwichSampler(space), epochs_trained=1)
    net = SPViTSupernet(supernet_choices(space), seed=0)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, folder / WEIGHTS_FILE)
    return folder


@pytest.fixture
def arch_file(tmp_path, supernet):
    sampler = SandwichSampler(SearchSpace.load(supernet / SPACE_FILE))
    path = tmp_path / "arch.yaml"
    sampler.smallest.save(path)
    return path


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def _random_bytes(path: Path) -> None:
    path.write_bytes(os.urandom(4096))


DAMAGE = {"truncated": _truncate, "random bytes": _random_bytes}


# ---------------------------------------------------------------------------- damaged weights
def test_the_intact_supernet_scores(capsys, supernet, arch_file):
    code, out, err = spvit_nas(capsys, "supernet", "score", "--supernet", supernet, "--arch",
                               arch_file)
    assert code == 0, err
    assert out.startswith("val_acc ")


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_supernet_score_refuses_damaged_weights_with_one_line(capsys, supernet, arch_file,
                                                              damage):
    DAMAGE[damage](supernet / WEIGHTS_FILE)
    before = (supernet / WEIGHTS_FILE).read_bytes()
    code, out, err = spvit_nas(capsys, "supernet", "score", "--supernet", supernet, "--arch",
                               arch_file)
    line = one_line(code, err, "is corrupt or not safetensors")
    assert_names_value_and_fix(line, supernet / WEIGHTS_FILE)
    assert out == "" and (supernet / WEIGHTS_FILE).read_bytes() == before


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_oneshot_search_refuses_damaged_supernet_weights_before_writing(
        capsys, tmp_path, supernet, space_file, damage):
    DAMAGE[damage](supernet / WEIGHTS_FILE)
    out_dir = tmp_path / "run"
    code, _, err = spvit_nas(capsys, "search", "--space", space_file, "--out", out_dir,
                             "--strategy", "oneshot", "--supernet", supernet)
    line = one_line(code, err, "is corrupt or not safetensors")
    assert str(supernet / WEIGHTS_FILE) in line
    assert not out_dir.exists()


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_export_refuses_damaged_trial_weights_with_the_same_line(capsys, tmp_path, damage):
    run_dir = make_run(tmp_path / "runs", weights=True)
    weights = run_dir / "trials" / "0000" / "model.safetensors"
    DAMAGE[damage](weights)
    code, _, err = spvit_nas(capsys, "export", run_dir, "--trial", 0)
    line = one_line(code, err, "is corrupt or not safetensors")
    assert_names_value_and_fix(line, weights)
    assert not (run_dir / "export").exists()


# ---------------------------------------------------------------------------- devices
@pytest.mark.parametrize("device, needle", [
    ("tpu9", "is not a torch device"),
    ("meta", "is not supported for scoring"),
])
def test_score_refuses_an_unknown_device_with_one_line(capsys, supernet, arch_file, device,
                                                       needle):
    code, _, err = spvit_nas(capsys, "supernet", "score", "--supernet", supernet, "--arch",
                             arch_file, "--device", device)
    line = one_line(code, err, needle)
    assert_names_value_and_fix(line, device)


def test_score_refuses_cuda_on_a_machine_without_one(capsys, monkeypatch, supernet, arch_file):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    code, _, err = spvit_nas(capsys, "supernet", "score", "--supernet", supernet, "--arch",
                             arch_file, "--device", "cuda")
    line = one_line(code, err, "needs a CUDA GPU")
    assert_names_value_and_fix(line, "cuda")


def test_score_refuses_a_gpu_index_beyond_the_machine(capsys, monkeypatch, supernet, arch_file):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    code, _, err = spvit_nas(capsys, "supernet", "score", "--supernet", supernet, "--arch",
                             arch_file, "--device", "cuda:5")
    line = one_line(code, err, "names GPU 5")
    assert_names_value_and_fix(line, "cuda:5")


# ---------------------------------------------------------------------------- dashboard
def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("damage, needle", [
    (b'{"op_code": 99, "worker_id": "w"}\n', "unknown op_code 99"),
    (b'{"op_code": 8, "worker_id": "w", "trial_id": 0, "user_attr": {"a": "\xff"}}\n',
     "not UTF-8"),
])
def test_dashboard_reports_a_damaged_journal_as_pareto_does(capsys, tmp_path, damage, needle):
    pytest.importorskip("optuna_dashboard")
    run_dir = make_run(tmp_path / "runs")
    journal = run_dir / "study.journal"
    lines = journal.read_bytes().splitlines(keepends=True)
    journal.write_bytes(b"".join(lines[:5]) + damage + b"".join(lines[5:]))
    before = _snapshot(run_dir)
    code, _, pareto_err = spvit_nas(capsys, "pareto", run_dir)
    pareto_line = one_line(code, pareto_err, "is corrupt at line 6")
    code, out, err = spvit_nas(capsys, "dashboard", run_dir, "--port", 1)
    line = one_line(code, err, needle)
    assert line.split(": error: ", 1)[1] == pareto_line.split(": error: ", 1)[1]
    assert "optuna-dashboard for study" not in out
    assert _snapshot(run_dir) == before


def test_dashboard_refuses_a_taken_port_before_announcing_itself(capsys, tmp_path):
    pytest.importorskip("optuna_dashboard")
    import socket

    run_dir = make_run(tmp_path / "runs")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, out, err = spvit_nas(capsys, "dashboard", run_dir, "--port", port)
    line = one_line(code, err, "is already in use")
    assert_names_value_and_fix(line, port, "--port")
    assert out == ""


# ---------------------------------------------------------------------------- --storage
@pytest.mark.parametrize("verb", [("pareto",), ("export", "--trial", "0"),
                                  ("pareto", "--plot")])
def test_a_missing_storage_path_is_refused_not_replaced_by_the_runs_own(capsys, tmp_path, verb):
    run_dir = make_run(tmp_path / "runs", weights=True)
    before = _snapshot(tmp_path)
    missing = tmp_path / "elsewhere" / "study.journal"
    code, out, err = spvit_nas(capsys, verb[0], run_dir, *verb[1:], "--storage", missing)
    line = one_line(code, err, "does not exist")
    assert_names_value_and_fix(line, missing)
    assert out == "" and _snapshot(tmp_path) == before


@pytest.mark.parametrize("verb", [("pareto",), ("export", "--trial", "0"), ("dashboard",)])
def test_a_missing_sqlite_database_is_refused_and_not_created(capsys, tmp_path, monkeypatch,
                                                              verb):
    run_dir = make_run(tmp_path / "runs", weights=True)
    monkeypatch.chdir(tmp_path)
    before = _snapshot(tmp_path)
    for url in ("sqlite:///absent.db", f"sqlite:///{tmp_path}/sub/absent.db"):
        code, out, err = spvit_nas(capsys, verb[0], run_dir, *verb[1:], "--storage", url)
        line = one_line(code, err, "does not exist")
        assert_names_value_and_fix(line, url)
        assert out == "" and _snapshot(tmp_path) == before
    assert not (tmp_path / "absent.db").exists() and not (tmp_path / "sub").exists()


def test_a_missing_sqlite_database_in_run_json_is_refused_and_not_created(capsys, tmp_path):
    import json

    run_dir = make_run(tmp_path / "runs")
    info = json.loads((run_dir / "run.json").read_text())
    url = f"sqlite:///{tmp_path}/gone.db"
    (run_dir / "run.json").write_text(json.dumps(dict(info, storage=url)))
    code, _, err = spvit_nas(capsys, "pareto", run_dir)
    one_line(code, err, "does not exist")
    assert not (tmp_path / "gone.db").exists()


@pytest.mark.parametrize("value, url", [
    ("postgresql://u@h/db", True), ("sqlite:///x.db", True), ("postgresql+psycopg2://h/d", True),
    ("study.journal", False), ("/abs/study.journal", False), ("", False), (None, False),
    ("dir/with://inside", False),
])
def test_one_rule_says_whether_a_storage_is_a_url(value, url):
    from nas import journal, run, storage

    assert storage.is_url(value) is url
    assert run.is_url(value) is url
    assert (journal.run_journal("RUN", value) is None) is url


# ---------------------------------------------------------------------------- export of a FAIL
def test_export_of_a_failed_duplicate_says_why_and_names_the_original(capsys, tmp_path):
    import optuna
    from optuna.trial import TrialState, create_trial

    from tests.nas.test_pareto import ARCHS, STUDY

    run_dir = make_run(tmp_path / "runs", weights=True)
    study = optuna.load_study(study_name=STUDY, storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(run_dir / "study.journal"))))
    reason = "duplicate of trial 0 (same architecture, never trained twice)"
    study.add_trial(create_trial(state=TrialState.FAIL, user_attrs={
        "arch": ARCHS[0].to_flat(), "duplicate_of": 0, "fail_reason": reason}))
    number = len(study.trials) - 1
    code, out, err = spvit_nas(capsys, "export", run_dir, "--trial", number)
    line = one_line(code, err, f"trial {number} failed ({reason})")
    assert "still" not in line and "wait" not in line.lower()
    assert_names_value_and_fix(line, "--trial 0")
    assert out == "" and not (run_dir / "export").exists()


# ---------------------------------------------------------------------------- cost, check-space
@pytest.mark.parametrize("text, missing", [
    ("blocks: [{heads: 2}, {heads: 2}]\nimg_size: 32\npatch_size: 4\nnum_classes: 10\n",
     "embed_dim"),
    ("depth: 1\nheads_0: 2\nembed_dim: 16\n", "img_size, patch_size"),
])
def test_cost_refuses_an_arch_without_its_size_fields(capsys, tmp_path, text, missing):
    path = tmp_path / "arch.yaml"
    path.write_text(text, encoding="utf-8")
    code, out, err = spvit_nas(capsys, "cost", "--arch", path)
    line = one_line(code, err, f"does not set {missing}")
    assert_names_value_and_fix(line, path)
    assert out == ""
    assert "192" not in line or missing == "embed_dim"  # a default is named only if left out


def test_cost_of_a_complete_arch_file_still_prices_it(capsys, tmp_path):
    path = tmp_path / "arch.yaml"
    path.write_text("blocks: [{heads: 2}]\nimg_size: 32\npatch_size: 4\nnum_classes: 10\n"
                    "embed_dim: 16\n", encoding="utf-8")
    code, out, err = spvit_nas(capsys, "cost", "--arch", path)
    assert code == 0, err
    assert "width 16" in out


@pytest.mark.parametrize("dataset, needle", [
    ("folder:{tmp}/nonexistent", "which does not exist"),
    ("folder:{tmp}/empty", "needs train/ and val/"),
    ("cifar10:{tmp}/nonexistent", "which does not exist"),
])
def test_check_space_refuses_a_dataset_that_is_not_there(capsys, tmp_path, dataset, needle):
    (tmp_path / "empty").mkdir()
    dataset = dataset.format(tmp=tmp_path)
    data = tiny_space(dataset=dataset)
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    code, out, err = spvit_nas(capsys, "check-space", path)
    line = one_line(code, err, needle)
    assert dataset in line and str(path) in line
    assert "valid" not in out


def test_check_space_names_the_folder_it_found(capsys, tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for label in ("a", "b"):
            folder = tmp_path / "data" / split / label
            folder.mkdir(parents=True)
            Image.new("RGB", (16, 16)).save(folder / "0.png")
    data = tiny_space(dataset=f"folder:{tmp_path / 'data'}")
    data["arch"].update(in_chans=3, num_classes=2)
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    code, out, err = spvit_nas(capsys, "check-space", path)
    assert code == 0, err
    assert f"found: {tmp_path / 'data'}, 2 classes" in out


# ---------------------------------------------------------------------------- more bad input
def test_export_under_a_file_or_unwritable_is_one_line(capsys, tmp_path, monkeypatch):
    import errno

    import nas.export

    run_dir = make_run(tmp_path / "runs", weights=True)
    (tmp_path / "a_file").write_text("x")
    code, _, err = spvit_nas(capsys, "export", run_dir, "--trial", 0, "--out",
                             tmp_path / "a_file" / "x" / "y")
    line = one_line(code, err, "which is a file")
    assert_names_value_and_fix(line, tmp_path / "a_file")

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "ro"))

    monkeypatch.setattr(nas.export, "export_trial", denied)
    code, _, err = spvit_nas(capsys, "export", run_dir, "--trial", 0, "--out", tmp_path / "ro")
    line = one_line(code, err, "Permission denied")
    assert_names_value_and_fix(line, tmp_path / "ro")


def test_pareto_plot_of_an_unusable_priors_trial_prints_nothing_but_the_error(capsys, tmp_path):
    run_dir = make_run(tmp_path / "runs", weights=True)
    code, out, err = spvit_nas(capsys, "pareto", run_dir, "--plot", "--priors-trial", 5)
    one_line(code, err, "trial 5 was pruned")
    assert out == ""


def test_an_empty_or_non_text_storage_is_refused(capsys, tmp_path):
    import json

    run_dir = make_run(tmp_path / "runs")
    code, out, err = spvit_nas(capsys, "pareto", run_dir, "--storage", "")
    assert_names_value_and_fix(one_line(code, err, "--storage is empty"))
    info = json.loads((run_dir / "run.json").read_text())
    (run_dir / "run.json").write_text(json.dumps(dict(info, storage=5)))
    code, out, err = spvit_nas(capsys, "pareto", run_dir)
    assert_names_value_and_fix(one_line(code, err, '"storage" must be'), "5")


def test_score_reads_reference_architectures_as_cost_does(capsys, supernet):
    code, _, err = spvit_nas(capsys, "supernet", "score", "--supernet", supernet, "--arch",
                             "deit_tiny")
    one_line(code, err, "is outside the space of supernet")


def test_a_sqlite_url_to_a_file_that_is_no_database_is_one_line(capsys, tmp_path):
    run_dir = make_run(tmp_path / "runs")
    url = f"sqlite:///{run_dir / 'study.journal'}"
    before = _snapshot(run_dir)
    code, _, err = spvit_nas(capsys, "pareto", run_dir, "--storage", url)
    line = one_line(code, err, "cannot open the study database")
    assert "file is not a database" in line
    assert _snapshot(run_dir) == before
