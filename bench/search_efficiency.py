"""Sample efficiency of the search's samplers, and the search's orchestration overhead.

One command runs real searches (`launch.search.run_search`: Ray Tune + DeepSpeed training on the
embedded digits data) for each sampler and seed, and measures

* the hypervolume (`nas.hypervolume`) of the feasible full-budget front against completed
  trials and against wall time. Objectives are normalised to [0, 1] and minimised:
  (1 - val_acc, gflops / max_gflops, params / max_params), the limits being the space's
  `constraints:`; the reference point is (1, 1, 1), i.e. (val_acc 0, max_gflops, max_params) of
  the space (digits: 0.012 GFLOPs, 200,000 parameters). Every trial on the front is feasible by
  construction (rejected candidates are never trained);
* for each sampler, the fraction of the budget after which its mean hypervolume reaches random
  search's final mean hypervolume (target of the default: <= 0.6);
* the orchestration overhead of each search: wall time against the summed training time of its
  trials divided by the concurrency (target <= 1.10) and the per-trial start-up (driver-side
  trial time minus the trial's own training time; target <= 5 s).

    python bench/search_efficiency.py --out bench_runs/eff                      # full
    python bench/search_efficiency.py --out bench_runs/eff-quick --quick        # smoke size
    python bench/search_efficiency.py --out bench_runs/eff --reuse              # re-use runs
    python bench/search_efficiency.py rejections --seeds 0 1 2                  # no training
    python bench/search_efficiency.py overhead runs/digits --wall 840           # any finished run
    python bench/search_efficiency.py compare --out bench_runs/eff --base fifo/tpe \
        --other moasha/tpe                                                      # two groups

`--reuse` analyses run folders that already hold a finished search and runs (or resumes) only
the missing ones. `--scheduler moasha` runs the same grid with multi-objective successive
halving (compare at equal wall time with the `hv_at_wall` column).

`rejections` measures something else, without training: the share of sampler proposals that
the cost model rejects, with and without feasible proposals (`nas.samplers.FeasibleSampler`),
over N proposals per sampler and seed. The samplers are driven by a synthetic accuracy
(a smooth function of the parameter count) so that model-based samplers leave their start-up
phase; its numbers say nothing about hypervolume or search quality.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SAMPLERS = ("random", "nsga2", "tpe", "gp", "auto")
TARGET_TRIAL_FRACTION = 0.6
TARGET_WALL_RATIO = 1.10
TARGET_STARTUP_S = 5.0
BENCH_FILE = "bench.json"


# ---------------------------------------------------------------------------------------- HV
def _normalised(trial: Any, space: Any) -> tuple[float, float, float]:
    acc, gflops, params = trial.values
    return (1.0 - float(acc), float(gflops) / space.constraints.max_gflops,
            float(params) / space.constraints.max_params)


# ---------------------------------------------------------------------------------------- runs
def _run_dir(root: Path, scheduler: str, sampler: str, seed: int, feasible: bool = True) -> Path:
    return root / (scheduler if feasible else f"{scheduler}-infeasible") / sampler / f"seed{seed}"


def _finished(run_dir: Path) -> bool:
    return (run_dir / BENCH_FILE).is_file()


def run_one(run_dir: Path, *, space: Path, sampler: str, seed: int, trials: int,
            epochs: int | None, concurrent: int, scheduler: str, num_cpus: int | None,
            feasible: bool = True) -> dict:
    from launch.search import SearchRequest, run_search
    from nas.layout import RunFolder

    resume = RunFolder(run_dir).run_json.is_file()
    started = time.monotonic()
    outcome = run_search(SearchRequest(
        out=run_dir, space=None if resume else space, trials=trials,
        epochs=None if resume else epochs, concurrent=concurrent,
        sampler=None if resume else sampler, seed=None if resume else seed, resume=resume,
        scheduler=None if resume else scheduler,
        feasible_proposals=None if resume else feasible,
        num_cpus=num_cpus, export=False), say=lambda line: None)
    record = {"wall_s": time.monotonic() - started, "exit_code": outcome.exit_code,
              "sampler": sampler, "seed": seed, "trials": trials, "epochs": epochs,
              "concurrent": concurrent, "scheduler": scheduler, "feasible_proposals": feasible,
              "finished": dt.datetime.now().astimezone().isoformat(timespec="seconds")}
    if outcome.exit_code == 0:
        from spvit.io import atomic_write_json

        atomic_write_json(run_dir / BENCH_FILE, record)
    return record


def analyse_run(run_dir: Path, bench: dict | None = None) -> dict:
    """HV curves and overhead of one finished run folder (`bench`: its BENCH_FILE record)."""
    from optuna.trial import TrialState

    from nas.hypervolume import hypervolume
    from nas.layout import RunFolder, TrialFolder
    from nas.pareto import is_full_fidelity, open_study, read_metrics, trial_dir
    from search_spaces.space import SearchSpace

    space = SearchSpace.load(RunFolder(run_dir).space, check_feasible=False)
    study = open_study(run_dir)
    if bench is None:
        bench = json.loads((run_dir / BENCH_FILE).read_text(encoding="utf-8"))
    counted = [t for t in study.get_trials(deepcopy=False)
               if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
               and not t.user_attrs.get("infeasible")
               and t.user_attrs.get("duplicate_of") is None and t.datetime_complete]
    counted.sort(key=lambda t: t.datetime_complete)
    if not counted:
        return {"run": str(run_dir), "hv": [], "wall": [], **bench}
    t0 = min(t.datetime_start for t in counted)
    front: list[tuple[float, float, float]] = []
    hv, wall = [], []
    startups, train_s = [], 0.0
    for t in counted:
        if is_full_fidelity(t):
            front.append(_normalised(t, space))
        hv.append(hypervolume(front))
        wall.append((t.datetime_complete - t0).total_seconds())
        rows = read_metrics(TrialFolder(trial_dir(run_dir, t)).metrics)
        walls = [float(r["wall_s"]) for r in rows if isinstance(r.get("wall_s"), (int, float))]
        if walls and isinstance(t.user_attrs.get("wall_s"), (int, float)):
            startups.append(float(t.user_attrs["wall_s"]) - max(walls))
            train_s += max(walls)
    ideal = train_s / max(1, bench["concurrent"])
    return {"run": str(run_dir), "hv": hv, "wall": wall, "train_s": train_s,
            "startup_s": sum(startups) / len(startups) if startups else None,
            "wall_ratio": bench["wall_s"] / ideal if ideal > 0 else None,
            "outside_share": 1 - ideal / bench["wall_s"] if bench["wall_s"] > 0 else None,
            **bench}


def _mean_std(curves: list[list[float]]) -> tuple[list[float], list[float]]:
    n = min(len(c) for c in curves)
    mean = [sum(c[i] for c in curves) / len(curves) for i in range(n)]
    std = [math.sqrt(sum((c[i] - mean[i]) ** 2 for c in curves) / len(curves))
           for i in range(n)]
    return mean, std


def _hv_at(curve: dict, seconds: float) -> float:
    best = 0.0
    for hv, w in zip(curve["hv"], curve["wall"], strict=True):
        if w <= seconds:
            best = hv
    return best


def summarise(results: dict[str, list[dict]], out: Path, tag: str = "fifo") -> str:
    curves = {s: _mean_std([r["hv"] for r in runs]) for s, runs in results.items()
              if runs and all(r["hv"] for r in runs)}
    lines = ["| sampler | seeds | completed trials | final HV (mean ± std) |"
             " trials to random's final mean HV | fraction | median wall s |"
             " hv_at_wall (random's median wall) |",
             "|---|---|---|---|---|---|---|---|"]
    target = curves["random"][0][-1] if "random" in curves else None
    random_wall = None
    if "random" in results:
        walls = sorted(r["wall_s"] for r in results["random"])
        random_wall = walls[len(walls) // 2]
    for sampler, (mean, std) in curves.items():
        runs = results[sampler]
        reach = next((i + 1 for i, v in enumerate(mean) if target is not None
                      and v >= target - 1e-12), None)
        walls = sorted(r["wall_s"] for r in runs)
        at_wall = (sum(_hv_at(r, random_wall) for r in runs) / len(runs)
                   if random_wall is not None else float("nan"))
        lines.append(
            f"| {sampler} | {len(runs)} | {len(mean)} | {mean[-1]:.4f} ± {std[-1]:.4f} |"
            f" {reach if reach is not None else 'not reached'} |"
            f" {reach / len(mean) if reach else float('nan'):.2f} |"
            f" {walls[len(walls) // 2]:.0f} | {at_wall:.4f} |")
    lines += ["", "| run | wall s | summed training s | wall / (training / concurrency) |"
              " share outside training | mean per-trial start-up s |", "|---|---|---|---|---|---|"]
    nan = float("nan")
    for runs in results.values():
        for r in runs:
            startup = r.get("startup_s")
            lines.append(f"| {Path(r['run']).relative_to(out)} | {r['wall_s']:.0f} |"
                         f" {r.get('train_s', 0):.0f} | {r.get('wall_ratio') or nan:.2f} |"
                         f" {r.get('outside_share') or nan:.2f} |"
                         f" {startup if startup is not None else nan:.1f} |")
    _plot(curves, out, tag)
    _plot_wall(results, out, tag)
    return "\n".join(lines)


def _plot(curves: dict[str, tuple[list[float], list[float]]], out: Path, tag: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for sampler, (mean, std) in curves.items():
        x = list(range(1, len(mean) + 1))
        ax.plot(x, mean, label=sampler)
        ax.fill_between(x, [m - s for m, s in zip(mean, std, strict=True)],
                        [m + s for m, s in zip(mean, std, strict=True)], alpha=0.2)
    ax.set_xlabel("completed trials")
    ax.set_ylabel("hypervolume (normalised, ref (1,1,1))")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / f"hv_vs_trials-{tag}.png", dpi=120)
    plt.close(fig)


def _plot_wall(results: dict[str, list[dict]], out: Path, tag: str) -> None:
    """HV against seconds since the run's first trial started, one step curve per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for k, (sampler, runs) in enumerate(results.items()):
        for j, r in enumerate(runs):
            if r["hv"]:
                ax.step(r["wall"], r["hv"], where="post", color=f"C{k}", alpha=0.7,
                        label=sampler if j == 0 else None)
    ax.set_xlabel("wall seconds since the first trial started")
    ax.set_ylabel("hypervolume (normalised, ref (1,1,1))")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / f"hv_vs_wall-{tag}.png", dpi=120)
    plt.close(fig)


def cmd_search(args: argparse.Namespace) -> int:
    out = Path(args.out).resolve()
    if args.quick:
        args.trials, args.epochs, args.seeds = 3, 1, args.seeds or [0]
        args.concurrent = 1
    seeds = args.seeds or [0, 1, 2]
    results: dict[str, list[dict]] = {}
    for sampler in args.samplers:
        for seed in seeds:
            run_dir = _run_dir(out, args.scheduler, sampler, seed, args.feasible)
            if not (args.reuse and _finished(run_dir)):
                if _finished(run_dir):
                    print(f"{run_dir} holds a finished run; pass --reuse to analyse it",
                          file=sys.stderr)
                    return 2
                print(f"running {sampler} seed {seed} -> {run_dir}", flush=True)
                rec = run_one(run_dir, space=Path(args.space), sampler=sampler, seed=seed,
                              trials=args.trials, epochs=args.epochs,
                              concurrent=args.concurrent, scheduler=args.scheduler,
                              num_cpus=args.num_cpus, feasible=args.feasible)
                if rec["exit_code"] != 0:
                    print(f"{run_dir}: search exited {rec['exit_code']}", file=sys.stderr)
                    return 1
            results.setdefault(sampler, []).append(analyse_run(run_dir))
    size = "QUICK smoke size, not a measurement" if args.quick else "full"
    header = (f"# search efficiency ({size})"
              f"\n{dt.datetime.now().astimezone().isoformat(timespec='seconds')},"
              f" {platform.node()} ({os.cpu_count()} CPUs), space {args.space},"
              f" {args.trials} trials x {args.epochs or 'space'} epochs, concurrent"
              f" {args.concurrent}, scheduler {args.scheduler}, seeds {seeds}, feasible"
              f" proposals {'on' if args.feasible else 'off'}\n")
    tag = args.scheduler if args.feasible else f"{args.scheduler}-infeasible"
    text = header + "\n" + summarise(results, out, tag)
    (out / f"summary-{tag}.md").write_text(text + "\n", encoding="utf-8")
    (out / f"summary-{tag}.json").write_text(json.dumps(results, indent=1, default=str),
                                             encoding="utf-8")
    print(text)
    return 0


# ------------------------------------------------------------------------------------ rejections
def cmd_rejections(args: argparse.Namespace) -> int:
    import optuna

    from nas import samplers as nas_samplers
    from nas import study as nas_study
    from search_spaces.space import SearchSpace

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = SearchSpace.load(args.space)
    print(f"# rejected share of proposals (no training; synthetic accuracy), space {args.space},"
          f" {args.proposals} trials per run, seeds {args.seeds},"
          f" {dt.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print("| sampler | feasible proposals | rejected / asked (mean over seeds) | per seed |"
          " wrapped draws per trial | fallbacks |")
    print("|---|---|---|---|---|---|")
    for sampler in args.samplers:
        for feasible in (False, True):
            shares, draws, fallbacks = [], [], 0
            for seed in args.seeds:
                with tempfile.TemporaryDirectory() as tmp:
                    study = optuna.create_study(directions=list(nas_study.DIRECTIONS),
                                                sampler=nas_samplers.make_sampler(
                                                    sampler, seed=seed, n_trials=args.proposals,
                                                    population_size=6 if sampler == "nsga2"
                                                    else None))
                    ss = nas_study.SearchStudy(study, space, run_dir=tmp, budget=1,
                                               feasible_proposals=feasible,
                                               max_infeasible_tries=10_000)
                    for _ in range(args.proposals):
                        c = ss.ask()
                        acc = 1.0 - math.exp(-c.params / 30_000)
                        ss.tell_result(c, {"epoch": 1, "val_acc": acc})
                    asked = ss.infeasible_count + ss.duplicate_count + args.proposals
                    shares.append(ss.infeasible_count / asked)
                    if feasible:
                        draws.append(study.sampler.attempts_total / args.proposals)
                        fallbacks += study.sampler.fallbacks
            mean = sum(shares) / len(shares)
            per = ", ".join(f"{s:.2f}" for s in shares)
            extra = (f"{sum(draws) / len(draws):.2f} | {fallbacks}" if feasible else "- | -")
            print(f"| {sampler} | {'yes' if feasible else 'no'} | {mean:.3f} | {per} |"
                  f" {extra} |", flush=True)
    return 0


# --------------------------------------------------------------------------------------- compare
def _wall_to_reach(curve: dict, target: float) -> float | None:
    return next((w for hv, w in zip(curve["hv"], curve["wall"], strict=True)
                 if hv >= target - 1e-12), None)


def cmd_compare(args: argparse.Namespace) -> int:
    """Two groups of finished runs under --out (e.g. fifo/tpe vs moasha/tpe): final HV, HV at
    the base group's median wall, and per seed the wall time each needs to reach the base
    group's final mean HV (the ratio other / base is the multi-fidelity target, <= 0.6)."""
    out = Path(args.out)
    groups = {}
    for name in (args.base, args.other):
        runs = sorted((out / name).glob("seed*"))
        groups[name] = [analyse_run(r) for r in runs if _finished(r)]
        if not groups[name]:
            print(f"no finished runs under {out / name}", file=sys.stderr)
            return 2
    base = groups[args.base]
    target = sum(r["hv"][-1] for r in base) / len(base)
    # seconds from the first trial's start to the last trial's end (what the curves count)
    walls = sorted(r["wall"][-1] for r in base)
    median_wall = walls[len(walls) // 2]
    print(f"# {args.other} vs {args.base} under {out}: base final mean HV {target:.4f},"
          f" base median wall {median_wall:.0f} s (the time the base takes to its final HV)")
    print("| group | seeds | trials counted | final HV (mean ± std) | HV at base median wall |"
          " wall s to base final mean HV, per seed | / base median wall (mean of seeds) |")
    print("|---|---|---|---|---|---|---|")
    for name, runs in groups.items():
        finals = [r["hv"][-1] for r in runs]
        mean = sum(finals) / len(finals)
        std = math.sqrt(sum((f - mean) ** 2 for f in finals) / len(finals))
        at = sum(_hv_at(r, median_wall) for r in runs) / len(runs)
        reach = [_wall_to_reach(r, target) for r in runs]
        # a run that never reaches the target counts with its whole wall (a lower bound)
        ratios = [(x if x is not None else r["wall"][-1]) / median_wall
                  for x, r in zip(reach, runs, strict=True)]
        reach_text = ", ".join("not reached" if x is None else f"{x:.0f}" for x in reach)
        unreached = sum(x is None for x in reach)
        ratio_text = f"{sum(ratios) / len(ratios):.2f}" + (
            f" (>=, {unreached} not reached)" if unreached else "")
        print(f"| {name} | {len(runs)} | {sum(len(r['hv']) for r in runs) / len(runs):.0f} |"
              f" {mean:.4f} ± {std:.4f} | {at:.4f} | {reach_text} | {ratio_text} |")
    return 0


# -------------------------------------------------------------------------------------- overhead
def cmd_overhead(args: argparse.Namespace) -> int:
    """Overhead of any finished search (e.g. the README's `make search`), given its wall time."""
    from nas.run import RunInfo

    info = RunInfo.load(args.run_dir)
    r = analyse_run(Path(args.run_dir), bench={"wall_s": args.wall, "concurrent": info.concurrent})
    print(f"# orchestration overhead of {args.run_dir} ({len(r['hv'])} trials, concurrent"
          f" {info.concurrent}, {info.epochs} epochs; wall {args.wall:.0f} s as given)")
    print("| wall s | summed training s | wall / (training / concurrency) | share outside training"
          " | mean per-trial start-up s | final HV |")
    print("|---|---|---|---|---|---|")
    print(f"| {args.wall:.0f} | {r['train_s']:.0f} | {r['wall_ratio']:.2f} |"
          f" {r['outside_share']:.2f} | {r['startup_s']:.1f} | {r['hv'][-1]:.4f} |")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    default_space = str(REPO / "search_spaces" / "digits.yaml")
    if argv[:1] == ["rejections"]:
        p = argparse.ArgumentParser(prog="search_efficiency.py rejections")
        p.add_argument("--space", default=default_space)
        p.add_argument("--samplers", nargs="+", default=list(SAMPLERS))
        p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
        p.add_argument("--proposals", type=int, default=100)
        return cmd_rejections(p.parse_args(argv[1:]))
    if argv[:1] == ["compare"]:
        p = argparse.ArgumentParser(prog="search_efficiency.py compare")
        p.add_argument("--out", required=True)
        p.add_argument("--base", required=True, help="e.g. fifo/tpe")
        p.add_argument("--other", required=True, help="e.g. moasha/tpe")
        return cmd_compare(p.parse_args(argv[1:]))
    if argv[:1] == ["overhead"]:
        p = argparse.ArgumentParser(prog="search_efficiency.py overhead")
        p.add_argument("run_dir")
        p.add_argument("--wall", type=float, required=True,
                       help="the search's measured wall seconds (e.g. from `time make search`)")
        return cmd_overhead(p.parse_args(argv[1:]))
    p = argparse.ArgumentParser(prog="search_efficiency.py", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--space", default=default_space)
    p.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=SAMPLERS + ("qmc",))
    p.add_argument("--seeds", nargs="+", type=int, default=None)
    p.add_argument("--trials", type=int, default=30)
    p.add_argument("--epochs", type=int, default=None, help="default: the space's")
    p.add_argument("--concurrent", type=int, default=2)
    p.add_argument("--scheduler", choices=("fifo", "moasha"), default="fifo")
    p.add_argument("--num-cpus", type=int, default=None)
    p.add_argument("--no-feasible-proposals", dest="feasible", action="store_false",
                   help="let samplers propose infeasible candidates (told FAIL untrained);"
                        " runs go under SCHEDULER-infeasible/")
    p.add_argument("--quick", action="store_true",
                   help="3 trials x 1 epoch, 1 seed, 1 at a time: checks the pipeline only")
    p.add_argument("--reuse", action="store_true",
                   help="analyse finished run folders under --out instead of re-running them")
    return cmd_search(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
