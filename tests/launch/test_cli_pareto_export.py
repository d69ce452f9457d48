"""`spvit-nas pareto` and `spvit-nas export` end to end (in-process), on the run folder of
tests/nas/test_pareto.py."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import load_file

import spvit
from launch import cli
from spvit.arch import ArchSpec
from tests.nas.test_pareto import ARCHS, FRONT, STUDY, TRIALS, make_run


@pytest.fixture(autouse=True)
def _available_commands(monkeypatch):
    """The parser imports every subcommand module; keep those present in this checkout."""
    monkeypatch.setattr(cli, "COMMANDS", {
        name: entry for name, entry in cli.COMMANDS.items()
        if importlib.util.find_spec(entry[0]) is not None})


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("cli"), weights=True)


def spvit_nas(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(code, err, needle):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], err


# ---------------------------------------------------------------------------- pareto
def test_pareto_table(run_dir, capsys):
    code, out, _ = spvit_nas(capsys, "pareto", run_dir)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith(f"study {STUDY} in ") and lines[0].endswith("/study.journal")
    assert "Pareto set of full-fidelity trials: 4" in lines[1]
    numbers = [int(line.split()[0]) for line in lines[4:] if line.strip()]
    assert numbers == [1, 2, 0, 8]


def test_pareto_matches_optuna_best_trials_cli(tmp_path, capsys):
    """With every COMPLETE trial at full fidelity, the set is the one `optuna best-trials`
    reports for the same storage and study."""
    kept = [t for t in TRIALS if t[1] != "partial"]
    run_dir = make_run(tmp_path, trials=kept)
    # trials are renumbered in the order they are added
    expected = {i for i, (n, _, _) in enumerate(kept) if n in FRONT}
    code, out, _ = spvit_nas(capsys, "pareto", run_dir, "--json")
    assert code == 0
    data = json.loads(out)
    assert data["study_name"] == STUDY and data["storage"].endswith("study.journal")
    mine = {t["number"] for t in data["trials"]}
    optuna_cli = [sys.executable, "-c", "import sys; from optuna.cli import main; sys.exit(main())"]
    proc = subprocess.run([*optuna_cli, "best-trials", "--study-name", STUDY, "--storage",
                           data["storage"], "-f", "json"], capture_output=True, text=True,
                          check=True, timeout=120)
    assert mine == {t["number"] for t in json.loads(proc.stdout)} == expected


def test_pareto_json_csv_and_budget_filter(run_dir, capsys):
    code, out, _ = spvit_nas(capsys, "pareto", run_dir, "--json", "--max-gflops", "0.025",
                             "--pick", "knee")
    assert code == 0
    data = json.loads(out)
    assert [t["number"] for t in data["trials"]] == [2, 0, 8]
    assert data["pareto_size"] == 4 and data["pick"]["number"] == 0
    assert ArchSpec.from_dict(data["trials"][0]["arch"]) == ARCHS[2]
    code, out, err = spvit_nas(capsys, "pareto", run_dir, "--csv", "--max-params", "6000")
    assert code == 0 and STUDY in err
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [int(r["number"]) for r in rows] == [0, 8]


def test_pareto_pick_explains(run_dir, capsys):
    code, out, _ = spvit_nas(capsys, "pareto", run_dir, "--pick", "best", "--max-gflops",
                             "0.025", "--max-params", "8000")
    assert code == 0
    pick = [line for line in out.splitlines() if line.startswith("pick (best):")]
    assert pick and "trial 2 " in pick[0] and "highest accuracy among 3 of 4" in pick[0]
    assert "2 within the budget" not in out and "3 within the budget" in out


@pytest.mark.parametrize("args, needle", [
    (["--pick", "best", "--max-gflops", "0.001"], "no Pareto trial fits max_gflops 0.001"),
    (["--max-params", "-5"], "max_params must be a number > 0"),
])
def test_pareto_errors_exit_2(run_dir, capsys, args, needle):
    _one_line_error(*spvit_nas(capsys, "pareto", run_dir, *args)[::2], needle)


def test_pareto_on_a_folder_that_is_no_run(tmp_path, capsys):
    _one_line_error(*spvit_nas(capsys, "pareto", tmp_path)[::2], "run.json is missing")


def test_pareto_plot_writes_reports(run_dir, capsys):
    code, out, _ = spvit_nas(capsys, "pareto", run_dir, "--plot", "--priors-trial", "1")
    assert code == 0 and "reports:" in out
    for name in ("pareto.png", "pareto.html", "hypervolume.png", "priors_1.png", "report.md",
                 "pareto.csv"):
        assert (run_dir / "reports" / name).is_file(), name


# ---------------------------------------------------------------------------- export
def test_export_trial_round_trip(run_dir, tmp_path, capsys):
    out_dir = tmp_path / "model"
    code, out, _ = spvit_nas(capsys, "export", run_dir, "--trial", 3, "--out", out_dir)
    assert code == 0 and f"exported trial 3 to {out_dir}" in out
    assert ArchSpec.load(out_dir / "arch.yaml") == ARCHS[3]
    model = spvit.create_model(out_dir / "arch.yaml").eval()
    model.load_state_dict(load_file(str(out_dir / "model.safetensors")))
    session = ort.InferenceSession(str(out_dir / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    for batch in (2, 7):
        x = torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            expected = model(x).numpy()
        np.testing.assert_allclose(session.run(None, {"image": x.numpy()})[0], expected,
                                   atol=1e-4, rtol=0)


def test_export_pick_default_out(run_dir, tmp_path, capsys):
    run = tmp_path / "run"
    os.symlink(run_dir, run)  # the default --out is RUN_DIR/export; keep the shared run clean
    code, out, _ = spvit_nas(capsys, "export", run, "--pick", "best", "--max-params", "8000")
    try:
        assert code == 0 and "pick (best): trial 2 " in out
        assert ArchSpec.load(run_dir / "export" / "arch.yaml") == ARCHS[2]
    finally:
        shutil.rmtree(run_dir / "export", ignore_errors=True)


@pytest.mark.parametrize("args, needle", [
    (["--trial", "6"], "trial 6 failed (CUDA out of memory)"),
    (["--trial", "5"], "trial 5 was pruned"),
    (["--trial", "4"], "completed only 1 of 2 epochs"),
    (["--trial", "42"], "trial 42 does not exist"),
    (["--trial", "0", "--max-gflops", "1"], "apply to --pick"),
    (["--pick", "knee", "--max-params", "10"], "no Pareto trial fits"),
])
def test_export_refusals_exit_2(run_dir, tmp_path, capsys, args, needle):
    code, _, err = spvit_nas(capsys, "export", run_dir, *args, "--out", tmp_path / "x")
    _one_line_error(code, err, needle)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("corrupt", [
    lambda b: b[: len(b) // 3],  # truncated
    lambda b: b"\xff" * 7 + b"not a safetensors file" * 20,  # garbage
])
def test_export_corrupt_weights_exit_2(run_dir, tmp_path, capsys, corrupt):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("reports", "export"))
    weights = run / "trials/0001/model.safetensors"
    weights.write_bytes(corrupt(weights.read_bytes()))
    code, _, err = spvit_nas(capsys, "export", run, "--trial", "1", "--out", tmp_path / "x")
    _one_line_error(code, err, "is corrupt or not safetensors")
    assert not (tmp_path / "x").exists()


def test_export_without_trial_or_pick_is_a_usage_error(run_dir, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["export", str(run_dir)])
    assert e.value.code == 2
    assert "one of the arguments --trial --pick is required" in capsys.readouterr().err


@pytest.mark.slow  # trains one epoch through `launch.trial` (DeepSpeed engine in-process)
@pytest.mark.skipif(importlib.util.find_spec("launch.cmd_train") is None,
                    reason="`spvit-nas train` is not in this checkout")
def test_exported_arch_is_accepted_by_train(tmp_path, capsys):
    # trial 8 as an architecture for the embedded digits data (1 channel, 10 classes)
    digits = ARCHS[8].replace(in_chans=1, num_classes=10)
    run_dir = make_run(tmp_path, weights=True, archs={**ARCHS, 8: digits})
    out_dir = tmp_path / "model"
    assert spvit_nas(capsys, "export", run_dir, "--trial", 8, "--out", out_dir)[0] == 0
    code, out, err = spvit_nas(capsys, "train", "--arch", out_dir / "arch.yaml",
                               "--out", tmp_path / "train", "--epochs", 1)
    assert code == 0, err
    assert "trained" in out and "epoch 1/1" in out
    assert ArchSpec.load(tmp_path / "train" / "arch.yaml") == digits
    retrained = spvit.create_model(out_dir / "arch.yaml")
    retrained.load_state_dict(load_file(str(tmp_path / "train" / "model.safetensors")))
