"""A search space small enough to build, train and score supernets over in seconds (digits at
16 px, 1-2 blocks of width 16-32, per-head priors, one pool, sharing)."""

from __future__ import annotations

import json
from typing import Any

TINY: dict[str, Any] = {
    "name": "tiny",
    "arch": {"img_size": 16, "patch_size": 4, "in_chans": 1, "num_classes": 10,
             "stem": "linear", "head": "avg", "pos_embed": "learned", "pool_width_factor": 2},
    "dimensions": {"depth": [1, 2], "embed_dim": [16, 32], "mlp_ratio": [1.0, 2.0],
                   "heads": [1, 2], "prior": {"types": ["none", "mlp", "rpb"], "per_head": True},
                   "pool": {"schedules": [[], [1]]}, "share": [False, True]},
    "constraints": {"max_params": 30000},
    "training": {"dataset": "digits", "epochs": 2, "batch_size": 256, "lr": 2.0e-3,
                 "warmup_epochs": 0.0, "seed": 0},
    "search": {"trials": 4, "concurrent": 1, "seed": 0},
}


def tiny_space(**training: Any) -> dict[str, Any]:
    """A fresh copy of `TINY`, with `training` fields changed."""
    data = json.loads(json.dumps(TINY))
    data["training"].update(training)
    return data
