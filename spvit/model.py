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

from typing import Any

import torch
from timm.layers import DropPath, Mlp, resample_abs_pos_embed
from torch import nn

from .arch import ArchSpec, BlockSpec
from .attention import Attention, SharedAttention
from .errors import ConfigError
from .layers import ConvPosEnc, ConvStem, LinearStem, TokenPool, sincos_2d
from .priors import ADDITIVE, MULTIPLICATIVE, SpatialPrior

Grid = tuple[int, int]

LN_EPS = 1e-6


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
        skip_lam: both residual branches are divided by it.
        conv_pos_place: `before_attn` (CPVT's PEG) or `end` (after the MLP, SP-ViT release).
    """

    def __init__(self, spec: BlockSpec, *, in_dim: int, dim: int, grid_size: int,
                 width_factor: int, mlp_ratio: float, qkv_bias: bool, drop_path: float,
                 conv_pos: bool, cls_before: bool, has_cls: bool, keep_attn: bool,
                 skip_lam: float = 1.0, conv_pos_place: str = "before_attn") -> None:
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
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn: Attention | SharedAttention
        if spec.share:
            self.attn = SharedAttention(dim, spec.heads, qkv_bias=qkv_bias)
        else:
            self.attn = Attention(dim, spec.heads, head_types=spec.head_priors,
                                  grid_size=grid_size, qkv_bias=qkv_bias)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, hidden_features=int(dim * mlp_ratio))
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, grid: Grid, attn: torch.Tensor | None = None,
                cls_token: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, Grid, torch.Tensor | None]:
        """`x (B, P + Gh*Gw, C_in)` -> `(x (B, P' + Gh'*Gw', C), grid', attention or None)`.

        `attn` is the previous block's probabilities (used by a shared block); `cls_token
        (1, 1, C)` joins the sequence here when given.
        """
        num_prefix = int(self.cls_before)
        if self.pool is not None:
            x, grid = self.pool(x, grid, num_prefix)
        if cls_token is not None:
            x = torch.cat([cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        num_prefix = int(self.has_cls)
        if self.conv_pos is not None and not self.conv_pos_end:
            x = self.conv_pos(x, grid, num_prefix)
        if self.shared:
            if attn is None:
                raise RuntimeError("a shared-attention block needs the previous block's attention")
            y = self.attn(self.norm1(x), attn)
        else:
            y, attn = self.attn(self.norm1(x), grid, num_prefix, need_weights=self.keep_attn)
        x = x + self.drop_path1(y) / self.skip_lam
        x = x + self.drop_path2(self.mlp(self.norm2(x))) / self.skip_lam
        if self.conv_pos is not None and self.conv_pos_end:
            x = self.conv_pos(x, grid, num_prefix)
        return x, grid, (attn if self.keep_attn else None)


class SPViT(nn.Module):
    """SP-ViT built from an `ArchSpec` (`.spec`), with timm's classification-model interface.

    Args:
        spec: the architecture.
        seed: when given, every parameter is (re)initialised from this seed, so two models built
            with the same spec and seed are identical; otherwise the global torch RNG is used.

    Forward: images `(B, in_chans, H, W)` with H, W multiples of `patch_size` (other sizes than
    `img_size` work: the grid, the learned positional embedding and the priors follow) ->
    logits `(B, num_classes)`.
    """

    def __init__(self, spec: ArchSpec, *, seed: int | None = None) -> None:
        super().__init__()
        if not isinstance(spec, ArchSpec):
            raise ConfigError(f"SPViT needs an ArchSpec, but got {type(spec).__name__}."
                              " Use spvit.create_model(...) for YAML paths, dicts or names.")
        self.spec = spec
        D = spec.embed_dim
        widths, grids, has_cls = spec.block_widths(), spec.block_grids(), spec.block_has_cls()
        self.num_classes = spec.num_classes
        self.global_pool = "token" if spec.head == "cls" else "avg"
        self.has_class_token = spec.head == "cls"
        self.num_prefix_tokens = int(self.has_class_token)
        self.cls_block = spec.cls_block
        self.num_features = self.head_hidden_size = self.embed_dim = widths[-1]
        self.grid_size = spec.grid_size

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
                skip_lam=spec.skip_lam, conv_pos_place=spec.conv_pos_place))
            in_dim = widths[i]
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(widths[-1], eps=LN_EPS)
        self.head: nn.Module = (nn.Linear(widths[-1], spec.num_classes) if spec.num_classes > 0
                                else nn.Identity())
        self.init_weights(seed)

    # ------------------------------------------------------------------ initialisation
    def init_weights(self, seed: int | None = None) -> None:
        """Apply the spec's `init` scheme (see `spvit.init`), from `seed` when given."""
        from .init import apply_init

        if seed is None:
            apply_init(self, self.spec.init, reset=False)
            return
        devices = sorted({p.device.index or 0 for p in self.parameters()
                          if p.device.type == "cuda"})
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            gen = torch.Generator().manual_seed(seed)
            apply_init(self, self.spec.init, reset=True, generator=gen)

    # ------------------------------------------------------------------ forward
    def _add_pos_embed(self, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        s = self.grid_size
        if self.pos_embed is not None:
            pos = self.pos_embed
            if tuple(grid) != (s, s):
                pos = resample_abs_pos_embed(pos, new_size=list(grid), old_size=[s, s],
                                             num_prefix_tokens=self.pos_prefix)
            x = x + pos[:, self.pos_prefix:].to(x.dtype)
            cls_pos = pos[:, :self.pos_prefix]
        else:
            cls_pos = None
            if hasattr(self, "pos_embed_fixed"):
                pe = self.pos_embed_fixed
                if tuple(grid) != (s, s):
                    pe = sincos_2d(grid, x.shape[-1], device=x.device)[None]
                x = x + pe.to(x.dtype)
        if self.cls_from_stem:
            cls = self.cls_token if cls_pos is None else self.cls_token + cls_pos
            x = torch.cat([cls.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        return x

    def forward_tokens(self, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        """Run the blocks on embedded tokens `(B, P + Gh*Gw, D)` (positional encoding added,
        class token present iff cls_block == 0); returns the last block's tokens (before `norm`)."""
        attn = None
        for i, blk in enumerate(self.blocks):
            join = self.cls_token if (self.has_class_token and not self.cls_from_stem
                                      and i == self.cls_block) else None
            x, grid, attn = blk(x, grid, attn, cls_token=join)
        return x

    def pe_tokens(self) -> tuple[torch.Tensor, Grid]:
        """The embedded tokens of an image whose stem output is zero: positional encoding only
        (plus the class token when it is in the sequence from the stem on), `(1, N, D)`."""
        s = self.grid_size
        ref = self.norm.weight
        zeros = torch.zeros(1, s * s, self.spec.embed_dim, device=ref.device, dtype=ref.dtype)
        return self._add_pos_embed(zeros, (s, s)), (s, s)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> normalised tokens `(B, P + Gh*Gw, num_features)` (class token first)."""
        x, grid = self.patch_embed(x)  # (B, Gh*Gw, D)
        x = self._add_pos_embed(x, grid)
        return self.norm(self.forward_tokens(x, grid))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens -> pooled features (`pre_logits=True`) or logits."""
        if self.global_pool == "token":
            x = x[:, 0]
        else:
            x = x[:, self.num_prefix_tokens:].mean(dim=1)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    # ------------------------------------------------------------------ timm interface
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier by a fresh one for `num_classes` (0 removes it; `spec` then
        keeps its previous num_classes, as an ArchSpec always has a classifier).

        `global_pool` may only restate the current pooling (`token` for head cls, `avg` for head
        avg): the pooling is part of the architecture.
        """
        if global_pool is not None and global_pool != self.global_pool:
            raise ConfigError(
                f"global_pool of this model is {self.global_pool!r} (head: {self.spec.head}) and"
                f" cannot change to {global_pool!r}. Build a model with the other head instead.")
        ref = self.norm.weight
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


def count_parameters(model: nn.Module) -> int:
    """Total number of parameters (what `spvit.cost.estimate(spec).params` must equal)."""
    return sum(p.numel() for p in model.parameters())
