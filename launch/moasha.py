"""Multi-objective asynchronous successive halving (MOASHA) as a Ray Tune scheduler.

ASHA (`ray.tune.schedulers.ASHAScheduler`) stops a trial at a rung when its accuracy falls below
the rung's top 1/rf: a cheap, slightly less accurate candidate that belongs on the front is
thrown away. Here, as in Syne Tune's MOASHA, the rung ranks its trials by non-dominated sorting
over the search's objectives: (accuracy at the rung, GFLOPs, parameters), the last two from the
cost model and the same at every rung, with NSGA-II's crowding distance breaking ties within a
front. A trial that reaches a rung continues if it is among the top ceil(n / rf) of the n trials
recorded at that rung (itself included), else it is stopped. Rungs are at `grace_period * rf^k`
epochs below `max_t`, as in ASHA. The ranking rule is the pure function `promote` (tested
without Ray).

Promotion (the default, as in ASHA's promotion variant): a trial that is not in the top at the
moment it reaches a rung is *paused*, not discarded. Tune stops its process (its DeepSpeed
checkpoint of that epoch is in its trial folder), and the trial stays RUNNING in the study. Each
time the searcher is asked for a trial it first asks `take_promotion`: a paused trial that has
since become one of its rung's top ceil(n / rf), because weaker trials arrived there after it,
is promoted, and the searcher launches it again on its own folder, where it resumes from that
checkpoint at the next epoch. Trials still paused when the budget of new trials is spent and
nothing runs are told PRUNED with their `fidelity` (the epochs they trained), so they never
reach the front (`nas.pareto.is_full_fidelity`). With `promotion=False` a trial not promoted on
arrival is stopped for good (the stopping variant). Trials are keyed by their trial folder, so a
resumed trial keeps its rung history.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from nas import pareto
from spvit.errors import ConfigError

Point = tuple[float, float, float]  # (accuracy, gflops, params): maximise, minimise, minimise


# ---------------------------------------------------------------------------------------- ranking
def _losses(points: Sequence[Point]) -> np.ndarray:
    arr = np.asarray(points, dtype=float).reshape(-1, 3)
    return np.column_stack([-arr[:, 0], arr[:, 1], arr[:, 2]])


def non_dominated_fronts(points: Sequence[Point]) -> list[list[int]]:
    """Indices of `points` by non-dominated front (front 0 first), each front in index order
    (`nas.pareto.non_dominated_fronts` over the losses)."""
    return [[int(i) for i in front] for front in pareto.non_dominated_fronts(_losses(points))]


def crowding_distance(points: Sequence[Point], front: Sequence[int]) -> dict[int, float]:
    """NSGA-II crowding distance of each index of `front` (infinite at the extremes;
    `nas.pareto.crowding_distance` over the front's losses)."""
    dist = pareto.crowding_distance(_losses(points)[list(front)])
    return {i: float(d) for i, d in zip(front, dist, strict=True)}


def ranking(points: Sequence[Point]) -> list[int]:
    """Indices of `points` best first: by front, then by larger crowding distance, then index."""
    order: list[int] = []
    for front in non_dominated_fronts(points):
        crowd = crowding_distance(points, front)
        order.extend(sorted(front, key=lambda i: (-crowd[i], i)))
    return order


def promote(points: Sequence[Point], index: int, reduction_factor: float) -> bool:
    """Whether the trial at `index` of a rung's recorded `points` (itself included) is among the
    top ceil(n / reduction_factor) by `ranking`."""
    if not 0 <= index < len(points):
        raise IndexError(f"index {index} is outside the rung's {len(points)} points")
    keep = math.ceil(len(points) / reduction_factor)
    return index in ranking(points)[:keep]


def _default_cost(config: Mapping[str, Any]) -> tuple[float, float]:
    from spvit.arch import ArchSpec
    from spvit.cost import estimate

    cost = estimate(ArchSpec.from_dict(config["arch"]))
    return float(cost.gflops), float(cost.params)


# ---------------------------------------------------------------------------------------- scheduler
class MOASHAScheduler(FIFOScheduler):
    """Asynchronous successive halving with multi-objective promotion (module docstring).

    Args:
        time_attr: the reported fidelity (`epoch`).
        metric: the reported accuracy to maximise (`val_acc`).
        max_t: the full budget; trials that reach it are left to finish.
        grace_period: the first rung.
        reduction_factor: keep the top 1/rf at each rung (> 1).
        cost_of: (gflops, params) of a trial from its config (default: the cost model of
            `config["arch"]`).
        promotion: pause trials not (yet) promoted and promote them later (`take_promotion`);
            False: stop them for good.
    """

    def __init__(self, *, time_attr: str = "epoch", metric: str = "val_acc", max_t: int,
                 grace_period: int = 1, reduction_factor: float = 2.0,
                 cost_of: Callable[[Mapping[str, Any]], tuple[float, float]] | None = None,
                 promotion: bool = True) -> None:
        super().__init__()
        if isinstance(max_t, bool) or not isinstance(max_t, int) or max_t < 1:
            raise ConfigError(f"max_t must be an integer >= 1, but got {max_t!r}. Pass the"
                              " full budget in epochs.")
        if not 1 <= grace_period <= max_t:
            raise ConfigError(f"grace_period must be in [1, max_t={max_t}], but got"
                              f" {grace_period!r}. Use e.g. 1.")
        if not (isinstance(reduction_factor, (int, float)) and reduction_factor > 1):
            raise ConfigError(f"reduction_factor must be > 1, but got {reduction_factor!r}."
                              " Use e.g. 2 (keep the better half at each rung).")
        self._time_attr = time_attr
        self._metric = metric
        self._max_t = max_t
        self._rf = float(reduction_factor)
        self._cost_of = cost_of or _default_cost
        self.milestones: list[int] = []
        t = float(grace_period)
        while t < max_t:
            if not self.milestones or int(t) > self.milestones[-1]:
                self.milestones.append(int(t))
            t *= self._rf
        self._rungs: dict[int, dict[str, Point]] = {m: {} for m in self.milestones}
        self._costs: dict[str, tuple[float, float]] = {}
        self.promotion = bool(promotion)
        self.stopped: dict[str, int] = {}  # trial key -> the rung it was stopped (paused) at
        self.promoted: dict[str, list[int]] = {}  # trial key -> rungs it was promoted from later

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        return True  # objectives are fixed: (metric up, gflops down, params down)

    @staticmethod
    def key(trial: Any) -> str:
        """A trial's identity across Tune trials: its trial folder (`config["trial_dir"]`), else
        its Tune id."""
        config = getattr(trial, "config", None) or {}
        return str(config.get("trial_dir") or trial.trial_id)

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        self._costs[self.key(trial)] = self._cost_of(trial.config)

    def is_paused(self, key: str) -> bool:
        """Whether the trial `key` waits at a rung for a later promotion."""
        return self.promotion and key in self.stopped

    def take_promotion(self, ready: Any = None) -> str | None:
        """The key of a paused trial that now ranks in its rung's top ceil(n / rf) (highest rung
        first, then the order trials reached it), marked promoted; None if there is none.
        `ready`: only keys in this collection (the paused trials the caller holds)."""
        if not self.promotion:
            return None
        for milestone in reversed(self.milestones):
            rung = self._rungs[milestone]
            ids = list(rung)
            for key in ids:
                if self.stopped.get(key) != milestone or (ready is not None and key not in ready):
                    continue
                if promote([rung[i] for i in ids], ids.index(key), self._rf):
                    del self.stopped[key]
                    self.promoted.setdefault(key, []).append(milestone)
                    return key
        return None

    def record(self, trial_id: str, fidelity: float, accuracy: float) -> str:
        """Note a result of trial `trial_id` (a `key`) and decide: CONTINUE or STOP (the
        scheduler's core, callable without a Tune controller)."""
        for milestone in reversed(self.milestones):
            if fidelity < milestone:
                continue
            rung = self._rungs[milestone]
            if trial_id in rung:
                return TrialScheduler.CONTINUE  # decided at this rung already
            gflops, params = self._costs[trial_id]
            rung[trial_id] = (float(accuracy), gflops, params)
            ids = list(rung)
            if promote([rung[i] for i in ids], ids.index(trial_id), self._rf):
                return TrialScheduler.CONTINUE
            self.stopped[trial_id] = milestone
            return TrialScheduler.STOP
        return TrialScheduler.CONTINUE

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        fidelity, accuracy = result.get(self._time_attr), result.get(self._metric)
        if not isinstance(fidelity, (int, float)) or not isinstance(accuracy, (int, float)) \
                or not math.isfinite(accuracy):
            return TrialScheduler.CONTINUE
        if fidelity >= self._max_t:
            return TrialScheduler.CONTINUE
        key = self.key(trial)
        if key not in self._costs:
            self._costs[key] = self._cost_of(trial.config)
        return self.record(key, fidelity, accuracy)

    def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:
        self._costs.pop(self.key(trial), None)

    def debug_string(self) -> str:
        rungs = ", ".join(f"epoch {m}: {len(self._rungs[m])}" for m in self.milestones)
        waiting = "paused" if self.promotion else "stopped"
        return (f"Using MOASHA (rf {self._rf:g}): {waiting} {len(self.stopped)}, promoted later"
                f" {sum(len(v) for v in self.promoted.values())}; rungs {rungs}")

    def save(self, checkpoint_path: str) -> None:
        state = {k: v for k, v in self.__dict__.items() if k != "_cost_of"}
        with open(checkpoint_path, "wb") as f:
            pickle.dump(state, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))
