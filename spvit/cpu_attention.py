"""SP-SA on CPU, training included, without the `(B, H, N, N)` logits: a small C kernel.

`cpu_attention` computes `softmax((Q Kᵀ) * M + B) V` for `q, k, v (B, H, N, d)` and per-head pair
tables `M, B (H, N, N)` (M: the multiplicative prior with the scale folded in, or the plain scale;
B: the additive prior), as the eager path of `spvit.attention.Attention` does, and its gradients
for q, k, v, M and B. On CPU the eager formula is slow for a reason beyond arithmetic: every
`(B, H, N, N)` temporary (logits, the scaled logits, probabilities and their gradients: 39 MB each
at batch 64, 4 heads, 14x14 tokens) is written and read from main memory and freshly paged in,
and `F.scaled_dot_product_attention` takes its unfused math path for a 3-D mask or any mask that
requires grad. The kernel works like flash attention: per (sample, head) and per block of four
query rows it forms the scores against all keys in cache (keys transposed once per head), applies
the prior rows, takes the softmax and accumulates `P V`; it keeps only the output and the row
log-sum-exp. The backward recomputes the block's probabilities from the log-sum-exp and
accumulates dQ, dK, dV and the prior gradients `dM = Σ_b dL * (Q Kᵀ)`, `dB = Σ_b dL` with
`dL = P * (dP - rowsum(dO * O))`. An additive-only forward uses torch's own flash kernel
(`attn_mask` as `(1, H, N, N)`), which returns the same log-sum-exp; inference without a
multiplicative prior is that one call.

The C source below is compiled once per machine with the system C compiler (`$CC`, else `cc`)
into `$SPVIT_KERNEL_DIR` (default `~/.cache/spvit/kernels`, else the temp folder) and loaded with
ctypes; a build takes a second or two and is reused by every later process. Without a compiler the
kernel is unavailable and `spvit.flex.resolve_backend` keeps the eager path. The kernel computes
in float32; other dtypes take the eager path. Torch's thread count splits the (sample, head) pairs
over threads (ctypes releases the GIL), each with its own prior-gradient accumulator.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

KERNEL_DIR_VAR = "SPVIT_KERNEL_DIR"
_CFLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fPIC", "-shared")

_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Vectors of 8 floats (GCC/Clang vector extensions: AVX on x86-64, pairs of NEON registers on
   arm64). Row buffers are padded to np = n rounded up to 8; padded keys get zero keys/values and
   a logit of -1e30. Scores are formed for R = 4 query rows at once so that each key vector
   loaded serves four rows. */
typedef float v8 __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
#define R 4

static inline v8 ld(const float *p) { v8 x; memcpy(&x, p, 32); return x; }
static inline void st(float *p, v8 x) { memcpy(p, &x, 32); }
static inline v8 splat(float a) { return (v8){a, a, a, a, a, a, a, a}; }
static inline v8 vsel(v8i m, v8 a, v8 b) { return (v8)(((v8i)a & m) | ((v8i)b & ~m)); }
static inline v8 vmax(v8 a, v8 b) { return vsel(a > b, a, b); }

/* exp(x) for x <= 0: Cody-Waite reduction, degree-6 polynomial, exponent bits. */
static inline v8 vexp(v8 x) {
    x = vmax(x, splat(-87.0f));
    v8 t = x * 1.44269504088896341f + 0.5f;
    v8i ti = __builtin_convertvector(t, v8i);
    v8 n = __builtin_convertvector(ti, v8);
    n = vsel(n > t, n - 1.0f, n);  /* floor */
    v8 r = x - n * 0.693359375f + n * 2.12194440e-4f;
    v8 p = 1.0f + r * (1.0f + r * (0.5f + r * (1.66666672e-1f + r * (4.16666418e-2f
           + r * (8.33336264e-3f + r * 1.38889157e-3f)))));
    v8i bits = (__builtin_convertvector(n, v8i) + 127) << 23;
    v8 s;
    memcpy(&s, &bits, 32);
    return p * s;
}

/* kt (d, np): keys transposed and zero-padded */
static void transpose_pad(const float *a, int n, int np, int d, float *restrict at) {
    for (int c = 0; c < d; c++) {
        for (int j = 0; j < n; j++) at[(size_t)c * np + j] = a[(size_t)j * d + c];
        for (int j = n; j < np; j++) at[(size_t)c * np + j] = 0.0f;
    }
}

/* s[r][j] = q_r . k_j for the rows of one block, r < rows */
static inline void block_scores(const float *q, int rows, int d, const float *kt, int np,
                                float *restrict s) {
    for (int j0 = 0; j0 < np; j0 += 8) {
        v8 a0 = splat(0), a1 = splat(0), a2 = splat(0), a3 = splat(0);
        for (int c = 0; c < d; c++) {
            v8 kv = ld(kt + (size_t)c * np + j0);
            a0 += q[c] * kv;
            if (rows > 1) a1 += q[d + c] * kv;
            if (rows > 2) a2 += q[2 * d + c] * kv;
            if (rows > 3) a3 += q[3 * d + c] * kv;
        }
        st(s + j0, a0);
        if (rows > 1) st(s + np + j0, a1);
        if (rows > 2) st(s + 2 * np + j0, a2);
        if (rows > 3) st(s + 3 * np + j0, a3);
    }
}

/* l = s * m + b (m: the prior multiplier row with the scale folded in, or the scale) */
static inline void row_logits(const float *s, const float *mrow, const float *brow, float scale,
                              int n, int np, float *restrict l) {
    for (int j = 0; j < n; j++) {
        float x = s[j] * (mrow ? mrow[j] : scale);
        l[j] = brow ? x + brow[j] : x;
    }
    for (int j = n; j < np; j++) l[j] = -1e30f;
}

/* Both entry points return 0, or 1 when their scratch memory cannot be allocated. */
int spsa_forward(const float *q, const float *k, const float *v, const float *mult,
                  const float *bias, float scale, int bh0, int bh1, int heads, int n, int d,
                  float *out, float *lse) {
    const int np = (n + 7) & ~7;
    float *kt = aligned_alloc(32, sizeof(float) * ((size_t)2 * np * d + 2 * R * np));
    if (!kt) return 1;
    float *vt = kt + (size_t)np * d, *s = vt + (size_t)np * d, *p = s + (size_t)R * np;
    for (int bh = bh0; bh < bh1; bh++) {
        const size_t off = (size_t)bh * n * d;
        const int h = bh % heads;
        transpose_pad(k + off, n, np, d, kt);
        transpose_pad(v + off, n, np, d, vt);
        for (int i0 = 0; i0 < n; i0 += R) {
            const int rows = n - i0 < R ? n - i0 : R;
            block_scores(q + off + (size_t)i0 * d, rows, d, kt, np, s);
            float inv[R];
            for (int r = 0; r < rows; r++) {
                const size_t row = ((size_t)h * n + i0 + r) * n;
                float *pr = p + (size_t)r * np;
                row_logits(s + (size_t)r * np, mult ? mult + row : 0, bias ? bias + row : 0,
                           scale, n, np, pr);
                v8 mx = ld(pr);
                for (int j = 8; j < np; j += 8) { v8 x = ld(pr + j); mx = vmax(x, mx); }
                float m = mx[0];
                for (int t = 1; t < 8; t++) m = mx[t] > m ? mx[t] : m;
                v8 sum = splat(0);
                for (int j = 0; j < np; j += 8) {
                    v8 e = vexp(ld(pr + j) - m);
                    st(pr + j, e);
                    sum += e;
                }
                float total = 0.0f;
                for (int t = 0; t < 8; t++) total += sum[t];
                inv[r] = 1.0f / total;
                lse[(size_t)bh * n + i0 + r] = m + logf(total);
            }
            if ((d & 7) == 0) {  /* out_r[c:c+8] = sum_j p_r[j] v_j[c:c+8], no horizontal sums */
                const float *vb = v + off;
                for (int c0 = 0; c0 < d; c0 += 8) {
                    v8 a0 = splat(0), a1 = splat(0), a2 = splat(0), a3 = splat(0);
                    for (int j = 0; j < n; j++) {
                        v8 x = ld(vb + (size_t)j * d + c0);
                        a0 += p[j] * x;
                        a1 += p[np + j] * x;
                        a2 += p[2 * np + j] * x;
                        a3 += p[3 * np + j] * x;
                    }
                    v8 acc[R] = {a0, a1, a2, a3};
                    for (int r = 0; r < rows; r++)
                        st(out + off + (size_t)(i0 + r) * d + c0, acc[r] * inv[r]);
                }
                continue;
            }
            for (int c = 0; c < d; c++) {
                const float *vc = vt + (size_t)c * np;
                v8 a0 = splat(0), a1 = splat(0), a2 = splat(0), a3 = splat(0);
                for (int j = 0; j < np; j += 8) {
                    v8 x = ld(vc + j);
                    a0 += ld(p + j) * x;
                    if (rows > 1) a1 += ld(p + np + j) * x;
                    if (rows > 2) a2 += ld(p + 2 * np + j) * x;
                    if (rows > 3) a3 += ld(p + 3 * np + j) * x;
                }
                v8 acc[R] = {a0, a1, a2, a3};
                for (int r = 0; r < rows; r++) {
                    float t = 0.0f;
                    for (int u = 0; u < 8; u++) t += acc[r][u];
                    out[off + (size_t)(i0 + r) * d + c] = t * inv[r];
                }
            }
        }
    }
    free(kt);
    return 0;
}

/* dmult, dbias: (heads, n, n) accumulators of this call (summed over its rows bh), or NULL */
int spsa_backward(const float *q, const float *k, const float *v, const float *mult,
                   const float *bias, float scale, int bh0, int bh1, int heads, int n, int d,
                   const float *out, const float *lse, const float *dout,
                   float *dq, float *dk, float *dv, float *dmult, float *dbias) {
    const int np = (n + 7) & ~7;
    float *kt = aligned_alloc(32, sizeof(float) * ((size_t)4 * np * d + 3 * R * np));
    if (!kt) return 1;
    float *vt = kt + (size_t)np * d, *dkt = vt + (size_t)np * d, *dvt = dkt + (size_t)np * d;
    float *s = dvt + (size_t)np * d, *p = s + (size_t)R * np, *dp = p + (size_t)R * np;
    for (int bh = bh0; bh < bh1; bh++) {
        const size_t off = (size_t)bh * n * d;
        const int h = bh % heads;
        transpose_pad(k + off, n, np, d, kt);
        transpose_pad(v + off, n, np, d, vt);
        memset(dkt, 0, sizeof(float) * 2 * np * d);
        for (int i0 = 0; i0 < n; i0 += R) {
            const int rows = n - i0 < R ? n - i0 : R;
            const float *qb = q + off + (size_t)i0 * d, *db = dout + off + (size_t)i0 * d;
            block_scores(qb, rows, d, kt, np, s);   /* S = Q Kᵀ */
            block_scores(db, rows, d, vt, np, dp);  /* dP = dO Vᵀ */
            float zero[8 * R] = {0};
            const float *qr[R], *dr[R];
            for (int r = 0; r < R; r++) {
                qr[r] = r < rows ? qb + (size_t)r * d : zero;
                dr[r] = r < rows ? db + (size_t)r * d : zero;
            }
            for (int r = 0; r < rows; r++) {
                const size_t row = ((size_t)h * n + i0 + r) * n;
                const float *mrow = mult ? mult + row : 0;
                float *sr = s + (size_t)r * np, *pr = p + (size_t)r * np;
                float *dpr = dp + (size_t)r * np;
                row_logits(sr, mrow, bias ? bias + row : 0, scale, n, np, pr);
                const float li = lse[(size_t)bh * n + i0 + r];
                float di = 0.0f;
                for (int c = 0; c < d; c++) di += dr[r][c] * out[off + (size_t)(i0 + r) * d + c];
                for (int j = 0; j < np; j += 8) {
                    v8 e = vexp(ld(pr + j) - li);
                    st(pr + j, e);
                    st(dpr + j, e * (ld(dpr + j) - di));  /* dL = P (dP - D) */
                }
                if (dbias)
                    for (int j = 0; j < n; j++) dbias[row + j] += dpr[j];
                if (mrow) {
                    if (dmult)
                        for (int j = 0; j < n; j++) dmult[row + j] += dpr[j] * sr[j];
                    for (int j = 0; j < n; j++) dpr[j] *= mrow[j];
                } else {
                    for (int j = 0; j < n; j++) dpr[j] *= scale;
                }
                for (int j = n; j < np; j++) dpr[j] = pr[j] = 0.0f;
            }
            for (int r = rows; r < R; r++) {
                memset(dp + (size_t)r * np, 0, sizeof(float) * np);
                memset(p + (size_t)r * np, 0, sizeof(float) * np);
            }
            /* dq = dS K, dKᵀ += Q_bᵀ dS, dVᵀ += dO_bᵀ P */
            for (int c = 0; c < d; c++) {
                const float *kc = kt + (size_t)c * np;
                float *dkc = dkt + (size_t)c * np, *dvc = dvt + (size_t)c * np;
                const float q0 = qr[0][c], q1 = qr[1][c], q2 = qr[2][c], q3 = qr[3][c];
                const float g0 = dr[0][c], g1 = dr[1][c], g2 = dr[2][c], g3 = dr[3][c];
                v8 a0 = splat(0), a1 = splat(0), a2 = splat(0), a3 = splat(0);
                for (int j = 0; j < np; j += 8) {
                    v8 kv = ld(kc + j);
                    v8 s0 = ld(dp + j), s1 = ld(dp + np + j);
                    v8 s2 = ld(dp + 2 * np + j), s3 = ld(dp + 3 * np + j);
                    a0 += s0 * kv; a1 += s1 * kv; a2 += s2 * kv; a3 += s3 * kv;
                    st(dkc + j, ld(dkc + j) + s0 * q0 + s1 * q1 + s2 * q2 + s3 * q3);
                    st(dvc + j, ld(dvc + j) + ld(p + j) * g0 + ld(p + np + j) * g1
                                + ld(p + 2 * np + j) * g2 + ld(p + 3 * np + j) * g3);
                }
                v8 acc[R] = {a0, a1, a2, a3};
                for (int r = 0; r < rows; r++) {
                    float t = 0.0f;
                    for (int u = 0; u < 8; u++) t += acc[r][u];
                    dq[off + (size_t)(i0 + r) * d + c] = t;
                }
            }
        }
        for (int j = 0; j < n; j++)
            for (int c = 0; c < d; c++) {
                dk[off + (size_t)j * d + c] = dkt[(size_t)c * np + j];
                dv[off + (size_t)j * d + c] = dvt[(size_t)c * np + j];
            }
    }
    free(kt);
    return 0;
}
"""


def _kernel_dir() -> Path:
    configured = os.environ.get(KERNEL_DIR_VAR)
    if configured:
        return Path(configured)
    home = Path(os.path.expanduser("~"))
    if home.is_dir() and os.access(home, os.W_OK):
        return home / ".cache" / "spvit" / "kernels"
    return Path(tempfile.gettempdir()) / f"spvit-kernels-{os.getuid()}"


def _cpu_signature() -> str:
    """The CPU's feature flags (the build uses -march=native), so that a kernel folder shared by
    different machines keeps one build per CPU kind."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor()


def _build(compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src = Path(tmp) / "spsa_kernel.c"
        src.write_text(_SOURCE)
        out = Path(tmp) / target.name
        subprocess.run([compiler, *_CFLAGS, str(src), "-o", str(out), "-lm"], check=True,
                       capture_output=True, text=True, timeout=300)
        os.replace(out, target)  # atomic: concurrent builders each replace with a whole file


class _Kernel:
    """The loaded library with typed entry points."""

    def __init__(self, path: Path) -> None:
        lib = ctypes.CDLL(str(path))
        ptr, flt, i32 = ctypes.c_void_p, ctypes.c_float, ctypes.c_int
        lib.spsa_forward.argtypes = [ptr] * 5 + [flt] + [i32] * 5 + [ptr] * 2
        lib.spsa_forward.restype = ctypes.c_int
        lib.spsa_backward.argtypes = [ptr] * 5 + [flt] + [i32] * 5 + [ptr] * 8
        lib.spsa_backward.restype = ctypes.c_int
        self.forward = lib.spsa_forward
        self.backward = lib.spsa_backward
        self.path = path


_build_error: str | None = None


@lru_cache(maxsize=1)
def _kernel() -> _Kernel | None:
    global _build_error
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        _build_error = "no C compiler found (set $CC or install gcc)"
        return None
    key = hashlib.sha256("\0".join((_SOURCE, compiler, *_CFLAGS, platform.machine(),
                                     _cpu_signature())).encode()).hexdigest()[:16]
    target = _kernel_dir() / f"spsa_{key}.so"
    try:
        if not target.exists():
            _build(compiler, target)
        return _Kernel(target)
    except (OSError, subprocess.SubprocessError) as err:
        detail = getattr(err, "stderr", None) or str(err)
        _build_error = f"building the kernel with {compiler} failed: {detail.strip()[:500]}"
        return None


def kernel_available() -> bool:
    """True if the CPU kernel is built (building it on first call) and loaded."""
    return _kernel() is not None


def kernel_error() -> str | None:
    """Why the kernel is unavailable, or None."""
    _kernel()
    return _build_error


_pool: ThreadPoolExecutor | None = None
_pool_pid = 0


def _ranges(total: int, parts: int) -> list[tuple[int, int]]:
    step = -(-total // parts)
    return [(start, min(total, start + step)) for start in range(0, total, step)]


def _run(calls: list) -> None:
    """Run kernel calls, one per thread of torch's thread count (ctypes releases the GIL)."""
    global _pool, _pool_pid
    if len(calls) == 1:
        failed = calls[0]()
    else:
        # A forked child inherits the pool object but not its threads: make a new one there.
        if _pool is None or _pool._max_workers < len(calls) or _pool_pid != os.getpid():
            _pool = ThreadPoolExecutor(max_workers=len(calls), thread_name_prefix="spsa")
            _pool_pid = os.getpid()
        failed = any([future.result() for future in [_pool.submit(call) for call in calls]])
    if failed:
        raise MemoryError("the SP-SA CPU kernel could not allocate its scratch rows")


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _forward(q, k, v, mult, bias, scale):
    B, H, N, d = q.shape
    if mult is None and bias is not None:  # torch's flash kernel, which also returns the lse
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, attn_mask=bias[None], scale=scale)
        return out.contiguous(), lse.contiguous()
    kernel = _kernel()
    out = torch.empty_like(q)
    lse = torch.empty(B, H, N, dtype=q.dtype)
    args = (_ptr(q), _ptr(k), _ptr(v), _ptr(mult), _ptr(bias), scale)
    _run([lambda lo=lo, hi=hi: kernel.forward(*args, lo, hi, H, N, d, out.data_ptr(),
                                              lse.data_ptr())
          for lo, hi in _ranges(B * H, max(1, torch.get_num_threads()))])
    return out, lse


class _SPSAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mult, bias, scale):
        out, lse = _forward(q, k, v, mult, bias, scale)
        ctx.save_for_backward(q, k, v, mult, bias, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, v, mult, bias, out, lse = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        B, H, N, d = q.shape
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        ranges = _ranges(B * H, max(1, torch.get_num_threads()))
        want_mult = mult is not None and ctx.needs_input_grad[3]
        want_bias = bias is not None and ctx.needs_input_grad[4]
        # One (H, N, N) accumulator per thread: each sums the gradient over its (sample, head) rows.
        dmult = q.new_zeros(len(ranges), H, N, N) if want_mult else None
        dbias = q.new_zeros(len(ranges), H, N, N) if want_bias else None
        kernel = _kernel()
        args = (_ptr(q), _ptr(k), _ptr(v), _ptr(mult), _ptr(bias), ctx.scale)
        _run([lambda i=i, lo=lo, hi=hi: kernel.backward(
                *args, lo, hi, H, N, d, out.data_ptr(), lse.data_ptr(), grad_out.data_ptr(),
                dq.data_ptr(), dk.data_ptr(), dv.data_ptr(),
                _ptr(dmult[i]) if want_mult else None, _ptr(dbias[i]) if want_bias else None)
              for i, (lo, hi) in enumerate(ranges)])
        return (dq, dk, dv, dmult.sum(0) if want_mult else None,
                dbias.sum(0) if want_bias else None, None)


def supports(q: torch.Tensor) -> bool:
    """True if the kernel can run on `q`'s device and dtype (CPU, float32) and is built."""
    return q.device.type == "cpu" and q.dtype == torch.float32 and kernel_available()


def cpu_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                  mult: torch.Tensor | None, bias: torch.Tensor | None,
                  scale: float) -> torch.Tensor:
    """`softmax((q kᵀ) * mult + bias) v` for `q, k, v (B, H, N, d)`; returns `(B, H, N, d)`.

    Args:
        mult: `(H, N, N)` multiplier with the logit scale folded in (`scale * SP`), or None for
            the plain scale.
        bias: `(H, N, N)` additive prior, or None.
        scale: the logit scale 1/sqrt(d), used where `mult` is None.

    All tensors float32 on CPU (`supports`). Gradients flow to q, k, v, mult and bias.
    """
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    mult = mult.contiguous() if mult is not None else None
    bias = bias.contiguous() if bias is not None else None
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, mult, bias))
    if not needs_grad:
        if mult is None:  # flash attention with the (1, H, N, N) mask; None: plain flash
            mask = bias[None] if bias is not None else None
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        return _forward(q, k, v, mult, bias, scale)[0]
    return _SPSAFunction.apply(q, k, v, mult, bias, float(scale))
