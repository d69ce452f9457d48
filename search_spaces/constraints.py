"""`Constraints`: hard limits on a candidate's analytic cost, checked before any training.

`values` follows Optuna's convention (one value per constraint, feasible when <= 0), which the
search study stores where Optuna's samplers, `study.best_trials` and optuna-dashboard read it;
`violations` says the same in words.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from spvit.arch import ArchSpec
from spvit.cost import Cost, estimate

from .fields import FieldError, check_keys, dotted, int_value, mapping, number

CONSTRAINT_KEYS = ("max_gflops", "min_gflops", "max_params", "min_params", "min_tokens")


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
        data = mapping(path, data, "constraints: {max_gflops: 0.5, max_params: 5.0e+6}")
        check_keys(path, data, CONSTRAINT_KEYS)
        kwargs: dict[str, Any] = {}
        for name in ("max_gflops", "min_gflops", "max_params", "min_params"):
            if data.get(name) is None:
                continue
            value = number(path + (name,), data[name])
            if name.startswith("max") and not value > 0:
                raise FieldError(
                    path + (name,),
                    f"{dotted(path + (name,))} must be > 0, but got {data[name]!r}: no"
                    " architecture can meet it. Set a positive limit or drop the key.",
                )
            if name.startswith("min") and value < 0:
                raise FieldError(
                    path + (name,),
                    f"{dotted(path + (name,))} must be >= 0, but got {data[name]!r}."
                    " Set a non-negative bound or drop the key.",
                )
            kwargs[name] = value
        if data.get("min_tokens") is not None:
            kwargs["min_tokens"] = int_value(path + ("min_tokens",), data["min_tokens"], 1)
        for what in ("gflops", "params"):
            lo, hi = kwargs.get(f"min_{what}"), kwargs.get(f"max_{what}")
            if lo is not None and hi is not None and lo > hi:
                raise FieldError(
                    path + (f"min_{what}",),
                    f"{dotted(path)}.min_{what} {lo:g} is above max_{what} {hi:g}, so no"
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
