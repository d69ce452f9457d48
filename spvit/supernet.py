"""A weight-sharing SP-ViT supernet: one network that holds every architecture of a search space.

`SPViTSupernet(choices)` is built from `SupernetChoices`, a plain description of the values each
dimension of a space can take (the glue from a search-space file lives in `nas.oneshot`; spvit
knows nothing of search). `set_active(spec)` selects one `ArchSpec`; the forward pass then
computes exactly what `SPViT(spec)` would compute with the inherited weights, and
`subnet(spec)` builds that stand-alone `SPViT` (through `spvit.create_model`) and copies the
inherited slices into it by parameter name, so a chosen subnet can be fine-tuned or exported.

How weights are shared (weight entanglement, as in AutoFormer): every layer is allocated at the
largest size any subnet needs at that position and a subnet uses its leading slice.

* depth: the first k blocks;
* width: the first C channels of every tensor of a block of width C, also after token pools
  (each block is as wide as the widest subnet can be there: embed_dim x pool_width_factor^pools);
* mlp ratio: the first int(C * mlp_ratio) hidden units;
* heads: the first C rows of each of Q, K and V, regrouped into H heads of C / H channels;
* stem and classifier: the first embed_dim output channels / the first C input columns; norms:
  the first C entries (statistics over the active channels only);
* per-head prior type: head slot h of a block holds the parameters of every prior family the
  space offers (`mlp` hidden units sliced to the active head width; `gaussian`, `axial` and
  `decay` their few numbers; `rpb` tables for the largest grid the block can see, centre-cropped
  for a smaller one); the subnet picks one per head;
* token pooling: one pool layer at every block index some schedule pools at (per width factor);
* attention sharing: a sharing block applies the previous block's attention probabilities to its
  own V slice (the V rows of its Q/K/V layer) and its own output projection; no Q Kᵀ;
* positional encoding: `learned` and `learned_sincos` read the same learnable embedding (per
  patch size, first embed_dim channels); `sincos` is computed for the active width;
* residual scaling `skip_lam` and `conv_pos_place` change no weight: the block's forward divides
  both residual branches by the subnet's `skip_lam` and runs the (shared) conv positional layer
  before the attention or after the MLP, as `spvit.model.Block` does.

Not shared: each patch size has its own stem and learned positional embedding (a kernel of
another size is a different function). Initialisation does not apply to inherited weights: the
`init` field of an `ArchSpec`, and the sin-cos starting value of a `learned_sincos` embedding (the
shared embedding starts N(0, 0.02), as `learned`), are carried along for stand-alone retraining.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import drop_path, resample_abs_pos_embed
from torch import nn

from .arch import ArchSpec
from .errors import ConfigError
from .layers import ConvStem, LinearStem, map_to_tokens, sincos_2d, tokens_to_map
from .model import LN_EPS, SPViT
from .priors import ADDITIVE, MULTIPLICATIVE, offset_tables

Grid = tuple[int, int]
FAMILIES: tuple[str, ...] = ("mlp", "gaussian", "axial", "rpb", "decay")
LEARNED_POS: tuple[str, ...] = ("learned", "learned_sincos")  # one learnable embedding


def _schedule_fits(schedule: Sequence[int], depth: int, side: int) -> bool:
    for i in schedule:
        if i >= depth or side < 3:
            return False
        side = math.ceil(side / 2)
    return True


@dataclass(frozen=True)
class SupernetChoices:
    """The values each dimension can take: what the supernet must be able to represent.

    Args:
        img_size, in_chans, num_classes, stem, head: fixed for every subnet.
        cls_block: the class token's joining block (negative: counted from the end).
        depths, patch_sizes, embed_dims, mlp_ratios, pool_width_factors, pos_embeds, conv_pos,
            qkv_bias: the values of the global `ArchSpec` fields.
        heads: head counts per block; prior_types: prior types per head.
        pool_schedules: every pool schedule (sorted block indices) a subnet may use.
        share: whether blocks may share attention (`(False,)` or `(False, True)`).
        skip_lams, conv_pos_places: the values of `skip_lam` and `conv_pos_place` (no weights
            depend on them; the defaults are the `ArchSpec` defaults).
    """

    img_size: int
    in_chans: int
    num_classes: int
    stem: str
    head: str
    cls_block: int
    depths: tuple[int, ...]
    patch_sizes: tuple[int, ...]
    embed_dims: tuple[int, ...]
    mlp_ratios: tuple[float, ...]
    pool_width_factors: tuple[int, ...]
    heads: tuple[int, ...]
    prior_types: tuple[str, ...]
    pos_embeds: tuple[str, ...]
    conv_pos: tuple[bool, ...]
    qkv_bias: tuple[bool, ...]
    pool_schedules: tuple[tuple[int, ...], ...] = ((),)
    share: tuple[bool, ...] = (False,)
    skip_lams: tuple[float, ...] = (1.0,)
    conv_pos_places: tuple[str, ...] = ("before_attn",)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
                object.__setattr__(self, f.name, value)
            if isinstance(value, tuple) and not value:
                raise ConfigError(f"supernet choices: {f.name} is empty; every dimension needs"
                                  " at least one value. List one.")
        object.__setattr__(self, "mlp_ratios", tuple(float(r) for r in self.mlp_ratios))
        object.__setattr__(self, "skip_lams", tuple(float(r) for r in self.skip_lams))
        object.__setattr__(self, "pool_schedules",
                           tuple(tuple(sorted(s)) for s in self.pool_schedules))

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        return {k: ([list(s) for s in v] if k == "pool_schedules" else
                    list(v) if isinstance(v, tuple) else v) for k, v in out.items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SupernetChoices:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown supernet choice field(s) {unknown}. Valid fields:"
                              f" {sorted(names)}.")
        kwargs = {k: (tuple(tuple(s) for s in v) if k == "pool_schedules" else
                      tuple(v) if isinstance(v, list) else v) for k, v in data.items()}
        return cls(**kwargs)

    # ------------------------------------------------------------------ derived
    @property
    def max_depth(self) -> int:
        return max(self.depths)

    def resolve_cls_block(self, depth: int) -> int:
        if self.head != "cls":
            return 0
        return self.cls_block + depth if self.cls_block < 0 else self.cls_block

    def _layouts(self) -> list[tuple[int, int, tuple[int, ...]]]:
        """Every (depth, patch size, schedule) a subnet can have."""
        return [(d, p, s) for d in self.depths for p in self.patch_sizes
                for s in self.pool_schedules if _schedule_fits(s, d, self.img_size // p)]

    def block_extents(self) -> list[dict[str, int]]:
        """Per block index: the largest input width, width, grid side, head width and hidden
        size any subnet has there, and the pool width factors it may pool with."""
        f_max = max(self.pool_width_factors)
        d_max = max(self.embed_dims)
        out = [{"in_width": 0, "width": 0, "grid": 0, "pool": 0} for _ in range(self.max_depth)]
        for depth, patch, schedule in self._layouts():
            side, pools = self.img_size // patch, 0
            for i in range(depth):
                e = out[i]
                e["in_width"] = max(e["in_width"], d_max * f_max ** pools)
                if i in schedule:
                    pools += 1
                    side = math.ceil(side / 2)
                    e["pool"] = 1
                e["width"] = max(e["width"], d_max * f_max ** pools)
                e["grid"] = max(e["grid"], side)
        min_heads = min(self.heads)
        for e in out:
            e["head_dim"] = e["width"] // min_heads
            e["hidden"] = int(e["width"] * max(self.mlp_ratios))
        return out

    def why_not(self, spec: ArchSpec) -> str | None:
        """None if the supernet holds `spec`, else one line naming the dimension and value."""
        fixed = {"img_size": self.img_size, "in_chans": self.in_chans,
                 "num_classes": self.num_classes, "stem": self.stem, "head": self.head}
        for name, want in fixed.items():
            if getattr(spec, name) != want:
                return f"{name} {getattr(spec, name)!r} differs from the supernet's {want!r}"
        listed = {"depth": (spec.depth, self.depths),
                  "patch_size": (spec.patch_size, self.patch_sizes),
                  "embed_dim": (spec.embed_dim, self.embed_dims),
                  "mlp_ratio": (spec.mlp_ratio, self.mlp_ratios),
                  "pool_width_factor": (spec.pool_width_factor, self.pool_width_factors),
                  "pos_embed": (spec.pos_embed, self.pos_embeds),
                  "conv_pos": (spec.conv_pos, self.conv_pos),
                  "qkv_bias": (spec.qkv_bias, self.qkv_bias),
                  "skip_lam": (spec.skip_lam, self.skip_lams),
                  "conv_pos_place": (spec.conv_pos_place, self.conv_pos_places)}
        for name, (value, allowed) in listed.items():
            if value not in allowed:
                return f"{name} {value!r} is not among the supernet's choices {list(allowed)}"
        if spec.head == "cls" and spec.cls_block != self.resolve_cls_block(spec.depth):
            return (f"cls_block {spec.cls_block} differs from the supernet's"
                    f" {self.resolve_cls_block(spec.depth)} at depth {spec.depth}")
        pooled = tuple(i for i, b in enumerate(spec.blocks) if b.pool)
        if pooled not in self.pool_schedules:
            return (f"pool schedule {list(pooled)} is not among the supernet's schedules"
                    f" {[list(s) for s in self.pool_schedules]}")
        for i, b in enumerate(spec.blocks):
            if b.share and True not in self.share:
                return f"share_{i} True is not among the supernet's choices {list(self.share)}"
            if b.heads not in self.heads:
                return f"heads_{i} {b.heads} is not among the supernet's choices {list(self.heads)}"
            for p in b.head_priors:
                if p not in self.prior_types:
                    return (f"prior_{i} {p!r} is not among the supernet's prior types"
                            f" {list(self.prior_types)}")
        return None


# ---------------------------------------------------------------------------- the active subnet
@dataclass(frozen=True)
class _BlockPlan:
    in_dim: int
    dim: int
    heads: int
    head_types: tuple[str, ...]
    share: bool
    pool: bool
    width_factor: int
    arch_grid: int
    cls_before: bool
    has_cls: bool
    keep_attn: bool
    conv_pos: bool
    qkv_bias: bool
    hidden: int
    drop_path: float
    skip_lam: float
    conv_pos_end: bool


@dataclass(frozen=True)
class _Plan:
    spec: ArchSpec
    blocks: tuple[_BlockPlan, ...]
    cls_from_stem: bool
    cls_width: int


def _plan(spec: ArchSpec) -> _Plan:
    """What each block of `SPViT(spec)` is, in the terms the supernet's layers need."""
    widths, grids, has_cls = spec.block_widths(), spec.block_grids(), spec.block_has_cls()
    has_token = spec.head == "cls"
    from_stem = has_token and spec.cls_block == 0
    dpr = [spec.drop_path_rate * i / max(spec.depth - 1, 1) for i in range(spec.depth)]
    blocks, in_dim = [], spec.embed_dim
    for i, b in enumerate(spec.blocks):
        blocks.append(_BlockPlan(
            in_dim=in_dim, dim=widths[i], heads=b.heads, head_types=b.head_priors,
            share=b.share, pool=b.pool, width_factor=spec.pool_width_factor,
            arch_grid=grids[i], cls_before=has_token and (from_stem or spec.cls_block < i),
            has_cls=has_cls[i], keep_attn=i + 1 < spec.depth and spec.blocks[i + 1].share,
            conv_pos=spec.conv_pos, qkv_bias=spec.qkv_bias, hidden=int(widths[i] * spec.mlp_ratio),
            drop_path=dpr[i], skip_lam=spec.skip_lam,
            conv_pos_end=spec.conv_pos_place == "end"))
        in_dim = widths[i]
    cls_width = spec.embed_dim if from_stem else (widths[spec.cls_block] if has_token else 0)
    return _Plan(spec=spec, blocks=tuple(blocks), cls_from_stem=from_stem, cls_width=cls_width)


# ---------------------------------------------------------------------------- sliced layers
class SuperLinear(nn.Module):
    """A Linear layer at its largest size; `forward(x, out, in_)` uses the leading slice."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.weight, std=0.02)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def sliced(self, out: int, in_: int, use_bias: bool = True
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        bias = self.bias[:out] if (use_bias and self.bias is not None) else None
        return self.weight[:out, :in_], bias

    def forward(self, x: torch.Tensor, out: int, in_: int, use_bias: bool = True) -> torch.Tensor:
        return F.linear(x, *self.sliced(out, in_, use_bias))


class SuperLayerNorm(nn.Module):
    """LayerNorm over the first C channels with the first C affine entries."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        C = x.shape[-1]
        return F.layer_norm(x, (C,), self.weight[:C], self.bias[:C], LN_EPS)

    def export(self, C: int) -> dict[str, torch.Tensor]:
        return {"weight": self.weight[:C], "bias": self.bias[:C]}


class SuperDWConv(nn.Module):
    """A depthwise 3x3 convolution with `multiplier` outputs per input channel, sliced to the
    first C inputs (output channel j reads input j // multiplier in every slice)."""

    def __init__(self, channels: int, multiplier: int = 1) -> None:
        super().__init__()
        self.multiplier = multiplier
        self.weight = nn.Parameter(torch.empty(channels * multiplier, 1, 3, 3))
        self.bias = nn.Parameter(torch.empty(channels * multiplier))

    def reset_parameters(self) -> None:
        # PyTorch's Conv2d default (what the stand-alone layers start from).
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        nn.init.uniform_(self.bias, -1 / 3, 1 / 3)  # 1 / sqrt(fan_in), fan_in = 9

    def forward(self, fmap: torch.Tensor, *, stride: int) -> torch.Tensor:
        C = fmap.shape[1]
        n = C * self.multiplier
        return F.conv2d(fmap, self.weight[:n], self.bias[:n], stride=stride, padding=1, groups=C)

    def export(self, C: int) -> dict[str, torch.Tensor]:
        n = C * self.multiplier
        return {"weight": self.weight[:n], "bias": self.bias[:n]}


class SuperPool(nn.Module):
    """`spvit.layers.TokenPool` at its largest input width, for one width factor."""

    def __init__(self, dim: int, *, width_factor: int, cls_proj: bool) -> None:
        super().__init__()
        self.width_factor = width_factor
        self.conv = SuperDWConv(dim, width_factor)
        self.cls_proj = (SuperLinear(dim, dim * width_factor)
                         if cls_proj and width_factor > 1 else None)

    def forward(self, x: torch.Tensor, grid: Grid, num_prefix: int) -> tuple[torch.Tensor, Grid]:
        prefix, fmap = tokens_to_map(x, grid, num_prefix)
        C = fmap.shape[1]
        fmap = self.conv(fmap, stride=2)  # (B, C*f, ceil(Gh/2), ceil(Gw/2))
        if num_prefix and self.cls_proj is not None:
            prefix = self.cls_proj(prefix, C * self.width_factor, C)
        return map_to_tokens(prefix, fmap), (fmap.shape[-2], fmap.shape[-1])

    def export(self, C: int, has_cls: bool) -> dict[str, torch.Tensor]:
        out = {f"conv.{k}": v for k, v in self.conv.export(C).items()}
        if has_cls and self.cls_proj is not None:
            w, b = self.cls_proj.sliced(C * self.width_factor, C)
            out.update({"cls_proj.weight": w, "cls_proj.bias": b})
        return out


class SuperPriors(nn.Module):
    """Every prior family's parameters for each head slot of one block.

    Shapes (Hs = head slots, dm = largest head width, S = largest grid side):
    `mlp_fc1_weight (Hs, dm, 2)`, `mlp_fc1_bias (Hs, dm)`, `mlp_weight (Hs, dm)`,
    `mlp_bias (Hs,)`, `gaussian (Hs, 3)`, `axial (Hs, 3)`, `rpb_table (Hs, 2S-1, 2S-1)`,
    `decay (Hs,)`; only the families in `families` exist.
    """

    def __init__(self, families: Sequence[str], *, slots: int, head_dim: int,
                 grid_size: int) -> None:
        super().__init__()
        self.families = tuple(f for f in FAMILIES if f in families)
        self.grid_size = grid_size
        if "mlp" in self.families:
            self.mlp_fc1_weight = nn.Parameter(torch.empty(slots, head_dim, 2))
            self.mlp_fc1_bias = nn.Parameter(torch.empty(slots, head_dim))
            self.mlp_weight = nn.Parameter(torch.empty(slots, head_dim))
            self.mlp_bias = nn.Parameter(torch.empty(slots))
        if "gaussian" in self.families:
            self.gaussian = nn.Parameter(torch.empty(slots, 3))
        if "axial" in self.families:
            self.axial = nn.Parameter(torch.empty(slots, 3))
        if "rpb" in self.families:
            side = 2 * grid_size - 1
            self.rpb_table = nn.Parameter(torch.empty(slots, side, side))
        if "decay" in self.families:
            self.decay = nn.Parameter(torch.empty(slots))

    def reset_parameters(self) -> None:
        """Identity priors, as `spvit.priors.SpatialPrior.reset_parameters`."""
        with torch.no_grad():
            if "mlp" in self.families:
                nn.init.trunc_normal_(self.mlp_fc1_weight, std=0.02)
                self.mlp_fc1_bias.zero_()
                self.mlp_weight.zero_()
                self.mlp_bias.fill_(1.0)
            if "gaussian" in self.families:
                self.gaussian[:, 0] = 0.0
                self.gaussian[:, 1:] = math.log(2.0)
            if "axial" in self.families:
                self.axial.zero_()
            if "rpb" in self.families:
                self.rpb_table.zero_()
            if "decay" in self.families:
                self.decay.zero_()

    def _rpb_crop(self, heads: torch.Tensor, arch_grid: int) -> torch.Tensor:
        c = self.grid_size - arch_grid
        side = 2 * arch_grid - 1
        return self.rpb_table.index_select(0, heads)[:, c:c + side, c:c + side]

    def export(self, head_types: tuple[str, ...], head_dim: int,
               arch_grid: int) -> dict[str, torch.Tensor]:
        """The stand-alone `SpatialPrior`'s tensors (its heads grouped by family, in order)."""
        by = {t: [h for h, p in enumerate(head_types) if p == t] for t in FAMILIES}
        out: dict[str, torch.Tensor] = {}
        if by["mlp"]:
            idx = by["mlp"]
            d = head_dim
            out["mlp_fc1.weight"] = self.mlp_fc1_weight[idx, :d].reshape(len(idx) * d, 2)
            out["mlp_fc1.bias"] = self.mlp_fc1_bias[idx, :d].reshape(-1)
            out["mlp_weight"] = self.mlp_weight[idx, :d]
            out["mlp_bias"] = self.mlp_bias[idx]
        if by["gaussian"]:
            out["gaussian"] = self.gaussian[by["gaussian"]]
        if by["axial"]:
            out["axial"] = self.axial[by["axial"]]
        if by["rpb"]:
            idx = torch.tensor(by["rpb"], device=self.rpb_table.device)
            out["rpb_table"] = self._rpb_crop(idx, arch_grid)
        if by["decay"]:
            out["decay"] = self.decay[by["decay"]]
        return out

    def forward(self, head_types: tuple[str, ...], head_dim: int, arch_grid: int, grid: Grid,
                num_prefix: int, dtype: torch.dtype
                ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """`(mult (H, N, N), bias (H, N, N))` for the active heads (None where no head has one);
        the same function of the parameters as `SpatialPrior.forward`."""
        H = len(head_types)
        ref = next(self.parameters())
        offsets, index = offset_tables(grid, ref.device)
        off = offsets.to(dtype)  # (K, 2) as (dx, dy)
        K = off.shape[0]
        dx, dy = off[:, 0][None], off[:, 1][None]
        by = {t: [h for h, p in enumerate(head_types) if p == t] for t in FAMILIES}
        mult = bias = None
        if any(t in MULTIPLICATIVE for t in head_types):
            mult = torch.ones(H, K, dtype=dtype, device=ref.device)
            if by["mlp"]:
                idx = torch.tensor(by["mlp"], device=ref.device)
                d = head_dim
                w1 = self.mlp_fc1_weight.index_select(0, idx)[:, :d]  # (Hm, d, 2)
                b1 = self.mlp_fc1_bias.index_select(0, idx)[:, :d]
                hidden = F.relu(torch.einsum("kc,hdc->hkd", off, w1) + b1[:, None])  # (Hm, K, d)
                w = self.mlp_weight.index_select(0, idx)[:, :d]
                vals = (hidden * w[:, None]).sum(-1) + self.mlp_bias.index_select(0, idx)[:, None]
                mult = mult.index_copy(0, idx, vals.to(dtype))
            if by["gaussian"]:
                idx = torch.tensor(by["gaussian"], device=ref.device)
                g = self.gaussian.index_select(0, idx)
                amp, sx, sy = g[:, 0:1], g[:, 1:2].exp(), g[:, 2:3].exp()
                vals = 1.0 + amp * torch.exp(-0.5 * ((dx / sx) ** 2 + (dy / sy) ** 2))
                mult = mult.index_copy(0, idx, vals.to(dtype))
            if by["axial"]:
                idx = torch.tensor(by["axial"], device=ref.device)
                a = self.axial.index_select(0, idx)
                row, col, w = a[:, 0:1], a[:, 1:2], a[:, 2:3].exp()
                vals = (1.0 + row * torch.exp(-0.5 * (dy / w) ** 2)
                        + col * torch.exp(-0.5 * (dx / w) ** 2))
                mult = mult.index_copy(0, idx, vals.to(dtype))
        if any(t in ADDITIVE for t in head_types):
            bias = torch.zeros(H, K, dtype=dtype, device=ref.device)
            if by["rpb"]:
                idx = torch.tensor(by["rpb"], device=ref.device)
                table = self._rpb_crop(idx, arch_grid)  # (Hr, 2s-1, 2s-1)
                gh, gw = grid
                s = arch_grid
                ry = (torch.arange(-(gh - 1), gh, device=ref.device) + s - 1).clamp(0, 2 * s - 2)
                rx = (torch.arange(-(gw - 1), gw, device=ref.device) + s - 1).clamp(0, 2 * s - 2)
                vals = table.index_select(1, ry).index_select(2, rx).reshape(len(by["rpb"]), -1)
                bias = bias.index_copy(0, idx, vals.to(dtype))
            if by["decay"]:
                idx = torch.tensor(by["decay"], device=ref.device)
                dist = off.pow(2).sum(-1).sqrt()  # (K,) Euclidean offset length
                vals = -self.decay.index_select(0, idx)[:, None] * dist[None]  # (Hd, K)
                bias = bias.index_copy(0, idx, vals.to(dtype))
        n = grid[0] * grid[1]
        out = []
        for table, identity in ((mult, 1.0), (bias, 0.0)):
            if table is None:
                out.append(None)
                continue
            full = table.index_select(1, index).view(H, n, n)  # (H, Np, Np)
            if num_prefix:
                full = F.pad(full, (num_prefix, 0, num_prefix, 0), value=identity)
            out.append(full)
        return out[0], out[1]


class SuperAttention(nn.Module):
    """Q/K/V, output projection and per-head-slot priors of one block at its largest width."""

    def __init__(self, dim: int, *, slots: int, head_dim: int, families: Sequence[str],
                 grid_size: int, qkv_bias: bool) -> None:
        super().__init__()
        self.dim = dim
        self.qkv = SuperLinear(dim, 3 * dim, bias=qkv_bias)
        self.proj = SuperLinear(dim, dim)
        self.prior = (SuperPriors(families, slots=slots, head_dim=head_dim, grid_size=grid_size)
                      if families else None)

    def qkv_sliced(self, C: int, parts: Sequence[int], use_bias: bool
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rows of Q (part 0), K (1), V (2) for width C, each the first C of its part."""
        w = torch.cat([self.qkv.weight[p * self.dim:p * self.dim + C, :C] for p in parts])
        b = None
        if use_bias and self.qkv.bias is not None:
            b = torch.cat([self.qkv.bias[p * self.dim:p * self.dim + C] for p in parts])
        return w, b

    def forward(self, x: torch.Tensor, plan: _BlockPlan, grid: Grid, num_prefix: int,
                shared: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, N, C = x.shape
        H = plan.heads
        d = C // H
        if plan.share:
            if shared is None:
                raise RuntimeError("a shared-attention block needs the previous block's attention")
            v = F.linear(x, *self.qkv_sliced(C, (2,), plan.qkv_bias))
            v = v.reshape(B, N, H, d).transpose(1, 2)  # (B, H, N, d)
            out = (shared.to(v.dtype) @ v).transpose(1, 2).reshape(B, N, C)
            return self.proj(out, C, C), shared
        qkv = F.linear(x, *self.qkv_sliced(C, (0, 1, 2), plan.qkv_bias))
        q, k, v = qkv.reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4).contiguous().unbind(0)
        mult = bias = None
        if self.prior is not None and any(t != "none" for t in plan.head_types):
            mult, bias = self.prior(plan.head_types, d, plan.arch_grid, grid, num_prefix,
                                    x.dtype)
        scale = d ** -0.5
        logits = q @ k.transpose(-2, -1)  # (B, H, N, N)
        logits = logits * (mult * scale if mult is not None else scale)
        if bias is not None:
            logits = logits + bias
        attn = logits.softmax(dim=-1)
        out = (attn.to(v.dtype) @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj(out, C, C), attn

    def export(self, plan: _BlockPlan) -> dict[str, torch.Tensor]:
        C = plan.dim
        out: dict[str, torch.Tensor] = {}
        w, b = self.qkv_sliced(C, (2,) if plan.share else (0, 1, 2), plan.qkv_bias)
        name = "v" if plan.share else "qkv"
        out[f"{name}.weight"] = w
        if b is not None:
            out[f"{name}.bias"] = b
        out["proj.weight"], out["proj.bias"] = self.proj.sliced(C, C)
        if not plan.share and any(t != "none" for t in plan.head_types):
            for k, v in self.prior.export(plan.head_types, C // plan.heads,
                                          plan.arch_grid).items():
                out[f"prior.{k}"] = v
        return out


class SuperBlock(nn.Module):
    """One block position of the supernet (see `spvit.model.Block` for what it computes)."""

    def __init__(self, extent: Mapping[str, int], *, choices: SupernetChoices,
                 pool_here: bool) -> None:
        super().__init__()
        W = extent["width"]
        self.pools = nn.ModuleDict()
        if pool_here:
            for f in choices.pool_width_factors:
                self.pools[f"f{f}"] = SuperPool(extent["in_width"], width_factor=f,
                                                cls_proj=choices.head == "cls")
        self.conv_pos = SuperDWConv(W) if True in choices.conv_pos else None
        self.norm1 = SuperLayerNorm(W)
        families = [t for t in choices.prior_types if t != "none"]
        self.attn = SuperAttention(W, slots=max(choices.heads), head_dim=extent["head_dim"],
                                   families=families, grid_size=extent["grid"],
                                   qkv_bias=True in choices.qkv_bias)
        self.norm2 = SuperLayerNorm(W)
        self.fc1 = SuperLinear(W, extent["hidden"])
        self.fc2 = SuperLinear(extent["hidden"], W)

    def forward(self, x: torch.Tensor, grid: Grid, plan: _BlockPlan,
                attn: torch.Tensor | None, cls_token: torch.Tensor | None
                ) -> tuple[torch.Tensor, Grid, torch.Tensor | None]:
        num_prefix = int(plan.cls_before)
        if plan.pool:
            x, grid = self.pools[f"f{plan.width_factor}"](x, grid, num_prefix)
        if cls_token is not None:
            x = torch.cat([cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        num_prefix = int(plan.has_cls)
        if plan.conv_pos and not plan.conv_pos_end:
            x = self._conv_pos(x, grid, num_prefix)
        y, attn = self.attn(self.norm1(x), plan, grid, num_prefix, attn)
        x = x + self._drop(y, plan.drop_path) / plan.skip_lam
        C, hidden = plan.dim, plan.hidden
        h = F.gelu(self.fc1(self.norm2(x), hidden, C))
        x = x + self._drop(self.fc2(h, C, hidden), plan.drop_path) / plan.skip_lam
        if plan.conv_pos and plan.conv_pos_end:
            x = self._conv_pos(x, grid, num_prefix)
        return x, grid, (attn if plan.keep_attn else None)

    def _conv_pos(self, x: torch.Tensor, grid: Grid, num_prefix: int) -> torch.Tensor:
        prefix, fmap = tokens_to_map(x, grid, num_prefix)
        return map_to_tokens(prefix, fmap + self.conv_pos(fmap, stride=1))

    def _drop(self, y: torch.Tensor, rate: float) -> torch.Tensor:
        return drop_path(y, rate, self.training) if rate > 0 else y

    def export(self, plan: _BlockPlan) -> dict[str, torch.Tensor]:
        C = plan.dim
        out: dict[str, torch.Tensor] = {}
        if plan.pool:
            pool = self.pools[f"f{plan.width_factor}"]
            for k, v in pool.export(plan.in_dim, plan.cls_before).items():
                out[f"pool.{k}"] = v
        if plan.conv_pos:
            for k, v in self.conv_pos.export(C).items():
                out[f"conv_pos.proj.{k}"] = v
        for name in ("norm1", "norm2"):
            for k, v in getattr(self, name).export(C).items():
                out[f"{name}.{k}"] = v
        for k, v in self.attn.export(plan).items():
            out[f"attn.{k}"] = v
        out["mlp.fc1.weight"], out["mlp.fc1.bias"] = self.fc1.sliced(plan.hidden, C)
        out["mlp.fc2.weight"], out["mlp.fc2.bias"] = self.fc2.sliced(C, plan.hidden)
        return out


# ---------------------------------------------------------------------------- the supernet
def _stem_forward(stem: nn.Module, x: torch.Tensor, D: int) -> tuple[torch.Tensor, Grid]:
    """A stem's tokens with only its first D output channels."""
    if isinstance(stem, ConvStem):
        x = F.relu(stem.bn1(stem.conv1(x)))
        x = F.relu(stem.bn2(stem.conv2(x)))
        x = F.relu(stem.bn3(stem.conv3(x)))
    proj = stem.proj
    x = F.conv2d(x, proj.weight[:D], proj.bias[:D], stride=proj.stride)  # (B, D, Gh, Gw)
    return x.flatten(2).transpose(1, 2), (x.shape[-2], x.shape[-1])


class SPViTSupernet(nn.Module):
    """A weight-sharing supernet over `choices` (see the module docstring).

    Args:
        choices: the values each dimension can take.
        seed: when given, every parameter is initialised from it (the global RNG is untouched).

    Use `set_active(spec)` then call the module on images `(B, in_chans, H, W)`; or
    `forward(x, spec=spec)`. `subnet(spec)` returns the stand-alone `SPViT`.
    """

    def __init__(self, choices: SupernetChoices, *, seed: int | None = None) -> None:
        super().__init__()
        if not isinstance(choices, SupernetChoices):
            raise ConfigError(f"SPViTSupernet needs SupernetChoices, but got"
                              f" {type(choices).__name__}.")
        self.choices = choices
        extents = choices.block_extents()
        self.extents = extents
        d_max = max(choices.embed_dims)
        pool_positions = {i for s in choices.pool_schedules for i in s}
        if seed is None:
            self._build(choices, extents, d_max, pool_positions)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                self._build(choices, extents, d_max, pool_positions)
        self._active: _Plan | None = None

    def _build(self, choices: SupernetChoices, extents: list[dict[str, int]], d_max: int,
               pool_positions: set[int]) -> None:
        stem_cls = ConvStem if choices.stem == "conv" else LinearStem
        self.stems = nn.ModuleDict({
            f"p{p}": stem_cls(patch_size=p, in_chans=choices.in_chans, embed_dim=d_max)
            for p in choices.patch_sizes})
        self.pos_embeds = nn.ParameterDict()
        if any(p in LEARNED_POS for p in choices.pos_embeds):
            for p in choices.patch_sizes:
                n0 = (choices.img_size // p) ** 2
                # Position 0 belongs to a class token in the sequence from the stem on.
                self.pos_embeds[f"p{p}"] = nn.Parameter(torch.zeros(1, n0 + 1, d_max))
        widest = max([d_max] + [e["width"] for e in extents])
        self.cls_token = (nn.Parameter(torch.zeros(1, 1, widest)) if choices.head == "cls"
                          else None)
        self.blocks = nn.ModuleList(
            SuperBlock(e, choices=choices, pool_here=i in pool_positions)
            for i, e in enumerate(extents))
        self.norm = SuperLayerNorm(widest)
        self.head = SuperLinear(widest, choices.num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """timm's ViT init for the shared weights (priors start as the identity)."""
        for m in self.modules():
            if m is not self and isinstance(m, (SuperLinear, SuperLayerNorm, SuperDWConv,
                                                SuperPriors)):
                m.reset_parameters()
        for stem in self.stems.values():
            for m in stem.modules():
                if m is not stem and hasattr(m, "reset_parameters"):
                    m.reset_parameters()
        for pe in self.pos_embeds.values():
            nn.init.trunc_normal_(pe, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)

    # ------------------------------------------------------------------ choosing a subnet
    def check(self, spec: ArchSpec) -> None:
        """Raise `ConfigError` (one line naming the dimension and value) if `spec` is not held."""
        if not isinstance(spec, ArchSpec):
            raise ConfigError(f"a subnet is an ArchSpec, but got {type(spec).__name__}.")
        why = self.choices.why_not(spec)
        if why is not None:
            raise ConfigError(f"the architecture is outside the supernet: {why}. Pick a"
                              " member of the supernet's search space.")

    def set_active(self, spec: ArchSpec) -> None:
        """Make `spec` the subnet that `forward` computes."""
        self.check(spec)
        self._active = _plan(spec)

    @property
    def active(self) -> ArchSpec | None:
        return None if self._active is None else self._active.spec

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, spec: ArchSpec | None = None) -> torch.Tensor:
        if spec is not None:
            self.set_active(spec)
        if self._active is None:
            raise RuntimeError("no active subnet: call set_active(spec) first")
        plan = self._active
        s = plan.spec
        D = s.embed_dim
        x, grid = _stem_forward(self.stems[f"p{s.patch_size}"], x, D)  # (B, Gh*Gw, D)
        side = s.grid_size
        learned = s.pos_embed in LEARNED_POS
        prefix = int(plan.cls_from_stem and learned)
        cls_pos = None
        if learned:
            pos = self.pos_embeds[f"p{s.patch_size}"][:, 1 - prefix:, :D]
            if tuple(grid) != (side, side):
                pos = resample_abs_pos_embed(pos, new_size=list(grid), old_size=[side, side],
                                             num_prefix_tokens=prefix)
            x = x + pos[:, prefix:].to(x.dtype)
            cls_pos = pos[:, :prefix]
        elif s.pos_embed == "sincos":
            x = x + sincos_2d(grid, D, device=x.device)[None].to(x.dtype)
        if plan.cls_from_stem:
            cls = self.cls_token[:, :, :D]
            cls = cls if cls_pos is None else cls + cls_pos
            x = torch.cat([cls.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        attn = None
        for i, bp in enumerate(plan.blocks):
            join = (self.cls_token[:, :, :plan.cls_width]
                    if s.head == "cls" and not plan.cls_from_stem and i == s.cls_block else None)
            x, grid, attn = self.blocks[i](x, grid, bp, attn, join)
        x = self.norm(x)
        x = x[:, 0] if s.head == "cls" else x[:, int(s.head == "cls"):].mean(dim=1)
        C = x.shape[-1]
        return self.head(x, s.num_classes, C)

    # ------------------------------------------------------------------ stand-alone subnets
    def inherited_state_dict(self, spec: ArchSpec) -> dict[str, torch.Tensor]:
        """The weights `spec` inherits, under `SPViT(spec)`'s state_dict names (views of the
        supernet's tensors; clone before changing them)."""
        self.check(spec)
        plan = _plan(spec)
        D = spec.embed_dim
        out: dict[str, torch.Tensor] = {}
        stem = self.stems[f"p{spec.patch_size}"]
        for k, v in stem.state_dict(keep_vars=True).items():
            out[f"patch_embed.{k}"] = v[:D] if k.startswith("proj.") else v
        if spec.head == "cls":
            out["cls_token"] = self.cls_token[:, :, :plan.cls_width]
        if spec.pos_embed in LEARNED_POS:
            prefix = int(plan.cls_from_stem)
            out["pos_embed"] = self.pos_embeds[f"p{spec.patch_size}"][:, 1 - prefix:, :D]
        for i, bp in enumerate(plan.blocks):
            for k, v in self.blocks[i].export(bp).items():
                out[f"blocks.{i}.{k}"] = v
        for k, v in self.norm.export(spec.num_features).items():
            out[f"norm.{k}"] = v
        out["head.weight"], out["head.bias"] = self.head.sliced(spec.num_classes,
                                                                spec.num_features)
        return out

    @torch.no_grad()
    def subnet(self, spec: ArchSpec) -> SPViT:
        """A stand-alone `SPViT(spec)` whose weights are the inherited slices.

        The model is built by `spvit.create_model` (its `spec` keeps `init`, which the weights
        do not follow: they are inherited) and filled by parameter name; a name of the model
        that the supernet has no counterpart for is an error, never left at its initial value.
        """
        from .factory import create_model

        inherited = self.inherited_state_dict(spec)
        # Built with the cheap init: every tensor is overwritten by name right after.
        model = create_model(spec.replace(init="trunc_normal"), seed=0)
        model.spec = spec
        own = model.state_dict()
        missing = sorted(set(own) - set(inherited))
        extra = sorted(set(inherited) - set(own))
        if missing or extra:
            raise RuntimeError(f"the supernet and SPViT disagree on parameter names: the model"
                               f" has no inherited value for {missing[:5]} and no place for"
                               f" {extra[:5]}")
        for name, target in own.items():
            value = inherited[name]
            if value.shape != target.shape:
                raise RuntimeError(f"inherited {name} has shape {tuple(value.shape)}, the model"
                                   f" expects {tuple(target.shape)}")
            target.copy_(value.detach().to(target.dtype))
        ref = next(self.parameters())
        return model.to(ref.device)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Embeddings and the parametric priors, as `SPViT.no_weight_decay`."""
        names = {"cls_token"}
        for name, _ in self.named_parameters():
            if name.startswith("pos_embeds.") or name.endswith(
                    (".rpb_table", ".gaussian", ".axial", ".mlp_bias", ".decay")):
                names.add(name)
        return names
