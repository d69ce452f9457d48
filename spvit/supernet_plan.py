"""What a weight-sharing supernet holds and what one of its subnets is, in plain data.

`SupernetChoices` lists the values each dimension of a search space can take (the glue from a
search-space file lives in `nas.oneshot`); from it `spvit.supernet.SPViTSupernet` sizes every
shared layer (`block_extents`) and tells whether it holds an `ArchSpec` (`why_not`). `_plan(spec)`
restates `SPViT(spec)` block by block in the terms the supernet's sliced layers need (widths,
heads, prior types, where the class token is, which attention is kept for a sharing block).
Nothing here holds a tensor; `spvit.supernet` re-exports these names.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .arch import ArchSpec, resolve_cls_block, schedule_fits
from .errors import ConfigError


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
        return resolve_cls_block(self.cls_block, depth, self.head)

    def _layouts(self) -> list[tuple[int, int, tuple[int, ...]]]:
        """Every (depth, patch size, schedule) a subnet can have."""
        return [(d, p, s) for d in self.depths for p in self.patch_sizes
                for s in self.pool_schedules if schedule_fits(s, d, self.img_size // p)]

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
