"""SPViT built from ArchSpec: shapes along the network, every prior type with pooling and sharing
at two image sizes, exact parameter counts (DeiT, SP-ViT), meta device, bf16, determinism."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import spvit
from spvit import PRIOR_TYPES, ArchSpec, BlockSpec, ConfigError
from spvit.factory import registered_arch

torch.set_num_threads(1)

ARCHS = Path(__file__).resolve().parents[2] / "search_spaces" / "archs"


def _spec(prior, *, img_size=32, head="cls", cls_block=1, stem="conv", pos_embed="learned"):
    wide = prior if isinstance(prior, str) else tuple(prior) * 2
    blocks = (BlockSpec(heads=2, prior=prior), BlockSpec(heads=2, prior=prior, pool=True),
              BlockSpec(heads=2, share=True), BlockSpec(heads=4, prior=wide))
    return ArchSpec(blocks=blocks, img_size=img_size, patch_size=4, in_chans=3, num_classes=5,
                    embed_dim=16, mlp_ratio=2.0, stem=stem, head=head,
                    cls_block=cls_block if head == "cls" else 0, pos_embed=pos_embed,
                    conv_pos=True, drop_path_rate=0.1)


def _trace(model):
    """Per block: (tokens, width) seen by norm1, and the grid passed to attention."""
    seen = {}
    for i, blk in enumerate(model.blocks):
        blk.norm1.register_forward_pre_hook(
            lambda m, a, i=i: seen.__setitem__(i, tuple(a[0].shape[1:])))
    return seen


@pytest.mark.parametrize("prior", PRIOR_TYPES)
def test_every_prior_type_with_pool_and_share_at_two_sizes(prior):
    for img_size, head in ((32, "cls"), (24, "avg")):
        spec = _spec(prior, img_size=img_size, head=head)
        model = spvit.create_model(spec, seed=0)
        seen = _trace(model)
        x = torch.randn(2, 3, img_size, img_size)
        out = model(x)
        assert out.shape == (2, 5) and torch.isfinite(out).all()
        out.square().mean().backward()
        for name, p in model.named_parameters():
            assert p.grad is not None, f"{name} got no gradient"
        expected = [(n, w) for n, w in zip(spec.block_tokens(), spec.block_widths(),
                                                  strict=True)]
        assert [seen[i] for i in range(spec.depth)] == expected


def test_runtime_input_size_differs_from_spec():
    spec = _spec(("mlp", "rpb"), img_size=32)
    model = spvit.create_model(spec, seed=0).eval()
    seen = _trace(model)
    out = model(torch.randn(1, 3, 48, 48))  # 12x12 grid instead of 8x8
    assert out.shape == (1, 5)
    assert seen[0] == (144, 16) and seen[1] == (36 + 1, 32)


def test_class_token_joins_at_cls_block_and_pool_carries_it():
    blocks = [{"heads": 2}, {"heads": 2}, {"heads": 2, "pool": True}, {"heads": 2}]
    late = ArchSpec(blocks=blocks, img_size=32, patch_size=4, embed_dim=16, cls_block=1)
    model = spvit.create_model(late)
    assert model.cls_token.shape == (1, 1, 16)
    assert not isinstance(model.blocks[2].pool.cls_proj, torch.nn.Identity)
    seen = _trace(model)
    model(torch.randn(1, 3, 32, 32))
    assert [seen[i][0] for i in range(4)] == [64, 65, 17, 17]
    # Joining at the pooling block: the class token takes the pooled width, no projection.
    at_pool = ArchSpec(blocks=blocks, img_size=32, patch_size=4, embed_dim=16, cls_block=2)
    model = spvit.create_model(at_pool)
    assert model.cls_token.shape == (1, 1, 32)
    assert isinstance(model.blocks[2].pool.cls_proj, torch.nn.Identity)
    # From the stem on (DeiT): position entry for the class token, projected by a pool.
    early = ArchSpec(blocks=[{"heads": 2, "pool": True}, {"heads": 2}], img_size=32,
                     patch_size=4, embed_dim=16)
    model = spvit.create_model(early)
    assert model.pos_embed.shape == (1, 65, 16)
    assert not isinstance(model.blocks[0].pool.cls_proj, torch.nn.Identity)
    seen = _trace(model)
    model(torch.randn(1, 3, 32, 32))
    assert seen[0] == (17, 32)


def test_token_pool_is_strided_depthwise_conv_on_odd_grid():
    spec = ArchSpec(blocks=[{"heads": 1}, {"heads": 1, "pool": True}], img_size=28, patch_size=4,
                    embed_dim=8, head="avg", pool_width_factor=3)
    model = spvit.create_model(spec)
    pool = model.blocks[1].pool
    assert pool.conv.groups == 8 and pool.conv.out_channels == 24 and pool.conv.stride == (2, 2)
    seen = _trace(model)
    model(torch.randn(1, 3, 28, 28))
    assert spec.block_grids() == (7, 4) and seen[1] == (16, 24)


@pytest.mark.parametrize("name, expected", [("deit_tiny", 5_717_416),
                                            ("deit_small", 22_050_664),
                                            ("deit_base", 86_567_656)])
def test_deit_parameter_counts_exact(name, expected):
    with torch.device("meta"):
        model = spvit.create_model(ARCHS / f"{name}.yaml")
    assert spvit.count_parameters(model) == expected


@pytest.mark.parametrize("name, paper", [("spvit_s", 26e6), ("spvit_m", 56e6),
                                         ("spvit_l", 150e6)])
def test_spvit_parameter_counts_near_paper(name, paper):
    assert ArchSpec.load(ARCHS / f"{name}.yaml") == registered_arch(name)
    with torch.device("meta"):
        model = spvit.create_model(name)
    assert abs(spvit.count_parameters(model) - paper) / paper < 0.05
    assert all(p.is_meta for p in model.parameters())


def test_same_seed_same_weights_and_init_schemes_on_meta():
    spec = _spec("mlp")
    a, b = spvit.create_model(spec, seed=3), spvit.create_model(spec, seed=3)
    c = spvit.create_model(spec, seed=4)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.blocks[0].attn.qkv.weight, c.blocks[0].attn.qkv.weight)
    for init in ("mimetic", "impulse3"):
        with torch.device("meta"):
            model = spvit.create_model(spec.replace(init=init, head="avg", cls_block=0,
                                                    pos_embed="learned_sincos"))
        assert model.blocks[0].attn.qkv.weight.is_meta


def test_bf16_autocast_forward_and_backward():
    model = spvit.create_model(_spec(("mlp", "rpb")), seed=0).eval()  # no drop-path noise
    x = torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    out.float().sum().backward()
    assert model.blocks[0].attn.prior.mlp_weight.grad is not None
    ref = model(x)
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max() + 0.01


def test_bf16_weights():
    model = spvit.create_model(_spec(("gaussian", "axial")), seed=0).to(torch.bfloat16)
    out = model(torch.randn(1, 3, 32, 32, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_prior_tables_report():
    spec = ArchSpec(blocks=[{"heads": 3, "prior": ["mlp", "rpb", "none"]},
                            {"heads": 2, "pool": True, "prior": "gaussian"}, {"heads": 2}],
                    img_size=40, patch_size=8, embed_dim=12, head="avg")
    model = spvit.create_model(spec, seed=0)
    with torch.no_grad():
        model.blocks[0].attn.prior.rpb_table.fill_(0.25)
    tables = model.prior_tables()
    assert sorted(tables) == [0, 1]
    t0 = tables[0]
    assert t0["tables"].shape == (3, 9, 9) and t0["grid"] == 5
    assert t0["head_types"] == ("mlp", "rpb", "none")
    assert t0["modes"] == ("multiplicative", "additive", "none")
    assert torch.all(t0["tables"][0] == 1) and torch.all(t0["tables"][1] == 0.25)
    assert tables[1]["tables"].shape == (2, 5, 5)  # pooled 5x5 -> 3x3 grid


def test_create_model_inputs_and_errors(tmp_path):
    spec = _spec("none")
    path = tmp_path / "arch.yaml"
    spec.save(path)
    for arch in (spec, spec.to_dict(), spec.to_flat(), str(path), path):
        model = spvit.create_model(arch, num_classes=7)
        assert model.spec == spec.replace(num_classes=7) and model.head.out_features == 7
    with pytest.raises(ConfigError, match="Did you mean 'spvit_s'"):
        spvit.create_model("spvit_ss")
    with pytest.raises(ConfigError, match="Did you mean 'num_classes'"):
        spvit.create_model(spec, num_class=3)
    with pytest.raises(ConfigError, match="does not exist"):
        spvit.create_model(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="needs an ArchSpec"):
        spvit.SPViT(spec.to_dict())


def test_no_weight_decay_lists_embeddings_and_parametric_priors():
    spec = ArchSpec(blocks=[{"heads": 4, "prior": ["mlp", "rpb", "gaussian", "axial"]}],
                    img_size=16, patch_size=4, embed_dim=16)
    names = spvit.create_model(spec).no_weight_decay()
    assert {"pos_embed", "cls_token", "blocks.0.attn.prior.rpb_table",
            "blocks.0.attn.prior.gaussian", "blocks.0.attn.prior.axial",
            "blocks.0.attn.prior.mlp_bias"} <= names
    assert "blocks.0.attn.prior.mlp_weight" not in names


def test_sincos_and_no_positional_encoding():
    for pos in ("sincos", "none"):
        model = spvit.create_model(_spec("rpb", pos_embed=pos, stem="linear"), seed=0)
        assert model.pos_embed is None
        assert model(torch.randn(1, 3, 40, 40)).shape == (1, 5)
