"""From a search space to its supernet, and the subnets of each supernet training step.

`supernet_choices(space)` is the glue from a `SearchSpace` to the plain `SupernetChoices` that
`spvit.supernet.SPViTSupernet` is built from (and `space_identity` what a supernet depends on);
`SandwichSampler` draws the subnets of one training step under the sandwich rule (the largest
and the smallest feasible subnet, `extreme_subnet`, with fresh prior types, `redraw_priors`,
plus random feasible ones), seeded by (seed, epoch, step) so that every data-parallel worker
trains the same subnets. Part of `nas.oneshot`; no Ray, no Optuna.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import random
from typing import Any

from search_spaces.fields import whole_number
from search_spaces.space import SearchSpace
from spvit.arch import ArchSpec, BlockSpec
from spvit.cost import estimate
from spvit.supernet import SupernetChoices

DEFAULT_RANDOM_SUBNETS = 2
EXTREME_PROBES = 400  # feasible samples drawn to find the largest / smallest subnet
_ARCH_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ArchSpec) if f.name != "blocks"}


# ---------------------------------------------------------------------------- space -> supernet
def _free_schedules(depth: int, *, from_block: int, max_pools: int) -> list[tuple[int, ...]]:
    blocks = range(from_block, depth)
    return [s for k in range(max_pools + 1) for s in itertools.combinations(blocks, k)]


def _field_values(space: SearchSpace, name: str) -> tuple:
    """The values of the global `ArchSpec` field `name` in `space`; a field the space does not
    name keeps its `ArchSpec` default."""
    if name in space.choices or name in space.fixed:
        return tuple(space.values_of(name))
    return (_ARCH_DEFAULTS[name],)


def supernet_choices(space: SearchSpace) -> SupernetChoices:
    """What a supernet over `space` must hold, from the space's dimensions."""
    fixed = space.fixed
    v = functools.partial(_field_values, space)
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
        pool_schedules=pool_schedules, share=tuple(space.share),
        skip_lams=v("skip_lam"), conv_pos_places=v("conv_pos_place"))


def space_identity(space: SearchSpace) -> dict[str, Any]:
    """What a supernet depends on: the fixed fields and the dimensions (not the recipe)."""
    data = space.to_dict()
    return {"arch": data["arch"], "dimensions": data["dimensions"]}


# ---------------------------------------------------------------------------- sandwich rule
class _ExtremeChooser:
    """A stand-in for an Optuna trial that answers every choice with its largest (or smallest)
    option; choices that do not change the size (prior type, init, ...) come from `rng`."""

    def __init__(self, largest: bool, rng: random.Random) -> None:
        self.largest = largest
        self.rng = rng

    def suggest_categorical(self, name: str, choices: list) -> Any:
        big = self.largest
        if name in ("depth", "embed_dim", "mlp_ratio", "pool_width_factor") \
                or name.startswith("heads_"):
            return max(choices) if big else min(choices)
        if name == "patch_size":
            return min(choices) if big else max(choices)
        if name.startswith(("pool_", "share_")):
            return (not big) if (not big) in choices else choices[0]
        if name in ("conv_pos", "qkv_bias"):
            return big if big in choices else choices[0]
        return choices[self.rng.randrange(len(choices))]


def _cost_key(spec: ArchSpec) -> tuple[float, int]:
    cost = estimate(spec)
    return (cost.gflops, cost.params)


def extreme_subnet(space: SearchSpace, *, largest: bool, seed: int = 0) -> ArchSpec:
    """The largest (or smallest) feasible member of `space`, by GFLOPs then parameters.

    The member built from every dimension's extreme is used when it meets the constraints;
    otherwise the extreme of `EXTREME_PROBES` seeded feasible samples.
    """
    rng = random.Random(seed)
    spec = space.suggest(_ExtremeChooser(largest, rng))
    if not space.constraints.violations(spec):
        return spec
    probes = [space.sample_feasible(rng).spec for _ in range(EXTREME_PROBES)]
    return (max if largest else min)(probes, key=_cost_key)


def redraw_priors(space: SearchSpace, spec: ArchSpec, rng: random.Random) -> ArchSpec:
    """`spec` with fresh prior types for every block that computes its own attention."""
    types = space.prior.types
    blocks = []
    for b in spec.blocks:
        if b.share:
            blocks.append(b)
            continue
        if space.prior.per_head:
            prior: Any = tuple(types[rng.randrange(len(types))] for _ in range(b.heads))
        else:
            prior = types[rng.randrange(len(types))]
        blocks.append(BlockSpec(heads=b.heads, prior=prior, share=False, pool=b.pool))
    return spec.replace(blocks=tuple(blocks))


class SandwichSampler:
    """The subnets of each supernet training step: [largest, smallest, random...].

    The largest and smallest keep their structure (found once, `extreme_subnet`) and draw new
    prior types every step, so every prior family is trained at both ends of the size range;
    a redraw that breaks a constraint falls back on the reference. The random subnets are
    `space.sample_feasible` draws. Every subnet returned meets the space's constraints.

    Args:
        space: the search space.
        seed: with (epoch, step), the only source of randomness: workers agree on the subnets.
        random_subnets: random subnets per step (>= 0; the sandwich rule uses >= 2).
    """

    def __init__(self, space: SearchSpace, *, seed: int = 0,
                 random_subnets: int = DEFAULT_RANDOM_SUBNETS) -> None:
        whole_number("random_subnets", random_subnets, 0, "Use e.g. 2.")
        self.space = space
        self.seed = seed
        self.random_subnets = random_subnets
        self.largest = extreme_subnet(space, largest=True, seed=seed)
        self.smallest = extreme_subnet(space, largest=False, seed=seed)

    @property
    def per_step(self) -> int:
        return 2 + self.random_subnets

    def _feasible(self, spec: ArchSpec) -> bool:
        return not self.space.constraints.violations(spec)

    def step(self, epoch: int, step: int) -> list[ArchSpec]:
        rng = random.Random((self.seed * 1_000_003 + epoch * 7_919 + step) % (2**63 - 1))
        out = []
        for ref in (self.largest, self.smallest):
            spec = redraw_priors(self.space, ref, rng)
            out.append(spec if self._feasible(spec) else ref)
        out.extend(self.space.sample_feasible(rng).spec for _ in range(self.random_subnets))
        return out
