"""Speed of SP-SA: one attention layer with the learned `mlp` prior against the naive formulation
and vanilla fused attention, and a full SP-ViT-S training step with and without priors.

The SP-SA layer evaluates the prior MLP once per unique offset ((2S-1)^2 of them) and gathers it
into an (H, N, N) multiplier. The naive formulation (the SP-ViT release's) evaluates the MLP on all
N^2 token pairs and repeats it over the batch. All three layers include their Q/K/V and output
projections. Times are medians of `--repeats` runs after warm-up, forward + backward.

    .venv/bin/python bench/spsa.py                      # defaults: 14x14 grid, dim 384, 6 heads, batch 8
    .venv/bin/python bench/spsa.py --skip-model --repeats 20
"""

from __future__ import annotations

import argparse
import statistics
import time

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


def _time(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


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
    rows = [("vanilla (fused SDPA)", _time(step(lambda t: vanilla(t, (grid, grid))), args.repeats)),
            ("SP-SA mlp (per offset)", _time(step(lambda t: spsa(t, (grid, grid))), args.repeats)),
            ("SP-SA mlp (naive N^2)", _time(step(naive), max(3, args.repeats // 3)))]
    return rows


def bench_model(args: argparse.Namespace) -> list[tuple[str, float]]:
    spec = spvit.resolve_arch("spvit_s").replace(drop_path_rate=0.0)
    plain = spec.replace(blocks=[dict(b.to_dict(), prior="none") for b in spec.blocks])
    x = torch.randn(args.model_batch, 3, spec.img_size, spec.img_size)
    y = torch.randint(0, spec.num_classes, (args.model_batch,))
    rows = []
    for label, s in (("spvit_s, priors none", plain), ("spvit_s, mlp priors", spec)):
        model = spvit.create_model(s, seed=0)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def train_step(model=model, opt=opt):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        rows.append((label, _time(train_step, args.model_repeats, warmup=1)))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--grid", type=int, default=14, help="token grid side S")
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=15, help="timed runs per layer (median)")
    p.add_argument("--model-batch", type=int, default=8)
    p.add_argument("--model-repeats", type=int, default=5, help="timed train steps (median)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--skip-model", action="store_true", help="only the attention layer")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    rows = bench_layer(args)
    base = rows[0][1]
    print(f"\nattention layer forward+backward: grid {args.grid}x{args.grid}, dim {args.dim},"
          f" {args.heads} heads, batch {args.batch}")
    print(f"{'layer':28s} {'median ms':>10s} {'vs vanilla':>11s}")
    for name, t in rows:
        print(f"{name:28s} {t * 1e3:10.2f} {t / base:10.2f}x")
    print(f"naive / per-offset: {rows[2][1] / rows[1][1]:.1f}x (target >= 20x)")

    if not args.skip_model:
        rows = bench_model(args)
        base = rows[0][1]
        print(f"\nspvit_s train step (forward + backward + AdamW), batch {args.model_batch} at 224 px")
        print(f"{'model':28s} {'median s':>10s} {'ratio':>11s}")
        for name, t in rows:
            print(f"{name:28s} {t:10.3f} {t / base:10.2f}x")
        print(f"with priors / without: {rows[1][1] / base:.3f}x (target <= 1.15x)")


if __name__ == "__main__":
    main()
