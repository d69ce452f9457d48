"""The supernet computes exactly what the stand-alone SPViT computes with the inherited weights."""

from __future__ import annotations

import random
from functools import partial
from pathlib import Path

import pytest
import torch
from timm.layers import RmsNorm
from torch import nn

from nas.oneshot import supernet_choices
from search_spaces.space import SearchSpace
from spvit import create_model
from spvit.arch import ArchSpec, BlockSpec
from spvit.errors import ConfigError
from spvit.supernet import SPViTSupernet, SupernetChoices

SPACES = Path(__file__).resolve().parents[2] / "search_spaces"


def _perturb(net: torch.nn.Module, seed: int) -> None:
    """Random weights everywhere, so identity priors, zero tables and unit norms prove nothing:
    weight matrices move by N(0, 0.02) (the init's scale, so deep stacks stay finite), vectors
    and prior parameters by N(0, 0.2), BatchNorm statistics to random positive values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in net.named_parameters():
            matrix = t.ndim >= 2 and not name.endswith(("rpb_table", "gaussian", "axial"))
            t.add_(torch.randn(t.shape, generator=gen) * (0.02 if matrix else 0.2))
        for name, b in net.named_buffers():
            if name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=gen) + 0.5)
            elif name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=gen) * 0.1)


def _features(specs: list[ArchSpec]) -> set[str]:
    seen = set()
    for s in specs:
        for b in s.blocks:
            seen.update({"pool"} if b.pool else set())
            seen.update({"share"} if b.share else set())
            if not isinstance(b.prior, str):
                seen.add("per_head")
            seen.update(b.head_priors)
    return seen


def _check_equal(net: SPViTSupernet, spec: ArchSpec, x: torch.Tensor) -> None:
    model = net.subnet(spec).eval()
    assert model.spec == spec
    with torch.no_grad():
        net.set_active(spec)
        got = net(x)
        want = model(x)
    assert got.shape == want.shape == (x.shape[0], spec.num_classes)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,count", [("digits", 24), ("cifar", 10)])
def test_extracted_subnet_equals_active_forward(name: str, count: int) -> None:
    space = SearchSpace.load(SPACES / f"{name}.yaml")
    net = SPViTSupernet(supernet_choices(space), seed=0).eval()
    _perturb(net, seed=1)
    rng = random.Random(3)
    specs = [space.sample(rng) for _ in range(count)]
    gen = torch.Generator().manual_seed(0)
    for spec in specs:
        x = torch.randn(2, spec.in_chans, spec.img_size, spec.img_size, generator=gen)
        _check_equal(net, spec, x)
    needed = {"pool", "share", "mlp", "gaussian", "axial", "rpb", "decay"}
    if space.prior.per_head:
        needed.add("per_head")
    assert needed <= _features(specs)


def test_imagenet_space_smallest_subnets_and_small_input() -> None:
    space = SearchSpace.load(SPACES / "imagenet.yaml")
    net = SPViTSupernet(supernet_choices(space), seed=0).eval()
    _perturb(net, seed=2)
    rng = random.Random(5)
    small = [s for s in (space.sample(rng) for _ in range(200))
             if s.depth == 12 and s.embed_dim == 288][:3]
    assert small
    gen = torch.Generator().manual_seed(0)
    for spec in small:
        # 64 px: a 4x4 grid (positional embedding resampled, rpb offsets clamped) in both.
        _check_equal(net, spec, torch.randn(1, 3, 64, 64, generator=gen))
    _check_equal(net, small[0], torch.randn(1, 3, 224, 224, generator=gen))


def _tiny_choices(**changes) -> SupernetChoices:
    base = dict(img_size=16, in_chans=1, num_classes=5, stem="conv", head="cls", cls_block=0,
                depths=(2, 3), patch_sizes=(2, 4), embed_dims=(8, 16), mlp_ratios=(1.0, 2.0),
                pool_width_factors=(1, 2), heads=(1, 2, 4), prior_types=("none", "mlp", "rpb"),
                pos_embeds=("learned", "sincos", "none"), conv_pos=(False, True),
                qkv_bias=(False, True), pool_schedules=((), (1,), (1, 2)), share=(False, True))
    base.update(changes)
    return SupernetChoices(**base)


@pytest.mark.parametrize("cls_block", [0, 1])
def test_every_global_dimension_and_class_token(cls_block: int) -> None:
    """Class token from the stem or joining late, conv stem, conv_pos, width factor 2 with a
    class-token projection, sincos / no positional encoding, no qkv bias, two patch sizes."""
    net = SPViTSupernet(_tiny_choices(cls_block=cls_block), seed=0).eval()
    _perturb(net, seed=4)
    gen = torch.Generator().manual_seed(1)
    specs = [
        ArchSpec(blocks=(BlockSpec(heads=2, prior=("mlp", "rpb")),
                         BlockSpec(heads=4, prior="rpb", pool=True),
                         BlockSpec(heads=4, share=True)),
                 img_size=16, patch_size=2, in_chans=1, num_classes=5, embed_dim=16,
                 mlp_ratio=2.0, stem="conv", head="cls", cls_block=cls_block,
                 pool_width_factor=2, pos_embed="learned", conv_pos=True, qkv_bias=True),
        ArchSpec(blocks=(BlockSpec(heads=1, prior="mlp"), BlockSpec(heads=2, pool=True)),
                 img_size=16, patch_size=4, in_chans=1, num_classes=5, embed_dim=8,
                 mlp_ratio=1.0, stem="conv", head="cls", cls_block=min(cls_block, 1),
                 pool_width_factor=1, pos_embed="sincos", conv_pos=False, qkv_bias=False),
        ArchSpec(blocks=(BlockSpec(heads=4, prior=("none", "mlp", "rpb", "mlp")),
                         BlockSpec(heads=2, prior="rpb", pool=True),
                         BlockSpec(heads=2, share=True)),
                 img_size=16, patch_size=2, in_chans=1, num_classes=5, embed_dim=8,
                 mlp_ratio=2.0, stem="conv", head="cls", cls_block=cls_block,
                 pool_width_factor=2, pos_embed="none", conv_pos=True, qkv_bias=True),
    ]
    for spec in specs:
        _check_equal(net, spec, torch.randn(3, 1, 16, 16, generator=gen))


def _release_choices(**changes) -> SupernetChoices:
    """Tiny choices with the release-style fields: residual scaling, conv pos at the block's
    end, the learnable sin-cos embedding and the decay prior."""
    return _tiny_choices(pos_embeds=("learned", "learned_sincos", "sincos"),
                         prior_types=("none", "mlp", "rpb", "decay"), skip_lams=(1.0, 2.0, 3.0),
                         conv_pos_places=("before_attn", "end"), **changes)


@pytest.mark.parametrize("cls_block", [0, 1])
def test_skip_lam_conv_pos_place_learned_sincos_and_decay(cls_block: int) -> None:
    net = SPViTSupernet(_release_choices(cls_block=cls_block), seed=0).eval()
    _perturb(net, seed=6)
    gen = torch.Generator().manual_seed(2)
    common = dict(img_size=16, in_chans=1, num_classes=5, stem="conv", head="cls",
                  cls_block=cls_block, conv_pos=True)
    specs = [
        ArchSpec(blocks=(BlockSpec(heads=2, prior=("decay", "rpb")),
                         BlockSpec(heads=4, prior="decay", pool=True),
                         BlockSpec(heads=4, share=True)),
                 patch_size=2, embed_dim=16, mlp_ratio=2.0, pool_width_factor=2,
                 pos_embed="learned_sincos", skip_lam=2.0, conv_pos_place="end", **common),
        ArchSpec(blocks=(BlockSpec(heads=4, prior=("decay", "mlp", "none", "decay")),
                         BlockSpec(heads=2, prior="decay", pool=True)),
                 patch_size=4, embed_dim=8, mlp_ratio=1.0, pool_width_factor=1,
                 pos_embed="sincos", skip_lam=3.0, conv_pos_place="before_attn", **common),
        ArchSpec(blocks=(BlockSpec(heads=1, prior="decay"), BlockSpec(heads=2, prior="mlp")),
                 patch_size=2, embed_dim=8, mlp_ratio=2.0, pool_width_factor=1,
                 pos_embed="learned", skip_lam=1.0, conv_pos_place="end", **common),
    ]
    for spec in specs:
        _check_equal(net, spec, torch.randn(2, 1, 16, 16, generator=gen))
    # No weight depends on skip_lam or conv_pos_place, yet the function does: the supernet
    # follows the subnet's values (a forward that ignored them would give equal outputs).
    x = torch.randn(2, 1, 16, 16, generator=gen)
    with torch.no_grad():
        base = net(x, spec=specs[0])
        for other in (specs[0].replace(skip_lam=1.0),
                      specs[0].replace(conv_pos_place="before_attn")):
            assert not torch.allclose(net(x, spec=other), base, atol=1e-4)
    # learned and learned_sincos read the same embedding; the decay slopes are per head slot.
    a = net.inherited_state_dict(specs[0])
    b = net.inherited_state_dict(specs[0].replace(pos_embed="learned"))
    assert a["pos_embed"].data_ptr() == b["pos_embed"].data_ptr()
    assert net.blocks[0].attn.prior.decay.shape == (4,)
    torch.testing.assert_close(a["blocks.0.attn.prior.decay"],
                               net.blocks[0].attn.prior.decay[[0]])
    assert "blocks.0.attn.prior.decay" in net.no_weight_decay()


def test_decay_prior_against_a_plain_reference() -> None:
    """The supernet's decay bias is -l_h * |d| per head (written out here, loop over pairs)."""
    net = SPViTSupernet(_release_choices(stem="linear", head="avg"), seed=0)
    prior = net.blocks[0].attn.prior
    with torch.no_grad():
        prior.decay.copy_(torch.tensor([0.5, -0.25, 1.5, 2.0]))
    types = ("decay", "rpb", "none", "decay")
    mult, bias = prior(types, 4, 8, (3, 2), 0, torch.float32)
    assert mult is None and bias.shape == (4, 6, 6)
    slopes = {0: 0.5, 3: 2.0}
    for h in range(4):
        for i in range(6):
            for j in range(6):
                (ri, ci), (rj, cj) = divmod(i, 2), divmod(j, 2)
                dist = ((rj - ri) ** 2 + (cj - ci) ** 2) ** 0.5
                want = -slopes[h] * dist if h in slopes else 0.0
                assert bias[h, i, j].item() == pytest.approx(want, abs=1e-6)


def test_choices_outside_skip_lam_and_conv_pos_place_are_refused() -> None:
    net = SPViTSupernet(_tiny_choices(stem="linear", head="avg"), seed=0)
    spec = ArchSpec(blocks=(BlockSpec(heads=2),) * 2, img_size=16, patch_size=2, in_chans=1,
                    num_classes=5, stem="linear", head="avg", embed_dim=8, mlp_ratio=1.0,
                    pool_width_factor=1)
    net.set_active(spec)
    with pytest.raises(ConfigError, match=r"skip_lam 2.0 is not among .*\[1.0\]"):
        net.set_active(spec.replace(skip_lam=2.0))
    with pytest.raises(ConfigError, match=r"conv_pos_place 'end' is not among"):
        net.set_active(spec.replace(conv_pos_place="end"))


def test_choices_round_trip_and_older_files_get_the_defaults() -> None:
    choices = _release_choices()
    assert SupernetChoices.from_dict(choices.to_dict()) == choices
    old = _tiny_choices().to_dict()
    del old["skip_lams"], old["conv_pos_places"]
    restored = SupernetChoices.from_dict(old)
    assert restored.skip_lams == (1.0,) and restored.conv_pos_places == ("before_attn",)


def test_subnets_share_the_leading_slices() -> None:
    net = SPViTSupernet(_tiny_choices(stem="linear", head="avg", pos_embeds=("learned",)),
                        seed=0)
    common = dict(img_size=16, patch_size=2, in_chans=1, num_classes=5, stem="linear",
                  head="avg", pool_width_factor=1)
    big = ArchSpec(blocks=(BlockSpec(heads=4, prior="rpb"),) * 3, embed_dim=16, mlp_ratio=2.0,
                   **common)
    small = ArchSpec(blocks=(BlockSpec(heads=1, prior="rpb"),) * 2, embed_dim=8,
                     mlp_ratio=1.0, **common)
    a, b = net.inherited_state_dict(big), net.inherited_state_dict(small)
    qkv_big = a["blocks.0.attn.qkv.weight"].reshape(3, 16, 16)
    qkv_small = b["blocks.0.attn.qkv.weight"].reshape(3, 8, 8)
    torch.testing.assert_close(qkv_small, qkv_big[:, :8, :8])
    torch.testing.assert_close(b["blocks.1.mlp.fc1.weight"], a["blocks.1.mlp.fc1.weight"][:8, :8])
    # rpb tables: one per head slot for the largest grid, centre-cropped for smaller grids
    # (the same offset reads the same entry).
    table = net.blocks[0].attn.prior.rpb_table
    assert table.shape == (4, 15, 15)
    assert b["blocks.0.attn.prior.rpb_table"].shape == (1, 15, 15)


def test_one_training_step_moves_only_the_active_slices() -> None:
    net = SPViTSupernet(_tiny_choices(stem="linear", head="avg", pos_embeds=("learned",)),
                        seed=0)
    spec = ArchSpec(blocks=(BlockSpec(heads=2, prior="mlp"),) * 2, img_size=16, patch_size=2,
                    in_chans=1, num_classes=5, stem="linear", head="avg", embed_dim=8,
                    mlp_ratio=1.0, pool_width_factor=1)
    net.set_active(spec)
    net(torch.randn(2, 1, 16, 16)).sum().backward()
    grad = net.blocks[0].fc1.weight.grad
    assert grad[:8, :8].abs().sum() > 0
    assert grad[8:].abs().sum() == 0 and grad[:, 8:].abs().sum() == 0
    assert net.blocks[2].fc1.weight.grad is None  # depth 2: the third block is not used
    prior = net.blocks[0].attn.prior
    assert prior.mlp_weight.grad[2:].abs().sum() == 0  # head slots 2, 3 are not used


def test_out_of_space_architecture_names_dimension_and_value() -> None:
    net = SPViTSupernet(_tiny_choices(), seed=0)
    spec = ArchSpec(blocks=(BlockSpec(heads=2), BlockSpec(heads=8)), img_size=16, patch_size=2,
                    in_chans=1, num_classes=5, stem="conv", head="cls", embed_dim=16,
                    mlp_ratio=1.0, pool_width_factor=1)
    with pytest.raises(ConfigError, match=r"heads_1 8 is not among"):
        net.set_active(spec)
    with pytest.raises(ConfigError, match=r"embed_dim 24"):
        net.subnet(spec.replace(embed_dim=24, blocks=(BlockSpec(heads=2),) * 2))


def test_seeded_supernets_are_identical_and_leave_the_global_rng() -> None:
    state = torch.random.get_rng_state()
    a = SPViTSupernet(_tiny_choices(), seed=7)
    b = SPViTSupernet(_tiny_choices(), seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)
    for (na, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(pa, pb), na


def test_subnet_keeps_init_field_but_inherits_weights() -> None:
    space = SearchSpace.load(SPACES / "digits.yaml")
    net = SPViTSupernet(supernet_choices(space), seed=0)
    spec = next(s for s in (space.sample(random.Random(i)) for i in range(100))
                if s.init == "impulse3")
    model = net.subnet(spec)
    assert model.spec.init == "impulse3"
    fresh = create_model(spec, seed=0)
    assert set(fresh.state_dict()) == set(model.state_dict())
    inherited = net.inherited_state_dict(spec)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, inherited[k])


def _release_spec(**changes) -> ArchSpec:
    base = dict(blocks=(BlockSpec(heads=2, prior=("decay", "mlp")),
                        BlockSpec(heads=4, prior="rpb", pool=True),
                        BlockSpec(heads=4, share=True)),
                img_size=16, patch_size=2, in_chans=1, num_classes=5, embed_dim=16,
                mlp_ratio=2.0, stem="conv", head="cls", cls_block=1, pool_width_factor=2,
                pos_embed="learned", conv_pos=True, skip_lam=2.0, conv_pos_place="end")
    base.update(changes)
    return ArchSpec(**base)


@pytest.mark.parametrize("norm_layer,act_layer,norm_cls,act_cls", [
    ("rmsnorm", "silu", RmsNorm, nn.SiLU),
    (partial(nn.LayerNorm, eps=1e-2), nn.ReLU, nn.LayerNorm, nn.ReLU),
])
def test_injected_norm_and_activation_are_the_models(norm_layer, act_layer, norm_cls, act_cls):
    """The supernet's blocks use the norm and activation `SPViT` is given, and so do the
    subnets it builds; the eps is the layer's own (1e-2 here, not the default 1e-6)."""
    choices = _release_choices(cls_block=1)
    net = SPViTSupernet(choices, norm_layer=norm_layer, act_layer=act_layer, seed=0).eval()
    _perturb(net, seed=8)
    spec = _release_spec()
    model = net.subnet(spec)
    assert isinstance(model.blocks[0].norm1, norm_cls) and isinstance(model.norm, norm_cls)
    assert isinstance(model.blocks[0].mlp.act, act_cls)
    gen = torch.Generator().manual_seed(3)
    _check_equal(net, spec, torch.randn(2, 1, 16, 16, generator=gen))
    # The layers change the function: the default supernet with the same weights differs.
    if norm_cls is nn.LayerNorm:
        default = SPViTSupernet(choices, seed=0).eval()
        default.load_state_dict(net.state_dict())
        x = torch.randn(2, 1, 16, 16, generator=gen)
        with torch.no_grad():
            assert not torch.allclose(net(x, spec=spec), default(x, spec=spec), atol=1e-4)


def test_a_norm_that_cannot_be_sliced_per_channel_is_refused():
    with pytest.raises(ConfigError, match=r"needs a LayerNorm or an RMS norm.*BatchNorm1d"):
        SPViTSupernet(_tiny_choices(), norm_layer=nn.BatchNorm1d)
