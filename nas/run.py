"""A search's run folder on disk: what it holds and how to read it back.

A search (`spvit-nas search`) writes into its run folder RUN_DIR: `RUN_DIR/run.json` (`RunInfo`: the
search's settings, `nas.settings.SearchSettings`, and its history), `space.yaml` (the resolved
space), the study journal (unless the study lives in a database) and one folder per trial,
`trials/NNNN`, holding `metrics.jsonl`, `arch.yaml` and the consolidated `model.safetensors` (the
names are `nas.layout`'s). This module is the one reader of what those files mean: `nas.pareto`,
`nas.report` and `nas.export` build on it, and it imports none of them. Paths in run.json are stored
relative to the run folder (database URLs as given), so a copied or moved run folder still reads its
own study; older files with absolute paths read as before. No Ray.

It also names what a search study is: the objectives and their directions, and the facts about
a trial that every reader agrees on (`trial_kind`, `is_full_fidelity`, `trial_arch`).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import optuna
from optuna.trial import FrozenTrial, TrialState

from nas import storage as run_storage
from nas.layout import (  # noqa: F401  (the run-folder names, re-exported for nas.study et al.)
    ARCH_FILE,
    METRICS_FILE,
    RUN_FILE,
    SPACE_FILE,
    TRIALS_DIR,
    WEIGHTS_FILE,
    NotARunFolder,
    RunFolder,
    TrialFolder,
    trial_dir_of,
)
from nas.settings import SearchSettings, SettingError
from search_spaces.training import TrainingConfig
from spvit.arch import ArchSpec
from spvit.errors import ConfigError
from spvit.io import atomic_write_json, load_safetensors, read_json_lines

# What a search study is: three objectives, in this order, with these directions.
OBJECTIVES: tuple[str, ...] = ("val_acc", "gflops", "params")
DIRECTIONS: tuple[str, ...] = ("maximize", "minimize", "minimize")

# User attr: the validation accuracy of a trial's latest epoch (what a PRUNED trial reached).
LAST_VAL_ACC_ATTR = "val_acc_last"
is_url = run_storage.is_url  # "is this storage a database URL", decided in one place


def _relative_to(run_dir: Path, value: str) -> str:
    """`value` relative to the run folder when it is a file path (URLs unchanged)."""
    if not value or is_url(value) or not os.path.isabs(value):
        return value
    return os.path.relpath(value, Path(run_dir).resolve())


def _resolved_in(run_dir: Path, value: str) -> str:
    """A run.json path as an absolute path (relative ones count from the run folder)."""
    if not value or is_url(value) or os.path.isabs(value):
        return value
    return os.path.normpath(Path(run_dir).resolve() / value)


# ---------------------------------------------------------------------------- run.json
@dataclass(frozen=True)
class RunInfo(SearchSettings):
    """`RUN_DIR/run.json`: the search's settings (`nas.settings.SearchSettings`) and its history
    (when it was created, when each driver session started), for resuming, reports, export and
    the optuna CLI/dashboard. `storage` and `space` are absolute in memory and relative to the
    run folder on disk."""

    created: str = ""
    sessions: tuple[str, ...] = ()

    PATHS: ClassVar[tuple[str, ...]] = ("storage", "space")

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "sessions", tuple(self.sessions))

    def with_session(self, started: str) -> RunInfo:
        """This run with one more driver session, started at `started`."""
        return dataclasses.replace(self, sessions=(*self.sessions, started))

    def save(self, run_dir: str | os.PathLike) -> Path:
        data = self.to_dict()
        for key in self.PATHS:
            data[key] = _relative_to(Path(run_dir), data[key])
        return atomic_write_json(RunFolder(run_dir).run_json, data)

    @classmethod
    def load(cls, run_dir: str | os.PathLike) -> RunInfo:
        folder = RunFolder(run_dir)
        path = folder.run_json
        try:
            data = folder.read_run_json()
        except NotARunFolder:
            raise SettingError("resume", f"cannot resume: {path} does not exist, so"
                                         f" {str(run_dir)!r} holds no search. Drop `resume` to"
                                         " start one there.") from None
        for key in cls.PATHS:
            if isinstance(data.get(key), str):
                data[key] = _resolved_in(Path(run_dir), data[key])
        return cls.from_dict(data, where=str(path))


def read_run_info(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The run's `run.json` as a dict (at least `study_name`; `storage` may be absent/null),
    for readers that also accept hand-written or older files."""
    folder = RunFolder(run_dir)
    info = folder.read_run_json()
    path = folder.run_json
    if not isinstance(info.get("study_name"), str):
        raise ConfigError(
            f"{path} must be a JSON object with a string `study_name`, but got keys"
            f" {sorted(info)}. Add \"study_name\": \"NAME\"."
        )
    if info.get("storage") is not None and not isinstance(info["storage"], str):
        raise SettingError(
            "storage",
            f"{path}: its \"storage\" must be a journal path, a database URL or null, but got"
            f" {info['storage']!r}. Fix it in {RUN_FILE}, or name the study's storage with"
            " `storage`."
        )
    return info


def training_config(run_dir: str | os.PathLike,
                    info: Mapping[str, Any] | None = None) -> TrainingConfig | None:
    """The run's training recipe: run.json's `training`, else the `training:` block of the
    run's space.yaml; None when neither holds a valid one."""
    run_dir = Path(run_dir)
    info = read_run_info(run_dir) if info is None else info
    if isinstance(info.get("training"), Mapping):
        try:
            return TrainingConfig.from_dict(info["training"])
        except ConfigError:
            pass
    path = RunFolder(run_dir).space
    if path.is_file():
        from search_spaces.space import SearchSpace

        try:
            return SearchSpace.load(path, check_feasible=False).training
        except ConfigError:
            return None
    return None


# ---------------------------------------------------------------------------- the study
def _journal_file(run_dir: Path, recorded: str | None, *, given: bool = False) -> Path:
    """The journal file of a run: the recorded path if it exists, else RUN_DIR/study.journal
    (a run folder that was moved or copied keeps working). A path the user `given` as
    `storage` has no fallback: reading another file than the one named would hide the mistake."""
    folder = RunFolder(run_dir)
    default = folder.journal
    if recorded:
        path = folder.journal_at(recorded)
        if path.is_file():
            return path
        if given:
            raise SettingError(
                "storage",
                f"`storage` {recorded!r} names the study journal {str(path)!r}, which does not"
                " exist (a relative path counts from the run folder). Check the path, or leave"
                " `storage` unset to read the run's own study."
            )
    if default.is_file():
        return default
    raise SettingError(
        "storage",
        f"study journal {str(Path(recorded) if recorded else default)!r} does not exist."
        " Check the run folder, or name the study's storage URL with `storage`."
    )


def make_run_storage(run_dir: str | os.PathLike, info: Mapping[str, Any] | None = None, *,
                     storage: str | None = None) -> optuna.storages.BaseStorage:
    """The Optuna storage of a run: `storage` if given, else the `storage` entry of its
    run.json (a journal file path or a database URL; absent/null means RUN_DIR/study.journal).

    Never creates a study file: a missing journal is a `ConfigError`.
    """
    run_dir = Path(run_dir)
    info = read_run_info(run_dir) if info is None else info
    if storage is not None and not str(storage).strip():
        raise SettingError("storage", "`storage` is empty. Give the study's journal file or"
                                      " database URL, or leave `storage` unset to read the run's"
                                      " own study.")
    url = storage if storage is not None else info.get("storage")
    if not is_url(url):
        path = _journal_file(run_dir, url or None, given=storage is not None)
        if path.resolve() == RunFolder(run_dir).journal.resolve():
            return run_storage.make_storage(None, run_dir)
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        return JournalStorage(JournalFileBackend(str(path)))
    run_storage.check_database_exists(
        str(url), source="`storage`" if storage is not None else f"the storage of {RUN_FILE}")
    return run_storage.make_storage(str(url), run_dir)


def storage_label(run_dir: str | os.PathLike, info: Mapping[str, Any] | None = None, *,
                  storage: str | None = None) -> str:
    """The run's storage as a printable string (journal path, or URL with password masked)."""
    run_dir = Path(run_dir)
    info = read_run_info(run_dir) if info is None else info
    url = storage if storage is not None else info.get("storage")
    if not is_url(url):
        try:
            return str(_journal_file(run_dir, url or None))
        except ConfigError:
            return str(url or RunFolder(run_dir).journal)
    # postgresql://user:secret@host/db -> postgresql://user:***@host/db
    return re.sub(r"^([a-z][a-z0-9+]*://[^:/@]*):[^@/]*@", r"\1:***@", str(url))


def open_run_study(run_dir: str | os.PathLike, *, storage: str | None = None) -> optuna.Study:
    """Load the Optuna study of the search whose run folder is `run_dir`.

    `storage` overrides the URL recorded in run.json (e.g. with the real database password,
    which run.json never holds).
    """
    info = read_run_info(run_dir)
    backend = make_run_storage(run_dir, info, storage=storage)
    name = info["study_name"]
    try:
        return optuna.load_study(study_name=name, storage=backend)
    except KeyError:
        raise ConfigError(
            f"study {name!r} is not in storage {storage_label(run_dir, info, storage=storage)}."
            f" Check `study_name` and `storage` in {RunFolder(run_dir).run_json}."
        ) from None


def find_trial(study: optuna.Study, number: int) -> FrozenTrial:
    """The trial with this number, or a `ConfigError` naming the valid range."""
    if isinstance(number, bool) or not isinstance(number, int) or number < 0:
        raise ConfigError(f"a trial number is an integer >= 0, but got {number!r}."
                          " Pick one from `spvit-nas pareto RUN_DIR`.")
    trials = study.get_trials(deepcopy=False)
    for t in trials:
        if t.number == number:
            return t
    have = f"trials 0-{len(trials) - 1}" if trials else "no trials"
    raise ConfigError(f"trial {number} does not exist in study {study.study_name!r} ({have})."
                      " Pick one from `spvit-nas pareto RUN_DIR`.")


# ---------------------------------------------------------------------------- trial facts
def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def is_full_fidelity(trial: FrozenTrial) -> bool:
    """COMPLETE, not infeasible, three objective values, and `fidelity == budget`."""
    if trial.state != TrialState.COMPLETE or trial.values is None or len(trial.values) != 3:
        return False
    attrs = trial.user_attrs
    if attrs.get("infeasible"):
        return False
    fidelity, budget = _number(attrs.get("fidelity")), _number(attrs.get("budget"))
    return fidelity is not None and budget is not None and fidelity == budget


def trial_kind(trial: FrozenTrial) -> str:
    """One word for a trial's standing: full, partial, pruned, failed, infeasible, duplicate,
    running..."""
    if trial.user_attrs.get("infeasible"):
        return "infeasible"
    if trial.user_attrs.get("duplicate_of") is not None:
        return "duplicate"
    if trial.state == TrialState.COMPLETE:
        return "full" if is_full_fidelity(trial) else "partial"
    return {
        TrialState.PRUNED: "pruned",
        TrialState.FAIL: "failed",
        TrialState.RUNNING: "running",
        TrialState.WAITING: "waiting",
    }[trial.state]


def trial_arch(trial: FrozenTrial) -> ArchSpec | None:
    """The trial's ArchSpec from its `arch` user attr (flat form), or None if absent/invalid."""
    flat = trial.user_attrs.get("arch")
    if not isinstance(flat, Mapping):
        return None
    try:
        return ArchSpec.from_dict(flat)
    except ConfigError:
        return None


def trial_folder(run_dir: str | os.PathLike, trial: FrozenTrial) -> TrialFolder:
    """The trial's folder: its `trial_dir` user attr (relative to RUN_DIR), else trials/NNNN."""
    rel = trial.user_attrs.get("trial_dir")
    return RunFolder(run_dir).trial_at(rel if isinstance(rel, str) else None, trial.number)


def trial_dir(run_dir: str | os.PathLike, trial: FrozenTrial) -> Path:
    """The path of `trial_folder`."""
    return trial_folder(run_dir, trial).path


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The JSON lines of a `metrics.jsonl` file; a torn last line (killed writer) is skipped."""
    return read_json_lines(path)


def trial_metrics(run_dir: str | os.PathLike, trial: FrozenTrial) -> list[dict[str, Any]]:
    """The epoch records of a trial's metrics.jsonl (empty when there is none)."""
    return read_metrics(trial_folder(run_dir, trial).metrics)


# ---------------------------------------------------------------------------- a trial's model
def check_exportable(trial: FrozenTrial) -> None:
    """Raise `ConfigError` unless `trial` finished its full training budget."""
    n = trial.number
    kind = trial_kind(trial)
    attrs = trial.user_attrs
    if kind == "full":
        return
    if kind == "infeasible":
        raise ConfigError(f"trial {n} was rejected by a constraint before training (infeasible),"
                          " so it has no weights. Export a trial from the Pareto set.")
    if trial.state == TrialState.FAIL:  # "failed", and duplicates (told FAIL, never trained)
        reason = " ".join(str(attrs.get("fail_reason") or "no reason recorded").split())
        reason = reason if len(reason) <= 200 else reason[:197] + "..."
        original = attrs.get("duplicate_of")
        fix = (f"Export trial {original}, which trained this architecture (`trial` {original})."
               if kind == "duplicate" else "Export a trial from the Pareto set.")
        raise SettingError("trial", f"trial {n} failed ({reason}), so it has no trained weights."
                                    f" {fix}")
    if kind == "pruned":
        raise ConfigError(f"trial {n} was pruned after {attrs.get('fidelity', '?')} of"
                          f" {attrs.get('budget', '?')} epochs; only full-budget trials are"
                          " exported. Export a trial from the Pareto set.")
    if kind == "partial":
        raise ConfigError(f"trial {n} completed only {attrs.get('fidelity', '?')} of"
                          f" {attrs.get('budget', '?')} epochs (fidelity != budget); only"
                          " full-budget trials are exported. Export a trial from the Pareto set.")
    raise ConfigError(f"trial {n} is still {trial.state.name} and has no final weights yet."
                      " Wait for it to finish or export another trial.")


def trial_spec(run_dir: str | os.PathLike, trial: FrozenTrial) -> ArchSpec:
    """The trial's ArchSpec (study `arch` attr; its arch.yaml must agree when both exist)."""
    arch_file = trial_folder(run_dir, trial).arch
    flat = trial.user_attrs.get("arch")
    spec = None
    if flat is not None:
        try:
            spec = ArchSpec.from_dict(flat)
        except ConfigError as e:
            raise ConfigError(f"trial {trial.number}: the study's `arch` attribute is not a valid"
                              f" architecture ({e}). The study is damaged; export another"
                              " trial.") from None
    file_spec = ArchSpec.load(arch_file) if arch_file.is_file() else None
    if spec is None and file_spec is None:
        raise ConfigError(f"trial {trial.number} has neither an `arch` attribute in the study nor"
                          f" {arch_file}. Its architecture is unknown; export another"
                          " trial.")
    if spec is not None and file_spec is not None and spec != file_spec:
        raise ConfigError(f"trial {trial.number}: {arch_file} differs from the"
                          " architecture the study recorded. The trial folder does not belong"
                          " to this trial; check `trial_dir` or export another trial.")
    return spec if spec is not None else file_spec


def load_weights(path: str | os.PathLike) -> dict[str, Any]:
    """A trial's safetensors state dict, or a one-line `ConfigError` if it is missing or damaged
    (`spvit.io.load_safetensors`, the one reader of weights files)."""
    return load_safetensors(path, what="weights",
                            hint="Export another trial or retrain this one.")


def build_with_weights(spec: ArchSpec, state: dict[str, Any], *, source: str = "weights"):
    """`spvit.create_model(spec)` in eval mode with `state` loaded strictly (checked finite)."""
    import torch

    import spvit

    model = spvit.create_model(spec)
    bad_dtype = sorted(k for k, v in state.items()
                       if v.is_floating_point() and v.dtype != torch.float32)
    if bad_dtype:
        raise ConfigError(f"{source}: tensors {bad_dtype[:3]} are not float32; the consolidated"
                          " weights must be fp32. Re-save them as fp32 or retrain.")
    not_finite = sorted(k for k, v in state.items()
                        if v.is_floating_point() and not bool(torch.isfinite(v).all()))
    if not_finite:
        raise ConfigError(f"{source}: tensors {not_finite[:3]} contain NaN or inf (the training"
                          " diverged). Export another trial.")
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}"
                  for k in sorted(set(own) & set(state))
                  if tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or mismatched:
        raise ConfigError(
            f"{source} do not match the architecture: missing {missing[:3]}, unexpected"
            f" {unexpected[:3]}, shape {mismatched[:2]}. The file belongs to another"
            " architecture; export another trial."
        )
    model.load_state_dict(state, strict=True)
    return model.eval()


def load_trial_model(run_dir: str | os.PathLike, trial: FrozenTrial):
    """(model in eval mode with the trial's trained weights, its ArchSpec)."""
    check_exportable(trial)
    spec = trial_spec(run_dir, trial)
    path = trial_folder(run_dir, trial).weights
    model = build_with_weights(spec, load_weights(path), source=f"weights file {str(path)!r}")
    return model, spec
