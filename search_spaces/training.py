"""`TrainingConfig`: the training budget and recipe of every candidate in a search.

It lives in the `training:` block of a search-space file (and can be given on its own to
`spvit-nas train`). The engine and the DeepSpeed config are built from it; it is saved beside every
run so a run can be reproduced from its folder alone. Validated once, here, at the edge.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from spvit.errors import ConfigError, did_you_mean

from .fields import whole_number

OPTIMIZERS = ("adamw",)
DATASET_KINDS = ("digits", "fashion-mnist", "folder", "cifar10", "cifar100")
# Kinds whose path is optional (a packaged default location is used without one).
OPTIONAL_PATH_KINDS = ("fashion-mnist",)


_KINDS_HELP = ("digits, fashion-mnist, fashion-mnist:PATH, folder:PATH, cifar10:PATH or"
               " cifar100:PATH")


def parse_dataset(value: str) -> tuple[str, str | None]:
    """Split a dataset string `digits` | `fashion-mnist[:PATH]` | `folder:PATH` | `cifar10:PATH`
    | `cifar100:PATH`; the path is None where none is given."""
    if not isinstance(value, str) or not value:
        raise ConfigError(f"dataset must be a string like 'digits' or 'folder:PATH', but got"
                          f" {value!r}. Use {_KINDS_HELP}.")
    kind, _, path = value.partition(":")
    if kind not in DATASET_KINDS:
        hint = did_you_mean(kind, DATASET_KINDS)
        raise ConfigError(f"dataset kind must be one of {list(DATASET_KINDS)}, but got {kind!r}."
                          f"{hint} Use {_KINDS_HELP}.")
    if kind == "digits":
        if path:
            raise ConfigError(f"the digits dataset is embedded and takes no path, but got"
                              f" {value!r}. Write dataset: digits.")
        return kind, None
    if not path and kind in OPTIONAL_PATH_KINDS:
        return kind, None
    if not path:
        raise ConfigError(f"dataset {kind} needs a local folder, but got {value!r}."
                          f" Write dataset: {kind}:/path/to/data.")
    return kind, path


@dataclass(frozen=True)
class TrainingConfig:
    """How each candidate is trained.

    Args:
        dataset: `digits` (embedded), `folder:PATH` (train/ and val/ class subfolders),
            `cifar10:PATH` or `cifar100:PATH` (python-pickle layout in a local folder).
        epochs: full training budget per candidate.
        batch_size: global batch size (split evenly over the workers of a trial).
        lr, min_lr: peak and final learning rate of the warm-up + cosine schedule.
        warmup_epochs: linear warm-up length in epochs.
        weight_decay: AdamW weight decay.
        label_smoothing: cross-entropy label smoothing.
        grad_clip: max gradient norm (0 disables clipping).
        optimizer: only `adamw`.
        zero_stage: DeepSpeed ZeRO stage 0-3.
        bf16: train in bf16 mixed precision.
        workers_per_trial: DeepSpeed/Ray Train workers per candidate.
        augment: standard train-split augmentation (random resized crop / flip where it fits).
        seed: seed for data split, init and shuffling.
        train_subset: train on this many images of the training split, a stratified subset
            fixed by the dataset's split seed (the same images for every candidate and seed);
            None trains on all. For low-data studies and CPU budgets; validation and test
            splits are unchanged.
    """

    dataset: str = "digits"
    epochs: int = 10
    batch_size: int = 64
    lr: float = 2e-3
    min_lr: float = 1e-5
    warmup_epochs: float = 1.0
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    grad_clip: float = 1.0
    optimizer: str = "adamw"
    zero_stage: int = 0
    bf16: bool = False
    workers_per_trial: int = 1
    augment: bool = True
    seed: int = 0
    train_subset: int | None = None

    def __post_init__(self) -> None:
        for name in ("lr", "min_lr", "warmup_epochs", "weight_decay", "label_smoothing",
                     "grad_clip"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ConfigError(f"training.{name} must be a number, but got {v!r}."
                                  f" Write e.g. {name}: 0.001.")
            object.__setattr__(self, name, float(v))
        for name, minimum in (("epochs", 1), ("batch_size", 1), ("workers_per_trial", 1),
                              ("seed", 0), ("zero_stage", 0)):
            whole_number(f"training.{name}", getattr(self, name), minimum,
                         f"Set it to a whole number >= {minimum}.")
        if self.train_subset is not None:
            whole_number("training.train_subset", self.train_subset, 10,
                         "Set it to the number of training images to keep, or drop the key to"
                         " train on all of them.", rule="an integer >= 10 or null")
        if self.zero_stage > 3:
            raise ConfigError(f"training.zero_stage must be 0, 1, 2 or 3, but got"
                              f" {self.zero_stage}. Pick a DeepSpeed ZeRO stage 0-3.")
        if not self.lr > 0:
            raise ConfigError(f"training.lr must be > 0, but got {self.lr}. Use e.g. lr: 0.002.")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"training.min_lr must be in [0, lr={self.lr}], but got"
                              f" {self.min_lr}. Lower min_lr.")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"training.label_smoothing must be in [0, 1), but got"
                              f" {self.label_smoothing}. Use e.g. 0.1.")
        for name in ("warmup_epochs", "weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise ConfigError(f"training.{name} must be >= 0, but got {getattr(self, name)}."
                                  " Use 0 to disable it.")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"training.optimizer must be one of {list(OPTIMIZERS)}, but got"
                              f" {self.optimizer!r}. Use optimizer: adamw.")
        for name in ("bf16", "augment"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"training.{name} must be true or false, but got"
                                  f" {getattr(self, name)!r}.")
        if self.batch_size % self.workers_per_trial:
            raise ConfigError(
                f"training.batch_size {self.batch_size} is not divisible by workers_per_trial"
                f" {self.workers_per_trial}; the global batch is split evenly over workers."
                " Pick a batch size that is a multiple of the worker count."
            )
        parse_dataset(self.dataset)

    def replace(self, **changes: Any) -> TrainingConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> TrainingConfig:
        data = dict(data or {})
        names = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in names:
                hint = did_you_mean(key, names)
                raise ConfigError(f"unknown training field {key!r}.{hint} Valid fields: {names}.")
        return cls(**data)
