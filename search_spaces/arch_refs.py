"""The one reading of an `--arch` argument, shared by `spvit-nas cost` and `spvit-nas train`.

An architecture is named by a path to an arch.yaml (nested or flat form), by a reference file
of `search_spaces/archs/` (`deit_small`, `spvit_s`, ...: the papers' configurations), or by a
name registered with timm by `spvit` (`spvit_s`, ...). A path that holds a search space instead
of an architecture gets a message that says so.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from spvit.arch import ArchSpec
from spvit.errors import ConfigError, did_you_mean
from spvit.factory import REGISTERED_NAMES, registered_arch

ARCHS_DIR = Path(__file__).resolve().parent / "archs"


def reference_names() -> list[str]:
    """The names of the reference architectures in `search_spaces/archs/`."""
    return sorted(p.stem for p in ARCHS_DIR.glob("*.yaml"))


def _looks_like_space(path: Path) -> bool:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and "dimensions" in data and "blocks" not in data


def arch_path(value: str | os.PathLike) -> Path | None:
    """The file an `--arch` value names (a path or a reference), or None for a registered
    model name."""
    text = os.fspath(value)
    path = Path(text)
    if path.exists() or path.suffix in (".yaml", ".yml") or os.sep in text:
        return path
    reference = ARCHS_DIR / f"{text}.yaml"
    if reference.exists():
        return reference
    if text in REGISTERED_NAMES:
        return None
    known = reference_names() + [n for n in REGISTERED_NAMES if n not in reference_names()]
    raise ConfigError(f"--arch {text!r} is neither a file nor a reference architecture"
                      f" (known: {known}).{did_you_mean(text, known)} Pass the path of an"
                      " arch.yaml or one of those names.")


def resolve_arch(value: str | os.PathLike) -> ArchSpec:
    """The `ArchSpec` an `--arch` value names (see the module docstring)."""
    path = arch_path(value)
    if path is None:
        return registered_arch(os.fspath(value))
    try:
        return ArchSpec.load(path)
    except ConfigError:
        if _looks_like_space(path):
            raise ConfigError(f"{path} is a search-space file, not an architecture. Use"
                              f" `spvit-nas check-space {path}`, or pass an arch.yaml to"
                              " --arch.") from None
        raise
