"""SP-SA attention: multi-head self-attention with per-head spatial priors, and the shared
attention of PSViT that reuses the previous block's attention probabilities.

`Attention` computes `softmax((Q Kᵀ / sqrt(d)) * SP + B) V` per head, where SP (multiplicative
priors) and B (additive priors) come from `spvit.priors.SpatialPrior` and are the identity for heads
of type `none`. Paths, for training and inference alike:

* no prior and no attention map requested: one `F.scaled_dot_product_attention` call (flash
  attention on CUDA);
* priors, no attention map requested, and the `fused` backend (`spvit.flex.resolve_backend`:
  by default on CUDA for head widths >= 16): FlexAttention, compiled, with the priors applied
  inside its score function from the per-offset tables (`spvit.flex.fused_attention`); the
  `(B, H, N, N)` logits are never materialised;
* priors, no attention map requested, float32 on CPU and the `cpu` backend (the default there):
  the C kernel of `spvit.cpu_attention`, forward and backward in blocks of query rows, the priors
  gathered into `(H, N, N)` tables (`SpatialPrior.forward`) but no `(B, H, N, N)` tensor made;
  without a multiplicative prior its forward, and all of inference, is torch's flash kernel
  with the bias as a `(1, H, N, N)` mask;
* otherwise the eager path: logits, one elementwise multiply by `scale * SP` (scale folded into
  the `(H, N, N)` multiplier), optional bias, softmax, matmul. This is the path of any block
  whose probabilities a following block shares, and of other dtypes on CPU. Without a
  multiplicative prior and without maps requested, the bias rides into
  `F.scaled_dot_product_attention` as `attn_mask` instead.

Override the choice with `SPVIT_ATTENTION=auto|fused|cpu|eager` or `Attention(backend=...)`.

`SharedAttention` has no Q/K projections and computes no Q Kᵀ: it applies the attention
probabilities it is handed to its own V and output projection.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .cpu_attention import cpu_attention
from .flex import fused_attention, requested_backend, resolve_backend
from .priors import SpatialPrior

Grid = tuple[int, int]


def prior_attention(q: torch.Tensor, k: torch.Tensor, *, scale: float,
                    mult: torch.Tensor | None = None,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """The attention probabilities of SP-SA, eager: `softmax((Q Kᵀ) * scale * SP + B)`, shape
    `(B, H, N, N)`, for `q`, `k` `(B, H, N, d)` and the prior's `(H, N, N)` multiplier and
    bias (either may be None). The model's eager path and the supernet share it."""
    logits = q @ k.transpose(-2, -1)  # (B, H, N, N)
    logits = logits * (mult * scale if mult is not None else scale)
    if bias is not None:
        logits = logits + bias
    return logits.softmax(dim=-1)


class Attention(nn.Module):
    """Multi-head self-attention with optional per-head spatial priors.

    Args:
        dim: token width C.
        num_heads: H; must divide `dim`.
        head_types: prior type per head (length H); all `none` means plain attention.
        grid_size: the block's patch-grid side in the architecture (sizes `rpb` tables).
        qkv_bias: bias on the Q/K/V projection.
        backend: `auto`, `fused`, `cpu` or `eager` (see `spvit.flex`); None: `$SPVIT_ATTENTION`,
            else `auto`. Not part of the state dict.

    Parameters: `qkv.weight (3C, C)`, `qkv.bias (3C,)` if qkv_bias, `proj.weight (C, C)`,
    `proj.bias (C,)`, plus `prior.*` (see `SpatialPrior`) when any head has a prior.
    """

    def __init__(self, dim: int, num_heads: int, *, head_types: tuple[str, ...] | None = None,
                 grid_size: int = 1, qkv_bias: bool = True,
                 backend: str | None = None) -> None:
        super().__init__()
        if backend is not None:
            requested_backend(backend)
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        head_types = tuple(head_types) if head_types is not None else ("none",) * num_heads
        if len(head_types) != num_heads:
            raise ValueError(f"head_types has {len(head_types)} entries for {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.head_types = head_types
        self.backend = backend
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.prior: SpatialPrior | None = None
        if any(t != "none" for t in head_types):
            self.prior = SpatialPrior(head_types, head_dim=self.head_dim, grid_size=grid_size)

    def forward(self, x: torch.Tensor, grid: Grid, num_prefix: int = 0, *,
                need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attend over `x (B, N, C)` whose last Gh*Gw tokens form `grid`.

        Returns the output `(B, N, C)` and, if `need_weights`, the probabilities `(B, H, N, N)`.
        """
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        # An FX trace (timm's feature extraction) records the eager path: the fused choice
        # reads the device, which a traced proxy does not have. A TorchScript trace (the ONNX
        # export) records it too: the C kernel is a call the tracer cannot see into, so its
        # output would be recorded as a constant.
        path = "eager"
        if (self.prior is not None and not need_weights and not isinstance(x, torch.fx.Proxy)
                and not torch.jit.is_tracing()):
            path = resolve_backend(self.backend, x.device, self.head_dim)
        if path == "cpu" and qkv.dtype == torch.float32:
            mult, bias = self.prior(grid, num_prefix)  # (H, N, N) or None
            # the kernel reads the qkv views in place; its output's layout makes this a view
            out = cpu_attention(qkv, mult=mult * self.scale if mult is not None else None,
                                bias=bias, scale=self.scale)
            return self.proj(out.transpose(1, 2).reshape(B, N, C)), None
        if path == "fused":
            q, k, v = qkv.unbind(0)  # (B, H, N, d)
            mult, bias = self.prior.offset_values(grid)  # (H, K) over unique offsets, or None
            out = fused_attention(q, k, v, mult=mult, bias=bias, grid=grid,
                                  num_prefix=num_prefix, scale=self.scale)
            return self.proj(out.transpose(1, 2).reshape(B, N, C)), None
        mult = bias = None
        if self.prior is not None:
            mult, bias = self.prior(grid, num_prefix)  # (H, N, N) or None
        attn = None
        use_sdpa = mult is None and not need_weights
        # One copy into (3, B, H, N, d) beats the strided views that each matmul would copy.
        q, k, v = (qkv if use_sdpa else qkv.contiguous()).unbind(0)  # (B, H, N, d)
        if use_sdpa:
            mask = bias.to(q.dtype) if bias is not None else None
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            attn = prior_attention(q, k, scale=self.scale, mult=mult, bias=bias)
            out = attn.to(v.dtype) @ v
        out = out.transpose(1, 2).reshape(B, N, C)
        return self.proj(out), attn

    def extra_repr(self) -> str:
        backend = f", backend={self.backend}" if self.backend is not None else ""
        return f"num_heads={self.num_heads}, head_types={self.head_types}{backend}"


class SharedAttention(nn.Module):
    """Attention that reuses another block's probabilities (PSViT attention sharing).

    Parameters: `v.weight (C, C)`, `v.bias (C,)` if qkv_bias, `proj.weight (C, C)`,
    `proj.bias (C,)`.
    """

    def __init__(self, dim: int, num_heads: int, *, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Apply `attn (B, H, N, N)` to this block's values of `x (B, N, C)`."""
        B, N, C = x.shape
        v = self.v(x).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, N, d)
        out = (attn.to(v.dtype) @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj(out)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, shared=True"


def set_attention_backend(model: nn.Module, backend: str | None) -> int:
    """Set the path of every SP-SA layer of `model` (`None`: back to `$SPVIT_ATTENTION`/auto).

    Returns the number of layers set.
    """
    if backend is not None:
        requested_backend(backend)
    count = 0
    for module in model.modules():
        if isinstance(module, Attention):
            module.backend = backend
            count += 1
    return count
