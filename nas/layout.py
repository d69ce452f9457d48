"""The folders the commands write, file by file: a search's run folder, a trial folder, an export
and a supernet folder.

Every file and folder name of those layouts is declared here once. `RunFolder`, `TrialFolder`,
`ExportFolder` and `SupernetDir` are frozen dataclasses around a folder's path with one property
per file, so a caller writes `RunFolder(run_dir).journal`, never `run_dir / "study.journal"`. A run
folder holds `run.json` (`nas.run.RunInfo`), `space.yaml`, `study.journal` (unless the study lives
in a database), `drivers/` (the driver leases of `nas.storage`), `tune/` (Ray Tune's experiment),
`reports/`, the default `export/`, `oneshot/` (the one-shot proxy study) and one folder per trial,
`trials/NNNN` (the Optuna trial number, four digits or more). A trial folder (also what `spvit-nas
train` writes) holds `metrics.jsonl`, `arch.yaml`, the consolidated `model.safetensors`,
`training.yaml` (only `train` writes it), `ds_config.json`, `failure.json` and `checkpoint/`
(DeepSpeed tag folders, `state.json` and `latest`). The readers that several modules share live
here too: the trial number of a folder name (`parse_trial_number`), run.json as a dict
(`RunFolder.read_run_json`) and the journal file a storage entry names (`RunFolder.journal_at`).
Paths and JSON only (no Optuna, no torch, no Ray, no other module of `nas`): `nas.run`,
`nas.outputs`, `nas.export`, `nas.journal` and `launch/` build on it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from spvit.errors import ConfigError

# ---------------------------------------------------------------------------- the names
# a run folder
RUN_FILE = "run.json"
SPACE_FILE = "space.yaml"
JOURNAL_FILE = "study.journal"
TRIALS_DIR = "trials"
DRIVERS_DIR = "drivers"
TUNE_DIR = "tune"
REPORTS_DIR = "reports"
EXPORT_DIR = "export"
ONESHOT_DIR = "oneshot"  # the proxy study of a one-shot search, with its own study.journal
# a trial folder
METRICS_FILE = "metrics.jsonl"
ARCH_FILE = "arch.yaml"
WEIGHTS_FILE = "model.safetensors"
TRAINING_FILE = "training.yaml"
DS_CONFIG_FILE = "ds_config.json"
FAILURE_FILE = "failure.json"
CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "state.json"  # inside CHECKPOINT_DIR
LATEST_FILE = "latest"  # inside CHECKPOINT_DIR: DeepSpeed's pointer to the last tag
RAY_TRAIN_DIR = "ray_train"
# an export
CONFIG_FILE = "config.json"
ONNX_FILE = "model.onnx"
CARD_FILE = "README.md"
EXPORT_MARKER = ".spvit-export"
# a supernet folder
SUPERNET_FILE = "supernet.json"
SUPERNET_WEIGHTS_FILE = "supernet.safetensors"

TRIAL_DIGITS = 4


def _path(value: str | os.PathLike) -> Path:
    return value if isinstance(value, Path) else Path(value)


# ---------------------------------------------------------------------------- trial numbers
def trial_dir_of(number: int) -> str:
    """A trial's folder relative to RUN_DIR: `trials/0007`."""
    return f"{TRIALS_DIR}/{trial_folder_name(number)}"


def trial_folder_name(number: int) -> str:
    """The name of trial `number`'s folder: `0007` (more digits from trial 10000 on)."""
    if isinstance(number, bool) or not isinstance(number, int) or number < 0:
        raise ValueError(f"a trial number is an integer >= 0, but got {number!r}")
    return f"{number:0{TRIAL_DIGITS}d}"


def parse_trial_number(name: str) -> int | None:
    """The trial number a folder name spells (`0007` -> 7), or None for any other name.

    Only the form `trial_folder_name` writes counts: `7`, `00007` or `0007.bak` are not trial
    folders, so a copy beside them is never mistaken for one."""
    if not (name.isascii() and name.isdigit()):
        return None
    number = int(name)
    return number if trial_folder_name(number) == name else None


# ------------------------------------------------------------ what the epoch harness writes
@dataclass(frozen=True)
class _EpochFolder:
    """The files of the checkpointed-epoch harness (`launch.harness`), in a trial folder and in
    a supernet folder alike."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", _path(self.path))

    @property
    def metrics(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def ds_config(self) -> Path:
        return self.path / DS_CONFIG_FILE

    @property
    def failure(self) -> Path:
        return self.path / FAILURE_FILE

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT_DIR

    @property
    def checkpoint_state(self) -> Path:
        return self.checkpoint / STATE_FILE

    @property
    def checkpoint_latest(self) -> Path:
        return self.checkpoint / LATEST_FILE

    @property
    def ray_train(self) -> Path:
        return self.path / RAY_TRAIN_DIR


# ---------------------------------------------------------------------------- a trial folder
@dataclass(frozen=True)
class TrialFolder(_EpochFolder):
    """One trained candidate: `RUN_DIR/trials/NNNN`, or the output folder of a single training."""

    # Any of these makes a folder a trial folder (`nas.outputs`): what training leaves first.
    MARKERS: ClassVar[tuple[str, ...]] = (METRICS_FILE, f"{CHECKPOINT_DIR}/{STATE_FILE}",
                                          TRAINING_FILE)

    @property
    def number(self) -> int | None:
        """The trial number of a `trials/NNNN` folder (None for another name)."""
        return parse_trial_number(self.path.name)

    @property
    def arch(self) -> Path:
        return self.path / ARCH_FILE

    @property
    def weights(self) -> Path:
        return self.path / WEIGHTS_FILE

    @property
    def training(self) -> Path:
        return self.path / TRAINING_FILE

    def read_failure_reason(self) -> str | None:
        """The `reason` of failure.json, or None if there is none or it is unreadable."""
        try:
            data = json.loads(self.failure.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # missing, unreadable, not JSON, not UTF-8
            return None
        if isinstance(data, dict) and data.get("reason"):
            return str(data["reason"])
        return None


# ---------------------------------------------------------------------------- a run folder
class NotARunFolder(ConfigError):
    """The folder, or its run.json, does not exist (`RunFolder.read_run_json`)."""


@dataclass(frozen=True)
class RunFolder:
    """A search's output folder: run.json, the space, the study journal and the trial folders."""

    path: Path

    # Either makes a folder a run folder (`nas.outputs`).
    MARKERS: ClassVar[tuple[str, ...]] = (RUN_FILE, JOURNAL_FILE)

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", _path(self.path))

    @property
    def run_json(self) -> Path:
        return self.path / RUN_FILE

    @property
    def space(self) -> Path:
        return self.path / SPACE_FILE

    @property
    def journal(self) -> Path:
        """The default study journal (a run.json `storage` may name another file or a URL)."""
        return self.path / JOURNAL_FILE

    @property
    def trials(self) -> Path:
        return self.path / TRIALS_DIR

    @property
    def drivers(self) -> Path:
        return self.path / DRIVERS_DIR

    @property
    def tune(self) -> Path:
        return self.path / TUNE_DIR

    @property
    def reports(self) -> Path:
        return self.path / REPORTS_DIR

    @property
    def export(self) -> Path:
        """Where a run's export goes when no other folder is named."""
        return self.path / EXPORT_DIR

    @property
    def oneshot(self) -> Path:
        """The folder of the one-shot proxy study (`nas.oneshot`; its journal inside)."""
        return self.path / ONESHOT_DIR

    def trial(self, number: int) -> TrialFolder:
        """The folder of trial `number`: RUN_DIR/trials/NNNN."""
        return TrialFolder(self.path / trial_dir_of(number))

    def trial_at(self, rel: str | os.PathLike | None, number: int) -> TrialFolder:
        """A trial's folder as the study records it: `rel` (its `trial_dir` user attr, relative
        to the run folder or absolute), else RUN_DIR/trials/NNNN of its `number`."""
        if rel is not None and str(rel):
            return TrialFolder(self.path / rel)
        return self.trial(number)

    def trial_numbers(self) -> list[int]:
        """The numbers of the trial folders on disk, ascending (other names are skipped)."""
        try:
            names = [entry.name for entry in os.scandir(self.trials) if entry.is_dir()]
        except OSError:
            return []
        return sorted(n for n in map(parse_trial_number, names) if n is not None)

    def journal_at(self, storage: str | os.PathLike | None) -> Path:
        """The journal file a storage entry (run.json's `storage`, or one given for this call)
        names when it is not a database URL (`nas.storage.is_url` decides that, before): None/"" is
        RUN_DIR/study.journal, a relative path counts from the run folder, `~` is expanded."""
        if storage is None or not str(storage):
            return self.journal
        path = Path(str(storage)).expanduser()
        return path if path.is_absolute() else self.path / path

    def read_run_json(self) -> dict[str, Any]:
        """run.json as a dict, or one `ConfigError` line (`NotARunFolder` when the folder or
        its run.json does not exist) naming the file and the fix. Checks only that it holds a
        JSON object; what its keys mean is `nas.run`'s."""
        if not self.path.is_dir():
            what = "is a file, not a folder" if self.path.exists() else "does not exist"
            raise NotARunFolder(f"run folder {str(self.path)!r} {what}. Pass the RUN_DIR of a"
                                f" search (the folder holding {RUN_FILE}).")
        path = self.run_json
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise NotARunFolder(f"{str(self.path)!r} is not a search run folder: {RUN_FILE} is"
                                " missing (it does not exist). Pass the folder `spvit-nas"
                                " search` wrote.") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            why = (f"{e.msg} at line {e.lineno}" if isinstance(e, json.JSONDecodeError)
                   else "not UTF-8 text")
            raise ConfigError(f"{path} is not valid JSON ({why}). Restore it from a copy of the"
                              " run; nothing can read the run without it.") from None
        except OSError as e:
            raise ConfigError(f"{path} cannot be read ({e.strerror or type(e).__name__})."
                              " Check the path and its permissions.") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a JSON object such as {{\"study_name\": ...,"
                              f" \"storage\": ...}}, but holds {type(data).__name__}. Restore it"
                              " from a copy of the run.")
        return data


# ---------------------------------------------------------------------------- an export
@dataclass(frozen=True)
class ExportFolder:
    """What `spvit-nas export` writes (`nas.export`): the model and the marker of an export."""

    path: Path

    # The files of an export, in the order the model card lists them; `ALL_FILES` adds the
    # marker. `nas.outputs` recognises a folder of nothing but these as an export.
    FILES: ClassVar[tuple[str, ...]] = (ARCH_FILE, CONFIG_FILE, WEIGHTS_FILE, ONNX_FILE,
                                        TRAINING_FILE, CARD_FILE)
    ALL_FILES: ClassVar[frozenset[str]] = frozenset((*FILES, EXPORT_MARKER))
    # What a folder exported before the marker existed holds at least.
    REQUIRED: ClassVar[frozenset[str]] = frozenset((ARCH_FILE, WEIGHTS_FILE))

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", _path(self.path))

    @property
    def arch(self) -> Path:
        return self.path / ARCH_FILE

    @property
    def config(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def weights(self) -> Path:
        return self.path / WEIGHTS_FILE

    @property
    def onnx(self) -> Path:
        return self.path / ONNX_FILE

    @property
    def training(self) -> Path:
        return self.path / TRAINING_FILE

    @property
    def card(self) -> Path:
        return self.path / CARD_FILE

    @property
    def marker(self) -> Path:
        return self.path / EXPORT_MARKER


# ---------------------------------------------------------------------------- a supernet folder
@dataclass(frozen=True)
class SupernetDir(_EpochFolder):
    """What `spvit-nas supernet train` writes (`launch.supernet`). Its layout only: the loaded
    supernet is `nas.oneshot.SupernetFolder`."""

    MARKER: ClassVar[str] = SUPERNET_FILE

    @property
    def info(self) -> Path:
        return self.path / SUPERNET_FILE

    @property
    def weights(self) -> Path:
        return self.path / SUPERNET_WEIGHTS_FILE

    @property
    def space(self) -> Path:
        return self.path / SPACE_FILE


__all__ = [
    "ExportFolder",
    "NotARunFolder",
    "RunFolder",
    "SupernetDir",
    "TrialFolder",
    "parse_trial_number",
    "trial_dir_of",
    "trial_folder_name",
]
