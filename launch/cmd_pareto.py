"""`spvit-nas pareto RUN_DIR`: show, plot and pick from a search's Pareto front.

Prints the full-fidelity Pareto set of the run's study (as a table, `--json` or `--csv`) with the
study name and storage; with all trials at full fidelity this is the set `optuna best-trials`
reports. `--plot` writes the reports of `nas.report` into RUN_DIR/reports/. `--max-gflops` /
`--max-params` restrict the set to trials within those budgets, and `--pick best|knee` chooses
one of them and says why (see `nas.pareto.pick`).
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the run folder of a search")
    fmt = parser.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print the Pareto set as JSON")
    fmt.add_argument("--csv", action="store_true", help="print the Pareto set as CSV")
    parser.add_argument("--plot", action="store_true",
                        help="write pareto.png/.html/.csv, hypervolume.png, priors_N.png and"
                             " report.md into RUN_DIR/reports/")
    parser.add_argument("--priors-trial", type=int, default=None, metavar="N",
                        help="with --plot: draw the spatial priors of trial N"
                             " (default: the knee of the front)")
    parser.add_argument("--max-gflops", type=float, default=None, metavar="X",
                        help="only trials with at most X GFLOPs")
    parser.add_argument("--max-params", type=float, default=None, metavar="Y",
                        help="only trials with at most Y parameters")
    parser.add_argument("--pick", choices=("best", "knee"), default=None,
                        help="choose one trial within the budgets: best = highest accuracy,"
                             " knee = knee of the accuracy/GFLOPs front")
    parser.add_argument("--storage", default=None, metavar="URL",
                        help="study storage URL (default: the one in RUN_DIR/run.json)")


def run(args: argparse.Namespace) -> int:
    from launch.flags import flags_named

    with flags_named():  # the settings `nas` names, as this command's flags
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from nas import pareto
    from nas.journal import check_run_journal
    from spvit.errors import ConfigError

    if args.priors_trial is not None and not args.plot:
        raise ConfigError(f"--priors-trial {args.priors_trial} chooses the trial whose priors"
                          " --plot draws, but --plot is not given. Add --plot, or drop"
                          " --priors-trial.")
    info = pareto.read_run_info(args.run_dir)
    check_run_journal(args.run_dir, args.storage or info.get("storage"),
                      say=lambda line: print(line, file=sys.stderr))
    study = pareto.open_study(args.run_dir, storage=args.storage)
    where = pareto.storage_label(args.run_dir, info, storage=args.storage)
    front = pareto.pareto_trials(study)
    shown = pareto.within_budget(front, max_gflops=args.max_gflops, max_params=args.max_params)
    paths = []
    if args.plot:  # before any output: a trial whose priors cannot be drawn stops it here
        from nas.report import write_reports

        paths = write_reports(args.run_dir, trial=args.priors_trial, storage=args.storage)
    chosen = why = None
    if args.pick:
        chosen, why = pareto.pick(front, max_gflops=args.max_gflops,
                                  max_params=args.max_params, method=args.pick)

    if args.json:
        extra = {"study_name": study.study_name, "storage": where,
                 "pareto_size": len(front)}
        if chosen is not None:
            extra["pick"] = {"method": args.pick, "number": chosen.number, "why": why}
        print(pareto.to_json(shown, **extra))
    elif args.csv:
        print(f"study {study.study_name} in {where}", file=sys.stderr)
        sys.stdout.write(pareto.to_csv(shown))
    else:
        budget = "" if len(shown) == len(front) else f", {len(shown)} within the budget"
        print(f"study {study.study_name} in {where}")
        print(f"Pareto set of full-fidelity trials: {len(front)}{budget}")
        print(pareto.format_table(shown))
        if chosen is not None:
            print(f"\npick ({args.pick}): {why}")
    if args.plot:
        out = sys.stderr if (args.json or args.csv) else sys.stdout
        print("reports: " + ", ".join(str(p) for p in paths), file=out)
    return 0


if __name__ == "__main__":  # pragma: no cover
    from launch.cli import main

    sys.exit(main(["pareto", *sys.argv[1:]]))
