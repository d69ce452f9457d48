"""Reports of a finished search (nas.report) on the run folder of tests/nas/test_pareto.py."""

from __future__ import annotations

import base64
import itertools
import json
import re
import shutil

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch
from optuna.trial import TrialState, create_trial
from safetensors.torch import load_file

import spvit
from nas import pareto, report
from spvit.errors import ConfigError
from tests.nas.test_pareto import ARCHS, FRONT, TRIALS, make_run, make_study

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def reported(tmp_path_factory):
    run_dir = make_run(tmp_path_factory.mktemp("report"), weights=True)
    return run_dir, report.write_reports(run_dir)


def _check_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    image = mpimg.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    return image


def test_all_reports_written(reported):
    run_dir, paths = reported
    names = sorted(p.name for p in paths)
    # default priors trial: the knee of the front, trial 0 (see test_pareto)
    assert names == ["hypervolume.png", "pareto.csv", "pareto.html", "pareto.png",
                     "priors_0.png", "report.md"]
    assert all(p.parent == run_dir / "reports" for p in paths)
    for name in ("pareto.png", "hypervolume.png", "priors_0.png"):
        _check_png(run_dir / "reports" / name)
    # atomic writes leave no temporary files behind
    assert not [p for p in (run_dir / "reports").iterdir() if p.name.startswith(".")]


def test_pareto_html_embeds_plotly_and_the_data(reported):
    run_dir, _ = reported
    html = (run_dir / "reports" / "pareto.html").read_text(encoding="utf-8")
    assert "Plotly.newPlot" in html
    assert len(html) > 1_000_000  # plotly.js itself is inside the page
    assert not re.search(r"<script[^>]+src=[\"']https?://", html)  # no CDN: opens offline
    for n in FRONT:
        assert f"trial {n} (Pareto)" in html
    assert "trial 5 (pruned)" in html and "trial 4 (partial)" in html
    assert "trial 6" not in html  # failed trials have no objectives
    # The plotted numbers themselves, read back from the figure's JSON.
    traces = _plotly_traces(html)
    front = next(tr for tr in traces if tr["name"] == "Pareto set (full budget)")
    points = {int(n): (x, y) for n, x, y in zip(_array(front["customdata"]), _array(front["x"]),
                                                  _array(front["y"]), strict=True)}
    assert sorted(points) == sorted(FRONT)
    assert points[1] == pytest.approx((0.03, 90.0))  # trial 1: GFLOPs, accuracy in %


def _array(value):
    """A plotly array: a list, or a typed array {"dtype", "bdata" (base64)}."""
    if isinstance(value, dict) and "bdata" in value:
        return np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"]).tolist()
    return list(value)


def _plotly_traces(html):
    """The trace list passed to `Plotly.newPlot(id, traces, layout, config)` in the page."""
    start = html.index("Plotly.newPlot(")
    rest = html[start + len("Plotly.newPlot("):]
    rest = rest[rest.index(",") + 1:].lstrip()  # skip the div id
    traces, _ = json.JSONDecoder().raw_decode(rest)
    return traces


def test_report_md_summarises_the_run(reported):
    run_dir, _ = reported
    md = (run_dir / "reports" / "report.md").read_text(encoding="utf-8")
    assert "# Search report: demo" in md
    assert "| 5 | 1 | 1 | 1 | 1 | 0 | 0 | 0 | 9 |" in md  # counts by kind (KIND_ORDER)
    assert "nsga2" in md and "2 epochs per candidate" in md and "digits" in md
    assert "- space: [space.yaml](../space.yaml)" in md and "- searched: `depth`" in md
    table = md.split("## Pareto set (4 trials)")[1].split("`val%`")[0]
    assert [int(r.split("|")[1]) for r in table.strip().splitlines()[2:]] == [1, 2, 0, 8]
    assert "`test%`: the held-out test split" in md
    for link in re.findall(r"\]\(([^)]+)\)", md):
        if not link.startswith(".."):
            assert (run_dir / "reports" / link).is_file(), link
    assert "trial time (sum of `wall_s` over trials): 2m 06s" in md  # sum of 10 + n
    assert "knee: trial 0" in md and "best: trial 1" in md


def test_csv_matches_front(reported):
    run_dir, _ = reported
    rows = (run_dir / "reports" / "pareto.csv").read_text().splitlines()
    assert [int(r.split(",")[0]) for r in rows[1:]] == [1, 2, 0, 8]


def _plain_hypervolume(points, ref):
    """Exact hypervolume by summing the dominated cells of the grid the points span."""
    points = np.asarray(points, dtype=float)
    axes = [sorted(set(points[:, d]) | {ref[d]}) for d in range(points.shape[1])]
    total = 0.0
    for cell in itertools.product(*[range(len(a) - 1) for a in axes]):
        lo = [axes[d][i] for d, i in enumerate(cell)]
        hi = [axes[d][i + 1] for d, i in enumerate(cell)]
        if any((p <= np.array(lo)).all() for p in points):
            total += float(np.prod(np.array(hi) - np.array(lo)))
    return total


def test_hypervolume_history_against_plain_reference(reported):
    run_dir, _ = reported
    trials = pareto.open_study(run_dir).trials
    numbers, hv, ref = report.hypervolume_history(trials)
    assert numbers == list(range(len(TRIALS)))
    assert ref == (0.0, pytest.approx(1.1 * 0.040), pytest.approx(1.1 * 12000))
    full = [t for t in trials if pareto.is_full_fidelity(t)]
    for i, n in enumerate(numbers):
        seen = [t for t in full if t.number <= n]
        expected = _plain_hypervolume(
            [[1 - t.values[0], t.values[1] / ref[1], t.values[2] / ref[2]] for t in seen],
            [1.0, 1.0, 1.0]) if seen else 0.0
        assert hv[i] == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert hv[4] == hv[3]  # the partial trial 4 adds nothing, though it would dominate
    assert all(b >= a for a, b in zip(hv, hv[1:], strict=False))
    with pytest.raises(ConfigError, match="reference"):
        report.hypervolume_history(trials, reference=(0.0, -1.0, 1.0))


def test_priors_of_a_chosen_trial_use_its_trained_weights(tmp_path, monkeypatch):
    run_dir = make_run(tmp_path, weights=True)
    seen = {}
    real = report.priors_png

    def spy(priors, **kw):
        seen.update(priors)
        return real(priors, **kw)

    monkeypatch.setattr(report, "priors_png", spy)
    paths = report.write_reports(run_dir, trial=1)
    assert "priors_1.png" in [p.name for p in paths]
    # the tables drawn are those of trial 1's trained weights, not of a fresh model
    model = spvit.create_model(ARCHS[1])
    model.load_state_dict(load_file(str(run_dir / "trials/0001/model.safetensors")))
    expected = model.prior_tables()
    assert sorted(seen) == sorted(expected) == [0, 1, 2]
    for block in expected:
        assert torch.equal(seen[block]["tables"], expected[block]["tables"])
    fresh = spvit.create_model(ARCHS[1], seed=0).prior_tables()
    assert not torch.equal(seen[0]["tables"], fresh[0]["tables"])
    # one row per block with priors: trial 1 has 3 rows, the knee (trial 0) one
    tall = _check_png(run_dir / "reports" / "priors_1.png")
    report.write_reports(run_dir)
    short = _check_png(run_dir / "reports" / "priors_0.png")
    assert tall.shape[0] > 2 * short.shape[0]


@pytest.mark.parametrize("number, needle", [(6, "failed"), (5, "pruned"), (4, "completed only"),
                                            (99, "does not exist")])
def test_requested_priors_trial_must_be_usable(tmp_path, number, needle):
    run_dir = make_run(tmp_path)
    with pytest.raises(ConfigError, match=needle):
        report.write_reports(run_dir, trial=number)
    assert not (run_dir / "reports").exists()  # refused before anything was written


def test_default_priors_skipped_with_a_reason(tmp_path):
    run_dir = make_run(tmp_path, weights=True)
    (run_dir / "trials/0000/model.safetensors").unlink()  # the knee has no weights
    paths = report.write_reports(run_dir)
    assert not [p for p in paths if p.name.startswith("priors_")]
    md = (run_dir / "reports/report.md").read_text()
    assert "Not drawn: trial 0: weights file" in md and "is missing" in md


def test_architecture_without_priors_is_refused_when_requested(tmp_path):
    archs = dict(ARCHS)
    archs[0] = archs[0].replace(blocks=tuple(b.__class__(heads=b.heads) for b in archs[0].blocks))
    run_dir = make_run(tmp_path, weights=True, archs=archs)
    with pytest.raises(ConfigError, match="no block with a spatial prior"):
        report.write_reports(run_dir, trial=0)


def test_reports_of_a_run_without_full_trials(tmp_path):
    run_dir = make_run(tmp_path, trials=[t for t in TRIALS if t[1] != "full"])
    paths = report.write_reports(run_dir)
    assert sorted(p.name for p in paths) == ["hypervolume.png", "pareto.csv", "pareto.html",
                                             "pareto.png", "report.md"]
    _check_png(run_dir / "reports" / "pareto.png")
    md = (run_dir / "reports" / "report.md").read_text()
    assert "_No complete full-fidelity trials._" in md and "Not drawn" in md


def test_plotted_points_cover_full_partial_and_pruned(tmp_path):
    run_dir = make_run(tmp_path)
    study = pareto.open_study(run_dir)
    kinds = {t.number: kind for t, kind, _ in report.plotted_points(study, run_dir)}
    assert kinds == {0: "full", 1: "full", 2: "full", 3: "full", 4: "partial", 5: "pruned",
                     8: "full"}
    # a pruned trial without intermediate values falls back to its metrics.jsonl
    study2 = make_study(None, [create_trial(state=TrialState.PRUNED, user_attrs={
        "trial_dir": "trials/0005", "gflops": 0.5, "params": 10})], name="p")
    (t, kind, objectives), = report.plotted_points(study2, run_dir)
    assert objectives == (0.55, 0.5, 10.0)
    shutil.rmtree(run_dir / "trials/0005")
    assert report.plotted_points(study2, run_dir) == []
    # without cost attrs the analytic cost model prices the trial's architecture
    from spvit.cost import estimate

    study3 = make_study(None, [create_trial(state=TrialState.PRUNED, intermediate_values={3: 0.4},
                                            user_attrs={"arch": ARCHS[1].to_flat()})], name="q")
    (_, _, objectives), = report.plotted_points(study3, run_dir)
    cost = estimate(ARCHS[1])
    assert objectives == (0.4, cost.gflops, float(cost.params))
