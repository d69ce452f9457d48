"""SP-SA attention against plain references, prior families, mixed heads, CLS identity, caching,
the fused path, and shared attention."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import spvit
from spvit.attention import Attention, SharedAttention, set_attention_backend
from spvit.priors import SpatialPrior, offset_tables

torch.set_num_threads(1)


# ---------------------------------------------------------------------- plain references
def _pairs(gh, gw):
    """(dx, dy) of every (query, key) pair, as Python lists, row-major tokens."""
    coords = [(r, c) for r in range(gh) for c in range(gw)]
    return [[(cj - ci, rj - ri) for (rj, cj) in coords] for (ri, ci) in coords]


def _ref_mlp(prior, gh, gw, head):
    """The release's formulation: the MLP evaluated on every one of the N^2 pairs."""
    hm = prior.mlp_heads.index(head)
    d = prior.head_dim
    w1 = prior.mlp_fc1.weight[hm * d:(hm + 1) * d]
    b1 = prior.mlp_fc1.bias[hm * d:(hm + 1) * d]
    pairs = torch.tensor(_pairs(gh, gw), dtype=w1.dtype)  # (N, N, 2) as (dx, dy)
    hidden = torch.relu(pairs @ w1.t() + b1)
    return hidden @ prior.mlp_weight[hm] + prior.mlp_bias[hm]


def _ref_gaussian(prior, gh, gw, head):
    a, lx, ly = prior.gaussian[prior.gaussian_heads.index(head)].tolist()
    out = torch.empty(gh * gw, gh * gw, dtype=torch.float64)
    for i, row in enumerate(_pairs(gh, gw)):
        for j, (dx, dy) in enumerate(row):
            sx, sy = math.exp(lx), math.exp(ly)
            out[i, j] = 1 + a * math.exp(-0.5 * ((dx / sx) ** 2 + (dy / sy) ** 2))
    return out


def _ref_axial(prior, gh, gw, head):
    r, c, lw = prior.axial[prior.axial_heads.index(head)].tolist()
    w = math.exp(lw)
    out = torch.empty(gh * gw, gh * gw, dtype=torch.float64)
    for i, row in enumerate(_pairs(gh, gw)):
        for j, (dx, dy) in enumerate(row):
            out[i, j] = 1 + r * math.exp(-0.5 * (dy / w) ** 2) + c * math.exp(-0.5 * (dx / w) ** 2)
    return out


def _ref_rpb(prior, gh, gw, head):
    table = prior.rpb_table[prior.rpb_heads.index(head)]
    s = prior.grid_size
    out = torch.empty(gh * gw, gh * gw, dtype=torch.float64)
    for i, row in enumerate(_pairs(gh, gw)):
        for j, (dx, dy) in enumerate(row):
            iy = min(max(dy + s - 1, 0), 2 * s - 2)
            ix = min(max(dx + s - 1, 0), 2 * s - 2)
            out[i, j] = table[iy, ix]
    return out


_REFS = {"mlp": _ref_mlp, "gaussian": _ref_gaussian, "axial": _ref_axial, "rpb": _ref_rpb}


def _reference_attention(attn: Attention, x, grid, num_prefix):
    """softmax((Q Kᵀ / sqrt(d)) * SP + B) V per head, priors from the plain references."""
    B, N, C = x.shape
    H, d = attn.num_heads, attn.head_dim
    q, k, v = (x @ attn.qkv.weight.t() + attn.qkv.bias).split(C, dim=-1)
    outs = []
    for h in range(H):
        sl = slice(h * d, (h + 1) * d)
        logits = q[..., sl] @ k[..., sl].transpose(-1, -2) / math.sqrt(d)  # (B, N, N)
        kind = attn.head_types[h]
        if kind != "none":
            table = _REFS[kind](attn.prior, grid[0], grid[1], h).to(x.dtype)
            full = torch.full((N, N), 1.0 if kind != "rpb" else 0.0, dtype=x.dtype)
            full[num_prefix:, num_prefix:] = table
            logits = logits + full if kind == "rpb" else logits * full
        outs.append(logits.softmax(-1) @ v[..., sl])
    return torch.cat(outs, -1) @ attn.proj.weight.t() + attn.proj.bias


def _randomise_priors(attn: Attention, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in attn.prior.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)


def _make(types, *, dim=24, grid_size=5, seed=0):
    torch.manual_seed(seed)
    attn = Attention(dim, len(types), head_types=tuple(types), grid_size=grid_size).double()
    if attn.prior is not None:
        _randomise_priors(attn, seed)
    return attn


# ---------------------------------------------------------------------- tests
def test_mlp_prior_matches_naive_all_pairs():
    attn = _make(["mlp"] * 3, dim=24)
    x = torch.randn(2, 25, 24, dtype=torch.float64)
    out, probs = attn(x, (5, 5), need_weights=True)
    ref = _reference_attention(attn, x, (5, 5), 0)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    assert probs.shape == (2, 3, 25, 25)


@pytest.mark.parametrize("kind", ["gaussian", "axial", "rpb"])
def test_each_prior_family_matches_reference(kind):
    attn = _make([kind] * 2, dim=16, grid_size=4, seed=1)
    x = torch.randn(2, 16, 16, dtype=torch.float64)
    out, _ = attn(x, (4, 4))
    torch.testing.assert_close(out, _reference_attention(attn, x, (4, 4), 0), rtol=0, atol=1e-5)


def test_mixed_head_types_with_class_token_identity():
    attn = _make(["mlp", "none", "gaussian", "rpb", "axial"], dim=40, grid_size=4, seed=2)
    x = torch.randn(3, 17, 40, dtype=torch.float64)  # class token + 4x4 grid
    out, _ = attn(x, (4, 4), 1)
    torch.testing.assert_close(out, _reference_attention(attn, x, (4, 4), 1), rtol=0, atol=1e-5)
    mult, bias = attn.prior((4, 4), 1)
    assert torch.all(mult[:, 0, :] == 1) and torch.all(mult[:, :, 0] == 1)
    assert torch.all(bias[:, 0, :] == 0) and torch.all(bias[:, :, 0] == 0)
    assert torch.all(mult[1] == 1) and torch.all(bias[[0, 1, 2, 4]] == 0)


def test_non_square_and_larger_grid_than_architecture():
    # rpb tables are sized for a 3x3 grid; a 4x5 grid at run time uses their edge entries.
    attn = _make(["rpb", "mlp"], dim=16, grid_size=3, seed=3)
    x = torch.randn(1, 20, 16, dtype=torch.float64)
    out, _ = attn(x, (4, 5))
    torch.testing.assert_close(out, _reference_attention(attn, x, (4, 5), 0), rtol=0, atol=1e-5)


def test_priors_start_as_identity():
    prior = SpatialPrior(("mlp", "gaussian", "axial", "rpb", "none"), head_dim=8, grid_size=4)
    mult, bias = prior((4, 4))
    torch.testing.assert_close(mult, torch.ones_like(mult))
    torch.testing.assert_close(bias, torch.zeros_like(bias))


def test_prior_parameter_count_formula():
    # spvit.cost mirrors this: 4*Hm*d + Hm + 3*Hg + 3*Ha + Hr*(2S-1)^2
    prior = SpatialPrior(("mlp", "mlp", "gaussian", "axial", "axial", "rpb"), head_dim=8,
                         grid_size=5)
    expected = 4 * 2 * 8 + 2 + 3 * 1 + 3 * 2 + 1 * 9 ** 2
    assert sum(p.numel() for p in prior.parameters()) == expected


def test_mlp_evaluated_once_per_unique_offset_and_tables_cached():
    attn = _make(["mlp"] * 2, dim=16, grid_size=6)
    seen = []
    attn.prior.mlp_fc1.register_forward_hook(lambda m, a, o: seen.append(a[0].shape[0]))
    x = torch.randn(4, 36, 16, dtype=torch.float64)
    attn(x, (6, 6))
    assert seen == [11 * 11]  # (2S-1)^2 offsets, not B * N^2 pairs
    assert offset_tables((6, 6), x.device)[1] is offset_tables((6, 6), x.device)[1]
    offsets, index = offset_tables((2, 3), torch.device("cpu"))
    # token 0 = (row 0, col 0), token 5 = (row 1, col 2): offset (dx, dy) = (2, 1)
    assert offsets[index[0 * 6 + 5]].tolist() == [2, 1]


def test_fused_path_when_no_multiplicative_prior(monkeypatch):
    calls = []
    real = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(kwargs.get("attn_mask") is not None)
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    cases = ((["none"] * 2, [False]), (["rpb", "none"], [True]), (["mlp", "none"], []))
    for types, expect in cases:
        calls.clear()
        attn = _make(types, dim=16, grid_size=3)
        x = torch.randn(2, 9, 16, dtype=torch.float64)
        fused, _ = attn(x, (3, 3))
        assert calls == expect
        eager, probs = attn(x, (3, 3), need_weights=True)  # the eager path, maps returned
        torch.testing.assert_close(fused, eager)
        torch.testing.assert_close(probs.sum(-1), torch.ones(2, 2, 9, dtype=torch.float64))


def test_shared_attention_reuses_maps_and_saves_params_and_flops(monkeypatch):
    from torch.utils.flop_counter import FlopCounterMode

    def math_sdpa(q, k, v, attn_mask=None):
        # The flop counter does not see the CPU fused kernel; count the same math plainly.
        logits = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        return (logits if attn_mask is None else logits + attn_mask).softmax(-1) @ v

    monkeypatch.setattr(F, "scaled_dot_product_attention", math_sdpa)

    blocks = [{"heads": 2, "prior": "mlp"}, {"heads": 2, "share": True},
              {"heads": 2, "share": True}, {"heads": 2, "prior": "rpb"}]
    spec = spvit.ArchSpec(blocks=blocks, img_size=16, patch_size=4, embed_dim=16, head="avg",
                          num_classes=3)
    model = spvit.create_model(spec, seed=0)
    maps = {}
    for i, blk in enumerate(model.blocks):
        if isinstance(blk.attn, SharedAttention):
            blk.attn.register_forward_hook(lambda m, a, o, i=i: maps.__setitem__(i, a[1]))
            assert not hasattr(blk.attn, "qkv") and not hasattr(blk.attn, "prior")
        else:
            blk.attn.register_forward_hook(lambda m, a, o, i=i: maps.__setitem__(i, o[1]))
    model(torch.randn(2, 1 * 3, 16, 16))
    assert maps[0] is not None and maps[3] is None  # block 3 is followed by no share
    torch.testing.assert_close(maps[1], maps[0], rtol=0, atol=0)
    torch.testing.assert_close(maps[2], maps[0], rtol=0, atol=0)

    unshared = spvit.create_model(spec.replace(blocks=[dict(b, share=False) for b in blocks]))
    C = 16
    saved = spvit.count_parameters(unshared) - spvit.count_parameters(model)
    assert saved == 2 * (2 * C * C + 2 * C)  # two blocks without Q/K weights and biases

    def flops(m):
        set_attention_backend(m, "eager")  # the counter does not see the CPU kernel either
        with FlopCounterMode(display=False) as counter:
            m(torch.randn(2, 3, 16, 16))
        return counter.get_total_flops()

    N, B = 16, 2
    qk_flops = 2 * B * N * N * C  # Q Kᵀ of one block
    proj_flops = 2 * B * N * C * 2 * C  # the Q and K projections of one block
    assert flops(unshared) - flops(model) == 2 * (qk_flops + proj_flops)


def test_attention_rejects_bad_head_split():
    with pytest.raises(ValueError, match="not divisible"):
        Attention(10, 3)
    with pytest.raises(ValueError, match="head_types has 1 entries"):
        Attention(8, 2, head_types=("mlp",))
