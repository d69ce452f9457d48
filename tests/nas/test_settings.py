"""nas.settings: a search's settings check themselves, name the setting a bad value breaks, keep
what a resumed search may not change and round-trip through run.json (older files included)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from nas.run import RunInfo
from nas.settings import (
    FixedSettingChanged,
    OneShotOptions,
    SearchSettings,
    SettingError,
)
from spvit.errors import ConfigError

BASE = dict(study_name="s", storage="/x/study.journal", sampler="nsga2", seed=0, trials=4,
            concurrent=2, epochs=2, workers_per_trial=1, space="/x/space.yaml",
            training={"epochs": 2}, population_size=4)


def _settings(**changes) -> SearchSettings:
    return SearchSettings(**{**BASE, **changes})


def test_settings_round_trip_through_run_json(tmp_path):
    oneshot = OneShotOptions(supernet="/x/sn", candidates=50, finetune_steps=10, rescore=8)
    info = RunInfo(**{**BASE, "scheduler": "moasha", "reduction_factor": 3,
                      "feasible_proposals": False, "gpus_per_worker": 1, "oneshot": oneshot},
                   created="t0", sessions=["t1"])
    info.save(tmp_path)
    on_disk = json.loads((tmp_path / "run.json").read_text(encoding="utf-8"))
    assert on_disk["scheduler"] == "moasha" and "asha" not in on_disk
    assert on_disk["oneshot"] == {"supernet": "/x/sn", "candidates": 50, "finetune_steps": 10,
                                  "rescore": 8}
    loaded = RunInfo.load(tmp_path)
    assert loaded == info
    assert (loaded.reduction_factor, loaded.gpus_per_worker) == (3.0, 1.0)
    assert loaded.oneshot == oneshot and loaded.strategy == "oneshot"
    assert SearchSettings.from_dict(_settings().to_dict()) == _settings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        loaded.trials = 5  # type: ignore[misc]


@pytest.mark.parametrize("old, scheduler", [
    ({"asha": True, "moasha": False}, "asha"),
    ({"asha": False, "moasha": True}, "moasha"),
    ({"asha": False, "moasha": False}, "fifo"),
    ({}, "fifo"),
])
def test_an_old_run_json_with_asha_and_moasha_reads_as_scheduler(tmp_path, old, scheduler):
    data = {k: v for k, v in RunInfo(**BASE).to_dict().items()
            if k not in ("scheduler", "reduction_factor")}
    data.update(old, asha_reduction_factor=4.0, version=1)
    (tmp_path / "run.json").write_text(json.dumps(data), encoding="utf-8")
    loaded = RunInfo.load(tmp_path)
    assert loaded.scheduler == scheduler and loaded.reduction_factor == 4.0
    assert (loaded.asha, loaded.moasha) == (scheduler == "asha", scheduler == "moasha")
    loaded.save(tmp_path)  # written again in today's form
    on_disk = json.loads((tmp_path / "run.json").read_text(encoding="utf-8"))
    assert on_disk["scheduler"] == scheduler and "asha_reduction_factor" not in on_disk


def test_an_old_run_json_with_both_schedulers_is_refused(tmp_path):
    data = {**RunInfo(**BASE).to_dict(), "asha": True, "moasha": True}
    del data["scheduler"]
    (tmp_path / "run.json").write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(ConfigError, match="both `asha` and `moasha`"):
        RunInfo.load(tmp_path)


@pytest.mark.parametrize("changes, setting, message", [
    ({"trials": 0}, "trials", "`trials` must be an integer >= 1, but got 0"),
    ({"concurrent": True}, "concurrent", "`concurrent` must be an integer >= 1, but got True"),
    ({"seed": -1}, "seed", "`seed` must be an integer >= 0, but got -1"),
    ({"epochs": 1.5}, "epochs", "`epochs` must be an integer >= 1"),
    ({"workers_per_trial": 0}, "workers_per_trial", "`workers_per_trial` must be an integer"),
    ({"max_consecutive_failures": 0}, "max_consecutive_failures",
     "`max_consecutive_failures` must be an integer >= 1"),
    ({"study_name": " "}, "study_name", "`study_name` must be a non-empty name"),
    ({"sampler": "annealing"}, "sampler", "`sampler` must be one of nsga2, tpe"),
    ({"scheduler": "hyperband"}, "scheduler", "`scheduler` must be one of fifo, asha, moasha"),
    ({"reduction_factor": 1}, "reduction_factor", "`reduction_factor` must be a number > 1"),
    ({"reduction_factor": float("inf")}, "reduction_factor", "must be a number > 1"),
    ({"gpus_per_worker": 0.5}, "gpus_per_worker", "`gpus_per_worker` must be 0 \\(CPU\\) or 1"),
    ({"feasible_proposals": "no"}, "feasible_proposals", "`feasible_proposals` must be true"),
    ({"training": None}, "training", "`training` must be a mapping"),
    ({"population_size": 1}, "population_size", "`population_size` must be an integer >= 2"),
    ({"sampler": "tpe"}, "population_size", "`population_size` 4 applies to the nsga2 and auto"),
    ({"oneshot": "sn"}, "oneshot", "`oneshot` must be the one-shot options or None"),
    ({"oneshot": {"supernet": "sn", "candidates": 0}}, "oneshot.candidates",
     "`oneshot.candidates` must be an integer >= 1, but got 0"),
    ({"oneshot": {"supernet": "", "candidates": 9}}, "oneshot.supernet",
     "`oneshot.supernet` must be a non-empty name"),
    ({"oneshot": {"supernet": "sn", "candidates": 9, "finetune_steps": -1}},
     "oneshot.finetune_steps", "`oneshot.finetune_steps` must be an integer >= 0, but got -1"),
    ({"oneshot": {"supernet": "sn", "candidates": 9, "rescore": 8}}, "oneshot.rescore",
     "`oneshot.rescore` 8 re-scores .* but `oneshot.finetune_steps` is not set"),
    ({"oneshot": {"supernet": "sn", "candidates": 9, "finetune_steps": 5, "rescore": 3}},
     "oneshot.rescore", "`oneshot.rescore` must be an integer >= `trials` \\(4\\), but got 3"),
])
def test_each_bad_value_is_one_message_naming_the_setting(changes, setting, message):
    with pytest.raises(SettingError, match=message) as caught:
        _settings(**changes)
    assert caught.value.setting == setting
    assert len(str(caught.value).splitlines()) == 1
    assert "--" not in str(caught.value)  # the core names settings, never flags


def test_a_bad_value_in_run_json_names_the_file_and_the_setting(tmp_path):
    data = {**RunInfo(**BASE).to_dict(), "concurrent": 0}
    (tmp_path / "run.json").write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(SettingError, match=r"run\.json: `concurrent` must be an integer >= 1"):
        RunInfo.load(tmp_path)


def test_a_resumed_search_keeps_its_fixed_settings():
    settings = _settings(scheduler="asha")
    resumed = settings.resumed_with({"trials": 9, "concurrent": None, "epochs": 2,
                                     "scheduler": "asha", "gpus_per_worker": 1})
    assert (resumed.trials, resumed.concurrent, resumed.gpus_per_worker) == (9, 2, 1.0)
    for key, value in (("scheduler", "moasha"), ("epochs", 3), ("seed", 1),
                       ("feasible_proposals", False), ("reduction_factor", 3.0),
                       ("study_name", "other")):
        with pytest.raises(FixedSettingChanged, match=f"`{key}` {value} differs from") as caught:
            settings.resumed_with({key: value})
        assert caught.value.setting == key and caught.value.kept == getattr(settings, key)
    with pytest.raises(SettingError, match="`trials` must be an integer >= 1"):
        settings.resumed_with({"trials": 0})


def test_check_value_checks_one_setting_before_the_rest_exist():
    assert SearchSettings.check_value("gpus_per_worker", 1) == 1.0
    with pytest.raises(SettingError, match="`epochs` must be an integer >= 1, but got 0"):
        SearchSettings.check_value("epochs", 0)
