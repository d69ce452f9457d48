"""Initialisation schemes: timm defaults, mimetic products, impulse maps on the positional
encoding (with pooling and sharing), the Q/K bound and recorded attention mass over the shipped
spaces, independence from DropPath, the spec's positional encoding under every init, and short
training runs on digits."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

import spvit
from search_spaces import SearchSpace
from spvit import ArchSpec, BlockSpec
from spvit.arch import INIT_SCHEMES
from spvit.attention import Attention
from spvit.init import (
    IMPULSE_MASS,
    QK_NORM_BOUND,
    attention_mass,
    attention_mass_metrics,
    impulse_offsets,
    init_trunc_normal,
    pseudo_inputs,
)
from spvit.layers import sincos_2d
from spvit.model import reset_default_parameters

SPACES = Path(__file__).resolve().parents[2] / "search_spaces"

torch.set_num_threads(1)


def _digits_spec(init: str, *, heads=2, depth=2, dim=32, blocks=None, **kw) -> ArchSpec:
    blocks = blocks or tuple(BlockSpec(heads=heads) for _ in range(depth))
    args = dict(blocks=blocks, img_size=16, patch_size=2, in_chans=1, num_classes=10,
                embed_dim=dim, mlp_ratio=2.0, head="avg", init=init, pos_embed="learned_sincos")
    args.update(kw)
    return ArchSpec(**args)


def _maps_on_pe(model):
    """Plain recomputation of each own-attention block's maps on its pseudo-input."""
    out = {}
    for i, item in enumerate(pseudo_inputs(model)):
        if item is None:
            continue
        x, grid = item
        blk = model.blocks[i]
        attn = blk.attn
        xn = F.layer_norm(x, (x.shape[-1],), blk.norm1.weight, blk.norm1.bias, blk.norm1.eps)
        C, d = xn.shape[-1], attn.head_dim
        q = xn @ attn.qkv.weight[:C].t() + attn.qkv.bias[:C]
        k = xn @ attn.qkv.weight[C:2 * C].t() + attn.qkv.bias[C:2 * C]
        maps = []
        for h in range(attn.num_heads):
            sl = slice(h * d, (h + 1) * d)
            maps.append((q[:, sl] @ k[:, sl].t() / math.sqrt(d)).softmax(-1))
        out[i] = (torch.stack(maps), grid, attn.num_heads)
    return out


def _peak_fraction(maps, grid, offsets, kernel):
    """Per head, the fraction of interior tokens whose map peaks exactly at the head's offset."""
    side = grid[0]
    m = kernel // 2
    fractions = []
    for h, (dy, dx) in enumerate(offsets):
        hits = total = 0
        for r in range(m, side - m):
            for c in range(m, side - m):
                hits += int(maps[h, r * side + c].argmax() == (r + dy) * side + (c + dx))
                total += 1
        fractions.append(hits / total)
    return fractions


def test_impulse_offsets_are_deterministic_by_head():
    assert impulse_offsets(3, 5) == [(0, 0), (-1, 0), (0, 1), (0, -1), (1, 0)]
    assert impulse_offsets(3, 11)[9:] == [(0, 0), (-1, 0)]  # cycles through the 9 positions
    three = impulse_offsets(3, 9)
    assert set(three) == {(a, b) for a in (-1, 0, 1) for b in (-1, 0, 1)}


def test_impulse5_covers_the_5x5_kernel_centre_first_then_by_distance():
    five = impulse_offsets(5, 25)
    assert set(five) == {(a, b) for a in range(-2, 3) for b in range(-2, 3)}  # all 25
    dist = [a * a + b * b for a, b in five]
    assert five[0] == (0, 0) and dist == sorted(dist)
    assert five[:9] == impulse_offsets(3, 9)  # its 3x3 core is impulse3's order
    assert impulse_offsets(5, 27)[25:] == [(0, 0), (-1, 0)]
    # heads 10-25 reach the outer ring: distance 2 first, the corners last
    assert five[9:13] == [(-2, 0), (0, 2), (0, -2), (2, 0)]
    assert set(five[21:]) == {(-2, -2), (-2, 2), (2, -2), (2, 2)}


@pytest.mark.parametrize("kernel", [3, 5])
def test_impulse_maps_peak_at_offsets_with_pool_and_share(kernel):
    blocks = (BlockSpec(heads=2, prior="mlp"), BlockSpec(heads=2, share=True),
              BlockSpec(heads=2, prior="rpb"), BlockSpec(heads=4, pool=True),
              BlockSpec(heads=4, share=True))
    spec = _digits_spec(f"impulse{kernel}", blocks=blocks, img_size=24, conv_pos=True)
    model = spvit.create_model(spec, seed=0)
    maps = _maps_on_pe(model)
    assert sorted(maps) == [0, 2, 3]  # shared blocks have no Q/K of their own
    assert spec.block_grids() == (12, 12, 12, 6, 6)
    for i, (m, grid, heads) in maps.items():
        fractions = _peak_fraction(m, grid, impulse_offsets(kernel, heads), kernel)
        # (nearly) all: a head narrower than the encoding's rank only approximates a shift
        assert min(fractions) >= 0.9 and np.mean(fractions) >= 0.95, (i, fractions)
    # Q/K stay at a moderate scale (what keeps content from swamping the maps).
    w = model.blocks[0].attn.qkv.weight[:32]
    assert w.norm() < 20
    assert sorted(attention_mass(model)) == [0, 2, 3]  # recorded for every own-attention block


def _space_combinations(space: SearchSpace):
    """Specs that hold every (width, heads, grid, pool) one block of `space` can have: per
    embed_dim, patch size and head count, blocks `plain, [pool, plain] * P` with P the most
    pools a schedule has, so each grid along the way is seen with and without a pool."""
    fixed = {k: v for k, v in space.fixed.items() if k in ArchSpec.__dataclass_fields__}
    pools = [max(len(s) for s in space.pool.schedules)]  # fewer pools: a prefix of these
    for dim in space.values_of("embed_dim"):
        for patch in space.values_of("patch_size"):
            for heads in space.heads:
                for n in pools:
                    blocks = [BlockSpec(heads=heads)]
                    blocks += [BlockSpec(heads=heads, pool=p) for _ in range(n)
                               for p in (True, False)]
                    yield ArchSpec(blocks=tuple(blocks), **{**fixed, "embed_dim": dim,
                                   "patch_size": patch, "mlp_ratio": 2.0, "init": "impulse3"})


def test_qk_norm_bound_and_recorded_mass_over_the_shipped_spaces():
    """Every block shape the shipped spaces can give an impulse candidate: no head's W_q / W_k
    exceeds QK_NORM_BOUND, the achieved mass is recorded per head, and one warning names the
    heads that fall short. impulse5 gives the same offsets as impulse3 for <= 9 heads (all the
    shipped spaces offer), so impulse3 covers both."""
    checked = set()
    for name in ("digits", "cifar", "imagenet"):
        space = SearchSpace.load(SPACES / f"{name}.yaml", check_feasible=False)
        inits = space.values_of("init")
        if not any(i.startswith("impulse") for i in inits):
            assert name == "imagenet"  # head: cls; it offers no impulse candidate
            continue
        assert max(space.heads) <= 9
        for pe in space.values_of("pos_embed"):
            assert pe == "learned_sincos"  # one encoding for every init arm
        for spec in _space_combinations(space):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                model = spvit.create_model(spec, seed=0)
            masses = attention_mass(model)
            assert sorted(masses) == list(range(spec.depth))
            short = 0
            for i, blk in enumerate(model.blocks):
                attn = blk.attn
                C, d, H = attn.qkv.in_features, attn.head_dim, attn.num_heads
                q = attn.qkv.weight[:C].view(H, d, C).norm(dim=(1, 2))
                k = attn.qkv.weight[C:2 * C].view(H, d, C).norm(dim=(1, 2))
                assert q.max() <= QK_NORM_BOUND * (1 + 1e-4), (spec.to_flat(), i, q)
                assert k.max() <= QK_NORM_BOUND * (1 + 1e-4), (spec.to_flat(), i, k)
                assert len(masses[i]) == H and all(0 < m <= 1 for m in masses[i])
                short += sum(m < IMPULSE_MASS - 0.01 for m in masses[i])
                checked.add((C, H, spec.block_grids()[i], spec.blocks[i].pool))
            impulse_warnings = [w for w in caught if "impulse3 init" in str(w.message)]
            assert len(impulse_warnings) == int(short > 0)
            metrics = attention_mass_metrics(model)
            assert metrics["init_heads_short"] == short
    # digits: 3 widths x 3 heads x grids 8/4/2; cifar: 3 widths x 4 heads x grids 16/8/4/2
    assert len(checked) > 60


def test_impulse_mass_reaches_the_target_on_wide_heads_and_is_recomputable():
    model = spvit.create_model(_digits_spec("impulse3", heads=2, dim=48), seed=0)
    maps = _maps_on_pe(model)
    for i, (m, grid, heads) in maps.items():
        m = m.detach()
        for h, off in enumerate(impulse_offsets(3, heads)):
            # independent recomputation of the mass on the offset (interior-offset rows only)
            side = grid[0]
            vals = []
            for r in range(side):
                for c in range(side):
                    if 0 <= r + off[0] < side and 0 <= c + off[1] < side:
                        vals.append(float(m[h, r * side + c, (r + off[0]) * side + c + off[1]]))
            assert abs(np.mean(vals) - attention_mass(model)[i][h]) < 2e-3
            assert abs(np.mean(vals) - IMPULSE_MASS) < 5e-3
    assert attention_mass(spvit.create_model(_digits_spec("mimetic"), seed=0)) is None


@pytest.mark.parametrize("init", ["impulse3", "impulse5_mimetic", "mimetic"])
def test_init_does_not_depend_on_drop_path_and_restores_the_mode(init):
    a = spvit.create_model(_digits_spec(init, depth=3, drop_path_rate=0.0), seed=1)
    b = spvit.create_model(_digits_spec(init, depth=3, drop_path_rate=0.5), seed=1)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    assert all(m.training for m in b.modules())  # built in training mode, left in it
    b.eval()
    b.blocks[1].train()  # a mixed state is restored module by module
    b.init_weights(seed=1)
    assert [m.training for m in b.modules()] == [
        m in set(b.blocks[1].modules()) for m in b.modules()]
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


@pytest.mark.parametrize("pos_embed", ["learned", "learned_sincos", "sincos", "none"])
def test_the_encoding_of_a_built_model_is_the_specs_for_every_init(pos_embed):
    table = sincos_2d((8, 8), 32)
    seen = []
    for init in INIT_SCHEMES:
        if init.startswith("impulse") and pos_embed not in ("learned_sincos", "sincos"):
            with pytest.raises(spvit.ConfigError, match="needs pos_embed in"):
                _digits_spec(init, pos_embed=pos_embed)
            continue
        model = spvit.create_model(_digits_spec(init, pos_embed=pos_embed), seed=2)
        if pos_embed == "none":
            assert model.pos_embed is None and not hasattr(model, "pos_embed_fixed")
            continue
        if pos_embed == "sincos":
            assert model.pos_embed is None
            pe = model.pos_embed_fixed[0]
        else:
            pe = model.pos_embed[0].detach()
        if pos_embed == "learned":
            assert abs(pe.std().item() - 0.02) < 0.004
        else:
            torch.testing.assert_close(pe, table)
        seen.append(pe)
    for pe in seen[1:]:  # same seed: no init replaces the encoding
        assert torch.equal(pe, seen[0])


def test_impulse_with_mimetic_v_proj():
    seed = 4
    spec = _digits_spec("impulse3_mimetic", heads=2, depth=2, dim=16)
    model = spvit.create_model(spec, seed=seed)
    plain = spvit.create_model(spec.replace(init="impulse3"), seed=seed)
    C = 16
    # block 0 sees the same pseudo-input: same Q/K as impulse3; V/proj are mimetic
    torch.testing.assert_close(model.blocks[0].attn.qkv.weight[:2 * C],
                               plain.blocks[0].attn.qkv.weight[:2 * C])
    # The seeded build draws trunc_normal first, then the mimetic V/proj target from the same
    # generator: replay the trunc_normal draws on a scratch model to reach that draw.
    g = torch.Generator().manual_seed(seed)
    scratch = spvit.create_model(spec.replace(init="trunc_normal"))
    reset_default_parameters(scratch, g)
    init_trunc_normal(scratch, generator=g)
    z = torch.randn(C, C, generator=g, dtype=torch.float64) / math.sqrt(C)
    attn = model.blocks[0].attn
    wv = attn.qkv.weight[2 * C:].double()
    torch.testing.assert_close(wv.t() @ attn.proj.weight.double().t(),
                               0.4 * z - 0.4 * torch.eye(C, dtype=torch.float64),
                               rtol=0, atol=1e-5)
    assert not torch.equal(plain.blocks[0].attn.proj.weight, attn.proj.weight)
    assert attention_mass(model) is not None


def test_impulse_maps_hold_on_real_images():
    digits = load_digits()
    x = F.interpolate(torch.tensor(digits.images[:64], dtype=torch.float32)[:, None] / 16,
                      size=(16, 16), mode="bilinear", align_corners=False)
    model = spvit.create_model(_digits_spec("impulse3", heads=2, dim=32), seed=0).eval()
    model.blocks[0].keep_attn = True  # return the maps (no other effect)
    probs = {}
    model.blocks[0].attn.register_forward_hook(lambda m, a, o: probs.__setitem__(0, o[1]))
    model(x)
    p = probs[0]  # (B, H, 64, 64)
    hits = []
    for h, (dy, dx) in enumerate(impulse_offsets(3, 2)):
        for r in range(1, 7):
            for c in range(1, 7):
                hits.append((p[:, h, r * 8 + c].argmax(-1) == (r + dy) * 8 + c + dx).float())
    assert torch.cat(hits).mean() > 0.8


def test_mimetic_products_match_formula():
    spec = _digits_spec("mimetic", heads=2, depth=1, dim=16)
    gen_seed = 5
    model = spvit.create_model(spec.replace(init="trunc_normal"))
    from spvit.init import init_mimetic

    init_mimetic(model, generator=torch.Generator().manual_seed(gen_seed))
    attn: Attention = model.blocks[0].attn
    C, d = 16, 8
    g = torch.Generator().manual_seed(gen_seed)
    for h in range(2):  # independent reference: same draws, plain SVD truncation
        z = torch.randn(C, C, generator=g, dtype=torch.float64) / math.sqrt(C)
        target = 0.7 * z + 0.7 * torch.eye(C, dtype=torch.float64)
        u, s, vh = torch.linalg.svd(target)
        best = (u[:, :d] * s[:d]) @ vh[:d]
        wq = attn.qkv.weight[h * d:(h + 1) * d].double()
        wk = attn.qkv.weight[C + h * d:C + (h + 1) * d].double()
        torch.testing.assert_close(wq.t() @ wk, best, rtol=0, atol=1e-5)
    z = torch.randn(C, C, generator=g, dtype=torch.float64) / math.sqrt(C)
    wv = attn.qkv.weight[2 * C:].double()
    torch.testing.assert_close(wv.t() @ attn.proj.weight.double().t(),
                               0.4 * z - 0.4 * torch.eye(C, dtype=torch.float64),
                               rtol=0, atol=1e-5)


def test_trunc_normal_defaults():
    model = spvit.create_model(ArchSpec.uniform(depth=2, heads=4, embed_dim=64, prior="mlp",
                                                img_size=32, patch_size=4), seed=0)
    w = model.blocks[0].attn.qkv.weight
    assert abs(w.std().item() - 0.02) < 0.003 and w.abs().max() < 0.15
    assert torch.all(model.blocks[0].attn.qkv.bias == 0)
    assert model.cls_token.abs().max() < 1e-4
    prior = model.blocks[0].attn.prior
    assert torch.all(prior.mlp_weight == 0) and torch.all(prior.mlp_bias == 1)


def _train(model, data, *, epochs: int, seed: int) -> float:
    xtr, ytr, xva, yva = data
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(xtr), generator=g)
        for i in range(0, len(order), 64):
            idx = order[i:i + 64]
            loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        return (model(xva).argmax(-1) == yva).float().mean().item()


EPOCHS = 8


def test_impulse_init_trains_on_digits():
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16
    x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(digits.target)
    perm = torch.from_numpy(np.random.default_rng(0).permutation(len(x)))
    tr, va = perm[:1400], perm[1400:]
    data = (x[tr], y[tr], x[va], y[va])
    acc = {}
    for init in ("trunc_normal", "impulse3"):
        model = spvit.create_model(_digits_spec(init, heads=2, depth=2, dim=32), seed=0)
        acc[init] = _train(model, data, epochs=EPOCHS, seed=0)
    assert acc["impulse3"] > 0.5, acc  # chance is 0.1
    assert acc["impulse3"] >= acc["trunc_normal"] - 0.05, acc


# One epoch of the digits space's recipe, in-process DeepSpeed (one worker), with no warm-up and
# batch 16 (90 steps; with the recipe's one-epoch warm-up and batch 64 the single epoch is 22
# steps of rising lr and every init stays at chance). Floors stated in docs/model.md.
ONE_EPOCH_ACC_FLOOR = 0.15  # chance 0.10; measured 0.178 (trunc_normal 0.161)
ONE_EPOCH_LOSS_CEIL = 2.29  # uniform prediction ln 10 = 2.303; measured 2.266


@pytest.mark.slow
def test_narrowest_impulse_candidate_trains_one_epoch_on_digits(tmp_path):
    from launch.trial import run_candidate

    space = SearchSpace.load(SPACES / "digits.yaml", check_feasible=False)
    fixed = {k: v for k, v in space.fixed.items() if k in ArchSpec.__dataclass_fields__}
    width, heads = min(space.values_of("embed_dim")), max(space.heads)  # head width 8
    spec = ArchSpec(blocks=(BlockSpec(heads=heads),) * min(space.values_of("depth")),
                    **{**fixed, "embed_dim": width, "mlp_ratio": 2.0, "init": "impulse3"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the narrow heads' mass warning
        out = run_candidate(spec, space.training.replace(epochs=1, warmup_epochs=0.0,
                                                         batch_size=16),
                            tmp_path / "trial", path="inprocess", resume=False)
    assert out["val_acc"] >= ONE_EPOCH_ACC_FLOOR, out
    assert out["val_loss"] <= ONE_EPOCH_LOSS_CEIL, out
