"""ArchSpec: serialised forms round-trip, derived facts, and every validation rule."""

from __future__ import annotations

import pytest

from spvit import ArchSpec, BlockSpec, ConfigError
from tests.messages import assert_names_value_and_fix


def _mixed() -> ArchSpec:
    return ArchSpec(
        blocks=(BlockSpec(heads=2, prior="mlp"),
                BlockSpec(heads=2, prior=("gaussian", "rpb")),
                BlockSpec(heads=4, prior=("axial", "none", "mlp", "rpb"), pool=True),
                BlockSpec(heads=4, share=True)),
        img_size=32, patch_size=4, num_classes=7, embed_dim=32, mlp_ratio=3.0, stem="conv",
        head="cls", cls_block=1, conv_pos=True, qkv_bias=False, drop_path_rate=0.1,
        pos_embed="sincos")


def test_dict_round_trip():
    spec = _mixed()
    assert ArchSpec.from_dict(spec.to_dict()) == spec


def test_flat_round_trip_and_labels():
    spec = _mixed()
    flat = spec.to_flat()
    assert flat["depth"] == 4
    assert flat["prior_0"] == "mlp"
    assert (flat["prior_1_0"], flat["prior_1_1"]) == ("gaussian", "rpb")
    assert "prior_1" not in flat
    assert flat["pool_2"] is True and flat["share_3"] is True and flat["heads_2"] == 4
    assert ArchSpec.from_dict(flat) == spec


def test_yaml_and_file_round_trip(tmp_path):
    spec = _mixed()
    assert ArchSpec.from_yaml(spec.to_yaml()) == spec
    path = tmp_path / "sub" / "arch.yaml"
    spec.save(path)
    assert ArchSpec.load(path) == spec
    assert not list(path.parent.glob(".*.tmp"))  # atomic write leaves no temp file


def test_equal_per_head_priors_collapse_to_one_type():
    b = BlockSpec(heads=3, prior=["rpb", "rpb", "rpb"])
    assert b.prior == "rpb" and b.head_priors == ("rpb",) * 3
    assert BlockSpec(heads=2, prior=("mlp", "none")).has_prior
    assert not BlockSpec(heads=2).has_prior


def test_derived_grids_widths_tokens():
    spec = ArchSpec(blocks=({"heads": 2}, {"heads": 2, "pool": True}, {"heads": 4, "pool": True},
                            {"heads": 4}),
                    img_size=56, patch_size=8, embed_dim=16, head="cls", cls_block=2)
    assert spec.grid_size == 7
    assert spec.block_grids() == (7, 4, 2, 2)
    assert spec.block_widths() == (16, 32, 64, 64)
    assert spec.block_has_cls() == (False, False, True, True)
    assert spec.block_tokens() == (49, 16, 5, 5)
    assert spec.num_features == 64 and spec.num_pools == 2


def _base(**kw):
    args = dict(blocks=({"heads": 2}, {"heads": 2}), img_size=32, patch_size=8, embed_dim=16)
    args.update(kw)
    return args


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(blocks="x"), "blocks must be a list"),
    (dict(blocks=()), "at least one block"),
    (dict(img_size=32.0), "img_size must be an integer"),
    (dict(patch_size=0), "patch_size must be >= 1"),
    (dict(in_chans=True), "in_chans must be an integer"),
    (dict(num_classes=0), "num_classes must be >= 1"),
    (dict(pool_width_factor=0), "pool_width_factor must be >= 1"),
    (dict(cls_block=-1), "cls_block must be >= 0"),
    (dict(mlp_ratio=0.0), "mlp_ratio must be a number > 0"),
    (dict(mlp_ratio="4"), "mlp_ratio must be a number > 0"),
    (dict(drop_path_rate=1.0), "drop_path_rate must be in [0, 1)"),
    (dict(stem="lineer"), "Did you mean 'linear'"),
    (dict(head="mean"), "head must be one of"),
    (dict(init="impulse7"), "init must be one of"),
    (dict(pos_embed="rope"), "pos_embed must be one of"),
    (dict(conv_pos=1), "conv_pos must be true or false"),
    (dict(qkv_bias="yes"), "qkv_bias must be true or false"),
    (dict(img_size=30), "not divisible by patch_size"),
    (dict(stem="conv", patch_size=3, img_size=30), "patch_size must be even"),
    (dict(head="avg", cls_block=1), "cls_block only applies to head: cls"),
    (dict(cls_block=2), "cls_block must be < depth"),
    (dict(init="impulse3"), "needs head: avg"),
    (dict(init="impulse5", head="avg", pos_embed="none"), "but got pos_embed: none"),
    (dict(init="impulse3_mimetic", head="avg"), "but got pos_embed: learned"),
    (dict(skip_lam=0.0), "skip_lam must be a number > 0"),
    (dict(conv_pos_place="after"), "conv_pos_place must be one of"),
    (dict(pos_embed="sincos", embed_dim=18, blocks=({"heads": 2},)), "not divisible by 4"),
    (dict(init="impulse3", head="avg", embed_dim=18, blocks=({"heads": 2},),
          pos_embed="learned_sincos"),
     "not divisible by 4"),
    (dict(blocks=({"heads": 2, "pool": True}, {"heads": 2, "pool": True},
                  {"heads": 2, "pool": True})), "a pool needs a grid of at least 3x3"),
    (dict(blocks=({"heads": 3},)), "width 16 is not divisible by heads 3"),
    (dict(blocks=({"heads": 2, "share": True},)), "block 0 has no previous block"),
    (dict(blocks=({"heads": 2}, {"heads": 2, "share": True, "pool": True})),
     "cannot follow a pool"),
    (dict(blocks=({"heads": 2}, {"heads": 2, "share": True}), cls_block=1),
     "where the CLS token joins"),
    (dict(blocks=({"heads": 2}, {"heads": 4, "share": True})), "same head count"),
    (dict(blocks=({"heads": 2}, {"heads": 2, "share": True, "prior": "mlp"})),
     "Set prior: none on shared blocks"),
])
def test_validation_rules(kwargs, fragment):
    with pytest.raises(ConfigError) as err:
        ArchSpec(**_base(**kwargs))
    assert fragment in str(err.value)
    assert_names_value_and_fix(str(err.value))


@pytest.mark.parametrize("block, fragment", [
    ({"heads": 0}, "heads must be >= 1"),
    ({"heads": 2, "prior": ["mlp"]}, "one entry per head (2)"),
    ({"heads": 2, "prior": "gauss"}, "Did you mean 'gaussian'"),
    ({"heads": 2, "prior": ["mlp", "bogus"]}, "prior must be one of"),
    ({"heads": 2, "share": "no"}, "share must be true or false"),
    ({"heads": 2, "pool": 0}, "pool must be true or false"),
    ({"heads": 2, "pooling": True}, "Did you mean 'pool'"),
    ({"prior": "mlp"}, "every block needs `heads`"),
    ("heads: 2", "a block must be a mapping"),
])
def test_block_rules_name_the_block(block, fragment):
    with pytest.raises(ConfigError) as err:
        ArchSpec.from_dict({"blocks": [{"heads": 2}, block], "embed_dim": 16, "img_size": 32,
                            "patch_size": 8})
    assert fragment in str(err.value)
    assert str(err.value).startswith("block 1: ")


def test_from_dict_rules():
    with pytest.raises(ConfigError, match="must be a mapping of fields"):
        ArchSpec.from_dict([1, 2])
    with pytest.raises(ConfigError, match="either a `blocks:` list"):
        ArchSpec.from_dict({"embed_dim": 16})
    with pytest.raises(ConfigError, match="Did you mean 'embed_dim'"):
        ArchSpec.from_dict({"blocks": [{"heads": 2}], "embed_dims": 16})
    with pytest.raises(ConfigError, match="blocks must be a list"):
        ArchSpec.from_dict({"blocks": {"heads": 2}})
    with pytest.raises(ConfigError, match="no 'heads_1'"):
        ArchSpec.from_dict({"depth": 2, "heads_0": 2})
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['prior_5'\]"):
        ArchSpec.from_dict({"depth": 1, "heads_0": 2, "prior_5": "mlp"})
    with pytest.raises(ConfigError, match="depth must be >= 1"):
        ArchSpec.from_dict({"depth": 0})


def test_yaml_and_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        ArchSpec.from_yaml("blocks: [\n  {heads: 2\n")
    with pytest.raises(ConfigError, match="does not exist"):
        ArchSpec.load(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="is a folder"):
        ArchSpec.load(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("blocks: [{heads: 3}]\nembed_dim: 16\n")
    with pytest.raises(ConfigError) as err:
        ArchSpec.load(bad)
    assert str(err.value).startswith(str(bad)) and "not divisible by heads 3" in str(err.value)


def test_replace_revalidates():
    spec = ArchSpec(**_base())
    assert spec.replace(num_classes=5).num_classes == 5
    with pytest.raises(ConfigError, match="not divisible by patch_size"):
        spec.replace(img_size=33)


# The key text earlier runs and benchmark caches hold for `_mixed()`; it must never change.
MIXED_IDENTITY = (
    '{"cls_block": 1, "conv_pos": true, "conv_pos_place": "before_attn", "depth": 4,'
    ' "drop_path_rate": 0.1, "embed_dim": 32, "head": "cls", "heads_0": 2, "heads_1": 2,'
    ' "heads_2": 4, "heads_3": 4, "img_size": 32, "in_chans": 3, "init": "trunc_normal",'
    ' "mlp_ratio": 3.0, "num_classes": 7, "patch_size": 4, "pool_0": false, "pool_1": false,'
    ' "pool_2": true, "pool_3": false, "pool_width_factor": 2, "pos_embed": "sincos",'
    ' "prior_0": "mlp", "prior_1_0": "gaussian", "prior_1_1": "rpb", "prior_2_0": "axial",'
    ' "prior_2_1": "none", "prior_2_2": "mlp", "prior_2_3": "rpb", "prior_3": "none",'
    ' "qkv_bias": false, "share_0": false, "share_1": false, "share_2": false, "share_3": true,'
    ' "skip_lam": 1.0, "stem": "conv"}')


def test_identity_text_is_pinned():
    assert _mixed().identity() == MIXED_IDENTITY
    assert ArchSpec.from_dict(_mixed().to_flat()).identity() == MIXED_IDENTITY


def test_equal_specs_and_only_they_share_an_identity():
    spec = _mixed()
    # the same architecture written differently: an int for a float, a per-head list of one
    # type, the nested and the flat form
    same = [
        spec.replace(mlp_ratio=3, blocks=(BlockSpec(heads=2, prior=["mlp", "mlp"]),
                                          *spec.blocks[1:])),
        ArchSpec.from_dict(spec.to_dict()),
        ArchSpec.from_dict(spec.to_flat()),
    ]
    others = [spec.replace(drop_path_rate=0.2), spec.replace(num_classes=8),
              spec.replace(blocks=(*spec.blocks[:3], BlockSpec(heads=4))),
              spec.replace(blocks=(BlockSpec(heads=2, prior=("mlp", "rpb")), *spec.blocks[1:]))]
    for other in same:
        assert other == spec and hash(other) == hash(spec)
        assert other.identity() == spec.identity()
    for other in others:
        assert other != spec and other.identity() != spec.identity()
    zero = spec.replace(drop_path_rate=0.0)
    assert spec.replace(drop_path_rate=-0.0).identity() == zero.identity()


def test_a_spec_keys_dicts_and_sets():
    spec = _mixed()
    scores = {spec: 0.5}
    copy = ArchSpec.from_dict(spec.to_flat())
    assert scores[copy] == 0.5 and copy in {spec}
    scores[copy] = 0.7
    assert len(scores) == 1 and scores[spec] == 0.7
    assert len({spec, copy, spec.replace(num_classes=8)}) == 2


def test_resolve_cls_block_counts_negative_values_from_the_end():
    from spvit.arch import resolve_cls_block

    assert [resolve_cls_block(-2, d) for d in (2, 4, 6)] == [0, 2, 4]
    assert resolve_cls_block(1, 6) == 1
    assert resolve_cls_block(-2, 6, head="avg") == 0  # no CLS token
