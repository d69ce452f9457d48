"""Fused SP-SA: the spatial priors as a FlexAttention `score_mod`, and the choice of attention path.

`fused_attention` computes the function of the eager path of `spvit.attention.Attention`,
`softmax((Q Kᵀ / sqrt(d)) * SP + B) V`, without materialising the `(B, H, N, N)` logits: the
multiplier SP and the bias B enter as a `score_mod` of `torch.nn.attention.flex_attention`, which
reads each pair's prior from the per-head table over unique offsets (`SpatialPrior.offset_values`,
`(H, K)` with K = (2*Gh - 1) * (2*Gw - 1)) by computing the pair's offset index from `q_idx` and
`kv_idx` on the token grid. Prefix (class) tokens get the identity (multiplier 1, bias 0), as in
`SpatialPrior.forward`. The score function knows nothing of prior families: any family that
`offset_values` tabulates, multiplicative or additive, plugs in. The scale 1/sqrt(d) is folded into
the multiplier table (as the eager path folds it into its `(H, N, N)` multiplier), so the score
function applies `score * (scale * SP) + B`, the eager formula term for term. SP multiplies the
logits, not the probabilities, so no `log(SP)` rewrite is involved and SP may take any sign.

Gradients reach the tables (FlexAttention differentiates captured tensors), hence the prior's
parameters. On CUDA the call is compiled (`torch.compile`) into FlexAttention's fused Triton
kernels, forward and backward. FlexAttention has no backward on CPU, so on CPU it serves only as
a forward reference (uncompiled, as tests use it).

Attention path (`resolve_backend`): `auto` (default) picks `fused` on CUDA when the head width is
at least 16 (the Triton kernel's tile floor) and FlexAttention exists in this torch; on CPU it
picks `cpu`, the C kernel of `spvit.cpu_attention` (forward and backward without the
`(B, H, N, N)` logits), when that kernel builds; else `eager`. Override per process with the
environment variable `SPVIT_ATTENTION=auto|fused|cpu|eager`, per layer with
`Attention(backend=...)`, or for a whole model with `set_attention_backend(model, ...)`; the
argument wins over the environment. `fused` forced on CPU runs FlexAttention uncompiled, forward
only (a reference). The eager path is also taken whenever the attention probabilities are
requested (a following block shares them).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from . import cpu_attention
from .errors import ConfigError

Grid = tuple[int, int]

BACKENDS: tuple[str, ...] = ("auto", "fused", "cpu", "eager")
ENV_VAR = "SPVIT_ATTENTION"
MIN_FUSED_HEAD_DIM = 16  # the CUDA FlexAttention kernel's tl.dot needs head widths >= 16
GATHERS: tuple[str, ...] = ("offset", "pair")

try:  # torch >= 2.5
    from torch.nn.attention.flex_attention import flex_attention as _flex_attention
except ImportError:  # pragma: no cover - older torch: the eager path everywhere
    _flex_attention = None


def flex_available() -> bool:
    """True if this torch has FlexAttention."""
    return _flex_attention is not None


def requested_backend(backend: str | None = None) -> str:
    """The requested path: `backend` if given, else `$SPVIT_ATTENTION`, else `auto`; validated."""
    source = "backend" if backend is not None else ENV_VAR
    value = backend if backend is not None else os.environ.get(ENV_VAR, "") or "auto"
    value = value.strip().lower()
    if value not in BACKENDS:
        raise ConfigError(f"attention {source} must be one of {list(BACKENDS)}, but got"
                          f" {value!r}. Set {ENV_VAR}=auto (fused on CUDA, the cpu kernel on CPU).")
    return value


def resolve_backend(backend: str | None, device: torch.device | str, head_dim: int) -> str:
    """`fused`, `cpu` or `eager` for a layer of head width `head_dim` running on `device`.

    `auto`: fused on CUDA for head widths >= 16 when FlexAttention exists; cpu on CPU when the
    CPU kernel builds (`spvit.cpu_attention.kernel_available`); eager otherwise.
    `fused` or `cpu` forced where it cannot run raises `ConfigError` naming the rule.
    """
    value = requested_backend(backend)
    device = torch.device(device)
    if value == "eager":
        return "eager"
    if value == "auto":
        if device.type == "cpu":
            return "cpu" if cpu_attention.kernel_available() else "eager"
        fits = device.type == "cuda" and head_dim >= MIN_FUSED_HEAD_DIM and flex_available()
        return "fused" if fits else "eager"
    if value == "cpu":
        if device.type != "cpu":
            raise ConfigError(f"attention backend 'cpu' runs on CPU tensors, but the layer runs"
                              f" on {device}. Use {ENV_VAR}=auto (fused on CUDA).")
        if not cpu_attention.kernel_available():
            raise ConfigError(f"attention backend 'cpu' needs its C kernel, which is unavailable:"
                              f" {cpu_attention.kernel_error()}. Use {ENV_VAR}=eager.")
        return "cpu"
    if not flex_available():
        raise ConfigError(f"attention backend 'fused' needs torch.nn.attention.flex_attention,"
                          f" which torch {torch.__version__} lacks. Use {ENV_VAR}=eager.")
    if device.type == "cuda" and head_dim < MIN_FUSED_HEAD_DIM:
        raise ConfigError(f"attention backend 'fused' needs a head width >= {MIN_FUSED_HEAD_DIM}"
                          f" on CUDA, but got {head_dim}. Use {ENV_VAR}=auto (eager for such"
                          " layers) or widen the heads.")
    return "fused"


def prior_score_mod(mult: torch.Tensor | None, bias: torch.Tensor | None, grid: Grid,
                    num_prefix: int = 0, *, mult_identity: float = 1.0,
                    gather: str = "offset") -> Callable[..., torch.Tensor]:
    """The `score_mod` applying `score * mult + bias` with per-pair values from per-head tables.

    Args:
        mult: multiplier, `(H, K)` over the unique offsets of `grid` (`gather="offset"`, the row
            layout of `SpatialPrior.offset_values`) or `(H, N, N)` over all pairs
            (`gather="pair"`); None: no multiplier.
        bias: additive bias, same layout as `mult`; None: no bias.
        grid: the token grid (Gh, Gw) of the last Gh*Gw tokens.
        num_prefix: tokens before the grid; their rows and columns get `mult_identity` and 0
            (`gather="offset"` only: pair tables already hold them).
        mult_identity: multiplier of prefix pairs (the scale, when it is folded into `mult`).
        gather: `offset` (index the offset table by the pair's grid offset) or `pair`.
    """
    if gather not in GATHERS:
        raise ConfigError(f"gather must be one of {list(GATHERS)}, but got {gather!r}."
                          f" Use gather={GATHERS[0]!r} or another of those.")
    if gather == "pair":
        def pair_mod(score, b, h, q_idx, kv_idx):
            if mult is not None:
                score = score * mult[h, q_idx, kv_idx]
            if bias is not None:
                score = score + bias[h, q_idx, kv_idx]
            return score
        return pair_mod

    gh, gw = int(grid[0]), int(grid[1])
    row_len = 2 * gw - 1

    def offset_mod(score, b, h, q_idx, kv_idx):
        qi, ki = q_idx - num_prefix, kv_idx - num_prefix
        if num_prefix:
            on_grid = (qi >= 0) & (ki >= 0)
            qi, ki = qi.clamp(min=0), ki.clamp(min=0)  # prefix pairs read a valid entry, unused
        q_row, k_row = qi // gw, ki // gw
        q_col, k_col = qi - q_row * gw, ki - k_row * gw
        # Row of (dx, dy) = (k_col - q_col, k_row - q_row) in offset_values' (dy, dx) order.
        offset = (k_row - q_row + gh - 1) * row_len + (k_col - q_col + gw - 1)
        if mult is not None:
            m = mult[h, offset]
            if num_prefix:
                m = torch.where(on_grid, m, mult_identity)
            score = score * m
        if bias is not None:
            add = bias[h, offset]
            if num_prefix:
                add = torch.where(on_grid, add, 0.0)
            score = score + add
        return score

    return offset_mod


def _fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mult: torch.Tensor | None,
           bias: torch.Tensor | None, grid: Grid, num_prefix: int, mult_identity: float,
           scale: float, gather: str) -> torch.Tensor:
    score_mod = prior_score_mod(mult, bias, grid, num_prefix, mult_identity=mult_identity,
                                gather=gather)
    return _flex_attention(q, k, v, score_mod=score_mod, scale=scale)


_compiled_fused: Callable[..., torch.Tensor] | None = None
# Each (shape, dtype, grad mode, prior kinds) of a layer is one static compiled graph, and a model
# has a few per block grid (training, evaluation, a smaller last batch): more than dynamo's
# default of 8 recompiles per function, after which it would run FlexAttention uncompiled.
RECOMPILE_LIMIT = 64


def _compiled() -> Callable[..., torch.Tensor]:
    """`_fused` under `torch.compile`, built on first use (the score function is traced inside,
    so a new table each step is a new input, not a new function to guard on)."""
    global _compiled_fused
    if _compiled_fused is None:
        _compiled_fused = torch.compile(_fused, fullgraph=True, dynamic=False)
    return _compiled_fused


def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                    mult: torch.Tensor | None, bias: torch.Tensor | None, grid: Grid,
                    num_prefix: int = 0, scale: float, compile: bool | None = None,
                    gather: str = "offset") -> torch.Tensor:
    """`softmax((q kᵀ * scale) * SP + B) v` for `q, k, v (B, H, N, d)`; returns `(B, H, N, d)`.

    Args:
        mult, bias: per-head tables over the unique offsets of `grid`, `(H, K)` (the output of
            `SpatialPrior.offset_values`), or over all N*N pairs `(H, N, N)` with
            `gather="pair"`; either may be None.
        grid: token grid of the last Gh*Gw tokens; N = num_prefix + Gh*Gw.
        num_prefix: class tokens before the grid (identity rows and columns).
        scale: the logit scale 1/sqrt(d).
        compile: run FlexAttention compiled (one fused kernel); default: on CUDA only.
        gather: `offset` or `pair`, see `prior_score_mod`.

    Raises:
        ConfigError: FlexAttention is missing, or gradients are needed on CPU (no backward
            there), or the token count does not match the grid.
    """
    if not flex_available():
        raise ConfigError(f"the fused attention path needs torch.nn.attention.flex_attention,"
                          f" which torch {torch.__version__} lacks. Use {ENV_VAR}=eager.")
    n = q.shape[-2]
    if n != num_prefix + grid[0] * grid[1]:
        raise ConfigError(f"{n} tokens do not form {num_prefix} prefix tokens and a"
                          f" {grid[0]}x{grid[1]} grid. Pass the grid of the last tokens.")
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, mult, bias))
    if q.device.type == "cpu" and needs_grad:
        raise ConfigError(f"the fused attention path has no backward on CPU (FlexAttention)."
                          f" Use {ENV_VAR}=auto or eager for CPU training.")
    # Tables in the kernel's accumulation precision (fp32 for bf16/fp16 inputs), prepared
    # outside the compiled region: inductor's CPU template takes only realised buffers.
    table_dtype = torch.promote_types(q.dtype, torch.float32)
    bias = bias.to(table_dtype) if bias is not None else None
    if mult is not None:
        # Fold the scale into the multiplier, as the eager path does: score * (SP * scale).
        mult, mult_identity, flex_scale = mult.to(table_dtype) * scale, float(scale), 1.0
    else:
        mult_identity, flex_scale = 1.0, float(scale)
    compile = q.device.type == "cuda" if compile is None else compile
    args = (q, k, v, mult, bias, (int(grid[0]), int(grid[1])), int(num_prefix), mult_identity,
            flex_scale, gather)
    # The kernel accumulates in fp32 whatever autocast says; q, k, v keep their dtype.
    with torch.autocast(q.device.type, enabled=False):
        if not compile:
            return _fused(*args)
        if torch.compiler.is_compiling():  # inside a compiled model: traced as part of it
            return _compiled()(*args)
        dynamo_config = torch._dynamo.config
        limit = max(RECOMPILE_LIMIT, dynamo_config.recompile_limit)
        with dynamo_config.patch(recompile_limit=limit):
            return _compiled()(*args)
