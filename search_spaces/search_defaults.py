"""`SearchDefaults`: the `search:` block of a space file, and the search driver's defaults.

The sampler names, the failure limits and their defaults are declared here once; the search
driver (`launch/`), the study (`nas.study`) and run.json (`nas.run.RunInfo`) read them from here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .fields import FieldError, check_keys, int_value, mapping, one_of

# `nas.samplers.SAMPLER_NAMES` (a test keeps them equal; this package cannot import nas).
SAMPLERS: tuple[str, ...] = ("nsga2", "tpe", "gp", "random", "qmc", "auto")
# `auto`: TPE below 250 trials, NSGA-II from 250 on (`nas.samplers.AutoStrategy`). On digits,
# 3 seeds x 20 trials, TPE reached random search's final mean hypervolume in 50% of the trials,
# NSGA-II in 90%, GP in 65% (docs/BENCHMARKS.md, "Hypervolume vs trials").
DEFAULT_SAMPLER = "auto"
DEFAULT_MAX_CONSECUTIVE_FAILURES = 3
DEFAULT_MAX_INFEASIBLE = 200
MAX_INFEASIBLE = 10_000


@dataclass(frozen=True)
class SearchDefaults:
    """Defaults of the search driver, from the space's `search:` block.

    Args:
        trials: Optuna trials to run (infeasible proposals rejected before launch do not count).
        concurrent: trials trained at the same time.
        sampler: `auto` (default: TPE below 250 trials, NSGA-II from 250 on), `tpe`, `nsga2`,
            `gp`, `random` or `qmc` (`nas.samplers`).
        population_size: NSGA-II generation size; None lets the search driver choose one from
            `trials` (Optuna's own default, 50, would sample at random for the first 50 trials).
        seed: seed of the sampler (and of any random draw the driver makes).
        max_consecutive_failures: stop the search after this many crashed trials in a row.
        max_infeasible: give up (the constraints cannot be met) after this many rejected
            proposals in a row.
    """

    trials: int = 16
    concurrent: int = 2
    sampler: str = DEFAULT_SAMPLER
    population_size: int | None = None
    seed: int = 0
    max_consecutive_failures: int = DEFAULT_MAX_CONSECUTIVE_FAILURES
    max_infeasible: int = DEFAULT_MAX_INFEASIBLE

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, path: tuple = ("search",)) -> SearchDefaults:
        data = mapping(path, data, "search: {trials: 16, concurrent: 2}")
        names = [f.name for f in dataclasses.fields(cls)]
        check_keys(path, data, names)
        kwargs: dict[str, Any] = {}
        for name in ("trials", "concurrent", "max_consecutive_failures", "max_infeasible"):
            if name in data:
                kwargs[name] = int_value(path + (name,), data[name], 1)
        if "max_infeasible" in kwargs and kwargs["max_infeasible"] > MAX_INFEASIBLE:
            # A space is loaded by drawing up to this many samples (about 3 ms each for the
            # largest space the bounds allow).
            raise FieldError(path + ("max_infeasible",),
                             f"{'.'.join(path)}.max_infeasible must be at most {MAX_INFEASIBLE}"
                             f" (each rejection is a sample drawn, also when the space is"
                             f" loaded), but got {kwargs['max_infeasible']}. Use a value of at"
                             f" most {MAX_INFEASIBLE}.")
        if "seed" in data:
            kwargs["seed"] = int_value(path + ("seed",), data["seed"], 0)
        if "sampler" in data:
            kwargs["sampler"] = one_of(SAMPLERS)(path + ("sampler",), data["sampler"])
        if data.get("population_size") is not None:
            kwargs["population_size"] = int_value(path + ("population_size",),
                                                   data["population_size"], 2)
        return cls(**kwargs)

