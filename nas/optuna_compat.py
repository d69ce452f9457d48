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
* `set_trial_system_attr(study, trial, key, value)`: a system attr of a trial, written through
  the study's storage (`Study._storage`). `Trial.set_system_attr` is gone from Optuna 5, and the
  attrs the search keeps beside Optuna's own (the sampler's proposal record, the constraint
  list below) belong with the system attrs, not the user's.
* `set_constraints(study, trial, values)`: the constraint values of a trial as the system attr
  `constraints`, a list (`optuna.study._constrained_optimization._CONSTRAINTS_KEY`): the one
  place both optuna-dashboard (which serialises that list) and Optuna 5 itself (samplers,
  `FrozenTrial.constraints`, `study.best_trials`) read. `Trial.set_constraint` writes one
  `constraints:<name>` attr per constraint, which Optuna reads but optuna-dashboard does not;
  Optuna 5 has no public way to set a trial's system attr.
* `stale_trial_ids(storage, study)`: RUNNING trials whose heartbeat is older than the grace
  period (`BaseHeartbeat._get_stale_trial_ids`). The public `optuna.storages.fail_stale_trials`
  fails them at once; a driver must first try to adopt them (continue them from their
  checkpoints), so it needs the list without the failing.
"""

from __future__ import annotations

from collections.abc import Mapping
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


def set_trial_system_attr(study: optuna.Study, trial: Any, key: str, value: Any) -> None:
    """Store `value` (JSON-serialisable) as the system attr `key` of `trial` (a Trial,
    FrozenTrial or storage trial id of `study`)."""
    study._storage.set_trial_system_attr(trial_id(trial), key, value)


CONSTRAINTS_ATTR = "constraints"  # optuna.study._constrained_optimization._CONSTRAINTS_KEY


def set_constraints(study: optuna.Study, trial: Any, values: Mapping[str, float]) -> None:
    """Store `values` (feasible when <= 0) as the trial's constraint list, in their order; the
    names go to the user attr `constraint_names` (Optuna reads the list as "0", "1", ...)."""
    numbers = [float(v) for v in values.values()]
    if any(v != v for v in numbers):
        raise ValueError(f"constraint values must not be NaN, but got {dict(values)}")
    set_trial_system_attr(study, trial, CONSTRAINTS_ATTR, numbers)
    study._storage.set_trial_user_attr(trial_id(trial), "constraint_names", list(values))


def constraint_values(trial: FrozenTrial) -> dict[str, float]:
    """A trial's constraint values by name (as `set_constraints` stored them)."""
    names = trial.user_attrs.get("constraint_names") or []
    values = trial.system_attrs.get(CONSTRAINTS_ATTR) or []
    return dict(zip(names, values, strict=False))


def stale_trial_ids(storage: BaseStorage, study: optuna.Study) -> set[int]:
    """Ids of the study's RUNNING trials whose heartbeat expired (empty without heartbeats)."""
    if not isinstance(storage, RDBStorage) or storage.get_heartbeat_interval() is None:
        return set()
    return set(storage._get_stale_trial_ids(study_id(study)))
