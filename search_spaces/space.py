"""`SearchSpace`: a YAML search-space file, validated once into a typed object that proposes
`ArchSpec` candidates.

A space file has up to seven top-level blocks (docs/search_spaces.md describes each):
`name`/`description`, `arch:` (the fixed parts of every candidate: image size, classes, stem,
head, ...), `dimensions:` (what is searched: depth, width, mlp ratio, init, per-block heads,
prior types, pooling schedule, attention sharing), `constraints:` (GFLOPs / parameter / token
limits), `training:` (`search_spaces.TrainingConfig`) and `search:` (defaults for the search
driver). The space proposes candidates in two ways that share one code path, so they can never
disagree: `sample(rng)` draws from an explicit `random.Random` / `numpy.random.Generator`, and
`suggest(trial)` asks an Optuna trial define-by-run under the flat `ArchSpec` labels (`depth`,
`heads_3`, `prior_3` or `prior_3_0`, `share_3`, `pool_3`, ...). Conditional choices are only
asked where they exist (blocks up to the sampled depth; sharing only where `ArchSpec` allows it,
and then the block inherits its predecessor's heads and has no prior). Every Optuna parameter
keeps one fixed list of choices across trials (Optuna refuses a categorical whose choices change),
which is why every head count must divide every width the space can produce.

The loader checks only the rules of a space (`search_spaces.rules`); whether an architecture is
valid is `ArchSpec`'s to say, so the loader builds the architectures the space can produce and
lets ArchSpec refuse them. Infeasible candidates (a constraint fails) are rejected before any
training: `sample_feasible(rng)` redraws; the search study (`nas.study.SearchStudy`) tells a
rejected Optuna trial FAIL with an `infeasible` user attribute and asks again.

The parts live in their own modules: field checkers (`fields`), block dimensions and choosers
(`dimensions`), constraints (`constraints`), the `search:` block (`search_defaults`), space-level
rules (`rules`) and membership/counting (`membership`).
"""

from __future__ import annotations

import dataclasses
import os
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from spvit.arch import ArchSpec, BlockSpec, can_pool, can_share, pooled_side, resolve_cls_block
from spvit.cost import Cost, estimate
from spvit.errors import ConfigError
from spvit.io import atomic_write_text, read_user_text

from . import membership, rules
from .constraints import Constraints
from .dimensions import (
    Chooser,
    Dimension,
    PoolDimension,
    PriorDimension,
    parse_pool,
    parse_prior,
    rng_chooser,
    trial_chooser,
)
from .fields import (
    ARCH_KEYS,
    DIMENSION_KEYS,
    FIELD_CHECKS,
    SEARCHABLE,
    FieldError,
    bool_value,
    bounded,
    check_keys,
    choice_list,
    int_value,
    line_of,
    mapping,
)
from .search_defaults import SearchDefaults
from .training import TrainingConfig

TOP_LEVEL_KEYS: tuple[str, ...] = (
    "name", "description", "arch", "dimensions", "constraints", "training", "search",
)


@dataclass(frozen=True)
class FeasibleSample:
    """A feasible architecture drawn from a space (`SearchSpace.sample_feasible`), with its
    cost."""

    spec: ArchSpec
    cost: Cost



# ---------------------------------------------------------------------------- the space
@dataclass(frozen=True)
class SearchSpace:
    """A validated search space. Build it with `SearchSpace.load(path)` or `from_dict(data)`.

    Args:
        name: short name (used in run folders and reports).
        description: one paragraph for humans.
        fixed: every `ArchSpec` global field that is not searched, resolved (defaults filled);
            `cls_block` may be negative (counted from the end: -2 = the last two blocks).
        choices: searched global fields (`depth`, `embed_dim`, ...) and their choice tuples.
        heads: head counts offered to every block.
        prior: prior types offered per block or per head.
        pool: the token-pooling schedules.
        share: attention-sharing choices per block where sharing is possible.
        constraints, training, search: the file's `constraints:`, `training:`, `search:` blocks.
    """

    name: str
    description: str
    fixed: Mapping[str, Any]
    choices: Mapping[str, tuple]
    heads: tuple[int, ...]
    prior: PriorDimension
    pool: PoolDimension
    share: tuple[bool, ...]
    constraints: Constraints
    training: TrainingConfig
    search: SearchDefaults

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path: str | os.PathLike, *, check_feasible: bool = True) -> SearchSpace:
        """Read and validate a space file; errors name the file and line of the bad key.

        With `check_feasible`, random candidates (seeded by `search.seed`) are drawn until one
        meets the constraints, so a space that cannot be satisfied fails here, at load time.
        """
        path = os.fspath(path)
        text = read_user_text(path, what="search-space",
                              hint="Point to a space file, e.g. search_spaces/digits.yaml.")
        return cls.from_yaml(text, source=path, check_feasible=check_feasible)

    @classmethod
    def from_yaml(cls, text: str, *, source: str = "<space>",
                  check_feasible: bool = True) -> SearchSpace:
        """Parse YAML text (`yaml.safe_load`) and validate it; `source` names it in errors."""
        try:
            data = yaml.safe_load(text)
            root = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(e, "problem", None) or str(e)
            raise ConfigError(f"{source}: the search space is not valid YAML{where}: {problem}."
                              " Fix the syntax there.") from None
        if isinstance(data, dict) and "name" not in data and source != "<space>":
            data["name"] = os.path.splitext(os.path.basename(source))[0] or "space"
        try:
            return cls.from_dict(data, check_feasible=check_feasible)
        except FieldError as e:
            line = line_of(root, e.path)
            raise ConfigError(f"{source}{f':{line}' if line else ''}: {e}") from None
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_dict(cls, data: Any, *, check_feasible: bool = True) -> SearchSpace:
        """Validate the mapping form of a space file (what `yaml.safe_load` returns)."""
        if data is None:
            raise ConfigError("the search space is empty. Write at least `dimensions:` with"
                              " depth and heads; see docs/search_spaces.md for an example.")
        if not isinstance(data, Mapping):
            raise ConfigError(
                f"a search space must be a mapping with `arch:`, `dimensions:`, ... blocks, but"
                f" got {type(data).__name__}. See docs/search_spaces.md for an example."
            )
        check_keys((), data, TOP_LEVEL_KEYS)
        name = data.get("name", "space")
        if not isinstance(name, str) or not name:
            raise FieldError(("name",), f"name must be a non-empty string, but got {name!r}."
                                         " Write e.g. name: digits.")
        description = data.get("description", "")
        if not isinstance(description, str):
            raise FieldError(("description",), f"description must be text, but got"
                                                f" {description!r}. Quote it.")

        arch = mapping(("arch",), data.get("arch"), "arch: {img_size: 32, num_classes: 10}")
        check_keys(("arch",), arch, ARCH_KEYS)
        dims = mapping(("dimensions",), data.get("dimensions"),
                        "dimensions: {depth: [2, 4], heads: [1, 2]}")
        check_keys(("dimensions",), dims, DIMENSION_KEYS)

        defaults = {f.name: f.default for f in dataclasses.fields(ArchSpec) if f.name != "blocks"}
        fixed: dict[str, Any] = {}
        choices: dict[str, tuple] = {}
        for key in ARCH_KEYS:
            if key in arch and key in dims:
                raise FieldError(("dimensions", key),
                                  f"{key} is both fixed in `arch:` and searched in `dimensions:`."
                                  " Keep it in one of the two blocks.")
            if key in arch:
                fixed[key] = FIELD_CHECKS[key](("arch", key), arch[key])
            elif key in dims:
                choices[key] = choice_list(("dimensions", key), dims[key], FIELD_CHECKS[key])
            elif key in defaults:
                fixed[key] = defaults[key]
        if "depth" not in fixed and "depth" not in choices:
            raise FieldError(("dimensions",), "the space has no depth. Add depth: [choices] under"
                                               " `dimensions:` (or depth: N under `arch:`).")
        if "heads" not in dims:
            raise FieldError(("dimensions",), "the space has no head counts. Add heads: [1, 2, 4]"
                                               " (choices per block) under `dimensions:`.")
        heads = choice_list(("dimensions", "heads"), dims["heads"],
                            bounded("heads", int_value))
        prior = parse_prior(dims.get("prior", ["none"]))
        pool = parse_pool(dims.get("pool"))
        share = choice_list(("dimensions", "share"), dims.get("share", [False]), bool_value)
        constraints = Constraints.from_dict(data.get("constraints"))
        training_data = mapping(("training",), data.get("training"),
                                 "training: {dataset: digits, epochs: 12}")
        try:
            training = TrainingConfig.from_dict(training_data)
        except ConfigError as e:
            bad = [k for k in training_data if f"{k!r}" in str(e) or f"training.{k} " in str(e)]
            raise FieldError(("training",) + tuple(bad[:1]), str(e)) from None
        search = SearchDefaults.from_dict(data.get("search"))

        space = cls(name=name, description=description, fixed=fixed, choices=choices,
                    heads=heads, prior=prior, pool=pool, share=share, constraints=constraints,
                    training=training, search=search)
        rules.check_space(space)
        if check_feasible:
            space.sample_feasible(random.Random(search.seed))
        return space

    # ------------------------------------------------------------------ cross-field rules
    def values_of(self, name: str) -> tuple:
        """All values a global field can take: its choices, or its one fixed value."""
        return self.choices[name] if name in self.choices else (self.fixed[name],)

    # ------------------------------------------------------------------ proposing
    def resolve_cls_block(self, depth: int) -> int:
        return resolve_cls_block(self.fixed["cls_block"], depth, self.fixed["head"])

    def share_possible(self, i: int, pool: bool, cls_block: int) -> bool:
        """Whether block `i` may share attention (ArchSpec's rule, `spvit.arch.can_share`)."""
        return can_share(i, pool=pool, head=self.fixed["head"], cls_block=cls_block)

    def build(self, choose: Chooser) -> ArchSpec:
        """The one code path behind `sample` and `suggest`."""

        def pick(name: str, options: tuple) -> Any:
            return options[0] if len(options) == 1 else choose(name, options)

        values = dict(self.fixed)
        for name in SEARCHABLE:
            if name in self.choices:
                values[name] = pick(name, self.choices[name])
        depth = values.pop("depth")
        cls_block = self.resolve_cls_block(depth)
        values["cls_block"] = cls_block
        side = values["img_size"] // values["patch_size"]
        schedules = None if self.pool.free else self.pool.valid_schedules(depth, side)
        pools = 0
        blocks: list[BlockSpec] = []
        for i in range(depth):
            if schedules is not None:
                options = tuple(sorted({i in s for s in schedules}))
                pool = pick(f"pool_{i}", options)
                schedules = tuple(s for s in schedules if (i in s) == pool)
            elif i >= self.pool.from_block and pools < self.pool.max_pools and can_pool(side):
                pool = pick(f"pool_{i}", (False, True))
            else:
                pool = False
            if pool:
                pools += 1
                side = pooled_side(side)
            share = False
            if self.share_possible(i, pool, cls_block):
                share = pick(f"share_{i}", self.share)
            if share:
                blocks.append(BlockSpec(heads=blocks[-1].heads, prior="none", share=True))
                continue
            heads = pick(f"heads_{i}", self.heads)
            if self.prior.per_head:
                prior: Any = tuple(pick(f"prior_{i}_{h}", self.prior.types) for h in range(heads))
            else:
                prior = pick(f"prior_{i}", self.prior.types)
            blocks.append(BlockSpec(heads=heads, prior=prior, share=False, pool=pool))
        return ArchSpec(blocks=tuple(blocks), **values)

    def sample(self, rng: random.Random | Any) -> ArchSpec:
        """Draw one member at random; `rng` is a `random.Random` or `numpy.random.Generator`.

        Each choice is drawn uniformly given the earlier ones (so the draw is uniform per
        dimension, not over the whole space). Constraints are not applied: see
        `sample_feasible`.
        """
        return self.build(rng_chooser(rng))

    def suggest(self, trial: Any) -> ArchSpec:
        """Propose one member through an Optuna trial (define-by-run, flat labels as names).

        Only choices with more than one option are asked; constraints are not applied (the
        search study checks them: `nas.study.SearchStudy.ask`).
        """
        return self.build(trial_chooser(trial))

    def sample_feasible(self, rng: random.Random | Any, *,
                        max_tries: int | None = None) -> FeasibleSample:
        """Draw members until one meets the constraints; `ConfigError` after `max_tries`
        (default `search.max_infeasible`) rejections in a row."""
        tries = self.search.max_infeasible if max_tries is None else max_tries
        last: list[str] = []
        for _ in range(tries):
            spec = self.sample(rng)
            cost = estimate(spec)
            last = self.constraints.violations(spec, cost)
            if not last:
                return FeasibleSample(spec, cost)
        raise self._infeasible_error(tries, last)

    def _infeasible_error(self, tries: int, last: list[str]) -> ConfigError:
        return ConfigError(
            f"no architecture of space {self.name!r} met the constraints in {tries} tries in a"
            f" row (last: {'; '.join(last)}). Relax `constraints:` ({self.constraints.to_dict()})"
            " or shrink the space's depth/width choices."
        )

    # ------------------------------------------------------------------ membership, describing
    def why_not(self, spec: ArchSpec) -> str | None:
        """None if `spec` is a member of the space, else one line saying why it is not."""
        return membership.why_not(self, spec)

    def contains(self, spec: ArchSpec) -> bool:
        """True if the space can produce `spec` (constraints aside: see `constraints`)."""
        return self.why_not(spec) is None

    def __contains__(self, spec: object) -> bool:
        return isinstance(spec, ArchSpec) and self.contains(spec)

    def dimensions(self) -> list[Dimension]:
        """The searched choices (a dimension with one choice is fixed and not listed)."""
        return membership.dimensions(self)

    def size(self) -> int:
        """The exact number of distinct architectures in the space (constraints aside)."""
        return membership.size(self)

    # ------------------------------------------------------------------ serialising
    def to_dict(self) -> dict[str, Any]:
        """The resolved space (every default filled in); `from_dict` of it gives an equal space."""
        dims: dict[str, Any] = {name: list(c) for name, c in self.choices.items()}
        dims["heads"] = list(self.heads)
        dims["prior"] = self.prior.to_dict()
        dims["pool"] = self.pool.to_dict()
        dims["share"] = list(self.share)
        return {
            "name": self.name,
            "description": self.description,
            "arch": dict(self.fixed),
            "dimensions": dims,
            "constraints": self.constraints.to_dict(),
            "training": self.training.to_dict(),
            "search": self.search.to_dict(),
        }

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    def save(self, path: str | os.PathLike) -> None:
        """Write the resolved space to `path` atomically (a run folder's `space.yaml`)."""
        atomic_write_text(path, self.to_yaml())

