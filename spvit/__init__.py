"""SP-ViT: vision transformers with spatial-prior attention, token pooling, attention sharing and
structured attention initialisation, all described by one `ArchSpec`.

Pure torch (+ timm layers); knows nothing of search, Ray or DeepSpeed.
"""

from .arch import HEADS, INIT_SCHEMES, POS_EMBEDS, PRIOR_TYPES, STEMS, ArchSpec, BlockSpec
from .errors import ConfigError

__all__ = [
    "ArchSpec",
    "BlockSpec",
    "ConfigError",
    "HEADS",
    "INIT_SCHEMES",
    "POS_EMBEDS",
    "PRIOR_TYPES",
    "STEMS",
]
