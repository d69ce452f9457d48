"""The three papers' claims at small scale, trained with the project's own path.

Every run is one candidate trained by `launch.trial.run_candidate` (DeepSpeed, in-process, one
worker) with the recipe of `search_spaces/digits.yaml`'s `training:` block; only `epochs` (equal
for every arm) and `seed` change. Arms, each over `--seeds` seeds (default 3):

* `priors`  (SP-ViT): every prior type against `none` on one base architecture; final accuracy
  and the per-epoch validation curve (convergence speed).
* `init`    (structured init): `impulse3`, `impulse5`, `impulse3_mimetic`, `mimetic`,
  `trunc_normal`, at two head counts. With <= 9 heads `impulse5` takes the same offsets as
  `impulse3` (centre first, then by distance), so those two arms are identical by construction.
* `pool`    (PSViT): token pooling, attention sharing and both against neither; accuracy
  against GFLOPs (`spvit.cost.estimate`) and measured inference images/s (eval forward, batch
  64, one thread, median of 5, measured after all training, one model at a time).

Base architecture (digits space's fixed `arch:` plus): width 48, depth 3, mlp ratio 2, 4 heads,
`pos_embed: learned_sincos` for every arm, `pool_width_factor: 1` in the pool arm so that the
parameter counts stay within a few percent. The accuracy is the last epoch's validation accuracy
(`test_acc` when the training path reports one). With `--cifar PATH` the priors arm also runs on
CIFAR-10 (the cifar space's recipe, same epochs; not inside the 60-minute budget).

    .venv/bin/python bench/claims.py --quick            # smoke run, ~1-2 min
    .venv/bin/python bench/claims.py --arms init --seeds 3 --epochs 15 \
        --variants trunc_normal/h2,mimetic/h2,impulse3/h2,impulse3_mimetic/h2
    .venv/bin/python bench/claims.py                    # all arms, <= 60 min on 2 cores

`--dataset fashion-mnist` runs the arms on Fashion-MNIST with `search_spaces/fashion.yaml`'s
recipe and fixed `arch:` (28 px, patch `--patch`, default 4: a 7x7 grid; 2 gives 14x14), width 48,
depth 4; `--train-subset N` trains on a stratified N-image subset of the 54,000 training images (the
low-data regime where SP-ViT makes its claim); the accuracy is always the standard 10,000-image
test set's. `--max-epochs M` trains until the validation accuracy stops improving: a run whose
validation curve still gained more than `--plateau` (accuracy points) over its last quarter is
trained again from scratch with twice the epochs (the cosine schedule stretched with it), up to M;
each entry records the epochs it ended with and whether its curve had flattened.

    .venv/bin/python bench/claims.py --dataset fashion-mnist --train-subset 4000 --epochs 15 \
        --max-epochs 60 --out runs/claims_fashion_4k

Results go to `--out` (default `bench_claims/`): `results.json` (one entry per run, written
atomically after each run; runs already there are skipped, so an interrupted benchmark resumes)
and `summary.md` (mean +- std per arm, mean curves). Wall time is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
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

import torch  # noqa: E402

from search_spaces import SearchSpace  # noqa: E402
from spvit import ArchSpec, BlockSpec  # noqa: E402
from spvit.cost import estimate  # noqa: E402
from spvit.io import atomic_write_text  # noqa: E402

PRIOR_ARMS = ("none", "mlp", "gaussian", "axial", "rpb", "decay")
INIT_ARMS = ("trunc_normal", "mimetic", "impulse3", "impulse5", "impulse3_mimetic")
POOL_ARMS = ("none", "pool", "share", "pool+share")


def _base(space: SearchSpace, **changes: Any) -> dict[str, Any]:
    fixed = {k: v for k, v in space.fixed.items() if k in ArchSpec.__dataclass_fields__}
    return {**fixed, "embed_dim": 48, "mlp_ratio": 2.0, "pos_embed": "learned_sincos", **changes}


def plateaued(curve: list[float], tolerance: float) -> bool:
    """Whether a validation curve gained at most `tolerance` over its last quarter (>= 2 epochs)."""
    span = max(2, len(curve) // 4)
    if len(curve) <= span:
        return False
    return max(curve[-span:]) - curve[-span - 1] <= tolerance


def _blocks(depth: int, heads: int, *, prior: str = "none", pool_at: int | None = None,
            share_at: int | None = None) -> tuple[BlockSpec, ...]:
    return tuple(BlockSpec(heads=heads, prior="none" if i == share_at else prior,
                           pool=i == pool_at, share=i == share_at) for i in range(depth))


def plan(space: SearchSpace, arms: list[str], *, quick: bool, depth: int = 3,
         **base: Any) -> list[dict[str, Any]]:
    """The runs: `{arm, variant, spec (nested dict)}`, seeds added by the caller.

    `base` adds fixed architecture fields (e.g. `patch_size` where the space searches it).
    """
    def fields(**changes: Any) -> dict[str, Any]:
        return _base(space, **{**base, **changes})

    depth, width = (2, 16) if quick else (depth, 48)
    runs = []
    if "priors" in arms:
        for prior in (("none", "decay") if quick else PRIOR_ARMS):
            spec = ArchSpec(blocks=_blocks(depth, 4 if not quick else 2, prior=prior),
                            **fields(embed_dim=width))
            runs.append({"arm": "priors", "variant": prior, "spec": spec})
    if "init" in arms:
        for heads in ((2,) if quick else (2, 4)):
            for init in (("trunc_normal", "impulse3") if quick else INIT_ARMS):
                spec = ArchSpec(blocks=_blocks(depth, heads),
                                **fields(embed_dim=width, init=init))
                runs.append({"arm": "init", "variant": f"{init}/h{heads}", "spec": spec})
    if "pool" in arms:
        for variant in (("none", "pool") if quick else POOL_ARMS):
            pool_at = 1 if "pool" in variant.split("+") else None
            share_at = depth - 1 if "share" in variant else None  # after the pool, if any
            spec = ArchSpec(blocks=_blocks(depth, 4 if not quick else 2, pool_at=pool_at,
                                           share_at=share_at),
                            **fields(embed_dim=width, pool_width_factor=1))
            runs.append({"arm": "pool", "variant": variant, "spec": spec})
    return runs


def inference_images_per_s(spec: ArchSpec, *, batch: int = 64, repeats: int = 5) -> float:
    """Median images/s of the eval forward pass (1 torch thread), for the pool arm."""
    import spvit

    torch.set_num_threads(1)
    model = spvit.create_model(spec, seed=0).eval()
    x = torch.randn(batch, spec.in_chans, spec.img_size, spec.img_size,
                    generator=torch.Generator().manual_seed(0))
    times = []
    with torch.inference_mode():
        model(x)
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    return batch / statistics.median(times)


def _run_one(job: dict[str, Any]) -> dict[str, Any]:
    """One training run in a worker process; returns the result entry."""
    from launch.trial import run_candidate
    from search_spaces.training import TrainingConfig

    spec = ArchSpec.from_dict(job["spec"])
    training = TrainingConfig.from_dict(job["training"])
    start = time.perf_counter()
    epochs = training.epochs
    while True:
        curve: list[float] = []
        with tempfile.TemporaryDirectory(prefix="claims_") as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            last = run_candidate(spec, training.replace(epochs=epochs), Path(tmp) / "trial",
                                 path="inprocess", resume=False,
                                 on_epoch=lambda m, c=curve: c.append(m["val_acc"]))
        flat = plateaued(curve, job.get("plateau", 0.005))
        if flat or 2 * epochs > job.get("max_epochs", epochs):
            break
        epochs *= 2
    cost = estimate(spec)
    out = {k: job[k] for k in ("arm", "variant", "seed", "epochs", "dataset")}
    out.update({
        "trained_epochs": epochs,
        "plateaued": flat,
        "train_subset": training.train_subset,
        "acc": last.get("test_acc", last["val_acc"]),
        "acc_split": "test" if "test_acc" in last else "val",
        "val_curve": curve,
        "params": cost.params,
        "gflops": cost.gflops,
        "train_images_per_s": last["images_per_s"],
        "wall_s": time.perf_counter() - start,
    })
    return out


def _key(entry: dict[str, Any]) -> str:
    subset = entry.get("train_subset") or entry.get("training", {}).get("train_subset")
    return (f"{entry['dataset']}|{entry['arm']}|{entry['variant']}|{entry['seed']}|"
            f"{entry['epochs']}" + (f"|n{subset}" if subset else ""))


def _mean_std(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def summarise(results: list[dict[str, Any]]) -> str:
    """Markdown tables: per arm and variant, accuracy mean ± std over seeds and the mean curve."""
    lines = []
    groups: dict[tuple[str, str], dict[str, list[dict[str, Any]]]] = {}
    for r in results:
        groups.setdefault((r["dataset"], r["arm"]), {}).setdefault(r["variant"], []).append(r)
    for (dataset, arm), variants in groups.items():
        extra = " | GFLOPs | infer img/s" if arm == "pool" else ""
        split = next(iter(variants.values()))[0]["acc_split"]
        lines += [f"### {arm} on {dataset}", "",
                  f"| variant | seeds | epochs | params | acc ({split}) | mean val curve{extra} |",
                  "|---|---|---|---|---|---|" + ("---|---|" if extra else "")]
        for variant, runs in variants.items():
            accs = [r["acc"] for r in runs]
            n = min(len(r["val_curve"]) for r in runs)
            curve = " ".join(f"{statistics.mean(r['val_curve'][e] for r in runs):.3f}"
                             for e in range(n))
            trained = sorted({r.get("trained_epochs", r["epochs"]) for r in runs})
            flat = sum(bool(r.get("plateaued", True)) for r in runs)
            epochs = "/".join(str(e) for e in trained) + (
                f" ({flat}/{len(runs)} flat)" if any("plateaued" in r for r in runs) else "")
            row = (f"| {variant} | {len(runs)} | {epochs} | {runs[0]['params']:,} |"
                   f" {_mean_std(accs)} | {curve} |")
            if arm == "pool":
                ips = statistics.median(r["infer_images_per_s"] for r in runs)
                row += f" {runs[0]['gflops']:.4f} | {ips:,.0f} |"
            lines.append(row)
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke run: tiny models, 1 seed, 1 epoch, 2 variants per arm")
    p.add_argument("--arms", default="priors,init,pool",
                   help="comma-separated subset of priors,init,pool")
    p.add_argument("--variants", default=None,
                   help="comma-separated variants to keep, e.g. impulse3/h2,mimetic/h2")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--jobs", type=int, default=2, help="runs trained at once (one core each)")
    p.add_argument("--out", default="bench_claims")
    p.add_argument("--cifar", default=None, help="CIFAR-10 python folder: priors arm there too")
    p.add_argument("--dataset", default="digits", choices=("digits", "fashion-mnist"),
                   help="the data of every arm (fashion-mnist: search_spaces/fashion.yaml)")
    p.add_argument("--train-subset", type=int, default=None,
                   help="train on a stratified subset of this many training images")
    p.add_argument("--patch", type=int, default=4, choices=(2, 4),
                   help="fashion-mnist patch size: 4 (7x7 tokens) or 2 (14x14)")
    p.add_argument("--max-epochs", type=int, default=None,
                   help="retrain a run whose validation curve still rises with 2x the epochs,"
                        " up to this many (default: --epochs, a fixed budget)")
    p.add_argument("--plateau", type=float, default=0.005,
                   help="largest validation gain over a curve's last quarter that counts as flat")
    args = p.parse_args(argv)
    arms = [a for a in args.arms.split(",") if a]
    bad = [a for a in arms if a not in ("priors", "init", "pool")]
    if bad or args.seeds < 1 or args.epochs < 1 or args.jobs < 1:
        print(f"claims: --arms must be a subset of priors,init,pool (got {bad or arms}) and"
              " --seeds/--epochs/--jobs >= 1. Fix the arguments.", file=sys.stderr)
        return 2
    if args.max_epochs is not None and args.max_epochs < args.epochs:
        print(f"claims: --max-epochs must be >= --epochs ({args.epochs}), but got"
              f" {args.max_epochs}. Raise --max-epochs or drop it.", file=sys.stderr)
        return 2
    seeds, epochs = (1, 1) if args.quick else (args.seeds, args.epochs)

    plan_args: dict[str, Any] = {}
    if args.dataset == "fashion-mnist":
        datasets = [("fashion-mnist", SearchSpace.load(ROOT / "search_spaces" / "fashion.yaml"))]
        plan_args = {"patch_size": args.patch, "depth": 4}
    else:
        datasets = [("digits", SearchSpace.load(ROOT / "search_spaces" / "digits.yaml"))]
    if args.cifar:
        cifar = SearchSpace.load(ROOT / "search_spaces" / "cifar.yaml", check_feasible=False)
        datasets.append((f"cifar10:{args.cifar}", cifar))
    jobs = []
    for dataset, space in datasets:
        training = space.training.replace(epochs=epochs, bf16=False,
                                          train_subset=args.train_subset)
        if not dataset.startswith("cifar"):
            training = training.replace(dataset=space.training.dataset)
        else:
            training = training.replace(dataset=dataset, train_subset=None)
        own = not dataset.startswith("cifar")
        for run in plan(space, arms if own else ["priors"], quick=args.quick,
                        **(plan_args if own else {})):
            if args.variants and run["variant"] not in args.variants.split(","):
                continue
            for seed in range(seeds):
                jobs.append({"arm": run["arm"], "variant": run["variant"], "seed": seed,
                             "epochs": epochs, "dataset": dataset.split(":")[0],
                             "max_epochs": 1 if args.quick else (args.max_epochs or epochs),
                             "plateau": args.plateau,
                             "spec": run["spec"].to_dict(),
                             "training": training.replace(seed=seed).to_dict()})

    # Seed-major order: an invocation stopped part-way leaves every variant with the same seeds.
    jobs.sort(key=lambda j: j["seed"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else []
    done = {_key(r) for r in results}
    todo = [j for j in jobs if _key(j) not in done]
    print(f"claims: {len(jobs)} runs ({len(todo)} to train), {epochs} epochs, {seeds} seeds,"
          f" {args.jobs} at once -> {out}", flush=True)
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
        for entry in pool.map(_run_one, todo):
            results.append(entry)
            atomic_write_text(results_file, json.dumps(results, indent=1))
            print(f"  {entry['arm']:6s} {entry['variant']:22s} seed {entry['seed']}:"
                  f" acc {entry['acc']:.3f} ({entry['wall_s']:.0f} s)", flush=True)
    # Inference speed after training, one model at a time (no run of ours competes for a core).
    specs = {(j["arm"], j["variant"]): j["spec"] for j in jobs}
    speed: dict[str, float] = {}
    for r in results:
        if r["arm"] == "pool" and "infer_images_per_s" not in r and \
                (r["arm"], r["variant"]) in specs:
            if r["variant"] not in speed:
                spec = ArchSpec.from_dict(specs[(r["arm"], r["variant"])])
                speed[r["variant"]] = inference_images_per_s(spec)
            r["infer_images_per_s"] = speed[r["variant"]]
    if speed:
        atomic_write_text(results_file, json.dumps(results, indent=1))
    wall = time.perf_counter() - start
    keys = {_key(j) for j in jobs}
    text = summarise([r for r in results if _key(r) in keys])
    atomic_write_text(out / "summary.md", text + f"\nwall time of this invocation: {wall:.0f} s\n")
    print(text)
    print(f"wall time: {wall:.0f} s ({math.ceil(wall / 60)} min)")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    raise SystemExit(main())
