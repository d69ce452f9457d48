"""The CPU kernel path of SP-SA (spvit.cpu_attention): outputs and gradients of q, k, v, the
layer's weights and every prior family's parameters against a plain float64 reference written
here, the inference path, the backend choice and the kernel build."""

from __future__ import annotations

import ast
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from spvit import cpu_attention, flex
from spvit.attention import Attention
from spvit.errors import ConfigError

torch.set_num_threads(1)

pytestmark = pytest.mark.skipif(not cpu_attention.kernel_available(),
                                reason=f"CPU kernel unavailable: {cpu_attention.kernel_error()}")


# ---------------------------------------------------------------------- plain reference
def _pair_offsets(gh, gw, dtype):
    """(dx, dy) of every (query, key) pair of a row-major grid, `(N, N)` each."""
    rows = torch.tensor([r for r in range(gh) for _ in range(gw)], dtype=dtype)
    cols = torch.tensor([c for _ in range(gh) for c in range(gw)], dtype=dtype)
    return cols[None, :] - cols[:, None], rows[None, :] - rows[:, None]


def _head_prior(prior, kind, head, gh, gw):
    """One head's prior over all pairs from the parameters, differentiably: `(N, N)`."""
    dx, dy = _pair_offsets(gh, gw, torch.float64)
    if kind == "mlp":
        i, d = prior.mlp_heads.index(head), prior.head_dim
        w1 = prior.mlp_fc1.weight[i * d:(i + 1) * d]  # (d, 2) acting on (dx, dy)
        b1 = prior.mlp_fc1.bias[i * d:(i + 1) * d]
        hidden = torch.relu(dx[..., None] * w1[:, 0] + dy[..., None] * w1[:, 1] + b1)
        return hidden @ prior.mlp_weight[i] + prior.mlp_bias[i]
    if kind == "gaussian":
        a, lx, ly = prior.gaussian[prior.gaussian_heads.index(head)]
        return 1 + a * torch.exp(-0.5 * ((dx / lx.exp()) ** 2 + (dy / ly.exp()) ** 2))
    if kind == "axial":
        r, c, lw = prior.axial[prior.axial_heads.index(head)]
        w = lw.exp()
        return 1 + r * torch.exp(-0.5 * (dy / w) ** 2) + c * torch.exp(-0.5 * (dx / w) ** 2)
    if kind == "rpb":
        s = prior.grid_size
        iy = (dy.long() + s - 1).clamp(0, 2 * s - 2)
        ix = (dx.long() + s - 1).clamp(0, 2 * s - 2)
        return prior.rpb_table[prior.rpb_heads.index(head)][iy, ix]
    if kind == "decay":
        return -prior.decay[prior.decay_heads.index(head)] * torch.sqrt(dx ** 2 + dy ** 2)
    raise AssertionError(kind)


def _reference(attn: Attention, x, grid, num_prefix):
    """softmax((Q Kᵀ / sqrt(d)) * SP + B) V head by head, with the priors of `_head_prior`."""
    B, N, C = x.shape
    d = attn.head_dim
    q, k, v = (x @ attn.qkv.weight.t() + attn.qkv.bias).split(C, dim=-1)
    outs = []
    for h, kind in enumerate(attn.head_types):
        sl = slice(h * d, (h + 1) * d)
        logits = q[..., sl] @ k[..., sl].transpose(-1, -2) / math.sqrt(d)  # (B, N, N)
        if kind != "none":
            table = _head_prior(attn.prior, kind, h, *grid)
            additive = kind in ("rpb", "decay")
            full = F.pad(table, (num_prefix, 0, num_prefix, 0), value=0.0 if additive else 1.0)
            logits = logits + full if additive else logits * full
        outs.append(logits.softmax(-1) @ v[..., sl])
    return torch.cat(outs, -1) @ attn.proj.weight.t() + attn.proj.bias


def _layer(types, *, head_dim=16, grid_size=4, seed=0):
    torch.manual_seed(seed)
    attn = Attention(head_dim * len(types), len(types), head_types=tuple(types),
                     grid_size=grid_size, backend="cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # a trained-looking prior, not the identity
        for p in attn.prior.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return attn


def _grads(attn, x, grid, num_prefix, forward):
    """Output and gradients of x and of every parameter for the loss sum(out * w)."""
    x = x.detach().clone().requires_grad_()
    attn.zero_grad(set_to_none=True)
    out = forward(attn, x, grid, num_prefix)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1),
                         dtype=torch.float64).to(out.dtype)
    (out * weight).sum().backward()
    grads = {"out": out.detach(), "x": x.grad}
    grads.update({name: p.grad for name, p in attn.named_parameters()})
    return grads


CASES = {
    "mlp": (["mlp"] * 3, (4, 4), 0),
    "gaussian": (["gaussian"] * 2, (3, 5), 0),
    "axial": (["axial", "none"], (4, 4), 1),
    "rpb": (["rpb"] * 2, (4, 4), 0),
    "decay": (["decay", "none"], (3, 3), 1),
    "additive mix, class token": (["rpb", "decay", "none"], (4, 4), 1),
    "all families, class token": (["mlp", "none", "gaussian", "rpb", "axial", "decay"], (4, 4), 1),
    "grid larger than the architecture's": (["rpb", "mlp"], (5, 4), 0),
}


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("case", list(CASES))
def test_kernel_gradients_match_the_plain_reference(case, threads):
    types, grid, prefix = CASES[case]
    attn = _layer(types)
    x = torch.randn(3, prefix + grid[0] * grid[1], attn.qkv.in_features)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # two threads: two accumulators of the prior gradients
    try:
        got = _grads(attn, x, grid, prefix, lambda a, t, g, p: a(t, g, p)[0])
    finally:
        torch.set_num_threads(before)
    want = _grads(attn.double(), x.double(), grid, prefix, _reference)
    assert set(got) == set(want) and any(name.startswith("prior.") for name in got)
    for name, value in want.items():
        assert got[name] is not None, name
        torch.testing.assert_close(got[name].double(), value, rtol=1e-5, atol=1e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("head_dim", [12, 16, 24, 36, 48])
def test_raw_kernel_against_the_eager_formula(head_dim):
    # Token counts off the kernel's 8-wide rows and blocks of 4 query rows; head widths on and
    # off its 8-wide path for P V.
    torch.manual_seed(0)
    B, H, N = 2, 3, 13
    q, k, v = (torch.randn(B, H, N, head_dim, dtype=torch.float64) for _ in range(3))
    mult = 1 + 0.3 * torch.randn(H, N, N, dtype=torch.float64)
    bias = 0.5 * torch.randn(H, N, N, dtype=torch.float64)
    scale = head_dim ** -0.5
    for m, b in ((mult * scale, None), (None, bias), (mult * scale, bias), (None, None)):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        tables = [t.clone().requires_grad_() if t is not None else None for t in (m, b)]
        logits = (leaves[0] @ leaves[1].transpose(-1, -2)) * (tables[0] if m is not None
                                                               else scale)
        if b is not None:
            logits = logits + tables[1]
        want = logits.softmax(-1) @ leaves[2]
        g = torch.randn(want.shape, dtype=torch.float64)
        want_grads = torch.autograd.grad(want, [t for t in leaves + tables if t is not None], g)
        leaves32 = [t.float().requires_grad_() for t in (q, k, v)]
        tables32 = [t.float().requires_grad_() if t is not None else None for t in (m, b)]
        got = cpu_attention.cpu_attention(torch.stack(leaves32), mult=tables32[0],
                                          bias=tables32[1], scale=scale)
        got_grads = torch.autograd.grad(got, [t for t in leaves32 + tables32 if t is not None],
                                        g.float())
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
        for a, w in zip(got_grads, want_grads, strict=True):
            torch.testing.assert_close(a.double(), w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tables", ["mult", "bias"])
def test_kernel_reads_the_projection_in_place_and_returns_its_layout(tables):
    # qkv as the layer makes it, a view of the projection's (B, N, 3 H d) output: the kernel
    # reads it in place, its output reshapes to (B, N, H d) as a view, and the gradient arrives
    # laid out as the projection's output (no copies either way); values as the plain formula.
    torch.manual_seed(1)
    B, H, N, d = 2, 3, 11, 16
    lin = torch.randn(B, N, 3 * H * d, requires_grad=True)
    table = (0.2 * torch.randn(H, N, N) + (0.25 if tables == "mult" else 0.0)).requires_grad_()
    qkv = lin.reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4)
    seen = []
    qkv.register_hook(seen.append)
    out = cpu_attention.cpu_attention(qkv, mult=table if tables == "mult" else None,
                                      bias=table if tables == "bias" else None, scale=0.25)
    flat = out.transpose(1, 2).reshape(B, N, H * d)
    assert flat._is_view() and flat.data_ptr() == out.data_ptr()
    g = torch.randn(B, N, H * d)
    got = torch.autograd.grad(flat, [lin, table], g)
    assert seen[0].permute(1, 3, 0, 2, 4).is_contiguous()

    lin64 = lin.detach().double().requires_grad_()
    table64 = table.detach().double().requires_grad_()
    q, k, v = lin64.reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4).unbind(0)
    logits = q @ k.transpose(-1, -2)
    logits = logits * table64 if tables == "mult" else logits * 0.25 + table64
    want_out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(B, N, H * d)
    want = torch.autograd.grad(want_out, [lin64, table64], g.double())
    torch.testing.assert_close(flat.double(), want_out, rtol=1e-5, atol=1e-5)
    for a, w in zip(got, want, strict=True):
        torch.testing.assert_close(a.double(), w, rtol=1e-5, atol=1e-5)


def test_inference_uses_flash_with_a_4d_mask_and_no_kernel(monkeypatch):
    masks, kernel_calls = [], []
    real_sdpa = F.scaled_dot_product_attention

    def sdpa_spy(*args, attn_mask=None, **kwargs):
        masks.append(None if attn_mask is None else attn_mask.dim())
        return real_sdpa(*args, attn_mask=attn_mask, **kwargs)

    real_forward = cpu_attention._forward
    monkeypatch.setattr(cpu_attention.F, "scaled_dot_product_attention", sdpa_spy)
    monkeypatch.setattr(cpu_attention, "_forward",
                        lambda *a: kernel_calls.append(a[1] is not None) or real_forward(*a))
    additive, multiplicative = _layer(["rpb", "decay"]), _layer(["mlp", "none"])
    x = torch.randn(2, 16, 32)
    with torch.no_grad():
        out, _ = additive(x, (4, 4))
        assert masks == [4] and kernel_calls == []
        torch.testing.assert_close(out.double(), _reference(additive.double(), x.double(),
                                                            (4, 4), 0), rtol=0, atol=1e-5)
        multiplicative(x, (4, 4))
        assert masks == [4] and kernel_calls == [True]  # the kernel's forward, no graph kept
    out, _ = additive.float()(x, (4, 4))  # training: flash forward with the lse, kernel backward
    assert out.requires_grad and kernel_calls == [True, False]


def test_auto_picks_the_kernel_on_cpu_and_eager_overrides(monkeypatch):
    monkeypatch.delenv(flex.ENV_VAR, raising=False)
    assert flex.resolve_backend(None, "cpu", 16) == "cpu"
    calls = []
    monkeypatch.setattr("spvit.attention.cpu_attention",
                        lambda *a, **kw: calls.append(1) or torch.zeros_like(a[0][0]))
    attn = _layer(["mlp", "rpb"])
    attn.backend = None
    x = torch.randn(1, 16, 32)
    attn(x, (4, 4))
    attn.double()(x.double(), (4, 4))  # the kernel is float32 only: eager
    attn.float()
    attn(x, (4, 4), need_weights=True)  # a following block shares the maps: eager
    monkeypatch.setenv(flex.ENV_VAR, "eager")
    attn(x, (4, 4))
    assert calls == [1]
    with pytest.raises(ConfigError, match="runs on CPU tensors, but the layer runs on cuda"):
        flex.resolve_backend("cpu", "cuda", 16)


def test_without_a_compiler_auto_is_eager_and_forced_cpu_refuses(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv(cpu_attention.KERNEL_DIR_VAR, str(tmp_path / "kernels"))
    monkeypatch.delenv(flex.ENV_VAR, raising=False)
    cpu_attention._kernel.cache_clear()
    try:
        assert not cpu_attention.kernel_available()
        assert flex.resolve_backend(None, "cpu", 16) == "eager"
        with pytest.raises(ConfigError, match="needs its C kernel, which is unavailable.*"
                                              "SPVIT_ATTENTION=eager"):
            flex.resolve_backend("cpu", "cpu", 16)
        attn = _layer(["mlp"])
        attn.backend = None
        out, _ = attn(torch.randn(1, 16, 16), (4, 4))  # trains on the eager path
        assert out.requires_grad
    finally:
        monkeypatch.undo()
        cpu_attention._kernel.cache_clear()
    assert cpu_attention.kernel_available()


def test_kernel_is_built_once_into_its_folder(monkeypatch, tmp_path):
    monkeypatch.setenv(cpu_attention.KERNEL_DIR_VAR, str(tmp_path))
    cpu_attention._kernel.cache_clear()
    try:
        assert cpu_attention.kernel_available()
        built = list(tmp_path.glob("spsa_*.so"))
        assert len(built) == 1 and not list(tmp_path.glob("tmp*"))  # no build leftovers
        stamp = built[0].stat().st_mtime_ns
        cpu_attention._kernel.cache_clear()
        assert cpu_attention.kernel_available() and built[0].stat().st_mtime_ns == stamp
    finally:
        monkeypatch.undo()
        cpu_attention._kernel.cache_clear()


def test_kernel_runs_on_torchs_openmp_pool_and_without_openmp_on_python_threads(monkeypatch,
                                                                                 tmp_path):
    # Built with OpenMP (this machine's compiler has it), the library's libgomp is torch's.
    assert cpu_attention._kernel().openmp
    if Path("/proc/self/maps").exists():
        # In a fresh process importing torch alone (other packages, scikit-learn for one, bring
        # their own renamed libgomp), loading the kernel maps no second OpenMP runtime.
        probe = ("import torch\n"
                 "from pathlib import Path\n"
                 "from spvit import cpu_attention\n"
                 "assert cpu_attention._kernel().openmp\n"
                 "maps = Path('/proc/self/maps').read_text().splitlines()\n"
                 "print(sorted({l.split()[-1] for l in maps if 'libgomp' in l}))\n")
        root = Path(__file__).resolve().parents[2]
        env = {**os.environ, "PYTHONPATH": str(root)}
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                             env=env, cwd=root, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        gomp = ast.literal_eval(out.stdout.strip().splitlines()[-1])
        torch_lib = Path(torch.__file__).resolve().parent / "lib"
        assert len(gomp) == 1, gomp  # one OpenMP runtime in the process, not two
        assert Path(gomp[0]).resolve().parent == torch_lib, gomp  # and it is torch's
    # A compiler without OpenMP: the failed build leaves a marker, the plain build is used and
    # the threads are Python's; two threads give the reference's gradients there too.
    monkeypatch.setattr(cpu_attention, "_OPENMP_FLAG", "-fno-such-openmp-flag")
    monkeypatch.setenv(cpu_attention.KERNEL_DIR_VAR, str(tmp_path))
    cpu_attention._kernel.cache_clear()
    before = torch.get_num_threads()
    try:
        kernel = cpu_attention._kernel()
        assert kernel is not None and not kernel.openmp
        assert len(list(tmp_path.glob("*.no-openmp"))) == 1
        types, grid, prefix = CASES["all families, class token"]
        attn = _layer(types)
        x = torch.randn(3, prefix + grid[0] * grid[1], attn.qkv.in_features)
        torch.set_num_threads(2)
        got = _grads(attn, x, grid, prefix, lambda a, t, g, p: a(t, g, p)[0])
        torch.set_num_threads(before)
        want = _grads(attn.double(), x.double(), grid, prefix, _reference)
        for name, value in want.items():
            torch.testing.assert_close(got[name].double(), value, rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(before)
        monkeypatch.undo()
        cpu_attention._kernel.cache_clear()
    assert cpu_attention._kernel().openmp


@pytest.mark.parametrize("prior", ["mlp", "decay"])
def test_a_torchscript_trace_records_the_eager_formula(prior):
    """The ONNX export traces the model: a kernel call would be recorded as a constant output."""
    import spvit
    from spvit import ArchSpec

    spec = ArchSpec.uniform(depth=1, heads=2, embed_dim=16, img_size=8, patch_size=2,
                            in_chans=1, num_classes=3, head="avg", prior=prior)
    model = spvit.create_model(spec, seed=0).eval()
    gen = torch.Generator().manual_seed(0)
    x, other = (torch.randn(2, 1, 8, 8, generator=gen) for _ in range(2))
    with torch.no_grad():
        traced = torch.jit.trace(model, x, check_trace=False)
        torch.testing.assert_close(traced(other), model(other), atol=1e-5, rtol=1e-5)
