"""Pareto set, rendering and picking (nas.pareto) on a small finished search built in the test.

`make_run` here builds a run folder the way a search leaves it (run.json, a journal study with
COMPLETE full/partial, PRUNED, FAIL and infeasible trials, trial folders); the report, export and
CLI tests reuse it.
"""

from __future__ import annotations

import csv
import io
import json
import math
import random
import shutil
from pathlib import Path

import numpy as np
import optuna
import pytest
from optuna.distributions import IntDistribution
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState, create_trial

from nas import pareto
from spvit.arch import ArchSpec, BlockSpec
from spvit.errors import ConfigError

optuna.logging.set_verbosity(optuna.logging.WARNING)

DIRECTIONS = ["maximize", "minimize", "minimize"]
SPACE = Path(__file__).resolve().parents[2] / "search_spaces" / "digits.yaml"
BUDGET = 2
STUDY = "demo"


def tiny(blocks, **kw) -> ArchSpec:
    base = dict(img_size=16, patch_size=4, num_classes=5, embed_dim=16, mlp_ratio=2.0)
    base.update(kw)
    return ArchSpec(blocks=tuple(BlockSpec(**b) for b in blocks), **base)


# Trial number -> (architecture, kind, values or None). Full-fidelity front: 0, 1, 2, 8.
ARCHS = {
    0: tiny([{"heads": 2, "prior": "mlp"}, {"heads": 2}], head="avg"),
    1: tiny([{"heads": 2, "prior": ("mlp", "gaussian")}, {"heads": 2, "prior": "rpb"},
             {"heads": 4, "prior": "axial", "pool": True}], head="avg", init="mimetic"),
    2: tiny([{"heads": 2, "prior": "gaussian"}, {"heads": 2, "share": True}], head="cls"),
    3: tiny([{"heads": 2, "prior": "mlp"}, {"heads": 2, "prior": ("gaussian", "rpb")},
             {"heads": 2, "prior": ("axial", "none"), "pool": True}, {"heads": 2, "share": True}],
            stem="conv", head="cls", cls_block=1, conv_pos=True, qkv_bias=False,
            pos_embed="sincos"),
    4: tiny([{"heads": 2, "prior": "mlp"}]),
    5: tiny([{"heads": 2, "prior": "axial"}, {"heads": 2}]),
    6: tiny([{"heads": 4, "prior": "mlp"}]),
    7: tiny([{"heads": 2}] * 6),
    8: tiny([{"heads": 1, "prior": ("rpb",)}], head="avg"),
}
TRIALS = [
    (0, "full", (0.80, 0.010, 5000)),
    (1, "full", (0.90, 0.030, 9000)),
    (2, "full", (0.85, 0.020, 7000)),
    (3, "full", (0.70, 0.040, 12000)),  # dominated by 0, 1 and 2
    (4, "partial", (0.95, 0.005, 1000)),  # would dominate 0-3 if partial trials counted
    (5, "pruned", None),
    (6, "failed", None),
    (7, "infeasible", None),
    (8, "full", (0.60, 0.004, 3000)),
]
FRONT = {0, 1, 2, 8}


def _frozen(number: int, kind: str, values, spec: ArchSpec):
    attrs = {"arch": spec.to_flat(), "budget": BUDGET, "trial_dir": f"trials/{number:04d}",
             "wall_s": 10.0 + number}
    state = TrialState.COMPLETE
    intermediate = {}
    if kind == "full":
        attrs["fidelity"] = BUDGET
    elif kind == "partial":
        attrs["fidelity"] = BUDGET - 1
    elif kind == "pruned":
        attrs.update(fidelity=1, gflops=0.015, params=4000)
        state, values, intermediate = TrialState.PRUNED, None, {1: 0.55}
    elif kind == "failed":
        attrs.update(fidelity=0, fail_reason="CUDA out of memory")
        state, values = TrialState.FAIL, None
    elif kind == "infeasible":
        attrs.update(infeasible="gflops 9 > max_gflops 1", fail_reason="infeasible: gflops")
        del attrs["trial_dir"]
        state, values = TrialState.FAIL, None
    return create_trial(state=state, values=values, user_attrs=attrs,
                        intermediate_values=intermediate,
                        params={"depth": spec.depth},
                        distributions={"depth": IntDistribution(1, 8)})


def make_study(storage, trials, name: str = STUDY) -> optuna.Study:
    study = optuna.create_study(storage=storage, study_name=name, directions=DIRECTIONS)
    for t in trials:
        study.add_trial(t)
    return study


def save_weights(spec: ArchSpec, path: Path, seed: int) -> None:
    """Weights of a real tiny model: seeded init, every tensor nudged so priors are not flat."""
    import torch
    from safetensors.torch import save_file

    import spvit

    model = spvit.create_model(spec, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for k, v in model.state_dict().items():
        v = v.detach().clone().contiguous()
        if v.is_floating_point():
            v += 0.2 * torch.randn(v.shape, generator=gen)
        state[k] = v
    save_file(state, str(path))


def make_run(root: Path, *, weights: bool = False, storage_entry: str = "path",
             trials=TRIALS, archs=ARCHS) -> Path:
    """A finished search's run folder under `root` (see module docstring)."""
    run_dir = root / "run"
    run_dir.mkdir(parents=True)
    journal = run_dir / "study.journal"
    make_study(JournalStorage(JournalFileBackend(str(journal))),
               [_frozen(n, k, v, archs[n]) for n, k, v in trials])
    storage = {"path": str(journal.resolve()), "none": None, "relative": "study.journal"}[
        storage_entry]
    (run_dir / "run.json").write_text(json.dumps({
        "study_name": STUDY, "storage": storage, "sampler": "nsga2", "seed": 0,
        "epochs": BUDGET, "budget": BUDGET, "space": "search_spaces/tiny.yaml",
        "training": {"dataset": "digits", "epochs": BUDGET, "batch_size": 32, "lr": 0.002}}))
    if SPACE.is_file():
        shutil.copyfile(SPACE, run_dir / "space.yaml")
    for n, kind, values in trials:
        if kind == "infeasible":
            continue
        folder = run_dir / "trials" / f"{n:04d}"
        folder.mkdir(parents=True)
        archs[n].save(folder / "arch.yaml")
        epochs = {"full": BUDGET, "partial": BUDGET - 1, "pruned": 1, "failed": 0}[kind]
        acc = values[0] if values else 0.55
        (folder / "metrics.jsonl").write_text("".join(
            json.dumps({"epoch": e + 1, "val_acc": acc, "val_acc5": 1.0, "val_loss": 0.5,
                        "train_loss": 0.6, "lr": 1e-3, "images_per_s": 100.0, "wall_s": 1.0})
            + "\n" for e in range(epochs)))
        if kind == "failed":
            (folder / "failure.json").write_text(json.dumps({"reason": "CUDA out of memory"}))
        elif weights and kind in ("full", "partial"):
            save_weights(archs[n], folder / "model.safetensors", seed=n)
    return run_dir


# ---------------------------------------------------------------------------- front
def test_front_excludes_partial_pruned_failed_and_dominated(tmp_path):
    run_dir = make_run(tmp_path)
    study = pareto.open_study(run_dir)
    front = pareto.pareto_trials(study)
    assert {t.number for t in front} == FRONT
    # sorted by accuracy, best first
    assert [t.number for t in front] == [1, 2, 0, 8]
    # Optuna's own front is fooled by the partial trial 4: it dominates 0, 1 and 2.
    assert {t.number for t in study.best_trials} == {4, 8}


def test_test_accuracy_is_shown_beside_validation_and_never_picks():
    a = _frozen(0, "full", (0.9, 0.02, 2000.0), ARCHS[0])
    b = _frozen(1, "full", (0.8, 0.01, 1000.0), ARCHS[1])
    a.user_attrs["test_acc"], b.user_attrs["test_acc"] = 0.5, 0.95
    row = pareto.format_table([a, b]).splitlines()[2].split()
    assert row[1:3] == ["90.00", "50.00"]
    csv_rows = pareto.to_csv([a, b]).splitlines()
    assert csv_rows[0].split(",")[:3] == ["number", "val_acc", "test_acc"]
    assert csv_rows[1].split(",")[1:3] == ["0.9", "0.5"]
    assert json.loads(pareto.to_json([a]))["trials"][0]["test_acc"] == 0.5
    # Picking reads validation accuracy only: b's better test accuracy does not make it best.
    assert pareto.pick([a, b], method="best")[0] is a


def _random_full_trials(rng: random.Random, n: int):
    out = []
    for _ in range(n):
        # coarse grids make ties and duplicates likely
        values = (rng.choice([0.5, 0.6, 0.7, 0.8, 0.9]), rng.choice([0.1, 0.2, 0.3, 0.4]),
                  float(rng.choice([1000, 2000, 3000])))
        out.append(create_trial(state=TrialState.COMPLETE, values=values,
                                user_attrs={"fidelity": 3, "budget": 3}))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_front_equals_optuna_best_trials_when_all_full_fidelity(seed):
    study = make_study(None, _random_full_trials(random.Random(seed), 40), name=f"s{seed}")
    mine = {t.number for t in pareto.pareto_trials(study)}
    assert mine == {t.number for t in study.best_trials}
    # and against a plain reference: nothing else is at least as good everywhere and better once
    trials = study.trials
    for t in trials:
        a = np.array([-t.values[0], t.values[1], t.values[2]])
        dominated = any(
            (b <= a).all() and (b < a).any()
            for b in (np.array([-u.values[0], u.values[1], u.values[2]]) for u in trials))
        assert (t.number in mine) == (not dominated)


def test_non_dominated_keeps_duplicates():
    pts = np.array([[1.0, 1.0], [1.0, 1.0], [2.0, 2.0], [0.5, 3.0]])
    assert pareto.non_dominated(pts).tolist() == [True, True, False, True]


def _dominates(a, b) -> bool:
    """Plain reference: a <= b everywhere and a < b somewhere (minimisation)."""
    pairs = list(zip(a, b, strict=True))
    return all(x <= y for x, y in pairs) and any(x < y for x, y in pairs)


def _plain_ranks(points) -> list[int]:
    """Rank by peeling: the rows no remaining row dominates, again and again."""
    rank, left, level = {}, set(range(len(points))), 0
    while left:
        front = {i for i in left if not any(_dominates(points[j], points[i]) for j in left)}
        rank.update(dict.fromkeys(front, level))
        left -= front
        level += 1
    return [rank[i] for i in range(len(points))]


def _plain_crowding(points) -> list[float]:
    """NSGA-II crowding distance written out per point: neighbours in each objective's order
    (ties by index), gap over span; extremes (and sets of <= 2 points) infinite."""
    n = len(points)
    if n <= 2:
        return [math.inf] * n
    dist = [0.0] * n
    for k in range(len(points[0])):
        order = sorted(range(n), key=lambda i: (points[i][k], i))
        span = points[order[-1]][k] - points[order[0]][k]
        for pos, i in enumerate(order):
            if pos in (0, n - 1):
                dist[i] = math.inf
            elif span > 0:
                dist[i] += (points[order[pos + 1]][k] - points[order[pos - 1]][k]) / span
    return dist


def test_ranks_and_crowding_match_a_hand_worked_example():
    losses = np.array([[0, 3], [1, 1], [3, 0], [2, 2], [3, 3], [1.5, 1.5]], dtype=float)
    # (1.5, 1.5) dominates (2, 2), which dominates (3, 3)
    assert pareto.non_dominated_ranks(losses).tolist() == [0, 0, 0, 2, 3, 1]
    assert [f.tolist() for f in pareto.non_dominated_fronts(losses)] == [[0, 1, 2], [5], [3], [4]]
    crowd = pareto.crowding_distance(losses[:3])
    assert np.isinf(crowd[0]) and np.isinf(crowd[2])
    assert crowd[1] == pytest.approx(2.0)  # middle point: (3 - 0) / 3 per objective, summed
    assert pareto.non_dominated_fronts(np.zeros((0, 3))) == []


@pytest.mark.parametrize("seed", range(5))
def test_ranks_and_crowding_match_plain_references_on_random_points(seed):
    rng = random.Random(seed)
    for _ in range(20):
        # few distinct values: many ties and duplicates
        pts = [[rng.choice([0.0, 0.5, 1.0]) for _ in range(3)] for _ in range(rng.randint(1, 10))]
        assert pareto.non_dominated_ranks(np.array(pts)).tolist() == _plain_ranks(pts)
        crowd = pareto.crowding_distance(np.array(pts))
        assert crowd.tolist() == pytest.approx(_plain_crowding(pts))


def _inclusion_exclusion_hypervolume(points, ref) -> float:
    """Exact volume of the union of the boxes [p, ref] by inclusion-exclusion: each non-empty
    subset's intersection box starts at its coordinate-wise maximum."""
    import itertools

    pts = [p for p in points if all(a < r for a, r in zip(p, ref, strict=True))]
    total = 0.0
    for size in range(1, len(pts) + 1):
        for subset in itertools.combinations(pts, size):
            corner = [max(c) for c in zip(*subset, strict=True)]
            total += (-1) ** (size + 1) * math.prod(r - c for c, r in zip(corner, ref, strict=True))
    return total


@pytest.mark.parametrize("seed", range(5))
def test_hypervolume_matches_inclusion_exclusion_on_random_3d_points(seed):
    from nas.hypervolume import hypervolume

    rng = np.random.default_rng(seed)
    for _ in range(20):
        n = int(rng.integers(0, 8))
        pts = rng.random((n, 3)) * 1.2  # some beyond the reference, which add nothing
        if n > 1 and rng.random() < 0.5:
            pts[1] = pts[0]  # a duplicate
        ref = (1.0, 1.1, 0.9)
        expected = _inclusion_exclusion_hypervolume(pts.tolist(), ref)
        assert hypervolume(pts, ref) == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert hypervolume([], (1.0, 1.0, 1.0)) == 0.0
    assert hypervolume([[0.5, 0.5, 0.5]]) == pytest.approx(0.125)  # default reference (1, 1, 1)


def test_full_fidelity_rules(tmp_path):
    study = pareto.open_study(make_run(tmp_path))
    kinds = {t.number: pareto.trial_kind(t) for t in study.trials}
    assert kinds == {n: k for n, k, _ in TRIALS}
    full = [t.number for t in study.trials if pareto.is_full_fidelity(t)]
    assert full == [0, 1, 2, 3, 8]


def test_pruned_objectives_come_from_intermediate_values_and_cost_attrs(tmp_path):
    run_dir = make_run(tmp_path)
    study = pareto.open_study(run_dir)
    assert pareto.trial_objectives(study.trials[5], run_dir) == (0.55, 0.015, 4000.0)
    assert pareto.trial_objectives(study.trials[1], run_dir) == (0.90, 0.030, 9000.0)
    assert pareto.trial_objectives(study.trials[6], run_dir) is None


# ---------------------------------------------------------------------------- opening a run
@pytest.mark.parametrize("entry", ["path", "none", "relative"])
def test_open_study_from_run_folder(tmp_path, entry):
    run_dir = make_run(tmp_path, storage_entry=entry)
    study = pareto.open_study(run_dir)
    assert study.study_name == STUDY and len(study.trials) == len(TRIALS)
    assert pareto.storage_label(run_dir).endswith("study.journal")


def test_moved_run_folder_falls_back_to_its_own_journal(tmp_path):
    run_dir = make_run(tmp_path)
    moved = run_dir.rename(tmp_path / "moved")
    assert len(pareto.open_study(moved).trials) == len(TRIALS)


@pytest.mark.parametrize("damage, needle", [
    (lambda d: (d / "run.json").unlink(), "run.json is missing"),
    (lambda d: (d / "run.json").write_text("{oops"), "not valid JSON"),
    (lambda d: (d / "run.json").write_text("[1, 2]"), "study_name"),
    (lambda d: (d / "run.json").write_text(json.dumps({"study_name": "nope"})), "'nope'"),
    (lambda d: (d / "study.journal").unlink(), "does not exist"),
])
def test_open_study_errors_name_the_problem_and_touch_nothing(tmp_path, damage, needle):
    run_dir = make_run(tmp_path, storage_entry="none")
    damage(run_dir)
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    with pytest.raises(ConfigError) as e:
        pareto.open_study(run_dir)
    assert needle in str(e.value)
    # Reading a run never creates or rewrites a file (a missing journal stays missing).
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == before


def test_open_study_missing_folder(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        pareto.open_study(tmp_path / "absent")


def test_storage_label_masks_passwords(tmp_path):
    info = {"study_name": "x", "storage": "postgresql://nas:s3cret@db:5432/nas"}
    assert pareto.storage_label(tmp_path, info) == "postgresql://nas:***@db:5432/nas"


# ---------------------------------------------------------------------------- rendering
def test_table_json_csv(tmp_path):
    study = pareto.open_study(make_run(tmp_path))
    front = pareto.pareto_trials(study)
    table = pareto.format_table(front)
    lines = table.splitlines()
    assert lines[0].split()[:5] == ["trial", "val%", "test%", "GFLOPs", "params"]
    assert len(lines) == 2 + len(front)
    row1 = lines[2].split()  # trial 1: the most accurate
    assert row1[:7] == ["1", "90.00", "-", "0.03", "9.0K", "3", "16->32"]  # no test accuracy
    assert "axial:4" in table and "gaussian:1" in table and "mimetic" in table
    row2 = next(line for line in lines if line.split()[0] == "2").split()
    assert row2[-2] == "1" and row2[-3] == "-"  # shares block 1, no pools

    data = json.loads(pareto.to_json(front, study_name=STUDY))
    assert data["study_name"] == STUDY
    assert [r["number"] for r in data["trials"]] == [1, 2, 0, 8]
    assert ArchSpec.from_dict(data["trials"][0]["arch"]) == ARCHS[1]
    assert data["trials"][3]["params"] == 3000 and data["trials"][3]["pools"] == "-"

    rows = list(csv.DictReader(io.StringIO(pareto.to_csv(front))))
    assert [int(r["number"]) for r in rows] == [1, 2, 0, 8]
    assert float(rows[1]["gflops"]) == 0.020 and rows[0]["pools"] == "2"
    assert pareto.format_table([]).startswith("(no complete")


# ---------------------------------------------------------------------------- picking
def _hand_front():
    # (acc, gflops, params): every point on the 3-D front; the 2-D acc/GFLOPs knee is B (1).
    pts = [(0.50, 1.0, 400.0), (0.80, 2.0, 300.0), (0.85, 4.0, 200.0), (0.90, 8.0, 100.0)]
    study = make_study(None, [create_trial(state=TrialState.COMPLETE, values=v,
                                           user_attrs={"fidelity": 1, "budget": 1})
                              for v in pts], name="hand")
    return pareto.pareto_trials(study)


def _reference_knee(points):
    """Plain geometry: max distance from the chord joining the normalised extremes."""
    accs, gs = [p[0] for p in points], [p[1] for p in points]
    norm = [((g - min(gs)) / (max(gs) - min(gs)), (a - min(accs)) / (max(accs) - min(accs)))
            for a, g in zip(accs, gs, strict=True)]
    (x1, y1), (x2, y2) = min(norm), max(norm)
    dist = [abs((x2 - x1) * (y1 - y) - (x1 - x) * (y2 - y1)) / math.hypot(x2 - x1, y2 - y1)
            for x, y in norm]
    return int(np.argmax(dist)), max(dist)


def test_pick_best_and_knee_on_a_known_front():
    front = _hand_front()
    by_number = sorted(front, key=lambda t: t.number)
    trial, why = pareto.pick(front, method="best")
    assert trial.number == 3 and "highest accuracy" in why
    trial, why = pareto.pick(front, method="knee")
    ref_index, ref_dist = _reference_knee([tuple(t.values) for t in by_number])
    assert trial.number == ref_index == 1
    _, scores = pareto.knee_scores(by_number)
    assert max(scores) == pytest.approx(ref_dist)
    assert "knee" in why and "trial 0 to trial 3" in why


def test_pick_respects_budgets():
    front = _hand_front()
    assert pareto.pick(front, max_gflops=5, method="best")[0].number == 2
    assert pareto.pick(front, max_gflops=5, method="knee")[0].number == 1
    # params budget excludes the cheap-GFLOPs end
    assert pareto.pick(front, max_params=250, method="best")[0].number == 3
    trial, why = pareto.pick(front, max_gflops=5, max_params=250, method="knee")
    assert trial.number == 2 and "max_gflops 5 and max_params 250" in why
    for method in ("best", "knee"):
        for g, p in ((5, 250), (3, None), (None, 350), (8, 100)):
            chosen, _ = pareto.pick(front, max_gflops=g, max_params=p, method=method)
            assert (g is None or chosen.values[1] <= g) and (p is None or chosen.values[2] <= p)


def test_pick_errors_when_nothing_fits():
    front = _hand_front()
    with pytest.raises(ConfigError) as e:
        pareto.pick(front, max_gflops=0.5, max_params=50)
    msg = str(e.value)
    assert "1 GFLOPs (trial 0)" in msg and "100 params (trial 3)" in msg
    assert "max_gflops 0.5 and max_params 50" in msg and msg.endswith("Raise the budget.")
    with pytest.raises(ConfigError, match="no complete full-fidelity trial"):
        pareto.pick([], method="best")
    with pytest.raises(ConfigError, match="must be one of"):
        pareto.pick(front, method="middle")
    with pytest.raises(ConfigError, match="max_gflops must be a number > 0"):
        pareto.pick(front, max_gflops=-1)


def test_knee_with_two_points_falls_back_to_most_accurate():
    front = _hand_front()[:2]  # trials 3 and 2 (sorted by accuracy)
    trial, why = pareto.pick(front, method="knee")
    assert trial.number == 3 and "most accurate" in why


def test_a_pick_rule_is_a_strategy_object_with_budgets_applied_first(monkeypatch):
    """A user's rule (here: the fewest parameters) plugs in as an object or by its registered
    name; it only ever sees trials within the budgets, and names are not taken twice."""
    seen = []

    class FewestParams(pareto.PickRule):
        name = "fewest_params"

        def choose(self, fitting, scope):
            seen.append(sorted(t.number for t in fitting))
            chosen = min(fitting, key=lambda t: (t.values[2], t.number))
            return chosen, f"trial {chosen.number}: fewest params among {scope}."

    front = _hand_front()
    trial, why = pareto.pick(front, max_gflops=5, method=FewestParams())
    assert all(pareto.pick(front, max_gflops=5, method=m)[0].values[1] <= 5
               for m in pareto.PICK_METHODS)
    fit = sorted(t.number for t in front if t.values[1] <= 5)
    assert seen == [fit] and trial.number == min(
        (t for t in front if t.values[1] <= 5), key=lambda t: (t.values[2], t.number)).number
    assert "within max_gflops 5" in why

    monkeypatch.setattr(pareto, "PICK_RULES", dict(pareto.PICK_RULES))
    pareto.register_pick_rule(FewestParams())
    assert pareto.pick(front, method="fewest_params")[0].number == min(
        front, key=lambda t: (t.values[2], t.number)).number
    with pytest.raises(ConfigError, match="new, non-empty name"):
        pareto.register_pick_rule(FewestParams())
    with pytest.raises(ConfigError, match="Did you mean 'knee'"):
        pareto.pick(front, method="kne")


def test_the_commands_offer_exactly_the_built_in_pick_rules():
    import argparse

    from launch import cmd_export, cmd_pareto

    for module in (cmd_pareto, cmd_export):
        parser = argparse.ArgumentParser()
        module.add_arguments(parser)
        action = next(a for a in parser._actions if "--pick" in a.option_strings)
        assert tuple(action.choices) == pareto.PICK_METHODS == ("best", "knee")


def test_reading_a_run_needs_no_ray():
    import subprocess
    import sys

    code = ("import sys, nas.pareto, nas.report, nas.export, launch.cmd_pareto, launch.cmd_export;"
            " sys.exit(int(any(m == 'ray' or m.startswith(('ray.', 'deepspeed'))"
            " for m in sys.modules)))")
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0
