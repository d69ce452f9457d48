"""Reports of a search run: the Pareto front as pictures, tables and a markdown summary.

`write_reports(run_dir)` reads the run's study (through `nas.run.open_run_study`) and writes into
`RUN_DIR/reports/`:

* `pareto.csv`      the full-fidelity Pareto set, one row per trial (`nas.pareto.to_csv`);
* `pareto.png`      accuracy vs GFLOPs and accuracy vs parameters (the two projections of the
                    three objectives) of every trial with known objectives; colour and marker
                    size grow with the third objective; the members of the 3-objective Pareto
                    set are outlined and labelled with trial numbers, and the staircase of each
                    panel joins only the trials no other beats on that panel's two axes (a
                    front member off it is there thanks to the hidden objective); partial
                    (COMPLETE below budget) and pruned trials faintly;
* `pareto.html`     accuracy vs GFLOPs, interactive (plotly, with plotly.js embedded: it opens
                    offline), hover text with each trial's key choices;
* `hypervolume.png` hypervolume of the full-fidelity front after each trial
                    (`nas.hypervolume.hypervolume_history`, which states the reference point);
* `priors_N.png`    the learned spatial priors of trial N as heat maps over the patch offset
                    (dx, dy): one row per block with priors, one panel per head;
* `report.md`       the run in one page: space, budget, sampler, trial counts, front, wall time,
                    links to the pictures.

Every file is written atomically (`spvit.io`); plotting uses matplotlib's Agg backend, so no
display is needed. No Ray.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial

from nas import pareto, run
from nas.hypervolume import (  # noqa: F401  (re-exported: reports' callers import them here)
    REFERENCE_MARGIN,
    hypervolume,
    hypervolume_history,
)
from nas.hypervolume import area_2d as _area_2d  # noqa: F401
from nas.layout import REPORTS_DIR, RunFolder  # noqa: F401  (REPORTS_DIR re-exported)
from search_spaces.space import SearchSpace
from spvit.errors import ConfigError
from spvit.io import atomic_write_bytes, atomic_write_text

KIND_ORDER = ("full", "partial", "pruned", "failed", "infeasible", "duplicate", "running",
              "waiting")


# ---------------------------------------------------------------------------- data
def plotted_points(study: optuna.Study, run_dir: str | os.PathLike,
                   ) -> list[tuple[FrozenTrial, str, tuple[float, float, float]]]:
    """(trial, kind, (val_acc, gflops, params)) for every trial whose objectives are known:
    full-fidelity and partial COMPLETE trials and pruned ones (last reported accuracy)."""
    out = []
    for t in study.get_trials(deepcopy=False):
        kind = pareto.trial_kind(t)
        if kind not in ("full", "partial", "pruned"):
            continue
        objectives = pareto.trial_objectives(t, run_dir)
        if objectives is not None:
            out.append((t, kind, objectives))
    return out


def trial_counts(trials: Sequence[FrozenTrial]) -> dict[str, int]:
    """Trials per kind (`nas.pareto.trial_kind`), in a fixed order, zeros included."""
    counts = Counter(pareto.trial_kind(t) for t in trials)
    return {k: counts.get(k, 0) for k in KIND_ORDER}


# ---------------------------------------------------------------------------- pictures
def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return buf.getvalue()


def _marker_sizes(params: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if hi <= lo:
        return np.full(params.shape, 80.0)
    return 30.0 + 170.0 * (params - lo) / (hi - lo)


# The two projections of the three objectives that pareto.png draws: (axis, its label, colour
# axis, colour label). Accuracy (objective 0) is the y axis of both.
PROJECTIONS = ((1, "GFLOPs (GMACs per image)", 2, "parameters"),
               (2, "parameters", 1, "GFLOPs"))


def front_2d(front: Sequence[FrozenTrial], axis: int) -> list[FrozenTrial]:
    """The members of `front` that no other member beats on both accuracy (objective 0, higher
    is better) and objective `axis` (a cost, lower is better): the non-dominated set of that 2-D
    projection, by increasing cost. A 3-objective front member can be missing from it (it is on
    the front thanks to the third objective), so only this set draws the staircase."""
    ordered = sorted(front, key=lambda t: (t.values[axis], -t.values[0]))
    out: list[FrozenTrial] = []
    for t in ordered:
        if not out or t.values[0] > out[-1].values[0]:
            out.append(t)
    return out


def _pareto_panel(ax, points, front, *, axis: int, label: str, colour: int, colour_label: str,
                  fig) -> None:
    from matplotlib.colors import Normalize

    front_numbers = {t.number for t in front}
    values_all = np.array([p[2][colour] for p in points] or [0.0], dtype=float)
    lo, hi = float(values_all.min()), float(values_all.max())
    norm = Normalize(vmin=lo, vmax=hi if hi > lo else lo + 1.0)
    styles = {
        "pruned": dict(alpha=0.18, marker="x", label="pruned (last accuracy)"),
        "partial": dict(alpha=0.25, marker="s", label="complete below budget"),
        "full": dict(alpha=0.55, marker="o", label="full budget"),
    }
    mappable = None
    for kind, style in styles.items():
        sel = [p for p in points if p[1] == kind and p[0].number not in front_numbers]
        if not sel:
            continue
        acc = np.array([p[2][0] for p in sel]) * 100
        x = np.array([p[2][axis] for p in sel])
        c = np.array([p[2][colour] for p in sel])
        mappable = ax.scatter(x, acc, s=_marker_sizes(c, lo, hi), c=c, cmap="viridis",
                              norm=norm, **style)
    if front:
        stairs = front_2d(front, axis)
        ax.step([t.values[axis] for t in stairs], [100 * t.values[0] for t in stairs],
                where="post", color="crimson", lw=1.2, alpha=0.7, zorder=2,
                label="non-dominated in this view")
        on_stairs = {t.number for t in stairs}
        x = np.array([t.values[axis] for t in front])
        acc = np.array([t.values[0] for t in front]) * 100
        c = np.array([t.values[colour] for t in front])
        mappable = ax.scatter(x, acc, s=_marker_sizes(c, lo, hi), c=c, cmap="viridis",
                              norm=norm, edgecolors="crimson", linewidths=2.0, zorder=3,
                              label="Pareto set, 3 objectives (full budget)")
        for t, xi, yi in zip(front, x, acc, strict=True):
            ax.annotate(str(t.number), (xi, yi), textcoords="offset points", xytext=(6, 6),
                        fontsize=9, color="crimson",
                        weight="bold" if t.number in on_stairs else "normal")
    if mappable is not None:
        fig.colorbar(mappable, ax=ax, label=colour_label)
        ax.legend(loc="lower right", fontsize=7)
    else:
        ax.text(0.5, 0.5, "no trial with known accuracy yet", ha="center", va="center",
                transform=ax.transAxes)
    ax.set_xlabel(label)
    ax.set_ylabel("validation top-1 accuracy (%)")
    ax.grid(alpha=0.3)


def pareto_png(points: Sequence[tuple[FrozenTrial, str, tuple[float, float, float]]],
               front: Sequence[FrozenTrial], *, title: str = "") -> bytes:
    """PNG bytes of accuracy vs GFLOPs and accuracy vs parameters (see the module docstring)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(PROJECTIONS), figsize=(15, 5.5))
    for ax, (axis, label, colour, colour_label) in zip(axes, PROJECTIONS, strict=True):
        _pareto_panel(ax, points, front, axis=axis, label=label, colour=colour,
                      colour_label=colour_label, fig=fig)
    fig.suptitle(title or "accuracy vs cost")
    fig.tight_layout()
    return _png_bytes(fig)


def _hover(trial: FrozenTrial, kind: str, objectives: tuple[float, float, float]) -> str:
    r = pareto.trial_record(trial)
    acc, g, p = objectives
    lines = [f"trial {trial.number} ({kind})", f"val acc {100 * acc:.2f}%"]
    if r["test_acc"] is not None:
        lines.append(f"test acc {100 * r['test_acc']:.2f}% (held out)")
    lines += [f"GFLOPs {g:.4g}", f"params {pareto.format_params(p)}"]
    for key in ("depth", "width", "heads", "priors", "pools", "shares", "init"):
        if r[key] is not None:
            lines.append(f"{key} {r[key]}")
    return "<br>".join(lines)


def pareto_html(points: Sequence[tuple[FrozenTrial, str, tuple[float, float, float]]],
                front: Sequence[FrozenTrial], *, title: str = "") -> str:
    """A self-contained HTML page (plotly.js embedded) of accuracy vs GFLOPs."""
    import plotly.graph_objects as go

    fig = go.Figure()
    front_numbers = {t.number for t in front}
    params_all = [p[2][2] for p in points] or [0.0]
    lo, hi = min(params_all), max(params_all)
    styles = {"pruned": 0.25, "partial": 0.3, "full": 0.6}
    for kind, opacity in styles.items():
        sel = [p for p in points if p[1] == kind and p[0].number not in front_numbers]
        if not sel:
            continue
        fig.add_trace(go.Scatter(
            x=[p[2][1] for p in sel], y=[100 * p[2][0] for p in sel], mode="markers",
            name={"pruned": "pruned", "partial": "complete below budget",
                  "full": "full budget"}[kind],
            opacity=opacity,
            marker=dict(size=list(np.sqrt(_marker_sizes(np.array([p[2][2] for p in sel]), lo,
                                                         hi)) * 1.2),
                        color=[p[2][2] for p in sel], colorscale="Viridis", cmin=lo,
                        cmax=hi if hi > lo else lo + 1),
            text=[_hover(*p) for p in sel], hoverinfo="text",
            customdata=[p[0].number for p in sel]))
    if front:
        stairs = front_2d(front, 1)
        fig.add_trace(go.Scatter(
            x=[t.values[1] for t in stairs], y=[100 * t.values[0] for t in stairs],
            mode="lines", line=dict(shape="hv", color="crimson", width=1),
            name="non-dominated in this view", hoverinfo="skip"))
        ordered = sorted(front, key=lambda t: t.values[1])
        fig.add_trace(go.Scatter(
            x=[t.values[1] for t in ordered], y=[100 * t.values[0] for t in ordered],
            mode="markers+text",
            name="Pareto set (full budget)", text=[str(t.number) for t in ordered],
            textposition="top right",
            marker=dict(size=list(np.sqrt(_marker_sizes(np.array([t.values[2] for t in ordered]),
                                                        lo, hi)) * 1.2),
                        color=[t.values[2] for t in ordered], colorscale="Viridis", cmin=lo,
                        cmax=hi if hi > lo else lo + 1, showscale=True,
                        colorbar=dict(title="params"), line=dict(color="crimson", width=2)),
            hovertext=[_hover(t, "Pareto", tuple(t.values)) for t in ordered],
            hoverinfo="text", customdata=[t.number for t in ordered]))
    fig.update_layout(title=title or "accuracy vs GFLOPs", xaxis_title="GFLOPs (GMACs per image)",
                      yaxis_title="validation top-1 accuracy (%)", template="plotly_white",
                      legend=dict(orientation="h", y=-0.2))
    return fig.to_html(include_plotlyjs=True, full_html=True)


def hypervolume_png(numbers: Sequence[int], values: Sequence[float],
                    reference: tuple[float, float, float]) -> bytes:
    """PNG bytes of the hypervolume history."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    if numbers:
        ax.step(numbers, values, where="post", color="tab:blue")
        ax.plot(numbers, values, "o", ms=3, color="tab:blue")
    ax.set_xlabel("trial number")
    ax.set_ylabel("hypervolume (fraction of the reference box)")
    ax.set_ylim(0, max(1e-6, max(values, default=0.0)) * 1.1)
    ax.set_title(f"full-fidelity front; reference: acc {reference[0]:g}, "
                 f"{reference[1]:.4g} GFLOPs, {pareto.format_params(reference[2])} params",
                 fontsize=9)
    ax.grid(alpha=0.3)
    return _png_bytes(fig)


def _as_array(table: Any) -> np.ndarray:
    if hasattr(table, "detach"):
        table = table.detach().float().cpu().numpy()
    return np.asarray(table, dtype=float)


def priors_png(priors: Mapping[int, Mapping[str, Any]], *, title: str = "") -> bytes:
    """PNG bytes of spatial priors: one row per block with a prior, one panel per head.

    `priors` is `SPViT.prior_tables()`: `{block: {"tables": (H, 2S-1, 2S-1), "head_types": ...,
    "modes": ...}}` with `tables[h, dy + S - 1, dx + S - 1]`. x is dx (key column - query
    column), y is dy (key row - query row, pointing down as in the image); the query patch is
    marked +. Heads of type `none` are grey panels. Within a row, multiplicative priors (a
    factor on the logits) share one colour scale and additive ones (a bias) another, each with
    its colour bar.
    """
    plt = _pyplot()
    rows = [(block, _as_array(entry["tables"]), tuple(entry["head_types"]),
             tuple(entry["modes"])) for block, entry in sorted(priors.items())]
    if not rows:
        raise ConfigError("this architecture has no block with a spatial prior, so there is no"
                          " prior to draw. Pick a trial with priors (prior other than none).")
    ncols = max(a.shape[0] for _, a, _, _ in rows)
    fig, axes = plt.subplots(len(rows), ncols, figsize=(1.9 * ncols + 1.6, 1.9 * len(rows) + 0.4),
                             squeeze=False, layout="constrained")
    for r, (block, arr, head_types, modes) in enumerate(rows):
        gh, gw = (arr.shape[-2] + 1) // 2, (arr.shape[-1] + 1) // 2
        extent = (-(gw - 1) - 0.5, gw - 1 + 0.5, gh - 1 + 0.5, -(gh - 1) - 0.5)
        for h in range(ncols):
            ax = axes[r][h]
            ax.set_xticks([])
            ax.set_yticks([])
            if h >= arr.shape[0]:
                ax.axis("off")
            elif modes[h] == "none":
                ax.set_title(f"h{h}: none", fontsize=8)
                ax.set_facecolor("#dddddd")
        for mode, cmap, label in (("multiplicative", "magma", "x logits"),
                                  ("additive", "coolwarm", "+ logits")):
            heads = [h for h in range(arr.shape[0]) if modes[h] == mode]
            if not heads:
                continue
            values = np.concatenate([arr[h].ravel() for h in heads])
            values = values[np.isfinite(values)]
            vmin, vmax = (float(values.min()), float(values.max())) if values.size else (0, 1)
            if vmax - vmin < 1e-6:
                vmin, vmax = vmin - 1e-3, vmax + 1e-3  # a flat prior (e.g. at initialisation)
            image = None
            for h in heads:
                ax = axes[r][h]
                image = ax.imshow(arr[h], cmap=cmap, vmin=vmin, vmax=vmax, extent=extent,
                                  interpolation="nearest")
                ax.plot(0, 0, "+", color="cyan", ms=6, mew=1)  # the query patch itself
                ax.set_title(f"h{h}: {head_types[h]}", fontsize=8)
            fig.colorbar(image, ax=list(axes[r]), shrink=0.8, label=label)
        axes[r][0].set_ylabel(f"block {block}\ndy", fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("dx", fontsize=8)
    fig.suptitle(title or "learned spatial priors over the offset (dx, dy)", fontsize=10)
    return _png_bytes(fig)


# ---------------------------------------------------------------------------- the run summary
def _choices_text(choices: Any) -> str:
    items = list(choices) if isinstance(choices, (list, tuple)) else [choices]
    text = ", ".join(str(c) for c in items[:8])
    return f"[{text}{', ...' if len(items) > 8 else ''}]"


def _space_lines(run_dir: Path, info: dict[str, Any]) -> list[str]:
    """Markdown lines describing the searched space (RUN_DIR/space.yaml, read as a
    `SearchSpace`)."""
    path = RunFolder(run_dir).space
    source = info.get("space") if isinstance(info.get("space"), str) else None
    source = _from_run_dir(run_dir, source) if source else None
    if not path.is_file():
        return [f"- space: `{source}` (no space.yaml in the run folder)" if source
                else "- space: unknown (no space.yaml in the run folder)"]
    lines = ["- space: [space.yaml](../space.yaml)" + (f" (from `{source}`)" if source else "")]
    try:
        space = SearchSpace.load(path, check_feasible=False)
    except ConfigError as e:
        return lines + [f"- (space.yaml does not load: {e})"]
    lines[0] += f": {space.name}"
    dims = [(d.name, d.choices) for d in space.dimensions()]
    if dims:
        lines.append("- searched: " + "; ".join(f"`{name}` {_choices_text(choices)}"
                                                for name, choices in dims))
    constraints = space.constraints.to_dict()
    if constraints:
        lines.append("- constraints: " + ", ".join(f"{k} {v}" for k, v in constraints.items()))
    return lines


def _epochs_text(epochs: Any) -> str:
    if epochs is None:
        return "unknown"
    return f"{epochs} epoch" + ("" if epochs == 1 else "s")


def _fmt_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h {m:02d}m {s:02d}s" if h else f"{m}m {s:02d}s"


def _wall_lines(trials: Sequence[FrozenTrial]) -> list[str]:
    starts = [t.datetime_start for t in trials if t.datetime_start is not None]
    ends = [t.datetime_complete for t in trials if t.datetime_complete is not None]
    train_s = sum(float(t.user_attrs["wall_s"]) for t in trials
                  if isinstance(t.user_attrs.get("wall_s"), (int, float)))
    lines = []
    if starts and ends:
        span = (max(ends) - min(starts)).total_seconds()
        lines.append(f"- wall time: {_fmt_seconds(span)} from the first trial's start to the last"
                     f" trial's end ({min(starts):%Y-%m-%d %H:%M} - {max(ends):%Y-%m-%d %H:%M})")
    lines.append(f"- trial time (sum of `wall_s` over trials): {_fmt_seconds(train_s)}")
    return lines


def _default_prior_trial(front: Sequence[FrozenTrial]) -> FrozenTrial | None:
    if not front:
        return None
    chosen, _ = pareto.pick(front, method="knee")
    return chosen


def write_reports(run_dir: str | os.PathLike, *, trial: int | None = None,
                  storage: str | None = None) -> list[Path]:
    """Write the run's reports into RUN_DIR/reports/ and return the paths written.

    `trial`: the trial whose spatial priors are drawn (default: the knee of the Pareto set, see
    `nas.pareto.pick`). A requested trial without usable weights or priors is a `ConfigError`;
    for the default choice the image is skipped and report.md says why. `storage` overrides the
    study storage URL of run.json.
    """
    run_dir = Path(run_dir)
    info = run.read_run_info(run_dir)
    study = run.open_run_study(run_dir, storage=storage)
    trials = study.get_trials(deepcopy=False)
    front = pareto.pareto_trials(study)
    out = RunFolder(run_dir).reports
    written: list[Path] = []

    def put(name: str, data: bytes | str) -> None:
        path = out / name
        (atomic_write_text if isinstance(data, str) else atomic_write_bytes)(path, data)
        os.chmod(path, 0o644)  # atomic writes create owner-only temp files; reports are shared
        written.append(path)

    # The priors first: a requested trial that cannot be drawn fails before anything is written.
    prior_note = ""
    prior_tables = None
    prior_trial = run.find_trial(study, trial) if trial is not None else _default_prior_trial(front)
    if prior_trial is None:
        prior_note = "no full-fidelity trial yet, so no priors to draw."
    else:
        try:
            model, _ = run.load_trial_model(run_dir, prior_trial)
            prior_tables = model.prior_tables()
            if not prior_tables:
                raise ConfigError("this architecture has no block with a spatial prior, so there"
                                  " is no prior to draw. Pick a trial with priors (prior other"
                                  " than none).")
        except ConfigError as e:
            if trial is not None:
                raise
            prior_tables, prior_note = None, f"trial {prior_trial.number}: {e}"

    title = f"{study.study_name}: accuracy vs GFLOPs ({len(front)} on the Pareto set)"
    points = plotted_points(study, run_dir)
    put("pareto.csv", pareto.to_csv(front))
    put("pareto.png", pareto_png(points, front, title=f"{study.study_name}: accuracy vs GFLOPs"
                                 f" and parameters ({len(front)} on the Pareto set)"))
    put("pareto.html", pareto_html(points, front, title=title))
    numbers, hv, reference = hypervolume_history(trials)
    put("hypervolume.png", hypervolume_png(numbers, hv, reference))
    prior_file = None
    if prior_tables is not None:
        prior_file = f"priors_{prior_trial.number}.png"
        put(prior_file, priors_png(prior_tables, title=f"trial {prior_trial.number}: learned"
                                   " spatial priors over the offset (dx, dy)"))

    put("report.md", _report_md(run_dir, info, study, trials, front, numbers, hv, reference,
                                prior_trial, prior_file, prior_note, storage))
    # The priors of a trial drawn by an earlier report would read as this report's.
    for stale in out.glob("priors_*.png"):
        if stale.name != prior_file and re.fullmatch(r"priors_\d+\.png", stale.name):
            stale.unlink(missing_ok=True)
    return written


def _from_run_dir(run_dir: Path, value: str) -> str:
    """A path written relative to the run folder (absolute paths and paths through the folder
    the report was made from are not the reader's); URLs and relative paths unchanged."""
    if run.is_url(value) or not os.path.isabs(value):
        return value
    return os.path.relpath(value, run_dir.resolve())


def _report_md(run_dir: Path, info: dict[str, Any], study: optuna.Study,
               trials: Sequence[FrozenTrial], front: Sequence[FrozenTrial],
               numbers: Sequence[int], hv: Sequence[float], reference: tuple[float, float, float],
               prior_trial: FrozenTrial | None, prior_file: str | None, prior_note: str,
               storage: str | None) -> str:
    counts = trial_counts(trials)
    training = run.training_config(run_dir, info)
    budgets = sorted({t.user_attrs["budget"] for t in trials
                      if isinstance(t.user_attrs.get("budget"), (int, float))})
    budget = info.get("budget", budgets[-1] if budgets
                      else training.epochs if training is not None else None)
    where = run.storage_label(run_dir, info, storage=storage)
    if not run.is_url(where):
        where = _from_run_dir(run_dir, str(Path(where).resolve()))
    objectives = ", ".join(f"{o} ({d.name.lower()})"
                           for o, d in zip(run.OBJECTIVES, study.directions, strict=True))
    sampler = info.get("sampler")
    if isinstance(sampler, dict):
        sampler = json.dumps(sampler, sort_keys=True)
    lines = [
        f"# Search report: {study.study_name}",
        "",
        f"Generated {dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z} from its run folder"
        " (`..`); paths below are relative to the run folder.",
        "",
        "## Run",
        f"- study: `{study.study_name}` in `{where}`",
        f"- objectives: {objectives}",
        *_space_lines(run_dir, info),
        f"- training budget: {_epochs_text(budget)} per candidate"
        + (f" on `{training.dataset}`" if training is not None else ""),
        f"- sampler: {sampler or 'unknown'}"
        + (f", seed {info['seed']}" if info.get("seed") is not None else ""),
        *_wall_lines(trials),
        "",
        "## Trials",
        "| " + " | ".join(KIND_ORDER) + " | total |",
        "|" + "---:|" * (len(KIND_ORDER) + 1),
        "| " + " | ".join(str(counts[k]) for k in KIND_ORDER) + f" | {len(trials)} |",
        "",
        "`full`: COMPLETE at the full budget (the only trials that can be on the front);"
        " `partial`: COMPLETE below it; `pruned`: stopped early; `infeasible`: rejected by a"
        " constraint before training; `duplicate`: a re-proposed architecture, not trained twice.",
        "",
        f"## Pareto set ({len(front)} trials)",
        pareto.format_markdown(front),
        "",
        "`val%`: validation accuracy, the objective the sampler optimised and the front was"
        " selected on. `test%`: the held-out test split, evaluated once per full-budget trial"
        " and used for nothing else, so it is the honest estimate of a chosen model's accuracy.",
        "",
        "Data: [pareto.csv](pareto.csv). Interactive: [pareto.html](pareto.html).",
        "",
        "![accuracy vs GFLOPs](pareto.png)",
        "",
        "## Hypervolume",
        f"Hypervolume of the full-fidelity front after each trial: {hv[-1] if hv else 0.0:.4f}"
        " at the end. Objectives are scaled to the unit cube with reference point accuracy"
        f" {reference[0]:g}, {reference[1]:.4g} GFLOPs and {reference[2]:,.0f} params"
        f" ({REFERENCE_MARGIN:g} x the largest full-fidelity cost), so 1.0 would be a perfect"
        " model at zero cost.",
        "",
        "![hypervolume](hypervolume.png)",
        "",
    ]
    if front:
        best, why_best = pareto.pick(front, method="best")
        knee, why_knee = pareto.pick(front, method="knee")
        lines += ["## Choices", f"- best: {why_best}", f"- knee: {why_knee}", ""]
    lines += ["## Spatial priors"]
    if prior_file:
        lines += [f"Trial {prior_trial.number}: one row per block with priors, one panel per"
                  " head; each panel is the learned prior over the offset (dx, dy) from the"
                  " query patch (marked +) to the key patch.", "",
                  f"![priors of trial {prior_trial.number}]({prior_file})"]
    else:
        lines += [f"Not drawn: {prior_note}"]
    lines.append("")
    return "\n".join(lines)
