"""A trained supernet folder on disk: what `spvit-nas supernet train` writes and one-shot search
reads.

A folder holds `space.yaml` (the space it was trained on), `supernet.json` (its choices, the
sandwich's extremes and how far it is trained; `write_supernet_info`), `supernet.safetensors`
(the weights) and `metrics.jsonl`. `open_supernet` loads one into a `SupernetFolder`, refusing
anything that is not one with a `ConfigError` that says how to fix it. Part of `nas.oneshot`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nas import layout
from nas.layout import SupernetDir
from nas.settings import SettingError
from search_spaces.space import SearchSpace
from spvit.arch import ArchSpec
from spvit.errors import ConfigError
from spvit.io import atomic_write_json, load_safetensors
from spvit.supernet import SPViTSupernet, SupernetChoices

from .sampling import SandwichSampler, space_identity, supernet_choices

# The folder's names, as `nas.oneshot` has always exported them (`nas.layout` declares them).
SUPERNET_FILE = layout.SUPERNET_FILE
WEIGHTS_FILE = layout.SUPERNET_WEIGHTS_FILE
SPACE_FILE = layout.SPACE_FILE
METRICS_FILE = layout.METRICS_FILE


@dataclass
class SupernetFolder:
    """A trained supernet folder: `space.yaml`, `supernet.json`, `supernet.safetensors`."""

    path: Path
    space: SearchSpace
    info: dict[str, Any]
    net: SPViTSupernet

    @property
    def epochs(self) -> int:
        return int(self.info.get("epochs_trained", 0))

    def check_space(self, space: SearchSpace) -> None:
        """`ConfigError` unless `space` has the supernet's fixed fields and dimensions."""
        ours, theirs = space_identity(self.space), space_identity(space)
        if ours == theirs:
            return
        for block in ("arch", "dimensions"):
            for key in sorted(set(ours[block]) | set(theirs[block])):
                a, b = ours[block].get(key), theirs[block].get(key)
                if a != b:
                    raise SettingError(
                        "space",
                        f"supernet {self.path} was trained on space {self.space.name!r} with"
                        f" {block}.{key} {a!r}, but the search space {space.name!r} has {b!r}."
                        " Train a supernet on this space (spvit-nas supernet train) or use"
                        " the matching `space`.")

    def why_not(self, spec: ArchSpec) -> str | None:
        return self.space.why_not(spec) or self.net.choices.why_not(spec)


def open_supernet(path: str | Path, *, device: str = "cpu") -> SupernetFolder:
    """Load a supernet folder written by `spvit-nas supernet train`; `ConfigError` if it is not
    one (missing, no weights yet, unreadable)."""
    path = Path(path)
    files = SupernetDir(path)
    if not path.is_dir():
        raise SettingError("oneshot.supernet", f"`oneshot.supernet` {path} does not exist. Use"
                                               " the folder `spvit-nas supernet train` wrote"
                                               " (its `out`).")
    for file in (files.space, files.info):
        if not file.is_file():
            raise SettingError("oneshot.supernet", f"`oneshot.supernet` {path} is not a supernet"
                                                   f" folder: {file.name} is missing. Use the"
                                                   " folder `spvit-nas supernet train` wrote (its"
                                                   " `out`).")
    if not files.weights.is_file():
        raise ConfigError(f"supernet {path} has no trained weights yet ({files.weights.name} is"
                          " written after the first epoch). Train it first.")
    space = SearchSpace.load(files.space, check_feasible=False)
    try:
        info = json.loads(files.info.read_text(encoding="utf-8"))
        choices = SupernetChoices.from_dict(info["choices"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ConfigError(f"{files.info} is unreadable ({e}). Train the supernet again into a"
                          " new folder.") from None
    if choices != supernet_choices(space):
        raise ConfigError(f"{files.info} does not match {files.space}; the folder was edited."
                          " Train the supernet again into a new folder.")
    net = SPViTSupernet(choices, seed=0)
    state = load_safetensors(files.weights, what="supernet weights",
                             hint="Restore it from a copy, or train the supernet again into"
                                  " a new folder (spvit-nas supernet train).")
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ConfigError(f"{files.weights} does not fit the supernet of {files.space}"
                          f" ({str(e).splitlines()[0]}). Train the supernet again into a new"
                          " folder.") from None
    return SupernetFolder(path=path, space=space, info=info, net=net.to(device).eval())


def write_supernet_info(path: Path, space: SearchSpace, sampler: SandwichSampler, *,
                        epochs_trained: int, extra: dict[str, Any] | None = None) -> None:
    """`supernet.json`: the choices, the sandwich's extremes and how far it is trained."""
    atomic_write_json(SupernetDir(path).info, {
        "space": space.name,
        "choices": supernet_choices(space).to_dict(),
        "largest": sampler.largest.to_flat(),
        "smallest": sampler.smallest.to_flat(),
        "random_subnets": sampler.random_subnets,
        "epochs_trained": epochs_trained,
        **(extra or {}),
    })
