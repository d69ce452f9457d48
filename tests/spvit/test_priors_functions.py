"""The per-family prior formulas of `spvit.priors` against plain-Python loops (fp64), the one pair
gather, and the model's and the supernet's priors computing the same thing through them."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from spvit.priors import (
    FAMILIES,
    SpatialPrior,
    axial_prior,
    decay_prior,
    gather_pairs,
    gaussian_prior,
    head_order,
    mlp_prior,
    offset_tables,
    offset_values_of,
    rpb_prior,
)
from spvit.supernet import SuperPriors

GRID = (3, 4)  # not square, so dx and dy cannot be swapped unnoticed
FORMULAS_OF = {"mlp": mlp_prior, "gaussian": gaussian_prior, "axial": axial_prior,
               "rpb": rpb_prior, "decay": decay_prior}


def _offsets(grid=GRID) -> list[tuple[int, int]]:
    """Every (dx, dy), dy outer and dx inner, from (-(Gw-1), -(Gh-1)): the documented order."""
    gh, gw = grid
    return [(dx, dy) for dy in range(-(gh - 1), gh) for dx in range(-(gw - 1), gw)]


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _close(got: torch.Tensor, want: list[list[float]]) -> None:
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-6)


def _table_offsets(grid=GRID) -> torch.Tensor:
    offsets, _ = offset_tables(grid, torch.device("cpu"))
    assert [tuple(o) for o in offsets.tolist()] == _offsets(grid)
    return offsets.double()


def test_mlp_prior_matches_a_loop():
    hm, dh = 3, 4
    w1, b1 = _randn(hm * dh, 2, seed=0), _randn(hm * dh, seed=1)
    w, b = _randn(hm, dh, seed=2), _randn(hm, seed=3)
    got = mlp_prior(_table_offsets(), partial(F.linear, weight=w1, bias=b1), w, b)
    W1, B1, W, B = w1.tolist(), b1.tolist(), w.tolist(), b.tolist()
    want = [[sum(W[h][j] * max(0.0, W1[h * dh + j][0] * dx + W1[h * dh + j][1] * dy
                                + B1[h * dh + j]) for j in range(dh)) + B[h]
             for dx, dy in _offsets()] for h in range(hm)]
    _close(got, want)


def test_gaussian_prior_matches_a_loop():
    p = _randn(2, 3, seed=4)
    got = gaussian_prior(_table_offsets(), p)
    want = [[1.0 + a * math.exp(-0.5 * (dx / math.exp(lx)) ** 2 - 0.5 * (dy / math.exp(ly)) ** 2)
             for dx, dy in _offsets()] for a, lx, ly in p.tolist()]
    _close(got, want)


def test_axial_prior_matches_a_loop():
    p = _randn(3, 3, seed=5)
    got = axial_prior(_table_offsets(), p)
    want = [[1.0 + r * math.exp(-0.5 * (dy / math.exp(lw)) ** 2)
             + c * math.exp(-0.5 * (dx / math.exp(lw)) ** 2)
             for dx, dy in _offsets()] for r, c, lw in p.tolist()]
    _close(got, want)


@pytest.mark.parametrize("grid", [(2, 2), GRID, (6, 5)])
def test_rpb_prior_matches_a_loop_and_clamps_to_the_edge(grid):
    s = 3  # the table's grid; a 6x5 input reaches beyond it
    table = _randn(2, 2 * s - 1, 2 * s - 1, seed=6)
    got = rpb_prior(_table_offsets(grid), table, s)
    T = table.tolist()

    def clamp(v: int) -> int:
        return min(max(v + s - 1, 0), 2 * s - 2)

    want = [[T[h][clamp(dy)][clamp(dx)] for dx, dy in _offsets(grid)] for h in range(2)]
    _close(got, want)


def test_decay_prior_matches_a_loop():
    slopes = _randn(3, seed=7)
    got = decay_prior(_table_offsets(), slopes)
    want = [[-lam * math.sqrt(dx * dx + dy * dy) for dx, dy in _offsets()]
            for lam in slopes.tolist()]
    _close(got, want)


@pytest.mark.parametrize("num_prefix", [0, 1])
def test_gather_pairs_matches_a_loop(num_prefix):
    gh, gw = GRID
    table = _randn(2, (2 * gh - 1) * (2 * gw - 1), seed=8)
    got = gather_pairs(table, GRID, num_prefix, identity=7.0)
    n, T = gh * gw, table.tolist()
    want = [[[7.0] * (num_prefix + n) for _ in range(num_prefix + n)] for _ in range(2)]
    for h in range(2):
        for i in range(n):
            for j in range(n):
                dy, dx = j // gw - i // gw, j % gw - i % gw
                k = (dy + gh - 1) * (2 * gw - 1) + (dx + gw - 1)
                want[h][num_prefix + i][num_prefix + j] = T[h][k]
    _close(got, want)
    assert gather_pairs(None, GRID, num_prefix, identity=1.0) is None


def test_offset_values_put_each_family_on_its_heads_and_the_identity_elsewhere():
    types = ("rpb", "mlp", "none", "gaussian", "decay", "mlp", "axial")
    off = _table_offsets()
    w1 = _randn(2 * 4, 2, seed=9)
    params = {"mlp": (partial(F.linear, weight=w1, bias=_randn(8, seed=10)),
                      _randn(2, 4, seed=11), _randn(2, seed=12)),
              "gaussian": (_randn(1, 3, seed=13),), "axial": (_randn(1, 3, seed=14),),
              "rpb": (_randn(1, 5, 5, seed=15), 3), "decay": (_randn(1, seed=16),)}
    mult_order, add_order = head_order(types)
    mult, bias = offset_values_of(params, off, mult_order=mult_order, add_order=add_order)
    values = {f: FORMULAS_OF[f](off, *params[f]) for f in FAMILIES}
    seen = {f: 0 for f in FAMILIES}
    for h, t in enumerate(types):
        m_want, b_want = torch.ones(off.shape[0]), torch.zeros(off.shape[0])
        if t != "none":
            row = values[t][seen[t]]
            seen[t] += 1
            if t in ("rpb", "decay"):
                b_want = row
            else:
                m_want = row
        torch.testing.assert_close(mult[h], m_want.double(), rtol=0, atol=0)
        torch.testing.assert_close(bias[h], b_want.double(), rtol=0, atol=0)
    only_mult = offset_values_of({"gaussian": params["gaussian"]}, off,
                                 mult_order=head_order(("gaussian",))[0],
                                 add_order=head_order(("gaussian",))[1])
    assert only_mult[1] is None and only_mult[0].shape == (1, off.shape[0])



@pytest.mark.parametrize("num_prefix", [0, 1])
def test_supernet_priors_equal_the_model_prior_they_export(num_prefix):
    """One head-slot layout, a subnet's head types and head width: the supernet's prior and a
    `SpatialPrior` loaded with the exported slices give the same tables (a smaller input grid
    than the architecture's, so rpb is cropped and clamped)."""
    slots, dm, s_max = 4, 6, 5
    sup = SuperPriors(FAMILIES, slots=slots, head_dim=dm, grid_size=s_max).double()
    with torch.no_grad():
        for i, p in enumerate(sup.parameters()):
            p.copy_(_randn(*p.shape, seed=20 + i))
    types, d, arch_grid = ("decay", "mlp", "rpb", "axial"), 4, 4
    model = SpatialPrior(types, head_dim=d, grid_size=arch_grid).double()
    missing, extra = model.load_state_dict(sup.export(types, d, arch_grid), strict=True)
    assert not missing and not extra
    grid = (3, 2)
    got = sup(types, d, arch_grid, grid, num_prefix, torch.float64)
    want = model(grid, num_prefix)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12)
