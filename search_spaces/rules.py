"""The rules of a search space as a whole, checked once when a space is loaded.

Only what is a property of the space lives here: every head count must divide every width
(each Optuna parameter keeps one fixed choice list), a negative `cls_block` must fit every depth,
every pool schedule must fit some depth and every depth some schedule, `min_tokens` must be
reachable. Whether an architecture is valid is `spvit.arch.ArchSpec`'s rule, not this module's:
`probe_architectures` builds the architectures the space can produce (every combination of the
searched global fields, with the first and the last per-block choices) and lets ArchSpec refuse
them, so a space that could propose an invalid candidate fails at load time, never mid-search.

Functions of a `SearchSpace` (passed in; this module does not import `search_spaces.space`).
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterable
from typing import Any

from spvit.arch import resolve_cls_block, schedule_fits
from spvit.errors import ConfigError

from .fields import SEARCHABLE, FieldError

MAX_PROBES = 2048  # global-field combinations built at load time


def _where(space: Any, name: str) -> tuple[str, str]:
    return ("dimensions" if name in space.choices else "arch", name)


def check_space(space: Any) -> None:
    """Raise a `FieldError` (with the key's path) for the first space-level rule broken."""
    img = space.fixed["img_size"]
    head = space.fixed["head"]
    for w in space.values_of("embed_dim"):
        for h in space.heads:
            if w % h:
                raise FieldError(
                    ("dimensions", "heads"),
                    f"head count {h} does not divide embed_dim {w}; every head count must"
                    " divide every width because each Optuna parameter keeps one fixed"
                    f" choice list. Drop {h} from heads or {w} from embed_dim.",
                )
    cls_block = space.fixed["cls_block"]
    if head == "avg" and cls_block != 0:
        # The space resolves cls_block to 0 for head: avg, so ArchSpec never sees this value.
        raise FieldError(("arch", "cls_block"),
                         f"cls_block only applies to head: cls, but got {cls_block} with"
                         " head: avg. Remove cls_block or set head: cls.")
    for depth in space.values_of("depth"):
        resolved = resolve_cls_block(cls_block, depth)
        if head == "cls" and not 0 <= resolved < depth:
            raise FieldError(
                ("arch", "cls_block"),
                f"cls_block {cls_block} does not fit depth {depth} (it must name one of the"
                f" {depth} blocks). Use 0 <= cls_block < {depth}, or a negative value counted"
                " from the end (-2 = the CLS token joins for the last two blocks).",
            )
    if not space.pool.free:
        _check_schedules(space, img)
    if space.constraints.min_tokens is not None:
        most = max((img // p) ** 2 for p in space.values_of("patch_size"))
        if space.constraints.min_tokens > most:
            raise FieldError(
                ("constraints", "min_tokens"),
                f"constraints.min_tokens {space.constraints.min_tokens} exceeds the largest"
                f" token grid of the space ({most} patch tokens), so no architecture can"
                " meet it. Lower min_tokens or use a smaller patch size.",
            )
    probe_architectures(space)


def _check_schedules(space: Any, img: int) -> None:
    depths = space.values_of("depth")
    patches = space.values_of("patch_size")
    for schedule in space.pool.schedules:
        if not any(schedule_fits(schedule, depth, img // p) for depth in depths for p in patches):
            raise FieldError(
                ("dimensions", "pool", "schedules"),
                f"pool schedule {list(schedule)} fits no depth of the space {list(depths)}"
                " (a pool needs a block index < depth and a grid ArchSpec can pool before it)."
                " Fix or remove it.",
            )
    for depth in depths:
        for p in patches:
            side = img // p
            if not space.pool.valid_schedules(depth, side):
                raise FieldError(
                    ("dimensions", "pool", "schedules"),
                    f"no pool schedule fits depth {depth} on a {side}x{side} grid"
                    f" (schedules {[list(s) for s in space.pool.schedules]}); each pool"
                    " needs a block index < depth and a grid ArchSpec can pool. Add []"
                    " (never pool) or a schedule that fits.",
                )


def probe_architectures(space: Any) -> None:
    """Build one candidate per combination of the searched global fields (first and last
    per-block choices); the first one ArchSpec refuses becomes a `FieldError`."""
    names = [n for n in SEARCHABLE if len(space.choices.get(n, ())) > 1]
    combos: Iterable[tuple] = itertools.product(*(space.choices[n] for n in names))
    total = math.prod(len(space.choices[n]) for n in names)
    if total > MAX_PROBES:  # a huge product: a seeded random subset of it
        rng = random.Random(0)
        combos = [tuple(rng.choice(space.choices[n]) for n in names) for _ in range(MAX_PROBES)]
    for combo in combos:
        chosen = dict(zip(names, combo, strict=True))
        for end in (0, -1):
            try:
                space.build(lambda n, c, chosen=chosen, end=end:
                            chosen[n] if n in chosen else c[end])
            except ConfigError as e:
                if not chosen:
                    raise FieldError(("arch",), f"the space's fixed fields make an invalid"
                                                f" architecture: {e}") from None
                raise FieldError(
                    _where(space, names[0]),
                    f"the space can produce an invalid architecture (with {chosen}): {e}"
                    " Remove one of these choices.",
                ) from None
