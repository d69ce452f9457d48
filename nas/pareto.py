"""The Pareto front of a finished (or running) search: which trials count, how to show them, how
to choose one.

A search stores its trials in an Optuna study with directions `[maximize, minimize, minimize]`
over `(val_acc, gflops, params)` (see docs/architecture.md). Only trials that ran the whole
training budget are comparable, so the front here is taken over COMPLETE trials whose user attrs
say `fidelity == budget` (and that no constraint marked `infeasible`); on a study where every
trial is full-fidelity it is exactly Optuna's `study.best_trials`. It reads the run folder
through `nas.run` (re-exporting its readers), renders the front as a table, JSON or CSV, and
picks one trial under
GFLOPs/parameter budgets, either the most accurate (`best`) or the knee of the accuracy/GFLOPs
front (`knee`, defined in `knee_scores`). Reports (`nas.report`) and export (`nas.export`) build
on it. `non_dominated_ranks` and `crowding_distance` are NSGA-II's sorting, the one copy that
the one-shot selection (`nas.oneshot`) and the MOASHA scheduler (`launch.moasha`) rank with.
No Ray, no model build: costs come from the study.
"""

from __future__ import annotations

import abc
import csv
import io
import json
import math
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import optuna
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial

from nas import run
from nas.run import (  # noqa: F401  (the run-folder readers, re-exported for callers of pareto)
    OBJECTIVES,
    RUN_FILE,
    is_full_fidelity,
    make_run_storage,
    read_metrics,
    read_run_info,
    storage_label,
    trial_arch,
    trial_dir,
    trial_kind,
)
from nas.run import open_run_study as open_study  # noqa: F401
from nas.settings import SettingError
from spvit import cost
from spvit.arch import PRIOR_TYPES, ArchSpec
from spvit.errors import ConfigError, did_you_mean

# The study's directions as Optuna enums (the names are declared once, in `nas.run`).
DIRECTIONS: tuple[StudyDirection, ...] = tuple(StudyDirection[d.upper()] for d in run.DIRECTIONS)


def trial_objectives(trial: FrozenTrial,
                     run_dir: str | os.PathLike | None = None) -> tuple[float, float, float] | None:
    """(val_acc, gflops, params) of any trial, as far as it is known, else None.

    COMPLETE trials carry them as values. For others the accuracy is the `val_acc_last` user attr
    (an intermediate value in runs of earlier versions) or the last `val_acc` in the trial's
    metrics.jsonl, and the cost comes from `gflops`/`params`
    user attrs or the analytic cost model on the trial's architecture.
    """
    if trial.values is not None and len(trial.values) == 3:
        acc, gflops, params = trial.values
        return float(acc), float(gflops), float(params)
    acc = _number(trial.user_attrs.get(run.LAST_VAL_ACC_ATTR))
    if acc is None and trial.intermediate_values:
        acc = trial.intermediate_values[max(trial.intermediate_values)]
    if acc is None and run_dir is not None:
        rows = [r for r in run.trial_metrics(run_dir, trial)
                if _number(r.get("val_acc")) is not None]
        if rows:
            acc = rows[-1]["val_acc"]
    if acc is None:
        return None
    gflops = _number(trial.user_attrs.get("gflops"))
    params = _number(trial.user_attrs.get("params"))
    if gflops is None or params is None:
        spec = trial_arch(trial)
        if spec is None:
            return None
        estimate = cost.estimate(spec)
        gflops, params = float(estimate.gflops), float(estimate.params)
    return float(acc), gflops, params


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


# ---------------------------------------------------------------------------- the front
def non_dominated(points: np.ndarray) -> np.ndarray:
    """Boolean mask of the rows of `points` (all objectives minimised) that no row dominates.

    Row a dominates row b when a <= b everywhere and a < b somewhere; equal rows do not dominate
    each other, so duplicates on the front are all kept (as Optuna does).
    """
    points = np.asarray(points, dtype=float)
    if points.size == 0:
        return np.zeros(len(points), dtype=bool)
    le = (points[:, None, :] <= points[None, :, :]).all(-1)  # (N, N): a <= b everywhere
    lt = (points[:, None, :] < points[None, :, :]).any(-1)  # (N, N): a < b somewhere
    dominated = (le & lt).any(axis=0)
    return ~dominated


def non_dominated_ranks(losses: np.ndarray) -> np.ndarray:
    """Non-dominated rank of each row of `losses` (all objectives minimised): 0 for the rows no
    row dominates, 1 for those only rank-0 rows dominate, and so on (NSGA-II's sorting)."""
    losses = np.asarray(losses, dtype=float)
    ranks = np.full(len(losses), -1)
    left = np.arange(len(losses))
    rank = 0
    while left.size:
        front = non_dominated(losses[left])
        ranks[left[front]] = rank
        left = left[~front]
        rank += 1
    return ranks


def non_dominated_fronts(losses: np.ndarray) -> list[np.ndarray]:
    """Row indices of `losses` by non-dominated front (front 0 first), each in index order."""
    ranks = non_dominated_ranks(losses)
    return [np.flatnonzero(ranks == r) for r in range(int(ranks.max(initial=-1)) + 1)]


def crowding_distance(losses: np.ndarray) -> np.ndarray:
    """NSGA-II crowding distance of each row of `losses`, one set of points (usually one front):
    per objective, the gap between a point's two neighbours over the objective's span, summed;
    infinite at each objective's extremes and for sets of at most two points. Ties in an
    objective are ordered by row index."""
    losses = np.asarray(losses, dtype=float)
    n = len(losses)
    if n <= 2:
        return np.full(n, np.inf)
    dist = np.zeros(n)
    for j in range(losses.shape[1]):
        order = np.argsort(losses[:, j], kind="stable")
        span = losses[order[-1], j] - losses[order[0], j]
        dist[order[0]] = dist[order[-1]] = np.inf
        if span > 0:
            dist[order[1:-1]] += (losses[order[2:], j] - losses[order[:-2], j]) / span
    return dist


def _losses(trials: Sequence[FrozenTrial], directions: Sequence[StudyDirection]) -> np.ndarray:
    signs = np.array([-1.0 if d == StudyDirection.MAXIMIZE else 1.0 for d in directions])
    return np.array([list(t.values) for t in trials], dtype=float).reshape(-1, len(signs)) * signs


def pareto_trials(study: optuna.Study | Iterable[FrozenTrial], *,
                  directions: Sequence[StudyDirection] | None = None) -> list[FrozenTrial]:
    """Full-fidelity trials that no other full-fidelity trial dominates, best accuracy first.

    `study` is an Optuna study (its directions are used) or an iterable of trials (directions
    default to the project's `[maximize, minimize, minimize]`).
    """
    if isinstance(study, optuna.Study):
        trials = study.get_trials(deepcopy=False)
        directions = directions or study.directions
    else:
        trials = list(study)
        directions = directions or DIRECTIONS
    if len(directions) != 3:
        raise ConfigError(
            f"a search study has 3 objectives (val_acc, gflops, params), but this one has"
            f" {len(directions)}. Open the study a `spvit-nas search` run created."
        )
    full = [t for t in trials if is_full_fidelity(t)]
    if not full:
        return []
    on_front = non_dominated(_losses(full, directions))
    front = [t for t, keep in zip(full, on_front, strict=True) if keep]
    return sorted(front, key=lambda t: (-t.values[0], t.values[1], t.values[2], t.number))


# ---------------------------------------------------------------------------- rendering
def _width_summary(spec: ArchSpec) -> str:
    widths = list(dict.fromkeys(spec.block_widths()))
    return "->".join(str(w) for w in widths)


def _heads_summary(spec: ArchSpec) -> str:
    heads = [b.heads for b in spec.blocks]
    lo, hi = min(heads), max(heads)
    return str(lo) if lo == hi else f"{lo}-{hi}"


def priors_summary(spec: ArchSpec) -> str:
    """Head counts per prior type over the whole network, e.g. `mlp:8 gaussian:4 none:12`."""
    counts = Counter(p for b in spec.blocks for p in b.head_priors)
    return " ".join(f"{p}:{counts[p]}" for p in PRIOR_TYPES if counts[p])


def _indices(flags: Iterable[bool]) -> str:
    idx = [str(i) for i, f in enumerate(flags) if f]
    return ",".join(idx) if idx else "-"


def trial_record(trial: FrozenTrial) -> dict[str, Any]:
    """A flat, JSON-ready description of a trial: objectives, run facts and key choices."""
    attrs = trial.user_attrs
    values = list(trial.values) if trial.values is not None else [None, None, None]
    record: dict[str, Any] = {
        "number": trial.number,
        "state": trial.state.name,
        "kind": trial_kind(trial),
        "val_acc": values[0],
        # Held-out test accuracy (evaluated once after the full budget); never an objective.
        "test_acc": attrs.get("test_acc"),
        "gflops": values[1],
        "params": int(values[2]) if values[2] is not None else None,
        "fidelity": attrs.get("fidelity"),
        "budget": attrs.get("budget"),
        "wall_s": attrs.get("wall_s"),
        "trial_dir": attrs.get("trial_dir"),
    }
    spec = trial_arch(trial)
    if spec is not None:
        record.update({
            "depth": spec.depth,
            "width": _width_summary(spec),
            "heads": _heads_summary(spec),
            "priors": priors_summary(spec),
            "pools": _indices(b.pool for b in spec.blocks),
            "shares": _indices(b.share for b in spec.blocks),
            "init": spec.init,
        })
    else:
        record.update({k: None for k in ("depth", "width", "heads", "priors", "pools", "shares",
                                         "init")})
    return record


def format_params(params: float | None) -> str:
    """`1234567` -> `1.23M`, `45678` -> `45.7K`."""
    if params is None:
        return "-"
    if params >= 1e6:
        return f"{params / 1e6:.2f}M"
    if params >= 1e3:
        return f"{params / 1e3:.1f}K"
    return str(int(params))


def _fmt(value: Any, spec: str = "") -> str:
    if value is None:
        return "-"
    return format(value, spec) if spec else str(value)


# `val%` is what the search selected on; `test%` is the held-out split nobody selected on.
_TABLE_COLUMNS = ("trial", "val%", "test%", "GFLOPs", "params", "depth", "width", "heads",
                  "priors", "pools", "shares", "init")
_NUMERIC_COLUMNS = 6


def table_rows(trials: Iterable[FrozenTrial]) -> list[list[str]]:
    """The cells of `format_table` (without header), one list per trial."""
    rows = []
    for t in trials:
        r = trial_record(t)
        acc = None if r["val_acc"] is None else 100.0 * r["val_acc"]
        test = None if r["test_acc"] is None else 100.0 * r["test_acc"]
        rows.append([str(r["number"]), _fmt(acc, ".2f"), _fmt(test, ".2f"),
                     _fmt(r["gflops"], ".4g"),
                     format_params(r["params"]), _fmt(r["depth"]), _fmt(r["width"]),
                     _fmt(r["heads"]), _fmt(r["priors"]), _fmt(r["pools"]), _fmt(r["shares"]),
                     _fmt(r["init"])])
    return rows


def format_table(trials: Iterable[FrozenTrial]) -> str:
    """A fixed-width text table: trial, accuracy, GFLOPs, params and the key choices."""
    rows = table_rows(trials)
    if not rows:
        return "(no complete full-fidelity trials)"
    cells = [list(_TABLE_COLUMNS)] + rows
    widths = [max(len(row[i]) for row in cells) for i in range(len(_TABLE_COLUMNS))]
    numeric = set(range(_NUMERIC_COLUMNS))
    lines = []
    for k, row in enumerate(cells):
        parts = [c.rjust(w) if i in numeric else c.ljust(w)
                 for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        lines.append("  ".join(parts).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_markdown(trials: Iterable[FrozenTrial]) -> str:
    """The same table as GitHub markdown."""
    rows = table_rows(trials)
    if not rows:
        return "_No complete full-fidelity trials._"
    lines = ["| " + " | ".join(_TABLE_COLUMNS) + " |",
             "|" + "|".join("---:" if i < _NUMERIC_COLUMNS else "---"
                            for i in range(len(_TABLE_COLUMNS))) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def to_json(trials: Iterable[FrozenTrial], **extra: Any) -> str:
    """JSON: `{**extra, "trials": [record + flat arch, ...]}`."""
    records = []
    for t in trials:
        r = trial_record(t)
        r["arch"] = t.user_attrs.get("arch")
        records.append(r)
    return json.dumps({**extra, "trials": records}, indent=2)


CSV_COLUMNS = ("number", "val_acc", "test_acc", "gflops", "params", "fidelity", "budget", "wall_s",
               "depth", "width", "heads", "priors", "pools", "shares", "init", "trial_dir")


def to_csv(trials: Iterable[FrozenTrial]) -> str:
    """CSV with one row per trial and the columns of `CSV_COLUMNS`."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore",
                            lineterminator="\n")
    writer.writeheader()
    for t in trials:
        writer.writerow({k: ("" if v is None else v) for k, v in trial_record(t).items()})
    return buf.getvalue()


# ---------------------------------------------------------------------------- picking
def _check_budget(name: str, value: float | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(
            value) or value <= 0:
        flag = "--" + name.replace("_", "-")
        raise ConfigError(f"{name} must be a number > 0, but got {value!r}."
                          f" Pass a positive budget or drop {flag}.")


def within_budget(trials: Iterable[FrozenTrial], *, max_gflops: float | None = None,
                  max_params: float | None = None) -> list[FrozenTrial]:
    """The trials whose GFLOPs and params are at most the given budgets (None: no limit)."""
    _check_budget("max_gflops", max_gflops)
    _check_budget("max_params", max_params)
    return [t for t in trials
            if (max_gflops is None or t.values[1] <= max_gflops)
            and (max_params is None or t.values[2] <= max_params)]


def knee_scores(trials: Sequence[FrozenTrial]) -> tuple[list[FrozenTrial], np.ndarray]:
    """The 2-D accuracy/GFLOPs front of `trials` and each point's knee score.

    Definition: keep the trials no other trial beats on both accuracy (higher) and GFLOPs
    (lower). Normalise both axes to [0, 1] over that front, a = (acc - acc_min) / (acc_max -
    acc_min) and g = (gflops - g_min) / (g_max - g_min). The extremes of the front are the
    cheapest point (0, 0) and the most accurate point (1, 1) in (g, a); the knee score is the
    signed perpendicular distance from the chord joining them, (a - g) / sqrt(2), positive above
    it (more accuracy than the straight trade-off for the GFLOPs spent). The knee is the point
    of maximum score; both extremes score 0. A degenerate axis (one distinct value) counts as 0.
    """
    if not trials:
        return [], np.zeros(0)
    pts = np.array([[-t.values[0], t.values[1]] for t in trials], dtype=float)
    front = [t for t, keep in zip(trials, non_dominated(pts), strict=True) if keep]
    acc = np.array([t.values[0] for t in front], dtype=float)
    gfl = np.array([t.values[1] for t in front], dtype=float)

    def norm(x: np.ndarray) -> np.ndarray:
        span = x.max() - x.min()
        return (x - x.min()) / span if span > 0 else np.zeros_like(x)

    return front, (norm(acc) - norm(gfl)) / math.sqrt(2.0)


def _budget_text(max_gflops: float | None, max_params: float | None) -> str:
    parts = []
    if max_gflops is not None:
        parts.append(f"max_gflops {max_gflops:g}")
    if max_params is not None:
        parts.append(f"max_params {max_params:,.0f}")
    return " and ".join(parts)


def _scope_text(fitting: int, total: int, budget: str) -> str:
    if not budget:
        return f"the {total} Pareto trials (no budget)"
    return f"{fitting} of {total} Pareto trials within {budget}"


def _point_text(t: FrozenTrial) -> str:
    return (f"trial {t.number} ({100 * t.values[0]:.2f}% acc, {t.values[1]:.4g} GFLOPs,"
            f" {format_params(t.values[2])} params)")


class PickRule(abc.ABC):
    """How one trial is chosen from the Pareto trials that fit the budgets (`pick`).

    Contract: `choose(fitting, scope)` gets a non-empty list of complete full-fidelity trials
    (values `(val_acc, gflops, params)`, all within the budgets) and `scope`, a phrase naming
    that set for the explanation (e.g. "3 of 7 Pareto trials within max_gflops 0.01"). It
    returns one of those trials and one sentence saying why, and never raises for a non-empty
    list. It is deterministic: equal inputs give the same trial (ties broken by trial number).
    Register a new rule with `register_pick_rule`; its `name` becomes a `pick(method=...)`
    choice.
    """

    name: str = ""
    summary: str = ""

    @abc.abstractmethod
    def choose(self, fitting: Sequence[FrozenTrial], scope: str) -> tuple[FrozenTrial, str]:
        """The chosen trial and why (see the class docstring)."""


class BestAccuracy(PickRule):
    """The highest accuracy; ties: fewer GFLOPs, fewer params, lower trial number."""

    name = "best"
    summary = "the most accurate trial within the budgets"

    def choose(self, fitting, scope):
        chosen = min(fitting, key=lambda t: (-t.values[0], t.values[1], t.values[2], t.number))
        return chosen, f"{_point_text(chosen)}: highest accuracy among {scope}."


class Knee(PickRule):
    """The knee of the accuracy/GFLOPs front (`knee_scores`); ties go to the higher accuracy.
    A front of fewer than 3 points, or one with nothing above its chord, gives its most
    accurate point."""

    name = "knee"
    summary = "the knee of the accuracy/GFLOPs front within the budgets"

    def choose(self, fitting, scope):
        front, scores = knee_scores(fitting)
        order = sorted(range(len(front)), key=lambda i: (-scores[i], -front[i].values[0],
                                                         front[i].values[1], front[i].number))
        chosen = front[order[0]]
        if len(front) < 3 or scores[order[0]] <= 0:
            return chosen, (f"{_point_text(chosen)}: knee of the accuracy/GFLOPs front of"
                            f" {scope}; that front has {len(front)} point(s) and none lies above"
                            " the chord between its extremes, so the most accurate one is taken.")
        lo = min(front, key=lambda t: (t.values[1], -t.values[0]))
        hi = max(front, key=lambda t: (t.values[0], -t.values[1]))
        return chosen, (f"{_point_text(chosen)}: knee of the accuracy/GFLOPs front of {scope} —"
                        f" furthest above the chord from trial {lo.number} to trial {hi.number}"
                        f" (normalised distance {scores[order[0]]:.3f}).")


PICK_RULES: dict[str, PickRule] = {}


def register_pick_rule(rule: PickRule) -> PickRule:
    """Make `rule` available as `pick(method=rule.name)`. Refuses an empty or taken name."""
    if not isinstance(rule, PickRule) or not rule.name or rule.name in PICK_RULES:
        raise ConfigError(f"a pick rule needs a PickRule with a new, non-empty name, but got"
                          f" {getattr(rule, 'name', rule)!r} (taken: {sorted(PICK_RULES)})."
                          " Subclass nas.pareto.PickRule and give it an unused name.")
    PICK_RULES[rule.name] = rule
    return rule


register_pick_rule(BestAccuracy())
register_pick_rule(Knee())
# The rules the commands offer as their pick method (`pick`; the built-in ones).
PICK_METHODS: tuple[str, ...] = tuple(PICK_RULES)


def get_pick_rule(method: str | PickRule) -> PickRule:
    """The rule named `method` (or `method` itself if it is a `PickRule`)."""
    if isinstance(method, PickRule):
        return method
    if method not in PICK_RULES:
        raise SettingError("pick", f"pick method must be one of {list(PICK_RULES)}, but got"
                                   f" {method!r}.{did_you_mean(method, PICK_RULES)} Use `pick`"
                                   " best or `pick` knee.")
    return PICK_RULES[method]


def pick(trials: Sequence[FrozenTrial], *, max_gflops: float | None = None,
         max_params: float | None = None,
         method: str | PickRule = "best") -> tuple[FrozenTrial, str]:
    """Choose one trial of a Pareto set under GFLOPs/params budgets; returns (trial, why).

    `method` names a registered `PickRule` (`best`, `knee`; see `PICK_RULES`) or is one. The
    budgets are applied here, before the rule sees the trials. Raises `ConfigError` when the
    set is empty or nothing fits, naming the smallest GFLOPs and params available.
    """
    rule = get_pick_rule(method)
    trials = [t for t in trials if t.values is not None and len(t.values) == 3]
    if not trials:
        raise ConfigError("there is no complete full-fidelity trial to pick from. Let the search"
                          " finish at least one trial, then pick again.")
    fitting = within_budget(trials, max_gflops=max_gflops, max_params=max_params)
    budget = _budget_text(max_gflops, max_params)
    if not fitting:
        cheapest = min(trials, key=lambda t: (t.values[1], t.number))
        smallest = min(trials, key=lambda t: (t.values[2], t.number))
        raise ConfigError(
            f"no Pareto trial fits {budget}: the smallest need {cheapest.values[1]:.4g} GFLOPs"
            f" (trial {cheapest.number}) and {smallest.values[2]:,.0f} params"
            f" (trial {smallest.number}). Raise the budget."
        )
    return rule.choose(fitting, _scope_text(len(fitting), len(trials), budget))

