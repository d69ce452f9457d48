"""SP-SA on CPU: a whole training step of a small SP-ViT with each prior family against the same
model without priors, on the CPU kernel path (`SPVIT_ATTENTION=cpu`, the default on CPU) and on
the eager path (`eager`, the formula as written: `(B, H, N, N)` logits, softmax, matmul), and the
peak memory of a step.

Model: `ArchSpec.uniform(depth=4, heads=4, prior=family)`, width 64, patch 4, average-pool head (no
class token, so N = grid²), batch 64, AdamW; the grid is set through the image size. Per grid and
thread count, every (family, path) model runs one step per round, rounds interleaved so that
load from other processes hits every candidate alike; times are medians over rounds and ratios
are taken against `none` of the same rounds. Memory: each (grid, family, path) runs in a fresh
interpreter and runs three steps; it reports the process's peak RSS and that peak less the RSS
before the first step (the step's working set: activations, gradients, optimizer state), both
against `none`.

    .venv/bin/python bench/spsa_cpu.py                    # 14, 8, 7 grids; 1 and 2 threads
    .venv/bin/python bench/spsa_cpu.py --grids 14 --threads 1 --rounds 9
    .venv/bin/python bench/spsa_cpu.py --profile mlp      # where a 14x14 step's time goes
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import spvit  # noqa: E402
from spvit.attention import set_attention_backend  # noqa: E402

FAMILIES = ("none", "mlp", "gaussian", "axial", "rpb", "decay")
ADDITIVE = ("rpb", "decay")
PATHS = ("cpu", "eager")
PATCH = 4


def _spec(family: str, grid: int) -> spvit.ArchSpec:
    return spvit.ArchSpec.uniform(depth=4, heads=4, prior=family, embed_dim=64,
                                  img_size=grid * PATCH, patch_size=PATCH, num_classes=10,
                                  head="avg")


def _train_step(family: str, path: str, grid: int, batch: int, seed: int = 0):
    """A closure running one forward + backward + AdamW step of the model."""
    model = spvit.create_model(_spec(family, grid), seed=seed)
    set_attention_backend(model, path)
    if family != "none":  # trained-looking priors: not the identity
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".prior." in name:
                    p.add_(torch.randn(p.shape, generator=g) * 0.1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    side = grid * PATCH
    x = torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 10, (batch,), generator=torch.Generator().manual_seed(2))

    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def time_grid(grid: int, threads: int, batch: int, rounds: int, paths: tuple[str, ...]
              ) -> dict[str, dict[str, float]]:
    """Median wall and CPU seconds of a step per `family/path`, interleaved rounds."""
    torch.set_num_threads(threads)
    steps = {"none": _train_step("none", "cpu", grid, batch)}
    for family in FAMILIES[1:]:
        for path in paths:
            steps[f"{family}/{path}"] = _train_step(family, path, grid, batch)
    for step in steps.values():  # warm-up: allocations, the kernel build
        step()
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            wall, cpu = time.perf_counter(), time.process_time()
            step()
            samples[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    return {name: {"wall": statistics.median(w for w, _ in s),
                   "cpu": statistics.median(c for _, c in s),
                   "wall_min": min(w for w, _ in s)} for name, s in samples.items()}


def _status_bytes(field: str) -> int:
    """`VmRSS` (now) or `VmHWM` (peak) of this process. The peak of /proc is this address
    space's own; `getrusage`'s ru_maxrss would carry over the parent's peak through fork+exec."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def memory_child(family: str, path: str, grid: int, batch: int) -> None:
    """Runs in a fresh interpreter: prints the peak RSS over three steps, and that peak less the
    RSS once the model, optimizer and batch exist (the training step's working set)."""
    torch.set_num_threads(1)
    step = _train_step(family, path, grid, batch)
    built = _status_bytes("VmRSS")
    for _ in range(3):
        step()
    peak = _status_bytes("VmHWM")
    print(json.dumps({"peak": peak, "step": peak - built}))


def measure_memory(grid: int, batch: int, paths: tuple[str, ...]) -> dict[str, dict[str, int]]:
    out = {}
    for family in FAMILIES:
        for path in (("cpu",) if family == "none" else paths):
            cmd = [sys.executable, __file__, "--memory-child", family, path, str(grid),
                   str(batch)]
            res = subprocess.run(cmd, check=True, capture_output=True, text=True)
            out[family if family == "none" else f"{family}/{path}"] = json.loads(
                res.stdout.strip().splitlines()[-1])
    return out


def profile(family: str, path: str, grid: int, batch: int, threads: int) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    torch.set_num_threads(threads)
    step = _train_step(family, path, grid, batch)
    step()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
        step()
    print(f"\nprofile: {family}/{path}, grid {grid}x{grid}, batch {batch}, {threads} thread(s),"
          " two steps")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))


def _print_times(grid: int, threads: int, rows: dict[str, dict[str, float]], batch: int,
                 rounds: int) -> None:
    base = rows["none"]
    print(f"\ntrain step, grid {grid}x{grid} (N={grid * grid}), batch {batch}, {threads}"
          f" thread(s), median of {rounds} interleaved rounds")
    print(f"{'family/path':18s} {'wall ms':>9s} {'ratio':>7s} {'cpu ms':>9s} {'ratio':>7s}"
          f" {'target':>7s}")
    for name, r in rows.items():
        family, _, path = name.partition("/")
        target = "" if family == "none" or path != "cpu" else (
            "1.10x" if family in ADDITIVE else "1.30x")
        print(f"{name:18s} {r['wall'] * 1e3:9.1f} {r['wall'] / base['wall']:6.2f}x"
              f" {r['cpu'] * 1e3:9.1f} {r['cpu'] / base['cpu']:6.2f}x {target:>7s}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--memory-child":
        family, path, grid, batch = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
        memory_child(family, path, grid, batch)
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--grids", type=int, nargs="+", default=[14, 8, 7])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5, help="interleaved timed rounds (median)")
    p.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--skip-time", action="store_true")
    p.add_argument("--memory-grid", type=int, default=14)
    p.add_argument("--profile", metavar="FAMILY", help="profile two steps of FAMILY instead")
    p.add_argument("--profile-path", default="cpu", choices=PATHS)
    p.add_argument("--json", type=Path, help="also write every number here")
    args = p.parse_args()
    if args.profile:
        for threads in args.threads:
            profile(args.profile, args.profile_path, args.grids[0], args.batch, threads)
        return
    from spvit import cpu_attention
    print(f"torch {torch.__version__}, CPU kernel: {cpu_attention.kernel_available()}"
          f" ({cpu_attention.kernel_error() or 'built'}), load average {os.getloadavg()[0]:.1f}")
    results: dict[str, object] = {}
    for grid in [] if args.skip_time else args.grids:
        for threads in args.threads:
            rows = time_grid(grid, threads, args.batch, args.rounds, tuple(args.paths))
            results[f"time/{grid}/{threads}"] = rows
            _print_times(grid, threads, rows, args.batch, args.rounds)
    if not args.skip_memory:
        mem = measure_memory(args.memory_grid, args.batch, tuple(args.paths))
        results[f"memory/{args.memory_grid}"] = mem
        base = mem["none"]
        print(f"\npeak memory of a train step, grid {args.memory_grid}x{args.memory_grid}, batch"
              f" {args.batch}, 1 thread (fresh process each)")
        print(f"{'family/path':18s} {'peak RSS MB':>12s} {'ratio':>7s} {'step MB':>9s}"
              f" {'ratio':>7s}")
        for name, m in mem.items():
            print(f"{name:18s} {m['peak'] / 2**20:12.0f} {m['peak'] / base['peak']:6.2f}x"
                  f" {m['step'] / 2**20:9.0f} {m['step'] / max(base['step'], 1):6.2f}x")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
