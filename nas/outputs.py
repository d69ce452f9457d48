"""Where a command may write: its output folder (`out`) never destroys what another command made.

Every command that writes into an output folder (`export`, `train`, `search` and `supernet
train`) calls `check_output` before it writes anything. It recognises four kinds of folders a
user's work lives in:

* a run folder (`run.json` or `study.journal`: a search's study, trials and Tune state),
* a supernet folder (`supernet.json`: a weight-sharing supernet of `spvit-nas supernet train`),
* a trial folder (`metrics.jsonl`, `checkpoint/state.json` or `training.yaml`: one trained
  candidate, from a search or from `spvit-nas train`),
* an export (the marker file `EXPORT_MARKER` written by `spvit-nas export`, or, for folders
  exported before the marker existed, nothing but the files an export consists of),

and refuses an `out` that is one of them, contains one, or lies inside one, except for the
folder the command itself rewrites: a search resuming its own run folder, `train` on its own
training folder, `supernet train` on its own supernet folder (each command then asks for
`resume` before it continues a checkpoint), and an export with `overwrite` replacing a previous
export (directly inside a run folder, like the default RUN_DIR/export, or anywhere else).
Refusals are `SettingError`s naming the setting (`out`, `overwrite`): one line with the rule,
the path and the fix; the CLI names its flags instead.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from nas.layout import EXPORT_MARKER, ExportFolder, RunFolder, SupernetDir, TrialFolder
from nas.settings import SettingError

# What marks each kind of folder is its layout's (`nas.layout`): `RunFolder.MARKERS`,
# `SupernetDir.MARKER`, `TrialFolder.MARKERS`, and the export's files with its marker:
EXPORT_FILES = ExportFolder.ALL_FILES
# The writing commands, as their messages name them (`supernet` is `supernet train`).
COMMANDS = ("export", "train", "search", "supernet")

# How far below an existing `out` the check looks for folders it would mix with.
SCAN_DEPTH = 3
SCAN_MAX_ENTRIES = 20_000


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:
        return False


def is_run_folder(path: Path) -> bool:
    return any((path / name).is_file() for name in RunFolder.MARKERS)


def is_supernet_folder(path: Path) -> bool:
    return SupernetDir(path).info.is_file()


def is_trial_folder(path: Path) -> bool:
    return any(_exists(path / name) for name in TrialFolder.MARKERS)


def is_export(path: Path) -> bool:
    """A folder `spvit-nas export` wrote: it holds the marker, or only an export's files."""
    if ExportFolder(path).marker.is_file():
        return True
    try:
        names = {entry.name for entry in os.scandir(path)}
    except OSError:
        return False
    return ExportFolder.REQUIRED <= names and names <= EXPORT_FILES


def kind_of(path: Path) -> str | None:
    """`run folder`, `supernet folder`, `trial folder`, `export` or None."""
    if not path.is_dir():
        return None
    if is_run_folder(path):
        return "run folder"
    if is_export(path):  # before trial folders: an export also holds its training.yaml
        return "export"
    if is_supernet_folder(path):  # before trial folders: it holds metrics and a checkpoint
        return "supernet folder"
    if is_trial_folder(path):
        return "trial folder"
    return None


def write_export_marker(folder: str | os.PathLike) -> Path:
    """Mark `folder` as an export (written into the export before it is moved into place)."""
    path = ExportFolder(folder).marker
    path.write_text(json.dumps({"written_by": "spvit-nas export", "format": 1}) + "\n",
                    encoding="utf-8")
    return path


def _contained(out: Path) -> tuple[Path, str] | None:
    """The first run/trial folder or export strictly below `out` (bounded walk), or None."""
    seen = 0
    level = [out]
    for _ in range(SCAN_DEPTH):
        below: list[Path] = []
        for folder in level:
            try:
                entries = list(os.scandir(folder))
            except OSError:
                continue
            for entry in entries:
                seen += 1
                if seen > SCAN_MAX_ENTRIES:
                    raise SettingError("out", f"`out` {out} already holds more than"
                                       f" {SCAN_MAX_ENTRIES} files and folders; a command's"
                                       " output must not be mixed into them. Choose a new or"
                                       " empty `out` folder.")
                if not entry.is_dir(follow_symlinks=False):
                    continue
                child = Path(entry.path)
                kind = kind_of(child)
                if kind is not None:
                    return child, kind
                below.append(child)
        level = below
    return None


def _a(kind: str) -> str:
    return f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"


def _what_it_holds(kind: str) -> str:
    return {"run folder": "its study, trials and exports",
            "supernet folder": "its checkpoint, metrics and supernet weights",
            "trial folder": "its checkpoint, metrics and weights",
            "export": "its weights, ONNX model and model card"}[kind]


def check_output(out: str | os.PathLike, *, command: str, overwrite: bool = False,
                 resume: bool = False) -> Path:
    """Refuse an `out` of `command` that would overwrite or mix with a user's work.

    Args:
        out: the folder the command is about to write.
        command: `export`, `train`, `search` or `supernet` (`supernet train`).
        overwrite: for `export`: a previous export at `out` may be replaced.
        resume: resuming a search, `train` or `supernet train`: `out` is the command's
            own folder (whether it holds a checkpoint is the command's to check).

    Returns the resolved `out`. Raises `SettingError` (one line) otherwise; checks only, never
    writes.
    """
    if command not in COMMANDS:
        raise ValueError(f"command must be one of {COMMANDS}, got {command!r}")
    given = Path(out).expanduser()
    if _exists(given) and not given.is_dir():
        raise SettingError("out", f"`out` {given} is an existing file, not a folder. Use the path"
                                  " of a new or empty folder.")
    out = given.resolve()
    own = kind_of(out)
    verb = "supernet train" if command == "supernet" else command

    # 1. inside someone's folder
    for ancestor in out.parents:
        kind = kind_of(ancestor)
        if kind is None:
            continue
        if command == "export" and kind == "run folder" and out.parent == ancestor \
                and (own == "export" or not _exists(out) or not any(out.iterdir())):
            break  # an export of the run, next to its trials (e.g. the default RUN_DIR/export)
        raise SettingError("out", f"`out` {out} lies inside the {kind} {ancestor}; writing there"
                                  f" could overwrite {_what_it_holds(kind)}. Choose an `out`"
                                  f" folder outside {ancestor}.")

    # 2. the folder itself
    if own is not None:
        allowed = ((command == "export" and own == "export" and overwrite)
                   or (command == "search" and own == "run folder")
                   or (command == "supernet" and own == "supernet folder")
                   or (command == "train" and own == "trial folder"
                       and TrialFolder(out).training.is_file()))
        if not allowed:
            if command == "export" and own == "export":
                fix = "Set `overwrite` to replace it, or choose another `out` folder."
            elif command == "train" and own == "trial folder":
                fix = ("It is a search's trial; train into a new `out` folder (e.g. with `arch`"
                       f" {TrialFolder(out).arch}).")
            else:
                fix = "Choose a new or empty `out` folder."
            raise SettingError("out", f"`out` {out} already exists and is {_a(own)}; `{verb}`"
                                      f" there would overwrite {_what_it_holds(own)}. {fix}")
        if own == "export":
            extra = sorted(e.name for e in os.scandir(out) if e.name not in EXPORT_FILES)
            if extra:
                raise SettingError("overwrite", f"`out` {out} is an export that also holds"
                                                f" {extra[:3]}; `overwrite` replaces only a"
                                                " folder holding nothing but an export. Move"
                                                " those files away or choose another `out`"
                                                " folder.")
            return out

    # 3. folders below it
    if out.is_dir() and own != "run folder":
        found = _contained(out)
        if found is not None:
            path, kind = found
            raise SettingError("out", f"`out` {out} contains the {kind} {path}; `{verb}` there"
                                      f" could overwrite {_what_it_holds(kind)}. Choose a new or"
                                      " empty `out` folder.")
    if own is None and command == "export" and overwrite and _exists(out) \
            and any(out.iterdir()):
        raise SettingError("overwrite", f"`overwrite` replaces only a previous export (a folder"
                                        f" with {EXPORT_MARKER}), but {out} is not one. Choose"
                                        " another `out` folder, or empty it yourself.")
    return out


__all__ = [
    "EXPORT_MARKER",
    "check_output",
    "is_export",
    "is_run_folder",
    "is_supernet_folder",
    "is_trial_folder",
    "kind_of",
    "write_export_marker",
]
