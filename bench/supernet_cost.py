"""What one sandwich step of the supernet costs against stand-alone steps of its largest subnet.

One optimizer step of supernet training (`launch.supernet`) trains R + 2 subnets on one batch:
the largest, the smallest and R random ones (`nas.oneshot.SandwichSampler`), DeepSpeed
accumulating their gradients. Its honest price is R + 2 stand-alone steps of the largest
subnet (what a trial of that architecture does per batch): the sandwich's smaller subnets
should make it cheaper, the shared weights' slicing and the full supernet's optimizer step
dearer. Target: sandwich step <= 1.1 x (R + 2) largest-subnet steps.

Three arms, each a DeepSpeed engine built as the trainer and the trials build theirs (the
space's recipe, one in-process worker, `--threads` torch threads), timed on the recipe's first
training batch, interleaved over `--rounds` so that load on a shared machine hits all alike:

* `sandwich`: the trainer's step (largest on the labels, the others distilled from it);
* `supernet_largest_only`: the same step with the largest subnet R + 2 times (weight sharing's
  own overhead, without the mix of sizes);
* `standalone_largest`: `spvit.create_model(largest)` trained R + 2 steps (one optimizer step
  each).

    PYTHONPATH=. .venv/bin/python bench/supernet_cost.py --space search_spaces/digits.yaml \
        --out bench_runs/supernet_cost
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _engine(model: Any, training: Any, *, accumulation: int, micro: int) -> Any:
    import deepspeed
    from timm.optim import param_groups_weight_decay

    from nas.ds_config import build_ds_config

    ds_config = build_ds_config(training, world_size=1, steps_per_epoch=10_000)
    ds_config["gradient_accumulation_steps"] = accumulation
    ds_config["train_batch_size"] = micro * accumulation
    groups = param_groups_weight_decay(model, training.weight_decay,
                                       no_weight_decay_list=model.no_weight_decay())
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups,
                                           config=ds_config, dist_init_required=False)
    engine.train()
    return engine


def measure(space: Any, *, random_subnets: int = 2, steps: int = 20, warmup: int = 3,
            rounds: int = 3, threads: int = 1) -> dict[str, Any]:
    """Seconds per step of each arm (median over `rounds` x `steps`) and the cost ratio."""
    import torch
    import torch.nn.functional as F

    import spvit
    from launch.worker import ensure_local_process_group
    from nas.oneshot import SandwichSampler, finetune_batches, supernet_choices
    from spvit.supernet import SPViTSupernet

    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    torch.set_num_threads(threads)
    ensure_local_process_group("gloo")
    training = space.training
    sampler = SandwichSampler(space, seed=training.seed, random_subnets=random_subnets)
    per_step = sampler.per_step
    images, labels = finetune_batches(space, 1)[0]
    micro = images.shape[0]
    supernet = _engine(SPViTSupernet(supernet_choices(space), seed=training.seed), training,
                       accumulation=per_step, micro=micro)
    largest = _engine(spvit.create_model(sampler.largest, seed=training.seed), training,
                      accumulation=1, micro=micro)

    def supernet_step(specs: list[Any]) -> None:
        teacher = None
        for spec in specs:
            supernet.module.set_active(spec)
            logits = supernet(images)
            if teacher is None:
                loss = F.cross_entropy(logits.float(), labels,
                                       label_smoothing=training.label_smoothing)
                teacher = logits.detach().float().softmax(-1)
            else:
                loss = -(teacher * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()
            loss.item()  # the trainer checks every subnet's loss
            supernet.backward(loss)
            supernet.step()

    def standalone_steps() -> None:
        for _ in range(per_step):
            loss = F.cross_entropy(largest(images).float(), labels,
                                   label_smoothing=training.label_smoothing)
            loss.item()
            largest.backward(loss)
            largest.step()

    counter = iter(range(1, 10**9))
    arms = {
        "sandwich": lambda: supernet_step(sampler.step(1, next(counter))),
        "supernet_largest_only": lambda: supernet_step([sampler.largest] * per_step),
        "standalone_largest": standalone_steps,
    }
    times: dict[str, list[float]] = {name: [] for name in arms}
    for run in arms.values():
        for _ in range(warmup):
            run()
    for _ in range(rounds):
        for name, run in arms.items():
            for _ in range(steps):
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
    result: dict[str, Any] = {
        "space": space.name, "random_subnets": random_subnets, "subnets_per_step": per_step,
        "batch": micro, "threads": threads, "steps_timed": steps * rounds,
        "largest": sampler.largest.to_flat(), "smallest": sampler.smallest.to_flat()}
    for name, ts in times.items():
        med = statistics.median(ts)
        result[name] = {"s_per_step": med, "s_per_step_mean": statistics.fmean(ts),
                        # each arm's step trains on `per_step` x the batch; a sandwich step
                        # sees each image once per subnet
                        "batch_images_per_s": micro / med,
                        "subnet_images_per_s": micro * per_step / med}
    largest_s = result["standalone_largest"]["s_per_step"]  # = per_step stand-alone steps
    result["ratio_sandwich_over_standalone"] = result["sandwich"]["s_per_step"] / largest_s
    result["ratio_largest_only_over_standalone"] = (
        result["supernet_largest_only"]["s_per_step"] / largest_s)
    result["target"] = 1.1
    result["met"] = result["ratio_sandwich_over_standalone"] <= 1.1
    return result


def main(argv: list[str] | None = None) -> int:
    from search_spaces.space import SearchSpace

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", default=str(ROOT / "search_spaces" / "digits.yaml"))
    parser.add_argument("--out", default="bench_out/supernet_cost")
    parser.add_argument("--random-subnets", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per arm and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a worker's)")
    args = parser.parse_args(argv)
    space = SearchSpace.load(args.space)
    result = measure(space, random_subnets=args.random_subnets, steps=args.steps,
                     warmup=args.warmup, rounds=args.rounds, threads=args.threads)
    from spvit.io import atomic_write_text

    out = Path(args.out)
    path = atomic_write_text(out / "supernet_cost.json", json.dumps(result, indent=2))
    for name in ("sandwich", "supernet_largest_only", "standalone_largest"):
        r = result[name]
        print(f"{name:>22}: {r['s_per_step'] * 1e3:.1f} ms per step"
              f" ({r['batch_images_per_s']:.0f} batch images/s)")
    print(f"sandwich / ({result['subnets_per_step']} stand-alone largest steps):"
          f" {result['ratio_sandwich_over_standalone']:.2f} (target <= 1.1:"
          f" {'met' if result['met'] else 'not met'}); largest only:"
          f" {result['ratio_largest_only_over_standalone']:.2f}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
