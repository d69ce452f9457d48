"""The fused SP-SA path (FlexAttention score function over per-offset prior tables) against the
eager path and the plain reference, and the choice of attention path by device, argument and
environment. FlexAttention runs forward-only on CPU, so these are forward checks; gradients are
checked by bench/gpu_check.sh on a GPU."""

from __future__ import annotations

import shutil

import pytest
import torch

import spvit
from spvit import attention as attention_module
from spvit import cpu_attention, flex
from spvit.attention import Attention, set_attention_backend
from spvit.errors import ConfigError
from tests.spvit.test_attention import _make, _reference_attention

torch.set_num_threads(1)

CASES = {
    "mixed heads, class token": (["mlp", "none", "gaussian", "rpb", "axial"], (4, 4), 1, 4),
    "mlp, no prefix, non-square": (["mlp"] * 3, (3, 5), 0, 5),
    "additive only, class token": (["rpb", "none"], (3, 3), 1, 3),
    "grid larger than the architecture's": (["rpb", "mlp"], (4, 5), 0, 3),
}


def _layer(types, grid_size, *, dtype=torch.float32, seed=0):
    attn = _make(types, dim=16 * len(types), grid_size=grid_size, seed=seed).to(dtype)
    return attn


@pytest.mark.parametrize("case", list(CASES))
def test_score_mod_reproduces_the_prior_on_every_pair(case):
    types, grid, prefix, grid_size = CASES[case]
    attn = _layer(types, grid_size, dtype=torch.float64)
    with torch.no_grad():
        mult_k, bias_k = attn.prior.offset_values(grid)  # (H, K)
        mult, bias = attn.prior(grid, prefix)  # (H, N, N), gathered by the eager path
    n = prefix + grid[0] * grid[1]
    mult = torch.ones(len(types), n, n, dtype=torch.float64) if mult is None else mult
    bias = torch.zeros(len(types), n, n, dtype=torch.float64) if bias is None else bias
    mod = flex.prior_score_mod(mult_k, bias_k, grid, prefix)
    score = torch.tensor(2.0, dtype=torch.float64)
    zero = torch.tensor(0)
    for h in range(len(types)):
        for i in range(n):
            got = torch.stack([mod(score, zero, torch.tensor(h), torch.tensor(i), torch.tensor(j))
                               for j in range(n)])
            torch.testing.assert_close(got, 2.0 * mult[h, i] + bias[h, i], rtol=0, atol=1e-12)


@pytest.mark.parametrize("case", list(CASES))
def test_fused_forward_equals_eager_and_reference_fp32(case):
    types, grid, prefix, grid_size = CASES[case]
    attn = _layer(types, grid_size, seed=1)
    x = torch.randn(2, prefix + grid[0] * grid[1], attn.qkv.in_features,
                    generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        attn.backend = "eager"
        eager, _ = attn(x, grid, prefix)
        attn.backend = "fused"
        fused, maps = attn(x, grid, prefix)
        reference = _reference_attention(attn.double(), x.double(), grid, prefix)
    assert maps is None
    torch.testing.assert_close(fused, eager, rtol=0, atol=1e-5)
    torch.testing.assert_close(fused.double(), reference, rtol=0, atol=1e-5)


def test_pair_gather_equals_offset_gather():
    types, grid, prefix, grid_size = CASES["mixed heads, class token"]
    attn = _layer(types, grid_size, seed=3)
    x = torch.randn(2, prefix + 16, attn.qkv.in_features)
    B, N, C = x.shape
    with torch.no_grad():
        q, k, v = attn.qkv(x).reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        mult_k, bias_k = attn.prior.offset_values(grid)
        mult_p, bias_p = attn.prior(grid, prefix)
        by_offset = flex.fused_attention(q, k, v, mult=mult_k, bias=bias_k, grid=grid,
                                         num_prefix=prefix, scale=attn.scale)
        by_pair = flex.fused_attention(q, k, v, mult=mult_p, bias=bias_p, grid=grid,
                                       num_prefix=prefix, scale=attn.scale, gather="pair")
    torch.testing.assert_close(by_pair, by_offset, rtol=0, atol=1e-6)


def test_whole_model_fused_equals_eager():
    # spvit_test: conv stem, mixed priors, class token joining, token pooling, attention sharing.
    model = spvit.create_model("spvit_test", seed=0).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        for p in model.parameters():  # non-identity priors
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(5)))
        assert set_attention_backend(model, "eager") == 3  # the shared block has none
        eager = model(x)
        set_attention_backend(model, "fused")
        fused = model(x)
    torch.testing.assert_close(fused, eager, rtol=0, atol=1e-5)


def test_fused_path_skipped_when_maps_are_needed_or_there_is_no_prior(monkeypatch):
    calls = []
    real = attention_module.fused_attention

    def spy(*args, **kwargs):
        calls.append(kwargs["mult"] is not None)
        return real(*args, **kwargs)

    monkeypatch.setattr(attention_module, "fused_attention", spy)
    x = torch.randn(1, 9, 32)
    with torch.no_grad():
        attn = Attention(32, 2, head_types=("mlp", "none"), grid_size=3, backend="fused")
        _, maps = attn(x, (3, 3), need_weights=True)  # a following block shares the maps
        assert calls == [] and maps.shape == (1, 2, 9, 9)
        attn(x, (3, 3))
        assert calls == [True]
        Attention(32, 2, grid_size=3, backend="fused")(x, (3, 3))  # plain heads: SDPA
        assert calls == [True]


def test_fused_path_refuses_cpu_backward_and_auto_trains_on_cpu():
    x = torch.randn(1, 9, 32, requires_grad=True)
    attn = Attention(32, 2, head_types=("mlp", "rpb"), grid_size=3, backend="fused")
    with pytest.raises(ConfigError, match="no backward on CPU"):
        attn(x, (3, 3))
    attn.backend = None  # auto: the CPU kernel, or eager where it cannot be built
    out, _ = attn(x, (3, 3))
    out.sum().backward()
    assert attn.prior.mlp_fc1.weight.grad is not None and x.grad is not None


def test_fused_attention_checks_the_grid():
    q = torch.zeros(1, 1, 9, 16)
    with torch.no_grad(), pytest.raises(ConfigError, match="9 tokens do not form 1 prefix"):
        flex.fused_attention(q, q, q, mult=None, bias=torch.zeros(1, 25), grid=(3, 3),
                             num_prefix=1, scale=0.25)


# ---------------------------------------------------------------------- choice of path
def test_backend_by_device_and_head_width(monkeypatch):
    monkeypatch.delenv(flex.ENV_VAR, raising=False)
    assert flex.resolve_backend(None, "cpu", 64) == ("cpu" if cpu_attention.kernel_available()
                                                      else "eager")
    assert flex.resolve_backend(None, "cuda", 64) == "fused"
    assert flex.resolve_backend(None, torch.device("cuda", 1), 16) == "fused"
    assert flex.resolve_backend(None, "cuda", 8) == "eager"  # below the kernel's tile width
    assert flex.resolve_backend("auto", "cuda:0", 64) == "fused"


def test_backend_overrides_environment_and_argument(monkeypatch):
    monkeypatch.setenv(flex.ENV_VAR, "eager")
    assert flex.resolve_backend(None, "cuda", 64) == "eager"
    assert flex.resolve_backend("fused", "cuda", 64) == "fused"  # the argument wins
    monkeypatch.setenv(flex.ENV_VAR, " Fused ")
    assert flex.resolve_backend(None, "cpu", 8) == "fused"  # forced: the CPU forward reference
    monkeypatch.setenv(flex.ENV_VAR, "")
    assert flex.resolve_backend(None, "cuda", 64) == "fused"  # empty means auto
    monkeypatch.setenv(flex.ENV_VAR, "flash")
    with pytest.raises(ConfigError, match="SPVIT_ATTENTION must be one of"):
        flex.resolve_backend(None, "cuda", 64)
    with pytest.raises(ConfigError, match="backend must be one of"):
        Attention(32, 2, backend="triton")
    monkeypatch.delenv(flex.ENV_VAR)
    with pytest.raises(ConfigError, match="head width >= 16 on CUDA, but got 8"):
        flex.resolve_backend("fused", "cuda", 8)


def test_environment_selects_the_path_of_a_built_model(monkeypatch):
    calls = []
    monkeypatch.setattr(attention_module, "fused_attention",
                        lambda *a, **kw: calls.append(1) or torch.zeros_like(a[0]))
    attn = Attention(32, 2, head_types=("mlp", "none"), grid_size=3)
    x = torch.randn(1, 9, 32)
    with torch.no_grad():
        monkeypatch.setenv(flex.ENV_VAR, "fused")
        attn(x, (3, 3))
        monkeypatch.setenv(flex.ENV_VAR, "eager")
        attn(x, (3, 3))
    assert calls == [1]


def test_set_attention_backend_validates_and_resets():
    model = spvit.create_model("spvit_test", seed=0)
    with pytest.raises(ConfigError, match="backend must be one of"):
        set_attention_backend(model, "fast")
    set_attention_backend(model, "eager")
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    assert layers and all(m.backend == "eager" for m in layers)
    set_attention_backend(model, None)
    assert all(m.backend is None for m in layers)
    assert not any("backend" in key for key in model.state_dict())


def test_compiled_call_raises_the_recompile_limit_only_around_the_call(monkeypatch):
    seen = []

    def fake_compiled(q, k, v, mult, bias, grid, num_prefix, mult_identity, scale, gather):
        seen.append((torch._dynamo.config.recompile_limit, grid, num_prefix, mult_identity,
                     scale, gather, mult.dtype))
        return torch.zeros_like(q)

    monkeypatch.setattr(flex, "_compiled", lambda: fake_compiled)
    before = torch._dynamo.config.recompile_limit
    q = torch.zeros(1, 2, 10, 16, dtype=torch.bfloat16)
    with torch.no_grad():
        flex.fused_attention(q, q, q, mult=torch.ones(2, 25, dtype=torch.bfloat16), bias=None,
                             grid=(3, 3), num_prefix=1, scale=0.25, compile=True)
    assert seen == [(max(64, before), (3, 3), 1, 0.25, 1.0, "offset", torch.float32)]
    assert torch._dynamo.config.recompile_limit == before


# ---------------------------------------------------------------------- compiled (inductor, CPU)
def _cpu_compile_supported() -> bool:
    from torch._inductor.kernel.flex.flex_cpu import check_cpu_supported

    return shutil.which("g++") is not None and check_cpu_supported()


@pytest.mark.slow
@pytest.mark.skipif(not _cpu_compile_supported(), reason="inductor's CPU FlexAttention needs"
                    " AVX2 and a C++ compiler")
def test_compiled_score_mod_equals_eager_without_recompiling():
    """The same score function the CUDA kernel gets, lowered by inductor (its CPU template):
    equal to the eager path, and a new table every step reuses the one compiled graph."""
    from torch._dynamo.utils import counters

    types, grid, prefix, grid_size = CASES["mixed heads, class token"]
    attn = _layer(types, grid_size, seed=6)
    x = torch.randn(2, prefix + 16, attn.qkv.in_features)
    B, N, C = x.shape
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        q, k, v = attn.qkv(x).reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        for step in range(2):
            for p in attn.prior.parameters():  # the prior changes, as in training
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(step)))
            attn.backend = "eager"
            eager, _ = attn(x, grid, prefix)
            mult, bias = attn.prior.offset_values(grid)
            out = flex.fused_attention(q, k, v, mult=mult, bias=bias, grid=grid,
                                       num_prefix=prefix, scale=attn.scale, compile=True)
            fused = attn.proj(out.transpose(1, 2).reshape(B, N, C))
            torch.testing.assert_close(fused, eager, rtol=0, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1
