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
from tests.messages import assert_names_value_and_fix
from tests.nas.test_pareto import make_run
from tests.tiny_space import tiny_space


@pytest.fixture(autouse=True)
def _available_commands(monkeypatch):
    monkeypatch.setattr(cli, "COMMANDS", {
        name: entry for name, entry in cli.COMMANDS.items()
        if importlib.util.find_spec(entry[0]) is not None})


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
