"""One-shot search: a weight-sharing supernet over a search space scores candidates with inherited
weights; only the best of them are trained stand-alone.

The pieces, all without Ray or DeepSpeed (one training epoch is `nas.sandwich`, the training
run `launch.supernet`), one module each, their public names re-exported here:

* `sampling`: `supernet_choices(space)`, the glue from a `SearchSpace` to the plain
  `SupernetChoices` that `spvit.supernet.SPViTSupernet` is built from, and `SandwichSampler`,
  the subnets of one supernet training step (the sandwich rule: the largest and the smallest
  feasible subnet plus random feasible ones), seeded by (seed, epoch, step) so that every
  data-parallel worker trains the same subnets;
* `folder`: `SupernetFolder` / `open_supernet`, a trained supernet folder (its space, choices,
  weights), and `write_supernet_info`;
* `scoring`: `InheritedScorer`, a subnet's validation accuracy with inherited weights
  (evaluation only), or after a few fine-tuning steps of a stand-alone copy
  (`finetune_steps`), which ranks candidates better at a cost of seconds per candidate
  (docs/BENCHMARKS.md);
* `proxy`: `run_proxy_search`, an Optuna multi-objective study of its own over the same space,
  objective the inherited-weight accuracy (plus GFLOPs and parameters), thousands of
  candidates cheaply; its proposals follow the search study's rule (`nas.study.ask_feasible`,
  also importable from here: a proposal that breaks a constraint is told FAIL, never scored);
* `selection`: `rescore_front` (the proxy front's short list scored again after fine-tuning),
  `select_for_retrain` (non-dominated rank, then crowding distance) and
  `enqueue_for_retrain`, which puts the picks into the main search study as WAITING trials
  with their proxy score as a user attr; `prepare_oneshot` runs the whole stage. The main
  search then trains the picks stand-alone through its normal trial path, so its Pareto
  front, plots and exports hold stand-alone results only.
"""

from __future__ import annotations

from typing import Any

from .folder import (
    METRICS_FILE,
    SPACE_FILE,
    SUPERNET_FILE,
    WEIGHTS_FILE,
    SupernetFolder,
    open_supernet,
    write_supernet_info,
)
from .proxy import DEFAULT_CANDIDATES, ProxySummary, run_proxy_search, summarise_proxy
from .sampling import (
    DEFAULT_RANDOM_SUBNETS,
    EXTREME_PROBES,
    SandwichSampler,
    extreme_subnet,
    redraw_priors,
    space_identity,
    supernet_choices,
)
from .scoring import InheritedScorer, check_finetune_steps, finetune_batches, validation_loader
from .selection import (
    DEFAULT_RESCORE_FACTOR,
    PROXY_ATTR,
    OneShotPlan,
    enqueue_for_retrain,
    prepare_oneshot,
    rescore_count,
    rescore_front,
    select_for_retrain,
)

__all__ = [
    "DEFAULT_CANDIDATES", "DEFAULT_RANDOM_SUBNETS", "DEFAULT_RESCORE_FACTOR", "EXTREME_PROBES",
    "METRICS_FILE", "PROXY_ATTR", "SPACE_FILE", "SUPERNET_FILE", "WEIGHTS_FILE",
    "InheritedScorer", "OneShotPlan", "ProxySummary", "SandwichSampler", "SupernetFolder",
    "check_finetune_steps", "enqueue_for_retrain", "extreme_subnet", "finetune_batches",
    "open_supernet", "prepare_oneshot", "redraw_priors", "rescore_count", "rescore_front",
    "run_proxy_search", "select_for_retrain", "space_identity", "summarise_proxy",
    "supernet_choices", "validation_loader", "write_supernet_info",
]

# The proposal rule lives in `nas.study`, which imports Optuna; it is looked up on first use so
# that this package (imported by supernet training workers) imports without it.
_FROM_STUDY = ("Proposal", "ask_feasible")


def __getattr__(name: str) -> Any:
    if name in _FROM_STUDY:
        from nas import study

        return getattr(study, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
