"""The block-level dimensions of a search space (prior types, pooling schedules), the `Dimension`
record that `check-space` and reports show, and the choosers behind `sample` and `suggest`.

Whether a grid may be pooled is ArchSpec's rule (`spvit.arch.can_pool`); this module only asks it.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from spvit.arch import PRIOR_TYPES, schedule_fits

from .fields import (
    MAXIMA,
    FieldError,
    at_most,
    bool_value,
    check_keys,
    choice_list,
    dotted,
    int_value,
    mapping,
    one_of,
)

PRIOR_KEYS = ("types", "per_head")
POOL_KEYS = ("schedules", "free", "max_pools", "from_block")


@dataclass(frozen=True)
class Dimension:
    """One searched choice as `check-space` and reports show it.

    Args:
        name: the flat label (`depth`), or its per-block pattern (`heads_{i}`, `prior_{i}_{h}`).
        choices: the values offered (for a pool schedule list: the schedules).
        scope: `global`, `block` (one choice per block) or `head` (one per head of a block).
        note: when the choice exists, in words.
    """

    name: str
    choices: tuple
    scope: str
    note: str = ""


@dataclass(frozen=True)
class PriorDimension:
    """Spatial-prior types offered per block (`per_head: false`) or per head (`per_head: true`)."""

    types: tuple[str, ...] = ("none",)
    per_head: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"types": list(self.types), "per_head": self.per_head}


@dataclass(frozen=True)
class PoolDimension:
    """Where the token grid is pooled 2x2.

    Either `schedules` (a list of allowed schedules, each the sorted block indices that pool;
    `()` is "never pool") or `free` (each block from `from_block` on may pool, at most
    `max_pools` times). Schedules or pools that would shrink the grid below 2x2, or name a
    block beyond the sampled depth, are not offered.
    """

    schedules: tuple[tuple[int, ...], ...] = ((),)
    free: bool = False
    max_pools: int = 0
    from_block: int = 1

    def to_dict(self) -> dict[str, Any]:
        if self.free:
            return {"free": True, "max_pools": self.max_pools, "from_block": self.from_block}
        return {"schedules": [list(s) for s in self.schedules]}

    def valid_schedules(self, depth: int, side: int) -> tuple[tuple[int, ...], ...]:
        """Schedules (schedule mode) that fit `depth` blocks on a `side`x`side` patch grid."""
        return tuple(s for s in self.schedules if schedule_fits(s, depth, side))


# ---------------------------------------------------------------------------- block dimensions
def parse_prior(value: Any) -> PriorDimension:
    path = ("dimensions", "prior")
    if isinstance(value, list):
        return PriorDimension(types=choice_list(path, value, one_of(PRIOR_TYPES)))
    data = mapping(path, value, "prior: {types: [none, mlp], per_head: false}")
    check_keys(path, data, PRIOR_KEYS)
    if "types" not in data:
        raise FieldError(path, "dimensions.prior needs `types:`, the prior types to choose"
                                f" from. Write types: {list(PRIOR_TYPES)}.")
    types = choice_list(path + ("types",), data["types"], one_of(PRIOR_TYPES))
    per_head = bool_value(path + ("per_head",), data.get("per_head", False))
    return PriorDimension(types=types, per_head=per_head)


def parse_pool(value: Any) -> PoolDimension:
    path = ("dimensions", "pool")
    if value is None:
        return PoolDimension()
    data = mapping(path, value, "pool: {schedules: [[], [2]]} or pool: {free: true,"
                                 " max_pools: 2}")
    check_keys(path, data, POOL_KEYS)
    free = bool_value(path + ("free",), data.get("free", False))
    if free:
        if "schedules" in data:
            raise FieldError(path + ("schedules",),
                              "dimensions.pool has both free: true and schedules. Keep one:"
                              " a list of schedules, or free per-block pooling.")
        max_pools = at_most(path + ("max_pools",),
                            int_value(path + ("max_pools",), data.get("max_pools", 1), 0),
                            "max_pools")
        from_block = at_most(path + ("from_block",),
                             int_value(path + ("from_block",), data.get("from_block", 1), 0),
                             "block_index")
        return PoolDimension(schedules=(), free=True, max_pools=max_pools, from_block=from_block)
    for key in ("max_pools", "from_block"):
        if key in data:
            raise FieldError(path + (key,), f"dimensions.pool.{key} only applies to free: true."
                                             " Add free: true or remove the key.")
    if "schedules" not in data:
        raise FieldError(path, "dimensions.pool needs `schedules:` (lists of the block indices"
                                " that pool) or free: true. Write schedules: [[], [2]].")

    def schedule(p: tuple, v: Any) -> tuple[int, ...]:
        if not isinstance(v, list):
            raise FieldError(p, f"{dotted(p)} must be a list of block indices that pool, but"
                                 f" got {v!r}. Write [] for never, or e.g. [2, 5].")
        if len(v) > MAXIMA["depth"]:
            raise FieldError(p, f"{dotted(p)} names {len(v)} blocks, more than a space's"
                                 f" deepest depth {MAXIMA['depth']} can hold. Keep at most"
                                 f" {MAXIMA['depth']} block indices.")
        idx = tuple(at_most(p + (j,), int_value(p + (j,), x, 0), "block_index")
                    for j, x in enumerate(v))
        if len(set(idx)) != len(idx):
            raise FieldError(p, f"{dotted(p)} names a block twice ({list(idx)}); a block pools"
                                 " at most once. Remove the duplicate.")
        return tuple(sorted(idx))

    schedules = choice_list(path + ("schedules",), data["schedules"], schedule)
    return PoolDimension(schedules=schedules)


# ---------------------------------------------------------------------------- choosers
Chooser = Callable[[str, tuple], Any]


def rng_chooser(rng: Any) -> Chooser:
    if isinstance(rng, random.Random):
        return lambda name, choices: choices[rng.randrange(len(choices))]
    if isinstance(rng, np.random.Generator):
        return lambda name, choices: choices[int(rng.integers(len(choices)))]
    raise TypeError(
        f"rng must be a random.Random or a numpy.random.Generator, but got {type(rng).__name__}."
        " Pass random.Random(seed) or numpy.random.default_rng(seed)."
    )


def trial_chooser(trial: Any) -> Chooser:
    return lambda name, choices: trial.suggest_categorical(name, list(choices))

