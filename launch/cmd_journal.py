"""`spvit-nas repair-journal RUN_DIR`: make a damaged study journal readable again.

The journal (`RUN_DIR/study.journal`, Optuna's `JournalFileBackend`) is truncated to its last
complete, valid line; the original is kept beside it as `study.journal.bak-STAMP`. Operations
after the damage are lost from the study, but every trial folder keeps its metrics, checkpoint
and weights: `spvit-nas search --out RUN_DIR --resume` then trains or records what the study is
missing. See `nas.journal`.
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
    import json
    from pathlib import Path

    from nas.journal import repair_journal, run_journal
    from spvit.errors import ConfigError

    run_dir = Path(args.run_dir)
    storage = args.storage
    if storage is None:
        try:
            storage = json.loads((run_dir / "run.json").read_text(encoding="utf-8")).get(
                "storage")
        except (OSError, ValueError, AttributeError):
            storage = None
    path = run_journal(run_dir, storage)
    if path is None:
        raise ConfigError(f"the study of {run_dir} lives in a database ({storage}), not a"
                          " journal file; repair-journal only mends journal files. Use the"
                          " database's own tools.")
    if not path.is_file():
        raise ConfigError(f"no study journal at {path}. Pass the RUN_DIR of a search, or the"
                          " journal with --storage PATH.")
    scan, backup = repair_journal(path)
    if backup is None:
        print(f"{path} is intact ({scan.good_lines} line(s)); nothing to repair.")
        return 0
    print(f"repaired {path}: kept {scan.good_lines} line(s) ({scan.good_bytes} bytes), dropped"
          f" {scan.size - scan.good_bytes} byte(s) from line {scan.good_lines + 1} on"
          f" ({scan.problem}); the original is {backup}. Continue with `spvit-nas search --out"
          f" {run_dir} --resume` to retrain or record what the study lost.")
    return 0


if __name__ == "__main__":  # pragma: no cover
    from launch.cli import main

    sys.exit(main(["repair-journal", *sys.argv[1:]]))
