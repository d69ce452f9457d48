"""Fashion-MNIST from its four IDX files: where they are, what their headers must say, reading.

`fashion_mnist_root` finds the files (`train-images-idx3-ubyte`, `train-labels-idx1-ubyte`,
`t10k-images-idx3-ubyte`, `t10k-labels-idx1-ubyte`, gzipped or plain) in PATH, in torchvision's
`PATH/FashionMNIST/raw`, or without a path in `FASHION_MNIST_DIR` (where Debian's
`dataset-fashion-mnist` package puts them); `check_fashion_mnist` reads only their headers (what
`nas.data.describe_dataset` needs before a search launches), `load_fashion_mnist` the pixels.
Every header, count, shape and label is checked; a bad file is a `ConfigError` that names it and
says how to get a good one. `nas.data` builds the training datasets from what this returns.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from nas.splits import SPLIT_SEED, stratified_split
from spvit.errors import ConfigError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_VAL_FRACTION = 0.1
# The training split's pixel statistics (0..1 scale), as commonly quoted for Fashion-MNIST.
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot")
# split: (images file, labels file, images expected)
_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 60_000),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 10_000),
}
_GET_FASHION = ("Install it with `apt-get install dataset-fashion-mnist` (files in"
                f" {FASHION_MNIST_DIR}) or point the dataset at a folder with the four IDX files:"
                " dataset: fashion-mnist:PATH.")


def fashion_mnist_root(path: str | None) -> Path:
    """The folder holding the four Fashion-MNIST IDX files: PATH, PATH/FashionMNIST/raw, or the
    packaged location when no PATH is given."""
    base = Path(path).expanduser() if path else Path(FASHION_MNIST_DIR)
    candidates = (base, base / "FashionMNIST" / "raw") if path else (base,)
    names = [n for files in _FASHION_FILES.values() for n in files[:2]]
    for root in candidates:
        if all(_idx_path(root, n) is not None for n in names):
            return root
    missing = [n for n in names if _idx_path(base, n) is None]
    raise ConfigError(f"fashion-mnist data not found in {str(base)!r}: {', '.join(missing)}"
                      f" (.gz or plain) missing there{' and in FashionMNIST/raw/' if path else ''}."
                      f" {_GET_FASHION}")




def check_fashion_mnist(root: Path) -> None:
    """Check the headers of the four IDX files in `root` (no pixels are read)."""
    for images_name, labels_name, count in _FASHION_FILES.values():
        _idx_header(_idx_file(root, images_name), 3, count, (28, 28))
        _idx_header(_idx_file(root, labels_name), 1, count, ())


def _idx_path(root: Path, name: str) -> Path | None:
    for candidate in (root / name, root / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _idx_file(root: Path, name: str) -> Path:
    found = _idx_path(root, name)
    if found is None:
        raise ConfigError(f"{root / name} (.gz or plain) is missing. {_GET_FASHION}")
    return found


def _idx_open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _idx_header(path: Path, ndim: int, count: int, shape: tuple[int, ...]) -> int:
    """Check an IDX file's header (unsigned bytes, `ndim` dims, `count` x `shape`); its size."""
    size = 4 + 4 * ndim
    what = "images" if ndim == 3 else "labels"
    try:
        with _idx_open(path) as f:
            head = f.read(size)
    except (OSError, EOFError, zlib.error) as e:
        raise ConfigError(f"{path} cannot be read ({e}). Replace the file. {_GET_FASHION}"
                          ) from None
    expected = "x".join(str(d) for d in (count, *shape))
    if len(head) < size or head[:3] != b"\x00\x00\x08" or head[3] != ndim:
        raise ConfigError(f"{path} is not an IDX file of unsigned-byte {what} (magic number"
                          f" {head[:4].hex() or 'missing'}, expected 0000080{ndim}). Replace the"
                          f" file. {_GET_FASHION}")
    dims = struct.unpack(f">{ndim}I", head[4:size])
    if dims != (count, *shape):
        raise ConfigError(f"{path} holds {'x'.join(str(d) for d in dims)} {what}, but"
                          f" Fashion-MNIST's file of that name holds {expected}. Replace the"
                          f" file. {_GET_FASHION}")
    return size


def _read_idx(path: Path, ndim: int, count: int, shape: tuple[int, ...]) -> np.ndarray:
    """The data of a checked IDX file as a (count, *shape) uint8 array."""
    offset = _idx_header(path, ndim, count, shape)
    try:
        with _idx_open(path) as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise ConfigError(f"{path} is damaged ({e}). Replace the file. {_GET_FASHION}") from None
    expected = count * int(np.prod(shape, dtype=np.int64))
    if len(raw) - offset != expected:
        raise ConfigError(f"{path} holds {len(raw) - offset} bytes of data, but its header"
                          f" promises {expected}: the file is truncated or padded. Replace the"
                          f" file. {_GET_FASHION}")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(count, *shape)


def load_fashion_mnist(root: str | os.PathLike, *, split_seed: int = SPLIT_SEED,
                       val_fraction: float = FASHION_VAL_FRACTION) -> tuple[torch.Tensor, ...]:
    """Fashion-MNIST as uint8 (N, 1, 28, 28) images and int64 labels, in three splits.

    Returns `(train_x, train_y, val_x, val_y, test_x, test_y)`: validation is a stratified,
    seeded `val_fraction` of the 60,000 training images, test the standard 10,000.
    """
    root = Path(root)
    splits = {}
    for split, (images_name, labels_name, count) in _FASHION_FILES.items():
        images = _read_idx(_idx_file(root, images_name), 3, count, (28, 28))
        labels_path = _idx_file(root, labels_name)
        labels = _read_idx(labels_path, 1, count, ())
        if labels.max() > 9:
            raise ConfigError(f"{labels_path} has label {int(labels.max())}, outside"
                              f" Fashion-MNIST's 0..9. Replace the file. {_GET_FASHION}")
        splits[split] = (torch.from_numpy(images.copy()).unsqueeze(1),
                         torch.from_numpy(labels.astype(np.int64)))
    all_x, all_y = splits["train"]
    train_idx, val_idx = stratified_split(all_y.numpy(), val_fraction, seed=split_seed)
    train_idx, val_idx = torch.from_numpy(train_idx), torch.from_numpy(val_idx)
    test_x, test_y = splits["test"]
    return all_x[train_idx], all_y[train_idx], all_x[val_idx], all_y[val_idx], test_x, test_y

