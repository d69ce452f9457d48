"""nas.optuna_compat against the installed Optuna: every private name it wraps still means what
the wrapper says, and the constraint values the study stores are the ones Optuna reads."""

from __future__ import annotations

import datetime
import re
from pathlib import Path

import optuna
import pytest
from optuna.storages import JournalStorage, RDBStorage
from optuna.trial import TrialState

from nas import optuna_compat
from nas.storage import make_storage

ROOT = Path(__file__).resolve().parents[2]
DIRECTIONS = ["maximize", "minimize", "minimize"]

optuna.logging.set_verbosity(optuna.logging.WARNING)


def test_installed_optuna_is_in_the_supported_and_pinned_range():
    low, high = optuna_compat.SUPPORTED
    assert low <= optuna_compat.optuna_version() < high
    pin = re.search(r'"optuna>=([\d.]+),<([\d.]+)"',
                    (ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert pin, "pyproject.toml pins optuna as >=X,<Y"
    as_pair = [tuple(int(x) for x in (v.split(".") + ["0"])[:2]) for v in pin.groups()]
    assert tuple(as_pair) == optuna_compat.SUPPORTED


@pytest.mark.parametrize("kind", ["journal", "sqlite"])
def test_study_storage_is_the_backend_and_ids_are_its_keys(tmp_path, kind):
    storage = make_storage(None if kind == "journal" else f"sqlite:///{tmp_path / 's.db'}",
                           tmp_path)
    optuna.create_study(study_name="s", storage=storage, directions=DIRECTIONS)
    study = optuna.load_study(study_name="s", storage=storage)
    backend = optuna_compat.study_storage(study)
    assert backend is storage  # load_study wraps an RDBStorage in a cache; this unwraps it
    assert isinstance(backend, JournalStorage if kind == "journal" else RDBStorage)
    assert optuna_compat.study_id(study) == backend.get_study_id_from_name("s")
    trial = study.ask()
    frozen = study.get_trials(deepcopy=False)[0]
    expected = backend.get_trial_id_from_study_id_trial_number(optuna_compat.study_id(study),
                                                               trial.number)
    assert optuna_compat.trial_id(trial) == optuna_compat.trial_id(frozen) == expected
    assert optuna_compat.trial_id(expected) == expected


def backdate_heartbeat(storage: RDBStorage, trial_id: int, seconds: float) -> None:
    """Move a trial's last heartbeat `seconds` into the past, as if its driver had been silent
    that long (Optuna's `trial_heartbeats` table, compared with the database's clock)."""
    import sqlalchemy as sa

    table = sa.table("trial_heartbeats", sa.column("trial_id", sa.Integer),
                     sa.column("heartbeat", sa.DateTime))
    with storage.engine.begin() as conn:
        beat = conn.execute(sa.select(table.c.heartbeat)
                            .where(table.c.trial_id == trial_id)).scalar_one()
        conn.execute(sa.update(table).where(table.c.trial_id == trial_id)
                     .values(heartbeat=beat - datetime.timedelta(seconds=seconds)))


def test_stale_trial_ids_follow_the_heartbeat(tmp_path):
    storage = make_storage(f"sqlite:///{tmp_path / 's.db'}", tmp_path, heartbeat_interval=1,
                           grace_period=2)
    study = optuna.create_study(study_name="s", storage=storage, directions=DIRECTIONS)
    beating, silent = study.ask(), study.ask()
    for t in (beating, silent):
        storage.record_heartbeat(optuna_compat.trial_id(t))
    assert optuna_compat.stale_trial_ids(storage, study) == set()
    backdate_heartbeat(storage, optuna_compat.trial_id(silent), 10)  # silent for > grace 2 s
    assert optuna_compat.stale_trial_ids(storage, study) == {optuna_compat.trial_id(silent)}
    storage.record_heartbeat(optuna_compat.trial_id(silent))  # a late beat revives it
    assert optuna_compat.stale_trial_ids(storage, study) == set()
    plain = make_storage(None, tmp_path / "j")
    journal_study = optuna.create_study(storage=plain, directions=DIRECTIONS)
    journal_study.ask()
    assert optuna_compat.stale_trial_ids(plain, journal_study) == set()


@pytest.mark.parametrize("kind", ["journal", "sqlite"])
def test_set_trial_system_attr_is_read_back_by_optuna(tmp_path, kind):
    storage = make_storage(None if kind == "journal" else f"sqlite:///{tmp_path / 's.db'}",
                           tmp_path)
    optuna.create_study(study_name="s", storage=storage, directions=DIRECTIONS)
    study = optuna.load_study(study_name="s", storage=storage)  # RDB: behind Optuna's cache
    asked = study.ask()
    optuna_compat.set_trial_system_attr(study, asked, "proposal", {"attempts": 2})
    frozen = study.get_trials(deepcopy=False)[0]
    optuna_compat.set_trial_system_attr(study, frozen, "by_frozen", 1)
    optuna_compat.set_trial_system_attr(study, optuna_compat.trial_id(asked), "by_id", [0.5])
    study.tell(asked, [0.5, 1.0, 1.0])
    stored = optuna.load_study(study_name="s", storage=storage).trials[0].system_attrs
    assert stored["proposal"] == {"attempts": 2}
    assert stored["by_frozen"] == 1 and stored["by_id"] == [0.5]


def test_stored_constraints_are_what_optuna_and_the_dashboard_read(tmp_path):
    """`set_constraints` writes the `constraints` list optuna-dashboard serialises; Optuna reads
    the same list into FrozenTrial.constraints and `study.best_trials` (an infeasible trial is
    never best)."""
    study = optuna.create_study(storage=make_storage(None, tmp_path), directions=DIRECTIONS)
    for value, violation in ((0.9, 0.5), (0.5, -0.1)):
        trial = study.ask()
        optuna_compat.set_constraints(study, trial, {"max_gflops": violation, "min_tokens": -1})
        study.tell(trial, [value, 1.0, 1.0])
    trials = study.get_trials(deepcopy=False)
    assert [t.system_attrs[optuna_compat.CONSTRAINTS_ATTR] for t in trials] == [[0.5, -1.0],
                                                                                [-0.1, -1.0]]
    assert [t.constraints for t in trials] == [{"0": 0.5, "1": -1.0}, {"0": -0.1, "1": -1.0}]
    assert optuna_compat.constraint_values(trials[0]) == {"max_gflops": 0.5, "min_tokens": -1.0}
    assert all(t.state == TrialState.COMPLETE for t in trials)
    # trial 0 dominates trial 1 but breaks its constraint, so only trial 1 is best
    assert [t.number for t in study.best_trials] == [1]
    with pytest.raises(ValueError, match="NaN"):
        optuna_compat.set_constraints(study, study.ask(), {"max_gflops": float("nan")})
