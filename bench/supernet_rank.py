"""How far a supernet's ranking can be trusted, and what one-shot search buys in wall time.

Two measurements, each writing a JSON summary (and a plot) to `--out`:

* `rank`: sample `--archs` architectures uniformly from the feasible space (seeded), score each
  with inherited weights (`nas.oneshot.InheritedScorer`) and train each stand-alone for the
  full budget of the space's recipe (`launch.trial.run_candidate`, one in-process worker);
  report Kendall τ and Spearman ρ between the two accuracies with bootstrap 95% intervals, a
  scatter plot, and per dimension value the mean rank error (stand-alone rank minus proxy
  rank), which shows what the supernet misranks. `--front RUN_DIR` computes the same over the
  COMPLETE trials of a one-shot search run (their `proxy_val_acc` user attr vs stand-alone).
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


def bootstrap_ci(x: np.ndarray, y: np.ndarray, *, rounds: int, seed: int
                 ) -> dict[str, list[float]]:
    """95% percentile intervals of τ and ρ over `rounds` resamples of the (x, y) pairs."""
    rng = np.random.default_rng(seed)
    taus, rhos = [], []
    n = len(x)
    for _ in range(rounds):
        idx = rng.integers(0, n, n)
        if len(set(x[idx])) < 2 or len(set(y[idx])) < 2:
            continue
        t, r = kendall_spearman(x[idx], y[idx])
        if np.isfinite(t) and np.isfinite(r):
            taus.append(t)
            rhos.append(r)
    if not taus:
        return {"tau": [float("nan")] * 2, "rho": [float("nan")] * 2}
    return {"tau": [float(v) for v in np.percentile(taus, [2.5, 97.5])],
            "rho": [float(v) for v in np.percentile(rhos, [2.5, 97.5])]}


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
def cmd_rank(args: argparse.Namespace) -> dict[str, Any]:
    from nas.oneshot import InheritedScorer

    space = _load_space(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.front:
        return _front_rank(args, out)
    supernet_dir = Path(args.supernet) if args.supernet else out / "supernet"
    folder, supernet_s = _train_supernet(space, supernet_dir,
                                         1 if args.quick else args.supernet_epochs,
                                         args.label_epochs)
    folder.check_space(space)
    steps_list = list(dict.fromkeys(args.finetune_steps))
    scorers = {str(n): InheritedScorer.for_space(folder.net, space, finetune_steps=n)
               for n in steps_list}
    if args.untrained_control:
        # the control: the same fine-tuning from the supernet's initial (untrained) weights
        from nas.oneshot import supernet_choices
        from spvit.supernet import SPViTSupernet

        blank = SPViTSupernet(supernet_choices(space), seed=space.training.seed)
        scorers.update({f"untrained:{n}": InheritedScorer.for_space(blank, space,
                                                                    finetune_steps=n)
                        for n in steps_list})
    rng = random.Random(args.seed)
    specs, seen = [], set()
    while len(specs) < (4 if args.quick else args.archs):
        spec = space.sample_feasible(rng).spec
        key = json.dumps(spec.to_flat(), sort_keys=True)
        if key not in seen:
            seen.add(key)
            specs.append(spec)
    rows = []
    for i, spec in enumerate(specs):
        scores = {n: scorer(spec) for n, scorer in scorers.items()}
        acc, train_s = _standalone(space, spec, out / "standalone" / f"{i:03d}")
        rows.append({"arch": spec.to_flat(),
                     "proxy_val_acc": scores[str(steps_list[0])]["val_acc"],
                     "score_s": scores[str(steps_list[0])]["seconds"],
                     "proxy_by_finetune": {n: sc["val_acc"] for n, sc in scores.items()},
                     "score_s_by_finetune": {n: sc["seconds"] for n, sc in scores.items()},
                     "val_acc": acc, "train_s": train_s})
        shown = "  ".join(f"proxy[{n} steps] {sc['val_acc']:.4f} ({sc['seconds']:.2f}s)"
                          for n, sc in scores.items())
        print(f"[{i + 1}/{len(specs)}] {shown}  stand-alone {acc:.4f} ({train_s:.0f}s)",
              flush=True)
    real = np.array([r["val_acc"] for r in rows])
    rounds = 200 if args.quick else args.bootstrap
    by_steps = {}
    for n in scorers:
        proxy = np.array([r["proxy_by_finetune"][n] for r in rows])
        by_steps[n] = {
            **_summary(proxy, real, rounds=rounds, seed=args.seed),
            "score_s_mean": float(np.mean([r["score_s_by_finetune"][n] for r in rows])),
            "misranking": misranking(specs, proxy, real)}
        _scatter(out / ("rank_scatter.png" if n == str(steps_list[0])
                        else f"rank_scatter_finetune{n.replace(':', '-')}.png"), proxy, real,
                 f"{space.name}, {n} fine-tuning steps: τ={by_steps[n]['kendall_tau']:.2f},"
                 f" ρ={by_steps[n]['spearman_rho']:.2f}"
                 f" (n={len(rows)}{', quick' if args.quick else ''})")
    first = by_steps[str(steps_list[0])]
    return {"mode": "rank", "quick": args.quick, "space": space.name,
            "label_epochs": args.label_epochs,
            "supernet": str(supernet_dir), "supernet_epochs": folder.epochs,
            "supernet_train_s": supernet_s,
            "standalone_epochs": space.training.epochs,
            "finetune_steps": steps_list[0],
            "score_s_mean": first["score_s_mean"],
            "train_s_mean": float(np.mean([r["train_s"] for r in rows])),
            **{k: first[k] for k in ("n", "kendall_tau", "spearman_rho", "ci95")},
            "misranking": first["misranking"], "by_finetune_steps": by_steps, "rows": rows}


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
    from optuna._hypervolume import compute_hypervolume

    losses = np.array([[1.0 - a, g / ref[0], p / ref[1]] for a, g, p in points], dtype=float)
    losses = losses[(losses < 1.0).all(axis=1)] if len(losses) else losses
    return float(compute_hypervolume(losses, np.ones(3))) if len(losses) else 0.0


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
    rank.add_argument("--finetune-steps", type=int, nargs="+", default=[0], metavar="S",
                      help="score every architecture after each of these numbers of fine-tuning"
                           " steps from its inherited weights (default 0: none); the first is"
                           " the headline, the others are reported beside it")
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
    path.write_text(json.dumps(result, indent=2))
    keys = ("n", "kendall_tau", "spearman_rho", "ci95", "summary", "front_rank")
    if "by_finetune_steps" in result:
        for n, r in result["by_finetune_steps"].items():
            print(f"{n} fine-tuning steps: tau {r['kendall_tau']:.3f} {r['ci95']['tau']},"
                  f" rho {r['spearman_rho']:.3f} {r['ci95']['rho']},"
                  f" {r['score_s_mean']:.2f} s per candidate")
    print(json.dumps({k: result[k] for k in keys if k in result}))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
