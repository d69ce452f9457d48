"""Atomic file writes shared by every layer of the house.

Durable state (architectures, studies' side files, checkpoints' metadata, exports) is written to a
temporary file in the same folder, flushed to disk, then moved over the target with `os.replace`,
so a killed process leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .errors import ConfigError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically (same-folder temp file + fsync + `os.replace`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates 0600; give the file the permissions a plain open() would.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> Path:
    """Write `obj` as JSON to `path` atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False) + "\n")


def read_user_text(path: str | os.PathLike, *, what: str, hint: str) -> str:
    """The UTF-8 text of a file a user pointed to (an architecture, a search space, ...).

    A missing path, a folder, or a file that is not UTF-8 text raises one `ConfigError` line that
    names `what` the file should be and ends with `hint` (where to point instead).
    """
    shown = repr(os.fspath(path))
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise ConfigError(f"{what} file {shown} does not exist. Check the path. {hint}") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} path {shown} is a folder, not a file. {hint}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{what} file {shown} is not UTF-8 text. {hint}") from None


def read_json_lines(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The JSON objects of a JSON-lines file (e.g. `metrics.jsonl`); [] if it does not exist.

    Writers append one line at a time, so only the last line can be torn (a writer killed or
    still writing); lines that do not parse as a JSON object are skipped.
    """
    rows: list[dict[str, Any]] = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(row, dict):
                    rows.append(row)
    except FileNotFoundError:
        return []
    return rows


def load_safetensors(path: str | os.PathLike, *, what: str = "weights", hint: str,
                     device: str = "cpu") -> dict[str, Any]:
    """The tensors of a safetensors file, or one `ConfigError` line if it cannot be read.

    Every reader of trained weights (a trial's or an export's `model.safetensors`, a supernet's
    `supernet.safetensors`) comes through here, so a missing, truncated or foreign file reads the
    same everywhere: `{what} file PATH is missing | is corrupt or not safetensors (REASON).
    {hint}`. The tensors are
    read on the CPU and moved to `device` afterwards by the caller's model; `device` is for
    callers that want them there directly.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    shown = repr(os.fspath(path))
    if not os.path.isfile(path):
        raise ConfigError(f"{what} file {shown} is missing. {hint}")
    try:
        return load_file(os.fspath(path), device=device)
    except (SafetensorError, OSError, ValueError, RuntimeError, MemoryError) as e:
        text = str(e).strip()
        first = text.splitlines()[0] if text else type(e).__name__
        first = first if len(first) <= 160 else first[:157] + "..."
        raise ConfigError(f"{what} file {shown} is corrupt or not safetensors ({first})."
                          f" {hint}") from None
