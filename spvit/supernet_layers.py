"""The supernet's sliced layers: each holds one layer at the largest size any subnet needs at
its position and computes with the leading slice a subnet of a given width uses.

`SuperLinear`, `SuperNorm` (the model's norm class, per channel), `SuperDWConv`, `SuperPool`
(`spvit.layers.TokenPool`) and `SuperPriors` (every prior family's parameters per head slot;
its values come from the formulas of `spvit.priors`, the same functions the model's
`SpatialPrior` calls). `export` methods give a subnet's slices under the stand-alone layer's
parameter names. `spvit.supernet` assembles them into blocks and re-exports them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import lru_cache, partial
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import RmsNorm
from torch import nn

from .errors import ConfigError
from .layers import map_to_tokens, tokens_to_map
from .priors import FAMILIES, gather_pairs, head_order, offset_tables, offset_values_of

Grid = tuple[int, int]


class SuperLinear(nn.Module):
    """A Linear layer at its largest size; `forward(x, out, in_)` uses the leading slice."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.weight, std=0.02)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def sliced(self, out: int, in_: int, use_bias: bool = True
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        bias = self.bias[:out] if (use_bias and self.bias is not None) else None
        return self.weight[:out, :in_], bias

    def forward(self, x: torch.Tensor, out: int, in_: int, use_bias: bool = True) -> torch.Tensor:
        return F.linear(x, *self.sliced(out, in_, use_bias))


class SuperNorm(nn.Module):
    """The model's norm layer at the largest width, over the first C channels with the first C
    affine entries.

    `norm_layer` is the class `spvit.model.Block` builds its norms with (called with the width);
    its eps and affine parameters are taken from the layer it builds. Per-channel slicing needs
    a norm over the channel axis only: a `LayerNorm` (torch's or timm's) or an RMS norm
    (timm's `RmsNorm` or torch's `RMSNorm`).
    """

    def __init__(self, dim: int, norm_layer: Callable[..., nn.Module]) -> None:
        super().__init__()
        layer = norm_layer(dim)
        if isinstance(layer, nn.LayerNorm):
            self.kind = "layer"
        elif isinstance(layer, (RmsNorm, nn.RMSNorm)):
            self.kind = "rms"
        else:
            raise ConfigError(f"the supernet slices its norms per channel, which needs a LayerNorm"
                              f" or an RMS norm, but norm_layer builds {type(layer).__name__}."
                              " Pass norm_layer='layernorm' or 'rmsnorm' (or None).")
        self.eps = layer.eps
        self.register_parameter("weight", layer.weight)
        self.register_parameter("bias", getattr(layer, "bias", None))

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        C = x.shape[-1]
        p = self.export(C)
        if self.kind == "rms":
            return F.rms_norm(x, (C,), p.get("weight"), self.eps)
        return F.layer_norm(x, (C,), p.get("weight"), p.get("bias"), self.eps)

    def export(self, C: int) -> dict[str, torch.Tensor]:
        return {name: t[:C] for name, t in (("weight", self.weight), ("bias", self.bias))
                if t is not None}


class SuperDWConv(nn.Module):
    """A depthwise 3x3 convolution with `multiplier` outputs per input channel, sliced to the
    first C inputs (output channel j reads input j // multiplier in every slice)."""

    def __init__(self, channels: int, multiplier: int = 1) -> None:
        super().__init__()
        self.multiplier = multiplier
        self.weight = nn.Parameter(torch.empty(channels * multiplier, 1, 3, 3))
        self.bias = nn.Parameter(torch.empty(channels * multiplier))

    def reset_parameters(self) -> None:
        # PyTorch's Conv2d default (what the stand-alone layers start from).
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        nn.init.uniform_(self.bias, -1 / 3, 1 / 3)  # 1 / sqrt(fan_in), fan_in = 9

    def forward(self, fmap: torch.Tensor, *, stride: int) -> torch.Tensor:
        C = fmap.shape[1]
        n = C * self.multiplier
        return F.conv2d(fmap, self.weight[:n], self.bias[:n], stride=stride, padding=1, groups=C)

    def export(self, C: int) -> dict[str, torch.Tensor]:
        n = C * self.multiplier
        return {"weight": self.weight[:n], "bias": self.bias[:n]}


class SuperPool(nn.Module):
    """`spvit.layers.TokenPool` at its largest input width, for one width factor."""

    def __init__(self, dim: int, *, width_factor: int, cls_proj: bool) -> None:
        super().__init__()
        self.width_factor = width_factor
        self.conv = SuperDWConv(dim, width_factor)
        self.cls_proj = (SuperLinear(dim, dim * width_factor)
                         if cls_proj and width_factor > 1 else None)

    def forward(self, x: torch.Tensor, grid: Grid, num_prefix: int) -> tuple[torch.Tensor, Grid]:
        prefix, fmap = tokens_to_map(x, grid, num_prefix)
        C = fmap.shape[1]
        fmap = self.conv(fmap, stride=2)  # (B, C*f, ceil(Gh/2), ceil(Gw/2))
        if num_prefix and self.cls_proj is not None:
            prefix = self.cls_proj(prefix, C * self.width_factor, C)
        return map_to_tokens(prefix, fmap), (fmap.shape[-2], fmap.shape[-1])

    def export(self, C: int, has_cls: bool) -> dict[str, torch.Tensor]:
        out = {f"conv.{k}": v for k, v in self.conv.export(C).items()}
        if has_cls and self.cls_proj is not None:
            w, b = self.cls_proj.sliced(C * self.width_factor, C)
            out.update({"cls_proj.weight": w, "cls_proj.bias": b})
        return out


class SuperPriors(nn.Module):
    """Every prior family's parameters for each head slot of one block.

    Shapes (Hs = head slots, dm = largest head width, S = largest grid side):
    `mlp_fc1_weight (Hs, dm, 2)`, `mlp_fc1_bias (Hs, dm)`, `mlp_weight (Hs, dm)`,
    `mlp_bias (Hs,)`, `gaussian (Hs, 3)`, `axial (Hs, 3)`, `rpb_table (Hs, 2S-1, 2S-1)`,
    `decay (Hs,)`; only the families in `families` exist.

    `export` slices a subnet's heads out of the slots (its `SpatialPrior`'s tensors) and the
    forward feeds those slices to `spvit.priors`' formulas and pair gather, so the supernet's
    priors are the model's by construction.
    """

    def __init__(self, families: Sequence[str], *, slots: int, head_dim: int,
                 grid_size: int) -> None:
        super().__init__()
        self.families = tuple(f for f in FAMILIES if f in families)
        self.grid_size = grid_size
        if "mlp" in self.families:
            self.mlp_fc1_weight = nn.Parameter(torch.empty(slots, head_dim, 2))
            self.mlp_fc1_bias = nn.Parameter(torch.empty(slots, head_dim))
            self.mlp_weight = nn.Parameter(torch.empty(slots, head_dim))
            self.mlp_bias = nn.Parameter(torch.empty(slots))
        if "gaussian" in self.families:
            self.gaussian = nn.Parameter(torch.empty(slots, 3))
        if "axial" in self.families:
            self.axial = nn.Parameter(torch.empty(slots, 3))
        if "rpb" in self.families:
            side = 2 * grid_size - 1
            self.rpb_table = nn.Parameter(torch.empty(slots, side, side))
        if "decay" in self.families:
            self.decay = nn.Parameter(torch.empty(slots))

    def reset_parameters(self) -> None:
        """Identity priors, as `spvit.priors.SpatialPrior.reset_parameters`."""
        with torch.no_grad():
            if "mlp" in self.families:
                nn.init.trunc_normal_(self.mlp_fc1_weight, std=0.02)
                self.mlp_fc1_bias.zero_()
                self.mlp_weight.zero_()
                self.mlp_bias.fill_(1.0)
            if "gaussian" in self.families:
                self.gaussian[:, 0] = 0.0
                self.gaussian[:, 1:] = math.log(2.0)
            if "axial" in self.families:
                self.axial.zero_()
            if "rpb" in self.families:
                self.rpb_table.zero_()
            if "decay" in self.families:
                self.decay.zero_()

    def _rpb_crop(self, heads: Sequence[int], arch_grid: int) -> torch.Tensor:
        c = self.grid_size - arch_grid
        side = 2 * arch_grid - 1
        return self.rpb_table[list(heads), c:c + side, c:c + side]

    def export(self, head_types: tuple[str, ...], head_dim: int,
               arch_grid: int) -> dict[str, torch.Tensor]:
        """The stand-alone `SpatialPrior`'s tensors (its heads grouped by family, in order)."""
        by = {t: [h for h, p in enumerate(head_types) if p == t] for t in FAMILIES}
        out: dict[str, torch.Tensor] = {}
        if by["mlp"]:
            idx, d = by["mlp"], head_dim
            out["mlp_fc1.weight"] = self.mlp_fc1_weight[idx, :d].reshape(len(idx) * d, 2)
            out["mlp_fc1.bias"] = self.mlp_fc1_bias[idx, :d].reshape(-1)
            out["mlp_weight"] = self.mlp_weight[idx, :d]
            out["mlp_bias"] = self.mlp_bias[idx]
        for family in ("gaussian", "axial", "decay"):
            if by[family]:
                out[family] = getattr(self, family)[by[family]]
        if by["rpb"]:
            out["rpb_table"] = self._rpb_crop(by["rpb"], arch_grid)
        return out

    def family_params(self, head_types: tuple[str, ...], head_dim: int,
                      arch_grid: int) -> dict[str, tuple[Any, ...]]:
        """The formula arguments of each family the active heads use (as
        `SpatialPrior.family_params`): the exported slices of `export`."""
        t = self.export(head_types, head_dim, arch_grid)
        params: dict[str, tuple[Any, ...]] = {}
        if "mlp_weight" in t:
            fc1 = partial(F.linear, weight=t["mlp_fc1.weight"], bias=t["mlp_fc1.bias"])
            params["mlp"] = (fc1, t["mlp_weight"], t["mlp_bias"])
        for family in ("gaussian", "axial", "decay"):
            if family in t:
                params[family] = (t[family],)
        if "rpb_table" in t:
            params["rpb"] = (t["rpb_table"], arch_grid)
        return params

    def forward(self, head_types: tuple[str, ...], head_dim: int, arch_grid: int, grid: Grid,
                num_prefix: int, dtype: torch.dtype
                ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """`(mult (H, N, N), bias (H, N, N))` for the active heads (None where no head has one):
        `SpatialPrior.forward` of the exported subnet, through the same functions."""
        device = next(self.parameters()).device
        offsets, _ = offset_tables(grid, device)
        mult_order, add_order = _head_order(tuple(head_types))
        mult, bias = offset_values_of(self.family_params(head_types, head_dim, arch_grid),
                                      offsets.to(dtype), mult_order=mult_order.to(device),
                                      add_order=add_order.to(device))
        return (gather_pairs(mult, grid, num_prefix, identity=1.0),
                gather_pairs(bias, grid, num_prefix, identity=0.0))


@lru_cache(maxsize=256)
def _head_order(head_types: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    return head_order(head_types)
