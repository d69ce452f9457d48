"""Speed of SP-SA: one attention layer with the learned `mlp` prior against the naive formulation
and vanilla fused attention, and a full SP-ViT-S training step with and without priors.

The SP-SA layer evaluates the prior MLP once per unique offset ((2S-1)^2 of them) and gathers it
into an (H, N, N) multiplier. The naive formulation (the SP-ViT release's) evaluates the MLP on all
N^2 token pairs and repeats it over the batch. All three layers include their Q/K/V and output
projections. Times are medians of `--repeats` runs after warm-up, forward + backward. The SP-SA
layer runs the default path (on CPU the C kernel of `spvit.cpu_attention`); `SPVIT_ATTENTION=eager`
times the formula as written. `bench/spsa_cpu.py` compares whole training steps per prior family.

    .venv/bin/python bench/spsa.py    # 14x14 grid, dim 384, 6 heads, batch 8; spvit_s batch 8
    .venv/bin/python bench/spsa.py --skip-model --repeats 20
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import spvit
from spvit.attention import Attention


class NaiveSPSA(nn.Module):
    """SP-SA as the release computes it: the prior MLP on every (query, key) pair of every sample.

    Shares its weights with an `Attention` whose heads all have the `mlp` prior.
    """

    def __init__(self, attn: Attention, grid: int) -> None:
        super().__init__()
        self.attn = attn
        rows = torch.arange(grid).repeat_interleave(grid)
        cols = torch.arange(grid).repeat(grid)
        rel = torch.stack([cols[None, :] - cols[:, None], rows[None, :] - rows[:, None]], -1)
        self.register_buffer("rel", rel.float())  # (N, N, 2) as (dx, dy)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, prior = self.attn, self.attn.prior
        B, N, C = x.shape
        H, d = a.num_heads, a.head_dim
        q, k, v = a.qkv(x).reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4).unbind(0)
        pairs = self.rel.expand(B, N, N, 2)  # the release repeats the pairs over the batch
        hidden = F.relu(prior.mlp_fc1(pairs)).view(B, N, N, H, d)
        sp = (hidden * prior.mlp_weight).sum(-1) + prior.mlp_bias  # (B, N, N, H)
        logits = (q @ k.transpose(-2, -1)) * a.scale * sp.permute(0, 3, 1, 2)
        out = logits.softmax(-1) @ v
        return a.proj(out.transpose(1, 2).reshape(B, N, C))


def _time_interleaved(fns: dict[str, Callable[[], None]], repeats: int,
                      warmup: int = 1) -> dict[str, tuple[float, float]]:
    """Median (wall s, process CPU s) per function, runs interleaved A B C A B C ... so that load
    from other processes on a shared machine hits every candidate alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            samples[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    return {name: (statistics.median(w for w, _ in s), statistics.median(c for _, c in s))
            for name, s in samples.items()}


def bench_layer(args: argparse.Namespace) -> list[tuple[str, float]]:
    torch.manual_seed(0)
    grid, n = args.grid, args.grid * args.grid
    spsa = Attention(args.dim, args.heads, head_types=("mlp",) * args.heads, grid_size=grid)
    with torch.no_grad():  # a trained-looking prior, not the identity
        spsa.prior.mlp_weight.normal_(0, 0.1)
    naive = NaiveSPSA(spsa, grid)
    vanilla = Attention(args.dim, args.heads, grid_size=grid)
    x = torch.randn(args.batch, n, args.dim, requires_grad=True)

    def step(fn):
        def run():
            out = fn(x)
            out = out[0] if isinstance(out, tuple) else out
            out.sum().backward()
        return run

    with torch.no_grad():
        ref, _ = spsa(x, (grid, grid))
        torch.testing.assert_close(naive(x), ref, rtol=1e-4, atol=1e-4)
    fast = _time_interleaved({
        "vanilla (fused SDPA)": step(lambda t: vanilla(t, (grid, grid))),
        "SP-SA mlp (per offset)": step(lambda t: spsa(t, (grid, grid))),
    }, args.repeats)
    slow = _time_interleaved({"SP-SA mlp (naive N^2)": step(naive)}, max(3, args.repeats // 4))
    return {**fast, **slow}


def bench_model(args: argparse.Namespace) -> dict[str, tuple[float, float]]:
    spec = spvit.resolve_arch("spvit_s").replace(drop_path_rate=0.0)
    plain = spec.replace(blocks=[dict(b.to_dict(), prior="none") for b in spec.blocks])
    x = torch.randn(args.model_batch, 3, spec.img_size, spec.img_size)
    y = torch.randint(0, spec.num_classes, (args.model_batch,))
    steps = {}
    for label, s in (("spvit_s, priors none", plain), ("spvit_s, mlp priors", spec)):
        model = spvit.create_model(s, seed=0)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def train_step(model=model, opt=opt):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        steps[label] = train_step
    return _time_interleaved(steps, args.model_repeats)


def _table(title: str, rows: dict[str, tuple[float, float]], unit: float, unit_name: str) -> None:
    base_wall, base_cpu = next(iter(rows.values()))
    print(f"\n{title}")
    wall, cpu = "wall " + unit_name, "cpu " + unit_name
    print(f"{'':28s} {wall:>11s} {'ratio':>7s} {cpu:>11s} {'ratio':>7s}")
    for name, (wall, cpu) in rows.items():
        print(f"{name:28s} {wall * unit:11.2f} {wall / base_wall:6.2f}x {cpu * unit:11.2f}"
              f" {cpu / base_cpu:6.2f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--grid", type=int, default=14, help="token grid side S")
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=20, help="timed runs per layer (median)")
    p.add_argument("--model-batch", type=int, default=8)
    p.add_argument("--model-repeats", type=int, default=5, help="timed train steps (median)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: steadiest on a shared machine; 0: torch default)")
    p.add_argument("--skip-model", action="store_true", help="only the attention layer")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    rows = bench_layer(args)
    _table(f"attention layer forward+backward: grid {args.grid}x{args.grid}, dim {args.dim},"
           f" {args.heads} heads, batch {args.batch} (median of {args.repeats})", rows, 1e3, "ms")
    per_offset, naive = rows["SP-SA mlp (per offset)"], rows["SP-SA mlp (naive N^2)"]
    print(f"naive / per-offset: wall {naive[0] / per_offset[0]:.1f}x, cpu"
          f" {naive[1] / per_offset[1]:.1f}x (target >= 20x)")

    if not args.skip_model:
        rows = bench_model(args)
        _table(f"spvit_s train step (forward + backward + AdamW), batch {args.model_batch} at"
               f" 224 px (median of {args.model_repeats})", rows, 1.0, "s")
        (w0, c0), (w1, c1) = rows.values()
        print(f"with priors / without: wall {w1 / w0:.3f}x, cpu {c1 / c0:.3f}x (target <= 1.15x)")


if __name__ == "__main__":
    main()
