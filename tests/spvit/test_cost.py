"""spvit.cost: exact parameters against built models, GMACs against torch's FlopCounterMode,
DeiT references against timm's published figures. (Its speed: bench/core_timing.py.)"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from pathlib import Path

import pytest
import timm
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from search_spaces import SearchSpace
from spvit import ArchSpec, BlockSpec, create_model
from spvit.cost import PARTS, Cost, estimate

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ("digits", "cifar", "imagenet")

# Every searchable field at once, on tiny models: conv stem, CLS joining at block 1 (after or
# before a pool), free pooling from block 0 with width factor 1 or 2, per-head priors, sharing,
# every positional encoding, conv positional layer, with and without qkv bias.
KITCHEN = """
name: kitchen
arch: {img_size: 32, in_chans: 3, num_classes: 7, stem: conv, head: cls, cls_block: 1}
dimensions:
  depth: [3, 4]
  patch_size: [4, 8]
  embed_dim: [16, 32]
  mlp_ratio: [1.5, 3.0]
  pool_width_factor: [1, 2]
  pos_embed: [learned, sincos, none]
  conv_pos: [false, true]
  qkv_bias: [false, true]
  heads: [1, 2, 4]
  prior: {types: [none, mlp, gaussian, axial, rpb], per_head: true}
  pool: {free: true, max_pools: 2, from_block: 0}
  share: [false, true]
training: {dataset: digits, epochs: 1}
"""


def spaces() -> dict[str, SearchSpace]:
    out = {name: SearchSpace.load(ROOT / "search_spaces" / f"{name}.yaml") for name in SHIPPED}
    out["kitchen"] = SearchSpace.from_yaml(KITCHEN, source="kitchen")
    return out


def meta_model(spec: ArchSpec) -> torch.nn.Module:
    with torch.device("meta"):
        model = create_model(spec.replace(init="trunc_normal"))
    return model.eval()


def counted_macs(spec: ArchSpec) -> dict[str, int]:
    """MACs per cost part from FlopCounterMode's per-module counts (FLOPs / 2), math attention."""
    model = meta_model(spec)
    x = torch.empty(1, spec.in_chans, spec.img_size, spec.img_size, device="meta")
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        model(x)
    per_module = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    top = type(model).__name__
    parts: dict[str, int] = defaultdict(int)
    rules = [
        ("stem", rf"^{top}\.patch_embed$"),
        ("pool", r"\.blocks\.\d+\.pool$"),
        ("conv_pos", r"\.blocks\.\d+\.conv_pos$"),
        ("prior", r"\.attn\.prior$"),
        ("attn_proj", r"\.attn\.(qkv|v|proj)$"),
        ("mlp", r"\.blocks\.\d+\.mlp$"),
        ("head", rf"^{top}\.head$"),
    ]
    for name, flops in per_module.items():
        for part, pattern in rules:
            if re.search(pattern, name):
                parts[part] += flops
        if re.search(r"\.blocks\.\d+\.attn$", name):  # the attention's own Q Kᵀ and A V
            children = sum(v for k, v in per_module.items()
                           if k.startswith(name + ".") and k.count(".") == name.count(".") + 1)
            parts["attn_matmul"] += flops - children
    parts["total"] = per_module[top]
    assert parts["total"] == counter.get_total_flops()
    return {k: v // 2 for k, v in parts.items()}


@pytest.fixture(scope="module")
def all_spaces() -> dict[str, SearchSpace]:
    return spaces()


# ---------------------------------------------------------------------------- parameters
@pytest.mark.parametrize("name", SHIPPED + ("kitchen",))
def test_params_equal_the_built_model_on_50_samples(all_spaces, name):
    space = all_spaces[name]
    rng = random.Random(11)
    for _ in range(50):
        spec = space.sample(rng)
        model = meta_model(spec)
        assert estimate(spec).params == sum(p.numel() for p in model.parameters()), spec.to_flat()


def test_params_equal_the_registered_models():
    for name in ("spvit_test", "spvit_s"):
        with torch.device("meta"):
            model = create_model(name)
        assert estimate(model.spec).params == sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------- GMACs
def _flop_samples(all_spaces) -> list[ArchSpec]:
    picks = {"digits": 7, "cifar": 5, "imagenet": 4, "kitchen": 8}
    out = []
    for name, n in picks.items():
        rng = random.Random(5)
        out += [all_spaces[name].sample(rng) for _ in range(n)]
    with torch.device("meta"):
        out.append(create_model("spvit_test").spec)
    return out


def test_flop_samples_cover_every_feature(all_spaces):
    specs = _flop_samples(all_spaces)
    blocks = [b for s in specs for b in s.blocks]
    assert len(specs) >= 20
    assert any(b.pool for b in blocks) and any(b.share for b in blocks)
    assert {p for b in blocks for p in b.head_priors} == {"none", "mlp", "gaussian", "axial",
                                                         "rpb", "decay"}
    assert any(s.head == "cls" and s.cls_block > 0 for s in specs)  # CLS joining late
    assert any(s.head == "avg" for s in specs)
    assert any(s.stem == "conv" for s in specs) and any(s.conv_pos for s in specs)
    assert any(s.pool_width_factor == 2 and s.num_pools for s in specs)
    # a pool that carries the class token and widens it (TokenPool.cls_proj)
    assert any(s.head == "cls" and s.pool_width_factor > 1 and
               any(b.pool and 0 < s.cls_block < i for i, b in enumerate(s.blocks))
               for s in specs)


def test_gflops_match_flop_counter_within_one_percent(all_spaces):
    for spec in _flop_samples(all_spaces):
        cost = estimate(spec)
        counted = counted_macs(spec)
        assert abs(cost.gflops * 1e9 - counted["total"]) <= 0.01 * counted["total"]
        # both count the same operations, so each part agrees exactly
        mine = {p.name: p.macs for p in cost.parts}
        for part in PARTS:
            assert mine.get(part, 0) == counted.get(part, 0), (part, spec.to_flat())
        assert cost.macs == counted["total"]


def test_sharing_saves_qk_projections_and_logits():
    """Plain reference: a shared block drops 2 N C^2 (Q, K projections) + N^2 C (Q Kᵀ) MACs
    and 2 C^2 + 2 C parameters (Q, K weights and biases); the prior it no longer has goes too."""
    blocks = (BlockSpec(heads=2, prior="mlp"), BlockSpec(heads=2))
    spec = ArchSpec(blocks=blocks, img_size=32, patch_size=4, embed_dim=16, head="avg",
                    num_classes=10)
    shared = spec.replace(blocks=(blocks[0], BlockSpec(heads=2, share=True)))
    n, c = 64, 16
    a, b = estimate(spec), estimate(shared)
    assert a.macs - b.macs == 2 * n * c * c + n * n * c
    assert a.params - b.params == 2 * c * c + 2 * c


def test_pooling_cost_by_hand():
    """Plain reference: 8x8 grid, width 16, pool with factor 2 -> 4x4 grid at width 32."""
    spec = ArchSpec(blocks=(BlockSpec(heads=1), BlockSpec(heads=2, pool=True)), img_size=16,
                    patch_size=2, in_chans=1, num_classes=10, embed_dim=16, mlp_ratio=2.0,
                    head="avg", pool_width_factor=2, pos_embed="none")
    stem = 8 * 8 * 16 * 1 * 2 * 2
    block0 = 4 * 64 * 16 * 16 + 2 * 64 * 64 * 16 + 2 * 64 * 16 * 32
    pool = 4 * 4 * 32 * 9
    block1 = 4 * 16 * 32 * 32 + 2 * 16 * 16 * 32 + 2 * 16 * 32 * 64
    head = 32 * 10
    assert estimate(spec).macs == stem + block0 + pool + block1 + head
    params = ((16 * 4 + 16) + 4 * 16 + (4 * 16 * 16 + 4 * 16) + (2 * 16 * 32 + 32 + 16)
              + (32 * 9 + 32) + 4 * 32 + (4 * 32 * 32 + 4 * 32) + (2 * 32 * 64 + 64 + 32)
              + 2 * 32 + (32 * 10 + 10))
    assert estimate(spec).params == params


# ---------------------------------------------------------------------------- references
@pytest.mark.parametrize("name, timm_name, params_m, gmacs", [
    ("deit_tiny", "deit_tiny_patch16_224", 5.72, 1.26),
    ("deit_small", "deit_small_patch16_224", 22.05, 4.61),
    ("deit_base", "deit_base_patch16_224", 86.57, 17.58),
])
def test_deit_references_match_timm(name, timm_name, params_m, gmacs):
    spec = ArchSpec.load(ROOT / "search_spaces" / "archs" / f"{name}.yaml")
    cost = estimate(spec)
    assert abs(cost.params / 1e6 - params_m) <= 0.01 * params_m
    assert abs(cost.gflops - gmacs) <= 0.01 * gmacs
    # and timm's own model, built without weights, agrees exactly
    with torch.device("meta"):
        reference = timm.create_model(timm_name, pretrained=False)
    assert cost.params == sum(p.numel() for p in reference.parameters())
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        reference.eval()(torch.empty(1, 3, 224, 224, device="meta"))
    assert cost.macs == counter.get_total_flops() // 2


def test_cost_is_frozen_and_serialises():
    cost = estimate(ArchSpec.load(ROOT / "search_spaces" / "archs" / "deit_tiny.yaml"))
    with pytest.raises(AttributeError):
        cost.params = 1
    d = cost.to_dict()
    assert d["params"] == cost.params and d["macs"] == cost.macs
    assert sum(p["params"] for p in d["parts"].values()) == cost.params
    assert Cost(params=10, gflops=0.5).macs == 500_000_000

