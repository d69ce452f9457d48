"""Membership and counting of a search space: whether an `ArchSpec` is one the space can
produce (`why_not`), the searched dimensions as `check-space` shows them, and the exact size.

Functions of a `SearchSpace` (passed in; this module does not import `search_spaces.space`).
"""

from __future__ import annotations

from typing import Any

from spvit.arch import ArchSpec, can_pool, pooled_side

from .dimensions import Dimension
from .fields import ARCH_KEYS


def why_not(space: Any, spec: ArchSpec) -> str | None:
    """None if `spec` is a member of the space, else one line saying why it is not."""
    if not isinstance(spec, ArchSpec):
        return f"expected an ArchSpec, got {type(spec).__name__}"
    flat = spec.to_dict()
    depth = flat["depth"] = spec.depth
    for name in ("depth",) + tuple(k for k in ARCH_KEYS if k != "depth"):
        value = flat[name]
        if name == "cls_block":
            expected = space.resolve_cls_block(depth)
            if value != expected:
                return (f"cls_block {value} differs from the space's {expected} at depth"
                        f" {depth}")
            continue
        allowed = space.values_of(name)
        # type() as well as ==, so that True never passes for 1 (or 1 for 1.0).
        if not any(type(value) is type(a) and value == a for a in allowed):
            return f"{name} {value!r} is not among the space's choices {list(allowed)}"
    cls_block = space.resolve_cls_block(depth)
    pooled = tuple(i for i, b in enumerate(spec.blocks) if b.pool)
    if space.pool.free:
        if len(pooled) > space.pool.max_pools:
            return f"{len(pooled)} pools exceed the space's max_pools {space.pool.max_pools}"
        if pooled and pooled[0] < space.pool.from_block:
            return (f"block {pooled[0]} pools, but the space pools only from block"
                    f" {space.pool.from_block} on")
    elif pooled not in space.pool.schedules:
        return (f"pool schedule {list(pooled)} is not among the space's schedules"
                f" {[list(s) for s in space.pool.schedules]}")
    for i, b in enumerate(spec.blocks):
        if space.share_possible(i, b.pool, cls_block):
            if b.share not in space.share:
                return (f"share_{i} {b.share} is not among the space's choices"
                        f" {list(space.share)}")
        elif b.share:
            return f"block {i} shares attention where the space cannot"
        if b.share:
            continue
        if b.heads not in space.heads:
            return f"heads_{i} {b.heads} is not among the space's choices {list(space.heads)}"
        if not space.prior.per_head and not isinstance(b.prior, str):
            return (f"block {i} has per-head priors {list(b.prior)}, but the space chooses"
                    " one prior per block")
        for p in b.head_priors:
            if p not in space.prior.types:
                return (f"block {i} prior {p!r} is not among the space's prior types"
                        f" {list(space.prior.types)}")
    return None

def contains(space, spec: ArchSpec) -> bool:
    """True if the space can produce `spec` (constraints aside: see `constraints`)."""
    return space.why_not(spec) is None

def dimensions(space: Any) -> list[Dimension]:
    """The searched choices (a dimension with one choice is fixed and not listed)."""
    out = [Dimension(name, c, "global") for name, c in space.choices.items() if len(c) > 1]
    if len(space.heads) > 1:
        out.append(Dimension("heads_{i}", space.heads, "block",
                             "every block that does not share attention"))
    if len(space.prior.types) > 1:
        if space.prior.per_head:
            out.append(Dimension("prior_{i}_{h}", space.prior.types, "head",
                                 "every head of a block that does not share attention"))
        else:
            out.append(Dimension("prior_{i}", space.prior.types, "block",
                                 "every block that does not share attention"))
    if space.pool.free:
        if space.pool.max_pools > 0:
            out.append(Dimension("pool_{i}", (False, True), "block",
                                 f"blocks >= {space.pool.from_block}, at most"
                                 f" {space.pool.max_pools} pools, grid >= 3x3"))
    elif len(space.pool.schedules) > 1:
        out.append(Dimension("pool_{i}", space.pool.schedules, "block",
                             "one of the listed schedules that fits the depth and grid"))
    if len(space.share) > 1:
        out.append(Dimension("share_{i}", space.share, "block",
                             "blocks > 0 that do not pool and are not where CLS joins"))
    return out

def size(space: Any) -> int:
    """The exact number of distinct architectures in the space (constraints aside)."""
    other = 1
    for name, c in space.choices.items():
        if name not in ("depth", "patch_size"):
            other *= len(c)
    total = 0
    for depth in space.values_of("depth"):
        for p in space.values_of("patch_size"):
            total += _count_blocks(space, depth, space.fixed["img_size"] // p)
    return other * total

def _count_blocks(space: Any, depth: int, side: int) -> int:
    n_types = len(space.prior.types)
    own = sum(n_types ** h if space.prior.per_head else n_types for h in space.heads)
    cls_block = space.resolve_cls_block(depth)

    def options(i: int, pool: bool) -> int:
        if not space.share_possible(i, pool, cls_block):
            return own
        return (own if False in space.share else 0) + (1 if True in space.share else 0)

    if not space.pool.free:
        total = 0
        for schedule in space.pool.valid_schedules(depth, side):
            ways = 1
            for i in range(depth):
                ways *= options(i, i in schedule)
            total += ways
        return total
    states = {(0, side): 1}  # (pools so far, grid side) -> number of block prefixes
    for i in range(depth):
        nxt: dict[tuple[int, int], int] = {}
        for (pools, s), ways in states.items():
            nxt[(pools, s)] = nxt.get((pools, s), 0) + ways * options(i, False)
            if i >= space.pool.from_block and pools < space.pool.max_pools and can_pool(s):
                key = (pools + 1, pooled_side(s))
                nxt[key] = nxt.get(key, 0) + ways * options(i, True)
        states = nxt
    return sum(states.values())
