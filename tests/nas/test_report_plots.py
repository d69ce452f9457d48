"""The pictures and page of `nas.report`: each panel of pareto.png draws its staircase through the
trials no other beats on that panel's two axes (not through every member of the 3-objective
front), report.md names paths relative to the run folder, and a report leaves no priors image of
an earlier one behind."""

from __future__ import annotations

import json
import random

import pytest

from nas import report
from tests.nas.test_pareto import ARCHS, TRIALS, make_run

# Trial 9 is on the 3-objective front only thanks to its parameters: on accuracy vs GFLOPs,
# trial 0 (0.80 at 0.010 GFLOPs) beats it; a staircase through it would cut into the region
# trial 0 dominates.
OFF_STAIRS = (9, "full", (0.75, 0.025, 1500))


def naive_2d(points: list[tuple[int, float, float]]) -> set[int]:
    """Trials not dominated on (accuracy up, cost down), by comparing every pair."""
    return {n for n, acc, cost in points
            if not any((a >= acc and c <= cost) and (a > acc or c < cost)
                       for m, a, c in points if m != n)}


class _Trial:
    def __init__(self, number, values):
        self.number, self.values = number, values


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("axis", [1, 2])
def test_front_2d_is_the_non_dominated_set_of_the_projection(seed, axis):
    rng = random.Random(seed)
    trials = [_Trial(n, (rng.random(), rng.choice([0.01, 0.02, 0.03, rng.random()]),
                         rng.randrange(1000, 5000, 500))) for n in range(40)]
    got = report.front_2d(trials, axis)
    expected = naive_2d([(t.number, t.values[0], t.values[axis]) for t in trials])
    assert {t.number for t in got} == expected
    costs = [t.values[axis] for t in got]
    assert costs == sorted(costs)


@pytest.fixture
def run_dir(tmp_path):
    archs = {**ARCHS, 9: ARCHS[8]}
    return make_run(tmp_path / "runs", weights=True, trials=[*TRIALS, OFF_STAIRS], archs=archs)


def _figure(monkeypatch, run_dir):
    """The matplotlib figure of pareto.png, as drawn."""
    figures = {}
    real = report._png_bytes

    def keep(fig):
        figures.setdefault("pareto", fig)
        return real(fig)

    monkeypatch.setattr(report, "_png_bytes", keep)
    report.write_reports(run_dir)
    return figures["pareto"]


def test_each_panel_draws_the_staircase_of_its_own_projection(monkeypatch, run_dir):
    fig = _figure(monkeypatch, run_dir)
    panels = [ax for ax in fig.axes if ax.get_xlabel()]
    assert [ax.get_xlabel() for ax in panels] == ["GFLOPs (GMACs per image)", "parameters"]
    values = {n: v for n, kind, v in [*TRIALS, OFF_STAIRS] if kind == "full"}
    front = {0, 1, 2, 8, 9}
    for ax, axis in zip(panels, (1, 2), strict=True):
        (stairs,) = [line for line in ax.get_lines()
                     if line.get_label() == "non-dominated in this view"]
        expected = naive_2d([(n, values[n][0], values[n][axis]) for n in front])
        drawn = sorted(zip(stairs.get_xdata(), stairs.get_ydata(), strict=True))
        assert drawn == sorted((values[n][axis], 100 * values[n][0]) for n in expected)
        # every member of the 3-objective front is drawn and labelled, on the stairs or not
        labels = {t.get_text(): t for t in ax.texts}
        assert set(labels) == {str(n) for n in front}
        assert (labels["9"].get_fontweight() == "bold") == (9 in expected)
    # trial 9 is off the GFLOPs staircase and on the parameters one
    assert 9 not in naive_2d([(n, values[n][0], values[n][1]) for n in front])
    assert 9 in naive_2d([(n, values[n][0], values[n][2]) for n in front])


def test_html_staircase_joins_only_the_projection_front(run_dir):
    report.write_reports(run_dir)
    html = (run_dir / "reports" / "pareto.html").read_text(encoding="utf-8")
    start = html.index("Plotly.newPlot(")
    rest = html[start + len("Plotly.newPlot("):]
    rest = rest[rest.index(",") + 1:].lstrip()
    traces, _ = json.JSONDecoder().raw_decode(rest)
    (stairs,) = [t for t in traces if t["name"] == "non-dominated in this view"]
    from tests.nas.test_report import _array

    assert sorted(_array(stairs["x"])) == [0.004, 0.01, 0.02, 0.03]  # not trial 9's 0.025


def test_report_md_names_no_absolute_path(tmp_path, run_dir, monkeypatch):
    info = json.loads((run_dir / "run.json").read_text())
    info["space"] = str(tmp_path / "spaces" / "tiny.yaml")  # as an older run.json held it
    (run_dir / "run.json").write_text(json.dumps(info))
    monkeypatch.chdir(tmp_path)  # the report is made from another folder than the run's
    report.write_reports(run_dir.relative_to(tmp_path))
    md = (run_dir / "reports" / "report.md").read_text(encoding="utf-8")
    assert str(tmp_path) not in md and "/runs/run" not in md
    assert "- study: `demo` in `study.journal`" in md
    assert "(from `../../spaces/tiny.yaml`)" in md
    assert "from its run folder" in md


def test_a_report_removes_the_priors_image_of_an_earlier_one(run_dir):
    out = run_dir / "reports"
    report.write_reports(run_dir, trial=1)
    assert (out / "priors_1.png").is_file()
    (out / "priors_notes.png").write_bytes(b"not a report")  # not a priors_N.png: kept
    report.write_reports(run_dir)  # the knee, trial 0
    assert sorted(p.name for p in out.glob("priors_*.png")) == ["priors_0.png",
                                                                "priors_notes.png"]
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "priors_0.png" in md and "priors_1.png" not in md
