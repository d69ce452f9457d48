"""The test suite's shared search spaces, declared once here; a module that needs other values
states them as changes on top of one of these (`changed`, `tiny_space`, `small_space`).

`TINY`: small enough to build, train and score supernets over in seconds (digits at 16 px, 1-2
blocks of width 16-32, per-head priors, one pool, sharing).

`SMALL`: a plainer digits space for studies and searches (1-2 blocks of width 16-32, 1-2 heads,
no prior or an MLP one, batches of 128, 4 trials one at a time)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

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

SMALL: dict[str, Any] = {
    "name": "tiny",
    "arch": {"img_size": 16, "patch_size": 4, "in_chans": 1, "num_classes": 10, "head": "avg"},
    "dimensions": {"depth": [1, 2], "embed_dim": [16, 32], "heads": [1, 2],
                   "prior": ["none", "mlp"]},
    "constraints": {"max_params": 15000},
    "training": {"dataset": "digits", "epochs": 2, "batch_size": 128},
    "search": {"trials": 4, "concurrent": 1},
}


def changed(space: dict[str, Any], **sections: dict[str, Any] | None) -> dict[str, Any]:
    """A fresh copy of `space` with whole sections changed: a dict updates that section's fields
    (`search={"trials": 3}`), None drops the section (`constraints=None`)."""
    data = json.loads(json.dumps(space))
    for section, fields in sections.items():
        if fields is None:
            data.pop(section, None)
        else:
            data.setdefault(section, {}).update(fields)
    return data


def tiny_space(**training: Any) -> dict[str, Any]:
    """A fresh copy of `TINY`, with `training` fields changed."""
    return changed(TINY, training=training)


def small_space(**sections: dict[str, Any] | None) -> dict[str, Any]:
    """A fresh copy of `SMALL`, with `sections` changed as `changed` does."""
    return changed(SMALL, **sections)


def write_space(path: Path, space: dict[str, Any]) -> Path:
    """`space` written as a YAML file at `path` (its keys in order); returns `path`."""
    path.write_text(yaml.safe_dump(space, sort_keys=False), encoding="utf-8")
    return path
