"""The end of a search: whether it succeeded, and what it says and leaves behind.

`SearchOutcome` is what `launch.search.run_search` returns (and prints). `check_success` turns a
search whose launched trials all failed, or that ends without a full-budget trial, into exit 1
with the count and the first cause; `finish_search` prints the study's counts, the share of trial
time spent outside training epochs (`orchestration_overhead`) and the Pareto table of full-budget
trials, then, for a search that succeeded, writes the reports (`nas.report`) and exports the knee
trial to RUN_DIR/export (`nas.export`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nas.layout import FAILURE_FILE, RunFolder
from spvit.errors import ConfigError

# exit codes of a search that did not fail on bad input (ConfigError exits 2 through the CLI)
EXIT_OK = 0
EXIT_FAILURES = 1
EXIT_INTERRUPTED = 130


@dataclass
class SearchOutcome:
    """What a search did (also printed)."""

    run_dir: Path
    study_name: str
    storage: str
    exit_code: int
    message: str
    launched: list[int] = field(default_factory=list)
    outcomes: dict[str, int] = field(default_factory=dict)
    pareto: list[int] = field(default_factory=list)
    reports: list[Path] = field(default_factory=list)
    export_dir: Path | None = None
    wall_s: float = 0.0


def failure_files(run_dir: Path) -> str:
    """Where a run's trials say why they failed: RUN_DIR/trials/*/failure.json."""
    return str(RunFolder(run_dir).trials / "*" / FAILURE_FILE)


def check_success(plan: Any, study: Any, searcher: Any, outcome: SearchOutcome) -> None:
    """A search whose launched trials all failed, or that ends without one full-budget
    trial, did not succeed: exit 1 with the count and the first cause."""
    trials = [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get("infeasible")]
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    failed = [t for t in trials if t.state.name == "FAIL"]
    first = getattr(searcher, "first_failure", None)
    if first is None and failed:
        first_trial = min(failed, key=lambda t: t.number)
        first = f"trial {first_trial.number}: {first_trial.user_attrs.get('fail_reason', '?')}"
    cause = f"; first cause: {first}" if first else ""
    where = (f" Fix the cause (see {failure_files(plan.run_dir)}) and continue with"
             " --resume.")
    told = sum(getattr(searcher, "outcomes", {}).values()) if searcher is not None else 0
    session_fails = getattr(searcher, "outcomes", {}).get("FAIL", 0) if searcher else 0
    if told and session_fails == told:
        outcome.exit_code = EXIT_FAILURES
        outcome.message = f"search failed: all {told} launched trial(s) failed{cause}.{where}"
    elif not complete:
        counts = dict(Counter(t.state.name for t in trials))
        outcome.exit_code = EXIT_FAILURES
        outcome.message = (f"search ended without a full-budget trial ({len(trials)} trial(s):"
                           f" {counts}){cause}.{where}")


def finish_search(plan: Any, study: Any, outcome: SearchOutcome, say: Callable[[str], None], *,
                  export: bool = True) -> None:
    """Counts, Pareto table; for a search that succeeded, the reports and (with `export`) the
    knee trial exported to RUN_DIR/export."""
    trials = study.get_trials(deepcopy=False)
    counts = Counter(t.state.name for t in trials if not t.user_attrs.get("infeasible"))
    infeasible = sum(1 for t in trials if t.user_attrs.get("infeasible"))
    say(f"study {plan.info.study_name}: {dict(counts)}, {infeasible} infeasible sample(s)"
        " rejected before launch")
    overhead = orchestration_overhead(plan.run_dir, trials)
    if overhead is not None:
        trial_s, train_s = overhead
        share = 1.0 - train_s / trial_s if trial_s > 0 else 0.0
        say(f"trial time {trial_s:.0f}s, of which training epochs {train_s:.0f}s"
            f" ({100 * share:.0f}% start-up, evaluation and orchestration)")
    from nas import export as nas_export
    from nas import pareto, report

    front = pareto.pareto_trials(study)
    outcome.pareto = [t.number for t in front]
    say(f"Pareto set ({len(front)} full-budget trial(s)):")
    say(pareto.format_table(front))
    if outcome.exit_code != EXIT_OK:
        return
    folder = RunFolder(plan.run_dir)
    outcome.reports = list(report.write_reports(plan.run_dir, storage=plan.url))
    say(f"reports: {folder.reports}")
    if export and front:
        try:
            path, trial, why = nas_export.export_pick(plan.run_dir, folder.export, method="knee",
                                                      overwrite=True, storage=plan.url)
        except ConfigError as e:  # e.g. RUN_DIR/export holds files of the user's own
            say(f"export skipped: {e}")
            return
        outcome.export_dir = Path(path)
        say(f"exported trial {trial.number} to {path} ({why})")


def orchestration_overhead(run_dir: Path, trials: list) -> tuple[float, float] | None:
    """(sum of the trials' wall seconds as the driver saw them, sum of their training seconds)
    over the trials that recorded both, or None.

    A trial's training seconds are the last `wall_s` of its metrics.jsonl: the time from its
    first epoch's start to its last epoch's end (training steps, validation and checkpoints,
    summed over resumed sessions), without process start, data loading or model set-up. The
    rest of the driver-side wall time is start-up and orchestration.
    """
    from nas.run import trial_metrics

    trial_s = train_s = 0.0
    for t in trials:
        wall = t.user_attrs.get("wall_s")
        if not isinstance(wall, (int, float)):
            continue
        epoch_walls = [float(r["wall_s"]) for r in trial_metrics(run_dir, t)
                       if isinstance(r.get("wall_s"), (int, float))]
        if not epoch_walls:
            continue
        trial_s += float(wall)
        train_s += max(epoch_walls)
    return (trial_s, train_s) if trial_s > 0 else None
