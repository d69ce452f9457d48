"""A trial's training images/s against a bare PyTorch loop over the same model, data and batch.

Three ways to train one epoch of the same architecture on the same training split, interleaved
round by round (`--rounds`, medians reported, so machine load hits all three alike), one torch
thread each:

* `trial`: the project's trial path (`launch.trial.run_candidate`, in-process: DeepSpeed engine,
  the dataset's loaders and batched augmentation, per-step loss check, learning-rate schedule,
  gradient clipping); its `images_per_s` metric, which times the training loop only (start-up
  and evaluation excluded);
* `bare`: `for x, y in loader: loss.backward(); opt.step()` with torch's AdamW over the same
  loader (same dataset object, augmentation, batch size);
* `bare, tensors`: the same loop over batches already in memory (no loader, no augmentation): the
  floor, showing what the data path costs.

    PYTHONPATH=. .venv/bin/python bench/loop_overhead.py --dataset digits
    PYTHONPATH=. .venv/bin/python bench/loop_overhead.py --dataset fashion-mnist --subset 6400

Target: `trial` >= 0.9x `bare`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from search_spaces import SearchSpace  # noqa: E402
from spvit import ArchSpec  # noqa: E402

ARCHS = {"digits": None, "fashion-mnist": "search_spaces/archs/vit_fashion.yaml"}
SPACES = {"digits": "search_spaces/digits.yaml", "fashion-mnist": "search_spaces/fashion.yaml"}


def _spec(dataset: str, space: SearchSpace) -> ArchSpec:
    if ARCHS[dataset]:
        return ArchSpec.load(ROOT / ARCHS[dataset])
    fixed = {k: v for k, v in space.fixed.items() if k in ArchSpec.__dataclass_fields__}
    return ArchSpec.uniform(depth=3, heads=4, embed_dim=48, mlp_ratio=2.0, **fixed)


def trial_epoch(spec: ArchSpec, training) -> float:
    from launch.trial import run_candidate

    with tempfile.TemporaryDirectory(prefix="loop_") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        last = run_candidate(spec, training, Path(tmp) / "trial", path="inprocess", resume=False)
    return last["images_per_s"]


def bare_epoch(spec: ArchSpec, training, batches) -> float:
    """Images/s of `for x, y in batches: loss.backward(); opt.step()` with torch's AdamW."""
    import spvit

    model = spvit.create_model(spec, seed=training.seed).train()
    opt = torch.optim.AdamW(model.parameters(), lr=training.lr,
                            weight_decay=training.weight_decay)
    images = 0
    start = time.perf_counter()
    for x, y in batches:
        loss = F.cross_entropy(model(x), y, label_smoothing=training.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        images += y.shape[0]
    return images / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", choices=sorted(ARCHS), default="digits")
    p.add_argument("--subset", type=int, default=None,
                   help="train on this many training images (training.train_subset)")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from nas.data import build_datasets, build_loaders

    space = SearchSpace.load(ROOT / SPACES[args.dataset])
    training = space.training.replace(epochs=1, train_subset=args.subset)
    spec = _spec(args.dataset, space)
    data = build_datasets(training, spec)
    loader = build_loaders(data, micro_batch_size=training.batch_size, seed=training.seed).train
    batches = list(loader)
    results: dict[str, list[float]] = {"trial": [], "bare": [], "bare, tensors": []}
    for r in range(args.rounds):
        results["trial"].append(trial_epoch(spec, training))
        loader.dataset.set_epoch(r + 1)
        results["bare"].append(bare_epoch(spec, training, loader))
        results["bare, tensors"].append(bare_epoch(spec, training, batches))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:,.0f}" for k, v in results.items()),
              flush=True)
    bare = statistics.median(results["bare"])
    print(f"\n{args.dataset}: {spec.depth} blocks, width {spec.embed_dim}, {spec.img_size} px,"
          f" patch {spec.patch_size}, {len(data.train)} training images, batch"
          f" {training.batch_size}, 1 thread, {args.rounds} interleaved rounds (medians)")
    print("| loop | images/s | vs bare |\n|---|---|---|")
    for name, values in results.items():
        med = statistics.median(values)
        print(f"| {name} | {med:,.0f} ({min(values):,.0f}-{max(values):,.0f}) |"
              f" {med / bare:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
