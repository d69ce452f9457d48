"""`spvit-nas dashboard`: optuna-dashboard on a finished run's storage, reached over HTTP on
127.0.0.1, then stopped; and the one-line refusals (not installed, no study, bad port)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from launch import cli
from nas import study as nas_study
from nas.storage import journal_path, make_storage
from search_spaces.space import SearchSpace
from tests.tiny_space import small_space, write_space

ROOT = Path(__file__).resolve().parents[2]
SPACE = small_space(constraints=None, search={"trials": 3})


def finished_run(run_dir: Path) -> Path:
    """A run folder as a search leaves it: run.json and a study with two COMPLETE trials and a
    PRUNED one, told through `nas.study.SearchStudy` (no training)."""
    run_dir.mkdir(parents=True)
    space = SearchSpace.load(write_space(run_dir / "space.yaml", SPACE))
    study = nas_study.open_study(make_storage(None, run_dir), study_name="dash",
                                 sampler=nas_study.make_sampler("random", seed=0), resume=False)
    nas_study.RunInfo(study_name="dash", storage=str(journal_path(run_dir)), sampler="random",
                      seed=0, trials=3, concurrent=1, epochs=2, workers_per_trial=1,
                      space="space.yaml", training={"dataset": "digits", "epochs": 2}
                      ).save(run_dir)
    search = nas_study.SearchStudy(study, space, run_dir=run_dir, budget=2)
    for acc, epochs in ((0.8, 2), (0.6, 2), (0.5, 1)):
        candidate = search.ask()
        search.record_epoch(candidate, {"epoch": 1, "val_acc": acc / 2})
        search.tell_result(candidate, {"epoch": epochs, "val_acc": acc}, wall_s=3.5)
    return run_dir


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


@pytest.mark.slow  # starts a server process (a few seconds)
def test_dashboard_serves_the_run_study_on_localhost(tmp_path):
    pytest.importorskip("optuna_dashboard")
    run_dir = finished_run(tmp_path / "run")
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "launch.cli", "dashboard", str(run_dir),
                             "--port", str(port)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        studies = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                studies = _get(f"http://127.0.0.1:{port}/api/studies")
                break
            except OSError:
                time.sleep(0.5)
        assert studies is not None, proc.stderr.read() if proc.poll() is not None else "no reply"
        (summary,) = studies["study_summaries"]
        assert summary["study_name"] == "dash"
        assert summary["directions"] == ["maximize", "minimize", "minimize"]
        detail = _get(f"http://127.0.0.1:{port}/api/studies/{summary['study_id']}")
        trials = detail["trials"]
        assert [t["state"] for t in trials] == ["Complete", "Complete", "Pruned"]
        attrs = {a["key"]: a["value"] for a in trials[0]["user_attrs"]}
        assert attrs["fidelity"] == "2" and attrs["wall_s"] == "3.5" and attrs["budget"] == "2"
        assert json.loads(attrs["arch"])["img_size"] == 16  # a JSON value, shown as JSON
        assert trials[0]["values"][0] == pytest.approx(0.8)
        assert len(detail["best_trials"]) >= 1  # the Pareto front
        # bound to the loopback interface only
        listening = [line for line in Path("/proc/net/tcp").read_text().splitlines()[1:]
                     if line.split()[1].endswith(f":{port:04X}") and line.split()[3] == "0A"]
        assert listening and all(line.split()[1].startswith("0100007F:") for line in listening)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode is not None


def test_dashboard_refusals_are_one_line(tmp_path, capsys, monkeypatch):
    run_dir = finished_run(tmp_path / "run")
    monkeypatch.setitem(sys.modules, "optuna_dashboard", None)  # as if not installed
    assert cli.main(["dashboard", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert "optuna-dashboard is not installed" in err and "pip install" in err
    assert err.count("\n") == 1
    monkeypatch.undo()

    assert cli.main(["dashboard", str(run_dir), "--port", "0"]) == 2
    assert "--port must be in 1..65535" in capsys.readouterr().err
    assert cli.main(["dashboard", str(tmp_path)]) == 2
    assert "run.json is missing" in capsys.readouterr().err
    info = json.loads((run_dir / "run.json").read_text())
    (run_dir / "run.json").write_text(json.dumps(dict(info, study_name="other")))
    pytest.importorskip("optuna_dashboard")
    assert cli.main(["dashboard", str(run_dir)]) == 2
    assert "study 'other' is not in storage" in capsys.readouterr().err
