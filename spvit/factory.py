"""Building SP-ViT models: `create_model` and the timm entry points.

`spvit.create_model(x, **overrides)` takes an `ArchSpec`, a mapping (nested or flat form), a path
to an architecture YAML file, or a registered name (`spvit_s`, `spvit_m`, `spvit_l`,
`spvit_test`), applies `overrides` (any `ArchSpec` field, e.g. `num_classes=10`) and returns an
`SPViT`. Importing `spvit` registers the same names with timm, plus a generic `spvit` entry point
that takes `arch=` so any searched architecture loads like a timm model:

    timm.create_model("spvit", arch="DIR/arch.yaml", pretrained=True,
                      pretrained_cfg_overlay=dict(file="DIR/model.safetensors"), num_classes=5)

The registered configurations follow SP-ViT (Zhou et al. 2022): LV-ViT's conv stem, mlp_ratio 3,
no qkv bias, a depthwise-conv positional layer in every block, `mlp` priors in the SP-SA blocks and
the class token joining for the last blocks only (S: 14 of 16 blocks are SP-SA, M: 10 of 20,
L: 22 of 24), drop-path 0.1 / 0.2 / 0.3.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import resample_abs_pos_embed
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from .arch import ArchSpec, BlockSpec
from .errors import ConfigError, did_you_mean
from .model import SPViT


def _spvit_family(*, depth: int, sp_blocks: int, embed_dim: int, heads: int,
                  drop_path_rate: float, skip_lam: float) -> ArchSpec:
    blocks = tuple(BlockSpec(heads=heads, prior="mlp" if i < sp_blocks else "none")
                   for i in range(depth))
    return ArchSpec(blocks=blocks, img_size=224, patch_size=16, num_classes=1000,
                    embed_dim=embed_dim, mlp_ratio=3.0, stem="conv", head="cls",
                    cls_block=sp_blocks, pos_embed="learned", conv_pos=True, qkv_bias=False,
                    drop_path_rate=drop_path_rate, skip_lam=skip_lam, conv_pos_place="end")


def _spvit_test() -> ArchSpec:
    """Tiny: every feature once (conv stem, mixed priors, pool with a class token, share)."""
    return ArchSpec(
        blocks=(BlockSpec(heads=2, prior="mlp"),
                BlockSpec(heads=2, prior=("gaussian", "rpb")),
                BlockSpec(heads=2, prior=("axial", "none"), pool=True),
                BlockSpec(heads=2, share=True)),
        img_size=32, patch_size=8, num_classes=10, embed_dim=32, mlp_ratio=2.0, stem="conv",
        head="cls", cls_block=1, pos_embed="learned", conv_pos=True, qkv_bias=True)


_REGISTRY: dict[str, Callable[[], ArchSpec]] = {
    "spvit_s": lambda: _spvit_family(depth=16, sp_blocks=14, embed_dim=384, heads=6,
                                     drop_path_rate=0.1, skip_lam=2.0),
    "spvit_m": lambda: _spvit_family(depth=20, sp_blocks=10, embed_dim=512, heads=8,
                                     drop_path_rate=0.2, skip_lam=2.0),
    "spvit_l": lambda: _spvit_family(depth=24, sp_blocks=22, embed_dim=768, heads=12,
                                     drop_path_rate=0.3, skip_lam=3.0),
    "spvit_test": _spvit_test,
}

REGISTERED_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def registered_arch(name: str) -> ArchSpec:
    """The `ArchSpec` of a registered model name."""
    if name not in _REGISTRY:
        hint = did_you_mean(name, _REGISTRY)
        raise ConfigError(f"unknown model name {name!r}.{hint} Registered names:"
                          f" {list(_REGISTRY)}; or pass an ArchSpec or a path to an arch.yaml.")
    return _REGISTRY[name]()


def resolve_arch(arch: ArchSpec | Mapping[str, Any] | str | os.PathLike) -> ArchSpec:
    """An `ArchSpec` from an ArchSpec, a mapping, a registered name or a YAML path."""
    if isinstance(arch, ArchSpec):
        return arch
    if isinstance(arch, Mapping):
        return ArchSpec.from_dict(arch)
    if isinstance(arch, (str, os.PathLike)):
        text = os.fspath(arch)
        if text in _REGISTRY:
            return registered_arch(text)
        if os.path.sep in text or text.endswith((".yaml", ".yml")) or Path(text).exists():
            return ArchSpec.load(text)
        return registered_arch(text)
    raise ConfigError(f"an architecture must be an ArchSpec, a mapping, a registered name or a"
                      f" YAML path, but got {type(arch).__name__}. Pass one of those.")


_FIELDS = tuple(f.name for f in dataclasses.fields(ArchSpec))
# Keyword arguments of `SPViT` itself (not architecture fields): timm-style layer injection and
# the pooling. `num_classes=0` (a feature model) is also passed to the model, not the spec.
MODEL_KWARGS = ("global_pool", "norm_layer", "act_layer")


def _split_model_kwargs(overrides: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(ArchSpec overrides, SPViT keyword arguments)."""
    changes = dict(overrides)
    model_kwargs = {k: changes.pop(k) for k in MODEL_KWARGS if k in changes}
    if changes.get("num_classes") == 0 and not isinstance(changes["num_classes"], bool):
        model_kwargs["num_classes"] = changes.pop("num_classes")
    return changes, model_kwargs


def _apply_overrides(spec: ArchSpec, overrides: Mapping[str, Any]) -> ArchSpec:
    if not overrides:
        return spec
    changes = dict(overrides)
    if "img_size" in changes:
        changes["img_size"] = _square_size(changes["img_size"])
    for key in changes:
        if key not in _FIELDS:
            hint = did_you_mean(key, _FIELDS)
            raise ConfigError(f"{key!r} is not an architecture field.{hint} Valid overrides:"
                              f" {list(_FIELDS) + list(MODEL_KWARGS)}.")
    return spec.replace(**changes)


def _square_size(size: Any) -> Any:
    if isinstance(size, (tuple, list)):
        if len(size) != 2 or size[0] != size[1]:
            raise ConfigError(f"img_size must be one side length (square images), but got"
                              f" {tuple(size)}. Pass an int such as img_size=224.")
        return size[0]
    return size


def pretrained_cfg_for(spec: ArchSpec, **extra: Any) -> dict[str, Any]:
    """timm `pretrained_cfg` of a model built from `spec` (input size, classes, stem, head)."""
    first_conv = "patch_embed.conv1" if spec.stem == "conv" else "patch_embed.proj"
    cfg = dict(input_size=(spec.in_chans, spec.img_size, spec.img_size), num_classes=
               spec.num_classes, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
               interpolation="bicubic", crop_pct=0.9, fixed_input_size=False,
               first_conv=first_conv, classifier="head", license="apache-2.0",
               paper_ids="arXiv:2206.07662")
    cfg.update(extra)
    return cfg


def create_model(arch: ArchSpec | Mapping[str, Any] | str | os.PathLike, *,
                 seed: int | None = None, **overrides: Any) -> SPViT:
    """Build an `SPViT` from an ArchSpec, mapping, YAML path or registered name.

    Args:
        arch: the architecture.
        seed: initialise every parameter from this seed (default: global torch RNG).
        **overrides: `ArchSpec` fields to change, e.g. `num_classes=10, img_size=32`.
    """
    changes, model_kwargs = _split_model_kwargs(overrides)
    spec = _apply_overrides(resolve_arch(arch), changes)
    model = SPViT(spec, seed=seed, **model_kwargs)
    model.pretrained_cfg = model.default_cfg = pretrained_cfg_for(spec)
    return model


# ---------------------------------------------------------------------- timm integration
def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: SPViT
                         ) -> dict[str, torch.Tensor]:
    """Adapt a saved state dict to `model`: resample the learned positional embedding and the
    `rpb` tables when the grid differs (e.g. weights from 224 px loaded at 384 px)."""
    out = {}
    own = model.state_dict()
    for key, value in state_dict.items():
        target = own.get(key)
        if target is not None and value.shape != target.shape:
            if key == "pos_embed":
                old = int(round((value.shape[1] - model.pos_prefix) ** 0.5))
                value = resample_abs_pos_embed(value, new_size=[model.grid_size] * 2,
                                               old_size=[old, old],
                                               num_prefix_tokens=model.pos_prefix)
            elif key.endswith(".rpb_table") and value.shape[0] == target.shape[0]:
                value = F.interpolate(value[None].float(), size=tuple(target.shape[1:]),
                                      mode="bicubic", align_corners=False)[0].to(value.dtype)
        out[key] = value
    return out


def _build(*, spec: ArchSpec, seed: int | None, num_classes: int, in_chans: int,
           **model_kwargs: Any) -> SPViT:
    return SPViT(spec.replace(in_chans=in_chans), num_classes=num_classes, seed=seed,
                 **model_kwargs)


def _create_spvit(variant: str, pretrained: bool = False, *, arch: Any = None,
                  pretrained_cfg: Any = None, pretrained_cfg_overlay: dict | None = None,
                  cache_dir: Any = None, seed: int | None = None,
                  pretrained_model_args: dict | None = None, **kwargs: Any) -> SPViT:
    if variant == "spvit":
        if arch is None:
            raise ConfigError("the generic 'spvit' model needs arch= (an ArchSpec, a mapping or a"
                              " path to arch.yaml). Pass arch=..., or use spvit_s/m/l/test.")
        base = resolve_arch(arch)
    else:
        if arch is not None:
            raise ConfigError(f"{variant} has a fixed architecture and takes no arch=. Use"
                              " timm.create_model('spvit', arch=...) for another architecture.")
        base = registered_arch(variant)
    file = (pretrained_cfg_overlay or {}).get("file")
    if pretrained and file and not os.path.isfile(file):
        raise ConfigError(f"pretrained weight file {file!r} does not exist. Check the path in"
                          " pretrained_cfg_overlay=dict(file=...).")
    # timm's feature wrapper options (features_only=True): the last 3 blocks by default.
    feature_kwargs = {k: kwargs.pop(k) for k in ("features_only", "feature_cls", "feature_cfg")
                      if k in kwargs}
    out_indices = kwargs.pop("out_indices", min(3, base.depth))
    changes, model_kwargs = _split_model_kwargs(kwargs)
    spec = _apply_overrides(base, changes)
    num_classes = model_kwargs.pop("num_classes", spec.num_classes)
    if pretrained_cfg is None:
        # The weights' own configuration: the architecture as saved, before overrides.
        pretrained_cfg = pretrained_cfg_for(base, architecture=variant)
    feature_cfg = dict(out_indices=out_indices, feature_cls="getter")
    feature_cfg.update(feature_kwargs.pop("feature_cfg", None) or {})
    extra = {} if pretrained_model_args is None else {
        "pretrained_model_args": pretrained_model_args}
    return build_model_with_cfg(
        _build, variant, pretrained, pretrained_cfg=pretrained_cfg,
        pretrained_cfg_overlay=pretrained_cfg_overlay, pretrained_filter_fn=checkpoint_filter_fn,
        cache_dir=cache_dir, feature_cfg=feature_cfg, spec=spec, seed=seed,
        num_classes=num_classes, in_chans=spec.in_chans, **model_kwargs, **feature_kwargs,
        **extra)


# timm's registry entries (no hosted weights): the generic `spvit` entry replaces its cfg by one
# made from `arch` at build time.
default_cfgs = generate_default_cfgs({
    "spvit": pretrained_cfg_for(_REGISTRY["spvit_s"](), description="any SP-ViT (arch=...)"),
    **{name: pretrained_cfg_for(make()) for name, make in _REGISTRY.items()},
})


@register_model
def spvit_s(pretrained: bool = False, **kwargs: Any) -> SPViT:
    """SP-ViT-S: 16 blocks, width 384, 6 heads, 14 SP-SA blocks (`mlp` priors)."""
    return _create_spvit("spvit_s", pretrained, **kwargs)


@register_model
def spvit_m(pretrained: bool = False, **kwargs: Any) -> SPViT:
    """SP-ViT-M: 20 blocks, width 512, 8 heads, 10 SP-SA blocks (`mlp` priors)."""
    return _create_spvit("spvit_m", pretrained, **kwargs)


@register_model
def spvit_l(pretrained: bool = False, **kwargs: Any) -> SPViT:
    """SP-ViT-L: 24 blocks, width 768, 12 heads, 22 SP-SA blocks (`mlp` priors)."""
    return _create_spvit("spvit_l", pretrained, **kwargs)


@register_model
def spvit_test(pretrained: bool = False, **kwargs: Any) -> SPViT:
    """Tiny SP-ViT for tests: mixed priors, a pool and a shared block, 32 px inputs."""
    return _create_spvit("spvit_test", pretrained, **kwargs)


@register_model
def spvit(pretrained: bool = False, arch: Any = None, **kwargs: Any) -> SPViT:
    """Any SP-ViT: `arch` is an ArchSpec, a mapping or a path to an arch.yaml."""
    return _create_spvit("spvit", pretrained, arch=arch, **kwargs)
