"""Datasets and loaders for training candidates: embedded digits, image folders, local CIFAR.

A dataset string (`digits`, `folder:PATH`, `cifar10:PATH`, `cifar100:PATH`; parsed by
`search_spaces.parse_dataset`) names the data; `describe_dataset` reads only its metadata (classes,
channels, native size) so a search can reject an architecture that does not fit the data before
launching anything (`check_compatible`). `build_datasets` loads the pixels; `build_loaders` gives
each worker its own shard of the training split (`DistributedSampler`) and of the validation and
test splits (`EvalShard`, padded to equal length so every worker runs the same number of forward
passes, which ZeRO-3 needs).

Every dataset has three fixed splits. Training fits the weights; the validation split is the only
one the search sees (the sampler's objective and every early-stopping decision); the test split is
held out and evaluated once per trial that completes its budget, so the accuracies reported beside
the front were selected on nobody's data.

* `digits`: scikit-learn's 1,797 handwritten-digit scans (8x8, 17 grey levels, 10 classes, shipped
  inside scikit-learn). A fixed, seeded, stratified 60/20/20 train/validation/test split
  (`DIGITS_SPLIT_SEED`, independent of the training seed, so every candidate is ranked on the same
  validation images and reported on the same test images), bilinear
  upsampling to the architecture's `img_size` once at load time, repeated to 3 channels if the
  architecture wants RGB.
* `cifar10:PATH` / `cifar100:PATH`: the standard python-pickle release (`data_batch_1..5`,
  `test_batch`, `batches.meta` or `train`, `test`, `meta`), either in PATH or in PATH's
  `cifar-10-batches-py` / `cifar-100-python`. The validation split is carved from the training
  batches (`CIFAR_VAL_FRACTION`, stratified, seeded by `SPLIT_SEED`); the test split is the
  release's test batch. The files are unpickled with a loader that only accepts numpy arrays
  and plain containers (`nas.cifar`). Kept as uint8.
* `fashion-mnist` / `fashion-mnist:PATH`: Zalando's Fashion-MNIST (70,000 28x28 grey product
  images, 10 classes) from the four standard IDX files (`train-images-idx3-ubyte`,
  `train-labels-idx1-ubyte`, `t10k-images-idx3-ubyte`, `t10k-labels-idx1-ubyte`, gzipped or
  plain), found in PATH, in torchvision's `PATH/FashionMNIST/raw`, or without a path in
  `FASHION_MNIST_DIR` (where Debian's `dataset-fashion-mnist` package puts them). The test split
  is the standard 10,000-image test set; validation is a stratified, seeded `FASHION_VAL_FRACTION`
  of the 60,000 training images. Every header, count, shape and label is checked
  (`nas.fashion_mnist`); kept as uint8.
* `folder:PATH`: `PATH/train/<class>/*`, `PATH/val/<class>/*` and, optionally,
  `PATH/test/<class>/*` (torchvision `ImageFolder`; without `test/` no test accuracy is reported),
  decoded per sample with timm's transforms (random-resized crop, flip, colour jitter for training;
  resize + centre crop for validation).

Digits, Fashion-MNIST and CIFAR stay in memory as tensors and are augmented a whole batch at a
time with tensor ops (random shifts of up to `img_size // 8` pixels with background fill;
horizontal flips for CIFAR and Fashion-MNIST, not for digits, since a mirrored digit is another
glyph), so two CPU cores are not spent decoding images. `training.train_subset` keeps a stratified
subset of the training split, fixed by the split seed (`nas.splits`), for low-data studies and
CPU budgets.
Randomness comes from `set_epoch(epoch, rank)`: a resumed run sees the same batches and
augmentations as an uninterrupted one.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler

# The readers of the stored datasets and the split helpers live in their own modules; their
# public names are re-exported here, where the rest of the house has always found them.
from nas.cifar import (  # noqa: F401
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    CIFAR_VAL_FRACTION,
    cifar_class_names,
    cifar_root,
    load_cifar,
)
from nas.fashion_mnist import (  # noqa: F401
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    FASHION_VAL_FRACTION,
    check_fashion_mnist,
    fashion_mnist_root,
    load_fashion_mnist,
)
from nas.splits import SPLIT_SEED, stratified_split, stratified_subset
from search_spaces.training import TrainingConfig, parse_dataset
from spvit.arch import ArchSpec
from spvit.errors import ConfigError

DIGITS_SPLIT_SEED = SPLIT_SEED
DIGITS_VAL_FRACTION = 0.2
DIGITS_TEST_FRACTION = 0.2
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DatasetInfo:
    """What is known about a dataset without loading its pixels.

    Args:
        kind: `digits`, `folder`, `cifar10` or `cifar100`.
        root: resolved local folder (None for digits).
        num_classes: number of classes.
        channels: channels of the stored images (1 for digits, 3 otherwise).
        native_size: side of the stored images in pixels (None for folders: sizes vary).
        class_names: one name per class, in label order.
    """

    kind: str
    root: str | None
    num_classes: int
    channels: int
    native_size: int | None
    class_names: tuple[str, ...]


@dataclass
class Datasets:
    """The splits of one dataset, ready for an architecture (resized, normalised).

    `test` is None only for an image folder without a `test/` subfolder.
    """

    train: Dataset
    val: Dataset
    info: DatasetInfo
    mean: tuple[float, ...]
    std: tuple[float, ...]
    test: Dataset | None = None


# --------------------------------------------------------------------------- metadata
def describe_dataset(dataset: str) -> DatasetInfo:
    """Metadata of `dataset` (a dataset string); reads only folder listings / CIFAR meta files."""
    kind, path = parse_dataset(dataset)
    if kind == "digits":
        return DatasetInfo("digits", None, 10, 1, 8, tuple(str(i) for i in range(10)))
    if kind == "folder":
        root = _folder_root(path)
        classes = _folder_classes(root)
        return DatasetInfo("folder", str(root), len(classes), 3, None, classes)
    if kind == "fashion-mnist":
        root = fashion_mnist_root(path)
        check_fashion_mnist(root)
        return DatasetInfo(kind, str(root), 10, 1, 28, FASHION_MNIST_CLASSES)
    root = cifar_root(kind, path)
    names = cifar_class_names(kind, root)
    return DatasetInfo(kind, str(root), len(names), 3, 32, names)


def check_compatible(info: DatasetInfo, spec: ArchSpec) -> None:
    """Raise `ConfigError` if `spec` cannot be trained on the data described by `info`."""
    name = info.kind if info.root is None else f"{info.kind}:{info.root}"
    if spec.num_classes != info.num_classes:
        raise ConfigError(
            f"dataset {name} has {info.num_classes} classes, but the architecture has"
            f" num_classes {spec.num_classes}. Set num_classes: {info.num_classes} in the"
            " architecture."
        )
    allowed = (1, 3) if info.kind in ("digits", "fashion-mnist", "folder") else (3,)
    if spec.in_chans not in allowed:
        fix = " or ".join(str(c) for c in allowed)
        raise ConfigError(
            f"dataset {name} provides {'/'.join(str(c) for c in allowed)}-channel images, but the"
            f" architecture has in_chans {spec.in_chans}. Set in_chans: {fix}."
        )
    if info.native_size is not None and spec.img_size < info.native_size:
        raise ConfigError(
            f"dataset {name} stores {info.native_size}x{info.native_size} images and is only"
            f" upsampled, but the architecture has img_size {spec.img_size}, which would discard"
            f" detail. Set img_size >= {info.native_size} (e.g. {2 * info.native_size})."
        )


# --------------------------------------------------------------------------- tensor datasets
class TensorImageDataset(Dataset):
    """Images kept in memory as one tensor, augmented and normalised per sample.

    Args:
        images: (N, C, H, W) uint8 (0..255) or float (0..1) tensor.
        labels: (N,) integer class labels.
        img_size: output side; stored images of another size are resized bilinearly.
        mean, std: per-channel normalisation of the output (length `out_chans`).
        out_chans: output channels; a 1-channel store is repeated to 3 when asked.
        max_shift: largest random translation in output pixels (0 disables it).
        hflip: flip horizontally with probability 1/2.
        seed: base of the per-epoch augmentation seed.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, img_size: int,
                 mean: tuple[float, ...], std: tuple[float, ...], out_chans: int,
                 max_shift: int = 0, hflip: bool = False, seed: int = 0) -> None:
        if images.ndim != 4 or images.shape[0] != labels.shape[0]:
            raise ValueError(f"images must be (N, C, H, W) with one label each, got"
                             f" {tuple(images.shape)} and {tuple(labels.shape)}")
        self.images = images
        self.labels = labels.long()
        self.img_size = img_size
        self.out_chans = out_chans
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.max_shift = max_shift
        self.hflip = hflip
        self.seed = seed
        self._gen = torch.Generator().manual_seed(seed)

    def set_epoch(self, epoch: int, rank: int = 0) -> None:
        """Re-seed the augmentation stream for (`epoch`, `rank`)."""
        self._gen.manual_seed(_mix_seed(self.seed, epoch, rank))

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, int]]:
        """A whole batch at once (the DataLoader calls this instead of `__getitem__`).

        The same transform as `__getitem__`, done with batched tensor ops: a batch of 64 costs
        about as much as two single images done one at a time.
        """
        index = torch.as_tensor(indices, dtype=torch.long)
        x = self.images[index]  # (B, C, H, W)
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        if x.shape[-1] != self.img_size or x.shape[-2] != self.img_size:
            x = F.interpolate(x, size=(self.img_size, self.img_size), mode="bilinear",
                              align_corners=False)
        if self.max_shift:
            shifts = torch.randint(-self.max_shift, self.max_shift + 1, (len(index), 2),
                                   generator=self._gen)
            x = _translate_batch(x, shifts, self.max_shift)
        if self.hflip:
            flip = torch.rand(len(index), generator=self._gen) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        if x.shape[1] != self.out_chans:
            x = x.expand(-1, self.out_chans, -1, -1)
        x = (x - self.mean) / self.std
        return list(zip(x.unbind(0), self.labels[index].tolist(), strict=True))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x = self.images[index]
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        if x.shape[-1] != self.img_size or x.shape[-2] != self.img_size:
            x = F.interpolate(x[None], size=(self.img_size, self.img_size), mode="bilinear",
                              align_corners=False)[0]
        if self.max_shift:
            dy, dx = (torch.randint(-self.max_shift, self.max_shift + 1, (2,),
                                    generator=self._gen).tolist())
            x = _translate(x, dy, dx)
        if self.hflip and torch.rand((), generator=self._gen).item() < 0.5:
            x = x.flip(-1)
        if x.shape[0] != self.out_chans:
            x = x.expand(self.out_chans, -1, -1)
        return (x - self.mean) / self.std, int(self.labels[index])


def _translate(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Shift a (C, H, W) image by (dy, dx) pixels, filling the uncovered border with 0."""
    if dy == 0 and dx == 0:
        return x
    _, h, w = x.shape
    out = torch.zeros_like(x)
    out[:, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        x[:, max(-dy, 0):h - max(dy, 0), max(-dx, 0):w - max(dx, 0)]
    return out


def _translate_batch(x: torch.Tensor, shifts: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Shift each (C, H, W) image of `x` by its row of `shifts` (dy, dx), filling with 0.

    The same result as `_translate` per image: output pixel (i, j) reads input (i - dy, j - dx).
    """
    b, c, h, w = x.shape
    padded = F.pad(x, (max_shift, max_shift, max_shift, max_shift))
    rows = torch.arange(h).view(1, h) + (max_shift - shifts[:, 0]).view(b, 1)  # (B, H)
    cols = torch.arange(w).view(1, w) + (max_shift - shifts[:, 1]).view(b, 1)  # (B, W)
    batch = torch.arange(b).view(b, 1, 1)
    out = padded[batch, :, rows.view(b, h, 1), cols.view(b, 1, w)]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def _mix_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 10_007 + rank * 101 + 17) % (2**63 - 1)


def load_digits_split(*, split_seed: int = DIGITS_SPLIT_SEED,
                      val_fraction: float = DIGITS_VAL_FRACTION,
                      test_fraction: float = DIGITS_TEST_FRACTION
                      ) -> tuple[torch.Tensor, ...]:
    """The digits scans as (N, 1, 8, 8) floats in [0, 1], split stratified by class.

    Returns `(train_images, train_labels, val_images, val_labels, test_images, test_labels)`;
    the fractions are of the whole set (defaults 60/20/20).
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
    labels = torch.from_numpy(digits.target.astype(np.int64))
    rest, test_idx = stratified_split(digits.target, test_fraction, seed=split_seed)
    keep, val_pos = stratified_split(digits.target[rest], val_fraction / (1.0 - test_fraction),
                                     seed=split_seed + 1)
    train_idx, val_idx = rest[keep], rest[val_pos]
    parts = []
    for idx in (train_idx, val_idx, test_idx):
        idx = torch.from_numpy(idx)
        parts += [images[idx], labels[idx]]
    return tuple(parts)


def _digits_datasets(spec: ArchSpec, training: TrainingConfig, info: DatasetInfo) -> Datasets:
    train_x, train_y, val_x, val_y, test_x, test_y = load_digits_split()
    size = (spec.img_size, spec.img_size)
    # Upsample once here rather than per sample: 1,797 small images fit in a few MB.
    train_x, val_x, test_x = (F.interpolate(x, size=size, mode="bilinear", align_corners=False)
                              for x in (train_x, val_x, test_x))
    mean, std = (train_x.mean().item(),), (train_x.std().item(),)
    # No flips: a mirrored digit is another glyph.
    return _tensor_datasets((train_x, train_y, val_x, val_y, test_x, test_y), spec, training,
                            info, mean=mean * spec.in_chans, std=std * spec.in_chans,
                            hflip=False)


def _fashion_datasets(spec: ArchSpec, training: TrainingConfig, info: DatasetInfo) -> Datasets:
    return _tensor_datasets(load_fashion_mnist(info.root), spec, training, info,
                            mean=FASHION_MNIST_MEAN * spec.in_chans,
                            std=FASHION_MNIST_STD * spec.in_chans, hflip=training.augment)


def _tensor_datasets(splits: tuple[torch.Tensor, ...], spec: ArchSpec, training: TrainingConfig,
                     info: DatasetInfo, *, mean: tuple[float, ...], std: tuple[float, ...],
                     hflip: bool) -> Datasets:
    """The three splits `(train_x, train_y, val_x, val_y, test_x, test_y)` as in-memory datasets:
    the training split shifted by up to `img_size // 8` pixels (and flipped if `hflip`) when
    `training.augment`, validation and test as they are."""
    train_x, train_y, val_x, val_y, test_x, test_y = splits
    shift = spec.img_size // 8 if training.augment else 0
    common = dict(img_size=spec.img_size, mean=mean, std=std, out_chans=spec.in_chans)
    return Datasets(
        train=TensorImageDataset(train_x, train_y, max_shift=shift, hflip=hflip,
                                 seed=training.seed, **common),
        val=TensorImageDataset(val_x, val_y, **common),
        test=TensorImageDataset(test_x, test_y, **common),
        info=info, mean=mean, std=std)


def _cifar_datasets(spec: ArchSpec, training: TrainingConfig, info: DatasetInfo) -> Datasets:
    mean, std = (CIFAR10_MEAN, CIFAR10_STD) if info.kind == "cifar10" else \
        (CIFAR100_MEAN, CIFAR100_STD)
    return _tensor_datasets(load_cifar(info.kind, info.root), spec, training, info, mean=mean,
                            std=std, hflip=training.augment)


# --------------------------------------------------------------------------- folders
def _folder_root(path: str) -> Path:
    root = Path(path).expanduser()
    missing = [s for s in ("train", "val") if not (root / s).is_dir()]
    if missing:
        raise ConfigError(
            f"image folder {str(root)!r} needs train/ and val/ subfolders with one folder per"
            f" class, but {'/ and '.join(missing)}/ is missing. Put the images in"
            " PATH/train/<class>/*.png and PATH/val/<class>/*.png."
        )
    return root


def _folder_classes(root: Path) -> tuple[str, ...]:
    from torchvision.datasets.folder import IMG_EXTENSIONS

    found = {}
    splits = ("train", "val", "test") if (root / "test").is_dir() else ("train", "val")
    for split in splits:
        classes = sorted(d for d in (root / split).iterdir() if d.is_dir())
        empty = [d.name for d in classes
                 if not any(f.suffix.lower() in IMG_EXTENSIONS for f in d.iterdir())]
        if not classes or empty:
            raise ConfigError(
                f"{root / split} must hold one folder per class, each with images"
                f" ({', '.join(IMG_EXTENSIONS)}), but"
                f" {'there are no class folders' if not classes else f'{empty} hold none'}."
                f" Put each class's images in PATH/{split}/<class>/."
            )
        found[split] = tuple(d.name for d in classes)
    for split in splits[1:]:
        if found["train"] != found[split]:
            diff = sorted(set(found["train"]) ^ set(found[split]))
            raise ConfigError(f"image folder {str(root)!r}: train/ and {split}/ must hold the"
                              f" same class folders, but they differ in {diff}. Add or remove"
                              " those class folders.")
    return found["train"]


def _folder_datasets(spec: ArchSpec, training: TrainingConfig, info: DatasetInfo) -> Datasets:
    from timm.data import create_transform
    from torchvision.datasets import ImageFolder

    if spec.in_chans == 3:
        mean, std, mode = IMAGENET_MEAN, IMAGENET_STD, "RGB"
    else:  # timm's convention for one channel: the average of the RGB statistics
        mean, std = (sum(IMAGENET_MEAN) / 3,), (sum(IMAGENET_STD) / 3,)
        mode = "L"
    size = (spec.in_chans, spec.img_size, spec.img_size)
    train_tf = create_transform(size, is_training=training.augment, mean=mean, std=std)
    val_tf = create_transform(size, is_training=False, mean=mean, std=std)
    loader = _pil_loader(mode)
    root = Path(info.root)
    train = ImageFolder(str(root / "train"), transform=train_tf, loader=loader)
    val = ImageFolder(str(root / "val"), transform=val_tf, loader=loader)
    test = (ImageFolder(str(root / "test"), transform=val_tf, loader=loader)
            if (root / "test").is_dir() else None)
    return Datasets(train=_SeededFolder(train, training.seed), val=val, test=test, info=info,
                    mean=mean, std=std)


def _pil_loader(mode: str) -> Callable[[str], Any]:
    def load(path: str) -> Any:
        from PIL import Image

        with open(path, "rb") as f:
            return Image.open(f).convert(mode)
    return load


class _SeededFolder(Dataset):
    """A folder dataset whose random transforms (torch and python RNGs) are seeded per epoch."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def set_epoch(self, epoch: int, rank: int = 0) -> None:
        # timm's random-resized crop draws from `random`, torchvision's flips from torch.
        s = _mix_seed(self.seed, epoch, rank)
        random.seed(s)
        torch.manual_seed(s)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index]


# --------------------------------------------------------------------------- entry points
def build_datasets(training: TrainingConfig, spec: ArchSpec) -> Datasets:
    """Load `training.dataset` for `spec`: checked, resized to `img_size`, normalised."""
    info = describe_dataset(training.dataset)
    check_compatible(info, spec)
    if info.kind == "digits":
        data = _digits_datasets(spec, training, info)
    elif info.kind == "fashion-mnist":
        data = _fashion_datasets(spec, training, info)
    elif info.kind == "folder":
        data = _folder_datasets(spec, training, info)
    else:
        data = _cifar_datasets(spec, training, info)
    if training.train_subset is not None:
        data.train = _train_subset(data.train, training.train_subset, training.dataset)
    if len(data.val) == 0:
        raise ConfigError(f"dataset {training.dataset} has an empty validation split (every class"
                          " needs at least two training images to hold one out). Add images.")
    return data


def _train_subset(train: Dataset, size: int, dataset: str) -> Dataset:
    if size > len(train):
        raise ConfigError(f"training.train_subset is {size}, but the training split of {dataset}"
                          f" has {len(train)} images. Lower train_subset or drop it.")
    if isinstance(train, TensorImageDataset):
        keep = torch.from_numpy(stratified_subset(train.labels.numpy(), size, seed=SPLIT_SEED))
        train.images, train.labels = train.images[keep], train.labels[keep]
        return train
    folder = train.dataset  # _SeededFolder over an ImageFolder
    keep = stratified_subset(np.asarray(folder.targets), size, seed=SPLIT_SEED)
    folder.samples = [folder.samples[i] for i in keep]
    folder.imgs = folder.samples
    folder.targets = [folder.targets[i] for i in keep]
    return train


class EvalShard(Dataset):
    """Rank `rank`'s share of a validation set: every `world_size`-th sample, padded to equal size.

    Padding entries repeat sample 0 with label -1; `nas.engine.evaluate` ignores them, so the
    aggregated metrics count each validation image exactly once.
    """

    def __init__(self, dataset: Dataset, rank: int, world_size: int) -> None:
        n = len(dataset)
        self.dataset = dataset
        self.indices = list(range(rank, n, world_size))
        self.length = math.ceil(n / world_size)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if index < len(self.indices):
            return self.dataset[self.indices[index]]
        x, _ = self.dataset[0]
        return x, -1

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, int]]:
        getitems = getattr(self.dataset, "__getitems__", None)
        if getitems is None:
            return [self[i] for i in indices]
        real = [self.indices[i] if i < len(self.indices) else 0 for i in indices]
        return [(x, y if i < len(self.indices) else -1)
                for i, (x, y) in zip(indices, getitems(real), strict=True)]


@dataclass
class Loaders:
    """One worker's loaders; call `set_epoch` before each training epoch."""

    train: DataLoader
    val: DataLoader
    train_sampler: DistributedSampler
    rank: int
    test: DataLoader | None = None

    def set_epoch(self, epoch: int) -> None:
        self.train_sampler.set_epoch(epoch)
        dataset = self.train.dataset
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch, self.rank)

    @property
    def steps_per_epoch(self) -> int:
        """Micro-batches this worker trains on per epoch (equal on every worker)."""
        return len(self.train)


def build_loaders(data: Datasets, *, micro_batch_size: int, rank: int = 0, world_size: int = 1,
                  seed: int = 0, num_workers: int = 0, eval_batch_size: int | None = None
                  ) -> Loaders:
    """Worker `rank`'s loaders: a shuffled shard of the training split, a shard of validation.

    Every worker gets the same number of full micro-batches per epoch (the sampler pads the
    shards to equal length; the last partial batch is dropped), as DeepSpeed's collective steps
    require.
    """
    if len(data.train) < micro_batch_size * world_size:
        raise ConfigError(
            f"the training split has {len(data.train)} images, fewer than one global batch"
            f" ({micro_batch_size} x {world_size} workers). Lower training.batch_size."
        )
    sampler = DistributedSampler(data.train, num_replicas=world_size, rank=rank, shuffle=True,
                                 seed=seed, drop_last=False)
    train = DataLoader(data.train, batch_size=micro_batch_size, sampler=sampler, drop_last=True,
                       num_workers=num_workers, persistent_workers=num_workers > 0)
    def eval_loader(dataset: Dataset) -> DataLoader:
        return DataLoader(EvalShard(dataset, rank, world_size),
                          batch_size=eval_batch_size or 2 * micro_batch_size, shuffle=False,
                          num_workers=num_workers, persistent_workers=num_workers > 0)

    test = eval_loader(data.test) if data.test is not None else None
    return Loaders(train=train, val=eval_loader(data.val), train_sampler=sampler, rank=rank,
                   test=test)
