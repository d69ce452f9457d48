"""`ArchSpec`: the one description of an SP-ViT candidate, from sampler to export.

The search space samples an `ArchSpec`, the cost model prices it, the builder (`spvit.create_model`)
turns it into a module, checkpoints and exports carry it as `arch.yaml`. It is a frozen dataclass,
validated at construction: every rule it breaks raises one `ConfigError` that names the rule, the
value and the fix. Two serialised forms exist and both round-trip:

* nested (`to_dict()` / YAML): global fields plus `blocks:`, a list with one mapping per block;
* flat (`to_flat()`): global fields plus `depth` and per-block labels `heads_3`, `prior_3`
  (or `prior_3_0`, `prior_3_1`, ... when heads differ in prior type), `share_3`, `pool_3`.
  These are the names Optuna parameters, logs and study attributes use.

`ArchSpec.from_dict` accepts either form.

Identity: two specs are the same architecture iff they are `==` (the fields, normalised at
construction), and `hash` agrees, so a spec is its own key in a dict or set. Where the key must
be text (a cache file, a log line), `ArchSpec.identity()` is its flat form as sorted-key JSON,
the text earlier runs keyed architectures by.

Token grid and width along the network. The patch grid starts at `img_size // patch_size` per side.
A block with `pool: true` first pools the patch-token grid 2x2 (side S becomes ceil(S / 2)) and
multiplies the width by `pool_width_factor` (PiT-style: 1 keeps the width, 2 doubles it), then
runs attention. With `head: cls` the CLS token joins at block `cls_block` (0 = from the start, as
in DeiT; SP-ViT-S uses 14 of 16: SP-SA blocks see patch tokens only); it is carried through later
pools.

Positional encoding (`pos_embed`): `learned` (a parameter, N(0, 0.02)), `learned_sincos` (the
same parameter, initialised to the linear-frequency 2-D sin-cos table `spvit.layers.sincos_2d`),
`sincos` (that table, fixed), `none`. The encoding is the spec's under every `init`; the impulse
inits need `learned_sincos` or `sincos` (a validation rule). Residual scaling `skip_lam`: both
residual branches of every block are divided by it (1 = plain; the SP-ViT release uses 2 for
S/M and 3 for L). `conv_pos_place`: where the conv positional layer runs in each block,
`before_attn` (CPVT) or `end` (after the MLP, as in the SP-ViT release).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from .errors import ConfigError, did_you_mean
from .io import atomic_write_text, read_user_text

PRIOR_TYPES: tuple[str, ...] = ("none", "mlp", "gaussian", "axial", "rpb", "decay")
INIT_SCHEMES: tuple[str, ...] = ("trunc_normal", "mimetic", "impulse3", "impulse5",
                                 "impulse3_mimetic", "impulse5_mimetic")
STEMS: tuple[str, ...] = ("linear", "conv")
HEADS: tuple[str, ...] = ("cls", "avg")
POS_EMBEDS: tuple[str, ...] = ("learned", "learned_sincos", "sincos", "none")
# The encodings the impulse inits can solve against (a structured 2-D sin-cos table).
IMPULSE_POS_EMBEDS: tuple[str, ...] = ("learned_sincos", "sincos")
CONV_POS_PLACES: tuple[str, ...] = ("before_attn", "end")

_BLOCK_KEYS = ("heads", "prior", "share", "pool")


_did_you_mean = did_you_mean


def pooled_side(side: int) -> int:
    """Grid side after one 2x2 token pool (kernel 3, stride 2, padding 1): ceil(side / 2)."""
    return math.ceil(side / 2)


def can_pool(side: int) -> bool:
    """Whether a `side`x`side` grid may be pooled: the pooled grid keeps at least 2x2."""
    return pooled_side(side) >= 2


def schedule_fits(schedule: Sequence[int], depth: int, side: int) -> bool:
    """Whether every block of a pool `schedule` exists at `depth` and may pool a `side`x`side`
    grid, pool after pool (the rule `ArchSpec` checks)."""
    for i in schedule:
        if i >= depth or not can_pool(side):
            return False
        side = pooled_side(side)
    return True


def _share_refusal(index: int, pool: bool) -> str:
    if index == 0:
        return ("share: true reuses the previous block's attention map, but block 0 has no"
                " previous block. Set share: false on block 0.")
    if pool:
        return ("share: true cannot follow a pool (the token grid changed), but this block"
                " pools. Set share: false or move the pool.")
    return (f"share: true cannot be used where the CLS token joins (the token count changes at"
            f" cls_block {index}). Set share: false here.")


def resolve_cls_block(cls_block: int, depth: int, head: str = "cls") -> int:
    """The block where the CLS token joins, counted from 0: a negative `cls_block` counts from the
    end (-2 with depth 6 is 4); 0 for `head: avg`, which has no CLS token."""
    if head != "cls":
        return 0
    return cls_block + depth if cls_block < 0 else cls_block


def can_share(index: int, *, pool: bool, head: str, cls_block: int) -> bool:
    """Whether block `index` may reuse the previous block's attention map: not block 0, not a
    block that pools, not where the CLS token joins (the token grid or count changes there)."""
    return index > 0 and not pool and not (head == "cls" and index == cls_block)


def _check_choice(name: str, value: Any, options: tuple[str, ...], where: str = "") -> None:
    if not isinstance(value, str) or value not in options:
        hint = _did_you_mean(value, options) if isinstance(value, str) else ""
        raise ConfigError(
            f"{where}{name} must be one of {list(options)}, but got {value!r}."
            f"{hint or f' Set {name}: {options[0]} or another of those.'}"
        )


def _check_int(name: str, value: Any, *, minimum: int, where: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(
            f"{where}{name} must be an integer, but got {value!r} ({type(value).__name__})."
            f" Write it as a whole number, e.g. {name}: {minimum}."
        )
    if value < minimum:
        raise ConfigError(f"{where}{name} must be >= {minimum}, but got {value}. Raise it.")


def _check_bool(name: str, value: Any, where: str = "") -> None:
    if not isinstance(value, bool):
        raise ConfigError(
            f"{where}{name} must be true or false, but got {value!r}. Write {name}: true or false."
        )


@dataclass(frozen=True)
class BlockSpec:
    """One transformer block.

    Args:
        heads: number of attention heads; must divide the block's width.
        prior: spatial-prior type of every head (`str`), or one type per head (tuple of length
            `heads`). A tuple whose entries are all equal is stored as that single string.
        share: reuse the previous block's attention probabilities instead of computing its own
            (PSViT attention sharing): no Q/K projections, own V and output projection.
        pool: pool the patch-token grid 2x2 before this block (PSViT token pooling).
    """

    heads: int
    prior: str | tuple[str, ...] = "none"
    share: bool = False
    pool: bool = False

    def __post_init__(self) -> None:
        _check_int("heads", self.heads, minimum=1)
        prior = self.prior
        if isinstance(prior, list):
            prior = tuple(prior)
        if isinstance(prior, tuple):
            if len(prior) != self.heads:
                raise ConfigError(
                    f"a per-head prior list must have one entry per head ({self.heads}),"
                    f" but got {len(prior)} entries {list(prior)}. List {self.heads} prior types"
                    " or give one type for all heads."
                )
            for p in prior:
                _check_choice("prior", p, PRIOR_TYPES)
            if len(set(prior)) == 1:
                prior = prior[0]
        else:
            _check_choice("prior", prior, PRIOR_TYPES)
        object.__setattr__(self, "prior", prior)
        _check_bool("share", self.share)
        _check_bool("pool", self.pool)

    @property
    def head_priors(self) -> tuple[str, ...]:
        """The prior type of each head, always as a tuple of length `heads`."""
        if isinstance(self.prior, str):
            return (self.prior,) * self.heads
        return self.prior

    @property
    def has_prior(self) -> bool:
        """True if any head carries a spatial prior (type other than `none`)."""
        return any(p != "none" for p in self.head_priors)

    def to_dict(self) -> dict[str, Any]:
        prior = self.prior if isinstance(self.prior, str) else list(self.prior)
        return {"heads": self.heads, "prior": prior, "share": self.share, "pool": self.pool}


@dataclass(frozen=True)
class ArchSpec:
    """A complete SP-ViT candidate. See the module docstring for the grid/width conventions."""

    blocks: tuple[BlockSpec, ...]
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 192
    mlp_ratio: float = 4.0
    stem: str = "linear"
    head: str = "cls"
    init: str = "trunc_normal"
    cls_block: int = 0
    pool_width_factor: int = 2
    pos_embed: str = "learned"
    conv_pos: bool = False
    qkv_bias: bool = True
    drop_path_rate: float = 0.0
    skip_lam: float = 1.0
    conv_pos_place: str = "before_attn"

    # ------------------------------------------------------------------ validation
    def __post_init__(self) -> None:
        blocks = self.blocks
        if isinstance(blocks, (list, tuple)):
            blocks = tuple(b if isinstance(b, BlockSpec) else _block_from_mapping(b, i)
                           for i, b in enumerate(blocks))
        else:
            raise ConfigError(
                f"blocks must be a list with one entry per transformer block, but got {blocks!r}."
                " Write blocks: [{heads: 3}, ...]."
            )
        object.__setattr__(self, "blocks", blocks)
        if isinstance(self.mlp_ratio, int) and not isinstance(self.mlp_ratio, bool):
            object.__setattr__(self, "mlp_ratio", float(self.mlp_ratio))
        for name in ("drop_path_rate", "skip_lam"):
            value = getattr(self, name)
            if isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, name, float(value))
        if isinstance(self.drop_path_rate, float) and self.drop_path_rate == 0.0:
            object.__setattr__(self, "drop_path_rate", 0.0)  # not -0.0: one identity text
        self._validate()

    def _validate(self) -> None:
        if not self.blocks:
            raise ConfigError("an architecture needs at least one block, but got 0. Add blocks.")
        for name in ("img_size", "patch_size", "in_chans", "num_classes", "embed_dim",
                     "pool_width_factor"):
            _check_int(name, getattr(self, name), minimum=1)
        _check_int("cls_block", self.cls_block, minimum=0)
        if not isinstance(self.mlp_ratio, float) or not self.mlp_ratio > 0:
            raise ConfigError(f"mlp_ratio must be a number > 0, but got {self.mlp_ratio!r}."
                              " Use e.g. mlp_ratio: 4.0.")
        if not isinstance(self.drop_path_rate, float) or not 0.0 <= self.drop_path_rate < 1.0:
            raise ConfigError(f"drop_path_rate must be in [0, 1), but got {self.drop_path_rate!r}."
                              " Use e.g. drop_path_rate: 0.1.")
        _check_choice("stem", self.stem, STEMS)
        _check_choice("head", self.head, HEADS)
        _check_choice("init", self.init, INIT_SCHEMES)
        _check_choice("pos_embed", self.pos_embed, POS_EMBEDS)
        _check_bool("conv_pos", self.conv_pos)
        _check_choice("conv_pos_place", self.conv_pos_place, CONV_POS_PLACES)
        if not isinstance(self.skip_lam, float) or not self.skip_lam > 0:
            raise ConfigError(f"skip_lam must be a number > 0, but got {self.skip_lam!r}."
                              " Use skip_lam: 1.0 (no residual scaling) or e.g. 2.0.")
        _check_bool("qkv_bias", self.qkv_bias)

        if self.img_size % self.patch_size:
            raise ConfigError(
                f"img_size {self.img_size} is not divisible by patch_size {self.patch_size}."
                f" Pick an img_size that is a multiple of {self.patch_size}."
            )
        if self.stem == "conv" and self.patch_size % 2:
            raise ConfigError(
                f"the conv stem downsamples by 2 and then by patch_size/2, so patch_size must be"
                f" even, but got {self.patch_size}. Use an even patch_size or stem: linear."
            )
        if self.head == "avg" and self.cls_block != 0:
            raise ConfigError(
                f"cls_block only applies to head: cls, but got cls_block {self.cls_block} with"
                " head: avg. Remove cls_block or set head: cls."
            )
        if self.head == "cls" and self.cls_block >= self.depth:
            raise ConfigError(
                f"cls_block must be < depth ({self.depth}) so the CLS token sees at least one"
                f" block, but got {self.cls_block}. Lower cls_block."
            )
        if self.init.startswith("impulse") and self.head == "cls":
            raise ConfigError(
                f"init {self.init} builds attention maps over patch tokens only and needs"
                " head: avg (global average pooling), but got head: cls."
                " Set head: avg or choose init: trunc_normal/mimetic."
            )
        if self.init.startswith("impulse") and self.pos_embed not in IMPULSE_POS_EMBEDS:
            raise ConfigError(
                f"init {self.init} solves each head's Q/K against a 2-D sin-cos positional"
                f" encoding, so it needs pos_embed in {list(IMPULSE_POS_EMBEDS)}, but got"
                f" pos_embed: {self.pos_embed}. Set pos_embed: learned_sincos (and use it for"
                " every init you compare)."
            )
        sincos = self.pos_embed in IMPULSE_POS_EMBEDS
        if sincos and self.embed_dim % 4:
            what = f"pos_embed: {self.pos_embed}"
            raise ConfigError(
                f"{what} uses a 2-D sin-cos encoding that splits embed_dim into 4 equal parts,"
                f" but embed_dim {self.embed_dim} is not divisible by 4."
                " Use an embed_dim that is a multiple of 4."
            )

        side = self.grid_size
        width = self.embed_dim
        for i, b in enumerate(self.blocks):
            where = f"block {i}: "
            if b.pool:
                new_side = pooled_side(side)
                if not can_pool(side):
                    raise ConfigError(
                        f"{where}pooling would shrink the token grid from {side}x{side} to"
                        f" {new_side}x{new_side}; a pool needs a grid of at least 3x3."
                        " Remove this pool or use a smaller patch_size / larger img_size."
                    )
                side = new_side
                width *= self.pool_width_factor
            if width % b.heads:
                raise ConfigError(
                    f"{where}width {width} is not divisible by heads {b.heads}."
                    " Choose a head count that divides the width."
                )
            if b.share:
                if not can_share(i, pool=b.pool, head=self.head, cls_block=self.cls_block):
                    raise ConfigError(f"{where}{_share_refusal(i, b.pool)}")
                prev = self.blocks[i - 1]
                if prev.heads != b.heads:
                    raise ConfigError(
                        f"{where}share: true needs the same head count as block {i - 1}"
                        f" ({prev.heads}), but got heads {b.heads}. Set heads: {prev.heads}."
                    )
                if b.has_prior:
                    raise ConfigError(
                        f"{where}a shared block reuses block {i - 1}'s attention map and has no"
                        f" prior of its own, but got prior {b.to_dict()['prior']!r}."
                        " Set prior: none on shared blocks."
                    )

    # ------------------------------------------------------------------ derived facts
    @property
    def depth(self) -> int:
        return len(self.blocks)

    @property
    def grid_size(self) -> int:
        """Side of the patch-token grid after the stem."""
        return self.img_size // self.patch_size

    @property
    def num_pools(self) -> int:
        return sum(b.pool for b in self.blocks)

    def block_grids(self) -> tuple[int, ...]:
        """Side of the patch-token grid seen by each block's attention (after its pool)."""
        side, out = self.grid_size, []
        for b in self.blocks:
            if b.pool:
                side = pooled_side(side)
            out.append(side)
        return tuple(out)

    def block_widths(self) -> tuple[int, ...]:
        """Width (channels) of each block (after its pool)."""
        width, out = self.embed_dim, []
        for b in self.blocks:
            if b.pool:
                width *= self.pool_width_factor
            out.append(width)
        return tuple(out)

    def block_has_cls(self) -> tuple[bool, ...]:
        """Whether the CLS token is among each block's tokens."""
        return tuple(self.head == "cls" and i >= self.cls_block for i in range(self.depth))

    def block_tokens(self) -> tuple[int, ...]:
        """Number of tokens each block's attention sees (patch tokens, plus CLS if present)."""
        return tuple(s * s + int(c) for s, c in zip(self.block_grids(), self.block_has_cls(),
                                                        strict=True))

    @property
    def num_features(self) -> int:
        """Width of the final features fed to the classifier."""
        return self.block_widths()[-1]

    def replace(self, **changes: Any) -> ArchSpec:
        """A copy with `changes` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def uniform(cls, *, depth: int, heads: int, prior: str = "none", **kwargs: Any) -> ArchSpec:
        """A plain stack of `depth` identical blocks (no pooling, no sharing)."""
        _check_int("depth", depth, minimum=1)
        return cls(blocks=tuple(BlockSpec(heads=heads, prior=prior) for _ in range(depth)),
                   **kwargs)

    # ------------------------------------------------------------------ identity
    def identity(self) -> str:
        """The architecture as key text: `to_flat()` as JSON with sorted keys. Equal specs, and
        only they, have equal identities. The format is fixed, so that keys written by earlier
        runs still match; in Python, key by the spec itself (it is hashable)."""
        return json.dumps(self.to_flat(), sort_keys=True)

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """Nested form: global fields plus `blocks`, a list of per-block mappings (YAML form)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name != "blocks":
                out[f.name] = getattr(self, f.name)
        out["blocks"] = [b.to_dict() for b in self.blocks]
        return out

    def to_flat(self) -> dict[str, Any]:
        """Flat form: global fields, `depth`, and labelled per-block choices (`prior_3`, ...)."""
        out = {k: v for k, v in self.to_dict().items() if k != "blocks"}
        out["depth"] = self.depth
        for i, b in enumerate(self.blocks):
            out[f"heads_{i}"] = b.heads
            if isinstance(b.prior, str):
                out[f"prior_{i}"] = b.prior
            else:
                for h, p in enumerate(b.prior):
                    out[f"prior_{i}_{h}"] = p
            out[f"share_{i}"] = b.share
            out[f"pool_{i}"] = b.pool
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ArchSpec:
        """Build from the nested form (has `blocks`) or the flat form (has `depth`)."""
        if not isinstance(data, Mapping):
            raise ConfigError(
                f"an architecture must be a mapping of fields, but got {type(data).__name__}."
                " Write it as `key: value` lines with a `blocks:` list."
            )
        if "blocks" in data:
            return cls._from_nested(data)
        if "depth" in data:
            return cls._from_flat(data)
        raise ConfigError(
            "an architecture needs either a `blocks:` list (nested form) or `depth` with"
            f" `heads_0`, ... (flat form), but got keys {sorted(data)}. Add `blocks:`."
        )

    @classmethod
    def _global_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.name != "blocks"]

    @classmethod
    def _from_nested(cls, data: Mapping[str, Any]) -> ArchSpec:
        names = cls._global_names()
        for key in data:
            if key != "blocks" and key not in names:
                raise ConfigError(
                    f"unknown architecture field {key!r}."
                    f"{_did_you_mean(str(key), names + ['blocks'])}"
                    f" Valid fields: {names + ['blocks']}."
                )
        blocks = data["blocks"]
        if not isinstance(blocks, (list, tuple)):
            raise ConfigError(
                f"blocks must be a list with one entry per transformer block, but got {blocks!r}."
                " Write blocks: [{heads: 3}, ...]."
            )
        kwargs = {k: v for k, v in data.items() if k != "blocks"}
        return cls(blocks=tuple(_block_from_mapping(b, i) for i, b in enumerate(blocks)), **kwargs)

    @classmethod
    def _from_flat(cls, data: Mapping[str, Any]) -> ArchSpec:
        names = cls._global_names()
        depth = data["depth"]
        _check_int("depth", depth, minimum=1)
        used = {"depth"}
        kwargs = {}
        for k in names:
            if k in data:
                kwargs[k] = data[k]
                used.add(k)
        blocks = []
        for i in range(depth):
            key = f"heads_{i}"
            if key not in data:
                raise ConfigError(f"flat architecture has depth {depth} but no {key!r}. Add {key}.")
            heads = data[key]
            used.add(key)
            if f"prior_{i}" in data:
                prior: Any = data[f"prior_{i}"]
                used.add(f"prior_{i}")
            else:
                per_head = []
                h = 0
                while f"prior_{i}_{h}" in data:
                    per_head.append(data[f"prior_{i}_{h}"])
                    used.add(f"prior_{i}_{h}")
                    h += 1
                prior = tuple(per_head) if per_head else "none"
            share = data.get(f"share_{i}", False)
            pool = data.get(f"pool_{i}", False)
            used.update({f"share_{i}", f"pool_{i}"})
            blocks.append(_block_from_mapping(
                {"heads": heads, "prior": prior, "share": share, "pool": pool}, i))
        extra = sorted(set(data) - used)
        if extra:
            raise ConfigError(
                f"unknown key(s) {extra} in a flat architecture of depth {depth}"
                f".{_did_you_mean(extra[0], names)} Remove them or fix depth."
            )
        return cls(blocks=tuple(blocks), **kwargs)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    @classmethod
    def from_yaml(cls, text: str) -> ArchSpec:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ConfigError(f"the architecture is not valid YAML{where}: "
                              f"{getattr(e, 'problem', e)}. Fix the syntax.") from None
        return cls.from_dict(data)

    def save(self, path: str | os.PathLike) -> None:
        """Write the nested YAML form to `path` atomically."""
        atomic_write_text(path, self.to_yaml())

    @classmethod
    def load(cls, path: str | os.PathLike) -> ArchSpec:
        """Read an architecture YAML file (nested or flat form)."""
        hint = "Point to an arch.yaml, e.g. search_spaces/archs/deit_tiny.yaml."
        text = read_user_text(path, what="architecture", hint=hint)
        try:
            return cls.from_yaml(text)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None


def _block_from_mapping(data: Any, index: int) -> BlockSpec:
    where = f"block {index}: "
    if isinstance(data, BlockSpec):
        return data
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{where}a block must be a mapping like {{heads: 3, prior: mlp}}, but got {data!r}."
            " Write each block as a mapping."
        )
    for key in data:
        if key not in _BLOCK_KEYS:
            raise ConfigError(
                f"{where}unknown block field {key!r}.{_did_you_mean(str(key), _BLOCK_KEYS)}"
                f" Valid fields: {list(_BLOCK_KEYS)}."
            )
    if "heads" not in data:
        raise ConfigError(f"{where}every block needs `heads`, but it is missing. Add heads: N.")
    try:
        return BlockSpec(**data)
    except ConfigError as e:
        raise ConfigError(f"{where}{e}") from None
