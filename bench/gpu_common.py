"""Helpers shared by the parts of bench/gpu_check.sh: device timing, peak memory, the machine's
description and the atomic JSON result file each part writes.

Every part writes one JSON object `{"part", "status", "reason", "device", ...}` with `status`
`ok`, `failed` (an exception: its one-line reason) or `skipped` (what is missing); bench/
gpu_report.py turns them into the summary table. A part never reports a number it did not
measure.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` atomically (temp file + os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o644)  # results are for reading, not private
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | os.PathLike, data: dict[str, Any]) -> Path:
    """Write `data` as indented JSON to `path` atomically."""
    return write_text(path, json.dumps(data, indent=2) + "\n")


def machine() -> dict[str, Any]:
    """What ran the part: torch, CUDA, GPU name and memory, CPU count."""
    info: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(),
                            "cpus": os.cpu_count(), "cuda": torch.version.cuda,
                            "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    gpus=torch.cuda.device_count(),
                    capability=f"{props.major}.{props.minor}")
    else:
        info["gpu"] = None
    return info


def run_part(name: str, out: str | os.PathLike, body: Callable[[dict[str, Any]], None]) -> int:
    """Run `body(result)` and write `result` to `out`, whatever happens; 0 if it succeeded.

    `body` fills the dict in place, so what it measured before an error is kept.
    """
    result: dict[str, Any] = {"part": name, "status": "ok", "reason": None, "device": machine()}
    start = time.perf_counter()
    code = 0
    try:
        body(result)
    except SkipPart as e:
        result["status"], result["reason"] = "skipped", str(e)
    except Exception as e:  # recorded, not swallowed: the report and the exit code show it
        result["status"] = "failed"
        result["reason"] = f"{type(e).__name__}: {' '.join(str(e).split())}"[:2000]
        result["traceback"] = traceback.format_exc()[-4000:]
        code = 1
    result["wall_s"] = round(time.perf_counter() - start, 2)
    write_json(out, result)
    print(f"[{name}] {result['status']}" + (f": {result['reason']}" if result["reason"] else ""),
          flush=True)
    return code


class SkipPart(RuntimeError):
    """The part cannot run here (a package or the GPU is missing); the message says what."""


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], Any], device: torch.device, *, warmup: int, repeats: int) -> float:
    """Median milliseconds of `fn()` over `repeats` runs after `warmup` runs.

    CUDA: events around each run (device time, launch gaps included); CPU: the wall clock.
    """
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def peak_memory_mib(fn: Callable[[], Any], device: torch.device) -> float | None:
    """Peak CUDA memory of one `fn()` above what was allocated before it, in MiB (None on CPU)."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64 (inf if b is zero and a is not)."""
    a, b = a.detach().double(), b.detach().double()
    den = b.norm().item()
    num = (a - b).norm().item()
    return num / den if den > 0 else (0.0 if num == 0 else float("inf"))


def allclose_report(a: torch.Tensor, b: torch.Tensor, tol: float) -> dict[str, Any]:
    """Elementwise |a − b| <= tol + tol·|b| (torch.allclose with rtol = atol = tol), plus sizes."""
    a, b = a.detach().double(), b.detach().double()
    diff = (a - b).abs()
    finite = bool(torch.isfinite(a).all() and torch.isfinite(b).all())
    ok = finite and bool((diff <= tol + tol * b.abs()).all())
    return {"max_abs_diff": diff.max().item(), "rel_error": rel_error(a, b), "tol": tol,
            "pass": ok}
