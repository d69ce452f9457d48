"""The few places where the search needs more of Optuna than its public API offers.

Everything else in the house uses Optuna's public API (`optuna.create_study`, `Study.ask/tell`,
`Trial.set_constraint`, `Trial.set_user_attr`, `get_trials`, the public storage classes). Each
function here touches one private name, says why no public call does the job, and is tested
against the installed Optuna (tests/nas/test_optuna_compat.py) so that an upgrade that moves
the name fails there first, not in a search. The supported range is pinned in pyproject.toml.

* `study_storage(study)`: the storage a study reads and writes (`Study._storage`, without the
  `_CachedStorage` wrapper `optuna.load_study` puts around an `RDBStorage`). A driver lease
  beats for trials it did not start through `Study.optimize`, stores its owner id on them and
  takes a database lock through the storage's engine; Optuna offers no public accessor of a
  study's storage.
* `study_id(study)`: the storage key of a study (`Study._study_id`), which every storage call
  that is not a `Study` method takes.
* `trial_id(trial)`: the storage key of a trial (`Trial._trial_id` / `FrozenTrial._trial_id`),
  which `optuna.Trial(study, trial_id)` and the storage calls take.
* `report_intermediate(study, trial_id, step, value)`: `Trial.report` refuses multi-objective
  studies, but reports and plots read a pruned trial's last accuracy as its intermediate value.
* `stale_trial_ids(storage, study)`: RUNNING trials whose heartbeat is older than the grace
  period (`BaseHeartbeat._get_stale_trial_ids`). The public `optuna.storages.fail_stale_trials`
  fails them at once; a driver must first try to adopt them (continue them from their
  checkpoints), so it needs the list without the failing.
"""

from __future__ import annotations

from typing import Any

import optuna
from optuna.storages import BaseStorage, RDBStorage
from optuna.trial import FrozenTrial

# The Optuna releases these wrappers are written and tested for (also pinned in pyproject.toml).
SUPPORTED = ((5, 0), (6, 0))  # [5.0, 6.0)


def optuna_version() -> tuple[int, int]:
    major, minor = optuna.__version__.split(".")[:2]
    return int(major), int(minor)


def study_storage(study: optuna.Study) -> BaseStorage:
    """The storage under `study`, unwrapped from Optuna's per-process trial cache."""
    storage = study._storage
    backend = getattr(storage, "_backend", None)  # optuna.storages._CachedStorage
    return backend if isinstance(backend, BaseStorage) else storage


def study_id(study: optuna.Study) -> int:
    """The storage key of `study`."""
    return study._study_id


def trial_id(trial: optuna.Trial | FrozenTrial | int) -> int:
    """The storage key of a trial (an int is taken as one already)."""
    return trial if isinstance(trial, int) else trial._trial_id


def report_intermediate(study: optuna.Study, trial: Any, step: int, value: float) -> None:
    """Record `value` as the intermediate value of `trial` at `step` (multi-objective too)."""
    study._storage.set_trial_intermediate_value(trial_id(trial), int(step), float(value))


def stale_trial_ids(storage: BaseStorage, study: optuna.Study) -> set[int]:
    """Ids of the study's RUNNING trials whose heartbeat expired (empty without heartbeats)."""
    if not isinstance(storage, RDBStorage) or storage.get_heartbeat_interval() is None:
        return set()
    return set(storage._get_stale_trial_ids(study_id(study)))
