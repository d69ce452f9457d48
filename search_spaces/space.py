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

Infeasible candidates (a constraint fails) are rejected before any training:
`sample_feasible(rng)` redraws, `ask_feasible(study)` tells the rejected Optuna trials as PRUNED
with their constraint values and an `infeasible` user attribute, and both give up with a
`ConfigError` after `search.max_infeasible` consecutive rejections.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import math
import os
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from spvit.arch import HEADS, INIT_SCHEMES, POS_EMBEDS, PRIOR_TYPES, STEMS, ArchSpec, BlockSpec
from spvit.cost import Cost, estimate
from spvit.errors import ConfigError
from spvit.io import atomic_write_text, read_user_text

from .training import TrainingConfig

SAMPLERS: tuple[str, ...] = ("nsga2", "tpe", "gp", "random", "qmc", "auto")

TOP_LEVEL_KEYS: tuple[str, ...] = (
    "name", "description", "arch", "dimensions", "constraints", "training", "search",
)
# ArchSpec global fields that stay fixed across a space (they define the task, not the model).
FIXED_ONLY: tuple[str, ...] = ("img_size", "in_chans", "num_classes", "stem", "head", "cls_block")
# Global fields that may be searched (listed under `dimensions:`) or fixed (under `arch:`), in the
# order they are proposed.
SEARCHABLE: tuple[str, ...] = (
    "depth", "patch_size", "embed_dim", "mlp_ratio", "pool_width_factor", "init", "pos_embed",
    "conv_pos", "qkv_bias", "drop_path_rate",
)
BLOCK_DIMENSIONS: tuple[str, ...] = ("heads", "prior", "pool", "share")
_ARCH_KEYS = FIXED_ONLY + SEARCHABLE
_DIMENSION_KEYS = SEARCHABLE + BLOCK_DIMENSIONS
_CONSTRAINT_KEYS = ("max_gflops", "min_gflops", "max_params", "min_params", "min_tokens")
_PRIOR_KEYS = ("types", "per_head")
_MAX_PROBES = 2048  # global-field combinations built at load time
_POOL_KEYS = ("schedules", "free", "max_pools", "from_block")


# ---------------------------------------------------------------------------- errors with a place
class _FieldError(ConfigError):
    """A `ConfigError` that remembers which key of the file it is about (for the line number)."""

    def __init__(self, path: Sequence[str | int], message: str) -> None:
        super().__init__(message)
        self.path = tuple(path)


def _dotted(path: Sequence[str | int]) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _hint(key: Any, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(str(key), list(options), n=1)
    return f" Did you mean '{close[0]}'?" if close else ""


def _check_keys(path: tuple, data: Mapping, allowed: Sequence[str]) -> None:
    where = f"`{_dotted(path)}:`" if path else "the top level of the space file"
    for key in data:
        if key not in allowed:
            raise _FieldError(
                path + (key,),
                f"unknown key {key!r} in {where}.{_hint(key, allowed)} Valid keys:"
                f" {list(allowed)}.",
            )


def _mapping(path: tuple, value: Any, example: str) -> Mapping:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _FieldError(path, f"{_dotted(path)} must be a mapping of `key: value` lines, but got"
                                f" {value!r}. Write it like {example}.")
    return value


# ---------------------------------------------------------------------------- value checkers
def _int_value(path: tuple, value: Any, minimum: int | None = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _FieldError(path, f"{_dotted(path)} must be an integer, but got {value!r}"
                                f" ({type(value).__name__}). Write a whole number.")
    if minimum is not None and value < minimum:
        raise _FieldError(path, f"{_dotted(path)} must be >= {minimum}, but got {value}. Raise it.")
    return value


def _number(path: tuple, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        extra = ""
        if isinstance(value, str):
            extra = " (YAML reads 1e6 as text: write 1.0e+6 or 1000000)"
        raise _FieldError(path, f"{_dotted(path)} must be a number, but got {value!r}{extra}."
                                " Write a plain number such as 4.0.")
    if not math.isfinite(value):
        raise _FieldError(path, f"{_dotted(path)} must be finite, but got {value!r}."
                                " Write a plain number.")
    return float(value)


def _positive(path: tuple, value: Any) -> float:
    v = _number(path, value)
    if not v > 0:
        raise _FieldError(path, f"{_dotted(path)} must be > 0, but got {value!r}. Use a positive"
                                " number.")
    return v


def _drop_path(path: tuple, value: Any) -> float:
    v = _number(path, value)
    if not 0.0 <= v < 1.0:
        raise _FieldError(path, f"{_dotted(path)} must be in [0, 1), but got {value!r}."
                                " Use e.g. 0.1.")
    return v


def _bool_value(path: tuple, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _FieldError(path, f"{_dotted(path)} must be true or false, but got {value!r}."
                                " Write true or false.")
    return value


def _one_of(options: tuple[str, ...]) -> Callable[[tuple, Any], str]:
    def check(path: tuple, value: Any) -> str:
        if not isinstance(value, str) or value not in options:
            hint = _hint(value, options) if isinstance(value, str) else ""
            raise _FieldError(path, f"{_dotted(path)} must be one of {list(options)}, but got"
                                    f" {value!r}.{hint}")
        return value
    return check


def _any_int(path: tuple, value: Any) -> int:
    return _int_value(path, value, minimum=None)


_FIELD_CHECKS: dict[str, Callable[[tuple, Any], Any]] = {
    "img_size": _int_value,
    "patch_size": _int_value,
    "in_chans": _int_value,
    "num_classes": _int_value,
    "embed_dim": _int_value,
    "depth": _int_value,
    "pool_width_factor": _int_value,
    "cls_block": _any_int,
    "mlp_ratio": _positive,
    "drop_path_rate": _drop_path,
    "stem": _one_of(STEMS),
    "head": _one_of(HEADS),
    "init": _one_of(INIT_SCHEMES),
    "pos_embed": _one_of(POS_EMBEDS),
    "conv_pos": _bool_value,
    "qkv_bias": _bool_value,
}


def _choice_list(path: tuple, value: Any, check: Callable[[tuple, Any], Any]) -> tuple:
    name = _dotted(path)
    if not isinstance(value, list):
        raise _FieldError(path, f"{name} must be a list of choices, but got {value!r}. Write"
                                f" {path[-1]}: [{value!r}] for one choice, or move a fixed value"
                                " to the `arch:` block.")
    if not value:
        raise _FieldError(path, f"{name} is an empty choice list, so nothing can be sampled."
                                " List at least one choice or remove the key.")
    out = tuple(check(path + (i,), v) for i, v in enumerate(value))
    for i, v in enumerate(out):
        if v in out[:i]:
            raise _FieldError(path + (i,), f"{name} lists {v!r} twice. Remove the duplicate.")
    return out


# ---------------------------------------------------------------------------- typed parts
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
        return tuple(s for s in self.schedules if _schedule_fits(s, depth, side))


def _schedule_fits(schedule: Sequence[int], depth: int, side: int) -> bool:
    for i in schedule:
        if i >= depth or side < 3:
            return False
        side = math.ceil(side / 2)
    return True


@dataclass(frozen=True)
class SearchDefaults:
    """Defaults of the search driver, from the space's `search:` block.

    Args:
        trials: Optuna trials to run (infeasible proposals rejected before launch do not count).
        concurrent: trials trained at the same time.
        sampler: `nsga2` (default), `tpe`, `gp`, `random` or `qmc` (`nas.study.make_sampler`).
        population_size: NSGA-II generation size; None lets the search driver choose one from
            `trials` (Optuna's own default, 50, would sample at random for the first 50 trials).
        seed: seed of the sampler (and of any random draw the driver makes).
        max_consecutive_failures: stop the search after this many crashed trials in a row.
        max_infeasible: give up (the constraints cannot be met) after this many rejected
            proposals in a row.
    """

    trials: int = 16
    concurrent: int = 2
    sampler: str = "nsga2"
    population_size: int | None = None
    seed: int = 0
    max_consecutive_failures: int = 3
    max_infeasible: int = 200

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, path: tuple = ("search",)) -> SearchDefaults:
        data = _mapping(path, data, "search: {trials: 16, concurrent: 2}")
        names = [f.name for f in dataclasses.fields(cls)]
        _check_keys(path, data, names)
        kwargs: dict[str, Any] = {}
        for name in ("trials", "concurrent", "max_consecutive_failures", "max_infeasible"):
            if name in data:
                kwargs[name] = _int_value(path + (name,), data[name], 1)
        if "seed" in data:
            kwargs["seed"] = _int_value(path + ("seed",), data["seed"], 0)
        if "sampler" in data:
            kwargs["sampler"] = _one_of(SAMPLERS)(path + ("sampler",), data["sampler"])
        if data.get("population_size") is not None:
            kwargs["population_size"] = _int_value(path + ("population_size",),
                                                   data["population_size"], 2)
        return cls(**kwargs)


@dataclass(frozen=True)
class Constraints:
    """Hard limits on a candidate, checked on its analytic cost before any training.

    Args:
        max_gflops, min_gflops: bounds on GMACs of one image's forward pass (`spvit.cost`).
        max_params, min_params: bounds on the parameter count.
        min_tokens: the fewest patch tokens any block may see (the last grid side squared;
            the CLS token is not counted), which bounds how aggressively tokens are pooled.
    """

    max_gflops: float | None = None
    min_gflops: float | None = None
    max_params: float | None = None
    min_params: float | None = None
    min_tokens: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None,
                  path: tuple = ("constraints",)) -> Constraints:
        data = _mapping(path, data, "constraints: {max_gflops: 0.5, max_params: 5.0e+6}")
        _check_keys(path, data, _CONSTRAINT_KEYS)
        kwargs: dict[str, Any] = {}
        for name in ("max_gflops", "min_gflops", "max_params", "min_params"):
            if data.get(name) is None:
                continue
            value = _number(path + (name,), data[name])
            if name.startswith("max") and not value > 0:
                raise _FieldError(
                    path + (name,),
                    f"{_dotted(path + (name,))} must be > 0, but got {data[name]!r}: no"
                    " architecture can meet it. Set a positive limit or drop the key.",
                )
            if name.startswith("min") and value < 0:
                raise _FieldError(
                    path + (name,),
                    f"{_dotted(path + (name,))} must be >= 0, but got {data[name]!r}."
                    " Set a non-negative bound or drop the key.",
                )
            kwargs[name] = value
        if data.get("min_tokens") is not None:
            kwargs["min_tokens"] = _int_value(path + ("min_tokens",), data["min_tokens"], 1)
        for what in ("gflops", "params"):
            lo, hi = kwargs.get(f"min_{what}"), kwargs.get(f"max_{what}")
            if lo is not None and hi is not None and lo > hi:
                raise _FieldError(
                    path + (f"min_{what}",),
                    f"{_dotted(path)}.min_{what} {lo:g} is above max_{what} {hi:g}, so no"
                    f" architecture can meet both. Lower min_{what} or raise max_{what}.",
                )
        return cls(**kwargs)

    def _checks(self, spec: ArchSpec, cost: Cost) -> list[tuple[str, float, str]]:
        """(name, normalised violation (<= 0 means satisfied), human line) per set constraint."""
        out = []
        if self.max_gflops is not None:
            out.append(("max_gflops", cost.gflops / self.max_gflops - 1.0,
                        f"gflops {cost.gflops:.4g} > max_gflops {self.max_gflops:g}"))
        if self.min_gflops is not None:
            out.append(("min_gflops", 1.0 - cost.gflops / self.min_gflops
                        if self.min_gflops > 0 else -1.0,
                        f"gflops {cost.gflops:.4g} < min_gflops {self.min_gflops:g}"))
        if self.max_params is not None:
            out.append(("max_params", cost.params / self.max_params - 1.0,
                        f"params {cost.params:,} > max_params {self.max_params:,.0f}"))
        if self.min_params is not None:
            out.append(("min_params", 1.0 - cost.params / self.min_params
                        if self.min_params > 0 else -1.0,
                        f"params {cost.params:,} < min_params {self.min_params:,.0f}"))
        if self.min_tokens is not None:
            tokens = min(spec.block_grids()) ** 2
            out.append(("min_tokens", 1.0 - tokens / self.min_tokens,
                        f"fewest patch tokens {tokens} < min_tokens {self.min_tokens}"))
        return out

    def violations(self, spec: ArchSpec, cost: Cost | None = None) -> list[str]:
        """One human line per violated constraint (empty when `spec` is feasible)."""
        cost = estimate(spec) if cost is None else cost
        return [line for _, value, line in self._checks(spec, cost) if value > 0]

    def values(self, spec: ArchSpec, cost: Cost | None = None) -> dict[str, float]:
        """Optuna's constraint convention: one value per set constraint, feasible when <= 0.

        Values are relative (`gflops / max_gflops - 1`, ...), so violations of different
        constraints are comparable when a sampler sums them.
        """
        cost = estimate(spec) if cost is None else cost
        return {name: value for name, value, _ in self._checks(spec, cost)}


@dataclass(frozen=True)
class Candidate:
    """A feasible architecture drawn from a space, with its cost."""

    spec: ArchSpec
    cost: Cost


@dataclass(frozen=True)
class Proposal:
    """A feasible architecture proposed by an Optuna trial that is still RUNNING.

    `rejected` holds the numbers of the trials that proposed infeasible architectures on the way
    (already told as PRUNED, with user attr `infeasible`); the caller runs `trial` and tells it.
    """

    trial: Any
    spec: ArchSpec
    cost: Cost
    rejected: tuple[int, ...] = ()


# ---------------------------------------------------------------------------- choosers
Chooser = Callable[[str, tuple], Any]


def _rng_chooser(rng: Any) -> Chooser:
    if isinstance(rng, random.Random):
        return lambda name, choices: choices[rng.randrange(len(choices))]
    try:
        import numpy as np
    except ImportError:  # numpy is a dependency; this only guards exotic installs
        np = None
    if np is not None and isinstance(rng, np.random.Generator):
        return lambda name, choices: choices[int(rng.integers(len(choices)))]
    raise TypeError(
        f"rng must be a random.Random or a numpy.random.Generator, but got {type(rng).__name__}."
        " Pass random.Random(seed) or numpy.random.default_rng(seed)."
    )


def _trial_chooser(trial: Any) -> Chooser:
    return lambda name, choices: trial.suggest_categorical(name, list(choices))


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
        except _FieldError as e:
            line = _line_of(root, e.path)
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
        _check_keys((), data, TOP_LEVEL_KEYS)
        name = data.get("name", "space")
        if not isinstance(name, str) or not name:
            raise _FieldError(("name",), f"name must be a non-empty string, but got {name!r}."
                                         " Write e.g. name: digits.")
        description = data.get("description", "")
        if not isinstance(description, str):
            raise _FieldError(("description",), f"description must be text, but got"
                                                f" {description!r}. Quote it.")

        arch = _mapping(("arch",), data.get("arch"), "arch: {img_size: 32, num_classes: 10}")
        _check_keys(("arch",), arch, _ARCH_KEYS)
        dims = _mapping(("dimensions",), data.get("dimensions"),
                        "dimensions: {depth: [2, 4], heads: [1, 2]}")
        _check_keys(("dimensions",), dims, _DIMENSION_KEYS)

        defaults = {f.name: f.default for f in dataclasses.fields(ArchSpec) if f.name != "blocks"}
        fixed: dict[str, Any] = {}
        choices: dict[str, tuple] = {}
        for key in _ARCH_KEYS:
            if key in arch and key in dims:
                raise _FieldError(("dimensions", key),
                                  f"{key} is both fixed in `arch:` and searched in `dimensions:`."
                                  " Keep it in one of the two blocks.")
            if key in arch:
                fixed[key] = _FIELD_CHECKS[key](("arch", key), arch[key])
            elif key in dims:
                choices[key] = _choice_list(("dimensions", key), dims[key], _FIELD_CHECKS[key])
            elif key in defaults:
                fixed[key] = defaults[key]
        if "depth" not in fixed and "depth" not in choices:
            raise _FieldError(("dimensions",), "the space has no depth. Add depth: [choices] under"
                                               " `dimensions:` (or depth: N under `arch:`).")
        if "heads" not in dims:
            raise _FieldError(("dimensions",), "the space has no head counts. Add heads: [1, 2, 4]"
                                               " (choices per block) under `dimensions:`.")
        heads = _choice_list(("dimensions", "heads"), dims["heads"], _int_value)
        prior = _parse_prior(dims.get("prior", ["none"]))
        pool = _parse_pool(dims.get("pool"))
        share = _choice_list(("dimensions", "share"), dims.get("share", [False]), _bool_value)
        constraints = Constraints.from_dict(data.get("constraints"))
        training_data = _mapping(("training",), data.get("training"),
                                 "training: {dataset: digits, epochs: 12}")
        try:
            training = TrainingConfig.from_dict(training_data)
        except ConfigError as e:
            bad = [k for k in training_data if f"{k!r}" in str(e) or f"training.{k} " in str(e)]
            raise _FieldError(("training",) + tuple(bad[:1]), str(e)) from None
        search = SearchDefaults.from_dict(data.get("search"))

        space = cls(name=name, description=description, fixed=fixed, choices=choices,
                    heads=heads, prior=prior, pool=pool, share=share, constraints=constraints,
                    training=training, search=search)
        space._validate()
        if check_feasible:
            space.sample_feasible(random.Random(search.seed))
        return space

    # ------------------------------------------------------------------ cross-field rules
    def values_of(self, name: str) -> tuple:
        """All values a global field can take: its choices, or its one fixed value."""
        return self.choices[name] if name in self.choices else (self.fixed[name],)

    def _validate(self) -> None:
        img = self.fixed["img_size"]
        head = self.fixed["head"]
        for p in self.values_of("patch_size"):
            where = ("dimensions" if "patch_size" in self.choices else "arch", "patch_size")
            if img % p:
                raise _FieldError(where, f"img_size {img} is not divisible by patch_size {p}."
                                         f" Use a patch size that divides {img}.")
            if self.fixed["stem"] == "conv" and p % 2:
                raise _FieldError(where, f"stem: conv needs an even patch_size, but the space"
                                         f" offers {p}. Use even patch sizes or stem: linear.")
        for w in self.values_of("embed_dim"):
            for h in self.heads:
                if w % h:
                    raise _FieldError(
                        ("dimensions", "heads"),
                        f"head count {h} does not divide embed_dim {w}; every head count must"
                        " divide every width because each Optuna parameter keeps one fixed"
                        f" choice list. Drop {h} from heads or {w} from embed_dim.",
                    )
        impulse = [s for s in self.values_of("init") if s.startswith("impulse")]
        if impulse and head == "cls":
            raise _FieldError(
                ("dimensions" if "init" in self.choices else "arch", "init"),
                f"init {impulse[0]} needs head: avg (attention maps over patch tokens only), but"
                " the space fixes head: cls. Set arch.head: avg or drop the impulse inits.",
            )
        if impulse and "none" in self.values_of("pos_embed"):
            raise _FieldError(
                ("dimensions" if "pos_embed" in self.choices else "arch", "pos_embed"),
                f"init {impulse[0]} solves Q/K against the positional encoding, but the space"
                " offers pos_embed: none. Drop none from pos_embed or the impulse inits.",
            )
        if impulse or "sincos" in self.values_of("pos_embed"):
            for w in self.values_of("embed_dim"):
                if w % 4:
                    what = f"init {impulse[0]}" if impulse else "pos_embed: sincos"
                    raise _FieldError(
                        ("dimensions" if "embed_dim" in self.choices else "arch", "embed_dim"),
                        f"{what} needs embed_dim divisible by 4 (a 2-D sin-cos encoding), but"
                        f" the space offers {w}. Use multiples of 4.",
                    )
        cls_block = self.fixed["cls_block"]
        if head == "avg" and cls_block != 0:
            raise _FieldError(("arch", "cls_block"),
                              f"cls_block only applies to head: cls, but got {cls_block} with"
                              " head: avg. Remove cls_block or set head: cls.")
        for depth in self.values_of("depth"):
            resolved = cls_block + depth if cls_block < 0 else cls_block
            if head == "cls" and not 0 <= resolved < depth:
                raise _FieldError(
                    ("arch", "cls_block"),
                    f"cls_block {cls_block} does not fit depth {depth} (it must name one of the"
                    f" {depth} blocks). Use 0 <= cls_block < {depth}, or a negative value counted"
                    " from the end (-2 = the CLS token joins for the last two blocks).",
                )
        if not self.pool.free:
            for schedule in self.pool.schedules:
                if not any(_schedule_fits(schedule, depth, img // p)
                           for depth in self.values_of("depth")
                           for p in self.values_of("patch_size")):
                    raise _FieldError(
                        ("dimensions", "pool", "schedules"),
                        f"pool schedule {list(schedule)} fits no depth of the space"
                        f" {list(self.values_of('depth'))} (a pool needs a block index < depth"
                        " and a grid of at least 3x3 before it). Fix or remove it.",
                    )
            for depth in self.values_of("depth"):
                for p in self.values_of("patch_size"):
                    side = img // p
                    if not self.pool.valid_schedules(depth, side):
                        raise _FieldError(
                            ("dimensions", "pool", "schedules"),
                            f"no pool schedule fits depth {depth} on a {side}x{side} grid"
                            f" (schedules {[list(s) for s in self.pool.schedules]}); each pool"
                            " needs a block index < depth and a grid of at least 3x3. Add []"
                            " (never pool) or a schedule that fits.",
                        )
        if self.constraints.min_tokens is not None:
            most = max((img // p) ** 2 for p in self.values_of("patch_size"))
            if self.constraints.min_tokens > most:
                raise _FieldError(
                    ("constraints", "min_tokens"),
                    f"constraints.min_tokens {self.constraints.min_tokens} exceeds the largest"
                    f" token grid of the space ({most} patch tokens), so no architecture can"
                    " meet it. Lower min_tokens or use a smaller patch size.",
                )
        self._probe_global_combinations()

    def _probe_global_combinations(self) -> None:
        """Build one candidate per combination of the searched global fields (first and last
        per-block choices), so that any rule of ArchSpec between global fields that the checks
        above do not spell out still fails here, at load time, and never during a search."""
        names = [n for n in SEARCHABLE if len(self.choices.get(n, ())) > 1]
        combos: Iterable[tuple] = itertools.product(*(self.choices[n] for n in names))
        total = math.prod(len(self.choices[n]) for n in names)
        if total > _MAX_PROBES:  # a huge product: a seeded random subset of it
            rng = random.Random(0)
            combos = [tuple(rng.choice(self.choices[n]) for n in names)
                      for _ in range(_MAX_PROBES)]
        for combo in combos:
            chosen = dict(zip(names, combo, strict=True))
            for end in (0, -1):
                try:
                    self._build(lambda n, c, chosen=chosen, end=end:
                                chosen[n] if n in chosen else c[end])
                except ConfigError as e:
                    raise _FieldError(
                        ("dimensions",),
                        f"the space can produce an invalid architecture (with {chosen}): {e}"
                        " Remove one of these choices.",
                    ) from None

    # ------------------------------------------------------------------ proposing
    def _resolve_cls_block(self, depth: int) -> int:
        if self.fixed["head"] != "cls":
            return 0
        cls_block = self.fixed["cls_block"]
        return cls_block + depth if cls_block < 0 else cls_block

    def _share_possible(self, i: int, pool: bool, cls_block: int) -> bool:
        # ArchSpec's rules: not on block 0, not on a pooling block, not where CLS joins.
        return i > 0 and not pool and not (self.fixed["head"] == "cls" and i == cls_block)

    def _build(self, choose: Chooser) -> ArchSpec:
        """The one code path behind `sample` and `suggest`."""

        def pick(name: str, options: tuple) -> Any:
            return options[0] if len(options) == 1 else choose(name, options)

        values = dict(self.fixed)
        for name in SEARCHABLE:
            if name in self.choices:
                values[name] = pick(name, self.choices[name])
        depth = values.pop("depth")
        cls_block = self._resolve_cls_block(depth)
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
            elif i >= self.pool.from_block and pools < self.pool.max_pools and side >= 3:
                pool = pick(f"pool_{i}", (False, True))
            else:
                pool = False
            if pool:
                pools += 1
                side = math.ceil(side / 2)
            share = False
            if self._share_possible(i, pool, cls_block):
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
        return self._build(_rng_chooser(rng))

    def suggest(self, trial: Any) -> ArchSpec:
        """Propose one member through an Optuna trial (define-by-run, flat labels as names).

        Only choices with more than one option are asked; constraints are not applied: see
        `ask_feasible`.
        """
        return self._build(_trial_chooser(trial))

    def sample_feasible(self, rng: random.Random | Any, *,
                        max_tries: int | None = None) -> Candidate:
        """Draw members until one meets the constraints; `ConfigError` after `max_tries`
        (default `search.max_infeasible`) rejections in a row."""
        tries = self.search.max_infeasible if max_tries is None else max_tries
        last: list[str] = []
        for _ in range(tries):
            spec = self.sample(rng)
            cost = estimate(spec)
            last = self.constraints.violations(spec, cost)
            if not last:
                return Candidate(spec, cost)
        raise self._infeasible_error(tries, last)

    def ask_feasible(self, study: Any, *, max_tries: int | None = None,
                     rejected_state: Any = None) -> Proposal:
        """Ask `study` for trials until one proposes a feasible member, and return it RUNNING.

        Every asked trial gets its constraint values (`trial.set_constraint`, feasible when
        <= 0). A rejected trial also gets user attrs `infeasible` (the violated constraints,
        "; "-joined) and `arch` (the flat ArchSpec), and is told as `rejected_state` (default
        PRUNED: TPE then ranks it below every feasible trial by its constraint values, NSGA-II
        skips it; neither trains it). Raises `ConfigError` after `max_tries` (default
        `search.max_infeasible`) rejections in a row.
        """
        from optuna.trial import TrialState

        state = TrialState.PRUNED if rejected_state is None else rejected_state
        tries = self.search.max_infeasible if max_tries is None else max_tries
        rejected: list[int] = []
        last: list[str] = []
        for _ in range(tries):
            trial = study.ask()
            spec = self.suggest(trial)
            cost = estimate(spec)
            for key, value in self.constraints.values(spec, cost).items():
                trial.set_constraint(key, value)
            last = self.constraints.violations(spec, cost)
            if not last:
                return Proposal(trial=trial, spec=spec, cost=cost, rejected=tuple(rejected))
            trial.set_user_attr("infeasible", "; ".join(last))
            trial.set_user_attr("arch", spec.to_flat())
            study.tell(trial, state=state)
            rejected.append(trial.number)
        raise self._infeasible_error(tries, last)

    def _infeasible_error(self, tries: int, last: list[str]) -> ConfigError:
        return ConfigError(
            f"no architecture of space {self.name!r} met the constraints in {tries} tries in a"
            f" row (last: {'; '.join(last)}). Relax `constraints:` ({self.constraints.to_dict()})"
            " or shrink the space's depth/width choices."
        )

    # ------------------------------------------------------------------ membership
    def why_not(self, spec: ArchSpec) -> str | None:
        """None if `spec` is a member of the space, else one line saying why it is not."""
        if not isinstance(spec, ArchSpec):
            return f"expected an ArchSpec, got {type(spec).__name__}"
        flat = spec.to_dict()
        depth = flat["depth"] = spec.depth
        for name in ("depth",) + tuple(k for k in _ARCH_KEYS if k != "depth"):
            value = flat[name]
            if name == "cls_block":
                expected = self._resolve_cls_block(depth)
                if value != expected:
                    return (f"cls_block {value} differs from the space's {expected} at depth"
                            f" {depth}")
                continue
            allowed = self.values_of(name)
            # type() as well as ==, so that True never passes for 1 (or 1 for 1.0).
            if not any(type(value) is type(a) and value == a for a in allowed):
                return f"{name} {value!r} is not among the space's choices {list(allowed)}"
        cls_block = self._resolve_cls_block(depth)
        pooled = tuple(i for i, b in enumerate(spec.blocks) if b.pool)
        if self.pool.free:
            if len(pooled) > self.pool.max_pools:
                return f"{len(pooled)} pools exceed the space's max_pools {self.pool.max_pools}"
            if pooled and pooled[0] < self.pool.from_block:
                return (f"block {pooled[0]} pools, but the space pools only from block"
                        f" {self.pool.from_block} on")
        elif pooled not in self.pool.schedules:
            return (f"pool schedule {list(pooled)} is not among the space's schedules"
                    f" {[list(s) for s in self.pool.schedules]}")
        for i, b in enumerate(spec.blocks):
            if self._share_possible(i, b.pool, cls_block):
                if b.share not in self.share:
                    return (f"share_{i} {b.share} is not among the space's choices"
                            f" {list(self.share)}")
            elif b.share:
                return f"block {i} shares attention where the space cannot"
            if b.share:
                continue
            if b.heads not in self.heads:
                return f"heads_{i} {b.heads} is not among the space's choices {list(self.heads)}"
            if not self.prior.per_head and not isinstance(b.prior, str):
                return (f"block {i} has per-head priors {list(b.prior)}, but the space chooses"
                        " one prior per block")
            for p in b.head_priors:
                if p not in self.prior.types:
                    return (f"block {i} prior {p!r} is not among the space's prior types"
                            f" {list(self.prior.types)}")
        return None

    def contains(self, spec: ArchSpec) -> bool:
        """True if the space can produce `spec` (constraints aside: see `constraints`)."""
        return self.why_not(spec) is None

    def __contains__(self, spec: object) -> bool:
        return isinstance(spec, ArchSpec) and self.contains(spec)

    # ------------------------------------------------------------------ describing
    def dimensions(self) -> list[Dimension]:
        """The searched choices (a dimension with one choice is fixed and not listed)."""
        out = [Dimension(name, c, "global") for name, c in self.choices.items() if len(c) > 1]
        if len(self.heads) > 1:
            out.append(Dimension("heads_{i}", self.heads, "block",
                                 "every block that does not share attention"))
        if len(self.prior.types) > 1:
            if self.prior.per_head:
                out.append(Dimension("prior_{i}_{h}", self.prior.types, "head",
                                     "every head of a block that does not share attention"))
            else:
                out.append(Dimension("prior_{i}", self.prior.types, "block",
                                     "every block that does not share attention"))
        if self.pool.free:
            if self.pool.max_pools > 0:
                out.append(Dimension("pool_{i}", (False, True), "block",
                                     f"blocks >= {self.pool.from_block}, at most"
                                     f" {self.pool.max_pools} pools, grid >= 3x3"))
        elif len(self.pool.schedules) > 1:
            out.append(Dimension("pool_{i}", self.pool.schedules, "block",
                                 "one of the listed schedules that fits the depth and grid"))
        if len(self.share) > 1:
            out.append(Dimension("share_{i}", self.share, "block",
                                 "blocks > 0 that do not pool and are not where CLS joins"))
        return out

    def size(self) -> int:
        """The exact number of distinct architectures in the space (constraints aside)."""
        other = 1
        for name, c in self.choices.items():
            if name not in ("depth", "patch_size"):
                other *= len(c)
        total = 0
        for depth in self.values_of("depth"):
            for p in self.values_of("patch_size"):
                total += self._count_blocks(depth, self.fixed["img_size"] // p)
        return other * total

    def _count_blocks(self, depth: int, side: int) -> int:
        n_types = len(self.prior.types)
        own = sum(n_types ** h if self.prior.per_head else n_types for h in self.heads)
        cls_block = self._resolve_cls_block(depth)

        def options(i: int, pool: bool) -> int:
            if not self._share_possible(i, pool, cls_block):
                return own
            return (own if False in self.share else 0) + (1 if True in self.share else 0)

        if not self.pool.free:
            total = 0
            for schedule in self.pool.valid_schedules(depth, side):
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
                if i >= self.pool.from_block and pools < self.pool.max_pools and s >= 3:
                    key = (pools + 1, math.ceil(s / 2))
                    nxt[key] = nxt.get(key, 0) + ways * options(i, True)
            states = nxt
        return sum(states.values())

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


# ---------------------------------------------------------------------------- block dimensions
def _parse_prior(value: Any) -> PriorDimension:
    path = ("dimensions", "prior")
    if isinstance(value, list):
        return PriorDimension(types=_choice_list(path, value, _one_of(PRIOR_TYPES)))
    data = _mapping(path, value, "prior: {types: [none, mlp], per_head: false}")
    _check_keys(path, data, _PRIOR_KEYS)
    if "types" not in data:
        raise _FieldError(path, "dimensions.prior needs `types:`, the prior types to choose"
                                f" from. Write types: {list(PRIOR_TYPES)}.")
    types = _choice_list(path + ("types",), data["types"], _one_of(PRIOR_TYPES))
    per_head = _bool_value(path + ("per_head",), data.get("per_head", False))
    return PriorDimension(types=types, per_head=per_head)


def _parse_pool(value: Any) -> PoolDimension:
    path = ("dimensions", "pool")
    if value is None:
        return PoolDimension()
    data = _mapping(path, value, "pool: {schedules: [[], [2]]} or pool: {free: true,"
                                 " max_pools: 2}")
    _check_keys(path, data, _POOL_KEYS)
    free = _bool_value(path + ("free",), data.get("free", False))
    if free:
        if "schedules" in data:
            raise _FieldError(path + ("schedules",),
                              "dimensions.pool has both free: true and schedules. Keep one:"
                              " a list of schedules, or free per-block pooling.")
        max_pools = _int_value(path + ("max_pools",), data.get("max_pools", 1), 0)
        from_block = _int_value(path + ("from_block",), data.get("from_block", 1), 0)
        return PoolDimension(schedules=(), free=True, max_pools=max_pools, from_block=from_block)
    for key in ("max_pools", "from_block"):
        if key in data:
            raise _FieldError(path + (key,), f"dimensions.pool.{key} only applies to free: true."
                                             " Add free: true or remove the key.")
    if "schedules" not in data:
        raise _FieldError(path, "dimensions.pool needs `schedules:` (lists of the block indices"
                                " that pool) or free: true. Write schedules: [[], [2]].")

    def schedule(p: tuple, v: Any) -> tuple[int, ...]:
        if not isinstance(v, list):
            raise _FieldError(p, f"{_dotted(p)} must be a list of block indices that pool, but"
                                 f" got {v!r}. Write [] for never, or e.g. [2, 5].")
        idx = tuple(_int_value(p + (j,), x, 0) for j, x in enumerate(v))
        if len(set(idx)) != len(idx):
            raise _FieldError(p, f"{_dotted(p)} names a block twice ({list(idx)}); a block pools"
                                 " at most once. Remove the duplicate.")
        return tuple(sorted(idx))

    schedules = _choice_list(path + ("schedules",), data["schedules"], schedule)
    return PoolDimension(schedules=schedules)


# ---------------------------------------------------------------------------- line numbers
def _line_of(root: Any, path: Sequence[str | int]) -> int | None:
    """1-based line of the deepest node of `path` found in the composed YAML tree."""
    node, line = root, None
    if node is None:
        return None
    for key in path:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if isinstance(k, yaml.ScalarNode) and k.value == str(key):
                    line, node = k.start_mark.line + 1, v
                    break
            else:
                return line
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) \
                and 0 <= key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
        else:
            return line
    return line
