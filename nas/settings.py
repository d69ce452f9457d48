"""The settings of a search: what `spvit-nas search` resolved, and what run.json keeps of it.

`SearchSettings` is a frozen dataclass holding every setting of one search (the study's name and
storage, the space and its training recipe, the budget, the sampler, the early-stopping
`scheduler`, the failure limits) with `OneShotOptions` nested for a one-shot search. Each checks
its own values in `__post_init__`, so no invalid settings object exists: a bad value is one
`SettingError` that names the setting (`trials`, `oneshot.rescore`) in backticks, states the
rule and the value; `launch/` puts its flag's name in place of the setting's. A resumed search
keeps the settings of `SearchSettings.FIXED` (`resumed_with`). `to_dict`/`from_dict` are the
run.json form, which `nas.run.RunInfo` (these settings plus the run's history) writes and reads;
run.json files written before `scheduler` existed (`asha`/`moasha` booleans and
`asha_reduction_factor`) read as `scheduler` and `reduction_factor`. No Optuna, no Ray.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, TypeVar

from nas.layout import RUN_FILE, TUNE_DIR
from search_spaces.search_defaults import DEFAULT_MAX_CONSECUTIVE_FAILURES, SAMPLERS
from spvit.errors import ConfigError

Scheduler = Literal["fifo", "asha", "moasha"]
SCHEDULERS: tuple[str, ...] = ("fifo", "asha", "moasha")
# ASHA's and MOASHA's reduction factor: each rung keeps the better 1/2.
DEFAULT_REDUCTION_FACTOR = 2.0
# run.json's format: 2 writes `scheduler` and `reduction_factor` (1: `asha`, `moasha` and
# `asha_reduction_factor`).
RUN_JSON_VERSION = 2

_Self = TypeVar("_Self", bound="SearchSettings")


class SettingError(ConfigError):
    """A setting's value breaks its rule. `setting` is its name (`oneshot.rescore` inside
    `OneShotOptions`); the message names every setting it mentions in backticks."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(message)
        self.setting = setting


class FixedSettingChanged(SettingError):
    """A resumed search asked for another value of a setting it keeps (`SearchSettings.FIXED`)."""

    def __init__(self, setting: str, value: Any, kept: Any) -> None:
        super().__init__(setting, f"`{setting}` {value} differs from {kept} in the run's"
                                  f" {RUN_FILE}; a resumed search keeps it.")
        self.value = value
        self.kept = kept


# ---------------------------------------------------------------------------- value checks
Check = Callable[[str, Any], Any]


def _integer(minimum: int) -> Check:
    def check(name: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise SettingError(name, f"`{name}` must be an integer >= {minimum}, but got"
                                     f" {value!r}. Use e.g. {max(minimum, 2)}.")
        return value
    return check


def _optional(check: Check) -> Check:
    return lambda name, value: None if value is None else check(name, value)


def _name(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise SettingError(name, f"`{name}` must be a non-empty name, but got {value!r}. Use e.g."
                                 " digits.")
    return value


def _text(name: str, value: Any) -> str:
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str):
        raise SettingError(name, f"`{name}` must be a string, but got {value!r}.")
    return value


def _one_of(choices: tuple[str, ...]) -> Check:
    def check(name: str, value: Any) -> str:
        if value not in choices:
            raise SettingError(name, f"`{name}` must be one of {', '.join(choices)}, but got"
                                     f" {value!r}.")
        return value
    return check


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise SettingError(name, f"`{name}` must be true or false, but got {value!r}.")
    return value


def _mapping(name: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise SettingError(name, f"`{name}` must be a mapping, but got {value!r}.")
    return dict(value)


def _gpus(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value not in (0, 1):
        raise SettingError(name, f"`{name}` must be 0 (CPU) or 1 (one GPU per worker), but got"
                                 f" {value!r}. Use 1 on a GPU cluster.")
    return float(value)


def _reduction_factor(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or not value > 1:
        raise SettingError(name, f"`{name}` must be a number > 1, but got {value!r}. Use e.g. 2"
                                 " (keep the better half at each rung) or 3.")
    return float(value)


def _check_fields(obj: Any, checks: Mapping[str, Check], prefix: str = "") -> None:
    for name, check in checks.items():
        object.__setattr__(obj, name, check(prefix + name, getattr(obj, name)))


# ---------------------------------------------------------------------------- one-shot
@dataclass(frozen=True)
class OneShotOptions:
    """The settings of a one-shot search (`nas.oneshot`): the trained supernet that scores
    `candidates` subnets with inherited weights; with `finetune_steps` > 0 the first `rescore`
    of that proxy front (None: `nas.oneshot`'s default, a multiple of the search's `trials`)
    are scored again after that many fine-tuning steps. The search's `trials` of them are
    trained stand-alone."""

    supernet: str
    candidates: int
    finetune_steps: int = 0
    rescore: int | None = None

    CHECKS: ClassVar[dict[str, Check]] = {
        "supernet": lambda name, value: _name(name, _text(name, value)),
        "candidates": _integer(1),
        "finetune_steps": _integer(0),
        "rescore": _optional(_integer(1)),
    }

    def __post_init__(self) -> None:
        _check_fields(self, self.CHECKS, "oneshot.")
        if self.rescore is not None and self.finetune_steps == 0:
            raise SettingError("oneshot.rescore",
                               f"`oneshot.rescore` {self.rescore} re-scores the proxy front after"
                               " fine-tuning, but `oneshot.finetune_steps` is not set (it is 0)."
                               " Set `oneshot.finetune_steps` (e.g. 60) or drop"
                               " `oneshot.rescore`.")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OneShotOptions:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


# ---------------------------------------------------------------------------- the settings
@dataclass(frozen=True)
class SearchSettings:
    """Every setting of one search, checked.

    Args:
        study_name: the Optuna study's name.
        storage: the study's storage: a journal file path or a database URL (password masked).
        sampler: one of `search_spaces.search_defaults.SAMPLERS`.
        seed: the sampler's seed.
        trials: trials to train in total (a one-shot search: how many of the proxy front).
        concurrent: trials trained at the same time.
        epochs: the full training budget of a trial.
        workers_per_trial: DeepSpeed workers per trial.
        space: the search-space file the search started from.
        training: the training recipe (`TrainingConfig.to_dict`).
        scheduler: early stopping: `fifo` (none), `asha` (on val_acc per epoch) or `moasha`
            (successive halving ranked by accuracy, GFLOPs and params together).
        reduction_factor: `asha`'s and `moasha`'s: each rung keeps the top 1/reduction_factor.
        feasible_proposals: proposals the cost model rejects are redrawn (False: told FAIL
            untrained, for comparisons).
        gpus_per_worker: 0 (CPU) or 1 (one GPU per worker).
        max_consecutive_failures: stop after this many failed trials in a row.
        population_size: NSGA-II's generation size (the `nsga2` and `auto` samplers only).
        oneshot: the one-shot settings; None for a search that trains every proposal.
        tune_experiment: Ray Tune's experiment folder inside the run folder.
    """

    study_name: str
    storage: str
    sampler: str
    seed: int
    trials: int
    concurrent: int
    epochs: int
    workers_per_trial: int
    space: str
    training: dict[str, Any]
    scheduler: Scheduler = "fifo"
    reduction_factor: float = DEFAULT_REDUCTION_FACTOR
    feasible_proposals: bool = True
    gpus_per_worker: float = 0.0
    max_consecutive_failures: int = DEFAULT_MAX_CONSECUTIVE_FAILURES
    population_size: int | None = None
    oneshot: OneShotOptions | None = None
    tune_experiment: str = TUNE_DIR

    CHECKS: ClassVar[dict[str, Check]] = {
        "study_name": _name,
        "storage": _text,
        "sampler": _one_of(SAMPLERS),
        "seed": _integer(0),
        "trials": _integer(1),
        "concurrent": _integer(1),
        "epochs": _integer(1),
        "workers_per_trial": _integer(1),
        "space": _text,
        "training": _mapping,
        "scheduler": _one_of(SCHEDULERS),
        "reduction_factor": _reduction_factor,
        "feasible_proposals": _flag,
        "gpus_per_worker": _gpus,
        "max_consecutive_failures": _integer(1),
        "population_size": _optional(_integer(2)),
        "tune_experiment": _name,
    }
    # What a resumed search keeps: they define what a trial and the study mean.
    FIXED: ClassVar[tuple[str, ...]] = ("study_name", "sampler", "seed", "epochs",
                                        "workers_per_trial", "scheduler", "reduction_factor",
                                        "population_size", "feasible_proposals")

    def __post_init__(self) -> None:
        _check_fields(self, self.CHECKS)
        if isinstance(self.oneshot, Mapping):
            object.__setattr__(self, "oneshot", OneShotOptions.from_dict(self.oneshot))
        if self.oneshot is not None and not isinstance(self.oneshot, OneShotOptions):
            raise SettingError("oneshot", f"`oneshot` must be the one-shot options or None, but"
                                          f" got {self.oneshot!r}.")
        if self.population_size is not None and self.sampler not in ("nsga2", "auto"):
            raise SettingError("population_size",
                               f"`population_size` {self.population_size} applies to the nsga2"
                               f" and auto samplers, but `sampler` is {self.sampler}. Drop"
                               " `population_size` or use `sampler` nsga2.")
        rescore = self.oneshot.rescore if self.oneshot is not None else None
        if rescore is not None and rescore < self.trials:
            raise SettingError("oneshot.rescore",
                               f"`oneshot.rescore` must be an integer >= `trials`"
                               f" ({self.trials}), but got {rescore}: the trials are picked from"
                               " the re-scored candidates. Drop `oneshot.rescore` or use e.g."
                               f" {4 * self.trials}.")

    @classmethod
    def check_value(cls, name: str, value: Any) -> Any:
        """`value` as setting `name` holds it (e.g. an int as a float), or a `SettingError`:
        for checking one value before the settings it belongs to exist."""
        return cls.CHECKS[name](name, value)

    @property
    def budget(self) -> int:
        return self.epochs

    @property
    def strategy(self) -> str:
        """`oneshot` (a supernet ranks candidates first) or `full` (every proposal trained)."""
        return "full" if self.oneshot is None else "oneshot"

    @property
    def successive_halving(self) -> bool:
        """Whether trials are stopped at rungs (`asha`, `moasha`): what `reduction_factor`
        applies to."""
        return self.scheduler != "fifo"

    # the scheduler as the booleans of run.json's version 1, for older readers
    @property
    def asha(self) -> bool:
        return self.scheduler == "asha"

    @property
    def moasha(self) -> bool:
        return self.scheduler == "moasha"

    def resumed_with(self: _Self, changes: Mapping[str, Any]) -> _Self:
        """These settings with `changes` (None values mean "not given"), for a resumed search:
        a different value of a `FIXED` setting is a `FixedSettingChanged`."""
        given = {key: value for key, value in changes.items() if value is not None}
        for key, value in given.items():
            if key in self.FIXED and value != getattr(self, key):
                raise FixedSettingChanged(key, value, getattr(self, key))
        return dataclasses.replace(self, **given)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["budget"] = self.epochs
        out["version"] = RUN_JSON_VERSION
        return out

    @classmethod
    def from_dict(cls: type[_Self], data: Mapping[str, Any], *, where: str = RUN_FILE) -> _Self:
        """Read `to_dict`'s form (and version 1's); keys of neither are ignored."""
        data = dict(data)
        asha, moasha = bool(data.pop("asha", False)), bool(data.pop("moasha", False))
        if "scheduler" not in data:
            if asha and moasha:
                raise ConfigError(f"{where} sets both `asha` and `moasha`, two early-stopping"
                                  " rules. Keep one of them true.")
            data["scheduler"] = "asha" if asha else "moasha" if moasha else "fifo"
        if "asha_reduction_factor" in data:
            data.setdefault("reduction_factor", data.pop("asha_reduction_factor"))
        fields = dataclasses.fields(cls)
        missing = [f.name for f in fields if f.name not in data
                   and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ConfigError(f"{where} lacks {missing}; it was not written by `spvit-nas search`."
                              " Use a search's run folder.")
        names = {f.name for f in fields}
        try:
            return cls(**{k: v for k, v in data.items() if k in names})
        except SettingError as e:
            raise SettingError(e.setting, f"{where}: {e}") from None


__all__ = [
    "DEFAULT_REDUCTION_FACTOR",
    "SCHEDULERS",
    "FixedSettingChanged",
    "OneShotOptions",
    "Scheduler",
    "SearchSettings",
    "SettingError",
]
