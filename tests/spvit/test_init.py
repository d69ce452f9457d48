"""Initialisation schemes: timm defaults, mimetic products, impulse maps on the positional
encoding (with pooling and sharing), and a short training run on digits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

import spvit
from spvit import ArchSpec, BlockSpec
from spvit.attention import Attention
from spvit.init import impulse_offsets, pseudo_inputs

torch.set_num_threads(1)


def _digits_spec(init: str, *, heads=2, depth=2, dim=32, blocks=None, **kw) -> ArchSpec:
    blocks = blocks or tuple(BlockSpec(heads=heads) for _ in range(depth))
    args = dict(blocks=blocks, img_size=16, patch_size=2, in_chans=1, num_classes=10,
                embed_dim=dim, mlp_ratio=2.0, head="avg", init=init, pos_embed="learned")
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
    five = impulse_offsets(5, 25)
    assert len(set(five)) == 25 and all(max(abs(a), abs(b)) <= 2 for a, b in five)
    assert five[:3] == [(0, 0), (-2, 0), (0, 2)]


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
