"""CIFAR-10 / CIFAR-100 from a local copy of the python-pickle release.

The release (`data_batch_1..5`, `test_batch`, `batches.meta` for CIFAR-10; `train`, `test`, `meta`
for CIFAR-100) is found in PATH or in PATH's `cifar-10-batches-py` / `cifar-100-python`
(`cifar_root`); nothing is downloaded at run time. The files are unpickled with a loader that
only accepts numpy arrays and plain containers, and every batch's shape, type and labels are
checked. `nas.data` builds the training datasets from what `load_cifar` returns.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nas.splits import SPLIT_SEED, stratified_split
from spvit.errors import ConfigError

CIFAR_VAL_FRACTION = 0.1
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

_CIFAR_LAYOUT = {
    # kind: (sub-folder of the release, train files glob, validation file, meta file, names key,
    #        labels key, classes)
    "cifar10": ("cifar-10-batches-py", "data_batch_*", "test_batch", "batches.meta",
                "label_names", "labels", 10),
    "cifar100": ("cifar-100-python", "train", "test", "meta", "fine_label_names",
                 "fine_labels", 100),
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR release: numpy arrays, dicts, lists, bytes/str; nothing else."""

    _ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _unpickle(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            raw = _ArrayUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
        raise ConfigError(f"{path} is not a CIFAR python-pickle batch ({e}). Point the dataset"
                          " at the extracted 'python version' release.") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} holds a {type(raw).__name__}, but a CIFAR batch is a dict."
                          " Point the dataset at the extracted 'python version' release.")
    return {k.decode() if isinstance(k, bytes) else str(k): v for k, v in raw.items()}


def cifar_root(kind: str, path: str) -> Path:
    sub, train_glob, val_name, meta_name, *_ = _CIFAR_LAYOUT[kind]
    base = Path(path).expanduser()
    for root in (base, base / sub):
        if (root / meta_name).is_file() and (root / val_name).is_file() \
                and any(root.glob(train_glob)):
            return root
    raise ConfigError(
        f"{kind} data not found in {str(base)!r}: expected {meta_name}, {val_name} and"
        f" {train_glob} there or in {sub}/. Extract the python-pickle release of {kind} into"
        " that folder (nothing is downloaded at run time)."
    )


def cifar_class_names(kind: str, root: Path) -> tuple[str, ...]:
    _, _, _, meta_name, names_key, _, classes = _CIFAR_LAYOUT[kind]
    meta = _unpickle(root / meta_name)
    names = meta.get(names_key)
    if not isinstance(names, list) or len(names) != classes:
        raise ConfigError(f"{root / meta_name} must list {classes} class names under"
                          f" {names_key!r}, but got {names!r:.80}. Use the unmodified {kind}"
                          " release.")
    return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)


def _cifar_batch(path: Path, labels_key: str, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    batch = _unpickle(path)
    data, labels = batch.get("data"), batch.get(labels_key)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != 3 * 32 * 32 or labels is None or len(labels) != len(data):
        raise ConfigError(f"{path} must hold 'data' (N x 3072 uint8) and {labels_key!r} (N"
                          " labels). Use the unmodified python-pickle release.")
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) and (labels.min() < 0 or labels.max() >= classes):
        raise ConfigError(f"{path} has labels outside 0..{classes - 1}. Use the matching"
                          " dataset kind (cifar10 or cifar100).")
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels)


def load_cifar(kind: str, root: str | os.PathLike, *, split_seed: int = SPLIT_SEED,
               val_fraction: float = CIFAR_VAL_FRACTION) -> tuple[torch.Tensor, ...]:
    """A local CIFAR release as uint8 (N, 3, 32, 32) tensors, in three splits.

    Returns `(train_x, train_y, val_x, val_y, test_x, test_y)`: validation is a stratified,
    seeded `val_fraction` of the training batches, test is the release's test batch.
    """
    _, train_glob, test_name, _, _, labels_key, classes = _CIFAR_LAYOUT[kind]
    root = Path(root)
    parts = [_cifar_batch(p, labels_key, classes) for p in sorted(root.glob(train_glob))]
    all_x = torch.cat([p[0] for p in parts])
    all_y = torch.cat([p[1] for p in parts])
    train_idx, val_idx = stratified_split(all_y.numpy(), val_fraction, seed=split_seed)
    train_idx, val_idx = torch.from_numpy(train_idx), torch.from_numpy(val_idx)
    test_x, test_y = _cifar_batch(root / test_name, labels_key, classes)
    return all_x[train_idx], all_y[train_idx], all_x[val_idx], all_y[val_idx], test_x, test_y

