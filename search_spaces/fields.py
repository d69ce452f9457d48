"""Field checkers of a search-space file: typed values, choice lists, key checks, line numbers.

Every checker takes the path of the key it reads (`("dimensions", "heads", 2)`) and raises a
`FieldError` that remembers it, so `SearchSpace.from_yaml` can name the file's line. The rules of
an architecture itself live in `spvit.arch.ArchSpec`; these only check the shape of the file.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import yaml

from spvit.arch import HEADS, INIT_SCHEMES, POS_EMBEDS, STEMS
from spvit.errors import ConfigError, did_you_mean

# ArchSpec global fields that stay fixed across a space (they define the task, not the model).
FIXED_ONLY: tuple[str, ...] = ("img_size", "in_chans", "num_classes", "stem", "head", "cls_block")
# Global fields that may be searched (listed under `dimensions:`) or fixed (under `arch:`), in the
# order they are proposed.
SEARCHABLE: tuple[str, ...] = (
    "depth", "patch_size", "embed_dim", "mlp_ratio", "pool_width_factor", "init", "pos_embed",
    "conv_pos", "qkv_bias", "drop_path_rate",
)
BLOCK_DIMENSIONS: tuple[str, ...] = ("heads", "prior", "pool", "share")

# Generous upper bounds of a space's values, checked as each value is read, before anything is
# built or counted: the loader builds the architectures a space can produce (and counts, and
# samples them), so an unbounded value (depth: [1000000000]) would keep it busy for hours. Each
# is well beyond what a vision transformer of this family uses.
MAXIMA: dict[str, int | float] = {
    "depth": 64,
    "embed_dim": 8192,
    "heads": 64,
    "mlp_ratio": 16.0,
    "img_size": 4096,
    "patch_size": 1024,
    "in_chans": 64,
    "num_classes": 100_000,
    "pool_width_factor": 8,
    "cls_block": 64,  # |cls_block|: a block index, or counted from the end
    "block_index": 63,  # a block named in a pool schedule, or `pool.from_block`
    "max_pools": 64,
}
# The most choices one list (`depth: [...]`, `pool.schedules: [...]`) may offer.
MAX_CHOICES = 256
ARCH_KEYS = FIXED_ONLY + SEARCHABLE
DIMENSION_KEYS = SEARCHABLE + BLOCK_DIMENSIONS


# ---------------------------------------------------------------------------- errors with a place
class FieldError(ConfigError):
    """A `ConfigError` that remembers which key of the file it is about (for the line number)."""

    def __init__(self, path: Sequence[str | int], message: str) -> None:
        super().__init__(message)
        self.path = tuple(path)


def dotted(path: Sequence[str | int]) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def check_keys(path: tuple, data: Mapping, allowed: Sequence[str]) -> None:
    where = f"`{dotted(path)}:`" if path else "the top level of the space file"
    for key in data:
        if key not in allowed:
            raise FieldError(
                path + (key,),
                f"unknown key {key!r} in {where}.{did_you_mean(key, allowed)} Valid keys:"
                f" {list(allowed)}.",
            )


def mapping(path: tuple, value: Any, example: str) -> Mapping:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise FieldError(path, f"{dotted(path)} must be a mapping of `key: value` lines, but got"
                                f" {value!r}. Write it like {example}.")
    return value


# ---------------------------------------------------------------------------- whole numbers
def is_whole(value: Any, minimum: int | None = None) -> bool:
    """True for an int (a bool is not one) that is >= `minimum` when one is given."""
    return (isinstance(value, int) and not isinstance(value, bool)
            and (minimum is None or value >= minimum))


def whole_number(name: str, value: Any, minimum: int, fix: str, *,
                 rule: str | None = None) -> int:
    """`value` if it is an integer >= `minimum` (`is_whole`), else a `ConfigError` that states
    the rule, the value and the fix: "{name} must be {rule}, but got {value!r}. {fix}", the
    rule being "an integer >= {minimum}" unless given (e.g. "an integer >= --retrain (6)").
    For a key of a space file, whose line is named, use `int_value`."""
    if not is_whole(value, minimum):
        raise ConfigError(f"{name} must be {rule or f'an integer >= {minimum}'}, but got"
                          f" {value!r}. {fix}")
    return value


# ---------------------------------------------------------------------------- value checkers
def int_value(path: tuple, value: Any, minimum: int | None = 1) -> int:
    if not is_whole(value):
        raise FieldError(path, f"{dotted(path)} must be an integer, but got {value!r}"
                                f" ({type(value).__name__}). Write a whole number.")
    if minimum is not None and value < minimum:
        raise FieldError(path, f"{dotted(path)} must be >= {minimum}, but got {value}. Raise it.")
    return value


def at_most(path: tuple, value: int | float, name: str) -> int | float:
    """`value` if it is within `MAXIMA[name]` (in absolute value), else a `FieldError`."""
    limit = MAXIMA[name]
    if abs(value) > limit:
        raise FieldError(path, f"{dotted(path)} must be at most {limit} ({name} is bounded so"
                                f" that the space can be checked and searched), but got {value}."
                                f" Use a value of at most {limit}.")
    return value


def bounded(name: str, check: Callable[[tuple, Any], Any]) -> Callable[[tuple, Any], Any]:
    """`check`, then `at_most(..., name)`."""
    def check_bounded(path: tuple, value: Any) -> Any:
        return at_most(path, check(path, value), name)
    return check_bounded


def number(path: tuple, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        extra = ""
        if isinstance(value, str):
            extra = " (YAML reads 1e6 as text: write 1.0e+6 or 1000000)"
        raise FieldError(path, f"{dotted(path)} must be a number, but got {value!r}{extra}."
                                " Write a plain number such as 4.0.")
    if not math.isfinite(value):
        raise FieldError(path, f"{dotted(path)} must be finite, but got {value!r}."
                                " Write a plain number.")
    return float(value)


def positive(path: tuple, value: Any) -> float:
    v = number(path, value)
    if not v > 0:
        raise FieldError(path, f"{dotted(path)} must be > 0, but got {value!r}. Use a positive"
                                " number.")
    return v


def drop_path(path: tuple, value: Any) -> float:
    v = number(path, value)
    if not 0.0 <= v < 1.0:
        raise FieldError(path, f"{dotted(path)} must be in [0, 1), but got {value!r}."
                                " Use e.g. 0.1.")
    return v


def bool_value(path: tuple, value: Any) -> bool:
    if not isinstance(value, bool):
        raise FieldError(path, f"{dotted(path)} must be true or false, but got {value!r}."
                                " Write true or false.")
    return value


def one_of(options: tuple[str, ...]) -> Callable[[tuple, Any], str]:
    def check(path: tuple, value: Any) -> str:
        if not isinstance(value, str) or value not in options:
            hint = did_you_mean(value, options) if isinstance(value, str) else ""
            raise FieldError(path, f"{dotted(path)} must be one of {list(options)}, but got"
                                    f" {value!r}.{hint}")
        return value
    return check


def any_int(path: tuple, value: Any) -> int:
    return int_value(path, value, minimum=None)


FIELD_CHECKS: dict[str, Callable[[tuple, Any], Any]] = {
    "img_size": bounded("img_size", int_value),
    "patch_size": bounded("patch_size", int_value),
    "in_chans": bounded("in_chans", int_value),
    "num_classes": bounded("num_classes", int_value),
    "embed_dim": bounded("embed_dim", int_value),
    "depth": bounded("depth", int_value),
    "pool_width_factor": bounded("pool_width_factor", int_value),
    "cls_block": bounded("cls_block", any_int),
    "mlp_ratio": bounded("mlp_ratio", positive),
    "drop_path_rate": drop_path,
    "stem": one_of(STEMS),
    "head": one_of(HEADS),
    "init": one_of(INIT_SCHEMES),
    "pos_embed": one_of(POS_EMBEDS),
    "conv_pos": bool_value,
    "qkv_bias": bool_value,
}


def choice_list(path: tuple, value: Any, check: Callable[[tuple, Any], Any]) -> tuple:
    name = dotted(path)
    if not isinstance(value, list):
        raise FieldError(path, f"{name} must be a list of choices, but got {value!r}. Write"
                                f" {path[-1]}: [{value!r}] for one choice, or move a fixed value"
                                " to the `arch:` block.")
    if not value:
        raise FieldError(path, f"{name} is an empty choice list, so nothing can be sampled."
                                " List at least one choice or remove the key.")
    if len(value) > MAX_CHOICES:
        raise FieldError(path, f"{name} offers {len(value)} choices, more than the"
                                f" {MAX_CHOICES} one list may offer (the loader checks their"
                                f" combinations). Keep at most {MAX_CHOICES} choices.")
    out = tuple(check(path + (i,), v) for i, v in enumerate(value))
    for i, v in enumerate(out):
        if v in out[:i]:
            raise FieldError(path + (i,), f"{name} lists {v!r} twice. Remove the duplicate.")
    return out


# ---------------------------------------------------------------------------- line numbers
def line_of(root: Any, path: Sequence[str | int]) -> int | None:
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

