"""Training throughput on one GPU: a full `spvit_s` train step against timm's
`deit_small_patch16_224` at the same batch.

One step = forward, label-smoothed cross-entropy, backward, AdamW step, under bf16 autocast (fp32
weights), drop-path 0.1 in both models, random 224 px images (the data pipeline is not timed).
Reported: images/s from the median step time (CUDA events) after warm-up, peak memory of one
step, and which attention path each SP-SA layer took. `spvit_s` runs twice: with the default
path choice (fused on CUDA) and with every layer forced eager, to show what the fused path buys.
Target: `spvit_s` (default) >= 0.8 x DeiT-S images/s.

    python bench/gpu_model.py --out model.json             # batch 64 on cuda:0
    python bench/gpu_model.py --out model.json --cpu-smoke   # 32 px, batch 2, on the CPU
"""

from __future__ import annotations

import argparse
from contextlib import nullcontext
from typing import Any

import timm
import torch
import torch.nn.functional as F
from gpu_common import SkipPart, median_ms, peak_memory_mib, run_part

import spvit
from spvit import flex
from spvit.attention import Attention, set_attention_backend

TARGET_RATIO = 0.8


def _paths(model: torch.nn.Module, device: torch.device) -> dict[str, int]:
    """How many SP-SA layers (with a prior) take each path on `device`."""
    counts = {"fused": 0, "eager": 0, "no_prior": 0}
    for m in model.modules():
        if isinstance(m, Attention):
            key = "no_prior" if m.prior is None else flex.resolve_backend(m.backend, device,
                                                                            m.head_dim)
            counts[key] += 1
    return counts


def _bench(name: str, model: torch.nn.Module, *, batch: int, img: int, device: torch.device,
           warmup: int, repeats: int) -> dict[str, Any]:
    model = model.to(device).train()
    fused_adam = {"fused": True} if device.type == "cuda" else {}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, **fused_adam)
    g = torch.Generator(device=device).manual_seed(0)
    images = [torch.randn(batch, 3, img, img, device=device, generator=g) for _ in range(2)]
    labels = [torch.randint(0, 1000, (batch,), device=device, generator=g) for _ in range(2)]
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else nullcontext())
    turn = [0]

    def step():
        i = turn[0] % 2
        turn[0] += 1
        with autocast:
            logits = model(images[i])
        loss = F.cross_entropy(logits.float(), labels[i], label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    ms = median_ms(step, device, warmup=warmup, repeats=repeats)
    row = {"name": name, "batch": batch, "img_size": img, "step_ms": ms,
           "images_per_s": batch / (ms / 1e3), "peak_mib": peak_memory_mib(step, device),
           "params_m": sum(p.numel() for p in model.parameters()) / 1e6}
    print(f"  {name:22s} {ms:9.2f} ms/step {row['images_per_s']:9.1f} img/s", flush=True)
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="result JSON")
    p.add_argument("--cpu-smoke", action="store_true", help="32 px, batch 2, on the CPU")
    p.add_argument("--batch", type=int, default=None, help="images per step (default 64)")
    p.add_argument("--repeats", type=int, default=None, help="timed steps (median)")
    args = p.parse_args()

    def body(result: dict[str, Any]) -> None:
        if args.cpu_smoke:
            device, img, batch, warmup = torch.device("cpu"), 32, args.batch or 2, 1
            torch.set_num_threads(1)
        elif not torch.cuda.is_available():
            raise SkipPart("no CUDA device (run with --cpu-smoke on a CPU machine)")
        else:
            device, img, batch, warmup = torch.device("cuda", 0), 224, args.batch or 64, 3
        repeats = args.repeats or (2 if args.cpu_smoke else 10)
        spec = spvit.resolve_arch("spvit_s").replace(img_size=img, drop_path_rate=0.1)
        rows = []
        model = spvit.create_model(spec, seed=0)
        result["spvit_s_paths"] = _paths(model, device)
        rows.append(_bench("spvit_s", model, batch=batch, img=img, device=device,
                           warmup=warmup, repeats=repeats))
        set_attention_backend(model, "eager")
        result["spvit_s_eager_paths"] = _paths(model, device)
        rows.append(_bench("spvit_s (all eager)", model, batch=batch, img=img, device=device,
                           warmup=warmup, repeats=repeats))
        del model
        deit = timm.create_model("deit_small_patch16_224", pretrained=False, img_size=img,
                                 drop_path_rate=0.1)
        rows.append(_bench("deit_small_patch16_224", deit, batch=batch, img=img, device=device,
                           warmup=warmup, repeats=repeats))
        result["rows"] = rows
        by = {r["name"]: r for r in rows}
        ratio = by["spvit_s"]["images_per_s"] / by["deit_small_patch16_224"]["images_per_s"]
        result["spvit_s_over_deit_s"] = ratio
        result["target"] = TARGET_RATIO
        result["pass"] = ratio >= TARGET_RATIO

    return run_part("model", args.out, body)


if __name__ == "__main__":
    raise SystemExit(main())
