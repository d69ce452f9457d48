"""The search end to end on the embedded digits data: Ray Tune + Optuna, tiny spaces, 1-3 epochs.

Every test shares the session's local Ray instance (`ray_local`); the killed-driver test runs the
CLI in a subprocess that joins it, so there is never a second Ray instance.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from launch.search import EXIT_FAILURES, EXIT_OK, SearchRequest, run_search
from nas.pareto import is_full_fidelity, pareto_trials, read_metrics
from nas.storage import make_storage
from spvit.arch import ArchSpec
from spvit.cost import estimate
from spvit.errors import ConfigError

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]

TINY = """
name: tiny
arch: {{img_size: 16, patch_size: 4, in_chans: 1, num_classes: 10, head: avg}}
dimensions:
  depth: [1, 2]
  embed_dim: [16, 32]
  heads: [1, 2]
  prior: [none, mlp]
constraints: {{max_params: 15000}}
training: {{dataset: digits, epochs: {epochs}, batch_size: 128, augment: false,
           warmup_epochs: 0, lr: {lr}, grad_clip: {clip}}}
search: {{trials: 4, concurrent: 2, population_size: 2}}
"""


def _space(tmp_path: Path, *, epochs: int = 1, lr: str = "2.0e-3", clip: float = 1.0) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(TINY.format(epochs=epochs, lr=lr, clip=clip), encoding="utf-8")
    return path


def _trials(run_dir: Path, name: str) -> list[optuna.trial.FrozenTrial]:
    study = optuna.load_study(study_name=name, storage=make_storage(None, run_dir))
    return study.get_trials(deepcopy=False)


def _counted(trials):
    """The trials the search trained (or is training): neither constraint rejections nor
    re-proposals of an architecture already trained (how many of those a sampler makes depends
    on timing, so only their invariant is checked: `_check_skipped`)."""
    return [t for t in trials
            if not t.user_attrs.get("infeasible") and t.user_attrs.get("duplicate_of") is None]


def _check_skipped(run_dir: Path, trials) -> None:
    """Every trial the search did not train is FAIL, has no trial folder, and a duplicate
    names a trained trial with the same architecture."""
    by_number = {t.number: t for t in trials}
    for t in trials:
        original = t.user_attrs.get("duplicate_of")
        if t.user_attrs.get("infeasible") or original is not None:
            assert t.state == TrialState.FAIL
            assert not (run_dir / "trials" / f"{t.number:04d}").exists()
        if original is not None:
            assert original in by_number and original in {c.number for c in _counted(trials)}
            assert by_number[original].user_attrs["arch"] == t.user_attrs["arch"]


def test_four_trials_two_at_a_time_with_a_constraint(tmp_path, ray_local, capsys):
    run_dir = tmp_path / "run"
    outcome = run_search(SearchRequest(out=run_dir, space=_space(tmp_path), trials=4,
                                       concurrent=2, seed=0))
    assert outcome.exit_code == EXIT_OK, outcome.message
    trials = _trials(run_dir, "run")
    counted = _counted(trials)
    assert len(counted) == 4
    _check_skipped(run_dir, trials)
    for t in counted:
        assert t.state == TrialState.COMPLETE and len(t.values) == 3
        spec = ArchSpec.from_dict(t.user_attrs["arch"])
        cost = estimate(spec)
        assert t.values[1:] == [cost.gflops, float(cost.params)]
        assert 0.0 <= t.values[0] <= 1.0 and cost.params <= 15000
        assert t.user_attrs["fidelity"] == t.user_attrs["budget"] == 1
        folder = run_dir / t.user_attrs["trial_dir"]
        assert (folder / "model.safetensors").is_file()
        assert [r["epoch"] for r in read_metrics(folder / "metrics.jsonl")] == [1]
    # proposals are drawn inside the feasible region (nas.samplers.FeasibleSampler); any
    # rejection would be FAIL, infeasible, never trained
    rejected = [t for t in trials if t.user_attrs.get("infeasible")]
    assert rejected == []
    for t in rejected:
        assert t.state == TrialState.FAIL and "max_params" in t.user_attrs["infeasible"]
        assert not (run_dir / "trials" / f"{t.number:04d}").exists()
    assert sorted(outcome.launched) == sorted(t.number for t in counted)
    # the run folder: study, resolved space, Tune experiment, Pareto set, reports, export
    for name in ("run.json", "space.yaml", "study.journal", "tune", "reports/report.md",
                 "export/arch.yaml", "export/model.safetensors"):
        assert (run_dir / name).exists(), name
    front = pareto_trials([t for t in trials])
    assert outcome.pareto == [t.number for t in front] and front
    out = capsys.readouterr().out
    assert "study: run" in out and f"storage: {run_dir / 'study.journal'}" in out
    assert "Pareto set" in out
    # a second search into the same folder is refused and changes nothing
    journal = (run_dir / "study.journal").read_bytes()
    with pytest.raises(ConfigError, match="already holds a search"):
        run_search(SearchRequest(out=run_dir, space=_space(tmp_path)))
    assert (run_dir / "study.journal").read_bytes() == journal


def test_diverging_trials_fail_and_the_search_stops_then_completes(tmp_path, ray_local):
    run_dir = tmp_path / "nan"
    space = _space(tmp_path, lr="1.0e+30", clip=0.0)
    first = run_search(SearchRequest(out=run_dir, space=space, trials=3, concurrent=2,
                                     max_consecutive_failures=2, export=False))
    assert first.exit_code == EXIT_FAILURES
    assert "2 trials failed in a row" in first.message and "--resume" in first.message
    failed = [t for t in _counted(_trials(run_dir, "nan")) if t.state == TrialState.FAIL]
    assert len(failed) == 2
    for t in failed:
        assert "nan" in t.user_attrs["fail_reason"]
        assert "nan" in (run_dir / t.user_attrs["trial_dir"] / "failure.json").read_text()
    # allowed more failures, the search runs to its budget: every trial recorded FAIL, and a
    # search in which every launched trial failed is no success
    second = run_search(SearchRequest(out=run_dir, resume=True, max_consecutive_failures=5,
                                      export=False))
    assert second.exit_code == EXIT_FAILURES
    assert second.message.startswith("search failed: all 1 launched trial(s) failed; first"
                                     " cause: trial ") and "nan" in second.message
    counted = _counted(_trials(run_dir, "nan"))
    assert len(counted) == 3 and all(t.state == TrialState.FAIL for t in counted)
    assert pareto_trials(counted) == []


def test_asha_stopped_trials_are_pruned_and_never_on_the_front(tmp_path, ray_local):
    run_dir = tmp_path / "asha"
    outcome = run_search(SearchRequest(out=run_dir, space=_space(tmp_path, epochs=2),
                                       trials=5, concurrent=1, scheduler="asha",
                                       asha_reduction_factor=4, export=False))
    assert outcome.exit_code == EXIT_OK
    counted = _counted(_trials(run_dir, "asha"))
    pruned = [t for t in counted if t.state == TrialState.PRUNED]
    assert len(counted) == 5 and pruned, "ASHA with rf 4 stops the weaker trials at epoch 1"
    for t in pruned:
        assert t.values is None and t.user_attrs["fidelity"] == 1 < t.user_attrs["budget"]
        assert isinstance(t.user_attrs["val_acc_last"], float) and not t.intermediate_values
    front = pareto_trials(counted)
    assert front and all(is_full_fidelity(t) for t in front)
    assert not {t.number for t in front} & {t.number for t in pruned}
    assert set(outcome.pareto) == {t.number for t in front}


def _wait_for(run_dir: Path, name: str, timeout_s: float = 240.0):
    """Poll the journal until a trial is COMPLETE and another RUNNING."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (run_dir / "study.journal").exists():
            try:
                states = [t.state for t in _counted(_trials(run_dir, name))]
            except KeyError:
                states = []
            if TrialState.COMPLETE in states and TrialState.RUNNING in states:
                return
        time.sleep(0.3)
    raise AssertionError("the search never had a COMPLETE and a RUNNING trial at once")


def test_killed_driver_resumes_without_lost_or_duplicated_trials(tmp_path, ray_local):
    import ray

    from launch.cli import main

    run_dir = tmp_path / "killed"
    space = _space(tmp_path, epochs=3)
    address = ray.get_runtime_context().gcs_address
    log = open(tmp_path / "driver.log", "w")
    driver = subprocess.Popen(
        [sys.executable, "-m", "launch.cli", "search", "--space", str(space), "--out",
         str(run_dir), "--trials", "4", "--concurrent", "2", "--address", address],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_for(run_dir, "killed")
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
        log.close()
    before = {t.number: t for t in _counted(_trials(run_dir, "killed"))}
    done = {n: t for n, t in before.items() if t.state == TrialState.COMPLETE}
    running = {n for n, t in before.items() if t.state == TrialState.RUNNING}
    assert done and running
    snapshot = {n: (run_dir / t.user_attrs["trial_dir"] / "metrics.jsonl").read_bytes()
                for n, t in done.items()}
    # Ray ends the dead driver's trial actors; wait for their CPUs before resuming
    deadline = time.monotonic() + 60
    while ray.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)

    assert main(["search", "--out", str(run_dir), "--resume", "--no-export"]) == 0
    _check_skipped(run_dir, _trials(run_dir, "killed"))
    after = _counted(_trials(run_dir, "killed"))
    assert len(after) == 4 and len({t.number for t in after}) == 4
    assert len({t.user_attrs["trial_dir"] for t in after}) == 4
    assert all(t.state == TrialState.COMPLETE and len(t.values) == 3 for t in after)
    by_number = {t.number: t for t in after}
    for n, t in done.items():  # never retrained
        assert by_number[n].datetime_complete == t.datetime_complete
        assert (run_dir / t.user_attrs["trial_dir"] / "metrics.jsonl").read_bytes() \
            == snapshot[n]
    for n in running:  # same number, continued to the full budget, each epoch once
        folder = run_dir / by_number[n].user_attrs["trial_dir"]
        assert [r["epoch"] for r in read_metrics(folder / "metrics.jsonl")] == [1, 2, 3]
    tune_dirs = [p.name for p in (run_dir / "tune").iterdir() if p.name.startswith("trial_")]
    for n in done:
        assert sum(d.startswith(f"trial_{n:04d}_") for d in tune_dirs) == 1
