"""Warm start: seed a new search's study with the completed trials of earlier runs.

A search with earlier runs to warm-start from (the `warm_start` setting, one or
more run folders) calls `warm_start(study, space, runs, ...)`
before the first proposal. Every full-budget COMPLETE trial of each earlier run is checked
against the new search and, if compatible, added to the new study through Optuna's public API
(`optuna.trial.create_trial` + `Study.add_trials`) as a COMPLETE trial with the same parameters,
distributions and objectives. A trial is compatible when

* its run trained with the same recipe (`training:` block, epochs included), so its accuracy
  means what a new trial's would;
* its architecture is a member of the new space and meets the new constraints;
* the new space proposes it under the same parameter names and choices (replayed through
  `space.suggest`), so that samplers can model it;
* it is not the same architecture as a trial already in the study (or seeded a moment ago).

Every other trial is reported in one line and skipped. GFLOPs and parameters are recomputed with
the cost model; the accuracy is the earlier run's. What the samplers make of the seeded trials:
TPE and GP read every COMPLETE trial; NSGA-II reads only the trials of its generations, so the
seeded trials are marked as its generation 0, and its first generation of parents is selected
from them. Seeded trials are never trained: `SearchStudy` rejects a re-proposal of a trained
architecture as a duplicate, and they do not count towards the search's trials (user attr
`warm_start`).
Their `trial_dir` is the earlier run's trial folder (an absolute path), so reports and export
find their checkpoints.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import CategoricalDistribution
from optuna.trial import FrozenTrial, TrialState

from nas.layout import RUN_FILE, NotARunFolder, RunFolder
from nas.settings import SettingError
from spvit.arch import ArchSpec
from spvit.errors import ConfigError

WARM_START_ATTR = "warm_start"
# NSGA-II's generation key (`NSGAIISampler._get_generation_key()`): generation 0 of the study.
NSGA2_GENERATION_KEY = "NSGAIISampler:generation"


@dataclass
class WarmStartReport:
    """What a warm start did: `seeded` (run folder, earlier number, new number) and one line
    per skipped trial."""

    seeded: list[tuple[str, int, int]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


class _Replay:
    """Answers `space.suggest` from a flat architecture and records the distributions asked."""

    def __init__(self, flat: Mapping[str, Any]) -> None:
        self.flat = flat
        self.params: dict[str, Any] = {}
        self.distributions: dict[str, CategoricalDistribution] = {}

    def suggest_categorical(self, name: str, choices: list) -> Any:
        if name not in self.flat:
            raise ConfigError(f"the space asks {name!r}, which the architecture lacks")
        value = self.flat[name]
        if not any(type(value) is type(c) and value == c for c in choices):
            raise ConfigError(f"{name} {value!r} is not among the space's choices {choices}")
        self.params[name] = value
        self.distributions[name] = CategoricalDistribution(choices)
        return value


def _refused(run: Path, text: str) -> SettingError:
    """A `warm_start` run that cannot seed the study: `text` follows the run's path."""
    return SettingError("warm_start", f"`warm_start` {run}{text}")


def _read_run_json(run_dir: Path) -> dict[str, Any]:
    """run.json of a `warm_start` run (`RunFolder.read_run_json`), its errors led by the
    setting and the folder; it must name its study."""
    folder = RunFolder(run_dir)
    try:
        data = folder.read_run_json()
    except NotARunFolder as e:
        if not run_dir.is_dir():
            raise _refused(run_dir, f": {e}") from None
        raise _refused(run_dir, f": {RUN_FILE} does not exist, so it holds no search. Pass"
                                " the run folder of an earlier `spvit-nas search`.") from None
    except ConfigError as e:
        raise _refused(run_dir, f": {e} Drop this `warm_start` run if it cannot be"
                                " restored.") from None
    if not isinstance(data.get("study_name"), str):
        raise _refused(run_dir, f": {folder.run_json} must hold a JSON object with a string"
                                " \"study_name\". Restore it from the run, or drop this"
                                " `warm_start` run.")
    return data


def check_runs(runs: Iterable[str | os.PathLike]) -> tuple[Path, ...]:
    """The `warm_start` run folders, resolved, each checked to hold a readable search: a
    folder with a valid run.json and an intact study journal. Only reads (a torn last journal
    line of a run still being written is left for its own driver); `SettingError` (one line:
    the setting, the path, the fix) otherwise. The search driver calls it before Ray starts or a
    file of the new run is written."""
    from nas.journal import describe, run_journal, scan_journal
    from nas.run import DIRECTIONS, open_run_study

    checked: list[Path] = []
    for run in runs:
        given = Path(run).expanduser()
        fix = "Pass the run folder of an earlier `spvit-nas search` (the folder with run.json)."
        if not given.exists():
            raise _refused(given, f" does not exist. {fix}")
        if not given.is_dir():
            raise _refused(given, f" is a file, not a run folder. {fix}")
        run_dir = given.resolve()
        if run_dir in checked:
            raise _refused(given, " is given twice. Remove the repeat.")
        info = _read_run_json(run_dir)
        storage = info.get("storage")
        journal = run_journal(run_dir, storage if isinstance(storage, str) else None)
        if journal is not None and not journal.is_file():
            journal = run_journal(run_dir, None)  # a moved run keeps RUN_DIR/study.journal
        if journal is not None:
            if not journal.is_file():
                raise _refused(given, f": its study journal {journal} does not exist, so it"
                                      f" holds no trials. {fix}")
            scan = scan_journal(journal)
            if not scan.ok and not scan.torn:
                raise _refused(given, f": {describe(scan)}")
        try:
            old = open_run_study(run_dir)
        except ConfigError as e:
            raise _refused(given, f": {e}") from None
        if tuple(d.name.lower() for d in old.directions) != DIRECTIONS:
            raise _refused(given, f": its study optimises"
                                  f" {[d.name.lower() for d in old.directions]}, not the"
                                  f" search's objectives. {fix}")
        checked.append(run_dir)
    return tuple(checked)


def _recipe_difference(old: Mapping[str, Any], new: Mapping[str, Any]) -> str | None:
    keys = sorted(set(old) | set(new))
    diff = [f"{k} {old.get(k)!r} vs {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]
    return ", ".join(diff) if diff else None


def _architectures(study: optuna.Study) -> dict[ArchSpec, int]:
    """The architectures of the trials that are trained, training or seeded -> their number."""
    from nas.study import stored_arch

    out: dict[ArchSpec, int] = {}
    for t in study.get_trials(deepcopy=False, states=(
            TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)):
        spec = stored_arch(t.user_attrs.get("arch"))
        if spec is not None:
            out.setdefault(spec, t.number)
    return out


def _check_trial(t: FrozenTrial, space: Any, estimate: Callable[[ArchSpec], Any]
                 ) -> tuple[ArchSpec, Any, _Replay] | str:
    if t.values is None or len(t.values) != 3:
        return "it has no three objective values"
    flat = t.user_attrs.get("arch")
    if not isinstance(flat, Mapping):
        return "it records no architecture (user attr `arch`)"
    try:
        spec = ArchSpec.from_dict(flat)
    except ConfigError as e:
        return f"its architecture is invalid ({e})"
    why = space.why_not(spec)
    if why:
        return f"not in the space: {why}"
    cost = estimate(spec)
    broken = list(space.constraints.violations(spec, cost))
    if broken:
        return f"breaks the space's constraints: {'; '.join(broken)}"
    replay = _Replay(spec.to_flat())
    try:
        replayed = space.suggest(replay)
    except ConfigError as e:
        return f"the space proposes it differently: {e}"
    if replayed != spec:
        return "the space proposes it differently (the replayed architecture differs)"
    return spec, cost, replay


def warm_start(study: optuna.Study, space: Any, runs: Iterable[str | os.PathLike], *,
               training: Mapping[str, Any], budget: int,
               estimate: Callable[[ArchSpec], Any] | None = None,
               say: Callable[[str], None] = print) -> WarmStartReport:
    """Seed `study` with the compatible completed trials of the run folders `runs` (module
    docstring); one line through `say` per skipped trial and one summary line per run.

    Args:
        study: the new search's study (normally still empty).
        space: the new search space.
        runs: earlier run folders (each holds run.json and its study).
        training: the new search's training recipe (`TrainingConfig.to_dict()`).
        budget: the new search's full budget in epochs (the seeded trials' fidelity).
        estimate: the cost model (default `spvit.cost.estimate`).
    """
    from nas.pareto import is_full_fidelity, open_study
    from nas.pareto import trial_dir as trial_folder

    if estimate is None:
        from spvit.cost import estimate
    report = WarmStartReport()
    known = _architectures(study)
    for run in runs:
        run_dir = Path(run).expanduser().resolve()
        info = _read_run_json(run_dir)
        old = open_study(run_dir)
        if [d.name.lower() for d in old.directions] != [d.name.lower()
                                                        for d in study.directions]:
            raise _refused(run_dir, f": its study optimises"
                                    f" {[d.name.lower() for d in old.directions]}, not the"
                                    " search's objectives. Pass the run folder of a `spvit-nas"
                                    " search`.")
        recipe = _recipe_difference(info.get("training") or {}, training)
        new_trials: list[FrozenTrial] = []
        seeded_here: list[tuple[int, int]] = []
        for t in old.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            where = f"warm start: skipped {run_dir} trial {t.number}:"
            if not is_full_fidelity(t):
                report.skipped.append(f"{where} it did not train the full budget")
                say(report.skipped[-1])
                continue
            if recipe:
                report.skipped.append(f"{where} its training recipe differs ({recipe})")
                say(report.skipped[-1])
                continue
            checked = _check_trial(t, space, estimate)
            if isinstance(checked, str):
                report.skipped.append(f"{where} {checked}")
                say(report.skipped[-1])
                continue
            spec, cost, replay = checked
            if spec in known:
                report.skipped.append(f"{where} same architecture as trial {known[spec]} of the"
                                      " new study")
                say(report.skipped[-1])
                continue
            number = len(study.get_trials(deepcopy=False)) + len(new_trials)
            known[spec] = number
            user_attrs = {
                "arch": spec.to_flat(), "gflops": float(cost.gflops),
                "params": int(cost.params), "budget": budget, "fidelity": budget,
                "trial_dir": str(trial_folder(run_dir, t).resolve()),
                # no `wall_s`: the new run's time accounting covers what it trains itself
                WARM_START_ATTR: {"run": str(run_dir), "number": t.number,
                                  "wall_s": t.user_attrs.get("wall_s")}}
            new_trials.append(optuna.trial.create_trial(
                state=TrialState.COMPLETE,
                values=[float(t.values[0]), float(cost.gflops), float(cost.params)],
                params=replay.params, distributions=replay.distributions,
                user_attrs=user_attrs, system_attrs={NSGA2_GENERATION_KEY: 0},
                constraints=dict(space.constraints.values(spec, cost))))
            seeded_here.append((t.number, number))
        study.add_trials(new_trials)
        report.seeded.extend((str(run_dir), a, b) for a, b in seeded_here)
        say(f"warm start: {len(seeded_here)} trial(s) of {run_dir} seeded into the study"
            f" (never trained again)")
    return report


def is_warm_start(trial: FrozenTrial) -> bool:
    """True for a trial seeded from an earlier run (it does not count towards the search's
    trials)."""
    return trial.user_attrs.get(WARM_START_ATTR) is not None
