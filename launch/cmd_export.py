"""`spvit-nas export RUN_DIR (--trial N | --pick best|knee) [--out DIR]`: export one searched
architecture with its trained weights (arch.yaml, model.safetensors, model.onnx, README.md).

`--trial` names the trial; `--pick` chooses one from the Pareto set within `--max-gflops` /
`--max-params` (see `nas.pareto.pick`). The folder appears complete or not at all
(`nas.export.export_trial`). Trials that cannot be exported exit 2 with one line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the run folder of a search")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--trial", type=int, default=None, metavar="N",
                       help="export trial number N")
    which.add_argument("--pick", choices=("best", "knee"), default=None,
                       help="export the Pareto trial chosen by this rule within the budgets")
    parser.add_argument("--max-gflops", type=float, default=None, metavar="X",
                        help="with --pick: at most X GFLOPs")
    parser.add_argument("--max-params", type=float, default=None, metavar="Y",
                        help="with --pick: at most Y parameters")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="output folder (default: RUN_DIR/export)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out if it already exists")
    parser.add_argument("--storage", default=None, metavar="URL",
                        help="study storage URL (default: the one in RUN_DIR/run.json)")


def run(args: argparse.Namespace) -> int:
    from launch.flags import flags_named

    with flags_named():  # the settings `nas` names, as this command's flags
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from nas import export, pareto
    from nas.journal import check_run_journal
    from nas.layout import RunFolder
    from nas.outputs import check_output
    from spvit.errors import ConfigError

    out = Path(args.out) if args.out else RunFolder(args.run_dir).export
    if args.trial is not None:
        if args.max_gflops is not None or args.max_params is not None:
            raise ConfigError("--max-gflops/--max-params apply to --pick, but got them with"
                              f" --trial {args.trial}. Drop the budgets or use --pick.")
    check_output(out, command="export", overwrite=args.overwrite)  # before reading anything
    above = out.expanduser().absolute().parent
    while not above.exists():
        above = above.parent
    if not above.is_dir():
        raise ConfigError(f"--out {out} lies under {above}, which is a file, so no folder can be"
                          " made there. Pass another --out.")
    info = pareto.read_run_info(args.run_dir)
    check_run_journal(args.run_dir, args.storage or info.get("storage"),
                      say=lambda line: print(line, file=sys.stderr))
    try:
        if args.trial is not None:
            path = export.export_trial(args.run_dir, args.trial, out,
                                       overwrite=args.overwrite, storage=args.storage)
            print(f"exported trial {args.trial} to {path}")
            return 0
        path, trial, why = export.export_pick(args.run_dir, out, method=args.pick,
                                              max_gflops=args.max_gflops,
                                              max_params=args.max_params,
                                              overwrite=args.overwrite, storage=args.storage)
    except OSError as e:  # the export folder appears whole or not at all: nothing is left
        where = f" ({e.filename})" if e.filename else ""
        raise ConfigError(f"cannot write the export to --out {out}: {e.strerror or e}{where}."
                          " Pass an --out in a folder you can write to.") from None
    print(f"pick ({args.pick}): {why}")
    print(f"exported trial {trial.number} to {path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    from launch.cli import main

    sys.exit(main(["export", *sys.argv[1:]]))
