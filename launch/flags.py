"""The CLI's flag names for the settings `nas` names: the edge where a `SettingError` (which names a
setting in backticks, `trials`, `oneshot.rescore`, `out`) becomes the message the user reads, with
the flag that sets it (`--trials`, `--rescore`, `--out`) in its place. `FLAGS` is the table,
`flag_message` rewrites one error and `flags_named` wraps a command's body. Light: no Optuna,
Ray or torch, so every command module may use it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

from nas.settings import FixedSettingChanged, SettingError
from spvit.errors import ConfigError

# setting -> the flag that sets it (`trials` is `--retrain` in a one-shot search)
FLAGS: dict[str, str] = {
    "study_name": "--study-name", "storage": "--storage", "sampler": "--sampler",
    "seed": "--seed", "trials": "--trials", "concurrent": "--concurrent", "epochs": "--epochs",
    "workers_per_trial": "--workers-per-trial", "space": "--space", "scheduler": "--scheduler",
    "reduction_factor": "--asha-reduction-factor",
    "feasible_proposals": "--no-feasible-proposals", "gpus_per_worker": "--gpus-per-worker",
    "max_consecutive_failures": "--max-consecutive-failures", "oneshot": "--strategy oneshot",
    "oneshot.supernet": "--supernet", "oneshot.candidates": "--candidates",
    "oneshot.finetune_steps": "--finetune-steps", "oneshot.rescore": "--rescore",
    # what no search setting holds, named by `nas` in the same way
    "out": "--out", "overwrite": "--overwrite", "resume": "--resume",
    "warm_start": "--warm-start", "arch": "--arch", "pick": "--pick",
    "trial": "--trial",
}


def flag_message(error: SettingError, flags: dict[str, str] = FLAGS) -> str:
    """A settings error as the CLI says it: each setting named by its flag."""
    text = re.sub(r"`([a-z_.]+)`", lambda m: flags.get(m[1], m[0]), str(error))
    if isinstance(error, FixedSettingChanged):
        flag = flags.get(error.setting, error.setting)
        text += f" Drop {flag} or start a new search with another --out."
    return text


@contextmanager
def flags_named(flags: dict[str, str] = FLAGS) -> Iterator[None]:
    """A command's body, its `SettingError`s said with flag names (`flag_message`): the edge
    where the CLI's flags replace the settings `nas` names."""
    try:
        yield
    except SettingError as e:
        raise ConfigError(flag_message(e, flags)) from None


__all__ = ["FLAGS", "flag_message", "flags_named"]
