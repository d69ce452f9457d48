"""Token-level building blocks of SP-ViT that are not attention: stems, positional encodings,
token pooling, the per-block convolutional positional layer, and the order of a block's layers
(`block_order`).

Every module here works on a token sequence `(B, N, C)` whose first `num_prefix` tokens are class
tokens (0 or 1) and whose remaining tokens are a row-major patch grid `(Gh, Gw)`. The grid is
passed along explicitly so that any input size that the stem can tile works, and so that pooling
can change it. Parameter shapes are listed in each class docstring; `spvit.cost` mirrors them.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

Grid = tuple[int, int]
Branch = Callable[[torch.Tensor], torch.Tensor]
PoolFn = Callable[[torch.Tensor, Grid, int], tuple[torch.Tensor, Grid]]
ConvFn = Callable[[torch.Tensor, Grid, int], torch.Tensor]
AttnFn = Callable[[torch.Tensor, Grid, int], tuple[torch.Tensor, torch.Tensor | None]]


def sincos_2d(grid: Grid, dim: int, *, device: torch.device | None = None,
              dtype: torch.dtype | None = None) -> torch.Tensor:
    """Fixed 2-D sine-cosine positional encoding, `(Gh * Gw, dim)`, row-major.

    The first half of the channels encodes the column x, the second half the row y; each half
    holds F = dim / 4 sines then F cosines at the linearly spaced frequencies
    w_k = pi * k / F, k = 1..F (radians per token), up to the grid's Nyquist frequency. (The
    transformer-standard geometric schedule, temperature 10000, puts most channels at frequencies
    far below one cycle per grid on small grids: on 8x8 its LayerNorm'd matrix has ~9 useful
    directions out of 48 and is useless as a pseudo-input for structured init.) `dim` must be
    divisible by 4.
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos encoding needs a width divisible by 4, but got {dim}.")
    gh, gw = grid
    f = dim // 4
    omega = math.pi * torch.arange(1, f + 1, device=device, dtype=torch.float64) / f
    rows = torch.arange(gh, device=device, dtype=torch.float64)
    cols = torch.arange(gw, device=device, dtype=torch.float64)
    yy, xx = torch.meshgrid(rows, cols, indexing="ij")
    ox = xx.reshape(-1, 1) * omega[None]
    oy = yy.reshape(-1, 1) * omega[None]
    pe = torch.cat([ox.sin(), ox.cos(), oy.sin(), oy.cos()], dim=1)
    return pe.to(dtype or torch.get_default_dtype())


class LinearStem(nn.Module):
    """ViT patch embedding: one conv with kernel = stride = `patch_size`.

    Parameters: `proj.weight (embed_dim, in_chans, p, p)`, `proj.bias (embed_dim,)`.
    """

    def __init__(self, *, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Grid]:
        x = self.proj(x)  # (B, C, Gh, Gw)
        grid = (x.shape[-2], x.shape[-1])
        return x.flatten(2).transpose(1, 2), grid


class ConvStem(nn.Module):
    """LV-ViT's convolutional patch embedding (`PatchEmbed4_2`), `patch_size`x down overall.

    conv1 7x7 stride 2 (no bias) -> BN -> ReLU -> conv2 3x3 (no bias) -> BN -> ReLU -> conv3 3x3
    (no bias) -> BN -> ReLU -> proj with kernel = stride = `patch_size / 2` (with bias).

    Parameters: `conv1.weight (64, in_chans, 7, 7)`, `bn1.{weight,bias} (64,)`,
    `conv2.weight (64, 64, 3, 3)`, `bn2.{weight,bias} (64,)`, `conv3.weight (64, 64, 3, 3)`,
    `bn3.{weight,bias} (64,)`, `proj.weight (embed_dim, 64, p/2, p/2)`, `proj.bias (embed_dim,)`.
    BatchNorm running statistics are buffers, not parameters.
    """

    hidden = 64

    def __init__(self, *, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        c = self.hidden
        self.conv1 = nn.Conv2d(in_chans, c, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)
        half = patch_size // 2
        self.proj = nn.Conv2d(c, embed_dim, kernel_size=half, stride=half)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Grid]:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))
        x = self.proj(x)  # (B, C, Gh, Gw)
        grid = (x.shape[-2], x.shape[-1])
        return x.flatten(2).transpose(1, 2), grid


def tokens_to_map(x: torch.Tensor, grid: Grid,
                  num_prefix: int) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Split `(B, P + Gh*Gw, C)` into prefix tokens `(B, P, C)` (None when P = 0) and a map
    `(B, C, Gh, Gw)`.

    `num_prefix` is a Python int fixed when the model is built, so which branch runs never
    depends on a tensor's shape (the forward stays symbolically traceable).
    """
    B, _, C = x.shape
    prefix = x[:, :num_prefix] if num_prefix else None
    patches = x[:, num_prefix:]
    return prefix, patches.transpose(1, 2).reshape(B, C, grid[0], grid[1])


def map_to_tokens(prefix: torch.Tensor | None, fmap: torch.Tensor) -> torch.Tensor:
    """Inverse of `tokens_to_map`: `(B, P, C)` or None and `(B, C, Gh, Gw)` ->
    `(B, P + Gh*Gw, C)`."""
    patches = fmap.flatten(2).transpose(1, 2)
    return patches if prefix is None else torch.cat([prefix, patches], dim=1)


class ConvPosEnc(nn.Module):
    """Convolutional positional layer (CPVT's PEG, as used in every SP-ViT block).

    `patches <- patches + DWConv3x3(patches)` on the patch grid; class tokens pass unchanged.
    Parameters: `proj.weight (C, 1, 3, 3)`, `proj.bias (C,)`.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, kernel_size=3, stride=1, padding=1, groups=dim)

    def forward(self, x: torch.Tensor, grid: Grid, num_prefix: int) -> torch.Tensor:
        prefix, fmap = tokens_to_map(x, grid, num_prefix)
        return map_to_tokens(prefix, fmap + self.proj(fmap))


class TokenPool(nn.Module):
    """PSViT token pooling, PiT-style: a depthwise strided convolution on the patch grid.

    Patch tokens: `Conv2d(C, C * f, kernel 3, stride 2, padding 1, groups=C)` (each input channel
    feeds `f` output channels), so side S becomes ceil(S / 2) and the width C becomes C * f, as in
    `ArchSpec.block_grids()` / `block_widths()`. The class token, when present, cannot be
    convolved; it goes through `Linear(C, C * f)` when f > 1 and is passed unchanged when f == 1
    (an identity keeps its width, and a learned map there would only duplicate the block's own
    projections).

    Parameters: `conv.weight (C*f, 1, 3, 3)`, `conv.bias (C*f,)`; with a class token and f > 1
    also `cls_proj.weight (C*f, C)`, `cls_proj.bias (C*f,)`.
    """

    def __init__(self, dim: int, *, width_factor: int, has_cls: bool) -> None:
        super().__init__()
        out = dim * width_factor
        self.conv = nn.Conv2d(dim, out, kernel_size=3, stride=2, padding=1, groups=dim)
        self.cls_proj: nn.Module = (nn.Linear(dim, out) if has_cls and width_factor > 1
                                    else nn.Identity())

    def forward(self, x: torch.Tensor, grid: Grid, num_prefix: int) -> tuple[torch.Tensor, Grid]:
        prefix, fmap = tokens_to_map(x, grid, num_prefix)
        fmap = self.conv(fmap)  # (B, C*f, ceil(Gh/2), ceil(Gw/2))
        new_grid = (fmap.shape[-2], fmap.shape[-1])
        prefix = None if prefix is None else self.cls_proj(prefix)
        return map_to_tokens(prefix, fmap), new_grid


def block_order(x: torch.Tensor, grid: Grid, *, cls_token: torch.Tensor | None,
                cls_before: bool, has_cls: bool, pool: PoolFn | None, conv_pos: ConvFn | None,
                conv_pos_end: bool, attention: AttnFn, mlp: Branch,
                drop1: Branch, drop2: Branch, skip_lam: float
                ) -> tuple[torch.Tensor, Grid, torch.Tensor | None]:
    """The order of one SP-ViT block, the one home of it for `spvit.model.Block` and the
    supernet's block: [pool] -> [class token joins] -> [conv pos] -> x + drop1(attention)/skip_lam
    -> x + drop2(mlp)/skip_lam [-> conv pos, with `conv_pos_end`].

    `pool(x, grid, num_prefix) -> (x, grid)`, `conv_pos(x, grid, num_prefix) -> x`,
    `attention(x, grid, num_prefix) -> (branch, probabilities or None)` (norm included) and
    `mlp(x) -> branch` (norm included) are the block's layers; `drop1`, `drop2` the drop paths of
    the two branches.
    Returns `(x, grid, probabilities or None)`.
    """
    num_prefix = int(cls_before)
    if pool is not None:
        x, grid = pool(x, grid, num_prefix)
    if cls_token is not None:
        x = torch.cat([cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
    num_prefix = int(has_cls)
    if conv_pos is not None and not conv_pos_end:
        x = conv_pos(x, grid, num_prefix)
    y, attn = attention(x, grid, num_prefix)
    x = x + drop1(y) / skip_lam
    x = x + drop2(mlp(x)) / skip_lam
    if conv_pos is not None and conv_pos_end:
        x = conv_pos(x, grid, num_prefix)
    return x, grid, attn
