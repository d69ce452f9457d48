"""The proxy study of one-shot search: an Optuna multi-objective study of its own over the same
space, objective the inherited-weight accuracy (plus GFLOPs and parameters), thousands of
candidates cheaply.

`run_proxy_search` proposes its trials under the search study's rule (`nas.study.ask_feasible`:
a proposal that breaks a constraint is told FAIL, never scored); `summarise_proxy` says what it
did. Part of `nas.oneshot`; Optuna is imported when a study is run.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from search_spaces.space import SearchSpace
from spvit.arch import ArchSpec

from .checks import whole_setting

DEFAULT_CANDIDATES = 2000


@dataclass(frozen=True)
class ProxySummary:
    """What a proxy study did: candidates scored and the mean scoring time per candidate."""

    study_name: str
    candidates: int
    scored: int
    seconds_per_candidate: float


def run_proxy_search(space: SearchSpace, scorer: Callable[[ArchSpec], dict[str, float]], *,
                     candidates: int = DEFAULT_CANDIDATES, seed: int = 0,
                     storage: Any = None, study_name: str = "oneshot-proxy",
                     population_size: int | None = None,
                     progress: Callable[[int, int], None] | None = None) -> Any:
    """An Optuna study of its own over `space`: maximise the inherited-weight accuracy,
    minimise GFLOPs and parameters, until `candidates` feasible trials are COMPLETE.

    Infeasible proposals are told FAIL (`nas.study.ask_feasible`) and do not count; a repeated
    architecture reuses its score (evaluation is deterministic). Each trial keeps user attrs
    `arch`, `gflops`, `params`, `score_s` (seconds), `scored` (False: a repeat). Resumable:
    an existing study of that name continues.
    """
    import optuna

    from nas import study as nas_study

    whole_setting("oneshot.candidates", candidates, 1, "Use e.g. 2000.")
    sampler = nas_study.make_sampler(
        "nsga2", seed=seed,
        population_size=population_size or max(8, min(100, candidates // 20)))
    study = optuna.create_study(study_name=study_name, storage=storage, sampler=sampler,
                                directions=list(nas_study.DIRECTIONS), load_if_exists=True)
    cache: dict[ArchSpec, float] = {}
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if (known := nas_study.stored_arch(t.user_attrs.get("arch"))) is not None:
            cache[known] = t.values[0]
    done = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
    while done < candidates:
        proposal = nas_study.ask_feasible(study, space)
        spec, cost, trial = proposal.spec, proposal.cost, proposal.trial
        start = time.perf_counter()
        scored = spec not in cache
        if not scored:
            acc = cache[spec]
            seconds = 0.0
        else:
            result = scorer(spec)
            acc = float(result["val_acc"])
            seconds = time.perf_counter() - start
            cache[spec] = acc
        trial.set_user_attr("score_s", seconds)  # arch, gflops, params: set by the proposal
        trial.set_user_attr("scored", scored)
        study.tell(trial, [acc, float(cost.gflops), float(cost.params)])
        done += 1
        if progress is not None:
            progress(done, candidates)
    return study


def summarise_proxy(study: Any) -> ProxySummary:
    import optuna

    trials = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    times = [t.user_attrs["score_s"] for t in trials if t.user_attrs.get("scored")]
    return ProxySummary(study_name=study.study_name, candidates=len(trials), scored=len(times),
                        seconds_per_candidate=float(np.mean(times)) if times else math.nan)
