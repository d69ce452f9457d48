"""`spvit-nas search --space PATH --out RUN_DIR [...]`: a multi-objective architecture search.

Optuna proposes and ranks (maximise val_acc, minimise GFLOPs and parameters), Ray Tune trains the
candidates, the run folder keeps everything needed to resume (`--resume`, even after kill -9).
Defaults come from the space's `search:` and `training:` blocks. Exit codes: 0 done, 1 stopped
after failures (too many in a row, every launched trial failed, no full-budget trial, a result
that could not be recorded), 2 bad input, 130 interrupted. See `launch/search.py`; the flags
become the run's settings in `launch/search_plan.py`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from search_spaces.search_defaults import DEFAULT_SAMPLER
from search_spaces.search_defaults import SAMPLERS as SAMPLER_CHOICES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--space", type=Path, default=None, metavar="PATH",
                        help="search-space YAML (required for a new search; with --resume the"
                             " run's space.yaml is used)")
    parser.add_argument("--out", type=Path, required=True, metavar="RUN_DIR",
                        help="run folder (study, Tune experiment, trials, reports, export)")
    parser.add_argument("--trials", type=int, default=None, metavar="N",
                        help="trials to train in total; rejected infeasible samples do not count"
                             " (default: the space's search.trials)")
    parser.add_argument("--concurrent", type=int, default=None, metavar="K",
                        help="trials trained at the same time (default: search.concurrent)")
    parser.add_argument("--epochs", type=int, default=None, metavar="E",
                        help="full training budget per trial (default: training.epochs)")
    parser.add_argument("--workers-per-trial", type=int, default=None, metavar="W",
                        help="DeepSpeed workers per trial (default: training.workers_per_trial)")
    parser.add_argument("--sampler", choices=SAMPLER_CHOICES, default=None,
                        help="Optuna sampler; auto: tpe below 250 trials, nsga2 from 250 on"
                             f" (default: search.sampler, else {DEFAULT_SAMPLER})")
    parser.add_argument("--storage", default=None, metavar="URL",
                        help="study storage, e.g. postgresql://user@host/db (default: the"
                             " journal file RUN_DIR/study.journal)")
    parser.add_argument("--address", default=None, metavar="ADDR",
                        help="Ray cluster to join (`auto` or HOST:PORT; default: a local"
                             " instance on this machine, or RAY_ADDRESS)")
    parser.add_argument("--seed", type=int, default=None, metavar="S",
                        help="sampler seed (default: search.seed)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the search in RUN_DIR (completed trials are kept,"
                             " interrupted ones continue from their checkpoints)")
    parser.add_argument("--asha", action="store_true", default=None,
                        help="ASHA early stopping on val_acc per epoch; stopped trials are"
                             " PRUNED and never on the Pareto front")
    parser.add_argument("--scheduler", choices=("fifo", "asha", "moasha"), default=None,
                        help="early stopping: fifo (none, default), asha (--asha), moasha"
                             " (successive halving ranked by accuracy, GFLOPs and params)")
    parser.add_argument("--asha-reduction-factor", type=float, default=None, metavar="RF",
                        help="with --asha or --scheduler moasha: keep the top 1/RF at each rung"
                             " (default 2)")
    parser.add_argument("--no-feasible-proposals", dest="feasible_proposals",
                        action="store_false", default=None,
                        help="let the sampler propose candidates the cost model rejects (told"
                             " FAIL, never trained) instead of redrawing them; for comparisons")
    parser.add_argument("--gpus-per-worker", type=float, default=None, metavar="G",
                        help="0: train on CPU (default); 1: one GPU per worker")
    parser.add_argument("--max-consecutive-failures", type=int, default=None, metavar="M",
                        help="stop after M failed trials in a row (default:"
                             " search.max_consecutive_failures)")
    parser.add_argument("--trial-retries", type=int, default=0, metavar="R",
                        help="restarts of a crashed trial (e.g. a lost node) before it counts"
                             " as failed (default 0)")
    parser.add_argument("--study-name", default=None, metavar="NAME",
                        help="Optuna study name (default: the run folder's name)")
    parser.add_argument("--num-cpus", type=int, default=None, metavar="N",
                        help="CPUs of a local Ray instance (default: all of the machine's)")
    parser.add_argument("--warm-start", action="append", type=Path, default=[],
                        metavar="RUN_DIR",
                        help="seed the new study with the compatible completed trials of an"
                             " earlier run (repeatable; they are never trained again)")
    parser.add_argument("--strategy", choices=("full", "oneshot"), default="full",
                        help="full: train every proposal to the budget; oneshot: rank candidates"
                             " with a trained supernet's inherited weights, then train the top of"
                             " that proxy front stand-alone (only those reach the front)")
    parser.add_argument("--supernet", type=Path, default=None, metavar="DIR",
                        help="with --strategy oneshot: a folder of `spvit-nas supernet train`")
    parser.add_argument("--retrain", type=int, default=None, metavar="K",
                        help="with --strategy oneshot: proxy-front candidates trained stand-alone"
                             " (default: the space's search.trials)")
    parser.add_argument("--candidates", type=int, default=None, metavar="N",
                        help="with --strategy oneshot: subnets the supernet scores (default 2000)")
    parser.add_argument("--finetune-steps", type=int, default=None, metavar="S",
                        help="with --strategy oneshot: re-score the top of the proxy front after S"
                             " fine-tuning steps from the inherited weights and pick --retrain of"
                             " them by those scores (default 0: no re-scoring)")
    parser.add_argument("--rescore", type=int, default=None, metavar="M",
                        help="with --finetune-steps: how many of the proxy front are re-scored"
                             " (default 4 x --retrain)")
    parser.add_argument("--no-export", dest="export", action="store_false",
                        help="skip exporting the knee trial to RUN_DIR/export")


def run(args: argparse.Namespace) -> int:
    from launch.flags import flags_named
    from launch.search import SearchRequest, run_search
    from launch.search_plan import flag_names

    request = SearchRequest(
        out=args.out, space=args.space, trials=args.trials, concurrent=args.concurrent,
        epochs=args.epochs, workers_per_trial=args.workers_per_trial, sampler=args.sampler,
        storage=args.storage, address=args.address, seed=args.seed, resume=args.resume,
        scheduler=args.scheduler, asha=args.asha,
        feasible_proposals=args.feasible_proposals,
        asha_reduction_factor=args.asha_reduction_factor,
        gpus_per_worker=args.gpus_per_worker,
        max_consecutive_failures=args.max_consecutive_failures,
        trial_retries=args.trial_retries, study_name=args.study_name, num_cpus=args.num_cpus,
        export=args.export, warm_start=tuple(args.warm_start), strategy=args.strategy,
        supernet=args.supernet, retrain=args.retrain, candidates=args.candidates,
        finetune_steps=args.finetune_steps, rescore=args.rescore)
    with flags_named(flag_names(request)):  # the settings `nas` names, as this command's flags
        outcome = run_search(request, say=lambda line: print(line, flush=True))
    return outcome.exit_code


if __name__ == "__main__":  # pragma: no cover
    from launch.cli import main

    sys.exit(main(["search", *sys.argv[1:]]))
