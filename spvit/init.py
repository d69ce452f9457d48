"""Initialisation schemes of SP-ViT (`ArchSpec.init`).

No scheme touches the positional encoding: it is the spec's (`init_pos_embed`: `learned`
N(0, 0.02), `learned_sincos` the `sincos_2d` table, learnable, `sincos` the fixed table), the
same for every scheme, so comparisons between schemes are not confounded with the encoding.

* `trunc_normal`: timm's ViT init (Linear weights N(0, 0.02) truncated, biases 0, class token
  N(0, 1e-6), other layers PyTorch's defaults); priors start as the identity (SP = 1, bias 0).
* `mimetic` (Trockman & Kolter 2023), on top of `trunc_normal`: per head W_q W_kᵀ ≈ 0.7 Z + 0.7 I
  and per block W_v W_o ≈ 0.4 Z - 0.4 I, Z ~ N(0, 1/C).
* `impulse3`, `impulse5` (structured init, Zheng et al. 2024), on top of `trunc_normal`: each
  head's attention map, computed on the positional encoding as pseudo-input, approximates an
  impulse convolution over a k x k kernel; head h takes offset `impulse_offsets(k, H)[h]` (the
  5x5 kernel's 25 positions centre first, then by distance; impulse3 the first 9, so with <= 9
  heads both give the same offsets). They need a sin-cos encoding (`ArchSpec` refuses others).
* `impulse3_mimetic`, `impulse5_mimetic`: the same Q/K on top of mimetic V/proj (0.4 Z - 0.4 I),
  as the closed-form structured-init release does; V/proj are set first, so the Q/K solve sees
  the stream they produce.

The impulse mechanism, per block that computes its own attention (shared blocks have no Q/K):

1. Pseudo-input. The network is run, in eval mode (no DropPath or dropout; every module's mode
   is restored afterwards), on the positional encoding alone (stem output zero) and each block's
   Q/K are solved, in order, on what its attention sees there: `norm1` of its input, after its
   pool and conv positional layer and the already-initialised blocks before it. Pooling and
   sharing therefore compose with the init.
2. Closed form. With X = LN(input) = U S Vᵀ, only the directions with s > `rtol` * s_max (0.1) are
   kept. That cut removes the near-zero direction LayerNorm leaves and every weak one: Q/K
   amplify a direction by 1 / s², so an inverted weak direction turns content (which
   has energy everywhere) into large random logits. The target logits are the impulse matrix
   H (1 at (i, i + offset), zero padding) with each row centred (softmax ignores row constants and
   centring lowers the rank the head must express); its projection Uᵀ H U is cut to its best rank
   `head_dim` approximation X Yᵀ, giving W_q = (V S⁻¹ X)ᵀ, W_k = (V S⁻¹ Y)ᵀ, and Q/K biases 0.
   The two factors are balanced to equal norm (same product).
3. Sharpness, bounded. One logit gain g per head (sqrt(g) on W_q and on W_k) is set by bisection
   so that the mean attention on the head's offset, over the tokens whose offset is inside the
   grid, is `mass` (0.9) on the pseudo-input, but never beyond the gain at which the head's W_q
   or W_k rows reach Frobenius norm `QK_NORM_BOUND` (8). Heads that reach the target need ~3-4;
   a head narrower than the encoding's rank (~15 on 8 x 8) cannot express a sharp shift and
   used to get gains > 1e6 (W_q norms ~420 at width 32 / 4 heads on 8 x 8); it now stops at the
   bound with the sharpest map the bound allows (mass ~0.45-0.85 there, its map still peaking
   at the offset on most tokens). The mass each head reached is kept in `model.impulse_mass`
   (`attention_mass(model)`, flat metrics `attention_mass_metrics(model)`), and one warning per
   initialisation lists the heads below the target.

Measured on sklearn digits (16 px, patch 2, 8 x 8 grid, 3 blocks, width 48, 4 heads, AdamW 2e-3,
8 epochs, 2 seeds), validation accuracy: trunc_normal 0.52 / 0.46, mimetic 0.91 / 0.89,
impulse3 0.93 / 0.86 (measured when impulse still replaced the encoding by the sin-cos table
while the other two kept N(0, 0.02); the bound does not bind at that width). Without the cut-off
(rtol 1e-3) and with the geometric sin-cos schedule, the same maps on the pseudo-input need Q/K
norms of 50-130, peak at the offset on real images for ~2% of tokens (vs 94% here) and the model
reaches 0.34-0.59.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention, SharedAttention
from .priors import SpatialPrior

# The 5x5 kernel's 25 offsets (dy, dx), centre first, then by Euclidean distance; within one
# distance: up, right, left, down for the axis positions, then the other positions row-major.
# impulse3 takes the first 9 (the 3x3 kernel), impulse5 all 25; head h takes entry h mod k*k.
_KERNEL5_ORDER: tuple[tuple[int, int], ...] = (
    (0, 0),
    (-1, 0), (0, 1), (0, -1), (1, 0),                    # distance 1
    (-1, -1), (-1, 1), (1, -1), (1, 1),                  # sqrt 2
    (-2, 0), (0, 2), (0, -2), (2, 0),                    # 2
    (-2, -1), (-2, 1), (-1, -2), (-1, 2), (1, -2), (1, 2), (2, -1), (2, 1),  # sqrt 5
    (-2, -2), (-2, 2), (2, -2), (2, 2),                  # sqrt 8
)
IMPULSE_ORDERS: dict[int, tuple[tuple[int, int], ...]] = {
    3: _KERNEL5_ORDER[:9],
    5: _KERNEL5_ORDER,
}

# Largest Frobenius norm of one head's W_q (and of its W_k) rows that impulse init writes. The
# closed-form structured-init release fixes each factor's norm at 7; mimetic init gives 3.4-10 per
# head at head width 8-64 (measured); the default init ~0.5. A head that cannot reach the target
# mass within this bound keeps the sharpest map the bound allows (see `init_impulse`).
QK_NORM_BOUND = 8.0


def impulse_offsets(kernel: int, num_heads: int) -> list[tuple[int, int]]:
    """The (dy, dx) impulse offset of each head: head h takes `IMPULSE_ORDERS[kernel][h % k*k]`."""
    order = IMPULSE_ORDERS[kernel]
    return [order[h % len(order)] for h in range(num_heads)]


def _is_meta(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


def init_pos_embed(model: nn.Module, *, generator: torch.Generator | None = None) -> None:
    """The positional encoding the spec names, whatever the init scheme.

    `learned`: N(0, 0.02) truncated. `learned_sincos`: the patch entries are `sincos_2d` (the
    linear-frequency 2-D sin-cos table), a class-token entry N(0, 0.02); it stays learnable.
    `sincos` is a fixed buffer built with the model; `none` has nothing to set.
    """
    from .layers import sincos_2d

    pe = getattr(model, "pos_embed", None)
    if pe is None:
        return
    nn.init.trunc_normal_(pe, std=0.02, generator=generator)
    if model.spec.pos_embed == "learned_sincos" and not pe.is_meta:
        s = model.spec.grid_size
        table = sincos_2d((s, s), model.spec.embed_dim, device=pe.device)
        with torch.no_grad():
            pe[0, model.pos_prefix:] = table.to(pe.dtype)


def init_trunc_normal(model: nn.Module, *, generator: torch.Generator | None = None) -> None:
    """timm ViT init: Linear N(0, .02) truncated / bias 0, the spec's `pos_embed`
    (`init_pos_embed`), cls N(0, 1e-6)."""
    for m in model.modules():  # first, so the draws below (from `generator`) are the last word
        if isinstance(m, SpatialPrior):
            m.reset_parameters()
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02, generator=generator)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    init_pos_embed(model, generator=generator)
    if getattr(model, "cls_token", None) is not None:
        nn.init.normal_(model.cls_token, std=1e-6, generator=generator)


@torch.no_grad()
def init_mimetic(model: nn.Module, *, generator: torch.Generator | None = None,
                 alpha_qk: float = 0.7, beta_qk: float = 0.7, alpha_vo: float = 0.4,
                 beta_vo: float = 0.4, qk: bool = True) -> None:
    """Mimetic init: per head W_q W_kᵀ ≈ a1 Z + b1 I, and W_v W_o ≈ a2 Z - b2 I per block.

    `qk=False` sets the V/proj part only (the `impulse*_mimetic` schemes solve Q/K themselves).

    Z has i.i.d. N(0, 1/C) entries (a fresh draw per head and per product). Each target is split
    into its two factors by an SVD (top `head_dim` components for Q/K, all for V/proj), each factor
    taking the square root of the singular values. Shared blocks get the V/proj part only.
    """
    for attn in model.modules():
        if isinstance(attn, Attention):
            C = attn.qkv.in_features
            d = attn.head_dim
            w = attn.qkv.weight  # (3C, C): rows [Q; K; V]
            for h in range(attn.num_heads if qk else 0):
                target = alpha_qk * _randn(C, C, generator, w) / math.sqrt(C) + beta_qk * _eye(C, w)
                u, s, vh = torch.linalg.svd(target)
                root = s[:d].sqrt()
                w[h * d:(h + 1) * d] = (u[:, :d] * root).t().to(w.dtype)
                w[C + h * d:C + (h + 1) * d] = (vh[:d] * root[:, None]).to(w.dtype)
            _mimetic_vo(w[2 * C:], attn.proj.weight, generator, alpha_vo, beta_vo)
        elif isinstance(attn, SharedAttention):
            _mimetic_vo(attn.v.weight, attn.proj.weight, generator, alpha_vo, beta_vo)


def _mimetic_vo(wv: torch.Tensor, wo: torch.Tensor, generator: torch.Generator | None,
                alpha: float, beta: float) -> None:
    """Set `wv`, `wo` (C, C) so that Wvᵀ Woᵀ = alpha Z - beta I (x -> x Wvᵀ Woᵀ)."""
    C = wv.shape[1]
    target = alpha * _randn(C, C, generator, wv) / math.sqrt(C) - beta * _eye(C, wv)
    u, s, vh = torch.linalg.svd(target)
    root = s.sqrt()
    wv.copy_((u * root).t().to(wv.dtype))
    wo.copy_((vh * root[:, None]).t().to(wo.dtype))


def _randn(rows: int, cols: int, generator: torch.Generator | None,
           like: torch.Tensor) -> torch.Tensor:
    return torch.randn(rows, cols, generator=generator, dtype=torch.float64).to(like.device)


def _eye(n: int, like: torch.Tensor) -> torch.Tensor:
    return torch.eye(n, dtype=torch.float64, device=like.device)


def apply_init(model: nn.Module, scheme: str, *, reset: bool = False,
               generator: torch.Generator | None = None) -> None:
    """Initialise `model` (an `SPViT`) with `scheme`; `reset` first re-runs every layer's default
    `reset_parameters()` (so a seeded build does not depend on construction order)."""
    if reset:
        for m in model.modules():
            if m is not model and hasattr(m, "reset_parameters"):
                m.reset_parameters()
    init_trunc_normal(model, generator=generator)
    if scheme == "trunc_normal" or _is_meta(model):
        return
    if scheme == "mimetic":
        init_mimetic(model, generator=generator)
    elif scheme in ("impulse3", "impulse5", "impulse3_mimetic", "impulse5_mimetic"):
        if scheme.endswith("_mimetic"):  # V/proj first: the Q/K solve runs through them
            init_mimetic(model, generator=generator, qk=False)
        init_impulse(model, kernel=int(scheme[len("impulse")]))
    else:
        raise ValueError(f"unknown init scheme {scheme!r}")


# ---------------------------------------------------------------------- impulse init
def impulse_target(grid: tuple[int, int], offset: tuple[int, int]) -> torch.Tensor:
    """Impulse convolution matrix `(N, N)`: 1 at (i, j) iff token j = token i + offset (zero pad).

    `offset` is (dy, dx) in tokens; tokens are row-major on the `grid` (Gh, Gw).
    """
    gh, gw = grid
    dy, dx = offset
    rows = torch.arange(gh).repeat_interleave(gw)
    cols = torch.arange(gw).repeat(gh)
    inside = (rows + dy >= 0) & (rows + dy < gh) & (cols + dx >= 0) & (cols + dx < gw)
    t = torch.zeros(gh * gw, gh * gw, dtype=torch.float64)
    src = torch.nonzero(inside).flatten()
    t[src, (rows[src] + dy) * gw + cols[src] + dx] = 1.0
    return t


def offset_mass(logits: torch.Tensor, grid: tuple[int, int], offset: tuple[int, int]) -> float:
    """Mean softmax probability on `offset` over the tokens whose offset lies inside the grid."""
    return _mass_fn(logits, grid, offset)(1.0)


def _mass_fn(logits: torch.Tensor, grid: tuple[int, int],
             offset: tuple[int, int]) -> Callable[[float], float]:
    """`g -> offset_mass(g * logits, grid, offset)`, with the target's rows gathered once."""
    target = impulse_target(grid, offset).to(logits.device)
    rows = target.sum(1) > 0
    if not rows.any():
        return lambda g: 1.0
    sub = logits[rows]
    cols = target[rows].argmax(1, keepdim=True)  # the one key each such row should attend to

    def mass(g: float) -> float:
        return float((g * sub).softmax(-1).gather(1, cols).mean())
    return mass


def _kept_svd(xn: torch.Tensor, rtol: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(U, S, V)` of `xn` restricted to the directions with s > rtol * s_max."""
    u, s, vh = torch.linalg.svd(xn.double(), full_matrices=False)
    keep = s > rtol * s[0]
    return u[:, keep], s[keep], vh[keep].t()


def solve_impulse_qk(xn: torch.Tensor, grid: tuple[int, int], offset: tuple[int, int], *,
                     head_dim: int, rtol: float = 0.1,
                     svd: tuple[torch.Tensor, ...] | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-gain Q/K factors of one head: `xn A (xn B)ᵀ` ≈ the row-centred impulse matrix.

    `xn (N, C)` is the pseudo-input as attention sees it (after `norm1`). Returns `(A, B)`, each
    `(C, head_dim)` float64, so that W_q = Aᵀ, W_k = Bᵀ (before the gain and the attention scale).
    See the module docstring for the construction. `svd`: `_kept_svd(xn, rtol)` when the
    caller already has it (one per block, shared by its heads).
    """
    u, s, v = _kept_svd(xn, rtol) if svd is None else svd  # (N, r), (r,), (C, r)
    target = impulse_target(grid, offset).to(u.device)
    target = target - target.mean(dim=1, keepdim=True)
    tu, ts, tvh = torch.linalg.svd(u.t() @ target @ u)
    r = min(head_dim, ts.numel())
    root = ts[:r].sqrt()
    a = torch.zeros(xn.shape[1], head_dim, dtype=torch.float64, device=xn.device)
    b = torch.zeros_like(a)
    a[:, :r] = (v / s) @ (tu[:, :r] * root)
    b[:, :r] = (v / s) @ (tvh[:r].t() * root)
    return a, b


def calibrate_gain(logits: torch.Tensor, grid: tuple[int, int], offset: tuple[int, int],
                   mass: float, max_gain: float = math.inf) -> float:
    """The gain g <= `max_gain` for which `offset_mass(g * logits)` equals `mass` (bisection);
    `max_gain` when even that gain stays below `mass`."""
    at = _mass_fn(logits, grid, offset)
    if math.isfinite(max_gain) and at(max_gain) <= mass:
        return max_gain
    if at(1.0) >= mass:
        lo, hi = 0.0, 1.0
    else:
        lo, hi = 1.0, 2.0
        while at(hi) < mass:
            lo, hi = hi, hi * 2.0
            if hi >= max_gain:
                hi = max_gain
                break
            if hi > 1e6:  # the map cannot reach `mass`: keep the sharpest bounded one
                return hi
    hi = min(hi, max_gain)
    for _ in range(30):
        mid = 0.5 * (lo + hi)
        if at(mid) < mass:
            lo = mid
        else:
            hi = mid
    return hi


@torch.no_grad()
def pseudo_inputs(model: nn.Module) -> list[tuple[torch.Tensor, tuple[int, int]] | None]:
    """Per block, the input of its `norm1` when the image contributes nothing (the positional
    encoding alone runs through the network, in eval mode), as `(tokens (N, C), grid)`; None for
    shared blocks.
    """
    grids = model.spec.block_grids()
    out: list = [None] * len(model.blocks)

    def grab(i: int, _blk: nn.Module):
        def hook(_mod, args):
            out[i] = (args[0][0].detach().clone(), (grids[i], grids[i]))
        return hook

    _run_pe_through(model, grab)
    return out


def _run_pe_through(model: nn.Module, hook_for: Callable[[int, nn.Module], Callable]) -> None:
    """Run the positional encoding alone through `model`, calling `hook_for(i, block)`'s hook on
    the input of `norm1` of every block that computes its own attention (shared ones have none).
    Blocks run in order, so a hook that changes block i is seen by every later block.

    The pass runs in eval mode (no DropPath, no dropout, BatchNorm on its running statistics),
    so what it sees does not depend on those rates or on the RNG; every module's mode is
    restored afterwards.
    """
    modes = [(m, m.training) for m in model.modules()]
    hooks = [blk.norm1.register_forward_pre_hook(hook_for(i, blk))
             for i, blk in enumerate(model.blocks) if not blk.shared]
    try:
        model.eval()
        x, grid = model.pe_tokens()
        model.forward_tokens(x, grid)
    finally:
        for h in hooks:
            h.remove()
        for m, training in modes:
            m.training = training


def attention_mass(model: nn.Module) -> dict[int, tuple[float, ...]] | None:
    """The attention mass each head's map puts on its impulse offset on the pseudo-input, as
    achieved by impulse init: `{block_index: (mass of head 0, head 1, ...)}` for every block
    with its own attention; None when the model was not impulse-initialised (or built on meta).

    Also available as the attribute `model.impulse_mass` (same value) that `init_impulse` sets.
    """
    return getattr(model, "impulse_mass", None)


def attention_mass_metrics(model: nn.Module) -> dict[str, float]:
    """Flat metrics of `attention_mass(model)` for a trial's records: `init_mass_min`,
    `init_mass_mean`, `init_heads_short` (heads below the target); empty without impulse init."""
    masses = attention_mass(model)
    if not masses:
        return {}
    flat = [m for heads in masses.values() for m in heads]
    target = getattr(model, "impulse_mass_target", IMPULSE_MASS)
    return {"init_mass_min": min(flat), "init_mass_mean": sum(flat) / len(flat),
            "init_heads_short": float(sum(m < target - MASS_TOLERANCE for m in flat))}


IMPULSE_MASS = 0.9  # target attention mass on each head's offset (on the pseudo-input)
MASS_TOLERANCE = 0.01  # a head this far below the target counts as short of it


@torch.no_grad()
def init_impulse(model: nn.Module, *, kernel: int, mass: float = IMPULSE_MASS, rtol: float = 0.1,
                 max_norm: float = QK_NORM_BOUND) -> None:
    """Impulse init of every attention block of `model` (an `SPViT`); see the module docstring.

    The positional encoding is left as the spec built it. Each head's W_q and W_k rows have
    Frobenius norm <= `max_norm`; the attention mass each head reaches is stored in
    `model.impulse_mass` (`attention_mass`), and one warning lists the heads that stay more
    than `MASS_TOLERANCE` below `mass`.
    """
    grids = model.spec.block_grids()
    achieved: dict[int, tuple[float, ...]] = {}

    # Solves block i when its norm1 runs, i.e. after every block before it is initialised.
    def solver(i: int, blk: nn.Module):
        def solve(norm, args, attn=blk.attn, grid=(grids[i], grids[i])):
            xn = F.layer_norm(args[0][0], norm.normalized_shape, norm.weight, norm.bias,
                              norm.eps).double()  # (N, C) as the attention sees it
            C, d = attn.qkv.in_features, attn.head_dim
            w = attn.qkv.weight  # (3C, C): rows [Q; K; V]
            masses = []
            svd = _kept_svd(xn, rtol)
            for h, off in enumerate(impulse_offsets(kernel, attn.num_heads)):
                a, b = solve_impulse_qk(xn, grid, off, head_dim=d, rtol=rtol, svd=svd)
                na, nb = float(a.norm()), float(b.norm())
                if na == 0.0 or nb == 0.0:  # nothing of the offset is expressible
                    a, b, gain = torch.zeros_like(a), torch.zeros_like(b), 0.0
                else:
                    # Same product, equal norms: the smallest largest factor for a given gain.
                    a, b = a * (nb / na) ** 0.5, b * (na / nb) ** 0.5
                    # attention multiplies Q Kᵀ by scale; ||a|| * sqrt(gain / scale) <= max_norm
                    max_gain = attn.scale * max_norm ** 2 / (na * nb)
                    gain = calibrate_gain((xn @ a) @ (xn @ b).t(), grid, off, mass,
                                          max_gain=max_gain)
                masses.append(_mass_fn((xn @ a) @ (xn @ b).t(), grid, off)(gain))
                factor = (gain / attn.scale) ** 0.5
                w[h * d:(h + 1) * d] = (a * factor).t().to(w.dtype)
                w[C + h * d:C + (h + 1) * d] = (b * factor).t().to(w.dtype)
            if attn.qkv.bias is not None:
                attn.qkv.bias[:2 * C] = 0.0
            achieved[i] = tuple(masses)
        return solve

    _run_pe_through(model, solver)
    model.impulse_mass = achieved
    model.impulse_mass_target = mass
    short = [(i, h, m) for i, heads in achieved.items() for h, m in enumerate(heads)
             if m < mass - MASS_TOLERANCE]
    if short:
        i, h, m = min(short, key=lambda t: t[2])
        warnings.warn(
            f"impulse{kernel} init: {len(short)} of {sum(map(len, achieved.values()))} heads"
            f" stay below the target attention mass {mass} with Q/K norms capped at {max_norm}"
            f" (lowest {m:.2f}: block {i} head {h}, head width"
            f" {model.blocks[i].attn.head_dim}); see spvit.init.attention_mass(model).",
            stacklevel=3)
