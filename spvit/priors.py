"""Spatial priors of SP-SA: per-head functions of the 2-D offset between two patch tokens.

A prior is a function SP_h(d) of the integer offset d = (dx, dy) = (col_j - col_i, row_j - row_i)
between query token i and key token j. It is evaluated ONCE per unique offset of the current token
grid ((2*Gh - 1) * (2*Gw - 1) of them) and gathered into an `(H, N, N)` matrix through an index
table that is built once per grid and cached; nothing here runs per sample or per token pair.

Families (one type per head, a block may mix them):

* `none`     identity (multiplier 1, bias 0).
* `mlp`      the SP-ViT learned prior, multiplicative:
             SP_h(d) = w_h . relu(W1_h d + b1_h) + b_h, with W1_h (head_dim, 2), b1_h (head_dim,)
             (the rows of one Linear(2, heads * head_dim) that belong to head h), w_h (head_dim,),
             b_h scalar. Initialised with w_h = 0, b_h = 1, so SP = 1.
* `gaussian` a learned anisotropic Gaussian GAIN on the logits, multiplicative:
             SP_h(d) = 1 + a_h * exp(-(dx / sx_h)^2 / 2 - (dy / sy_h)^2 / 2), sx_h = exp(lx_h),
             sy_h = exp(ly_h). It scales the content logits near the query by up to 1 + a_h
             (extent per axis learned). It is not a locality prior by itself: it sharpens
             whatever the content says near the query, so where those logits are negative
             (a > 0) it pushes attention AWAY from the neighbours. Initialised a_h = 0 (SP = 1),
             sx_h = sy_h = 2. (The name is kept: spaces, results and state_dict keys use it.)
* `axial`    horizontal / vertical relations, multiplicative:
             SP_h(d) = 1 + r_h * exp(-(dy / w_h)^2 / 2) + c_h * exp(-(dx / w_h)^2 / 2),
             w_h = exp(lw_h). The r term highlights the query's row (horizontal relations, dy ~ 0),
             the c term its column (vertical relations, dx ~ 0). Initialised r_h = c_h = 0,
             w_h = 1.
* `rpb`      additive relative-position bias (Swin): B_h(d) = T_h[dy + S - 1, dx + S - 1] with a
             learned table T_h of (2S - 1) x (2S - 1) entries for the block's grid side S of the
             architecture. Offsets beyond the table (a larger input grid at run time) use the
             nearest edge entry. Initialised T_h = 0.
* `decay`    a learned distance decay, additive (the locality prior): B_h(d) = -l_h * |d|,
             |d| = sqrt(dx^2 + dy^2), one learned slope l_h per head. Whatever the content logits,
             l_h > 0 moves attention towards the query's neighbourhood (ALiBi in 2-D); l_h < 0
             away from it. Initialised l_h = 0 (B = 0). Works on any grid (no table).

Multiplicative priors scale the scaled logits before the softmax:
softmax((Q Kᵀ / sqrt(d)) * SP + B) V. With a class token in the block the prior rows and columns
of the class token are the identity (multiplier 1, bias 0).

Parameters of one `SpatialPrior` with Hm `mlp`, Hg `gaussian`, Ha `axial`, Hr `rpb` heads and
head width d (only the tensors of types present exist):
`mlp_fc1.weight (Hm*d, 2)`, `mlp_fc1.bias (Hm*d,)`, `mlp_weight (Hm, d)`, `mlp_bias (Hm,)`,
`gaussian (Hg, 3)` = [a, lx, ly], `axial (Ha, 3)` = [r, c, lw], `rpb_table (Hr, 2S-1, 2S-1)`,
`decay (Hd,)` = [l]. Count: 4*Hm*d + Hm + 3*Hg + 3*Ha + Hr*(2S-1)^2 + Hd.

Each family's formula is one pure function of its parameter tensors and the offsets
(`mlp_prior`, `gaussian_prior`, `axial_prior`, `rpb_prior`, `decay_prior`); `offset_values_of`
stacks them into per-head tables and `gather_pairs` spreads a table over the token pairs. The
model's `SpatialPrior` and the supernet's `spvit.supernet.SuperPriors` differ only in where the
parameter tensors come from.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

Grid = tuple[int, int]

MULTIPLICATIVE: frozenset[str] = frozenset({"mlp", "gaussian", "axial"})
ADDITIVE: frozenset[str] = frozenset({"rpb", "decay"})


@lru_cache(maxsize=64)
def _offset_tables(gh: int, gw: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Unique offsets `(K, 2)` as (dx, dy), K = (2gh-1)(2gw-1), and the `(N*N,)` pair index."""
    dy = torch.arange(-(gh - 1), gh, device=device)
    dx = torch.arange(-(gw - 1), gw, device=device)
    oy, ox = torch.meshgrid(dy, dx, indexing="ij")
    offsets = torch.stack([ox.reshape(-1), oy.reshape(-1)], dim=1)  # (K, 2) as (dx, dy)
    rows = torch.arange(gh, device=device).repeat_interleave(gw)
    cols = torch.arange(gw, device=device).repeat(gh)
    rel_y = rows[None, :] - rows[:, None]  # (N, N): row_j - row_i
    rel_x = cols[None, :] - cols[:, None]
    index = (rel_y + gh - 1) * (2 * gw - 1) + (rel_x + gw - 1)
    return offsets, index.reshape(-1)


def offset_tables(grid: Grid, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Cached `(offsets (K, 2) long as (dx, dy), pair index (N*N,) long)` for a token grid.

    Entry `index[i * N + j]` is the row of `offsets` holding (col_j - col_i, row_j - row_i).
    """
    return _offset_tables(int(grid[0]), int(grid[1]), torch.device(device))


# ---------------------------------------------------------------------------- the formulas
# One function per family: the family's parameter tensors for its Hf heads (in head order) and
# the offsets `(K, 2)` as (dx, dy) in the parameters' dtype -> the per-head values `(Hf, K)`.
# `SpatialPrior` (the model) and `spvit.supernet.SuperPriors` (the supernet) both call these.

def mlp_prior(offsets: torch.Tensor, fc1: Callable[[torch.Tensor], torch.Tensor],
              weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """SP_h(d) = w_h . relu(W1_h d + b1_h) + b_h with `weight (Hm, dh)` = the w_h, `bias (Hm,)`
    = the b_h and `fc1` the first layer of all Hm heads, `(K, 2) -> (K, Hm*dh)` (an
    `nn.Linear(2, Hm*dh)` whose rows h*dh..(h+1)*dh are W1_h, b1_h, or `F.linear` with such
    tensors) -> `(Hm, K)`. The first layer is a callable so that the model's stays a module."""
    hidden = F.relu(fc1(offsets)).view(-1, weight.shape[0], weight.shape[1])  # (K, Hm, dh)
    return (hidden * weight).sum(-1).t() + bias[:, None]


def gaussian_prior(offsets: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """SP_h(d) = 1 + a_h exp(-(dx / sx_h)^2 / 2 - (dy / sy_h)^2 / 2) with `params (Hg, 3)` =
    [a, log sx, log sy] -> `(Hg, K)`."""
    amp = params[:, 0:1]
    sx, sy = params[:, 1:2].exp(), params[:, 2:3].exp()
    dx, dy = offsets[:, 0][None], offsets[:, 1][None]
    return 1.0 + amp * torch.exp(-0.5 * ((dx / sx) ** 2 + (dy / sy) ** 2))


def axial_prior(offsets: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """SP_h(d) = 1 + r_h exp(-(dy / w_h)^2 / 2) + c_h exp(-(dx / w_h)^2 / 2) with
    `params (Ha, 3)` = [r, c, log w] -> `(Ha, K)`."""
    row, col, w = params[:, 0:1], params[:, 1:2], params[:, 2:3].exp()
    dx, dy = offsets[:, 0][None], offsets[:, 1][None]
    return 1.0 + row * torch.exp(-0.5 * (dy / w) ** 2) + col * torch.exp(-0.5 * (dx / w) ** 2)


def rpb_prior(offsets: torch.Tensor, table: torch.Tensor, grid_size: int) -> torch.Tensor:
    """B_h(d) = T_h[dy + S - 1, dx + S - 1] with `table (Hr, 2S-1, 2S-1)`, S = `grid_size`;
    offsets beyond the table read its nearest edge entry -> `(Hr, K)`."""
    side = 2 * grid_size - 1
    pos = (offsets.round().long() + grid_size - 1).clamp(0, side - 1)  # (K, 2) as (col, row)
    return table.flatten(1).index_select(1, pos[:, 1] * side + pos[:, 0])


def decay_prior(offsets: torch.Tensor, slopes: torch.Tensor) -> torch.Tensor:
    """B_h(d) = -l_h |d| with `slopes (Hd,)` -> `(Hd, K)`."""
    dist = offsets.pow(2).sum(-1).sqrt()  # (K,) Euclidean offset length, a constant
    return -slopes[:, None] * dist[None]


FORMULAS = {"mlp": mlp_prior, "gaussian": gaussian_prior, "axial": axial_prior,
            "rpb": rpb_prior, "decay": decay_prior}
FAMILIES: tuple[str, ...] = tuple(FORMULAS)
_MULT_FAMILIES = tuple(f for f in FAMILIES if f in MULTIPLICATIVE)
_ADD_FAMILIES = tuple(f for f in FAMILIES if f in ADDITIVE)


def head_order(head_types: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """`(mult_order (H,), add_order (H,))`: the row of head h in the stacked multiplicative /
    additive tables of `offset_values_of` (families in `FAMILIES` order, each family's heads in
    head order, then one identity row that every head of another kind reads)."""
    orders = []
    for families in (_MULT_FAMILIES, _ADD_FAMILIES):
        rows = [h for f in families for h, t in enumerate(head_types) if t == f]
        orders.append(torch.tensor([rows.index(h) if h in rows else len(rows)
                                    for h in range(len(head_types))], dtype=torch.long))
    return orders[0], orders[1]


def offset_values_of(params: Mapping[str, Sequence[Any]], offsets: torch.Tensor,
                     *, mult_order: torch.Tensor, add_order: torch.Tensor
                     ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Every head's prior over the offsets: `(mult (H, K), bias (H, K))`, None for a kind no
    family in `params` has.

    `params[f]` holds the arguments after `offsets` of family f's formula (`FORMULAS`), for that
    family's heads in head order; `*_order` come from `head_order`. Values are in `offsets`'
    dtype.
    """
    out = []
    for families, identity, order in ((_MULT_FAMILIES, 1.0, mult_order),
                                      (_ADD_FAMILIES, 0.0, add_order)):
        rows = [FORMULAS[f](offsets, *params[f]).to(offsets.dtype)
                for f in families if f in params]
        if not rows:
            out.append(None)
            continue
        rows.append(torch.full((1, offsets.shape[0]), identity, dtype=offsets.dtype,
                               device=offsets.device))
        out.append(torch.cat(rows, 0).index_select(0, order))  # (H, K)
    return out[0], out[1]


def gather_pairs(table: torch.Tensor | None, grid: Grid, num_prefix: int, *,
                 identity: float) -> torch.Tensor | None:
    """A per-offset table `(H, K)` over all token pairs: `(H, P + N, P + N)`, N = Gh*Gw.

    Prefix (class-token) rows and columns hold `identity` (1 for a multiplier, 0 for a bias).
    """
    if table is None:
        return None
    _, index = offset_tables(grid, table.device)
    n = grid[0] * grid[1]
    full = table.index_select(1, index).view(table.shape[0], n, n)  # (H, N, N)
    if num_prefix:
        full = F.pad(full, (num_prefix, 0, num_prefix, 0), value=identity)
    return full


class SpatialPrior(nn.Module):
    """The spatial priors of one attention block, one type per head (see the module docstring).

    Args:
        head_types: prior type of each head (`none`, `mlp`, `gaussian`, `axial`, `rpb`,
            `decay`).
        head_dim: per-head width (hidden width of the `mlp` prior).
        grid_size: the block's patch-grid side S in the architecture (size of `rpb` tables).
    """

    def __init__(self, head_types: tuple[str, ...], *, head_dim: int, grid_size: int) -> None:
        super().__init__()
        self.head_types = tuple(head_types)
        self.num_heads = len(head_types)
        self.head_dim = head_dim
        self.grid_size = grid_size
        idx = {t: [h for h, p in enumerate(head_types) if p == t] for t in set(head_types)}
        self.mlp_heads = tuple(idx.get("mlp", ()))
        self.gaussian_heads = tuple(idx.get("gaussian", ()))
        self.axial_heads = tuple(idx.get("axial", ()))
        self.rpb_heads = tuple(idx.get("rpb", ()))
        self.decay_heads = tuple(idx.get("decay", ()))
        self.is_multiplicative = any(t in MULTIPLICATIVE for t in head_types)
        self.is_additive = any(t in ADDITIVE for t in head_types)

        hm = len(self.mlp_heads)
        if hm:
            self.mlp_fc1 = nn.Linear(2, hm * head_dim)
            self.mlp_weight = nn.Parameter(torch.empty(hm, head_dim))
            self.mlp_bias = nn.Parameter(torch.empty(hm))
        if self.gaussian_heads:
            self.gaussian = nn.Parameter(torch.empty(len(self.gaussian_heads), 3))
        if self.axial_heads:
            self.axial = nn.Parameter(torch.empty(len(self.axial_heads), 3))
        if self.rpb_heads:
            side = 2 * grid_size - 1
            self.rpb_table = nn.Parameter(torch.empty(len(self.rpb_heads), side, side))
        if self.decay_heads:
            self.decay = nn.Parameter(torch.empty(len(self.decay_heads)))

        # Row order of the per-head multiplier / bias (see `head_order`): a table for all heads
        # is one index_select.
        mult_order, add_order = head_order(self.head_types)
        self.register_buffer("mult_order", mult_order, persistent=False)
        self.register_buffer("add_order", add_order, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Identity priors: SP = 1 for multiplicative heads, B = 0 for additive heads."""
        if self.mlp_heads:
            nn.init.trunc_normal_(self.mlp_fc1.weight, std=0.02)
            nn.init.zeros_(self.mlp_fc1.bias)
            nn.init.zeros_(self.mlp_weight)
            nn.init.ones_(self.mlp_bias)
        if self.gaussian_heads:
            with torch.no_grad():
                self.gaussian[:, 0] = 0.0
                self.gaussian[:, 1:] = math.log(2.0)
        if self.axial_heads:
            with torch.no_grad():
                self.axial[:, :2] = 0.0
                self.axial[:, 2] = 0.0
        if self.rpb_heads:
            nn.init.zeros_(self.rpb_table)
        if self.decay_heads:
            nn.init.zeros_(self.decay)

    # ------------------------------------------------------------------ tables over offsets
    def family_params(self) -> dict[str, tuple[Any, ...]]:
        """The arguments after `offsets` of each present family's formula (see
        `offset_values_of`), for that family's heads in head order."""
        params: dict[str, tuple[Any, ...]] = {}
        if self.mlp_heads:
            params["mlp"] = (self.mlp_fc1, self.mlp_weight, self.mlp_bias)
        if self.gaussian_heads:
            params["gaussian"] = (self.gaussian,)
        if self.axial_heads:
            params["axial"] = (self.axial,)
        if self.rpb_heads:
            params["rpb"] = (self.rpb_table, self.grid_size)
        if self.decay_heads:
            params["decay"] = (self.decay,)
        return params

    def offset_values(self, grid: Grid) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Per-head tables over the unique offsets of `grid`: `(mult (H, K), bias (H, K))`.

        K = (2*Gh - 1) * (2*Gw - 1), offsets in row-major (dy, dx) order from (-(Gh-1), -(Gw-1)).
        Heads of another kind hold the identity (1 in `mult`, 0 in `bias`); a kind no head uses
        is `None`.
        """
        offsets, _ = offset_tables(grid, self.mult_order.device)
        return offset_values_of(self.family_params(), offsets.to(self._param_dtype()),
                                mult_order=self.mult_order, add_order=self.add_order)

    def _param_dtype(self) -> torch.dtype:
        for p in self.parameters():
            return p.dtype
        return torch.get_default_dtype()

    def forward(self, grid: Grid, num_prefix: int = 0
                ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """`(mult (H, N, N), bias (H, N, N))` over all token pairs, N = num_prefix + Gh*Gw.

        Prefix (class-token) rows and columns are the identity: 1 in `mult`, 0 in `bias`.
        """
        mult, bias = self.offset_values(grid)
        return (gather_pairs(mult, grid, num_prefix, identity=1.0),
                gather_pairs(bias, grid, num_prefix, identity=0.0))

    def tables(self, grid: Grid) -> torch.Tensor:
        """Per-head prior over offsets as `(H, 2*Gh - 1, 2*Gw - 1)`, indexed [dy + Gh-1, dx + Gw-1].

        Multiplicative heads give their multiplier, additive heads their bias, `none` heads the
        identity of the block's kind (1 if any head is multiplicative, else 0).
        """
        mult, bias = self.offset_values(grid)
        shape = (self.num_heads, 2 * grid[0] - 1, 2 * grid[1] - 1)
        if mult is None:
            return bias.reshape(shape)
        if bias is None:
            return mult.reshape(shape)
        additive = torch.tensor([t in ADDITIVE for t in self.head_types], device=mult.device)
        return torch.where(additive[:, None], bias, mult).reshape(shape)

    def extra_repr(self) -> str:
        return f"head_types={self.head_types}, head_dim={self.head_dim}, grid={self.grid_size}"
