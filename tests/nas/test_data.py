"""Datasets and loaders: digits split and resizing, CIFAR and folder layouts, sharding, checks."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from nas.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    EvalShard,
    _translate,
    build_datasets,
    build_loaders,
    check_compatible,
    describe_dataset,
    load_digits_split,
    stratified_split,
)
from search_spaces.training import TrainingConfig
from spvit.arch import ArchSpec
from spvit.errors import ConfigError
from tests.messages import assert_names_value_and_fix


def tiny_spec(**kw) -> ArchSpec:
    base = dict(depth=2, heads=2, embed_dim=32, img_size=16, patch_size=2, in_chans=1,
                num_classes=10, head="avg")
    base.update(kw)
    return ArchSpec.uniform(**base)


# --------------------------------------------------------------------------- digits
def _plain_stratified_split(labels, fraction, seed):
    """Reference: per class, a seeded permutation; the first round(fraction * n) are held out."""
    rng = np.random.default_rng(seed)
    held = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        held.extend(idx[:max(1, min(len(idx) - 1, int(round(fraction * len(idx)))))].tolist())
    return sorted(set(range(len(labels))) - set(held)), sorted(held)


def test_digits_split_is_fixed_stratified_disjoint_and_matches_a_plain_split():
    train_x, train_y, val_x, val_y, test_x, test_y = load_digits_split()
    assert len(train_y) + len(val_y) + len(test_y) == 1797
    assert abs(len(val_y) - 359) <= 5 and abs(len(test_y) - 359) <= 5
    again = load_digits_split()
    for a, b in zip(again, (train_x, train_y, val_x, val_y, test_x, test_y), strict=True):
        assert torch.equal(a, b)
    d = load_digits()
    # Stratified: each class's validation and test shares are within one image of 20 %.
    for c in range(10):
        n_c = int((d.target == c).sum())
        assert abs(int((val_y == c).sum()) - 0.2 * n_c) <= 1
        assert abs(int((test_y == c).sum()) - 0.2 * n_c) <= 1
    # Same images as the plain two-stage split with the documented seeds, scaled to [0, 1].
    rest, ref_test = _plain_stratified_split(d.target, 0.2, 0)
    rest = np.asarray(rest)
    keep, ref_val = _plain_stratified_split(d.target[rest], 0.25, 1)
    assert np.allclose(test_x[:, 0].numpy(), d.images[ref_test] / 16.0)
    assert np.allclose(val_x[:, 0].numpy(), d.images[rest[ref_val]] / 16.0)
    assert np.array_equal(train_y.numpy(), d.target[rest[keep]])
    # Disjoint: no scan is in two splits (compared by index, then by content).
    all_idx = set(ref_test) | set(rest[ref_val].tolist()) | set(rest[keep].tolist())
    assert len(all_idx) == 1797
    flat = {tuple(x.flatten().tolist()) for x in test_x}
    assert not any(tuple(x.flatten().tolist()) in flat for x in val_x[:50])


def test_stratified_split_holds_out_every_class_and_ignores_global_rng():
    labels = np.array([0] * 7 + [1] * 3 + [2] * 2)
    np.random.seed(1)
    torch.manual_seed(1)
    a = stratified_split(labels, 0.3, seed=5)
    np.random.seed(2)
    torch.manual_seed(2)
    b = stratified_split(labels, 0.3, seed=5)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    kept, held = a
    assert set(labels[held]) == {0, 1, 2} and set(labels[kept]) == {0, 1, 2}
    assert not set(kept) & set(held) and len(kept) + len(held) == len(labels)
    assert not np.array_equal(stratified_split(labels, 0.3, seed=6)[1], held)


def _upsample2_reference(img: np.ndarray) -> np.ndarray:
    """Bilinear x2 (half-pixel centres, edge clamp), written out per axis."""
    def axis(a: np.ndarray) -> np.ndarray:
        n = a.shape[0]
        out = np.empty((2 * n,) + a.shape[1:], dtype=np.float64)
        for i in range(n):
            out[2 * i] = 0.25 * a[max(i - 1, 0)] + 0.75 * a[i]
            out[2 * i + 1] = 0.75 * a[i] + 0.25 * a[min(i + 1, n - 1)]
        return out
    return axis(axis(img).T).T


def test_digits_are_upsampled_normalised_and_repeated_to_rgb():
    spec = tiny_spec()
    data = build_datasets(TrainingConfig(augment=False), spec)
    _, _, val_x, val_y, _, _ = load_digits_split()
    x, y = data.val[3]
    assert x.shape == (1, 16, 16) and y == int(val_y[3])
    ref = (_upsample2_reference(val_x[3, 0].double().numpy()) - data.mean[0]) / data.std[0]
    assert np.allclose(x[0].numpy(), ref, atol=1e-5)
    # The statistics are the training split's own (so training images are ~N(0, 1)).
    train_stack = torch.stack([data.train[i][0] for i in range(len(data.train))])
    assert abs(train_stack.mean().item()) < 1e-3 and abs(train_stack.std().item() - 1) < 1e-2

    rgb = build_datasets(TrainingConfig(augment=False), tiny_spec(in_chans=3))
    x3, _ = rgb.val[3]
    assert x3.shape == (3, 16, 16)
    assert torch.equal(x3[0], x3[2]) and torch.allclose(x3[1], x[0])


def test_translate_matches_a_padded_crop():
    x = torch.arange(2 * 5 * 6, dtype=torch.float32).view(2, 5, 6)
    for dy in range(-2, 3):
        for dx in range(-2, 3):
            padded = np.pad(x.numpy(), ((0, 0), (2, 2), (2, 2)))
            ref = padded[:, 2 - dy:2 - dy + 5, 2 - dx:2 - dx + 6]
            assert np.array_equal(_translate(x, dy, dx).numpy(), ref), (dy, dx)


def test_train_augmentation_is_a_small_shift_seeded_by_epoch_and_rank():
    spec = tiny_spec()
    plain = build_datasets(TrainingConfig(augment=False), spec).train
    aug = build_datasets(TrainingConfig(augment=True), spec).train
    background = (0.0 - aug.mean[0].item()) / aug.std[0].item()

    def shift_of(i: int) -> tuple[int, int]:
        x_aug, _ = aug[i]
        x, _ = plain[i]
        raw = x * plain.std + plain.mean  # back to [0, 1] so the zero fill is comparable
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                ref = (_translate(raw, dy, dx) - aug.mean) / aug.std
                if torch.allclose(x_aug, ref, atol=1e-5):
                    return dy, dx
        raise AssertionError(f"sample {i} is not a shift of at most 2 px of the original")

    aug.set_epoch(1, rank=0)
    first = [shift_of(i) for i in range(40)]
    aug.set_epoch(1, rank=0)
    assert [shift_of(i) for i in range(40)] == first
    aug.set_epoch(2, rank=0)
    assert [shift_of(i) for i in range(40)] != first
    assert len(set(first)) > 5  # actually varies
    assert background < 0


@pytest.mark.parametrize("change, rule", [
    (dict(num_classes=5), "num_classes"),
    (dict(in_chans=2), "in_chans"),
    (dict(img_size=4), "img_size >= 8"),
])
def test_architecture_that_does_not_fit_the_data_is_refused(change, rule):
    with pytest.raises(ConfigError, match=rule) as e:
        build_datasets(TrainingConfig(), tiny_spec(**change))
    assert_names_value_and_fix(str(e.value), *change.values())


# --------------------------------------------------------------------------- sharding
def test_train_shards_are_disjoint_equal_and_cover_the_split():
    data = build_datasets(TrainingConfig(augment=False), tiny_spec())
    shards = [build_loaders(data, micro_batch_size=16, rank=r, world_size=2, seed=3)
              for r in range(2)]
    for s in shards:
        s.set_epoch(1)
    idx = [list(iter(s.train_sampler)) for s in shards]
    n = len(data.train)
    half = (n + 1) // 2  # an odd count repeats one index as padding
    assert len(idx[0]) == len(idx[1]) == half
    assert set(idx[0]) | set(idx[1]) == set(range(n))
    assert len(set(idx[0]) & set(idx[1])) == n % 2
    assert shards[0].steps_per_epoch == shards[1].steps_per_epoch == half // 16
    # Images in a batch are the ones the sampler named.
    xb, yb = next(iter(shards[1].train))
    assert xb.shape == (16, 1, 16, 16)
    assert torch.equal(yb, torch.tensor([int(data.train[i][1]) for i in idx[1][:16]]))
    # A new epoch reshuffles.
    shards[0].set_epoch(2)
    assert list(iter(shards[0].train_sampler)) != idx[0]


def test_eval_shards_count_each_image_once_and_pad_to_equal_length():
    class Seven(torch.utils.data.Dataset):
        def __len__(self):
            return 7

        def __getitem__(self, i):
            return torch.full((1,), float(i)), i

    shards = [EvalShard(Seven(), r, 3) for r in range(3)]
    assert [len(s) for s in shards] == [3, 3, 3]
    labels = [[s[i][1] for i in range(len(s))] for s in shards]
    real = sorted(label for ls in labels for label in ls if label >= 0)
    assert real == list(range(7))
    assert sum(label == -1 for ls in labels for label in ls) == 2


def test_batch_larger_than_the_data_is_refused():
    data = build_datasets(TrainingConfig(augment=False), tiny_spec())
    with pytest.raises(ConfigError, match="batch_size"):
        build_loaders(data, micro_batch_size=1000, world_size=2)


# --------------------------------------------------------------------------- CIFAR
def _write_cifar10(root, per_batch=3):
    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    images = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=per_batch)]
        images[name] = (data, labels)
        with open(folder / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": data,
                         b"filenames": [b"x.png"] * per_batch}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)],
                     b"num_cases_per_batch": per_batch, b"num_vis": 3072}, f)
    return images


def test_cifar10_pickle_layout_loads_normalised_and_checks_the_architecture(tmp_path):
    images = _write_cifar10(tmp_path)
    info = describe_dataset(f"cifar10:{tmp_path}")
    assert (info.num_classes, info.channels, info.native_size) == (10, 3, 32)
    assert info.class_names[3] == "c3"
    spec = tiny_spec(img_size=32, patch_size=4, in_chans=3)
    data = build_datasets(TrainingConfig(dataset=f"cifar10:{tmp_path}", augment=False), spec)
    # Validation is carved from the five training batches; test is the release's test batch.
    raw = np.concatenate([images[f"data_batch_{i}"][0] for i in range(1, 6)])
    labels = sum((images[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    kept, held = stratified_split(np.array(labels), 0.1, seed=0)
    assert (len(data.train), len(data.val), len(data.test)) == (len(kept), len(held), 3)
    assert len(held) >= 1 and len(kept) + len(held) == 15
    mean, std = np.array(CIFAR10_MEAN)[:, None, None], np.array(CIFAR10_STD)[:, None, None]
    for split, idx in ((data.train, kept), (data.val, held)):
        x, y = split[len(idx) - 1]
        ref = (raw[idx[-1]].reshape(3, 32, 32) / 255.0 - mean) / std
        assert y == labels[idx[-1]] and np.allclose(x.numpy(), ref, atol=1e-5)
    test_raw, test_labels = images["test_batch"]
    x, y = data.test[2]
    ref = (test_raw[2].reshape(3, 32, 32) / 255.0 - mean) / std
    assert y == test_labels[2] and np.allclose(x.numpy(), ref, atol=1e-5)
    # Upsampling to 64 px works; grey-scale or smaller inputs are refused.
    big = build_datasets(TrainingConfig(dataset=f"cifar10:{tmp_path}"),
                         tiny_spec(img_size=64, patch_size=8, in_chans=3))
    assert big.train[0][0].shape == (3, 64, 64)
    with pytest.raises(ConfigError, match="in_chans"):
        check_compatible(info, tiny_spec(img_size=32, patch_size=4, in_chans=1))
    with pytest.raises(ConfigError, match="img_size >= 32"):
        check_compatible(info, tiny_spec(img_size=16, in_chans=3))


def test_cifar100_layout_and_a_refused_pickle(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for name, n in (("train", 8), ("test", 2)):
        with open(folder / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         "fine_labels": [90 + i % 4 for i in range(n)],
                         "coarse_labels": [0] * n}, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"f{i}" for i in range(100)]}, f)
    spec = tiny_spec(img_size=32, patch_size=4, in_chans=3, num_classes=100)
    data = build_datasets(TrainingConfig(dataset=f"cifar100:{folder}"), spec)
    # Two images of each of four classes: one of each is held out for validation.
    assert (len(data.train), len(data.val), len(data.test)) == (4, 4, 2)
    assert sorted(data.train[i][1] for i in range(4)) == [90, 91, 92, 93]
    assert sorted(data.val[i][1] for i in range(4)) == [90, 91, 92, 93]
    with pytest.raises(ConfigError, match="num_classes: 100"):
        check_compatible(data.info, tiny_spec(img_size=32, patch_size=4, in_chans=3))

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    with open(folder / "test", "wb") as f:
        pickle.dump({"data": Evil()}, f)
    with pytest.raises(ConfigError, match=r"refusing to load (posix|os)\.system"):
        build_datasets(TrainingConfig(dataset=f"cifar100:{folder}"), spec)


def test_missing_cifar_files_are_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="nothing is downloaded"):
        describe_dataset(f"cifar10:{tmp_path}")


# --------------------------------------------------------------------------- folders
def _write_folder(root, classes=("cat", "dog"), per_class=3, size=20, splits=("train", "val")):
    rng = np.random.default_rng(2)
    for split in splits:
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(arr).save(root / split / c / f"{i}.png")


def test_image_folder_loads_with_timm_transforms_in_rgb_and_grey(tmp_path):
    _write_folder(tmp_path)
    info = describe_dataset(f"folder:{tmp_path}")
    assert info.class_names == ("cat", "dog") and info.num_classes == 2
    spec = tiny_spec(num_classes=2, in_chans=3)
    data = build_datasets(TrainingConfig(dataset=f"folder:{tmp_path}"), spec)
    assert (len(data.train), len(data.val)) == (6, 6)
    x, y = data.train[4]
    assert x.shape == (3, 16, 16) and y == 1
    loaders = build_loaders(data, micro_batch_size=2, world_size=1)
    loaders.set_epoch(1)
    first = next(iter(loaders.train))[0]
    loaders.set_epoch(1)
    assert torch.equal(next(iter(loaders.train))[0], first)  # augmentation seeded per epoch
    grey = build_datasets(TrainingConfig(dataset=f"folder:{tmp_path}", augment=False),
                          tiny_spec(num_classes=2, in_chans=1))
    xg, _ = grey.val[0]
    assert xg.shape == (1, 16, 16)
    assert data.test is None and loaders.test is None  # no test/ folder: no test accuracy


def test_image_folder_test_split_is_loaded_and_checked(tmp_path):
    _write_folder(tmp_path, per_class=2, splits=("train", "val", "test"))
    spec = tiny_spec(num_classes=2, in_chans=3)
    data = build_datasets(TrainingConfig(dataset=f"folder:{tmp_path}", augment=False), spec)
    assert len(data.test) == 4 and data.test[3][1] == 1
    loaders = build_loaders(data, micro_batch_size=2, world_size=2, rank=1)
    shard = loaders.test.dataset  # rank 1 of 2: every second test image
    assert [shard[i][1] for i in range(len(shard))] == [0, 1]
    (tmp_path / "test" / "dog").rename(tmp_path / "test" / "bird")
    with pytest.raises(ConfigError, match=r"train/ and test/ must hold the same class"):
        describe_dataset(f"folder:{tmp_path}")


def test_image_folder_with_different_classes_in_train_and_val_is_refused(tmp_path):
    _write_folder(tmp_path)
    (tmp_path / "val" / "dog").rename(tmp_path / "val" / "bird")
    with pytest.raises(ConfigError, match=r"differ in \['bird', 'dog'\]"):
        describe_dataset(f"folder:{tmp_path}")
    with pytest.raises(ConfigError, match="train/ and val/"):
        describe_dataset(f"folder:{tmp_path / 'nothing'}")
