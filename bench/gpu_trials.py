"""Ray parts of the GPU check: one NCCL Ray Train trial of a digits candidate, end to end, and a
3-trial search with `--gpus-per-worker 1`.

`trial`: `launch.trial.run_candidate(..., workers=1, use_gpu=True, path="ray_train")`, a Ray
Train `TorchTrainer` with one GPU worker on an nccl process group, DeepSpeed bf16, 2 epochs of the
embedded digits data; the candidate has 32-wide heads, so its SP-SA layers take the fused path
on CUDA. Checked: the trial folder holds metrics for every epoch, the consolidated weights and the
DeepSpeed config with bf16 on. `search`: `spvit-nas search --space search_spaces/digits.yaml
--trials 3 --concurrent 1 --epochs 1 --gpus-per-worker 1`; checked: exit code 0 and three trial
folders with weights. With `--cpu-smoke` both run on CPU (gloo, `--gpus-per-worker 0`).

    python bench/gpu_trials.py trial --work /tmp/w --out trial.json [--cpu-smoke]
    python bench/gpu_trials.py search --work /tmp/w --out search.json [--cpu-smoke]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from gpu_common import SkipPart, run_part

from nas.layout import RunFolder, TrialFolder
from spvit.arch import ArchSpec, BlockSpec

REPO = Path(__file__).resolve().parent.parent


def _require(*modules: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise SkipPart(f"{', '.join(missing)} not installed in {sys.executable}")


def _require_gpu(smoke: bool) -> None:
    if not smoke and not torch.cuda.is_available():
        raise SkipPart("no CUDA device (run with --cpu-smoke on a CPU machine)")


def digits_candidate() -> ArchSpec:
    """A digits-space candidate: 8x8 token grid, three prior families, heads 32 wide."""
    blocks = (BlockSpec(heads=2, prior="mlp"), BlockSpec(heads=2, prior="rpb"),
              BlockSpec(heads=2, prior=("gaussian", "axial")))
    return ArchSpec(blocks=blocks, img_size=16, patch_size=2, in_chans=1, num_classes=10,
                    embed_dim=64, mlp_ratio=2.0, stem="linear", head="avg", pos_embed="learned",
                    conv_pos=False, qkv_bias=True, drop_path_rate=0.0)


def _read_lines(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def trial(result: dict[str, Any], work: Path, smoke: bool) -> None:
    _require("ray", "deepspeed")
    _require_gpu(smoke)
    import ray

    from launch.ray_env import init_ray
    from launch.trial import run_candidate
    from nas.engine import process_group_backend
    from search_spaces.training import TrainingConfig

    use_gpu = not smoke
    epochs = 1 if smoke else 2
    training = TrainingConfig(dataset="digits", epochs=epochs, batch_size=64, bf16=True,
                              workers_per_trial=1, seed=0)
    spec = digits_candidate()
    trial_dir = work / "trial"
    result.update(arch=spec.to_flat(), training=training.to_dict(), use_gpu=use_gpu,
                  backend=process_group_backend(use_gpu), path="ray_train")
    init_ray(None, num_cpus=os.cpu_count(), num_gpus=1 if use_gpu else 0)
    try:
        result["ray_resources"] = {k: v for k, v in ray.cluster_resources().items()
                                   if k in ("CPU", "GPU")}
        start = time.perf_counter()
        last = run_candidate(spec, training, trial_dir, workers=1, use_gpu=use_gpu,
                             path="ray_train", cpus_per_worker=1.0, resume=False)
        result["seconds"] = round(time.perf_counter() - start, 2)
    finally:
        ray.shutdown()
    result["last_epoch"] = last
    folder = TrialFolder(trial_dir)
    lines = _read_lines(folder.metrics)
    ds_config = json.loads(folder.ds_config.read_text(encoding="utf-8"))
    checks = {
        "every_epoch_in_metrics": [line["epoch"] for line in lines] == list(range(1, epochs + 1)),
        "weights_written": folder.weights.is_file(),
        "ds_config_bf16": ds_config["bf16"]["enabled"] is True,
        "no_failure_file": not folder.failure.exists(),
    }
    result["checks"] = checks
    if not all(checks.values()):
        raise AssertionError(f"trial folder checks failed: {checks}")


def search(result: dict[str, Any], work: Path, smoke: bool, timeout_s: float) -> None:
    _require("ray", "deepspeed", "optuna")
    _require_gpu(smoke)
    run_dir = work / "search"
    cmd = [sys.executable, "-m", "launch.cli", "search", "--space",
           str(REPO / "search_spaces" / "digits.yaml"), "--out", str(run_dir), "--trials", "3",
           "--concurrent", "1", "--epochs", "1", "--seed", "0",
           "--gpus-per-worker", "0" if smoke else "1"]
    if smoke:
        cmd += ["--num-cpus", "2"]
    result["command"] = " ".join(cmd[1:])
    log = work / "search.log"
    start = time.perf_counter()
    with open(log, "w", encoding="utf-8") as f:
        try:
            proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                                  timeout=timeout_s, check=False)
            result["exit_code"] = proc.returncode
        except subprocess.TimeoutExpired:
            result["exit_code"] = None
    result["seconds"] = round(time.perf_counter() - start, 2)
    result["log_tail"] = log.read_text(encoding="utf-8", errors="replace")[-3000:]
    trials = []
    run = RunFolder(run_dir)
    for number in run.trial_numbers():
        folder = run.trial(number)
        lines = _read_lines(folder.metrics)
        trials.append({"trial": folder.path.name,
                       "weights": folder.weights.is_file(),
                       "val_acc": lines[-1]["val_acc"] if lines else None,
                       "startup_s": lines[-1].get("startup_s") if lines else None})
    result["trials"] = trials
    finished = sum(t["weights"] for t in trials)
    result["trials_finished"] = finished
    if result["exit_code"] is None:
        raise TimeoutError(f"the search did not finish within {timeout_s:.0f} s")
    if result["exit_code"] != 0 or finished < 3:
        raise AssertionError(f"search exited {result['exit_code']} with {finished} of 3 trials"
                             " finished; see log_tail")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("part", choices=("trial", "search"))
    p.add_argument("--out", required=True, help="result JSON")
    p.add_argument("--work", required=True, help="scratch folder for run and trial folders")
    p.add_argument("--cpu-smoke", action="store_true", help="on CPU: gloo, no GPU")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds the search may take before it is stopped (default: the part's"
                        " limit from gpu_check.sh, $GPU_CHECK_PART_LIMIT_S, less 20 s; else 300)")
    args = p.parse_args()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    if args.part == "trial":
        return run_part("trial", args.out, lambda r: trial(r, work, args.cpu_smoke))
    limit = os.environ.get("GPU_CHECK_PART_LIMIT_S")
    timeout = args.timeout or (max(30.0, float(limit) - 20.0) if limit else 300.0)
    return run_part("search", args.out, lambda r: search(r, work, args.cpu_smoke, timeout))


if __name__ == "__main__":
    raise SystemExit(main())
