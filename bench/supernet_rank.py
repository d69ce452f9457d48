"""How far a supernet's ranking can be trusted, and what one-shot search buys in wall time.

Two measurements, each writing a JSON summary (and a plot) to `--out`:

* `rank`: sample `--archs` architectures uniformly from the feasible space (seeded), score each
  with inherited weights (`nas.oneshot.InheritedScorer`) and train each stand-alone for the
  full budget of the space's recipe (`launch.trial.run_candidate`, one in-process worker);
  report Kendall τ and Spearman ρ between the two accuracies with bootstrap 95% intervals, a
  scatter plot, and per dimension value the mean rank error (stand-alone rank minus proxy
  rank), which shows what the supernet misranks. Beside every supernet scoring
  (`--finetune-steps`, `--untrained-control`) the same is reported for the free baselines on
  the same architectures: parameters and GFLOPs (`spvit.cost`), synflow and NASWOT at
  initialisation (`nas.zero_cost`), each with τ minus the parameter count's τ (paired
  bootstrap); `rank.md` holds the table. Resumable per architecture: `rows/NNN.json` is
  written as each score and stand-alone result arrives; `--shard K/N` splits the
  architectures over processes, `--report-only` reports over the complete records so far.
  `--no-supernet` computes the labels first: the free baselines and the stand-alone
  trainings only (a later run with a supernet over the same `--out` adds its scores).
  `--few-shot DIM=VALUE:FOLDER` (once per value) adds the few-shot scoring: each
  architecture scored by the supernet trained on the part of the space with its value of DIM
  (`supernet train --space` on a copy of the space with that dimension fixed).
  `--trained RUN_DIR` ranks a finished search's stand-alone trials by the free baselines alone
  (no supernet, no training: seconds per architecture). `--front RUN_DIR` computes τ / ρ over
  the COMPLETE trials of a one-shot search run (their `proxy_val_acc` user attr vs
  stand-alone).
* `time-to-front`: per seed, a full-budget search (the space's sampler, as the main job;
  `--trials` proposals, default the space's `search.trials`, each trained stand-alone) against
  the one-shot pipeline (supernet training + proxy study + `--retrain` stand-alone trainings),
  both in this process one training at a time; hypervolume of the stand-alone front
  (reference: accuracy 0 and the space's max_gflops / max_params, else 1.1x the largest seen)
  of the one-shot pipeline vs the full search at the same wall time, the wall-time ratios,
  and τ / ρ between proxy and stand-alone accuracy over the retrained fronts of all seeds. The
  full search of a seed is kept in `seed_N/full.json` and reused by later runs with another
  one-shot configuration (each has its own `seed_N/oneshot-TAG/`).

`--quick` shrinks everything (a tiny space on digits, 1-epoch trainings, a handful of
architectures) to check that the script runs end to end; its numbers mean nothing.

    python bench/supernet_rank.py rank --space search_spaces/digits.yaml --out bench_out/rank
    python bench/supernet_rank.py time-to-front --space search_spaces/digits.yaml --seeds 3
    python bench/supernet_rank.py rank --quick --out /tmp/rank_quick
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QUICK_SPACE = {
    "name": "quick",
    "arch": {"img_size": 16, "patch_size": 4, "in_chans": 1, "num_classes": 10,
             "stem": "linear", "head": "avg", "pos_embed": "learned", "pool_width_factor": 2},
    "dimensions": {"depth": [1, 2], "embed_dim": [16, 32], "mlp_ratio": [1.0, 2.0],
                   "heads": [1, 2], "prior": {"types": ["none", "mlp", "rpb"], "per_head": True},
                   "pool": {"schedules": [[], [1]]}, "share": [False, True]},
    "constraints": {"max_params": 30000, "max_gflops": 0.001},
    "training": {"dataset": "digits", "epochs": 1, "batch_size": 256, "lr": 2.0e-3,
                 "warmup_epochs": 0.0, "seed": 0},
    "search": {"trials": 4, "concurrent": 1, "seed": 0},
}


# ---------------------------------------------------------------------------- statistics
def kendall_spearman(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    from scipy import stats

    return float(stats.kendalltau(x, y).statistic), float(stats.spearmanr(x, y).statistic)


def _resamples(n: int, *, rounds: int, seed: int) -> np.ndarray:
    """`(rounds, n)` indices, each row n draws with replacement."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.integers(0, n, n) for _ in range(rounds)])


def _kendall_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Kendall's τ-b of every row pair of `x`, `y` `(R, n)` (scipy's; nan for a constant row)."""
    n = x.shape[1]
    i, j = np.triu_indices(n, 1)
    sx, sy = np.sign(x[:, i] - x[:, j]), np.sign(y[:, i] - y[:, j])
    den = np.sqrt((sx * sx).sum(1) * (sy * sy).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (sx * sy).sum(1) / den, np.nan)


def _spearman_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman's ρ of every row pair (Pearson over average ranks; nan for a constant row)."""
    from scipy import stats

    rx = stats.rankdata(x, axis=1)
    ry = stats.rankdata(y, axis=1)
    rx -= rx.mean(1, keepdims=True)
    ry -= ry.mean(1, keepdims=True)
    den = np.sqrt((rx * rx).sum(1) * (ry * ry).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (rx * ry).sum(1) / den, np.nan)


def bootstrap_ci(x: np.ndarray, y: np.ndarray, *, rounds: int, seed: int
                 ) -> dict[str, list[float]]:
    """95% percentile intervals of τ and ρ over `rounds` resamples of the (x, y) pairs
    (resamples where either side is constant are left out)."""
    idx = _resamples(len(x), rounds=rounds, seed=seed)
    taus = _kendall_rows(x[idx], y[idx])
    rhos = _spearman_rows(x[idx], y[idx])
    ok = np.isfinite(taus) & np.isfinite(rhos)
    if not ok.any():
        return {"tau": [float("nan")] * 2, "rho": [float("nan")] * 2}
    return {"tau": [float(v) for v in np.percentile(taus[ok], [2.5, 97.5])],
            "rho": [float(v) for v in np.percentile(rhos[ok], [2.5, 97.5])]}


def _ranks(v: np.ndarray) -> np.ndarray:
    from scipy import stats

    return stats.rankdata(-v)  # 1 = best


def misranking(specs: list[Any], proxy: np.ndarray, real: np.ndarray) -> dict[str, Any]:
    """Per dimension value: mean (stand-alone rank - proxy rank); positive = overrated."""
    err = _ranks(real) - _ranks(proxy)
    groups: dict[str, dict[str, list[float]]] = {}

    def add(dim: str, value: Any, e: float) -> None:
        groups.setdefault(dim, {}).setdefault(str(value), []).append(float(e))

    for spec, e in zip(specs, err, strict=True):
        add("patch_size", spec.patch_size, e)
        add("depth", spec.depth, e)
        add("embed_dim", spec.embed_dim, e)
        add("init", spec.init, e)
        add("pools", spec.num_pools, e)
        add("shared_blocks", sum(b.share for b in spec.blocks), e)
        priors = [p for b in spec.blocks if not b.share for p in b.head_priors]
        add("main_prior", max(set(priors), key=priors.count), e)
    return {dim: {v: {"mean_rank_error": float(np.mean(es)), "n": len(es)}
                  for v, es in sorted(vals.items())} for dim, vals in groups.items()}


def _scatter(path: Path, proxy: np.ndarray, real: np.ndarray, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=120)
    ax.scatter(proxy, real, s=18)
    ax.set_xlabel("inherited-weight val_acc (supernet)")
    ax.set_ylabel("stand-alone val_acc (full budget)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------------------- shared steps
def _load_space(args: argparse.Namespace) -> Any:
    from search_spaces.space import SearchSpace

    if args.quick:
        return SearchSpace.from_dict(json.loads(json.dumps(QUICK_SPACE)))
    space = SearchSpace.load(args.space)
    if args.epochs is not None:  # a shorter stand-alone budget than the recipe's: say so
        space = dataclasses.replace(space, training=space.training.replace(epochs=args.epochs))
    return space


def _train_supernet(space: Any, out: Path, epochs: int | None,
                    label_epochs: int = 0, *, timed: bool = False) -> tuple[Any, float]:
    """The trained supernet in `out` (trained or finished here) and the seconds spent. With
    `timed`, a supernet trained by an earlier run reports its recorded training time (the
    `wall_s` of its last epoch, start-up excluded) instead of the seconds to open it."""
    from launch.supernet import read_state, train_supernet
    from nas.oneshot import open_supernet

    if epochs is not None:
        space = dataclasses.replace(space, training=space.training.replace(epochs=epochs))
    start = time.perf_counter()
    state = read_state(out)
    trained_before = state is not None and state.epoch >= space.training.epochs
    if not trained_before:
        train_supernet(space, out, resume=state is not None, label_epochs=label_epochs)
    seconds = time.perf_counter() - start
    if timed and trained_before:
        seconds = float(state.metrics[-1]["wall_s"])
    return open_supernet(out), seconds


def _standalone(space: Any, spec: Any, folder: Path) -> tuple[float, float]:
    from launch.trial import run_candidate

    start = time.perf_counter()
    metrics = run_candidate(spec, space.training, folder, workers=1, resume=True)
    return float(metrics["val_acc"]), time.perf_counter() - start


def _summary(proxy: np.ndarray, real: np.ndarray, *, rounds: int, seed: int) -> dict[str, Any]:
    tau, rho = kendall_spearman(proxy, real)
    return {"n": len(proxy), "kendall_tau": tau, "spearman_rho": rho,
            "ci95": bootstrap_ci(proxy, real, rounds=rounds, seed=seed)}


# ---------------------------------------------------------------------------- rank
# Free baselines reported beside every supernet ranking, on the same architectures: the cost
# model's counts (spvit.cost) and two zero-cost proxies at initialisation (nas.zero_cost).
FREE_BASELINES = ("params", "gflops", "synflow", "naswot")
ROWS_DIR = "rows"


def proxy_label(name: str) -> str:
    """Table label of a proxy: a free baseline, `N` (the supernet's weights after N fine-tuning
    steps) or `untrained:N` (the same from the untrained supernet)."""
    fixed = {"params": "parameters (spvit.cost)", "gflops": "GFLOPs (spvit.cost)",
             "synflow": "synflow at init", "naswot": "NASWOT at init (one batch)"}
    if name in fixed:
        return fixed[name]
    which, _, steps = name.rpartition(":")
    weights = {"untrained": "untrained supernet",
               "few-shot": "few-shot supernets"}.get(which, "supernet")
    return f"{weights}, inherited" if steps == "0" else f"{weights} + {steps} fine-tuning steps"


def _file_key(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _write_row(path: Path, row: dict[str, Any]) -> None:
    from spvit.io import atomic_write_json

    atomic_write_json(path, row)


def _read_row(path: Path, spec: Any) -> dict[str, Any]:
    """The architecture's record from an earlier run (kept only if it is the same
    architecture), else a fresh one."""
    if path.is_file():
        row = json.loads(path.read_text())
        if row.get("arch") == spec.to_flat():
            return row
    return {"arch": spec.to_flat(), "scores": {}, "standalone": None}


def bootstrap_tau_diff(x: np.ndarray, base: np.ndarray, y: np.ndarray, *, rounds: int,
                       seed: int) -> list[float]:
    """95% percentile interval of τ(x, y) - τ(base, y) over `rounds` paired resamples (the same
    resampled architectures for both proxies)."""
    idx = _resamples(len(y), rounds=rounds, seed=seed)
    diffs = _kendall_rows(x[idx], y[idx]) - _kendall_rows(base[idx], y[idx])
    diffs = diffs[np.isfinite(diffs)]
    if not len(diffs):
        return [float("nan")] * 2
    return [float(v) for v in np.percentile(diffs, [2.5, 97.5])]


def rank_table(proxies: dict[str, dict[str, Any]]) -> str:
    """The markdown table of `cmd_rank`'s `proxies`, one row per proxy."""
    def ci(v: list[float]) -> str:
        return f"[{v[0]:.2f}, {v[1]:.2f}]"

    lines = ["| proxy | s per candidate | Kendall τ [95% CI] | Spearman ρ [95% CI]"
             " | τ − τ(parameters) [95% CI] |", "|---|---|---|---|---|"]
    for name, p in proxies.items():
        diff = ("-" if name == "params" else
                f"{p['tau_minus_params']:+.2f} {ci(p['tau_minus_params_ci95'])}")
        lines.append(f"| {proxy_label(name)} | {p['score_s_mean']:.3g} |"
                     f" {p['kendall_tau']:.2f} {ci(p['ci95']['tau'])} |"
                     f" {p['spearman_rho']:.2f} {ci(p['ci95']['rho'])} | {diff} |")
    return "\n".join(lines) + "\n"


def proxy_summaries(rows: list[dict[str, Any]], real: np.ndarray, names: list[str], *,
                    rounds: int, seed: int) -> dict[str, dict[str, Any]]:
    """τ / ρ with bootstrap intervals of every proxy in `names` against `real`, and each one's
    τ minus the parameter count's τ (paired bootstrap); `rows[i]["scores"][name]` holds the
    proxy's `value` and `seconds` for the architecture of `real[i]`."""
    from scipy import stats

    # rank-transformed (τ and ρ depend on ranks only; NASWOT of a singular kernel is -inf)
    values = {n: stats.rankdata([r["scores"][n]["value"] for r in rows]) for n in names}
    tau_params = kendall_spearman(values["params"], real)[0]
    return {n: {**_summary(values[n], real, rounds=rounds, seed=seed),
                "score_s_mean": float(np.mean([r["scores"][n]["seconds"] for r in rows])),
                "tau_minus_params": kendall_spearman(values[n], real)[0] - tau_params,
                "tau_minus_params_ci95": bootstrap_tau_diff(values[n], values["params"], real,
                                                            rounds=rounds, seed=seed)}
            for n in names}


def _trained_rank(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """The free baselines over the trials a search already trained stand-alone (`--trained
    RUN_DIR`): no supernet and no training, only the cost model and the zero-cost proxies on
    each COMPLETE full-budget trial's architecture against its validation accuracy. The
    architectures are the search's (its sampler's choices), not a uniform draw."""
    import optuna

    from nas.pareto import is_full_fidelity, open_study
    from nas.run import trial_spec
    from nas.zero_cost import ZeroCostScorer
    from spvit.cost import estimate
    from spvit.io import atomic_write_text

    space = _load_space(args)
    study = open_study(args.trained)
    complete = (optuna.trial.TrialState.COMPLETE,)
    trials = [t for t in study.get_trials(deepcopy=False, states=complete)
              if is_full_fidelity(t)]
    if len(trials) < 3:
        raise SystemExit(f"{args.trained}: {len(trials)} complete full-budget trials; τ needs at"
                         " least 3. Point --trained at a search run with more finished trials.")
    zero_cost = ZeroCostScorer.for_space(space, batch_size=args.zero_cost_batch)
    rows = []
    for t in trials:
        spec = trial_spec(args.trained, t)
        start = time.perf_counter()
        cost = estimate(spec)
        seconds = time.perf_counter() - start
        z = zero_cost(spec)
        rows.append({"trial": t.number, "val_acc": t.values[0],
                     "test_acc": t.user_attrs.get("test_acc"),
                     "scores": {"params": {"value": float(cost.params), "seconds": seconds},
                                "gflops": {"value": cost.gflops, "seconds": seconds},
                                **{n: {"value": z[n], "seconds": z[f"{n}_s"]}
                                   for n in ("synflow", "naswot")}}})
        print(f"trial {t.number}: " + "  ".join(f"{n} {rows[-1]['scores'][n]['value']:.4g}"
                                                for n in FREE_BASELINES)
              + f"  val {t.values[0]:.4f}", flush=True)
    real = np.array([r["val_acc"] for r in rows])
    proxies = proxy_summaries(rows, real, list(FREE_BASELINES), rounds=args.bootstrap,
                              seed=args.seed)
    table = rank_table(proxies)
    atomic_write_text(out / "trained_rank.md",
                      f"{len(rows)} trials of {args.trained} (the search's own architectures)\n\n"
                      f"{table}")
    return {"mode": "trained", "tag": "trained", "run": str(args.trained), "space": space.name,
            "n": len(rows), "zero_cost": {"seed": zero_cost.seed,
                                          "batch": len(zero_cost.images)},
            "proxies": proxies, "table": table, "supernet_above_params_ci": [],
            "rows": rows}


def _steps_key(steps: int, lr: float | None) -> str:
    """What a score after `steps` fine-tuning steps depends on beyond the weights: the steps,
    and the peak rate where it is not the recipe's (no steps, no rate)."""
    return f"{steps}-lr{lr:g}" if steps and lr is not None else str(steps)


class _FewShot:
    """Scores each architecture with the supernet of its part of the space: the part whose
    dimension `dim` has the architecture's value (few-shot NAS: one supernet per value of the
    most coupled choice, so that those values stop sharing weights)."""

    def __init__(self, dim: str, scorers: dict[str, Any], folders: dict[str, Any]) -> None:
        self.dim, self.scorers, self.folders = dim, scorers, folders

    def __call__(self, spec: Any) -> dict[str, float]:
        value = str(getattr(spec, self.dim))
        if value not in self.scorers:
            raise SystemExit(f"supernet_rank: --few-shot has no supernet for {self.dim}={value}"
                             f" (given: {', '.join(sorted(self.scorers))}); add"
                             f" --few-shot {self.dim}={value}:FOLDER.")
        why = self.folders[value].why_not(spec)
        if why:
            raise SystemExit(f"supernet_rank: the few-shot supernet for {self.dim}={value}"
                             f" cannot hold {spec}: {why}")
        return self.scorers[value](spec)


def _few_shot_part(text: str) -> tuple[str, str, Path]:
    """`DIM=VALUE:FOLDER` of --few-shot."""
    head, sep, folder = text.partition(":")
    dim, eq, value = head.partition("=")
    if not (sep and eq and dim and value and folder):
        raise argparse.ArgumentTypeError(
            f"--few-shot takes DIM=VALUE:FOLDER, e.g. patch_size=2:runs/supernet_p2 (got"
            f" {text!r})")
    return dim, value, Path(folder)


def _few_shot_scorers(space: Any, parts: list[tuple[str, str, Path]], steps_list: list[int],
                      lr: float | None) -> dict[str, tuple[str, Any]]:
    """`few-shot:N` scorers over the --few-shot supernets (one dimension, one folder a value)."""
    from nas.oneshot import WEIGHTS_FILE, InheritedScorer, open_supernet

    dims = {d for d, _, _ in parts}
    if len(dims) != 1:
        raise SystemExit(f"supernet_rank: --few-shot splits one dimension, got"
                         f" {', '.join(sorted(dims))}; give DIM=VALUE:FOLDER with one DIM.")
    dim = dims.pop()
    folders = {value: open_supernet(folder) for _, value, folder in parts}
    key = "-".join(f"{v}.{_file_key(p / WEIGHTS_FILE)}" for _, v, p in sorted(parts))
    return {f"few-shot:{n}": (f"few-shot-{key}-{_steps_key(n, lr)}", _FewShot(
        dim, {v: InheritedScorer.for_space(f.net, space, finetune_steps=n, lr=lr)
              for v, f in folders.items()}, folders)) for n in steps_list}


def cmd_rank(args: argparse.Namespace) -> dict[str, Any]:
    """Score `--archs` architectures with every proxy and train each stand-alone.

    Resumable per architecture: `rows/NNN.json` holds one architecture's scores and stand-alone
    result, rewritten atomically as each arrives; a rerun over the same `--out` computes only
    what is missing (a supernet score is recomputed when the supernet's weights changed).
    """
    from nas.oneshot import WEIGHTS_FILE, InheritedScorer
    from nas.zero_cost import ZeroCostScorer
    from spvit.cost import estimate

    space = _load_space(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.front:
        return _front_rank(args, out)
    if args.trained:
        return _trained_rank(args, out)
    supernet_dir = Path(args.supernet) if args.supernet else out / "supernet"
    steps_list = list(dict.fromkeys(args.finetune_steps))
    # name -> (what its scores depend on, scorer)
    scorers: dict[str, tuple[str, Any]] = {}
    folder, supernet_s = None, 0.0
    lr = args.finetune_lr
    if not args.no_supernet:
        folder, supernet_s = _train_supernet(space, supernet_dir,
                                             1 if args.quick else args.supernet_epochs,
                                             args.label_epochs)
        folder.check_space(space)
        trained_key = _file_key(supernet_dir / WEIGHTS_FILE)
        scorers.update({
            str(n): (f"{trained_key}-{_steps_key(n, lr)}", InheritedScorer.for_space(
                folder.net, space, finetune_steps=n, lr=lr)) for n in steps_list})
    if args.untrained_control and not args.no_supernet:
        # the control: the same fine-tuning from the supernet's initial (untrained) weights
        from nas.oneshot import supernet_choices
        from spvit.supernet import SPViTSupernet

        blank = SPViTSupernet(supernet_choices(space), seed=space.training.seed)
        scorers.update({f"untrained:{n}": (
            f"untrained-{space.training.seed}-{_steps_key(n, lr)}",
            InheritedScorer.for_space(blank, space, finetune_steps=n, lr=lr))
            for n in steps_list})
    if args.few_shot:
        scorers.update(_few_shot_scorers(space, args.few_shot, steps_list, lr))
    zero_cost = ZeroCostScorer.for_space(space, batch_size=args.zero_cost_batch)
    zero_key = f"seed{zero_cost.seed}-batch{len(zero_cost.images)}"
    rng = random.Random(args.seed)
    specs, seen = [], set()
    while len(specs) < (4 if args.quick else args.archs):
        spec = space.sample_feasible(rng).spec
        if spec not in seen:  # ArchSpec is frozen: equal architectures hash alike
            seen.add(spec)
            specs.append(spec)
    shard, shards = args.shard
    rows: list[dict[str, Any]] = []
    used: list[Any] = []  # the specs of `rows`
    for i, spec in enumerate(specs):
        if i % shards != shard:
            continue
        path = out / ROWS_DIR / f"{i:03d}.json"
        row = _read_row(path, spec)
        scores = row["scores"]

        def missing(name: str, key: str, scores: dict[str, Any] = scores) -> bool:
            return name not in scores or scores[name]["key"] != key

        if args.report_only:
            needed = [("params", "cost"), ("gflops", "cost"), ("synflow", zero_key),
                      ("naswot", zero_key), *((n, k) for n, (k, _) in scorers.items())]
            done = row["standalone"]
            if (any(missing(n, k) for n, k in needed) or done is None
                    or done["epochs"] != space.training.epochs):
                continue
        if missing("params", "cost") or missing("gflops", "cost"):
            start = time.perf_counter()
            cost = estimate(spec)
            seconds = time.perf_counter() - start
            scores["params"] = {"value": float(cost.params), "seconds": seconds, "key": "cost"}
            scores["gflops"] = {"value": cost.gflops, "seconds": seconds, "key": "cost"}
        if missing("synflow", zero_key) or missing("naswot", zero_key):
            z = zero_cost(spec)
            for name in ("synflow", "naswot"):
                scores[name] = {"value": z[name], "seconds": z[f"{name}_s"], "key": zero_key}
        _write_row(path, row)
        for name, (key, scorer) in scorers.items():
            if missing(name, key):
                sc = scorer(spec)
                scores[name] = {"value": sc["val_acc"], "seconds": sc["seconds"], "key": key}
                _write_row(path, row)
        done = row["standalone"]
        if done is None or done["epochs"] != space.training.epochs:
            acc, train_s = _standalone(space, spec, out / "standalone" / f"{i:03d}")
            row["standalone"] = {"val_acc": acc, "train_s": train_s,
                                 "epochs": space.training.epochs}
            _write_row(path, row)
        rows.append(row)
        used.append(spec)
        shown = "  ".join(f"{n} {scores[n]['value']:.4g}" for n in (*FREE_BASELINES, *scorers))
        print(f"[{i + 1}/{len(specs)}] {shown}  stand-alone {row['standalone']['val_acc']:.4f}"
              f" ({row['standalone']['train_s']:.0f}s)", flush=True)
    if shards > 1:  # a later run without --shard over the same --out reports all of them
        return {"mode": "rank", "tag": f"shard{shard}of{shards}", "n": len(rows),
                "rows": rows}
    real = np.array([r["standalone"]["val_acc"] for r in rows])
    rounds = 200 if args.quick else args.bootstrap
    names = [*FREE_BASELINES, *(n for n in scorers if n.startswith("untrained:")),
             *(n for n in scorers if ":" not in n), *(n for n in scorers if
                                                    n.startswith("few-shot:"))]
    proxies = proxy_summaries(rows, real, names, rounds=rounds, seed=args.seed)
    if not scorers:  # --no-supernet: the stand-alone labels and the free baselines only
        return _free_only(space, out, rows, real, proxies)
    params_high = proxies["params"]["ci95"]["tau"][1]
    above = [n for n in scorers if proxies[n]["kendall_tau"] > params_high]
    by_steps = {}
    for n in scorers:
        proxy = np.array([r["scores"][n]["value"] for r in rows])
        by_steps[n] = {**proxies[n], "misranking": misranking(used, proxy, real)}
        _scatter(out / ("rank_scatter.png" if n == str(steps_list[0])
                        else f"rank_scatter_finetune{n.replace(':', '-')}.png"), proxy, real,
                 f"{space.name}, {n} fine-tuning steps: τ={by_steps[n]['kendall_tau']:.2f},"
                 f" ρ={by_steps[n]['spearman_rho']:.2f}"
                 f" (n={len(rows)}{', quick' if args.quick else ''})")
    table = rank_table(proxies)
    claim = (f"supernet scorings with τ above the upper end of the parameter count's interval"
             f" ({params_high:.2f}): {', '.join(proxy_label(n) for n in above) or 'none'}")
    from spvit.io import atomic_write_text

    atomic_write_text(out / "rank.md", f"{table}\n{claim}\n")
    first = by_steps[str(steps_list[0])]
    flat_rows = [{"arch": r["arch"], "val_acc": r["standalone"]["val_acc"],
                  "train_s": r["standalone"]["train_s"],
                  "proxy_val_acc": r["scores"][str(steps_list[0])]["value"],
                  "proxies": {n: r["scores"][n]["value"] for n in names},
                  "proxy_s": {n: r["scores"][n]["seconds"] for n in names}} for r in rows]
    return {"mode": "rank", "quick": args.quick, "space": space.name,
            "report_only": args.report_only, "label_epochs": args.label_epochs,
            "supernet": str(supernet_dir), "supernet_epochs": folder.epochs,
            "supernet_train_s": supernet_s,
            "standalone_epochs": space.training.epochs,
            "finetune_steps": steps_list[0],
            "zero_cost": {"seed": zero_cost.seed, "batch": len(zero_cost.images)},
            "score_s_mean": first["score_s_mean"],
            "train_s_mean": float(np.mean([r["train_s"] for r in flat_rows])),
            **{k: first[k] for k in ("n", "kendall_tau", "spearman_rho", "ci95")},
            "misranking": first["misranking"], "proxies": proxies, "table": table,
            "supernet_above_params_ci": above, "by_finetune_steps": by_steps,
            "rows": flat_rows}


def _free_only(space: Any, out: Path, rows: list[dict[str, Any]], real: np.ndarray,
               proxies: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The report of a `--no-supernet` run: the free baselines against the stand-alone
    accuracies of the uniformly drawn architectures (a later run with a supernet adds its
    scores to the same rows)."""
    from spvit.io import atomic_write_text

    table = rank_table(proxies)
    atomic_write_text(out / "rank.md", f"{len(rows)} uniformly drawn architectures, no supernet"
                                       f" scored yet\n\n{table}\n")
    return {"mode": "rank", "tag": "free", "space": space.name, "n": len(rows),
            "standalone_epochs": space.training.epochs, "proxies": proxies, "table": table,
            "supernet_above_params_ci": [],
            "train_s_mean": float(np.mean([r["standalone"]["train_s"] for r in rows])),
            "rows": [{"arch": r["arch"], "val_acc": r["standalone"]["val_acc"],
                      "train_s": r["standalone"]["train_s"],
                      "proxies": {n: r["scores"][n]["value"] for n in FREE_BASELINES}}
                     for r in rows]}


def _front_rank(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    from nas.oneshot import PROXY_ATTR
    from nas.pareto import is_full_fidelity, open_study

    study = open_study(args.front)
    trials = [t for t in study.get_trials(deepcopy=False)
              if is_full_fidelity(t) and PROXY_ATTR in t.user_attrs]
    if len(trials) < 3:
        raise SystemExit(f"{args.front}: {len(trials)} stand-alone trials with a proxy score;"
                         " τ needs at least 3. Run a one-shot search with --retrain >= 3.")
    proxy = np.array([t.user_attrs[PROXY_ATTR] for t in trials], dtype=float)
    real = np.array([t.values[0] for t in trials], dtype=float)
    _scatter(out / "front_scatter.png", proxy, real, f"one-shot front of {args.front}")
    return {"mode": "front", "run": str(args.front),
            **_summary(proxy, real, rounds=args.bootstrap, seed=args.seed)}


# ---------------------------------------------------------------------------- time to front
def _hypervolume(points: list[tuple[float, float, float]], ref: tuple[float, float]) -> float:
    from nas.hypervolume import hypervolume

    losses = np.array([[1.0 - a, g / ref[0], p / ref[1]] for a, g, p in points], dtype=float)
    return hypervolume(losses.reshape(-1, 3), (1.0, 1.0, 1.0))


def _full_arm(space: Any, root: Path, *, trials: int, seed: int) -> dict[str, Any]:
    """The full-budget search of one seed: the space's sampler (the main job's), each feasible
    proposal trained stand-alone. Cached in `root/full.json` (a rerun reuses it, so a second
    one-shot configuration is compared against the same search)."""
    import optuna

    from nas import study as nas_study
    from nas.oneshot import ask_feasible

    cache = root / "full.json"
    if cache.exists():
        data = json.loads(cache.read_text())
        if data["trials"] == trials and data["sampler"] == space.search.sampler:
            return data
    study = optuna.create_study(directions=list(nas_study.DIRECTIONS),
                                sampler=nas_study.make_sampler(
                                    space.search.sampler, seed=seed, n_trials=trials,
                                    population_size=nas_study.default_population_size(trials)))
    points, times, archs, elapsed = [], [], [], 0.0
    for i in range(trials):
        proposal = ask_feasible(study, space)
        acc, train_s = _standalone(space, proposal.spec, root / "full" / f"{i:03d}")
        elapsed += train_s
        study.tell(proposal.trial, [acc, proposal.cost.gflops, float(proposal.cost.params)])
        points.append((acc, proposal.cost.gflops, float(proposal.cost.params)))
        times.append(elapsed)
        archs.append(proposal.spec.to_flat())
        print(f"[seed {seed} full {i + 1}/{trials}] val_acc {acc:.4f} ({train_s:.0f}s)",
              flush=True)
    data = {"trials": trials, "sampler": space.search.sampler, "points": points,
            "times": times, "archs": archs}
    tmp = cache.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(cache)
    return data


def cmd_time_to_front(args: argparse.Namespace) -> dict[str, Any]:
    import optuna

    from nas.oneshot import (
        InheritedScorer,
        rescore_count,
        rescore_front,
        run_proxy_search,
        select_for_retrain,
        summarise_proxy,
    )
    from spvit.arch import ArchSpec
    from spvit.cost import estimate

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = _load_space(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    c = space.constraints
    trials = 4 if args.quick else (args.trials or space.search.trials)
    retrain = 2 if args.quick else args.retrain
    candidates = 20 if args.quick else args.candidates
    sn_epochs = 1 if args.quick else args.supernet_epochs
    sn_tag = f"sn{sn_epochs or space.training.epochs}-label{args.label_epochs}"
    tag = (f"{sn_tag}-c{candidates}-k{retrain}"
           + (f"-ft{args.finetune_steps}-r{rescore_count(retrain, args.rescore)}"
              if args.finetune_steps else ""))
    seeds = [args.seed] if args.quick else list(range(args.seed, args.seed + args.seeds))
    per_seed, front_proxy, front_real = [], [], []
    for seed in seeds:
        root = out / f"seed_{seed}"
        full = _full_arm(space, root, trials=trials, seed=seed)
        full_points = [tuple(p) for p in full["points"]]
        full_times = full["times"]
        # the search driver never trains a repeated architecture (nas.study.SearchStudy tells
        # it FAIL); this loop does, so the full search is also timed with repeats for free
        keys = [json.dumps(a, sort_keys=True) for a in full["archs"]]
        repeats = [i for i, k in enumerate(keys) if k in keys[:i]]
        own = np.diff([0.0, *full_times])
        own[repeats] = 0.0
        free_times = list(np.cumsum(own))
        # one-shot: supernet + proxy study + stand-alone retraining of the proxy front
        arm = root / f"oneshot-{tag}"
        sub = dataclasses.replace(space, training=space.training.replace(seed=seed))
        # one supernet per seed and supernet recipe, shared by the one-shot configurations
        # that differ after it; a reused one counts its recorded training wall time
        folder, supernet_s = _train_supernet(sub, root / f"supernet-{sn_tag}", sn_epochs,
                                             args.label_epochs, timed=True)
        start = time.perf_counter()
        proxy = run_proxy_search(space, InheritedScorer.for_space(folder.net, space),
                                 candidates=candidates, seed=seed)
        proxy_s = time.perf_counter() - start
        pool = proxy.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        rescore_s = 0.0
        if args.finetune_steps:
            start = time.perf_counter()
            tuned = InheritedScorer.for_space(folder.net, space,
                                              finetune_steps=args.finetune_steps)
            pool = rescore_front(pool, tuned, k=rescore_count(retrain, args.rescore),
                                 steps=args.finetune_steps)
            rescore_s = time.perf_counter() - start
        picks = select_for_retrain(pool, retrain)
        one_points, retrain_s, picked = [], 0.0, []
        for i, t in enumerate(picks):
            spec = ArchSpec.from_dict(t.user_attrs["arch"])
            acc, train_s = _standalone(space, spec, arm / "retrain" / f"{i:03d}")
            retrain_s += train_s
            cost = estimate(spec)
            one_points.append((acc, cost.gflops, float(cost.params)))
            picked.append({"arch": spec.to_flat(), "proxy_val_acc": t.values[0],
                           "val_acc": acc, "train_s": train_s})
            front_proxy.append(t.values[0])
            front_real.append(acc)
        one_s = supernet_s + proxy_s + rescore_s + retrain_s
        everything = full_points + one_points
        ref = (c.max_gflops or 1.1 * max(p[1] for p in everything),
               c.max_params or 1.1 * max(p[2] for p in everything))
        hv_one = _hypervolume(one_points, ref)
        at_equal = [p for p, t in zip(full_points, full_times, strict=True) if t <= one_s]
        hv_curve = [_hypervolume(full_points[:k + 1], ref) for k in range(len(full_points))]
        reach = next((t for t, hv in zip(full_times, hv_curve, strict=True) if hv >= hv_one),
                     None)
        reach_free = next((float(t) for t, hv in zip(free_times, hv_curve, strict=True)
                           if hv >= hv_one), None)
        per_seed.append({
            "seed": seed, "oneshot_s": one_s, "supernet_s": supernet_s, "proxy_s": proxy_s,
            "rescore_s": rescore_s, "retrain_s": retrain_s,
            "proxy": dataclasses.asdict(summarise_proxy(proxy)),
            "full_s": full_times[-1], "hv_oneshot": hv_one,
            "hv_full_at_oneshot_time": _hypervolume(at_equal, ref),
            "hv_full_final": _hypervolume(full_points, ref),
            "wall_ratio_oneshot_over_full": one_s / full_times[-1],
            "full_s_to_reach_oneshot_hv": reach,
            "wall_ratio_oneshot_over_full_to_same_hv": (one_s / reach) if reach else None,
            "full_repeats": len(repeats), "full_s_without_repeats": float(free_times[-1]),
            "full_s_to_reach_oneshot_hv_without_repeats": reach_free,
            "wall_ratio_to_same_hv_without_repeats": (one_s / reach_free) if reach_free
            else None,
            "retrained": picked})
        print(json.dumps({k: v for k, v in per_seed[-1].items() if k != "retrained"}),
              flush=True)

    def stats(key: str) -> dict[str, float]:
        v = np.array([s[key] for s in per_seed if s[key] is not None], dtype=float)
        if not len(v):
            return {"mean": float("nan"), "std": float("nan"), "n": 0}
        return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                "n": len(v)}

    front = (_summary(np.array(front_proxy), np.array(front_real), rounds=args.bootstrap,
                      seed=args.seed) if len(set(front_proxy)) > 1 else None)
    if front is not None:
        _scatter(out / f"front_scatter-{tag}.png", np.array(front_proxy), np.array(front_real),
                 f"retrained one-shot fronts, {len(seeds)} seeds: τ={front['kendall_tau']:.2f}")
    return {"mode": "time-to-front", "quick": args.quick, "space": space.name, "tag": tag,
            "trials": trials, "full_sampler": space.search.sampler, "retrain": retrain,
            "candidates": candidates, "supernet_epochs": sn_epochs or space.training.epochs,
            "label_epochs": args.label_epochs, "standalone_epochs": space.training.epochs,
            "finetune_steps": args.finetune_steps, "summary": {k: stats(k) for k in (
                "oneshot_s", "full_s", "wall_ratio_oneshot_over_full", "hv_oneshot",
                "hv_full_at_oneshot_time", "hv_full_final",
                "wall_ratio_oneshot_over_full_to_same_hv",
                "wall_ratio_to_same_hv_without_repeats")},
            "front_rank": front, "seeds": per_seed}


def _positive_lr(text: str) -> float:
    try:
        lr = float(text)
    except ValueError:
        lr = float("nan")
    if not lr > 0 or lr == float("inf"):
        raise argparse.ArgumentTypeError(f"--finetune-lr must be a positive number, e.g. 2e-4"
                                         f" (got {text!r})")
    return lr


def _shard(text: str) -> tuple[int, int]:
    k, _, n = text.partition("/")
    try:
        shard, shards = int(k), int(n)
    except ValueError:
        shard, shards = -1, 0
    if not 0 <= shard < shards:
        raise argparse.ArgumentTypeError(f"--shard must be K/N with 0 <= K < N, but got"
                                         f" {text!r}. Use e.g. 0/2 and 1/2.")
    return shard, shards


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    for name in ("rank", "time-to-front"):
        p = sub.add_parser(name)
        p.add_argument("--space", default=str(ROOT / "search_spaces" / "digits.yaml"))
        p.add_argument("--out", default=f"bench_out/supernet_{name}")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--supernet-epochs", type=int, default=None,
                       help="supernet epochs (default: the space's training.epochs)")
        p.add_argument("--quick", action="store_true",
                       help="tiny end-to-end check; the numbers mean nothing")
        p.add_argument("--bootstrap", type=int, default=2000)
        p.add_argument("--label-epochs", type=int, default=0,
                       help="supernet epochs on labels before in-place distillation")
        p.add_argument("--epochs", type=int, default=None,
                       help="stand-alone epochs (default: the space's full budget)")
    rank = sub.choices["rank"]
    rank.add_argument("--archs", type=int, default=30)
    rank.add_argument("--supernet", default=None, help="an already trained supernet folder")
    rank.add_argument("--front", default=None, help="a one-shot search run folder")
    rank.add_argument("--trained", default=None, metavar="RUN_DIR",
                      help="rank a finished search's stand-alone trials by the free baselines"
                           " only (no supernet, no training)")
    rank.add_argument("--finetune-steps", type=int, nargs="+", default=[0], metavar="S",
                      help="score every architecture after each of these numbers of fine-tuning"
                           " steps from its inherited weights (default 0: none); the first is"
                           " the headline, the others are reported beside it")
    rank.add_argument("--finetune-lr", type=_positive_lr, default=None, metavar="LR",
                      help="peak learning rate of those steps (default: the recipe's lr)")
    rank.add_argument("--shard", type=_shard, default=(0, 1), metavar="K/N",
                      help="work on architectures i with i %% N == K only (several processes"
                           " over one --out); a run without it then reports them all")
    rank.add_argument("--report-only", action="store_true",
                      help="compute nothing: report over the architectures whose records"
                           " in --out are complete")
    rank.add_argument("--zero-cost-batch", type=int, default=128, metavar="N",
                      help="images of the one batch NASWOT codes (default 128)")
    rank.add_argument("--no-supernet", action="store_true",
                      help="no supernet: the free baselines and the stand-alone trainings only"
                           " (a later run with a supernet over the same --out adds its scores)")
    rank.add_argument("--few-shot", action="append", type=_few_shot_part, default=[],
                      metavar="DIM=VALUE:FOLDER",
                      help="also score with few-shot supernets, one per value of DIM, each"
                           " trained on the space with DIM fixed to VALUE (repeat for each"
                           " value), e.g. --few-shot patch_size=4:A --few-shot patch_size=2:B")
    rank.add_argument("--untrained-control", action="store_true",
                      help="also score with the same fine-tuning from an untrained supernet"
                           " (does the supernet's training add anything to the ranking?)")
    ttf = sub.choices["time-to-front"]
    ttf.add_argument("--seeds", type=int, default=3)
    ttf.add_argument("--trials", type=int, default=None,
                     help="full-search trials (default: the space's search.trials)")
    ttf.add_argument("--retrain", type=int, default=6)
    ttf.add_argument("--candidates", type=int, default=2000)
    ttf.add_argument("--finetune-steps", type=int, default=0, metavar="S",
                     help="re-score the top of the proxy front after S fine-tuning steps"
                          " (`nas.oneshot.rescore_front`) before picking --retrain")
    ttf.add_argument("--rescore", type=int, default=None, metavar="M",
                     help="how many of the proxy front are re-scored (default 4 x --retrain)")
    args = parser.parse_args(argv)
    result = cmd_rank(args) if args.mode == "rank" else cmd_time_to_front(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / (f"{args.mode}-{result['tag']}.json" if "tag" in result else f"{args.mode}.json")
    from spvit.io import atomic_write_text

    atomic_write_text(path, json.dumps(result, indent=2))
    keys = ("n", "kendall_tau", "spearman_rho", "ci95", "summary", "front_rank")
    if "table" in result:
        print(result["table"])
        print("above the parameter count's interval:", result["supernet_above_params_ci"])
    print(json.dumps({k: result[k] for k in keys if k in result}))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
