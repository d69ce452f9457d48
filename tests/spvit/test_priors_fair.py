"""The locality priors: the additive `decay` family against a plain reference, what the
multiplicative `gaussian` family does with negative logits, parameter counts in the model, the
cost model and the docs' formula, and the release-faithful residual scaling / conv-pos placement."""

from __future__ import annotations

import math

import pytest
import torch

import spvit
from spvit import ArchSpec, BlockSpec
from spvit.attention import Attention
from spvit.cost import estimate
from spvit.priors import ADDITIVE, MULTIPLICATIVE, SpatialPrior

torch.set_num_threads(1)


def _reference_bias(slopes: torch.Tensor, side: int) -> torch.Tensor:
    """Plain loops: B[h, i, j] = -slope_h * |pos_j - pos_i| on a side x side grid."""
    n = side * side
    out = torch.zeros(len(slopes), n, n)
    for h, lam in enumerate(slopes.tolist()):
        for i in range(n):
            for j in range(n):
                dy, dx = j // side - i // side, j % side - i % side
                out[h, i, j] = -lam * math.sqrt(dx * dx + dy * dy)
    return out


def test_decay_is_additive_identity_at_init_and_matches_the_formula():
    assert "decay" in ADDITIVE and "decay" not in MULTIPLICATIVE
    prior = SpatialPrior(("decay", "none", "rpb", "decay"), head_dim=4, grid_size=4)
    mult, bias = prior((4, 4))
    assert mult is None and torch.equal(bias, torch.zeros(4, 16, 16))  # starts as vanilla
    with torch.no_grad():
        prior.decay.copy_(torch.tensor([0.5, -0.25]))
        prior.rpb_table.normal_()
    _, bias = prior((4, 4), num_prefix=1)
    ref = _reference_bias(torch.tensor([0.5, -0.25]), 4)
    torch.testing.assert_close(bias[0, 1:, 1:], ref[0])
    torch.testing.assert_close(bias[3, 1:, 1:], ref[1])
    assert torch.equal(bias[1], torch.zeros(17, 17))  # `none` head
    assert torch.equal(bias[:, 0], torch.zeros(4, 17)) and torch.equal(bias[:, :, 0],
                                                                     torch.zeros(4, 17))
    assert prior.decay.shape == (2,)


def test_decay_moves_attention_to_neighbours_whatever_the_sign_of_the_logits():
    """Additive decay raises the share of near keys for any content; the multiplicative
    `gaussian` gain lowers it where the near logits are negative."""
    side, n = 4, 16
    centre = 5  # token (1, 1)
    near = torch.tensor([abs(j // side - 1) + abs(j % side - 1) <= 1 for j in range(n)])

    def near_share(kind: str, param: float, sign: float) -> float:
        attn = Attention(8, 1, head_types=(kind,), grid_size=side)
        with torch.no_grad():
            if kind == "decay":
                attn.prior.decay.fill_(param)
            else:
                attn.prior.gaussian[:, 0] = param
        # content logits: `sign` on the near keys, 0 elsewhere (as q k^T / sqrt(d))
        logits = torch.where(near, sign, 0.0)[None].expand(n, n) / attn.scale
        mult, bias = attn.prior((side, side))
        z = logits * attn.scale
        z = z * mult[0] if mult is not None else z + bias[0]
        return float(z.softmax(-1)[centre, near].sum())

    base_neg = near_share("decay", 0.0, -1.0)
    assert near_share("decay", 1.0, -1.0) > base_neg
    assert near_share("decay", 1.0, +1.0) > near_share("decay", 0.0, +1.0)
    assert near_share("gaussian", 2.0, -1.0) < near_share("gaussian", 0.0, -1.0)
    assert near_share("gaussian", 2.0, +1.0) > near_share("gaussian", 0.0, +1.0)


@pytest.mark.parametrize("kinds", [("decay",) * 2, ("gaussian", "decay"), ("mlp", "decay"),
                                   ("rpb", "decay"), ("axial", "none")])
def test_parameter_counts_of_every_family(kinds):
    spec = ArchSpec(blocks=(BlockSpec(heads=2, prior=kinds), BlockSpec(heads=2, pool=True)),
                    img_size=16, patch_size=2, in_chans=1, num_classes=10, embed_dim=16,
                    head="avg")
    model = spvit.create_model(spec, seed=0)
    prior = model.blocks[0].attn.prior
    d, side = 8, 8
    per_head = {"mlp": 4 * d + 1, "gaussian": 3, "axial": 3, "rpb": (2 * side - 1) ** 2,
                "decay": 1, "none": 0}
    assert sum(p.numel() for p in prior.parameters()) == sum(per_head[k] for k in kinds)
    assert estimate(spec).params == sum(p.numel() for p in model.parameters())
    if "decay" in kinds:
        assert "blocks.0.attn.prior.decay" in model.no_weight_decay()


def _block_model(**kw) -> spvit.SPViT:
    spec = ArchSpec(blocks=(BlockSpec(heads=2), BlockSpec(heads=2)), img_size=16, patch_size=4,
                    in_chans=1, num_classes=3, embed_dim=8, head="avg", conv_pos=True, **kw)
    return spvit.create_model(spec, seed=0).eval()


@pytest.mark.parametrize("place", ["before_attn", "end"])
@pytest.mark.parametrize("skip_lam", [1.0, 3.0])
def test_block_residual_scaling_and_conv_pos_place_match_a_plain_reference(place, skip_lam):
    model = _block_model(skip_lam=skip_lam, conv_pos_place=place)
    blk = model.blocks[0]
    x = torch.randn(2, 16, 8)

    def peg(t):
        fmap = t.transpose(1, 2).reshape(2, 8, 4, 4)
        return t + blk.conv_pos.proj(fmap).flatten(2).transpose(1, 2)

    ref = x if place == "end" else peg(x)
    ref = ref + blk.attn(blk.norm1(ref), (4, 4))[0] / skip_lam
    ref = ref + blk.mlp(blk.norm2(ref)) / skip_lam
    if place == "end":
        ref = peg(ref)
    out, grid, _ = blk(x, (4, 4))
    torch.testing.assert_close(out, ref)
    assert grid == (4, 4)


def test_paper_configurations_take_the_release_values_and_deit_counts_stay_exact():
    for name, lam in (("spvit_s", 2.0), ("spvit_m", 2.0), ("spvit_l", 3.0)):
        registered = spvit.resolve_arch(name)
        from_file = ArchSpec.load(f"search_spaces/archs/{name}.yaml")
        assert registered == from_file, name
        assert (registered.skip_lam, registered.conv_pos_place) == (lam, "end")
    for name, count in (("deit_tiny", 5_717_416), ("deit_small", 22_050_664),
                        ("deit_base", 86_567_656)):
        spec = ArchSpec.load(f"search_spaces/archs/{name}.yaml")
        assert (spec.skip_lam, spec.conv_pos_place) == (1.0, "before_attn")
        assert estimate(spec).params == count
    spec = spvit.resolve_arch("spvit_s")
    assert ArchSpec.from_dict(spec.to_dict()) == spec == ArchSpec.from_dict(spec.to_flat())
