"""Hand-designed references on Fashion-MNIST, trained with a space's recipe, against a front.

Each reference architecture (default: `search_spaces/archs/vit_fashion.yaml`, a plain from-scratch
ViT, and `deit_tiny_fashion.yaml`, DeiT-Tiny at 28 px) is trained by the project's own training
path (`launch.trial.run_candidate`, DeepSpeed in-process, one worker, one torch thread) with the
`training:` block of `--space` (default `search_spaces/fashion.yaml`), for `--seeds` seeds: the
same budget every searched candidate had. Test accuracy is the standard 10,000-image test set's.

With `--run RUN` (a search's run folder) the references are set against that search's front:
for each reference, the front members at equal or lower GFLOPs and whether one of them reaches the
reference's mean test accuracy (the front dominates the reference at equal GFLOPs).

    PYTHONPATH=. .venv/bin/python bench/fashion_refs.py --seeds 3 --out runs/fashion_refs \\
        --run runs/fashion

Results go to `--out`: `results.json` (one entry per run, written atomically after each; runs
already there are skipped, so an interrupted benchmark resumes) and `summary.md`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from search_spaces import SearchSpace  # noqa: E402
from spvit import ArchSpec  # noqa: E402
from spvit.cost import estimate  # noqa: E402
from spvit.io import atomic_write_text  # noqa: E402

DEFAULT_ARCHS = ("search_spaces/archs/vit_fashion.yaml",
                 "search_spaces/archs/deit_tiny_fashion.yaml")


def _train(job: dict[str, Any]) -> dict[str, Any]:
    import torch

    from launch.trial import run_candidate
    from search_spaces.training import TrainingConfig

    torch.set_num_threads(1)
    spec = ArchSpec.from_dict(job["spec"])
    training = TrainingConfig.from_dict(job["training"])
    curve: list[float] = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fashion_ref_") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        last = run_candidate(spec, training, Path(tmp) / "trial", path="inprocess",
                             resume=False, on_epoch=lambda m: curve.append(m["val_acc"]))
    cost = estimate(spec)
    return {"arch": job["arch"], "seed": training.seed, "val_acc": last["val_acc"],
            "test_acc": last.get("test_acc"), "val_curve": curve, "params": cost.params,
            "gflops": cost.gflops, "train_images_per_s": last["images_per_s"],
            "epochs": training.epochs, "train_subset": training.train_subset,
            "wall_s": time.perf_counter() - start}


def _mean_std(values: list[float]) -> str:
    if len(values) < 2:
        return f"{100 * values[0]:.2f}"
    return f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f}"


def front_rows(run: Path) -> list[dict[str, Any]]:
    """The run's Pareto set (validation objectives), each with its test accuracy, as
    `spvit-nas pareto RUN --json` prints it."""
    cli = Path(sys.executable).parent / "spvit-nas"
    done = subprocess.run([str(cli), "pareto", str(run), "--json"], capture_output=True,
                          text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"fashion_refs: `spvit-nas pareto {run} --json` failed:"
                         f" {done.stderr.strip()}")
    return json.loads(done.stdout)["trials"]


def summarise(results: list[dict[str, Any]], front: list[dict[str, Any]] | None) -> str:
    by_arch: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        by_arch.setdefault(r["arch"], []).append(r)
    lines = ["| reference | seeds | params | GFLOPs | val % | test % | train img/s |",
             "|---|---|---|---|---|---|---|"]
    for arch, runs in by_arch.items():
        tests = [r["test_acc"] for r in runs if r["test_acc"] is not None]
        lines.append(f"| {Path(arch).stem} | {len(runs)} | {runs[0]['params']:,} |"
                     f" {runs[0]['gflops']:.4f} | {_mean_std([r['val_acc'] for r in runs])} |"
                     f" {_mean_std(tests) if tests else '-'} |"
                     f" {statistics.median(r['train_images_per_s'] for r in runs):,.0f} |")
    if front is not None:
        lines += ["", "| reference | front members at <= its GFLOPs | best of them: test %"
                  " (params, GFLOPs) | dominated |", "|---|---|---|---|"]
        for arch, runs in by_arch.items():
            gflops = runs[0]["gflops"]
            ref = statistics.mean(r["test_acc"] for r in runs if r["test_acc"] is not None)
            cheaper = [f for f in front if f["gflops"] <= gflops and f.get("test_acc") is not None]
            best = max(cheaper, key=lambda f: f["test_acc"], default=None)
            cell = (f"{100 * best['test_acc']:.2f} (trial {best['number']}, {best['params']:,},"
                    f" {best['gflops']:.4f})" if best else "-")
            verdict = "yes" if best and best["test_acc"] >= ref else "no"
            lines.append(f"| {Path(arch).stem} | {len(cheaper)} | {cell} | {verdict} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--archs", nargs="+", default=list(DEFAULT_ARCHS))
    p.add_argument("--space", default="search_spaces/fashion.yaml")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--jobs", type=int, default=1, help="runs trained at once (one core each)")
    p.add_argument("--run", default=None, help="a search's run folder to compare the front with")
    p.add_argument("--out", default="runs/fashion_refs")
    args = p.parse_args(argv)
    if args.seeds < 1 or args.jobs < 1:
        print(f"fashion_refs: --seeds and --jobs must be >= 1, but got {args.seeds} and"
              f" {args.jobs}. Raise them.", file=sys.stderr)
        return 2
    space = SearchSpace.load(ROOT / args.space if not Path(args.space).is_absolute()
                             else args.space)
    jobs = []
    for arch in args.archs:
        spec = ArchSpec.load(ROOT / arch if not Path(arch).is_absolute() else arch)
        for seed in range(args.seeds):
            jobs.append({"arch": arch, "spec": spec.to_dict(),
                         "training": space.training.replace(seed=seed).to_dict()})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else []
    done = {(r["arch"], r["seed"]) for r in results}
    todo = [j for j in jobs if (j["arch"], j["training"]["seed"]) not in done]
    print(f"fashion_refs: {len(jobs)} runs ({len(todo)} to train) -> {out}", flush=True)
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
        for entry in pool.map(_train, todo):
            results.append(entry)
            atomic_write_text(results_file, json.dumps(results, indent=1))
            print(f"  {Path(entry['arch']).stem} seed {entry['seed']}: test"
                  f" {entry['test_acc']:.4f} val {entry['val_acc']:.4f}"
                  f" ({entry['wall_s']:.0f} s)", flush=True)
    front = front_rows(Path(args.run)) if args.run else None
    text = summarise(results, front)
    atomic_write_text(out / "summary.md", text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
