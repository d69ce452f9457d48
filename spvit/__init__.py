"""SP-ViT: vision transformers with spatial-prior attention, token pooling, attention sharing and
structured attention initialisation, all described by one `ArchSpec`.

Pure torch (+ timm layers); knows nothing of search, Ray or DeepSpeed.
"""

from .arch import HEADS, INIT_SCHEMES, POS_EMBEDS, PRIOR_TYPES, STEMS, ArchSpec, BlockSpec
from .errors import ConfigError
from .factory import REGISTERED_NAMES, create_model, pretrained_cfg_for, resolve_arch
from .model import SPViT, count_parameters

__all__ = [
    "ArchSpec",
    "BlockSpec",
    "ConfigError",
    "REGISTERED_NAMES",
    "SPViT",
    "count_parameters",
    "create_model",
    "pretrained_cfg_for",
    "resolve_arch",
    "HEADS",
    "INIT_SCHEMES",
    "POS_EMBEDS",
    "PRIOR_TYPES",
    "STEMS",
]
