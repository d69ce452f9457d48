"""Initialisation schemes of SP-ViT (`ArchSpec.init`).

* `trunc_normal`: timm's ViT init (Linear weights N(0, 0.02) truncated, biases 0, `pos_embed`
  N(0, 0.02), class token N(0, 1e-6)); priors start as the identity.
* `mimetic`: Trockman & Kolter's mimetic init, on top of `trunc_normal`.
* `impulse3`, `impulse5`: structured (impulse) init, on top of `trunc_normal`.

Structured init (set in this module, PLACEHOLDER_FOR_DOC).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention, SharedAttention
from .priors import SpatialPrior

# Fixed offset orders (dy, dx) over a kernel; head h takes entry h mod k*k.
_RING1 = ((-1, 0), (0, 1), (0, -1), (1, 0), (-1, -1), (-1, 1), (1, -1), (1, 1))
_KNIGHT = ((-2, -1), (-2, 1), (-1, -2), (-1, 2), (1, -2), (1, 2), (2, -1), (2, 1))
IMPULSE_ORDERS: dict[int, tuple[tuple[int, int], ...]] = {
    3: ((0, 0),) + _RING1,
    5: ((0, 0),) + tuple((2 * a, 2 * b) for a, b in _RING1) + _RING1 + _KNIGHT,
}


def impulse_offsets(kernel: int, num_heads: int) -> list[tuple[int, int]]:
    """The (dy, dx) impulse offset of each head: head h takes `IMPULSE_ORDERS[kernel][h % k*k]`."""
    order = IMPULSE_ORDERS[kernel]
    return [order[h % len(order)] for h in range(num_heads)]


def _is_meta(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


def init_trunc_normal(model: nn.Module) -> None:
    """timm ViT init: Linear N(0, .02) truncated / bias 0, pos_embed N(0, .02), cls N(0, 1e-6)."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    for m in model.modules():
        if isinstance(m, SpatialPrior):
            m.reset_parameters()
    if getattr(model, "pos_embed", None) is not None:
        nn.init.trunc_normal_(model.pos_embed, std=0.02)
    if getattr(model, "cls_token", None) is not None:
        nn.init.normal_(model.cls_token, std=1e-6)


@torch.no_grad()
def init_mimetic(model: nn.Module, *, generator: torch.Generator | None = None,
                 alpha_qk: float = 0.7, beta_qk: float = 0.7, alpha_vo: float = 0.4,
                 beta_vo: float = 0.4) -> None:
    """Mimetic init: per head W_q W_kᵀ ≈ a1 Z + b1 I, and W_v W_o ≈ a2 Z - b2 I per block.

    Z has i.i.d. N(0, 1/C) entries (a fresh draw per head and per product). Each target is split
    into its two factors by an SVD (top `head_dim` components for Q/K, all for V/proj), each factor
    taking the square root of the singular values. Shared blocks get the V/proj part only.
    """
    for attn in model.modules():
        if isinstance(attn, Attention):
            C = attn.qkv.in_features
            d = attn.head_dim
            w = attn.qkv.weight  # (3C, C): rows [Q; K; V]
            for h in range(attn.num_heads):
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
    init_trunc_normal(model)
    if scheme == "trunc_normal" or _is_meta(model):
        return
    if scheme == "mimetic":
        init_mimetic(model, generator=generator)
    elif scheme in ("impulse3", "impulse5"):
        init_impulse(model, kernel=int(scheme[-1]), generator=generator)
    else:
        raise ValueError(f"unknown init scheme {scheme!r}")


# ---------------------------------------------------------------------- impulse init
def impulse_target(grid: tuple[int, int], offset: tuple[int, int]) -> torch.Tensor:
    """Impulse convolution matrix `(N, N)`: 1 at (i, j) iff token j = token i + offset (zero pad)."""
    gh, gw = grid
    dy, dx = offset
    n = gh * gw
    t = torch.zeros(n, n, dtype=torch.float64)
    for r in range(gh):
        for c in range(gw):
            rr, cc = r + dy, c + dx
            if 0 <= rr < gh and 0 <= cc < gw:
                t[r * gw + c, rr * gw + cc] = 1.0
    return t


@torch.no_grad()
def pseudo_inputs(model: nn.Module) -> list[tuple[torch.Tensor, tuple[int, int]] | None]:
    """Per block, the input of its `norm1` when the image contributes nothing (the positional
    encoding alone runs through the network), as `(tokens (N, C), grid)`; None for shared blocks.
    """
    grids = model.spec.block_grids()
    out: list = [None] * len(model.blocks)
    hooks = []
    for i, blk in enumerate(model.blocks):
        if blk.shared:
            continue

        def grab(_mod, args, i=i):
            out[i] = (args[0][0].detach().clone(), (grids[i], grids[i]))
        hooks.append(blk.norm1.register_forward_pre_hook(grab))
    try:
        x, grid = model.pe_tokens()
        model.forward_tokens(x, grid)
    finally:
        for h in hooks:
            h.remove()
    return out


def solve_impulse_qk(xn: torch.Tensor, grid: tuple[int, int], offset: tuple[int, int], *,
                     head_dim: int, gain: float, rtol: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form Q/K factors of one head so that its logits on the pseudo-input `xn (N, C)`
    (already layer-normalised) approximate `gain * impulse_target(grid, offset)`.

    xn = U S Vᵀ is truncated to the singular values above `rtol * max` (LayerNorm leaves a
    near-zero one: inverting it would blow Q/K up). The target projected on the kept row space,
    Uᵀ T U, is cut to its best rank-`head_dim` approximation X Yᵀ (optimal for the logits), and
    A = V S⁻¹ X, B = V S⁻¹ Y give xn A Bᵀ xnᵀ = U X Yᵀ Uᵀ. Returns (A, B), each `(C, head_dim)`.
    """
    u, s, vh = torch.linalg.svd(xn.double(), full_matrices=False)
    keep = s > rtol * s[0]
    u, s, v = u[:, keep], s[keep], vh[keep].t()
    target = gain * impulse_target(grid, offset).to(u.device)
    tu, ts, tvh = torch.linalg.svd(u.t() @ target @ u)
    r = min(head_dim, ts.numel())
    root = ts[:r].sqrt()
    x, y = tu[:, :r] * root, tvh[:r].t() * root
    a = torch.zeros(xn.shape[1], head_dim, dtype=torch.float64, device=xn.device)
    b = torch.zeros_like(a)
    a[:, :r] = (v / s) @ x
    b[:, :r] = (v / s) @ y
    return a, b


@torch.no_grad()
def init_impulse(model: nn.Module, *, kernel: int, generator: torch.Generator | None = None,
                 gain: float = 10.0, rtol: float = 1e-3, pe_scale: float = 1.0,
                 content_scale: float = 1.0, mimetic_vo: bool = False, mass: float | None = None) -> None:
    from .layers import sincos_2d

    spec = model.spec
    if getattr(model, "pos_embed", None) is not None:
        s = spec.grid_size
        pe = sincos_2d((s, s), spec.embed_dim) * pe_scale
        model.pos_embed[0, model.pos_prefix:] = pe.to(model.pos_embed)
    stem_out = model.patch_embed.proj
    stem_out.weight.mul_(content_scale)
    if stem_out.bias is not None:
        stem_out.bias.mul_(content_scale)
    if mimetic_vo:
        for attn in model.modules():
            if isinstance(attn, Attention):
                C = attn.qkv.in_features
                _mimetic_vo(attn.qkv.weight[2 * C:], attn.proj.weight, generator, 0.4, 0.4)
            elif isinstance(attn, SharedAttention):
                _mimetic_vo(attn.v.weight, attn.proj.weight, generator, 0.4, 0.4)

    grids = spec.block_grids()
    hooks = []
    for i, blk in enumerate(model.blocks):
        if blk.shared:
            continue

        def solve(norm, args, blk=blk, grid=(grids[i], grids[i])):
            attn = blk.attn
            xn = F.layer_norm(args[0][0], norm.normalized_shape, norm.weight, norm.bias, norm.eps)
            C, d = attn.qkv.in_features, attn.head_dim
            w = attn.qkv.weight
            for h, off in enumerate(impulse_offsets(kernel, attn.num_heads)):
                a, b = solve_impulse_qk(xn, grid, off, head_dim=d, gain=1.0, rtol=rtol)
                g = gain if mass is None else _calibrate(xn.double() @ a, xn.double() @ b, grid, off, mass)
                a, b = a * g ** 0.5, b * g ** 0.5
                a, b = a / attn.scale ** 0.5, b / attn.scale ** 0.5
                w[h * d:(h + 1) * d] = a.t().to(w)
                w[C + h * d:C + (h + 1) * d] = b.t().to(w)
            if attn.qkv.bias is not None:
                attn.qkv.bias[:2 * C] = 0.0
        hooks.append(blk.norm1.register_forward_pre_hook(solve))
    try:
        x, grid = model.pe_tokens()
        model.forward_tokens(x, grid)
    finally:
        for h in hooks:
            h.remove()


def _interior(grid, kernel=3):
    gh, gw = grid
    m = kernel // 2
    return [(r, c) for r in range(m, gh - m) for c in range(m, gw - m)]


def offset_mass(logits: torch.Tensor, grid, offset) -> torch.Tensor:
    gh, gw = grid
    dy, dx = offset
    rows, cols = [], []
    for r, c in _interior(grid, 2 * max(abs(dy), abs(dx)) + 1):
        rows.append(r * gw + c)
        cols.append((r + dy) * gw + c + dx)
    p = logits[rows].softmax(-1)
    return p[torch.arange(len(rows)), cols].mean()


def _calibrate(q, k, grid, offset, mass):
    l1 = q @ k.t()
    lo, hi = 0.0, 1.0
    while offset_mass(hi * l1, grid, offset) < mass and hi < 1e6:
        hi *= 2
    for _ in range(40):
        mid = (lo + hi) / 2
        if offset_mass(mid * l1, grid, offset) < mass:
            lo = mid
        else:
            hi = mid
    return hi
