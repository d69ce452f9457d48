"""Per-trial start-up cost of each training path: seconds from `run_candidate()` to the first step.

Small candidates train in seconds, so the fixed cost of starting a trial can dominate a search.
This measures the in-process path (a fresh process, then a second trial in the same process, as
Tune's reused actors see it) and the Ray Train path with one and two workers.

    .venv/bin/python bench/trial_startup.py [--out /tmp/trial_startup]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

from launch.ray_env import init_ray
from launch.trial import run_candidate
from search_spaces import TrainingConfig
from spvit import ArchSpec

CASES = [
    ("inprocess_first", dict(workers=1, path="inprocess")),
    ("inprocess_second", dict(workers=1, path="inprocess")),
    ("ray_init", None),
    ("ray_train_w1", dict(workers=1, path="ray_train", cpus_per_worker=0.5)),
    ("ray_train_w2", dict(workers=2, path="ray_train", cpus_per_worker=0.5)),
    ("ray_train_w2_again", dict(workers=2, path="ray_train", cpus_per_worker=0.5)),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="folder for the trial folders (default: temp)")
    args = parser.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="trial_startup_")
    spec = ArchSpec.uniform(depth=2, heads=2, embed_dim=32, img_size=16, patch_size=2,
                            in_chans=1, num_classes=10, head="avg")
    training = TrainingConfig(epochs=1, batch_size=64)
    rows: dict[str, dict[str, float]] = {}
    for name, kwargs in CASES:
        start = time.perf_counter()
        if kwargs is None:
            init_ray(num_cpus=2)
            rows[name] = {"total_s": round(time.perf_counter() - start, 2)}
            continue
        result = run_candidate(spec, training, f"{out}/{name}", resume=False, **kwargs)
        rows[name] = {"startup_s": round(result["startup_s"], 2),
                      "total_s": round(time.perf_counter() - start, 2),
                      "images_per_s": round(result["images_per_s"])}
        print(name, rows[name], flush=True)
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
