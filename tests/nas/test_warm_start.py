"""nas.warm_start: seeding a new study from earlier runs (no Ray, no training)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from nas import study as nas_study
from nas.storage import make_storage
from nas.warm_start import NSGA2_GENERATION_KEY, is_warm_start, warm_start
from search_spaces.space import SearchSpace
from spvit.errors import ConfigError
from tests.tiny_space import changed, small_space, write_space

SPACE = small_space()


def _space(tmp_path: Path, data: dict = SPACE) -> SearchSpace:
    return SearchSpace.load(write_space(tmp_path / "space.yaml", data))


def _accuracy(params: int) -> float:
    return round(1.0 - math.exp(-params / 5000), 6)


def _earlier_run(run_dir: Path, space: SearchSpace, *, trials: int, seed: int = 0,
                 prune_last: bool = False) -> optuna.Study:
    """A finished run folder as `spvit-nas search` leaves it (run.json + journal study)."""
    run_dir.mkdir(parents=True)
    info = nas_study.RunInfo(
        study_name="old", storage=str(run_dir / "study.journal"), sampler="random", seed=seed,
        trials=trials, concurrent=1, epochs=space.training.epochs, workers_per_trial=1,
        space="space.yaml", training=space.training.to_dict())
    info.save(run_dir)
    study = nas_study.open_study(make_storage(None, run_dir), study_name="old",
                                 sampler=optuna.samplers.RandomSampler(seed=seed), resume=False)
    ss = nas_study.SearchStudy(study, space, run_dir=run_dir, budget=space.training.epochs)
    for i in range(trials):
        c = ss.ask()
        epoch = 1 if prune_last and i == trials - 1 else space.training.epochs
        ss.tell_result(c, {"epoch": epoch, "val_acc": _accuracy(c.params)})
    return study


def _new_study(run_dir: Path, sampler: optuna.samplers.BaseSampler | None = None):
    return nas_study.open_study(make_storage(None, run_dir), study_name="new",
                                sampler=sampler or optuna.samplers.RandomSampler(seed=9),
                                resume=False)


def test_compatible_trials_are_seeded_as_complete_with_their_accuracy(tmp_path):
    space = _space(tmp_path)
    old = _earlier_run(tmp_path / "a", space, trials=4)
    study = _new_study(tmp_path / "new")
    lines: list[str] = []
    report = warm_start(study, space, [tmp_path / "a"], training=space.training.to_dict(),
                        budget=2, say=lines.append)
    seeded = study.get_trials(deepcopy=False)
    assert len(seeded) == len(report.seeded) == 4 and report.skipped == []
    by_arch = {str(t.user_attrs["arch"]): t for t in old.get_trials(deepcopy=False)
               if t.state == TrialState.COMPLETE}
    for t in seeded:
        before = by_arch[str(t.user_attrs["arch"])]
        assert t.state == TrialState.COMPLETE and is_warm_start(t)
        assert t.values == before.values and t.params == before.params
        assert t.user_attrs["trial_dir"] == str(tmp_path / "a" / before.user_attrs["trial_dir"])
        assert t.system_attrs[NSGA2_GENERATION_KEY] == 0
        assert t.constraints and all(v <= 0 for v in t.constraints.values())
    assert lines[-1].startswith("warm start: 4 trial(s) of")


def test_incompatible_trials_are_skipped_with_one_line_each(tmp_path):
    space = _space(tmp_path)
    _earlier_run(tmp_path / "partial", space, trials=3, prune_last=True)
    other_recipe = dataclasses.replace(space, training=space.training.replace(batch_size=64))
    _earlier_run(tmp_path / "recipe", other_recipe, trials=2, seed=1)
    (tmp_path / "w").mkdir()
    wider = _space(tmp_path / "w", changed(SPACE, dimensions={"embed_dim": [16, 24]}))
    _earlier_run(tmp_path / "wider", wider, trials=8, seed=2)
    study = _new_study(tmp_path / "new")
    lines: list[str] = []
    report = warm_start(study, space, [tmp_path / "partial", tmp_path / "recipe",
                                       tmp_path / "wider"],
                        training=space.training.to_dict(), budget=2, say=lines.append)
    skipped = [line for line in lines if "skipped" in line]
    assert skipped == report.skipped
    # the pruned trial is no COMPLETE trial of the earlier run, so it is not a candidate at all
    assert not any("partial trial 2" in s for s in skipped)
    assert sum("recipe trial" in s and "batch_size 64 vs 128" in s for s in skipped) == 2
    widths = [t.user_attrs["arch"]["embed_dim"] for t in
              optuna.load_study(study_name="old",
                                storage=make_storage(None, tmp_path / "wider")).trials]
    assert widths.count(24) > 0
    assert sum("wider trial" in s and "embed_dim 24" in s for s in skipped) == widths.count(24)
    assert len(study.trials) == 2 + widths.count(16) - sum(
        "same architecture" in s for s in skipped)
    assert all(len(s.splitlines()) == 1 for s in skipped)


def test_seeded_architectures_are_never_trained_again_nor_counted(tmp_path):
    space = _space(tmp_path)
    _earlier_run(tmp_path / "a", space, trials=3)
    study = _new_study(tmp_path / "new")
    warm_start(study, space, [tmp_path / "a"], training=space.training.to_dict(), budget=2,
               say=lambda line: None)
    first = study.trials[0]
    study.enqueue_trial(first.params)  # the sampler re-proposes a seeded architecture
    ss = nas_study.SearchStudy(study, space, run_dir=tmp_path / "new", budget=2)
    candidate = ss.ask()
    assert candidate.spec.to_flat() != first.user_attrs["arch"]
    duplicate = [t for t in study.trials if t.user_attrs.get("duplicate_of") is not None]
    assert [t.user_attrs["duplicate_of"] for t in duplicate] == [first.number]
    assert duplicate[0].state == TrialState.FAIL
    assert "never trained twice" in duplicate[0].user_attrs["fail_reason"]
    assert ss.counted_trials() == 1  # only the new candidate; seeded trials are free


def test_nsga2_first_generation_selects_its_parents_from_seeded_trials(tmp_path):
    space = _space(tmp_path)
    _earlier_run(tmp_path / "a", space, trials=4)
    sampler = optuna.samplers.NSGAIISampler(population_size=2, seed=0)
    study = _new_study(tmp_path / "new", sampler)
    warm_start(study, space, [tmp_path / "a"], training=space.training.to_dict(), budget=2,
               say=lambda line: None)
    ss = nas_study.SearchStudy(study, space, run_dir=tmp_path / "new", budget=2)
    c = ss.ask()
    frozen = ss._frozen(c.number)
    assert frozen.system_attrs[NSGA2_GENERATION_KEY] == 1
    parents = sampler.get_parent_population(study, 1)
    assert parents and all(is_warm_start(p) for p in parents)


def test_a_folder_without_a_search_is_refused_with_the_fix(tmp_path):
    space = _space(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no search"):
        warm_start(_new_study(tmp_path / "new"), space, [tmp_path / "empty"],
                   training=space.training.to_dict(), budget=2)
