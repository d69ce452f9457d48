"""One-shot search: glue from a search space to the SP-ViT supernet, inherited-weight scoring.

Filled in below.
"""

from __future__ import annotations

import itertools
from typing import Any

from search_spaces.space import SearchSpace
from spvit.supernet import SupernetChoices


def _free_schedules(depth: int, *, from_block: int, max_pools: int) -> list[tuple[int, ...]]:
    blocks = range(from_block, depth)
    return [s for k in range(max_pools + 1) for s in itertools.combinations(blocks, k)]


def supernet_choices(space: SearchSpace) -> SupernetChoices:
    """What a supernet over `space` must hold, from the space's dimensions."""
    fixed = space.fixed
    v = space.values_of
    if space.pool.free:
        schedules: set[tuple[int, ...]] = set()
        for depth in v("depth"):
            schedules.update(_free_schedules(depth, from_block=space.pool.from_block,
                                             max_pools=space.pool.max_pools))
        pool_schedules: Any = tuple(sorted(schedules))
    else:
        pool_schedules = tuple(space.pool.schedules)
    return SupernetChoices(
        img_size=fixed["img_size"], in_chans=fixed["in_chans"], num_classes=fixed["num_classes"],
        stem=fixed["stem"], head=fixed["head"], cls_block=fixed["cls_block"],
        depths=tuple(v("depth")), patch_sizes=tuple(v("patch_size")),
        embed_dims=tuple(v("embed_dim")), mlp_ratios=tuple(v("mlp_ratio")),
        pool_width_factors=tuple(v("pool_width_factor")), heads=tuple(space.heads),
        prior_types=tuple(space.prior.types), pos_embeds=tuple(v("pos_embed")),
        conv_pos=tuple(v("conv_pos")), qkv_bias=tuple(v("qkv_bias")),
        pool_schedules=pool_schedules, share=tuple(space.share))
