"""A weight-sharing SP-ViT supernet: one network that holds every architecture of a search space.

`SPViTSupernet(choices)` is built from `SupernetChoices`, a plain description of the values each
dimension of a space can take (the glue from a search-space file lives in `nas.oneshot`; spvit
knows nothing of search). `set_active(spec)` selects one `ArchSpec`; the forward pass then
computes exactly what `SPViT(spec)` would compute with the inherited weights, and
`subnet(spec)` builds that stand-alone `SPViT` (through `spvit.create_model`) and copies the
inherited slices into it by parameter name, so a chosen subnet can be fine-tuned or exported.

How weights are shared (weight entanglement, as in AutoFormer): every layer is allocated at the
largest size any subnet needs at that position and a subnet uses its leading slice.

* depth: the first k blocks;
* width: the first C channels of every tensor of a block of width C, also after token pools
  (each block is as wide as the widest subnet can be there: embed_dim x pool_width_factor^pools);
* mlp ratio: the first int(C * mlp_ratio) hidden units;
* heads: the first C rows of each of Q, K and V, regrouped into H heads of C / H channels;
* stem and classifier: the first embed_dim output channels / the first C input columns; norms:
  the first C entries (statistics over the active channels only);
* per-head prior type: head slot h of a block holds the parameters of every prior family the
  space offers (`mlp` hidden units sliced to the active head width; `gaussian`, `axial` and
  `decay` their few numbers; `rpb` tables for the largest grid the block can see, centre-cropped
  for a smaller one); the subnet picks one per head;
* token pooling: one pool layer at every block index some schedule pools at (per width factor);
* attention sharing: a sharing block applies the previous block's attention probabilities to its
  own V slice (the V rows of its Q/K/V layer) and its own output projection; no Q Kᵀ;
* positional encoding: `learned` and `learned_sincos` read the same learnable embedding (per
  patch size, first embed_dim channels); `sincos` is computed for the active width;
* residual scaling `skip_lam` and `conv_pos_place` change no weight: the block's forward divides
  both residual branches by the subnet's `skip_lam` and runs the (shared) conv positional layer
  before the attention or after the MLP, as `spvit.model.Block` does.

The norms and the MLP's activation are the model's: `SPViTSupernet(choices, norm_layer=...,
act_layer=...)` takes the same arguments as `SPViT` and hands them to the subnets it builds. The
prior formulas and their pair gather are `spvit.priors`' (`SuperPriors` feeds them sliced
tensors), so a formula has one home. The stem is a stand-alone stem at the widest embed_dim; a
subnet keeps the first embed_dim channels of its output tokens.

The layout lives in three modules: `spvit.supernet_plan` (what the supernet holds and what a
subnet is, in plain data), `spvit.supernet_layers` (the sliced layers) and this one (blocks and
the network); every public name is importable from here.

Not shared: each patch size has its own stem and learned positional embedding (a kernel of
another size is a different function). Initialisation does not apply to inherited weights: the
`init` field of an `ArchSpec`, and the sin-cos starting value of a `learned_sincos` embedding (the
shared embedding starts N(0, 0.02), as `learned`), are carried along for stand-alone retraining.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from timm.layers import drop_path, resample_abs_pos_embed
from torch import nn

from .arch import ArchSpec
from .attention import prior_attention
from .errors import ConfigError
from .layers import (
    ConvStem,
    Grid,
    LinearStem,
    block_order,
    map_to_tokens,
    sincos_2d,
    tokens_to_map,
)
from .model import LayerArg, SPViT, resolve_act_layer, resolve_norm_layer
from .priors import FAMILIES
from .supernet_layers import (
    SuperDWConv,
    SuperLinear,
    SuperNorm,
    SuperPool,
    SuperPriors,
)
from .supernet_plan import (
    SupernetChoices,
    _BlockPlan,
    _Plan,
    _plan,
)

__all__ = ["FAMILIES", "LEARNED_POS", "SPViTSupernet", "SuperAttention", "SuperBlock",
           "SuperDWConv", "SuperLinear", "SuperNorm", "SuperPool", "SuperPriors",
           "SupernetChoices"]

LEARNED_POS: tuple[str, ...] = ("learned", "learned_sincos")  # one learnable embedding


# ---------------------------------------------------------------------------- blocks
class SuperAttention(nn.Module):
    """Q/K/V, output projection and per-head-slot priors of one block at its largest width."""

    def __init__(self, dim: int, *, slots: int, head_dim: int, families: Sequence[str],
                 grid_size: int, qkv_bias: bool) -> None:
        super().__init__()
        self.dim = dim
        self.qkv = SuperLinear(dim, 3 * dim, bias=qkv_bias)
        self.proj = SuperLinear(dim, dim)
        self.prior = (SuperPriors(families, slots=slots, head_dim=head_dim, grid_size=grid_size)
                      if families else None)

    def qkv_sliced(self, C: int, parts: Sequence[int], use_bias: bool
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rows of Q (part 0), K (1), V (2) for width C, each the first C of its part."""
        w = torch.cat([self.qkv.weight[p * self.dim:p * self.dim + C, :C] for p in parts])
        b = None
        if use_bias and self.qkv.bias is not None:
            b = torch.cat([self.qkv.bias[p * self.dim:p * self.dim + C] for p in parts])
        return w, b

    def forward(self, x: torch.Tensor, plan: _BlockPlan, grid: Grid, num_prefix: int,
                shared: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, N, C = x.shape
        H = plan.heads
        d = C // H
        if plan.share:
            if shared is None:
                raise RuntimeError("a shared-attention block needs the previous block's attention")
            v = F.linear(x, *self.qkv_sliced(C, (2,), plan.qkv_bias))
            v = v.reshape(B, N, H, d).transpose(1, 2)  # (B, H, N, d)
            out = (shared.to(v.dtype) @ v).transpose(1, 2).reshape(B, N, C)
            return self.proj(out, C, C), shared
        qkv = F.linear(x, *self.qkv_sliced(C, (0, 1, 2), plan.qkv_bias))
        q, k, v = qkv.reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4).contiguous().unbind(0)
        mult = bias = None
        if self.prior is not None and any(t != "none" for t in plan.head_types):
            mult, bias = self.prior(plan.head_types, d, plan.arch_grid, grid, num_prefix,
                                    x.dtype)
        attn = prior_attention(q, k, scale=d ** -0.5, mult=mult, bias=bias)
        out = (attn.to(v.dtype) @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj(out, C, C), attn

    def export(self, plan: _BlockPlan) -> dict[str, torch.Tensor]:
        C = plan.dim
        out: dict[str, torch.Tensor] = {}
        w, b = self.qkv_sliced(C, (2,) if plan.share else (0, 1, 2), plan.qkv_bias)
        name = "v" if plan.share else "qkv"
        out[f"{name}.weight"] = w
        if b is not None:
            out[f"{name}.bias"] = b
        out["proj.weight"], out["proj.bias"] = self.proj.sliced(C, C)
        if not plan.share and any(t != "none" for t in plan.head_types):
            for k, v in self.prior.export(plan.head_types, C // plan.heads,
                                          plan.arch_grid).items():
                out[f"prior.{k}"] = v
        return out


class SuperBlock(nn.Module):
    """One block position of the supernet: `spvit.model.Block`'s computation (the same
    `spvit.layers.block_order`) over the active subnet's slices."""

    def __init__(self, extent: Mapping[str, int], *, choices: SupernetChoices, pool_here: bool,
                 norm_layer: Callable[..., nn.Module],
                 act_layer: Callable[..., nn.Module]) -> None:
        super().__init__()
        W = extent["width"]
        self.pools = nn.ModuleDict()
        if pool_here:
            for f in choices.pool_width_factors:
                self.pools[f"f{f}"] = SuperPool(extent["in_width"], width_factor=f,
                                                cls_proj=choices.head == "cls")
        self.conv_pos = SuperDWConv(W) if True in choices.conv_pos else None
        self.norm1 = SuperNorm(W, norm_layer)
        families = [t for t in choices.prior_types if t != "none"]
        self.attn = SuperAttention(W, slots=max(choices.heads), head_dim=extent["head_dim"],
                                   families=families, grid_size=extent["grid"],
                                   qkv_bias=True in choices.qkv_bias)
        self.norm2 = SuperNorm(W, norm_layer)
        self.fc1 = SuperLinear(W, extent["hidden"])
        self.act = act_layer()  # as timm's Mlp in `spvit.model.Block`
        self.fc2 = SuperLinear(extent["hidden"], W)

    def forward(self, x: torch.Tensor, grid: Grid, plan: _BlockPlan,
                attn: torch.Tensor | None, cls_token: torch.Tensor | None
                ) -> tuple[torch.Tensor, Grid, torch.Tensor | None]:
        C, hidden = plan.dim, plan.hidden

        def mlp(h: torch.Tensor) -> torch.Tensor:
            return self.fc2(self.act(self.fc1(self.norm2(h), hidden, C)), C, hidden)

        def drop(y: torch.Tensor) -> torch.Tensor:
            return drop_path(y, plan.drop_path, self.training) if plan.drop_path > 0 else y

        x, grid, attn = block_order(
            x, grid, cls_token=cls_token, cls_before=plan.cls_before, has_cls=plan.has_cls,
            pool=self.pools[f"f{plan.width_factor}"] if plan.pool else None,
            conv_pos=self._conv_pos if plan.conv_pos else None, conv_pos_end=plan.conv_pos_end,
            attention=lambda h, grid, n: self.attn(self.norm1(h), plan, grid, n, attn),
            mlp=mlp, drop1=drop, drop2=drop, skip_lam=plan.skip_lam)
        return x, grid, (attn if plan.keep_attn else None)

    def _conv_pos(self, x: torch.Tensor, grid: Grid, num_prefix: int) -> torch.Tensor:
        prefix, fmap = tokens_to_map(x, grid, num_prefix)
        return map_to_tokens(prefix, fmap + self.conv_pos(fmap, stride=1))

    def export(self, plan: _BlockPlan) -> dict[str, torch.Tensor]:
        C = plan.dim
        out: dict[str, torch.Tensor] = {}
        if plan.pool:
            pool = self.pools[f"f{plan.width_factor}"]
            for k, v in pool.export(plan.in_dim, plan.cls_before).items():
                out[f"pool.{k}"] = v
        if plan.conv_pos:
            for k, v in self.conv_pos.export(C).items():
                out[f"conv_pos.proj.{k}"] = v
        for name in ("norm1", "norm2"):
            for k, v in getattr(self, name).export(C).items():
                out[f"{name}.{k}"] = v
        for k, v in self.attn.export(plan).items():
            out[f"attn.{k}"] = v
        out["mlp.fc1.weight"], out["mlp.fc1.bias"] = self.fc1.sliced(plan.hidden, C)
        out["mlp.fc2.weight"], out["mlp.fc2.bias"] = self.fc2.sliced(C, plan.hidden)
        return out


# ---------------------------------------------------------------------------- the supernet
class SPViTSupernet(nn.Module):
    """A weight-sharing supernet over `choices` (see the module docstring).

    Args:
        choices: the values each dimension can take.
        norm_layer, act_layer: the norms' class and the MLP's activation, as `SPViT` takes them
            (None: LayerNorm(eps 1e-6) and GELU); the subnets are built with them too.
        seed: when given, every parameter is initialised from it (the global RNG is untouched).

    Use `set_active(spec)` then call the module on images `(B, in_chans, H, W)`; or
    `forward(x, spec=spec)`. `subnet(spec)` returns the stand-alone `SPViT`.
    """

    def __init__(self, choices: SupernetChoices, *, norm_layer: LayerArg = None,
                 act_layer: LayerArg = None, seed: int | None = None) -> None:
        super().__init__()
        if not isinstance(choices, SupernetChoices):
            raise ConfigError(f"SPViTSupernet needs SupernetChoices, but got"
                              f" {type(choices).__name__}.")
        self.choices = choices
        self.norm_layer = resolve_norm_layer(norm_layer)
        self.act_layer = resolve_act_layer(act_layer)
        extents = choices.block_extents()
        self.extents = extents
        d_max = max(choices.embed_dims)
        pool_positions = {i for s in choices.pool_schedules for i in s}
        if seed is None:
            self._build(choices, extents, d_max, pool_positions)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                self._build(choices, extents, d_max, pool_positions)
        self._active: _Plan | None = None

    def _build(self, choices: SupernetChoices, extents: list[dict[str, int]], d_max: int,
               pool_positions: set[int]) -> None:
        stem_cls = ConvStem if choices.stem == "conv" else LinearStem
        self.stems = nn.ModuleDict({
            f"p{p}": stem_cls(patch_size=p, in_chans=choices.in_chans, embed_dim=d_max)
            for p in choices.patch_sizes})
        self.pos_embeds = nn.ParameterDict()
        if any(p in LEARNED_POS for p in choices.pos_embeds):
            for p in choices.patch_sizes:
                n0 = (choices.img_size // p) ** 2
                # Position 0 belongs to a class token in the sequence from the stem on.
                self.pos_embeds[f"p{p}"] = nn.Parameter(torch.zeros(1, n0 + 1, d_max))
        widest = max([d_max] + [e["width"] for e in extents])
        self.cls_token = (nn.Parameter(torch.zeros(1, 1, widest)) if choices.head == "cls"
                          else None)
        self.blocks = nn.ModuleList(
            SuperBlock(e, choices=choices, pool_here=i in pool_positions,
                       norm_layer=self.norm_layer, act_layer=self.act_layer)
            for i, e in enumerate(extents))
        self.norm = SuperNorm(widest, self.norm_layer)
        self.head = SuperLinear(widest, choices.num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """timm's ViT init for the shared weights (priors start as the identity)."""
        for m in self.modules():
            if m is not self and isinstance(m, (SuperLinear, SuperNorm, SuperDWConv,
                                                SuperPriors)):
                m.reset_parameters()
        for stem in self.stems.values():
            for m in stem.modules():
                if m is not stem and hasattr(m, "reset_parameters"):
                    m.reset_parameters()
        for pe in self.pos_embeds.values():
            nn.init.trunc_normal_(pe, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)

    # ------------------------------------------------------------------ choosing a subnet
    def check(self, spec: ArchSpec) -> None:
        """Raise `ConfigError` (one line naming the dimension and value) if `spec` is not held."""
        if not isinstance(spec, ArchSpec):
            raise ConfigError(f"a subnet is an ArchSpec, but got {type(spec).__name__}.")
        why = self.choices.why_not(spec)
        if why is not None:
            raise ConfigError(f"the architecture is outside the supernet: {why}. Pick a"
                              " member of the supernet's search space.")

    def set_active(self, spec: ArchSpec) -> None:
        """Make `spec` the subnet that `forward` computes."""
        self.check(spec)
        self._active = _plan(spec)

    @property
    def active(self) -> ArchSpec | None:
        return None if self._active is None else self._active.spec

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, spec: ArchSpec | None = None) -> torch.Tensor:
        if spec is not None:
            self.set_active(spec)
        if self._active is None:
            raise RuntimeError("no active subnet: call set_active(spec) first")
        plan = self._active
        s = plan.spec
        D = s.embed_dim
        # The stem at the widest embed_dim: the first D output channels are the subnet's stem
        # (each output channel has its own kernel), for the cost of the unused channels' proj.
        x, grid = self.stems[f"p{s.patch_size}"](x)
        x = x[..., :D]  # (B, Gh*Gw, D)
        side = s.grid_size
        learned = s.pos_embed in LEARNED_POS
        prefix = int(plan.cls_from_stem and learned)
        cls_pos = None
        if learned:
            pos = self.pos_embeds[f"p{s.patch_size}"][:, 1 - prefix:, :D]
            if tuple(grid) != (side, side):
                pos = resample_abs_pos_embed(pos, new_size=list(grid), old_size=[side, side],
                                             num_prefix_tokens=prefix)
            x = x + pos[:, prefix:].to(x.dtype)
            cls_pos = pos[:, :prefix]
        elif s.pos_embed == "sincos":
            x = x + sincos_2d(grid, D, device=x.device)[None].to(x.dtype)
        if plan.cls_from_stem:
            cls = self.cls_token[:, :, :D]
            cls = cls if cls_pos is None else cls + cls_pos
            x = torch.cat([cls.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        attn = None
        for i, bp in enumerate(plan.blocks):
            join = (self.cls_token[:, :, :plan.cls_width]
                    if s.head == "cls" and not plan.cls_from_stem and i == s.cls_block else None)
            x, grid, attn = self.blocks[i](x, grid, bp, attn, join)
        x = self.norm(x)
        x = x[:, 0] if s.head == "cls" else x[:, int(s.head == "cls"):].mean(dim=1)
        C = x.shape[-1]
        return self.head(x, s.num_classes, C)

    # ------------------------------------------------------------------ stand-alone subnets
    def inherited_state_dict(self, spec: ArchSpec) -> dict[str, torch.Tensor]:
        """The weights `spec` inherits, under `SPViT(spec)`'s state_dict names (views of the
        supernet's tensors; clone before changing them)."""
        self.check(spec)
        plan = _plan(spec)
        D = spec.embed_dim
        out: dict[str, torch.Tensor] = {}
        stem = self.stems[f"p{spec.patch_size}"]
        for k, v in stem.state_dict(keep_vars=True).items():
            out[f"patch_embed.{k}"] = v[:D] if k.startswith("proj.") else v
        if spec.head == "cls":
            out["cls_token"] = self.cls_token[:, :, :plan.cls_width]
        if spec.pos_embed in LEARNED_POS:
            prefix = int(plan.cls_from_stem)
            out["pos_embed"] = self.pos_embeds[f"p{spec.patch_size}"][:, 1 - prefix:, :D]
        for i, bp in enumerate(plan.blocks):
            for k, v in self.blocks[i].export(bp).items():
                out[f"blocks.{i}.{k}"] = v
        for k, v in self.norm.export(spec.num_features).items():
            out[f"norm.{k}"] = v
        out["head.weight"], out["head.bias"] = self.head.sliced(spec.num_classes,
                                                                spec.num_features)
        return out

    @torch.no_grad()
    def subnet(self, spec: ArchSpec) -> SPViT:
        """A stand-alone `SPViT(spec)` whose weights are the inherited slices.

        The model is built by `spvit.create_model` (its `spec` keeps `init`, which the weights
        do not follow: they are inherited) and filled by parameter name; a name of the model
        that the supernet has no counterpart for is an error, never left at its initial value.
        """
        from .factory import create_model

        inherited = self.inherited_state_dict(spec)
        # Built with the cheap init: every tensor is overwritten by name right after.
        model = create_model(spec.replace(init="trunc_normal"), seed=0,
                             norm_layer=self.norm_layer, act_layer=self.act_layer)
        model.spec = spec
        own = model.state_dict()
        missing = sorted(set(own) - set(inherited))
        extra = sorted(set(inherited) - set(own))
        if missing or extra:
            raise RuntimeError(f"the supernet and SPViT disagree on parameter names: the model"
                               f" has no inherited value for {missing[:5]} and no place for"
                               f" {extra[:5]}")
        for name, target in own.items():
            value = inherited[name]
            if value.shape != target.shape:
                raise RuntimeError(f"inherited {name} has shape {tuple(value.shape)}, the model"
                                   f" expects {tuple(target.shape)}")
            target.copy_(value.detach().to(target.dtype))
        ref = next(self.parameters())
        return model.to(ref.device)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Embeddings and the parametric priors, as `SPViT.no_weight_decay`."""
        names = {"cls_token"}
        for name, _ in self.named_parameters():
            if name.startswith("pos_embeds.") or name.endswith(
                    (".rpb_table", ".gaussian", ".axial", ".mlp_bias", ".decay")):
                names.add(name)
        return names
