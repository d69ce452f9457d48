"""Merge the parts of bench/gpu_check.sh into `gpu_check.json` and a markdown table
`gpu_check.md`, and set the check's exit code.

Exit code: 0 every part ran and every target was met; 1 a part failed, timed out or was skipped,
or fused and eager differ in fp32; 3 everything ran but a performance target was missed. With
`--cpu-smoke` only the parts' success counts (no GPU targets).

    python bench/gpu_report.py --parts WORK_DIR --out OUT_DIR [--cpu-smoke]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from gpu_common import write_json, write_text

PARTS = ("kernels", "model", "trial", "search")
LAYER_TARGET = 1.3


def _load(parts: Path, name: str) -> dict[str, Any]:
    path = parts / f"{name}.json"
    rc_path = parts / f"{name}.rc"
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    why = "no result written"
    if rc_path.is_file():
        rc = rc_path.read_text(encoding="utf-8").strip()
        why = (f"stopped at its time limit (exit {rc})" if rc.split()[0] in ("124", "137")
               else f"exited {rc} without a result")
    return {"part": name, "status": "failed", "reason": why}


def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e5):
        return f"{x:.2e}"
    return f"{x:.{digits}f}"


def _not_run(part: dict[str, Any]) -> str:
    return f"not run ({part['status']}: {part.get('reason') or 'see log'})"


def summarise(data: dict[str, dict[str, Any]], smoke: bool) -> tuple[list[list[str]], int]:
    """Rows `[check, value, target, verdict]` and the exit code."""
    rows: list[list[str]] = []
    failed = any(p["status"] != "ok" for p in data.values())
    missed = False

    def verdict(ok: bool, gate: bool = False, perf: bool = False) -> str:
        nonlocal missed, failed
        if smoke:
            if perf:
                return "n/a (CPU smoke)"
            return "PASS" if ok else "MISS (CPU smoke, not a target)"
        if not ok:
            if gate:
                failed = True
            else:
                missed = True
        return "PASS" if ok else "MISS"

    k = data["kernels"]
    eq = k.get("equality")
    if eq:
        fp32 = eq["fp32"]
        worst = max(fp32.values(), key=lambda r: r["max_abs_diff"])
        what = "forward + gradients" if eq["gradients"] else "forward (CPU)"
        rows.append([f"fused = eager, fp32, {what}",
                     f"max abs diff {_fmt(worst['max_abs_diff'])}",
                     "≤ 1e-5 + 1e-5·\\|eager\\| per element", verdict(eq["fp32_pass"], gate=True)])
        bf = eq["bf16"]
        worst_rel = max(r["rel_diff_vs_eager"] for r in bf.values())
        rows.append([f"fused vs eager, bf16, {what}", f"max ‖Δ‖/‖eager‖ {_fmt(worst_rel)}",
                     "≤ 1e-3", verdict(eq["bf16_pass"])])
        fe = max(r["fused_rel_error_vs_fp32"] for r in bf.values())
        ee = max(r["eager_rel_error_vs_fp32"] for r in bf.values())
        rows.append(["bf16 accuracy against fp32 on the same weights",
                     f"fused {_fmt(fe)}, eager {_fmt(ee)} (worst tensor)",
                     "fused ≤ 1.25 × eager", verdict(eq["bf16_fused_at_least_as_accurate"])])
    else:
        rows.append(["fused = eager (fp32, bf16)", _not_run(k), "", "not run"])
    timing = k.get("timing")
    if timing and timing["ratios"]:
        for r in timing["ratios"]:
            if r["kind"] == "layer":
                rows.append([f"SP-SA layer fwd+bwd, N = {r['tokens']}: fused / flash SDPA",
                             f"{_fmt(r['fused_over_flash'], 2)}× (eager"
                             f" {_fmt(r['eager_over_flash'], 2)}×)",
                             f"≤ {LAYER_TARGET}×",
                             verdict(r["fused_over_flash"] <= LAYER_TARGET, perf=True)])
            else:
                rows.append([f"attention core fwd+bwd, N = {r['tokens']}: fused / flash SDPA",
                             f"{_fmt(r['fused_over_flash'], 2)}× (eager"
                             f" {_fmt(r['eager_over_flash'], 2)}×)", "(no target)", "-"])
    else:
        why = (timing or {}).get("note") or _not_run(k)
        rows.append(["SP-SA layer fwd+bwd: fused / flash SDPA", why, f"≤ {LAYER_TARGET}×",
                     "not run"])

    m = data["model"]
    if m["status"] == "ok":
        by = {r["name"]: r for r in m["rows"]}
        ours, deit = by["spvit_s"]["images_per_s"], by["deit_small_patch16_224"]["images_per_s"]
        rows.append([f"spvit_s / DeiT-S train images/s (batch {m['rows'][0]['batch']})",
                     f"{_fmt(m['spvit_s_over_deit_s'], 2)}× ({_fmt(ours, 1)} vs {_fmt(deit, 1)}"
                     " img/s)",
                     "≥ 0.8×", verdict(m["pass"], perf=True)])
    else:
        rows.append(["spvit_s / DeiT-S train images/s", _not_run(m), "≥ 0.8×", "not run"])

    t = data["trial"]
    if t["status"] == "ok":
        last = t["last_epoch"]
        rows.append([f"Ray Train trial, 1 worker, {t['backend']}, digits",
                     f"{t['seconds']} s, val_acc {_fmt(last['val_acc'])}", "finishes",
                     "PASS"])
    else:
        rows.append(["Ray Train trial, 1 worker, digits", _not_run(t), "finishes", "not run"])
    s = data["search"]
    if s["status"] == "ok":
        rows.append(["search, 3 trials, --gpus-per-worker " + ("0" if smoke else "1"),
                     f"{s['seconds']} s, {s['trials_finished']} trials finished", "finishes",
                     "PASS"])
    else:
        rows.append(["search, 3 trials", _not_run(s), "finishes", "not run"])
    code = 1 if failed else (3 if missed else 0)
    return rows, code


def _timing_table(data: dict[str, dict[str, Any]]) -> list[str]:
    timing = data["kernels"].get("timing")
    lines = []
    if timing and timing["rows"]:
        lines += ["", "| variant | N | batch | dtype | fwd+bwd ms | peak MiB |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for r in timing["rows"]:
            ms = _fmt(r["fwd_bwd_ms"]) if not r.get("error") else f"failed: {r['error'][:120]}"
            lines.append(f"| {r['name']} | {r['tokens']} | {r['batch']} | {r['dtype']} |"
                         f" {ms} | {_fmt(r['peak_mib'], 1)} |")
    m = data["model"]
    if m["status"] == "ok":
        lines += ["", "| model | batch | ms/step | images/s | peak MiB | SP-SA paths |",
                  "| --- | --- | --- | --- | --- | --- |"]
        paths = {"spvit_s": m.get("spvit_s_paths"), "spvit_s (all eager)":
                 m.get("spvit_s_eager_paths")}
        for r in m["rows"]:
            p = paths.get(r["name"])
            lines.append(f"| {r['name']} | {r['batch']} | {_fmt(r['step_ms'], 2)} |"
                         f" {_fmt(r['images_per_s'], 1)} | {_fmt(r['peak_mib'], 1)} |"
                         f" {json.dumps(p) if p else '-'} |")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", required=True, help="folder with the parts' JSON files")
    p.add_argument("--out", required=True, help="where gpu_check.json and gpu_check.md go")
    p.add_argument("--cpu-smoke", action="store_true")
    args = p.parse_args()
    parts, out = Path(args.parts), Path(args.out)
    data = {name: _load(parts, name) for name in PARTS}
    rows, code = summarise(data, args.cpu_smoke)
    device = next((d["device"] for d in data.values() if d.get("device")), {})
    title = "CPU smoke (no GPU numbers)" if args.cpu_smoke else (device.get("gpu") or "no GPU")
    md = [f"# GPU check: {title}", "",
          f"{device.get('date_utc', '?')} UTC, torch {device.get('torch', '?')}, CUDA"
          f" {device.get('cuda')}, {device.get('cpus')} CPUs; exit code {code}", "",
          "| check | value | target | verdict |", "| --- | --- | --- | --- |"]
    md += [f"| {' | '.join(r)} |" for r in rows]
    md += _timing_table(data)
    for name, part in data.items():
        if part["status"] != "ok":
            md += ["", f"{name}: {part['status']}: {part.get('reason')}"]
    write_json(out / "gpu_check.json", {"cpu_smoke": args.cpu_smoke, "exit_code": code,
                                        "device": device, "summary": rows, "parts": data})
    write_text(out / "gpu_check.md", "\n".join(md) + "\n")
    print("\n".join(md))
    return code


if __name__ == "__main__":
    sys.exit(main())
