"""The hypervolume of a search's front: the one exact computation that reports
(`nas.report`) and benchmarks (`bench/search_efficiency.py`) share.

`hypervolume(points, reference)` is the volume that 3-D points (all objectives minimised)
dominate below a reference point; `hypervolume_history` scales a run's full-fidelity trials
into the unit cube and follows that volume trial by trial. numpy only at import time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from spvit.errors import ConfigError

REFERENCE_MARGIN = 1.1


def area_2d(points: np.ndarray, reference: Sequence[float]) -> float:
    """Area that 2-D points (N, 2), all below `reference`, dominate (minimisation): a sweep
    along the first objective over the staircase of the second."""
    area, best_y = 0.0, float(reference[1])
    for x, y in sorted(map(tuple, np.asarray(points, dtype=float).reshape(-1, 2))):
        if y < best_y:
            area += (float(reference[0]) - x) * (best_y - y)
            best_y = y
    return area


def hypervolume(points: Any, reference: Sequence[float] = (1.0, 1.0, 1.0)) -> float:
    """Volume of the region that 3-D points (N, 3) dominate below `reference` (minimisation).

    Points not strictly below the reference everywhere add nothing and are dropped. Slices
    along the first objective: between consecutive first coordinates the dominated region is
    the 2-D region of the points seen so far, so the volume is a sum of slab thickness times
    area (O(N^2 log N), ample for a search's fronts).
    """
    pts = np.asarray(points, dtype=float).reshape(-1, 3)
    reference = np.asarray(reference, dtype=float)
    pts = pts[(pts < reference).all(axis=1)]
    if not len(pts):
        return 0.0
    pts = pts[np.argsort(pts[:, 0], kind="stable")]
    volume = 0.0
    for i in range(len(pts)):
        upper = pts[i + 1, 0] if i + 1 < len(pts) else reference[0]
        if upper > pts[i, 0]:
            volume += (upper - pts[i, 0]) * area_2d(pts[: i + 1, 1:], reference[1:])
    return float(volume)


def hypervolume_history(trials: Sequence[Any], *, reference: Sequence[float] | None = None,
                        ) -> tuple[list[int], list[float], tuple[float, float, float]]:
    """Hypervolume of the full-fidelity front after each trial, in trial-number order.

    The objectives are scaled to losses in a unit cube: (1 - val_acc, gflops / G, params / P),
    with reference point (1, 1, 1), i.e. accuracy 0, G GFLOPs and P parameters. Unless
    `reference` = (val_acc_ref, G, P) is given, G and P are `REFERENCE_MARGIN` (1.1) times the
    largest GFLOPs and parameter count among the run's full-fidelity trials, and val_acc_ref = 0.
    The value is then the fraction of that box the front dominates (0..1), comparable across
    the trials of one run (the reference is fixed for the whole history).

    Returns (trial numbers, hypervolume after each, reference as (val_acc, gflops, params)).
    """
    from nas.run import is_full_fidelity

    ordered = sorted(trials, key=lambda t: t.number)
    full = [t for t in ordered if is_full_fidelity(t)]
    if reference is None:
        if not full:
            return [t.number for t in ordered], [0.0] * len(ordered), (0.0, 1.0, 1.0)
        reference = (0.0, REFERENCE_MARGIN * max(t.values[1] for t in full),
                     REFERENCE_MARGIN * max(t.values[2] for t in full))
    acc_ref, g_ref, p_ref = (float(x) for x in reference)
    if not (g_ref > 0 and p_ref > 0 and acc_ref < 1):
        raise ConfigError(f"the hypervolume reference needs GFLOPs > 0, params > 0 and accuracy"
                          f" < 1, but got {tuple(reference)}. Pass a larger reference point.")
    numbers, values, losses = [], [], []
    for t in ordered:
        if is_full_fidelity(t):
            acc, g, p = t.values
            losses.append([(1.0 - acc) / (1.0 - acc_ref), g / g_ref, p / p_ref])
        numbers.append(t.number)
        values.append(hypervolume(losses, np.ones(3)) if losses else 0.0)
    return numbers, values, (acc_ref, g_ref, p_ref)
