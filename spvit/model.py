"""The SP-ViT model: one `nn.Module` built from an `ArchSpec`, with timm's model interface.

`SPViT(spec)` builds stem, positional encoding, the blocks (each with its optional token pool,
convolutional positional layer, SP-SA or shared attention, and MLP), the final norm and the
classifier. Where the grid, the width and the class token are along the network follows
`ArchSpec.block_grids()`, `block_widths()` and `block_has_cls()` exactly.

Parameters, by module (C = block width, d = head width, S = block grid side, D = embed_dim,
f = pool_width_factor, S0 = img_size / patch_size; see the classes for exact shapes):

* `patch_embed`: `LinearStem` (in_chans*p*p*D + D) or `ConvStem`
  (in_chans*49*64 + 2*64*9*64 + 3*2*64 + 64*(p/2)^2*D + D).
* `cls_token (1, 1, W)` with head `cls`: W = D if cls_block == 0, else the width of block
  cls_block. With cls_block == 0 the class token is in the sequence from the stem on (DeiT); with
  cls_block = k > 0 it joins right before block k's attention (after its pool).
* `pos_embed (1, S0*S0 + E, D)` with pos_embed `learned` or `learned_sincos` (the same parameter,
  initialised N(0, 0.02) or to `sincos_2d`), E = 1 when the class token is in the sequence from
  the stem on (head `cls`, cls_block 0), else 0. `sincos` is a fixed buffer.
* `blocks.i`:
    - `pool` (`TokenPool`, blocks with pool): conv (C_in*f*9 + C_in*f), plus
      `cls_proj` (C_in*C_in*f + C_in*f) when f > 1 and the class token is in the sequence before
      the pool (head `cls` and (cls_block == 0 or cls_block < i)); C_in is the previous width;
    - `conv_pos` (`ConvPosEnc`, with conv_pos): 9C + C;
    - `norm1`, `norm2`: 2C each;
    - `attn`: `Attention` qkv (3C*C + 3C*qkv_bias) + proj (C*C + C) + `prior` (see
      `spvit.priors`: 4*Hm*d + Hm + 3*Hg + 3*Ha + Hr*(2S-1)^2), or, for share blocks,
      `SharedAttention` v (C*C + C*qkv_bias) + proj (C*C + C);
    - `mlp`: fc1 (C*h + h) + fc2 (h*C + C), h = int(C * mlp_ratio).
* `norm`: 2C_last; `head`: C_last*num_classes + num_classes (Identity when num_classes == 0).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.utils.checkpoint
from timm.layers import (
    DropPath,
    Mlp,
    get_act_layer,
    get_norm_layer,
    register_notrace_function,
    resample_abs_pos_embed,
)
from torch import nn

from .arch import ArchSpec, BlockSpec
from .attention import Attention, SharedAttention
from .errors import ConfigError
from .layers import (
    ConvPosEnc,
    ConvStem,
    Grid,
    LinearStem,
    TokenPool,
    block_order,
    sincos_2d,
)
from .priors import ADDITIVE, MULTIPLICATIVE, SpatialPrior, offset_tables

LayerArg = str | Callable[..., nn.Module] | None

LN_EPS = 1e-6
GLOBAL_POOLS = ("", "token", "avg", "max", "avgmax")

# The index tables of the spatial priors depend on the grid of the run-time input, which is a
# Proxy while torch.fx traces; timm's FX tools then record the call instead of tracing into it.
register_notrace_function(offset_tables)


@register_notrace_function  # reason: branches on the run-time grid
def learned_pos_for_grid(pos_embed: torch.Tensor, grid: Grid, side: int,
                         num_prefix: int) -> torch.Tensor:
    """The learned positional embedding `(1, P + S*S, D)` resampled (bicubic) to `grid`."""
    if int(grid[0]) == side and int(grid[1]) == side:
        return pos_embed
    return resample_abs_pos_embed(pos_embed, new_size=[int(grid[0]), int(grid[1])],
                                  old_size=[side, side], num_prefix_tokens=num_prefix)


@register_notrace_function  # reason: branches on the run-time grid
def sincos_for_grid(table: torch.Tensor, grid: Grid, side: int) -> torch.Tensor:
    """The fixed sin-cos table `(1, S*S, D)` of the built grid, or a fresh one for `grid`."""
    if int(grid[0]) == side and int(grid[1]) == side:
        return table
    return sincos_2d((int(grid[0]), int(grid[1])), table.shape[-1], device=table.device)[None]


def take_indices(depth: int, indices: int | list[int] | tuple[int, ...] | None
                 ) -> tuple[list[int], int]:
    """timm's block selection: None -> all, int n -> the last n, a sequence -> those indices
    (negative from the end). Returns (absolute indices, largest index)."""
    if indices is None:
        indices = depth
    if isinstance(indices, int):
        if not 0 < indices <= depth:
            raise ConfigError(f"indices={indices} asks for the last {indices} blocks of a"
                              f" {depth}-block model. Pass 1..{depth} or a list of indices.")
        taken = list(range(depth - indices, depth))
    else:
        taken = [depth + i if i < 0 else i for i in indices]
        bad = [i for i, t in zip(indices, taken, strict=True) if not 0 <= t < depth]
        if bad:
            raise ConfigError(f"block indices {bad} are out of range for a {depth}-block model."
                              f" Use 0..{depth - 1} (or -1..-{depth}).")
    return taken, max(taken)


def resolve_norm_layer(norm_layer: LayerArg) -> Callable[..., nn.Module]:
    """The norm class of `SPViT(norm_layer=...)`: None is LayerNorm(eps 1e-6), a string a timm
    name, a class itself (also what `spvit.supernet` builds its sliced norms from)."""
    if norm_layer is None:
        return partial(nn.LayerNorm, eps=LN_EPS)
    return get_norm_layer(norm_layer) if isinstance(norm_layer, str) else norm_layer


def resolve_act_layer(act_layer: LayerArg) -> Callable[..., nn.Module]:
    """The MLP activation of `SPViT(act_layer=...)`: None is GELU, a string a timm name."""
    if act_layer is None:
        return nn.GELU
    return get_act_layer(act_layer) if isinstance(act_layer, str) else act_layer


@torch.no_grad()
def reset_default_parameters(model: nn.Module, generator: torch.Generator) -> None:
    """Re-draw every layer's PyTorch default initialisation from `generator`.

    Linear and Conv2d layers get PyTorch's defaults (weights kaiming-uniform with a = sqrt(5),
    biases U(-1/sqrt(fan_in), 1/sqrt(fan_in))) drawn from `generator`; other layers re-run their
    own `reset_parameters()` (norms: constants). The global RNG is not reseeded.
    """
    for m in model.modules():
        if m is model:
            continue
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5), generator=generator)
            if m.bias is not None:
                fan_in = m.weight[0].numel()
                bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
                nn.init.uniform_(m.bias, -bound, bound, generator=generator)
        elif hasattr(m, "reset_parameters") and not isinstance(m, SpatialPrior):
            m.reset_parameters()


class Block(nn.Module):
    """One SP-ViT block: [pool] -> [class token joins] -> [conv pos] -> attention -> MLP
    [-> conv pos, with `conv_pos_place="end"`].

    Residuals: x + DropPath(branch(LN x)) / skip_lam for both branches (LV-ViT / SP-ViT release
    residual scaling; 1 is the plain residual).

    Args:
        spec: the block's `BlockSpec`.
        in_dim: width of the incoming tokens; `dim`: the block's width (differs after a pool).
        grid_size: the block's grid side in the architecture (sizes `rpb` tables).
        cls_before: the class token is in the incoming sequence (so a pool must carry it).
        has_cls: the class token is in this block's attention.
        keep_attn: return the attention probabilities (the next block shares them).
        norm_layer, act_layer: the two norms' class (called with the width) and the MLP's
            activation.
        skip_lam: both residual branches are divided by it.
        conv_pos_place: `before_attn` (CPVT's PEG) or `end` (after the MLP, SP-ViT release).
    """

    def __init__(self, spec: BlockSpec, *, in_dim: int, dim: int, grid_size: int,
                 width_factor: int, mlp_ratio: float, qkv_bias: bool, drop_path: float,
                 conv_pos: bool, cls_before: bool, has_cls: bool, keep_attn: bool,
                 norm_layer: Callable[..., nn.Module] = partial(nn.LayerNorm, eps=LN_EPS),
                 act_layer: Callable[..., nn.Module] = nn.GELU, skip_lam: float = 1.0,
                 conv_pos_place: str = "before_attn") -> None:
        super().__init__()
        self.skip_lam = skip_lam
        self.conv_pos_end = conv_pos_place == "end"
        self.shared = spec.share
        self.has_cls = has_cls
        self.cls_before = cls_before
        self.keep_attn = keep_attn
        self.pool: TokenPool | None = (
            TokenPool(in_dim, width_factor=width_factor, has_cls=cls_before) if spec.pool else None)
        self.conv_pos: ConvPosEnc | None = ConvPosEnc(dim) if conv_pos else None
        self.norm1 = norm_layer(dim)
        self.attn: Attention | SharedAttention
        if spec.share:
            self.attn = SharedAttention(dim, spec.heads, qkv_bias=qkv_bias)
        else:
            self.attn = Attention(dim, spec.heads, head_types=spec.head_priors,
                                  grid_size=grid_size, qkv_bias=qkv_bias)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, grid: Grid, attn: torch.Tensor | None = None,
                cls_token: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, Grid, torch.Tensor | None]:
        """`x (B, P + Gh*Gw, C_in)` -> `(x (B, P' + Gh'*Gw', C), grid', attention or None)`.

        `attn` is the previous block's probabilities (used by a shared block); `cls_token
        (1, 1, C)` joins the sequence here when given.
        """
        def attention(h: torch.Tensor, grid: Grid, num_prefix: int
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
            if not self.shared:
                return self.attn(self.norm1(h), grid, num_prefix, need_weights=self.keep_attn)
            if attn is None:
                raise RuntimeError("a shared-attention block needs the previous block's attention")
            return self.attn(self.norm1(h), attn), attn

        x, grid, attn = block_order(
            x, grid, cls_token=cls_token, cls_before=self.cls_before, has_cls=self.has_cls,
            pool=self.pool, conv_pos=self.conv_pos, conv_pos_end=self.conv_pos_end,
            attention=attention, mlp=lambda h: self.mlp(self.norm2(h)), drop1=self.drop_path1,
            drop2=self.drop_path2, skip_lam=self.skip_lam)
        return x, grid, (attn if self.keep_attn else None)


class SPViT(nn.Module):
    """SP-ViT built from an `ArchSpec` (`.spec`), with timm's classification-model interface.

    Args:
        spec: the architecture.
        num_classes: classifier outputs; None takes `spec.num_classes`, 0 builds a feature model
            (no classifier: `forward` returns the pooled `num_features` vector; `spec` keeps
            the architecture's own num_classes, and `cost.estimate(spec)` then counts a head the
            model does not have).
        global_pool: `token` (class token), `avg`, `max`, `avgmax` (over the patch tokens) or
            `''` (no pooling: `forward` returns every token); None takes the spec's head
            (`token` for head cls, `avg` for head avg).
        norm_layer: the transformer's norm (norm1, norm2, final norm): a class called with the
            width, or a timm name such as `layernorm`/`rmsnorm`; None is LayerNorm(eps 1e-6),
            the layer `spvit.cost` counts.
        act_layer: the MLP's activation (class or timm name); None is GELU.
        seed: when given, every parameter is (re)initialised from a `torch.Generator` seeded
            with it, so two models built with the same spec and seed are identical (the global
            RNG is neither reseeded nor used); otherwise the global torch RNG is used.

    Forward: images `(B, in_chans, H, W)` with H, W multiples of `patch_size` (other sizes than
    `img_size` work: the grid, the learned positional embedding and the priors follow) ->
    logits `(B, num_classes)`.

    All control flow of the forward depends on construction-time attributes only; the run-time
    grid is handled by the `register_notrace_function` helpers, so `torch.fx` (with timm's
    notrace lists, as timm's feature extractor uses them) traces the whole model.
    """

    def __init__(self, spec: ArchSpec, *, num_classes: int | None = None,
                 global_pool: str | None = None, norm_layer: LayerArg = None,
                 act_layer: LayerArg = None, seed: int | None = None) -> None:
        super().__init__()
        if not isinstance(spec, ArchSpec):
            raise ConfigError(f"SPViT needs an ArchSpec, but got {type(spec).__name__}."
                              " Use spvit.create_model(...) for YAML paths, dicts or names.")
        num_classes = spec.num_classes if num_classes is None else num_classes
        _check_num_classes(num_classes)
        if num_classes > 0 and num_classes != spec.num_classes:
            spec = spec.replace(num_classes=num_classes)
        self.spec = spec
        D = spec.embed_dim
        widths, grids, has_cls = spec.block_widths(), spec.block_grids(), spec.block_has_cls()
        norm_layer, act_layer = resolve_norm_layer(norm_layer), resolve_act_layer(act_layer)
        self.num_classes = num_classes
        self.has_class_token = spec.head == "cls"
        self.num_prefix_tokens = int(self.has_class_token)
        default_pool = "token" if self.has_class_token else "avg"
        self.global_pool = self._check_pool(default_pool if global_pool is None else global_pool)
        self.cls_block = spec.cls_block
        self.num_features = self.head_hidden_size = self.embed_dim = widths[-1]
        self.grid_size = spec.grid_size
        self.grad_checkpointing = False

        stem_cls = ConvStem if spec.stem == "conv" else LinearStem
        self.patch_embed = stem_cls(patch_size=spec.patch_size, in_chans=spec.in_chans,
                                    embed_dim=D)
        # The class token is in the sequence from the stem on iff cls_block == 0 (DeiT layout).
        self.cls_from_stem = self.has_class_token and spec.cls_block == 0
        self.cls_token: nn.Parameter | None = None
        if self.has_class_token:
            cls_width = D if self.cls_from_stem else widths[spec.cls_block]
            self.cls_token = nn.Parameter(torch.zeros(1, 1, cls_width))
        self.pos_embed: nn.Parameter | None = None
        self.pos_prefix = 0
        n0 = spec.grid_size ** 2
        if spec.pos_embed in ("learned", "learned_sincos"):  # values: spvit.init.init_pos_embed
            self.pos_prefix = int(self.cls_from_stem)
            self.pos_embed = nn.Parameter(torch.zeros(1, n0 + self.pos_prefix, D))
        elif spec.pos_embed == "sincos":
            pe = sincos_2d((spec.grid_size, spec.grid_size), D)[None]
            self.register_buffer("pos_embed_fixed", pe, persistent=False)

        dpr = [spec.drop_path_rate * i / max(spec.depth - 1, 1) for i in range(spec.depth)]
        blocks = []
        in_dim = D
        for i, b in enumerate(spec.blocks):
            keep = i + 1 < spec.depth and spec.blocks[i + 1].share
            cls_before = self.has_class_token and (self.cls_from_stem or spec.cls_block < i)
            blocks.append(Block(
                b, in_dim=in_dim, dim=widths[i], grid_size=grids[i],
                width_factor=spec.pool_width_factor, mlp_ratio=spec.mlp_ratio,
                qkv_bias=spec.qkv_bias, drop_path=dpr[i], conv_pos=spec.conv_pos,
                cls_before=cls_before, has_cls=has_cls[i], keep_attn=keep,
                norm_layer=norm_layer, act_layer=act_layer, skip_lam=spec.skip_lam,
                conv_pos_place=spec.conv_pos_place))
            in_dim = widths[i]
        self.blocks = nn.ModuleList(blocks)
        # Which block the class token joins at, fixed here so the forward has no data-dependent
        # branch: -1 when it joins at the stem or there is none.
        self.cls_join = spec.cls_block if self.has_class_token and not self.cls_from_stem else -1
        # Per block: class tokens in its output and total stride (for forward_intermediates).
        self.block_prefix = tuple(int(h) for h in has_cls)
        pools = [sum(1 for b in spec.blocks[:i + 1] if b.pool) for i in range(spec.depth)]
        self.feature_info = [dict(module=f"blocks.{i}", num_chs=widths[i],
                                  reduction=spec.patch_size * 2 ** pools[i])
                             for i in range(spec.depth)]
        self.norm = norm_layer(widths[-1])
        self.head: nn.Module = (nn.Linear(widths[-1], num_classes) if num_classes > 0
                                else nn.Identity())
        self.init_weights(seed)

    # ------------------------------------------------------------------ initialisation
    def init_weights(self, seed: int | None = None) -> None:
        """Apply the spec's `init` scheme (see `spvit.init`), from `seed` when given.

        With a seed, every random draw comes from one `torch.Generator(seed)` on the CPU (a
        model on another device is initialised on the CPU and moved back), so the weights do
        not depend on the device, on the global RNG or on what ran before.
        """
        from .init import apply_init

        if seed is None:
            apply_init(self, self.spec.init, reset=False)
            return
        if any(p.is_meta for p in self.parameters()):
            return
        devices = {p.device for p in self.parameters()} | {b.device for b in self.buffers()}
        device = next(iter(devices)) if len(devices) == 1 else None
        if device is None or device.type != "cpu":
            self.to("cpu")
        gen = torch.Generator().manual_seed(seed)
        reset_default_parameters(self, gen)
        apply_init(self, self.spec.init, reset=False, generator=gen)
        if device is not None and device.type != "cpu":
            self.to(device)

    # ------------------------------------------------------------------ forward
    def _add_pos_embed(self, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        s = self.grid_size
        cls_pos = None
        if self.pos_embed is not None:
            pos = learned_pos_for_grid(self.pos_embed, grid, s, self.pos_prefix)
            x = x + pos[:, self.pos_prefix:].to(x.dtype)
            if self.pos_prefix:
                cls_pos = pos[:, :self.pos_prefix]
        elif hasattr(self, "pos_embed_fixed"):
            x = x + sincos_for_grid(self.pos_embed_fixed, grid, s).to(x.dtype)
        if self.cls_from_stem:
            cls = self.cls_token if cls_pos is None else self.cls_token + cls_pos
            x = torch.cat([cls.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        return x

    def _run_block(self, i: int, blk: Block, x: torch.Tensor, grid: Grid,
                   attn: torch.Tensor | None) -> tuple[torch.Tensor, Grid, torch.Tensor | None]:
        join = self.cls_token if i == self.cls_join else None
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return torch.utils.checkpoint.checkpoint(blk, x, grid, attn, join,
                                                     use_reentrant=False)
        return blk(x, grid, attn, cls_token=join)

    def forward_tokens(self, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        """Run the blocks on embedded tokens `(B, P + Gh*Gw, D)` (positional encoding added,
        class token present iff cls_block == 0); returns the last block's tokens (before `norm`)."""
        attn = None
        for i, blk in enumerate(self.blocks):
            x, grid, attn = self._run_block(i, blk, x, grid, attn)
        return x

    def pe_tokens(self) -> tuple[torch.Tensor, Grid]:
        """The embedded tokens of an image whose stem output is zero: positional encoding only
        (plus the class token when it is in the sequence from the stem on), `(1, N, D)`."""
        s = self.grid_size
        ref = self.patch_embed.proj.weight
        zeros = torch.zeros(1, s * s, self.spec.embed_dim, device=ref.device, dtype=ref.dtype)
        return self._add_pos_embed(zeros, (s, s)), (s, s)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> normalised tokens `(B, P + Gh*Gw, num_features)` (class token first)."""
        x, grid = self.patch_embed(x)  # (B, Gh*Gw, D)
        x = self._add_pos_embed(x, grid)
        return self.norm(self.forward_tokens(x, grid))

    def pool(self, x: torch.Tensor, pool_type: str | None = None) -> torch.Tensor:
        """Tokens `(B, P + N, C)` -> `(B, C)` by `pool_type` (default `global_pool`); `''`
        returns the tokens unchanged."""
        pool_type = self.global_pool if pool_type is None else pool_type
        if not pool_type:
            return x
        if pool_type == "token":
            return x[:, 0]
        x = x[:, self.num_prefix_tokens:]
        if pool_type == "avg":
            return x.mean(dim=1)
        if pool_type == "max":
            return x.amax(dim=1)
        return 0.5 * (x.amax(dim=1) + x.mean(dim=1))  # avgmax

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens -> pooled features (`pre_logits=True`) or logits."""
        x = self.pool(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
            self, x: torch.Tensor, indices: int | list[int] | tuple[int, ...] | None = None,
            return_prefix_tokens: bool = False, norm: bool = False, stop_early: bool = False,
            output_fmt: str = "NCHW", intermediates_only: bool = False,
    ) -> list[Any] | tuple[torch.Tensor, list[Any]]:
        """timm's intermediate-feature interface: the outputs of the blocks in `indices`.

        Args:
            x: images `(B, in_chans, H, W)`.
            indices: block indices (negative from the end), the last n blocks if an int, all
                blocks if None.
            return_prefix_tokens: pair each intermediate with its class token `(B, 1, C)`
                (None where the class token has not joined yet).
            norm: apply the final norm to the intermediates whose width is `num_features`
                (blocks after the last pool); other widths are returned as they are.
            stop_early: do not run the blocks after the last requested one.
            output_fmt: `NCHW` (`(B, C_i, Gh_i, Gw_i)` on each block's own, possibly pooled,
                grid) or `NLC` (`(B, Gh_i*Gw_i, C_i)`); class tokens are split off either way.
            intermediates_only: return only the list of intermediates.

        Returns:
            `(forward_features(x), intermediates)`, or the intermediates alone.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ConfigError(f"output_fmt must be 'NCHW' or 'NLC', but got {output_fmt!r}."
                              " Pass one of those.")
        taken, max_index = take_indices(len(self.blocks), indices)
        B = x.shape[0]
        x, grid = self.patch_embed(x)
        x = self._add_pos_embed(x, grid)
        last = max_index if stop_early else len(self.blocks) - 1
        intermediates: list[Any] = []
        attn = None
        for i, blk in enumerate(self.blocks):
            if i > last:
                break
            x, grid, attn = self._run_block(i, blk, x, grid, attn)
            if i not in taken:
                continue
            y = self.norm(x) if norm and self.feature_info[i]["num_chs"] == self.num_features else x
            p = self.block_prefix[i]
            prefix = y[:, :p] if p else None
            y = y[:, p:]
            if output_fmt == "NCHW":
                y = y.reshape(B, grid[0], grid[1], -1).permute(0, 3, 1, 2).contiguous()
            intermediates.append((y, prefix) if return_prefix_tokens else y)
        if intermediates_only:
            return intermediates
        if last < len(self.blocks) - 1:
            raise ConfigError("forward_intermediates(stop_early=True) has no final features when"
                              " it stops before the last block. Pass intermediates_only=True.")
        return self.norm(x), intermediates

    def prune_intermediate_layers(self, indices: int | list[int] | tuple[int, ...] = 1,
                                  prune_norm: bool = False, prune_head: bool = True
                                  ) -> list[int]:
        """Drop the blocks after the last of `indices` (and the final norm / classifier), as
        timm's feature wrapper does; returns the absolute indices kept. The model's `spec`
        still describes the full architecture afterwards."""
        taken, max_index = take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        self.feature_info = self.feature_info[:max_index + 1]
        self.block_prefix = self.block_prefix[:max_index + 1]
        width = self.feature_info[-1]["num_chs"]
        if prune_norm or width != self.num_features:
            self.norm = nn.Identity()
        if self.cls_join > max_index:  # the class token would join after the kept blocks
            self.cls_token = None
            self.cls_join = -1
            self.has_class_token = False
            self.num_prefix_tokens = 0
        self.num_features = self.head_hidden_size = width
        if prune_head:
            self.reset_classifier(0, "")
        return taken

    # ------------------------------------------------------------------ timm interface
    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups for timm's layer-wise learning-rate decay: the stem and embeddings,
        then one group per block, then the final norm (the classifier is timm's last group)."""
        return dict(stem=r"^cls_token|^pos_embed|^patch_embed",
                    blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of storing them."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def _check_pool(self, global_pool: str) -> str:
        if global_pool not in GLOBAL_POOLS:
            raise ConfigError(f"global_pool must be one of {list(GLOBAL_POOLS)}, but got"
                              f" {global_pool!r}. Pick one of those.")
        if global_pool == "token" and not self.has_class_token:
            raise ConfigError(f"global_pool 'token' needs a class token, but this model has head"
                              f" {self.spec.head!r}. Use 'avg' (or build a model with head cls).")
        return global_pool

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier by a fresh one for `num_classes` (0 removes it; `spec` then
        keeps its previous num_classes, as an ArchSpec always has a classifier) and, when given,
        change the pooling (`token`, `avg`, `max`, `avgmax`, or `''` for none)."""
        _check_num_classes(num_classes)
        if global_pool is not None:
            self.global_pool = self._check_pool(global_pool)
        ref = self.patch_embed.proj.weight
        self.num_classes = num_classes
        self.spec = self.spec.replace(num_classes=num_classes) if num_classes > 0 else self.spec
        if num_classes > 0:
            self.head = nn.Linear(self.num_features, num_classes, device=ref.device,
                                  dtype=ref.dtype)
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)
        else:
            self.head = nn.Identity()

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameters to exclude from weight decay: embeddings and the parametric priors."""
        names = {"pos_embed", "cls_token"}
        for name, _ in self.named_parameters():
            if name.endswith((".rpb_table", ".gaussian", ".axial", ".mlp_bias", ".decay")):
                names.add(name)
        return names

    # ------------------------------------------------------------------ reports
    @torch.no_grad()
    def prior_tables(self) -> dict[int, dict[str, Any]]:
        """The learned spatial priors as tables over offsets, for reports.

        Returns `{block_index: entry}` for every block with a prior, where entry holds
        `tables`: float32 CPU tensor `(H, 2S-1, 2S-1)`, `tables[h, dy + S - 1, dx + S - 1]` the
        prior of head h for offset (dx, dy) = (col_key - col_query, row_key - row_query) on the
        block's S x S grid; `head_types`: the prior type per head; `modes`: per head
        `multiplicative` (multiplies the scaled logits; identity 1), `additive` (added to them;
        identity 0) or `none` (its table holds the identity of the block's other heads);
        `grid`: S.
        """
        out: dict[int, dict[str, Any]] = {}
        grids = self.spec.block_grids()
        for i, blk in enumerate(self.blocks):
            prior = getattr(blk.attn, "prior", None)
            if not isinstance(prior, SpatialPrior):
                continue
            s = grids[i]
            modes = tuple("multiplicative" if t in MULTIPLICATIVE
                          else "additive" if t in ADDITIVE else "none" for t in prior.head_types)
            out[i] = {"tables": prior.tables((s, s)).detach().float().cpu(),
                      "head_types": prior.head_types, "modes": modes, "grid": s}
        return out

    def extra_repr(self) -> str:
        s = self.spec
        return (f"depth={s.depth}, embed_dim={s.embed_dim}, stem={s.stem}, head={s.head},"
                f" init={s.init}, grid={s.grid_size}")


def _check_num_classes(num_classes: Any) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
        raise ConfigError(f"num_classes must be an integer >= 0 (0: no classifier), but got"
                          f" {num_classes!r}. Pass e.g. num_classes=10.")


def count_parameters(model: nn.Module) -> int:
    """Total number of parameters (what `spvit.cost.estimate(spec).params` must equal)."""
    return sum(p.numel() for p in model.parameters())
