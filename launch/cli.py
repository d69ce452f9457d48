"""`spvit-nas`: the command-line entry point.

Each subcommand lives in its own module (`launch/cmd_*.py`) exposing `add_arguments(parser)` and
`run(args) -> int`. Modules import their heavy dependencies inside `run`, so `--help` and the
light commands never pay for Ray, DeepSpeed or torch start-up. Bad input (`ConfigError`) becomes
one line on stderr and exit code 2, with no traceback. A closed output pipe (`spvit-nas pareto RUN
| head -2`) ends the command quietly with 141, the shell's code for SIGPIPE.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from spvit.errors import ConfigError

# subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "search": ("launch.cmd_search", "run a multi-objective architecture search"),
    "pareto": ("launch.cmd_pareto", "show, plot and pick from a search's Pareto front"),
    "export": ("launch.cmd_export", "export a searched architecture with its weights"),
    "train": ("launch.cmd_train", "train one architecture (e.g. an exported choice)"),
    "cost": ("launch.cmd_space", "print an architecture's parameters and GFLOPs"),
    "check-space": ("launch.cmd_space", "validate a search-space file and summarise it"),
    "cluster-check": ("launch.cluster_check", "check a Ray cluster and run folder before a search"),
    "dashboard": ("launch.cmd_dashboard", "browse a search's study in optuna-dashboard"),
    "supernet": ("launch.cmd_supernet", "train a weight-sharing supernet or score an architecture"),
    "repair-journal": ("launch.cmd_journal", "drop the damaged records of a study journal, keep the"
                                             " rest (keeps a backup)"),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse's own convention)
        self.exit(2, f"{self.prog}: error: {message}. See `{self.prog} --help`.\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="spvit-nas", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=help_text)
        adder = getattr(module, f"add_{name.replace('-', '_')}_arguments", None)
        (adder or module.add_arguments)(p)
        p.set_defaults(_module=module_name, _runner=f"run_{name.replace('-', '_')}")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    module = importlib.import_module(args._module)
    runner = getattr(module, args._runner, None) or module.run
    try:
        code = int(runner(args) or 0)
        sys.stdout.flush()  # here, where a closed pipe is handled, not at interpreter exit
        return code
    except ConfigError as e:
        print(f"spvit-nas {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"spvit-nas {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE


EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a writer whose reader left


def _silence_stdout() -> None:
    """The reader of stdout is gone: point stdout at /dev/null so that the interpreter's final
    flush does not raise (and print a traceback) again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())
