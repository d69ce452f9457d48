"""SP-SA on CPU, training included, without the `(B, H, N, N)` logits: a small C kernel.

`cpu_attention` computes `softmax((Q Kᵀ) * M + B) V` for `q, k, v = qkv.unbind(0)` (each
`(B, H, N, d)`) and per-head pair tables `M, B (H, N, N)` (M: the multiplicative prior with the
scale folded in, or the plain scale; B: the additive prior), as the eager path of
`spvit.attention.Attention` does, and its gradients for qkv, M and B. On CPU the eager formula is
slow for a reason beyond arithmetic: every `(B, H, N, N)` temporary (logits, the scaled logits,
probabilities and their gradients: 39 MB each at batch 64, 4 heads, 14x14 tokens) is written and
read from main memory and freshly paged in, and `F.scaled_dot_product_attention` takes its unfused
math path for a 3-D mask or any mask that requires grad. The kernel works like flash attention:
per (sample, head) and per block of four query rows it forms the scores against all keys in cache
(keys transposed once per head), applies the prior rows, takes the softmax and accumulates `P V`;
it keeps only the output and the row log-sum-exp. The backward recomputes each block's
probabilities from the log-sum-exp and in one pass per row forms `dL = P * (dP - rowsum(dO * O))`,
accumulates the prior gradients `dM = Σ_b dL * (Q Kᵀ)`, `dB = Σ_b dL` and writes `dQ = dS K`
(`dS = dL * M`); it keeps a head's `P` and `dS` (N x N, in cache at these sizes) and takes
`dK = dSᵀ Q`, `dV = Pᵀ dO` at the head's end as register-blocked products. An additive-only
forward uses torch's own flash kernel (`attn_mask` as `(1, H, N, N)`), which returns the same
log-sum-exp; inference without a multiplicative prior is that one call.

Layouts: the kernel reads any strides with a contiguous feature dimension, so the layer hands it
the views of its qkv projection's output as they are; it writes the output as `(B, N, H, d)` in
memory (the next projection's input is a view of it) and the qkv gradient as the projection's
`(B, N, 3, H, d)` output, so no copy is made on either side of the kernel.

The C source below is compiled once per machine with the system C compiler (`$CC`, else `cc`)
into `$SPVIT_KERNEL_DIR` (default `~/.cache/spvit/kernels`, else the temp folder) and loaded with
ctypes; a build takes a second or two and is reused by every later process. Without a compiler the
kernel is unavailable and `spvit.flex.resolve_backend` keeps the eager path. The kernel computes
in float32; other dtypes take the eager path. Torch's thread count splits the (sample, head) pairs
over threads, each with its own prior-gradient accumulator. The build uses OpenMP where the
compiler has it (`-fopenmp`): the library's `libgomp.so.1` then resolves to the runtime torch
has loaded, so the kernel runs on torch's own thread pool. Threads of ours beside that pool
competed with its idle threads, which spin for a while after every parallel torch operation: at
two threads the kernel ran barely faster than at one. Without OpenMP the split runs on Python
threads (ctypes releases the GIL).
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
_OPENMP_FLAG = "-fopenmp"

_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

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

/* The sum of a vector's lanes, as a tree (a sequential sum is a chain of 8 dependent adds). */
static inline float hsum(v8 x) {
    float a = (x[0] + x[4]) + (x[2] + x[6]), b = (x[1] + x[5]) + (x[3] + x[7]);
    return a + b;
}

/* a . b over d values */
static inline float dot(const float *a, const float *b, int d) {
    v8 acc = splat(0);
    int c = 0;
    for (; c + 8 <= d; c += 8) acc += ld(a + c) * ld(b + c);
    float t = hsum(acc);
    for (; c < d; c++) t += a[c] * b[c];
    return t;
}

/* kt (d, np): keys transposed and zero-padded; key j's row starts at a + j * sn */
static void transpose_pad(const float *a, int64_t sn, int n, int np, int d, float *restrict at) {
    for (int c = 0; c < d; c++) {
        for (int j = 0; j < n; j++) at[(size_t)c * np + j] = a[j * sn + c];
        for (int j = n; j < np; j++) at[(size_t)c * np + j] = 0.0f;
    }
}

/* s[r][j] = q_r . k_j for the rows of one block (row r at q + r * sn), r < rows; two 8-wide
   key chunks per pass, so that each broadcast query value serves two key loads */
static inline void block_scores(const float *q, int64_t sn, int rows, int d, const float *kt,
                                int np, float *restrict s) {
    const float *q1 = q + sn, *q2 = q + 2 * sn, *q3 = q + 3 * sn;
    int j0 = 0;
    for (; j0 + 16 <= np; j0 += 16) {
        v8 a0 = splat(0), a1 = splat(0), a2 = splat(0), a3 = splat(0);
        v8 b0 = splat(0), b1 = splat(0), b2 = splat(0), b3 = splat(0);
        for (int c = 0; c < d; c++) {
            const float *kc = kt + (size_t)c * np + j0;
            v8 kv = ld(kc), kw = ld(kc + 8), x;
            x = splat(q[c]); a0 += x * kv; b0 += x * kw;
            if (rows > 1) { x = splat(q1[c]); a1 += x * kv; b1 += x * kw; }
            if (rows > 2) { x = splat(q2[c]); a2 += x * kv; b2 += x * kw; }
            if (rows > 3) { x = splat(q3[c]); a3 += x * kv; b3 += x * kw; }
        }
        st(s + j0, a0); st(s + j0 + 8, b0);
        if (rows > 1) { st(s + np + j0, a1); st(s + np + j0 + 8, b1); }
        if (rows > 2) { st(s + 2 * np + j0, a2); st(s + 2 * np + j0 + 8, b2); }
        if (rows > 3) { st(s + 3 * np + j0, a3); st(s + 3 * np + j0 + 8, b3); }
    }
    for (; j0 < np; j0 += 8) {
        v8 a0 = splat(0), a1 = splat(0), a2 = splat(0), a3 = splat(0);
        for (int c = 0; c < d; c++) {
            v8 kv = ld(kt + (size_t)c * np + j0);
            a0 += q[c] * kv;
            if (rows > 1) a1 += q1[c] * kv;
            if (rows > 2) a2 += q2[c] * kv;
            if (rows > 3) a3 += q3[c] * kv;
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

/* One query row of the backward, in one pass: from the scores sr and dP (dpr, overwritten) the
   probabilities pr = exp(l - lse) of the logits l = sr * m + b and dS = P (dP - D) * m, with the
   prior gradients dL = P (dP - D) (dbrow) and dL * sr (dmrow) accumulated; m is the multiplier
   row or the scale. Entries n .. np - 1 of pr and dpr are set to zero. */
static inline void row_backward(const float *sr, const float *mrow, const float *brow,
                                float scale, float li, float di, int n, int np,
                                float *restrict pr, float *restrict dpr,
                                float *dmrow, float *dbrow) {
    int j = 0;
    for (; j + 8 <= n; j += 8) {
        v8 x = ld(sr + j), m = mrow ? ld(mrow + j) : splat(scale);
        v8 l = x * m;
        if (brow) l += ld(brow + j);
        v8 e = vexp(l - li);
        v8 g = e * (ld(dpr + j) - di);
        if (dbrow) st(dbrow + j, ld(dbrow + j) + g);
        if (dmrow) st(dmrow + j, ld(dmrow + j) + g * x);
        st(pr + j, e);
        st(dpr + j, g * m);
    }
    for (; j < n; j++) {
        float m = mrow ? mrow[j] : scale, l = sr[j] * m + (brow ? brow[j] : 0.0f);
        float e = expf(l - li), g = e * (dpr[j] - di);
        if (dbrow) dbrow[j] += g;
        if (dmrow) dmrow[j] += g * sr[j];
        pr[j] = e;
        dpr[j] = g * m;
    }
    for (; j < np; j++) pr[j] = dpr[j] = 0.0f;
}

/* Layouts: any strides with the last (feature) stride 1, so that q, k, v can be the views of the
   qkv projection's output and the output / gradients can be written where the next layer reads
   them. qs = {s3, sb, sh, sn}: q, k, v start at qkv, qkv + s3, qkv + 2 s3, and row (b, h, i)
   of each at b * sb + h * sh + i * sn. os, gs = {sb, sh, sn}: the output and its gradient.
   lse is contiguous (B, H, N). */
#define AT(base, st, b, h) ((base) + (b) * (st)[0] + (h) * (st)[1])

/* Both entry points return 0, or 1 when their scratch memory cannot be allocated. */
int spsa_forward(const float *qkv, const int64_t *qs, const float *mult, const float *bias,
                 float scale, int bh0, int bh1, int heads, int n, int d,
                 float *out, const int64_t *os, float *lse) {
    const int np = (n + 7) & ~7;
    const int64_t *ts = qs + 1, sn = qs[3], osn = os[2];
    float *kt = aligned_alloc(32, sizeof(float) * ((size_t)2 * np * d + 2 * R * np));
    if (!kt) return 1;
    float *vt = kt + (size_t)np * d, *s = vt + (size_t)np * d, *p = s + (size_t)R * np;
    for (int bh = bh0; bh < bh1; bh++) {
        const int b = bh / heads, h = bh % heads;
        const float *qh = AT(qkv, ts, b, h), *kh = qh + qs[0], *vh = qh + 2 * qs[0];
        float *oh = AT(out, os, b, h);
        transpose_pad(kh, sn, n, np, d, kt);
        transpose_pad(vh, sn, n, np, d, vt);
        for (int i0 = 0; i0 < n; i0 += R) {
            const int rows = n - i0 < R ? n - i0 : R;
            block_scores(qh + i0 * sn, sn, rows, d, kt, np, s);
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
                for (int c0 = 0; c0 < d; c0 += 8) {
                    v8 a0 = splat(0), a1 = splat(0), a2 = splat(0), a3 = splat(0);
                    for (int j = 0; j < n; j++) {
                        v8 x = ld(vh + j * sn + c0);
                        a0 += p[j] * x;
                        a1 += p[np + j] * x;
                        a2 += p[2 * np + j] * x;
                        a3 += p[3 * np + j] * x;
                    }
                    v8 acc[R] = {a0, a1, a2, a3};
                    for (int r = 0; r < rows; r++)
                        st(oh + (i0 + r) * osn + c0, acc[r] * inv[r]);
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
                    oh[(i0 + r) * osn + c] = t * inv[r];
                }
            }
        }
    }
    free(kt);
    return 0;
}

/* out[j * so + c] = sum_i a_i[c] m[i][j] for j < n, c < d: a's rows at a + i * sa, m's rows
   (n of them) np apart. Blocks of 4 features x 16 columns stay in registers over all rows i, so
   each m load serves four multiply-adds and nothing is stored until the block's end. */
static void outer_sum(const float *a, int64_t sa, const float *m, int n, int np, int d,
                      float *restrict out, int64_t so) {
    float tile[4 * 16] __attribute__((aligned(32)));
    for (int c0 = 0; c0 < d; c0 += 4) {
        const int cn = d - c0 < 4 ? d - c0 : 4;
        for (int j0 = 0; j0 < np; j0 += 16) {
            const int wide = j0 + 16 <= np;
            v8 a0 = splat(0), a1 = splat(0), a2 = splat(0), a3 = splat(0);
            v8 b0 = splat(0), b1 = splat(0), b2 = splat(0), b3 = splat(0);
            if (cn == 4 && wide) {
                for (int i = 0; i < n; i++) {
                    const float *mr = m + (size_t)i * np + j0, *ar = a + i * sa + c0;
                    v8 x0 = ld(mr), x1 = ld(mr + 8), w;
                    w = splat(ar[0]); a0 += w * x0; b0 += w * x1;
                    w = splat(ar[1]); a1 += w * x0; b1 += w * x1;
                    w = splat(ar[2]); a2 += w * x0; b2 += w * x1;
                    w = splat(ar[3]); a3 += w * x0; b3 += w * x1;
                }
            } else {  /* a last, narrower block: the same sums, lanes past the edge left zero */
                for (int i = 0; i < n; i++) {
                    const float *mr = m + (size_t)i * np + j0, *ar = a + i * sa + c0;
                    v8 x0 = ld(mr), x1 = wide ? ld(mr + 8) : splat(0);
                    float w0 = ar[0], w1 = cn > 1 ? ar[1] : 0.0f;
                    float w2 = cn > 2 ? ar[2] : 0.0f, w3 = cn > 3 ? ar[3] : 0.0f;
                    a0 += w0 * x0; b0 += w0 * x1; a1 += w1 * x0; b1 += w1 * x1;
                    a2 += w2 * x0; b2 += w2 * x1; a3 += w3 * x0; b3 += w3 * x1;
                }
            }
            st(tile, a0); st(tile + 8, b0); st(tile + 16, a1); st(tile + 24, b1);
            st(tile + 32, a2); st(tile + 40, b2); st(tile + 48, a3); st(tile + 56, b3);
            for (int u = 0; u < 16 && j0 + u < n; u++)
                for (int t = 0; t < cn; t++)
                    out[(j0 + u) * so + c0 + t] = tile[t * 16 + u];
        }
    }
}

/* dq_r[c] = sum_j ds_r[j] k_j[c] for the R rows of a block (ds rows np apart; rows past the
   block's last are zeros), written for r < rows: 8 or 16 features at a time in registers over all
   keys (k_j's row at kh + j * sn); the last d % 8 from the transposed keys kt with lane sums. */
static inline void block_dq(const float *ds, int np, int rows, const float *kh, int64_t sn,
                            const float *kt, int n, int d, float *dq, int64_t dsn) {
    const float *d1 = ds + np, *d2 = ds + 2 * np, *d3 = ds + 3 * np;
    int c0 = 0;
    for (; c0 + 16 <= d; c0 += 16) {
        v8 a0 = splat(0), a1 = splat(0), a2 = splat(0), a3 = splat(0);
        v8 b0 = splat(0), b1 = splat(0), b2 = splat(0), b3 = splat(0);
        for (int j = 0; j < n; j++) {
            const float *kr = kh + j * sn + c0;
            v8 x0 = ld(kr), x1 = ld(kr + 8), w;
            w = splat(ds[j]); a0 += w * x0; b0 += w * x1;
            w = splat(d1[j]); a1 += w * x0; b1 += w * x1;
            w = splat(d2[j]); a2 += w * x0; b2 += w * x1;
            w = splat(d3[j]); a3 += w * x0; b3 += w * x1;
        }
        v8 acc[R][2] = {{a0, b0}, {a1, b1}, {a2, b2}, {a3, b3}};
        for (int r = 0; r < rows; r++) {
            st(dq + r * dsn + c0, acc[r][0]);
            st(dq + r * dsn + c0 + 8, acc[r][1]);
        }
    }
    for (; c0 + 8 <= d; c0 += 8) {
        v8 a0 = splat(0), a1 = splat(0), a2 = splat(0), a3 = splat(0);
        for (int j = 0; j < n; j++) {
            v8 x = ld(kh + j * sn + c0);
            a0 += ds[j] * x; a1 += d1[j] * x; a2 += d2[j] * x; a3 += d3[j] * x;
        }
        v8 acc[R] = {a0, a1, a2, a3};
        for (int r = 0; r < rows; r++) st(dq + r * dsn + c0, acc[r]);
    }
    for (int c = c0; c < d; c++) {
        const float *kc = kt + (size_t)c * np;
        v8 a0 = splat(0), a1 = splat(0), a2 = splat(0), a3 = splat(0);
        for (int j = 0; j < np; j += 8) {
            v8 kv = ld(kc + j);
            a0 += ld(ds + j) * kv; a1 += ld(d1 + j) * kv;
            a2 += ld(d2 + j) * kv; a3 += ld(d3 + j) * kv;
        }
        v8 acc[R] = {a0, a1, a2, a3};
        for (int r = 0; r < rows; r++) dq[r * dsn + c] = hsum(acc[r]);
    }
}

/* dqkv, dqs: the gradients of q, k, v laid out as qkv is by qs ({s3, sb, sh, sn});
   dmult, dbias: (heads, n, n) accumulators of this call (summed over its rows bh), or NULL.
   Per (sample, head): block by block of R query rows, S = Q Kᵀ and dP = dO Vᵀ, the
   probabilities P and dS = P (dP - D) (times the prior multiplier) are formed, the prior
   gradients accumulated and dQ = dS K written; P and dS of every row are kept (n x np each),
   and dK = dSᵀ Q, dV = Pᵀ dO are taken once at the end (outer_sum). */
int spsa_backward(const float *qkv, const int64_t *qs, const float *mult, const float *bias,
                  float scale, int bh0, int bh1, int heads, int n, int d,
                  const float *out, const int64_t *os, const float *lse,
                  const float *dout, const int64_t *gs,
                  float *dqkv, const int64_t *dqs, float *dmult, float *dbias) {
    const int np = (n + 7) & ~7, nr = (n + R - 1) / R * R;
    const int64_t sn = qs[3], osn = os[2], gsn = gs[2], dsn = dqs[3];
    float *kt = aligned_alloc(32, sizeof(float) * ((size_t)2 * np * d + (R + 2 * nr + 1) * np));
    if (!kt) return 1;
    float *vt = kt + (size_t)np * d, *s = vt + (size_t)np * d;
    float *pall = s + (size_t)R * np, *dsall = pall + (size_t)nr * np;
    float *dd = dsall + (size_t)nr * np;  /* D_i = dO_i . O_i of the (sample, head) */
    /* rows n .. nr - 1 of P and dS (past the last query) stay zero */
    memset(pall + (size_t)n * np, 0, sizeof(float) * (nr - n) * np);
    memset(dsall + (size_t)n * np, 0, sizeof(float) * (nr - n) * np);
    for (int bh = bh0; bh < bh1; bh++) {
        const int b = bh / heads, h = bh % heads;
        const float *qh = AT(qkv, qs + 1, b, h), *kh = qh + qs[0], *vh = qh + 2 * qs[0];
        const float *oh = AT(out, os, b, h), *gh = AT(dout, gs, b, h);
        float *dqh = AT(dqkv, dqs + 1, b, h), *dkh = dqh + dqs[0], *dvh = dqh + 2 * dqs[0];
        transpose_pad(kh, sn, n, np, d, kt);
        transpose_pad(vh, sn, n, np, d, vt);
        for (int i = 0; i < n; i++) dd[i] = dot(gh + i * gsn, oh + i * osn, d);
        for (int i0 = 0; i0 < n; i0 += R) {
            const int rows = n - i0 < R ? n - i0 : R;
            const float *qb = qh + i0 * sn, *db = gh + i0 * gsn;
            float *p = pall + (size_t)i0 * np, *dp = dsall + (size_t)i0 * np;
            block_scores(qb, sn, rows, d, kt, np, s);   /* S = Q Kᵀ */
            block_scores(db, gsn, rows, d, vt, np, dp);  /* dP = dO Vᵀ */
            for (int r = 0; r < rows; r++) {
                const size_t row = ((size_t)h * n + i0 + r) * n;
                const float *mrow = mult ? mult + row : 0;
                float *sr = s + (size_t)r * np, *pr = p + (size_t)r * np;
                float *dpr = dp + (size_t)r * np;
                row_backward(sr, mrow, bias ? bias + row : 0, scale,
                             lse[(size_t)bh * n + i0 + r], dd[i0 + r], n, np, pr, dpr,
                             dmult ? dmult + row : 0, dbias ? dbias + row : 0);
            }
            block_dq(dp, np, rows, kh, sn, kt, n, d, dqh + i0 * dsn, dsn);  /* dQ = dS K */
        }
        outer_sum(qh, sn, dsall, n, np, d, dkh, dsn);  /* dK = dSᵀ Q */
        outer_sum(gh, gsn, pall, n, np, d, dvh, dsn);  /* dV = Pᵀ dO */
    }
    free(kt);
    return 0;
}

/* The (sample, head) pairs 0 .. total - 1 split over `threads` threads of the OpenMP runtime
   that is already loaded (torch's, whose pool is then the one that runs them), or run here when
   threads is 1 or the build has no OpenMP. The backward's prior-gradient accumulators are
   (threads, heads, n, n): thread t adds into block t. */
int spsa_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

static inline void thread_range(int total, int t, int nt, int *lo, int *hi) {
    const int step = (total + nt - 1) / nt;
    *lo = t * step < total ? t * step : total;
    *hi = *lo + step < total ? *lo + step : total;
}

int spsa_forward_threads(int threads, const float *qkv, const int64_t *qs, const float *mult,
                         const float *bias, float scale, int total, int heads, int n, int d,
                         float *out, const int64_t *os, float *lse) {
    int failed = 0;
#ifdef _OPENMP
    if (threads > 1) {
#pragma omp parallel num_threads(threads) reduction(| : failed)
        {
            int lo, hi;
            thread_range(total, omp_get_thread_num(), omp_get_num_threads(), &lo, &hi);
            if (lo < hi)
                failed |= spsa_forward(qkv, qs, mult, bias, scale, lo, hi, heads, n, d, out, os,
                                       lse);
        }
        return failed;
    }
#endif
    (void)threads;
    return spsa_forward(qkv, qs, mult, bias, scale, 0, total, heads, n, d, out, os, lse);
}

int spsa_backward_threads(int threads, const float *qkv, const int64_t *qs, const float *mult,
                          const float *bias, float scale, int total, int heads, int n, int d,
                          const float *out, const int64_t *os, const float *lse,
                          const float *dout, const int64_t *gs,
                          float *dqkv, const int64_t *dqs, float *dmult, float *dbias) {
    int failed = 0;
    const size_t block = (size_t)heads * n * n;
#ifdef _OPENMP
    if (threads > 1) {
#pragma omp parallel num_threads(threads) reduction(| : failed)
        {
            const int t = omp_get_thread_num();
            int lo, hi;
            thread_range(total, t, omp_get_num_threads(), &lo, &hi);
            if (lo < hi)
                failed |= spsa_backward(qkv, qs, mult, bias, scale, lo, hi, heads, n, d, out, os,
                                        lse, dout, gs, dqkv, dqs,
                                        dmult ? dmult + t * block : 0,
                                        dbias ? dbias + t * block : 0);
        }
        return failed;
    }
#endif
    (void)threads;
    (void)block;
    return spsa_backward(qkv, qs, mult, bias, scale, 0, total, heads, n, d, out, os, lse, dout,
                         gs, dqkv, dqs, dmult, dbias);
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


def _build(compiler: str, flags: tuple[str, ...], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src = Path(tmp) / "spsa_kernel.c"
        src.write_text(_SOURCE)
        out = Path(tmp) / target.name
        subprocess.run([compiler, *flags, str(src), "-o", str(out), "-lm"], check=True,
                       capture_output=True, text=True, timeout=300)
        os.replace(out, target)  # atomic: concurrent builders each replace with a whole file


class _Kernel:
    """The loaded library with typed entry points."""

    def __init__(self, path: Path) -> None:
        lib = ctypes.CDLL(str(path))
        ptr, flt, i32 = ctypes.c_void_p, ctypes.c_float, ctypes.c_int
        lib.spsa_forward.argtypes = [ptr] * 4 + [flt] + [i32] * 5 + [ptr] * 3
        lib.spsa_forward.restype = ctypes.c_int
        lib.spsa_backward.argtypes = [ptr] * 4 + [flt] + [i32] * 5 + [ptr] * 9
        lib.spsa_backward.restype = ctypes.c_int
        lib.spsa_forward_threads.argtypes = [i32] + [ptr] * 4 + [flt] + [i32] * 4 + [ptr] * 3
        lib.spsa_forward_threads.restype = ctypes.c_int
        lib.spsa_backward_threads.argtypes = [i32] + [ptr] * 4 + [flt] + [i32] * 4 + [ptr] * 9
        lib.spsa_backward_threads.restype = ctypes.c_int
        self.forward = lib.spsa_forward
        self.backward = lib.spsa_backward
        self.forward_threads = lib.spsa_forward_threads
        self.backward_threads = lib.spsa_backward_threads
        # Built with OpenMP: the threads are those of the runtime torch loaded (the library's
        # libgomp.so.1 resolves to it), so the kernel runs on torch's own pool, whose idle
        # threads would otherwise spin on the cores that threads of ours need.
        self.openmp = bool(lib.spsa_openmp())
        self.path = path


_build_error: str | None = None


@lru_cache(maxsize=1)
def _kernel() -> _Kernel | None:
    global _build_error
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        _build_error = "no C compiler found (set $CC or install gcc)"
        return None
    def target(flags: tuple[str, ...]) -> Path:
        key = hashlib.sha256("\0".join((_SOURCE, compiler, *flags, platform.machine(),
                                         _cpu_signature())).encode()).hexdigest()[:16]
        return _kernel_dir() / f"spsa_{key}.so"

    # With OpenMP where the compiler has it; a failed OpenMP build leaves a marker so that later
    # processes go straight to the plain build (threads from Python then).
    with_omp = target((*_CFLAGS, _OPENMP_FLAG))
    no_omp_marker = with_omp.with_suffix(".no-openmp")
    try:
        if with_omp.exists():
            return _Kernel(with_omp)
        if not no_omp_marker.exists():
            try:
                _build(compiler, (*_CFLAGS, _OPENMP_FLAG), with_omp)
                return _Kernel(with_omp)
            except (OSError, subprocess.SubprocessError):
                no_omp_marker.parent.mkdir(parents=True, exist_ok=True)
                no_omp_marker.touch()
        plain = target(_CFLAGS)
        if not plain.exists():
            _build(compiler, _CFLAGS, plain)
        return _Kernel(plain)
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
    _check(failed)


def _check(failed: int | bool) -> None:
    if failed:
        raise MemoryError("the SP-SA CPU kernel could not allocate its scratch rows")


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _strides(t: torch.Tensor, first: int) -> torch.Tensor:
    """The kernel's layout record of `t`: its strides from dimension `first` to the row stride
    (the feature stride is 1), as int64."""
    return torch.tensor(t.stride()[first:-1], dtype=torch.int64)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """`t` if its feature (last) dimension is contiguous, as the kernel reads rows, else a copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _empty_qkv(B: int, H: int, N: int, d: int) -> torch.Tensor:
    """`(3, B, H, N, d)` laid out as the qkv projection's `(B, N, 3, H, d)` output, so that the
    gradient flows back through the layer's permute and reshape as views, without copies."""
    return torch.empty(B, N, 3, H, d).permute(2, 0, 3, 1, 4)


def _forward(qkv, mult, bias, scale):
    _, B, H, N, d = qkv.shape
    if mult is None and bias is not None:  # torch's flash kernel, which also returns the lse
        q, k, v = qkv.unbind(0)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, attn_mask=bias[None], scale=scale)
        return _rows(out), lse.contiguous()
    kernel = _kernel()
    out = torch.empty(B, N, H, d).transpose(1, 2)  # (B, H, N, d) as the next layer reads it
    lse = torch.empty(B, H, N, dtype=qkv.dtype)
    qs, os_ = _strides(qkv, 0), _strides(out, 0)
    args = (_ptr(qkv), _ptr(qs), _ptr(mult), _ptr(bias), scale)
    threads = max(1, torch.get_num_threads())
    if kernel.openmp:
        _check(kernel.forward_threads(threads, *args, B * H, H, N, d, out.data_ptr(),
                                      os_.data_ptr(), lse.data_ptr()))
        return out, lse
    _run([lambda lo=lo, hi=hi: kernel.forward(*args, lo, hi, H, N, d, out.data_ptr(),
                                              os_.data_ptr(), lse.data_ptr())
          for lo, hi in _ranges(B * H, threads)])
    return out, lse


class _SPSAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, mult, bias, scale):
        out, lse = _forward(qkv, mult, bias, scale)
        ctx.save_for_backward(qkv, mult, bias, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        qkv, mult, bias, out, lse = ctx.saved_tensors
        grad_out = _rows(grad_out)
        _, B, H, N, d = qkv.shape
        dqkv = _empty_qkv(B, H, N, d)
        threads = max(1, torch.get_num_threads())
        ranges = _ranges(B * H, threads)
        want_mult = mult is not None and ctx.needs_input_grad[1]
        want_bias = bias is not None and ctx.needs_input_grad[2]
        # One (H, N, N) accumulator per thread: each sums the gradient over its (sample, head) rows.
        kernel = _kernel()
        slots = threads if kernel.openmp else len(ranges)
        dmult = qkv.new_zeros(slots, H, N, N) if want_mult else None
        dbias = qkv.new_zeros(slots, H, N, N) if want_bias else None
        layouts = [_strides(qkv, 0), _strides(out, 0), _strides(grad_out, 0),
                   _strides(dqkv, 0)]
        qs, os_, gs, dqs = (_ptr(t) for t in layouts)
        args = (_ptr(qkv), qs, _ptr(mult), _ptr(bias), ctx.scale)
        if kernel.openmp:
            _check(kernel.backward_threads(
                threads, *args, B * H, H, N, d, out.data_ptr(), os_, lse.data_ptr(),
                grad_out.data_ptr(), gs, dqkv.data_ptr(), dqs, _ptr(dmult), _ptr(dbias)))
        else:
            _run([lambda i=i, lo=lo, hi=hi: kernel.backward(
                    *args, lo, hi, H, N, d, out.data_ptr(), os_, lse.data_ptr(),
                    grad_out.data_ptr(), gs, dqkv.data_ptr(), dqs,
                    _ptr(dmult[i]) if want_mult else None,
                    _ptr(dbias[i]) if want_bias else None)
                  for i, (lo, hi) in enumerate(ranges)])
        if want_mult:
            dmult = dmult[0] if slots == 1 else dmult.sum(0)
        if want_bias:
            dbias = dbias[0] if slots == 1 else dbias.sum(0)
        return dqkv, dmult, dbias, None


def supports(q: torch.Tensor) -> bool:
    """True if the kernel can run on `q`'s device and dtype (CPU, float32) and is built."""
    return q.device.type == "cpu" and q.dtype == torch.float32 and kernel_available()


def cpu_attention(qkv: torch.Tensor, *, mult: torch.Tensor | None, bias: torch.Tensor | None,
                  scale: float) -> torch.Tensor:
    """`softmax((q kᵀ) * mult + bias) v` for `q, k, v = qkv.unbind(0)`, each `(B, H, N, d)`;
    returns `(B, H, N, d)`.

    Args:
        qkv: `(3, B, H, N, d)`, any strides with a contiguous feature dimension: the view
            `linear(x).reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4)` is read in place, and its
            gradient is laid out like that projection's output, so no copy is made either way.
        mult: `(H, N, N)` multiplier with the logit scale folded in (`scale * SP`), or None for
            the plain scale.
        bias: `(H, N, N)` additive prior, or None.
        scale: the logit scale 1/sqrt(d), used where `mult` is None.

    The output is laid out as `(B, N, H, d)`: `out.transpose(1, 2).reshape(B, N, H * d)` is a
    view. All tensors float32 on CPU (`supports`). Gradients flow to qkv, mult and bias.
    """
    qkv = _rows(qkv)
    mult = mult.contiguous() if mult is not None else None
    bias = bias.contiguous() if bias is not None else None
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (qkv, mult, bias))
    if not needs_grad:
        if mult is None:  # flash attention with the (1, H, N, N) mask; None: plain flash
            mask = bias[None] if bias is not None else None
            q, k, v = qkv.unbind(0)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        return _forward(qkv, mult, bias, scale)[0]
    return _SPSAFunction.apply(qkv, mult, bias, float(scale))
