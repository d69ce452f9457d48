"""From the proxy study to the main search: which candidates are trained stand-alone.

`select_for_retrain` (non-dominated rank, then crowding distance: `nas.pareto`) picks them,
`rescore_front` optionally scores the proxy front's short list again after fine-tuning, and
`enqueue_for_retrain` puts the picks into the main search study as WAITING trials with their
proxy score as a user attr. The main search then trains them stand-alone through its normal
trial path, so its Pareto front, plots and exports hold stand-alone results only.
`prepare_oneshot` is the whole one-shot stage of a search. Part of `nas.oneshot`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nas.layout import RunFolder
from search_spaces.space import SearchSpace
from spvit.arch import ArchSpec

from .checks import whole_setting
from .folder import open_supernet
from .proxy import DEFAULT_CANDIDATES, ProxySummary, run_proxy_search, summarise_proxy
from .scoring import InheritedScorer

PROXY_ATTR = "proxy_val_acc"
# With fine-tuned re-scoring, the proxy front's short list is this many times the search's `trials`
# (the subnets trained stand-alone).
DEFAULT_RESCORE_FACTOR = 4


def select_for_retrain(trials: Sequence[Any], k: int) -> list[Any]:
    """The `k` proxy trials to train stand-alone: lowest non-dominated rank first, and within a
    rank the most spread out (largest crowding distance); one per distinct architecture."""
    whole_setting("trials", k, 1, "Use e.g. 6.")
    from nas.study import stored_arch

    unique: dict[ArchSpec | None, Any] = {}
    for t in trials:
        if t.values is None:
            continue
        key = stored_arch(t.user_attrs.get("arch"))
        if key not in unique or t.values[0] > unique[key].values[0]:
            unique[key] = t
    pool = list(unique.values())
    if not pool:
        return []
    from nas.pareto import crowding_distance, non_dominated_ranks

    losses = np.array([[-t.values[0], t.values[1], t.values[2]] for t in pool], dtype=float)
    ranks = non_dominated_ranks(losses)
    picks: list[Any] = []
    for r in range(int(ranks.max()) + 1):
        idx = np.flatnonzero(ranks == r)
        crowd = crowding_distance(losses[idx])
        for i in idx[np.argsort(-crowd, kind="stable")]:
            picks.append(pool[i])
            if len(picks) == k:
                return picks
    return picks


def rescore_count(retrain: int, rescore: int | None) -> int:
    """How many of the proxy front are re-scored: `rescore`, default 4 x `retrain`; at least
    `retrain` (the picks come from them)."""
    n = DEFAULT_RESCORE_FACTOR * retrain if rescore is None else rescore
    return whole_setting("oneshot.rescore", n, retrain,
                         f"Drop `oneshot.rescore` ({DEFAULT_RESCORE_FACTOR} x `trials`) or use"
                         f" e.g. {DEFAULT_RESCORE_FACTOR * retrain}.",
                         rule=f"an integer >= `trials` ({retrain})")


def rescore_front(trials: Sequence[Any], scorer: Callable[[ArchSpec], dict[str, float]], *,
                  k: int, steps: int) -> list[Any]:
    """The short list of a proxy study, scored again: the `k` trials `select_for_retrain`
    ranks first, each scored by `scorer` (`InheritedScorer` with `steps` fine-tuning steps).
    Returned as copies whose accuracy objective is the new score; user attrs
    `inherited_val_acc` (the proxy study's score), `finetune_steps` and `rescore_s` (seconds)
    are added. The proxy study itself is not changed."""
    import copy

    out = []
    for t in select_for_retrain(trials, k):
        result = scorer(ArchSpec.from_dict(t.user_attrs["arch"]))
        c = copy.deepcopy(t)
        c.values = [float(result["val_acc"]), *t.values[1:]]
        c.user_attrs = {**t.user_attrs, "inherited_val_acc": float(t.values[0]),
                        "finetune_steps": int(steps), "rescore_s": float(result["seconds"])}
        out.append(c)
    return out


def enqueue_for_retrain(main_study: Any, picks: Sequence[Any], *, proxy_study: str) -> int:
    """Queue `picks` in the main study (WAITING; the search trains them stand-alone), each with
    user attrs `proxy_val_acc`, `proxy_trial`, `proxy_study` and `proxy_arch` (and, for picks
    that `rescore_front` fine-tuned, `proxy_inherited_val_acc` and `proxy_finetune_steps`).
    Returns how many were added (an architecture already queued or trained there is skipped)."""
    from nas.study import stored_arch

    known: set[ArchSpec | None] = set()
    for t in main_study.get_trials(deepcopy=False):
        for attr in ("arch", "proxy_arch"):
            if t.user_attrs.get(attr) is not None:
                known.add(stored_arch(t.user_attrs[attr]))
    added = 0
    for t in picks:
        key = stored_arch(t.user_attrs.get("arch"))
        if key in known:
            continue
        attrs = {PROXY_ATTR: float(t.values[0]), "proxy_trial": t.number,
                 "proxy_study": proxy_study, "proxy_arch": t.user_attrs.get("arch")}
        if "finetune_steps" in t.user_attrs:  # re-scored after fine-tuning (`rescore_front`)
            attrs["proxy_inherited_val_acc"] = t.user_attrs["inherited_val_acc"]
            attrs["proxy_finetune_steps"] = t.user_attrs["finetune_steps"]
        main_study.enqueue_trial(dict(t.params), user_attrs=attrs)
        known.add(key)
        added += 1
    return added


@dataclass(frozen=True)
class OneShotPlan:
    """What `prepare_oneshot` queued: the proxy summary and the queued trials' count."""

    proxy: ProxySummary
    queued: int
    picks: tuple[dict[str, Any], ...] = dataclasses.field(default_factory=tuple)


def prepare_oneshot(main_study: Any, space: SearchSpace, supernet_dir: str | Path, *,
                    run_dir: str | Path, retrain: int, candidates: int = DEFAULT_CANDIDATES,
                    seed: int = 0, device: str = "cpu", finetune_steps: int = 0,
                    rescore: int | None = None,
                    say: Callable[[str], None] = print) -> OneShotPlan:
    """The one-shot stage of a search: score `candidates` subnets of `space` with the supernet
    in `supernet_dir` (proxy study in RUN_DIR/oneshot/study.journal), select `retrain` of its
    front and queue them in `main_study` for stand-alone training. With `finetune_steps` > 0
    the first `rescore` (default `DEFAULT_RESCORE_FACTOR` x `retrain`) of the proxy front are
    scored again after that many fine-tuning steps from their inherited weights
    (`rescore_front`), and the `retrain` picks are selected from those scores.

    Raises `ConfigError` if the supernet folder is missing or belongs to another space.
    """
    from nas.storage import make_storage

    folder = open_supernet(supernet_dir, device=device)
    folder.check_space(space)
    proxy_dir = RunFolder(run_dir).oneshot
    proxy_dir.mkdir(parents=True, exist_ok=True)
    storage = make_storage(None, proxy_dir)  # RUN_DIR/oneshot/study.journal
    scorer = InheritedScorer.for_space(folder.net, space, device=device)
    say(f"one-shot: scoring {candidates} candidates with supernet {folder.path}"
        f" ({folder.epochs} epochs trained)")
    study = run_proxy_search(space, scorer, candidates=candidates, seed=seed, storage=storage)
    summary = summarise_proxy(study)
    complete = study.get_trials(deepcopy=False, states=_complete())
    if finetune_steps > 0:
        short = rescore_count(retrain, rescore)
        tuned = InheritedScorer.for_space(folder.net, space, device=device,
                                          finetune_steps=finetune_steps)
        complete = rescore_front(complete, tuned, k=short, steps=finetune_steps)
        seconds = sum(t.user_attrs["rescore_s"] for t in complete) / max(len(complete), 1)
        say(f"one-shot: re-scored {len(complete)} of the proxy front after {finetune_steps}"
            f" fine-tuning steps each ({seconds:.2f} s per candidate)")
    picks = select_for_retrain(complete, retrain)
    queued = enqueue_for_retrain(main_study, picks, proxy_study=study.study_name)
    say(f"one-shot: {summary.candidates} candidates, {summary.seconds_per_candidate:.3f} s per"
        f" scored candidate; {queued} of its front queued for stand-alone training")
    return OneShotPlan(proxy=summary, queued=queued,
                       picks=tuple(dict(t.user_attrs["arch"]) for t in picks))


def _complete() -> tuple:
    import optuna

    return (optuna.trial.TrialState.COMPLETE,)
