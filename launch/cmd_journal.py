"""`spvit-nas repair-journal RUN_DIR`: make a damaged study journal readable again.

The journal (`RUN_DIR/study.journal`, Optuna's `JournalFileBackend`) is an operation log: the
damaged records are dropped, with the records that update a trial whose creation was lost (that
trial stays as a FAIL placeholder so later trials keep their numbers), and every other record is
kept. The result is replayed with Optuna before it replaces the file; the original is kept beside
it as `study.journal.bak-STAMP`. The command says which lines were dropped and which trials they
touched; every trial folder keeps its metrics, checkpoint and weights, and `spvit-nas search
--out RUN_DIR --resume` trains or records what the study is missing. See `nas.journal`.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the run folder of a search")
    parser.add_argument("--storage", default=None, metavar="PATH",
                        help="the journal file (default: the one in RUN_DIR/run.json, else"
                             " RUN_DIR/study.journal)")


def run(args: argparse.Namespace) -> int:
    from launch.flags import flags_named

    with flags_named():  # the settings `nas` names, as this command's flags
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from nas.journal import repair_journal, run_journal
    from nas.layout import RunFolder
    from spvit.errors import ConfigError

    folder = RunFolder(args.run_dir)
    run_dir = folder.path
    storage = args.storage
    if storage is None:
        try:
            storage = folder.read_run_json().get("storage")
        except ConfigError:  # no run folder or an unreadable run.json: the default journal
            storage = None
    path = run_journal(run_dir, storage)
    if path is None:
        raise ConfigError(f"the study of {run_dir} lives in a database ({storage}), not a"
                          " journal file; repair-journal only mends journal files. Use the"
                          " database's own tools.")
    if not path.is_file():
        raise ConfigError(f"no study journal at {path}. Pass the RUN_DIR of a search, or the"
                          " journal with --storage PATH.")
    repair = repair_journal(path)
    if not repair.changed:
        print(f"{path} is intact ({repair.lines} line(s)); nothing to repair.")
        return 0
    print(f"repaired {path}: dropped {_lines([n for n, _ in repair.damaged])} (damaged:"
          f" {repair.damaged[0][1]}{', ...' if len(repair.damaged) > 1 else ''})"
          + (f" and {_lines(repair.dependent)}, which updated a lost trial"
             if repair.dependent else "")
          + f"; kept {repair.kept} of {repair.lines} record(s); Optuna replays "
          + ", ".join(f"{n} trial(s) of study {name!r}" for name, n in repair.trials.items())
          + ".")
    affected = [f"{n} (created on a lost line: now a FAIL placeholder, so later trials keep"
                " their numbers)" for n in sorted(repair.placeholders)]
    affected += [f"{n} (lost an update on {_lines(lines)}: its state or attributes may be"
                 " behind)" for n, lines in repair.touched.items()]
    print("trials affected: " + ("; ".join(affected) if affected else
                                 "none that the damaged lines name"))
    print(f"the original is {repair.backup}. Continue with `spvit-nas search --out {run_dir}"
          " --resume` to retrain or record what the study lost.")
    return 0


def _lines(numbers) -> str:
    numbers = list(numbers)
    shown = ", ".join(str(n) for n in numbers[:10]) + (", ..." if len(numbers) > 10 else "")
    return f"line{'s' if len(numbers) > 1 else ''} {shown}"

if __name__ == "__main__":  # pragma: no cover
    from launch.cli import main

    sys.exit(main(["repair-journal", *sys.argv[1:]]))
