"""`spvit-nas dashboard RUN_DIR [--port P]`: browse a search's study in optuna-dashboard.

optuna-dashboard (an optional extra: `pip install 'spvit-nas[dashboard]'`) serves Optuna's own
views of the study in RUN_DIR's storage (the journal file or database that run.json names): the
Pareto front of (val_acc, gflops, params), optimisation history, parameter importances, and every
trial's user attrs (`arch`, `gflops`, `params`, `budget`, `fidelity`, `wall_s`, `test_acc`, ...:
plain JSON values, shown as they are). The server binds to 127.0.0.1 only; reach it from another
machine through an SSH tunnel. It runs until interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import sys

HOST = "127.0.0.1"
DEFAULT_PORT = 8080
INSTALL = "pip install 'spvit-nas[dashboard]'  (or: pip install optuna-dashboard)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the run folder of a search")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, metavar="P",
                        help=f"port on {HOST} (default: {DEFAULT_PORT})")
    parser.add_argument("--storage", default=None, metavar="URL",
                        help="study storage URL (default: the one in RUN_DIR/run.json)")


def open_run_storage(run_dir: str, storage: str | None = None):
    """(the run's storage, its study name, a printable label); `ConfigError` if the run's
    study is not in it."""
    import optuna

    from nas import pareto
    from nas.journal import check_run_journal
    from nas.layout import RunFolder
    from spvit.errors import ConfigError

    info = pareto.read_run_info(run_dir)
    check_run_journal(run_dir, storage or info.get("storage"),
                      say=lambda line: print(line, file=sys.stderr))
    backend = pareto.make_run_storage(run_dir, info, storage=storage)
    label = pareto.storage_label(run_dir, info, storage=storage)
    name = info["study_name"]
    if name not in optuna.get_all_study_names(backend):
        raise ConfigError(f"study {name!r} is not in storage {label}. Check `study_name` and"
                          f" `storage` in {RunFolder(run_dir).run_json}.")
    return backend, name, label


def check_port_free(port: int) -> None:
    """`ConfigError` naming the port if something on this machine already listens on it (the
    server would otherwise announce itself, then fail with a long `OSError`)."""
    import errno
    import socket

    from spvit.errors import ConfigError

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds
        try:
            probe.bind((HOST, port))
        except OSError as e:
            why = "is already in use" if e.errno == errno.EADDRINUSE else \
                f"cannot be opened ({e.strerror})"
            raise ConfigError(f"port {port} on {HOST} {why}. Pick a free one with --port, e.g."
                              f" --port {port + 1 if port < 65535 else DEFAULT_PORT}.") from None


def run(args: argparse.Namespace) -> int:
    from launch.flags import flags_named

    with flags_named():  # the settings `nas` names, as this command's flags
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from spvit.errors import ConfigError

    if not 0 < args.port < 65536:
        raise ConfigError(f"--port must be in 1..65535, but got {args.port}. Pick a free port"
                          f" such as {DEFAULT_PORT}.")
    backend, name, label = open_run_storage(args.run_dir, args.storage)  # bad input first
    try:
        import optuna_dashboard
    except ImportError:
        raise ConfigError(f"optuna-dashboard is not installed. Install it with: {INSTALL}")\
            from None
    check_port_free(args.port)
    print(f"optuna-dashboard for study {name!r} ({label}) at http://{HOST}:{args.port}/"
          " (Ctrl-C stops it)", flush=True)
    try:
        optuna_dashboard.run_server(backend, host=HOST, port=args.port)
    except OSError as e:  # taken between the check and the bind
        raise ConfigError(f"optuna-dashboard could not listen on {HOST}:{args.port}"
                          f" ({e.strerror or e}). Pick a free port with --port.") from None
    return 0


if __name__ == "__main__":  # pragma: no cover
    from launch.cli import main

    sys.exit(main(["dashboard", *sys.argv[1:]]))
