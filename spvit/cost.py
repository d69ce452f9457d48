"""Analytic cost of an `ArchSpec`: exact parameter count and GMACs, without building a model.

`estimate(spec)` mirrors the modules `spvit.SPViT` builds (their parameter shapes are listed in
`spvit/model.py`, `spvit/layers.py`, `spvit/attention.py` and `spvit/priors.py`), so
`estimate(spec).params == sum(p.numel() for p in create_model(spec).parameters())` for every
valid spec. It is plain integer arithmetic (tens of microseconds), which is what lets the search
price, constrain and rank candidates before any of them is built or trained.

`gflops` follows the fvcore / timm convention: one multiply-add is one FLOP, so the figure is
GMACs, for the forward pass of ONE image at `spec.img_size`. Counted (every matrix product or
convolution the forward pass runs):

* stem: the patch projection conv (linear stem), or LV-ViT's three convs and the projection conv;
* token pooling: the depthwise strided conv (`S_out^2 * C_in * f * 9`) and, with a class token and
  f > 1, its `Linear(C_in, C_in * f)`;
* the convolutional positional layer: depthwise 3x3 on the patch grid (`S^2 * C * 9`);
* attention: Q/K/V projection (`3 N C^2`), `Q Kᵀ` and `A V` (`N^2 C` each), output projection
  (`N C^2`); a shared block runs only its V projection, `A V` and the output projection (its Q/K
  projections and `Q Kᵀ` are the saving);
* the `mlp` prior network on the block's unique offsets: its first layer `Linear(2, Hm * d)` on
  `K = (2S - 1)^2` offsets (`2 K Hm d`);
* the MLP (`2 N C h`, h = int(C * mlp_ratio)) and the classifier (`C_last * num_classes`).

Not counted (not multiply-adds of a matrix product, as fvcore): biases, LayerNorm/BatchNorm,
GELU/ReLU, softmax, the scale and the elementwise prior multiply (or `rpb` bias add) on the logits,
the `mlp` prior's per-head output (an elementwise weight-and-sum, `K Hm d`), the `gaussian` and
`axial` priors' closed forms, gathering offset tables into `(H, N, N)`, positional-embedding and
residual adds, average pooling of the head. `torch.utils.flop_counter.FlopCounterMode` counts the
same operations (as 2 FLOPs per MAC) when attention runs on the math path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .arch import ArchSpec

CONV_STEM_WIDTH = 64  # LV-ViT's stem width (spvit.layers.ConvStem.hidden)

PARTS: tuple[str, ...] = (
    "stem", "embeddings", "pool", "conv_pos", "norms", "attn_proj", "attn_matmul", "prior",
    "mlp", "head",
)


@dataclass(frozen=True)
class CostPart:
    """Parameters and MACs of one kind of module, summed over the network."""

    name: str
    params: int
    macs: int


@dataclass(frozen=True)
class Cost:
    """Cost of one architecture.

    Args:
        params: number of parameters (trainable tensors; buffers such as BatchNorm statistics
            and fixed sin-cos encodings are not parameters).
        gflops: GMACs of one image's forward pass (one multiply-add = one FLOP).
        parts: the same split by kind of module (`PARTS` order, kinds with no cost omitted).
    """

    params: int
    gflops: float
    parts: tuple[CostPart, ...] = ()

    @property
    def macs(self) -> int:
        """Multiply-adds of one image's forward pass (exact when `parts` are given)."""
        if self.parts:
            return sum(p.macs for p in self.parts)
        return round(self.gflops * 1e9)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: `params`, `gflops`, `macs` and `parts` ({name: {params, macs}})."""
        return {
            "params": self.params,
            "gflops": self.gflops,
            "macs": self.macs,
            "parts": {p.name: {"params": p.params, "macs": p.macs} for p in self.parts},
        }


def estimate(spec: ArchSpec) -> Cost:
    """Exact parameter count and GMACs of `spvit.create_model(spec)` (see the module docstring)."""
    if not isinstance(spec, ArchSpec):
        raise TypeError(f"estimate() needs an ArchSpec, but got {type(spec).__name__}. Load one"
                        " with ArchSpec.load(path) or ArchSpec.from_dict(mapping).")
    params = dict.fromkeys(PARTS, 0)
    macs = dict.fromkeys(PARTS, 0)
    D, p, cin = spec.embed_dim, spec.patch_size, spec.in_chans
    s0 = spec.grid_size
    f = spec.pool_width_factor
    bias = int(spec.qkv_bias)

    # Stem.
    if spec.stem == "linear":
        params["stem"] = D * cin * p * p + D
        macs["stem"] = s0 * s0 * D * cin * p * p
    else:
        c, half = CONV_STEM_WIDTH, p // 2
        side1 = (spec.img_size - 1) // 2 + 1  # 7x7, stride 2, padding 3
        params["stem"] = c * cin * 49 + 2 * c * c * 9 + 3 * 2 * c + D * c * half * half + D
        macs["stem"] = side1 * side1 * c * (cin * 49 + 2 * c * 9) + s0 * s0 * D * c * half * half

    # Class token and learned positional embedding.
    widths, grids, tokens = spec.block_widths(), spec.block_grids(), spec.block_tokens()
    has_cls_token = spec.head == "cls"
    cls_from_stem = has_cls_token and spec.cls_block == 0
    if has_cls_token:
        params["embeddings"] += D if cls_from_stem else widths[spec.cls_block]
    if spec.pos_embed in ("learned", "learned_sincos"):
        params["embeddings"] += (s0 * s0 + int(cls_from_stem)) * D

    in_dim = D
    for i, block in enumerate(spec.blocks):
        C, S, N = widths[i], grids[i], tokens[i]
        if block.pool:
            out = in_dim * f
            params["pool"] += out * 9 + out
            macs["pool"] += S * S * out * 9
            cls_before = has_cls_token and (cls_from_stem or spec.cls_block < i)
            if cls_before and f > 1:
                params["pool"] += in_dim * out + out
                macs["pool"] += in_dim * out
        if spec.conv_pos:
            params["conv_pos"] += 9 * C + C
            macs["conv_pos"] += S * S * C * 9
        params["norms"] += 4 * C
        if block.share:
            params["attn_proj"] += 2 * C * C + bias * C + C
            macs["attn_proj"] += 2 * N * C * C
            macs["attn_matmul"] += N * N * C
        else:
            params["attn_proj"] += 4 * C * C + 3 * bias * C + C
            macs["attn_proj"] += 4 * N * C * C
            macs["attn_matmul"] += 2 * N * N * C
            head_dim = C // block.heads
            kinds = block.head_priors
            n_mlp = kinds.count("mlp")
            table = (2 * S - 1) ** 2  # unique offsets of the block's grid = rpb table entries
            params["prior"] += (4 * n_mlp * head_dim + n_mlp + 3 * kinds.count("gaussian")
                                + 3 * kinds.count("axial") + kinds.count("rpb") * table
                                + kinds.count("decay"))
            macs["prior"] += table * 2 * n_mlp * head_dim
        hidden = int(C * spec.mlp_ratio)
        params["mlp"] += 2 * C * hidden + hidden + C
        macs["mlp"] += 2 * N * C * hidden
        in_dim = C

    params["norms"] += 2 * in_dim
    params["head"] = in_dim * spec.num_classes + spec.num_classes
    macs["head"] = in_dim * spec.num_classes

    parts = tuple(CostPart(name, params[name], macs[name]) for name in PARTS
                  if params[name] or macs[name])
    total_macs = sum(macs.values())
    return Cost(params=sum(params.values()), gflops=total_macs / 1e9, parts=parts)
