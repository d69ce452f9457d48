"""timm's model contract over every registered `spvit_*` model: what timm's own model tests check
(forward/backward, default_cfg fields, `num_classes=0` / `reset_classifier(0)` feature models,
`forward_features` / `forward_intermediates` shapes, `features_only`, FX feature extraction and FX
backward, gradient checkpointing), plus pooling, layer-wise lr decay groups, injected layers,
frozen state_dict keys and seeded initialisation without global reseeding.

The tiny `spvit_test` runs at its default input size; the paper-size models run at 64 px (the
grid, the learned positional embedding and the priors follow the input) and are marked slow.
"""

from __future__ import annotations

import hashlib
import math

import pytest
import timm
import timm.optim
import torch
from timm.models import get_notrace_functions, get_notrace_modules
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import spvit
from spvit import ConfigError
from spvit.attention import set_attention_backend
from spvit.factory import registered_arch

torch.set_num_threads(1)

MODELS = [pytest.param(n, marks=() if n == "spvit_test" else pytest.mark.slow)
          for n in spvit.REGISTERED_NAMES]
# sha256 of "key shape" lines of each default model's state_dict (sorted). Checkpoints, exports
# and the weight-sharing supernet address tensors by these names: they must never change.
STATE_DICT_DIGESTS = {"spvit_s": ("acba02eff797de54", 290), "spvit_m": ("a3cc1a08a795b1f2", 326),
                      "spvit_l": ("601bbe26915df95e", 426), "spvit_test": ("b4a3f741f72469b8", 93)}
TRACER_KWARGS = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(),
                     param_shapes_constant=True)


def _size(name: str) -> int:
    return registered_arch(name).img_size if name == "spvit_test" else 64


def _images(name: str, batch: int, seed: int = 0) -> torch.Tensor:
    s = _size(name)
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, registered_arch(name).in_chans, s, s, generator=gen)


def _grids(spec, size: int) -> list[int]:
    side, out = size // spec.patch_size, []
    for b in spec.blocks:
        side = math.ceil(side / 2) if b.pool else side
        out.append(side)
    return out


@pytest.mark.parametrize("name", spvit.REGISTERED_NAMES)
def test_state_dict_keys_are_frozen(name):
    with torch.device("meta"):
        model = timm.create_model(name)
    state = model.state_dict()
    text = "\n".join(f"{k} {tuple(v.shape)}" for k, v in sorted(state.items()))
    assert (hashlib.sha256(text.encode()).hexdigest()[:16], len(state)) == \
        STATE_DICT_DIGESTS[name]


@pytest.mark.parametrize("name", MODELS)
def test_forward_backward_and_default_cfg(name):
    model = timm.create_model(name, num_classes=42, seed=0).train()
    x = _images(name, 2)
    out = model(x)
    assert out.shape == (2, 42) and torch.isfinite(out).all()
    out.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing

    cfg = model.pretrained_cfg
    spec = registered_arch(name)
    assert cfg["input_size"] == (spec.in_chans, spec.img_size, spec.img_size)
    assert cfg["num_classes"] == spec.num_classes and not cfg["fixed_input_size"]
    state = model.state_dict()
    assert cfg["classifier"] + ".weight" in state and cfg["first_conv"] + ".weight" in state
    assert model.num_features == model.head_hidden_size == spec.num_features > 0


@pytest.mark.parametrize("name", MODELS)
def test_feature_model_and_pooling(name):
    model = timm.create_model(name, seed=0).eval()
    x = _images(name, 2)
    P = model.num_prefix_tokens
    with torch.no_grad():
        feats = model.forward_features(x)
        grid = _grids(model.spec, _size(name))[-1]
        assert feats.shape == (2, P + grid * grid, model.num_features)
        pre = model.forward_head(feats, pre_logits=True)
        assert pre.shape == (2, model.head_hidden_size)
        torch.testing.assert_close(pre, feats[:, 0] if P else feats.mean(1))  # the spec's head

        model.reset_classifier(0)
        assert model.num_classes == 0
        torch.testing.assert_close(model(x), pre)
        model.reset_classifier(0, "avg")
        torch.testing.assert_close(model(x), feats[:, P:].mean(1))
        model.reset_classifier(0, "max")
        torch.testing.assert_close(model(x), feats[:, P:].amax(1))
        model.reset_classifier(0, "")
        torch.testing.assert_close(model(x), feats)

        fresh = timm.create_model(name, num_classes=0, seed=0).eval()
        assert fresh.num_classes == 0 and isinstance(fresh.get_classifier(), torch.nn.Identity)
        assert fresh(x).shape == (2, fresh.num_features)
        fresh.load_state_dict(model.state_dict())  # same keys: the backbone, no head
        torch.testing.assert_close(fresh(x), pre)
        assert fresh.spec.num_classes == registered_arch(name).num_classes
        assert spvit.count_parameters(fresh) == spvit.count_parameters(model)


def test_spvit_create_model_builds_feature_models_too():
    model = spvit.create_model("spvit_test", num_classes=0, global_pool="avg", seed=0)
    assert model.num_classes == 0 and model.global_pool == "avg"
    assert model(_images("spvit_test", 1)).shape == (1, model.num_features)


def test_bad_pool_and_num_classes_are_refused():
    with pytest.raises(ConfigError, match="global_pool must be one of"):
        timm.create_model("spvit_test", global_pool="mean")
    with pytest.raises(ConfigError, match="num_classes must be an integer >= 0"):
        timm.create_model("spvit_test").reset_classifier(-1)


@pytest.mark.parametrize("name", MODELS)
def test_forward_intermediates(name):
    model = timm.create_model(name, seed=0).eval()
    spec = model.spec
    x = _images(name, 2)
    grids, widths, has_cls = _grids(spec, _size(name)), spec.block_widths(), spec.block_has_cls()
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x), rtol=0, atol=0)
        assert [tuple(t.shape) for t in inter] == [(2, w, g, g) for w, g in zip(widths, grids,
                                                                             strict=True)]
        nlc = model.forward_intermediates(x, indices=[0, -1], output_fmt="NLC",
                                          return_prefix_tokens=True, norm=True,
                                          intermediates_only=True)
        (first, first_cls), (last, last_cls) = nlc
        assert first.shape == (2, grids[0] ** 2, widths[0])
        assert (first_cls is None) == (not has_cls[0])
        # The last block normalised is forward_features, split into class token and patches.
        P = model.num_prefix_tokens
        torch.testing.assert_close(last, final[:, P:])
        if P:
            torch.testing.assert_close(last_cls, final[:, :P])
        # NCHW is NLC on each block's own grid.
        (plain,) = model.forward_intermediates(x, indices=[0], output_fmt="NLC",
                                               intermediates_only=True)
        torch.testing.assert_close(
            inter[0], plain.transpose(1, 2).reshape(2, widths[0], grids[0], grids[0]))
        if widths[0] == model.num_features:  # norm=True normalises the blocks of that width
            assert not torch.allclose(first, plain)
        early = model.forward_intermediates(x, indices=2, stop_early=True,
                                            intermediates_only=True)
        assert len(early) == 2
        torch.testing.assert_close(early[-1], inter[-1])
    with pytest.raises(ConfigError, match="out of range"):
        model.forward_intermediates(x, indices=[spec.depth])
    with pytest.raises(ConfigError, match="output_fmt"):
        model.forward_intermediates(x, output_fmt="NHWC")


@pytest.mark.parametrize("name", MODELS)
def test_features_only_through_timms_wrapper(name):
    model = timm.create_model(name, features_only=True, seed=0).eval()
    ref = timm.create_model(name, seed=0).eval()
    depth = registered_arch(name).depth
    x = _images(name, 1)
    with torch.no_grad():
        outs = model(x)
        expected = ref.forward_intermediates(x, indices=3, intermediates_only=True)
    assert len(outs) == len(model.feature_info.channels()) == 3
    for o, e, c, r in zip(outs, expected, model.feature_info.channels(),
                          model.feature_info.reduction(), strict=True):
        assert o.shape[1] == c and o.shape[-1] == math.ceil(_size(name) / r)
        torch.testing.assert_close(o, e)
    # timm prunes the blocks after the last requested one.
    pruned = timm.create_model(name, features_only=True, out_indices=(0, 1), seed=0)
    assert len(pruned.model.blocks) == 2 < depth
    assert [o.shape[1] for o in pruned(x)] == list(registered_arch(name).block_widths()[:2])


def _fx(model: torch.nn.Module, train: bool):
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=TRACER_KWARGS)
    return create_feature_extractor(model, train_return_nodes=[train_nodes[-1]],
                                    eval_return_nodes=[eval_nodes[-1]],
                                    tracer_kwargs=TRACER_KWARGS).train(train)


@pytest.mark.parametrize("name", MODELS)
def test_fx_traced_forward_equals_eager_at_two_sizes(name):
    model = timm.create_model(name, seed=0).eval()
    graph = _fx(model, train=False)
    for size in (_size(name), _size(name) + 2 * registered_arch(name).patch_size):
        x = torch.randn(1, registered_arch(name).in_chans, size, size)
        with torch.no_grad():
            traced = next(iter(graph(x).values()))
            # The trace records the eager formula; the model itself may take the CPU kernel,
            # which sums in another order: equal to rounding, and bit-equal to the eager path.
            torch.testing.assert_close(traced, model(x), rtol=1e-5, atol=1e-5)
            set_attention_backend(model, "eager")
            assert torch.equal(traced, model(x))
            set_attention_backend(model, None)


@pytest.mark.parametrize("name", MODELS)
def test_fx_backward_reaches_every_parameter(name):
    model = timm.create_model(name, num_classes=42, seed=0).train()
    graph = _fx(model, train=True)
    out = next(iter(graph(_images(name, 2)).values()))
    assert out.shape == (2, 42)
    out.mean().backward()
    assert all(p.grad is not None for p in graph.parameters())
    assert sum(p.numel() for p in graph.parameters()) == spvit.count_parameters(model)


def test_fx_feature_wrapper_returns_block_outputs():
    graph = timm.create_model("spvit_test", features_only=True, feature_cls="fx", seed=0).eval()
    ref = timm.create_model("spvit_test", seed=0).eval()
    x = _images("spvit_test", 2)
    with torch.no_grad():
        outs = graph(x)
        expected = ref.forward_intermediates(x, indices=3, output_fmt="NLC",
                                             return_prefix_tokens=True, intermediates_only=True)
    for o, (patches, cls) in zip(outs, expected, strict=True):
        torch.testing.assert_close(o, patches if cls is None else torch.cat([cls, patches], 1))


def test_grad_checkpointing_recomputes_blocks_with_equal_gradients():
    x = _images("spvit_test", 2)
    grads, calls = [], []
    for enable in (False, True):
        model = timm.create_model("spvit_test", drop_path_rate=0.3, seed=0).train()
        model.set_grad_checkpointing(enable)
        count = [0]
        model.blocks[1].register_forward_pre_hook(lambda *a, c=count: c.__setitem__(0, c[0] + 1))
        torch.manual_seed(7)  # the drop-path draws; a checkpoint replays them
        model(x).square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
        calls.append(count[0])
    assert calls == [1, 2]  # checkpointing re-runs the block in the backward pass
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, rtol=1e-5, atol=1e-6, msg=n)


def test_group_matcher_gives_layer_wise_lr_decay():
    model = timm.create_model("spvit_test")
    opt = timm.optim.create_optimizer_v2(model, "adamw", lr=1.0, layer_decay=0.5)
    scale = {}
    for group in opt.param_groups:
        for p in group["params"]:
            scale[p] = group["lr_scale"]
    named = dict(model.named_parameters())
    assert set(scale) == set(named.values())  # every parameter in exactly one group
    s = {n: scale[p] for n, p in named.items()}
    depth = model.spec.depth
    blocks = [s[f"blocks.{i}.norm1.weight"] for i in range(depth)]
    assert s["patch_embed.conv1.weight"] == s["cls_token"] == s["pos_embed"] < blocks[0]
    assert all(a < b for a, b in zip(blocks[:-1], blocks[1:], strict=True))
    assert blocks[-1] <= s["norm.weight"] < s["head.weight"]
    assert s["head.weight"] == 1.0
    assert blocks[1] / blocks[0] == pytest.approx(2.0)


def test_norm_and_activation_are_injected():
    default = timm.create_model("spvit_test", seed=0).eval()
    model = timm.create_model("spvit_test", norm_layer="rmsnorm", act_layer="silu", seed=0).eval()
    blk = model.blocks[0]
    assert type(blk.norm1).__name__ == type(model.norm).__name__ == "RmsNorm"
    assert isinstance(blk.mlp.act, torch.nn.SiLU)
    assert isinstance(default.blocks[0].mlp.act, torch.nn.GELU)
    assert isinstance(default.blocks[0].norm1, torch.nn.LayerNorm)
    assert default.blocks[0].norm1.eps == 1e-6
    # same names: an RMSNorm has no bias, nothing is renamed
    assert set(model.state_dict()) <= set(default.state_dict())
    x = _images("spvit_test", 1)
    with torch.no_grad():
        assert not torch.allclose(model(x), default(x))
    with pytest.raises(ConfigError, match="not an architecture field"):
        spvit.create_model("spvit_test", norm=torch.nn.LayerNorm)


def test_seeded_init_uses_a_generator_not_the_global_rng(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the global RNG was reseeded")

    for init in ("trunc_normal", "mimetic", "impulse3"):
        spec = registered_arch("spvit_test").replace(init=init, head="avg", cls_block=0,
                                                      pos_embed="learned_sincos")
        torch.manual_seed(1)
        a = spvit.create_model(spec, seed=3)
        torch.manual_seed(2)
        with monkeypatch.context() as m:
            m.setattr(torch, "manual_seed", forbidden)
            m.setattr(torch.random, "manual_seed", forbidden)
            b = spvit.create_model(spec, seed=3)
        for (n, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
            assert torch.equal(pa, pb), (init, n)
    c = spvit.create_model("spvit_test", seed=4)
    assert not torch.equal(c.blocks[0].attn.qkv.weight, a.blocks[0].attn.qkv.weight)
