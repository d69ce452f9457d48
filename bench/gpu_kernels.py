"""SP-SA kernels on one GPU: the fused path (FlexAttention score function over per-offset prior
tables) against the eager path for equality, and one attention layer's forward+backward time and
peak memory against flash attention (`F.scaled_dot_product_attention`) and the eager path.

Equality (mixed heads `mlp, gaussian, axial, rpb, none, mlp`, class token + 14x14 grid, B 4, dim
384): fp32 (TF32 off) output and every gradient (input, projections, each prior parameter) within
`|fused − eager| <= 1e-5 + 1e-5·|eager|`; bf16 (module and input in bf16, as under DeepSpeed bf16)
`‖fused − eager‖ / ‖eager‖ <= 1e-3`, and the fused path's error against the fp32 computation on
the same bf16 weights is reported beside the eager path's (bf16 rounds each element to 2^-8
relative, so both sit near 1e-3).

Timing (`mlp` prior on all 6 heads, dim 384, B 64, bf16, N = 196 and 576): median of `--repeats`
forward+backward runs after warm-up (compilation excluded), CUDA events, three input sets in
turn. `layer_*` rows include the Q/K/V and output projections and the prior tables (the whole
`Attention` module); `core_*` rows start from Q, K, V. Peak memory is the allocation peak of one
forward+backward above what was allocated before it.

    python bench/gpu_kernels.py --out kernels.json            # on a CUDA machine
    python bench/gpu_kernels.py --out kernels.json --cpu-smoke  # tiny sizes, forward equality
"""

from __future__ import annotations

import argparse
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from gpu_common import SkipPart, allclose_report, median_ms, peak_memory_mib, rel_error, run_part

from spvit import flex
from spvit.attention import Attention

EQUALITY_TYPES = ("mlp", "gaussian", "axial", "rpb", "none", "mlp")


def _randomise(attn: Attention, seed: int) -> None:
    """Priors away from the identity, as after training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in attn.prior.parameters():
            p.copy_((torch.randn(p.shape, generator=g) * 0.3).to(p.dtype))


def _flash_context(device: torch.device):
    if device.type != "cuda":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.FLASH_ATTENTION)


# ---------------------------------------------------------------------- equality
def _forward_backward(attn: Attention, x: torch.Tensor, grid, prefix: int, backend: str,
                      grad_out: torch.Tensor | None) -> dict[str, torch.Tensor]:
    attn.backend = backend
    attn.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(grad_out is not None)
    with torch.set_grad_enabled(grad_out is not None):
        out, _ = attn(x, grid, prefix)
    tensors = {"out": out.detach()}
    if grad_out is not None:
        out.backward(grad_out)
        tensors["grad.x"] = x.grad
        for name, p in attn.named_parameters():
            tensors[f"grad.{name}"] = p.grad
    return tensors


def equality(result: dict[str, Any], device: torch.device, smoke: bool) -> None:
    types = EQUALITY_TYPES[:4] if smoke else EQUALITY_TYPES
    dim, side, batch = (16 * len(types), 4, 2) if smoke else (384, 14, 4)
    grid, prefix = (side, side), 1
    with_grads = device.type == "cuda"  # FlexAttention has no backward on CPU
    torch.manual_seed(0)
    base = Attention(dim, len(types), head_types=types, grid_size=side).to(device)
    _randomise(base, seed=1)
    g = torch.Generator(device=device).manual_seed(2)
    x = torch.randn(batch, prefix + side * side, dim, device=device, generator=g)
    grad_out = torch.randn(x.shape, device=device, generator=g) if with_grads else None
    rows = {}

    # fp32 (TF32 is off in matmuls and in the Triton kernel's dots: see main).
    eager = _forward_backward(base, x, grid, prefix, "eager", grad_out)
    fused = _forward_backward(base, x, grid, prefix, "fused", grad_out)
    rows["fp32"] = {name: allclose_report(fused[name], eager[name], 1e-5) for name in eager}

    # bf16 module and input; reference: the same bf16 weights and input computed in fp32.
    low = Attention(dim, len(types), head_types=types, grid_size=side).to(device)
    low.load_state_dict(base.state_dict())
    low = low.to(torch.bfloat16)
    ref_module = Attention(dim, len(types), head_types=types, grid_size=side).to(device)
    ref_module.load_state_dict({k: v.float() for k, v in low.state_dict().items()})
    xb = x.to(torch.bfloat16)
    gb = grad_out.to(torch.bfloat16) if grad_out is not None else None
    eager_b = _forward_backward(low, xb, grid, prefix, "eager", gb)
    fused_b = _forward_backward(low, xb, grid, prefix, "fused", gb)
    ref = _forward_backward(ref_module, xb.float(), grid, prefix, "eager",
                            gb.float() if gb is not None else None)
    bf16 = {}
    for name in eager_b:
        fused_err, eager_err = rel_error(fused_b[name], ref[name]), rel_error(eager_b[name],
                                                                              ref[name])
        vs_eager = rel_error(fused_b[name], eager_b[name])
        bf16[name] = {"rel_diff_vs_eager": vs_eager, "pass": vs_eager <= 1e-3,
                      "fused_rel_error_vs_fp32": fused_err,
                      "eager_rel_error_vs_fp32": eager_err,
                      "fused_at_least_as_accurate": fused_err <= 1.25 * eager_err + 1e-6}
    rows["bf16"] = bf16
    result["equality"] = {
        "heads": list(types), "dim": dim, "grid": list(grid), "num_prefix": prefix,
        "batch": batch, "gradients": with_grads,
        "note": None if with_grads else "CPU: forward only (FlexAttention has no backward)",
        **rows,
        "fp32_pass": all(r["pass"] for r in rows["fp32"].values()),
        "bf16_pass": all(r["pass"] for r in bf16.values()),
        "bf16_fused_at_least_as_accurate": all(r["fused_at_least_as_accurate"]
                                               for r in bf16.values()),
    }


# ---------------------------------------------------------------------- timing
def _layer_variants(dim: int, heads: int, side: int, device: torch.device, dtype: torch.dtype,
                    with_backward: bool) -> dict[str, Any]:
    torch.manual_seed(0)
    spsa = Attention(dim, heads, head_types=("mlp",) * heads, grid_size=side)
    with torch.no_grad():  # a trained-looking prior, not the identity
        spsa.prior.mlp_weight.normal_(0, 0.1)
    spsa = spsa.to(device=device, dtype=dtype)
    plain = Attention(dim, heads, grid_size=side).to(device=device, dtype=dtype)
    grid = (side, side)

    def fused_pair(x):  # diagnostic: the prior gathered to (H, N, N) first, read per pair
        B, N, C = x.shape
        q, k, v = spsa.qkv(x).reshape(B, N, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        mult, _ = spsa.prior(grid)
        out = flex.fused_attention(q, k, v, mult=mult, bias=None, grid=grid, scale=spsa.scale,
                                   gather="pair")
        return spsa.proj(out.transpose(1, 2).reshape(B, N, C))

    def with_backend(backend):
        def run(x):
            spsa.backend = backend
            return spsa(x, grid)[0]
        return run

    variants = {"layer_sdpa_flash" if device.type == "cuda" else "layer_sdpa":
                lambda x: plain(x, grid)[0],
                "layer_eager": with_backend("eager")}
    if with_backward:
        variants["layer_fused"] = with_backend("fused")
        variants["layer_fused_pair"] = fused_pair
    return {"variants": variants, "params": list(spsa.parameters()) + list(plain.parameters()),
            "spsa": spsa, "grid": grid}


def _core_variants(spsa: Attention, grid, with_backward: bool, device: torch.device):
    def flash(q, k, v):
        return F.scaled_dot_product_attention(q, k, v)

    def eager(q, k, v):
        mult, _ = spsa.prior(grid)  # (H, N, N)
        logits = (q @ k.transpose(-2, -1)) * (mult * spsa.scale)
        return logits.softmax(-1).to(v.dtype) @ v

    def fused(q, k, v):
        mult, bias = spsa.prior.offset_values(grid)  # (H, K)
        return flex.fused_attention(q, k, v, mult=mult, bias=bias, grid=grid, scale=spsa.scale)

    variants = {"core_sdpa_flash" if device.type == "cuda" else "core_sdpa": flash,
                "core_eager": eager}
    if with_backward:
        variants["core_fused"] = fused
    return variants


def _time_size(side: int, *, dim: int, heads: int, batch: int, device: torch.device,
               dtype: torch.dtype, with_backward: bool, warmup: int,
               repeats: int) -> list[dict[str, Any]]:
    n = side * side
    built = _layer_variants(dim, heads, side, device, dtype, with_backward)
    g = torch.Generator(device=device).manual_seed(side)
    inputs = [torch.randn(batch, n, dim, device=device, dtype=dtype, generator=g)
              .requires_grad_() for _ in range(3)]
    grad = torch.randn(batch, n, dim, device=device, dtype=dtype, generator=g)
    # Q, K, V as views of one (B, N, 3, H, d) tensor, laid out as the layer makes them.
    qkv_sets = [torch.randn(batch, n, 3, heads, dim // heads, device=device, dtype=dtype,
                            generator=g).requires_grad_() for _ in range(3)]
    grad_core = torch.randn(batch, heads, n, dim // heads, device=device, dtype=dtype,
                            generator=g)
    cases = {name: (fn, "layer") for name, fn in built["variants"].items()}
    cases.update({name: (fn, "core") for name, fn in
                  _core_variants(built["spsa"], built["grid"], with_backward, device).items()})
    rows = []
    for name, (fn, kind) in cases.items():
        turn = [0]

        def step(fn=fn, kind=kind, turn=turn, flash="flash" in name):
            i = turn[0] % 3
            turn[0] += 1
            with _flash_context(device) if flash else nullcontext():
                if kind == "layer":
                    x = inputs[i]
                    x.grad = None
                    fn(x).backward(grad)
                else:
                    qkv = qkv_sets[i]
                    qkv.grad = None
                    fn(*qkv.permute(2, 0, 3, 1, 4).unbind(0)).backward(grad_core)
            for p in built["params"]:
                p.grad = None

        row = {"name": name, "kind": kind, "tokens": n, "batch": batch, "dim": dim,
               "heads": heads, "dtype": str(dtype).replace("torch.", ""), "fwd_bwd_ms": None,
               "peak_mib": None, "error": None}
        try:  # one variant failing (a kernel that does not build) leaves the others' numbers
            row["fwd_bwd_ms"] = median_ms(step, device, warmup=warmup, repeats=repeats)
            row["peak_mib"] = peak_memory_mib(step, device)
            print(f"  N={n:4d} {name:18s} {row['fwd_bwd_ms']:9.3f} ms", flush=True)
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {' '.join(str(e).split())}"[:500]
            print(f"  N={n:4d} {name:18s} failed: {row['error']}", flush=True)
        rows.append(row)
    return rows


def timing(result: dict[str, Any], device: torch.device, smoke: bool, repeats: int) -> None:
    dim, heads, batch = (64, 4, 2) if smoke else (384, 6, 64)
    sides = (4, 6) if smoke else (14, 24)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with_backward = device.type == "cuda"
    warmup = 1 if smoke else 3
    rows = []
    for side in sides:
        rows += _time_size(side, dim=dim, heads=heads, batch=batch, device=device, dtype=dtype,
                           with_backward=with_backward, warmup=warmup, repeats=repeats)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    ratios = []
    for n in sorted({r["tokens"] for r in rows}):
        by = {r["name"]: r for r in rows if r["tokens"] == n}
        for kind in ("layer", "core"):
            fused, flash = by.get(f"{kind}_fused"), by.get(f"{kind}_sdpa_flash")
            eager = by.get(f"{kind}_eager")
            if all(r and r["fwd_bwd_ms"] for r in (fused, flash, eager)):
                ratios.append({"tokens": n, "kind": kind,
                               "fused_over_flash": fused["fwd_bwd_ms"] / flash["fwd_bwd_ms"],
                               "eager_over_flash": eager["fwd_bwd_ms"] / flash["fwd_bwd_ms"]})
    result["timing"] = {"rows": rows, "ratios": ratios, "repeats": repeats, "warmup": warmup,
                        "note": None if with_backward else
                        "CPU: fused rows need a GPU (no FlexAttention backward on CPU)"}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="result JSON")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU")
    p.add_argument("--repeats", type=int, default=None, help="timed runs (median)")
    args = p.parse_args()

    def body(result: dict[str, Any]) -> None:
        if args.cpu_smoke:
            device = torch.device("cpu")
            torch.set_num_threads(1)
        elif not torch.cuda.is_available():
            raise SkipPart("no CUDA device (run with --cpu-smoke on a CPU machine)")
        else:
            device = torch.device("cuda", 0)
        result["flex_available"] = flex.flex_available()
        tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        equality_error = None
        try:
            equality(result, device, args.cpu_smoke)
        except Exception as e:  # still time the variants that work, then fail the part
            equality_error = f"equality: {type(e).__name__}: {' '.join(str(e).split())}"
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        timing(result, device, args.cpu_smoke, args.repeats or (2 if args.cpu_smoke else 20))
        if equality_error:
            raise RuntimeError(equality_error[:1500])
        if not result["equality"]["fp32_pass"]:
            raise AssertionError("fused and eager differ beyond 1e-5 in fp32; see equality.fp32")

    return run_part("kernels", args.out, body)


if __name__ == "__main__":
    raise SystemExit(main())
