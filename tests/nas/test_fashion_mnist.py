"""Fashion-MNIST: the IDX reader against the real files, its refusals, splits, subsets, batching.

The real files come from Debian's `dataset-fashion-mnist` package (CI installs it); the tests that
need them are skipped where it is absent. Damaged files are written by the tests themselves.
"""

from __future__ import annotations

import gzip
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from nas.data import (
    FASHION_MNIST_DIR,
    Datasets,
    EvalShard,
    TensorImageDataset,
    _translate,
    _translate_batch,
    build_datasets,
    build_loaders,
    check_compatible,
    describe_dataset,
    fashion_mnist_root,
    load_fashion_mnist,
    stratified_subset,
)
from search_spaces.training import TrainingConfig, parse_dataset
from spvit.arch import ArchSpec
from spvit.errors import ConfigError
from tests.messages import assert_names_value_and_fix

REAL = Path(FASHION_MNIST_DIR)
NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
         "t10k-labels-idx1-ubyte")
needs_real = pytest.mark.skipif(
    not all((REAL / f"{n}.gz").is_file() for n in NAMES),
    reason="dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist)")


def fashion_spec(**kw) -> ArchSpec:
    base = dict(depth=1, heads=2, embed_dim=16, img_size=28, patch_size=7, in_chans=1,
                num_classes=10, head="avg")
    base.update(kw)
    return ArchSpec.uniform(**base)


def plain_idx(path: Path, values: np.ndarray, *, magic_type: int = 0x08) -> None:
    """An IDX file written plainly: 2 zero bytes, type, ndim, big-endian dims, the bytes."""
    head = bytes([0, 0, magic_type, values.ndim]) + struct.pack(f">{values.ndim}I", *values.shape)
    path.write_bytes(head + values.astype(np.uint8).tobytes())


def real_labels(split: str) -> np.ndarray:
    name = "train-labels-idx1-ubyte.gz" if split == "train" else "t10k-labels-idx1-ubyte.gz"
    return np.frombuffer(gzip.decompress((REAL / name).read_bytes())[8:], dtype=np.uint8)


@pytest.fixture
def copied(tmp_path: Path) -> Path:
    """A folder of links to the real image files and plain copies of the real label files."""
    for name in NAMES:
        if "labels" in name:
            (tmp_path / name).write_bytes(gzip.decompress((REAL / f"{name}.gz").read_bytes()))
        else:
            (tmp_path / f"{name}.gz").symlink_to(REAL / f"{name}.gz")
    return tmp_path


# --------------------------------------------------------------------------- the real files
@needs_real
def test_the_packaged_files_load_into_the_standard_splits():
    train_x, train_y, val_x, val_y, test_x, test_y = load_fashion_mnist(REAL)
    assert train_x.dtype == torch.uint8 and train_x.shape == (54_000, 1, 28, 28)
    assert val_x.shape == (6_000, 1, 28, 28) and test_x.shape == (10_000, 1, 28, 28)
    # The test split is the release's test file, in its order.
    assert torch.equal(test_y, torch.from_numpy(real_labels("test").astype(np.int64)))
    # Validation: 10% of every class of the 60,000 training images (6,000 each in the release).
    assert torch.bincount(val_y, minlength=10).tolist() == [600] * 10
    assert torch.bincount(train_y, minlength=10).tolist() == [5_400] * 10
    # Train and validation partition the release's training file: every pixel row is accounted.
    raw = gzip.decompress((REAL / "train-images-idx3-ubyte.gz").read_bytes())[16:]
    total = np.frombuffer(raw, dtype=np.uint8).astype(np.int64).sum()
    assert int(train_x.long().sum() + val_x.long().sum()) == int(total)
    # The first test image is the file's first 784 pixel bytes.
    raw = gzip.decompress((REAL / "t10k-images-idx3-ubyte.gz").read_bytes())
    assert test_x[0, 0].flatten().tolist() == list(raw[16:16 + 784])


@needs_real
def test_describe_and_parse_the_default_location_and_a_path():
    assert parse_dataset("fashion-mnist") == ("fashion-mnist", None)
    assert parse_dataset(f"fashion-mnist:{REAL}") == ("fashion-mnist", str(REAL))
    info = describe_dataset("fashion-mnist")
    assert (info.kind, info.root, info.num_classes, info.channels, info.native_size) == (
        "fashion-mnist", str(REAL), 10, 1, 28)
    assert info.class_names[0] == "T-shirt/top" and info.class_names[9] == "Ankle boot"
    check_compatible(info, fashion_spec())
    check_compatible(info, fashion_spec(in_chans=3))
    with pytest.raises(ConfigError) as e:
        check_compatible(info, fashion_spec(img_size=24, patch_size=4))
    assert_names_value_and_fix(str(e.value), "24")


@needs_real
def test_plain_files_and_the_torchvision_layout_are_found(copied: Path, tmp_path_factory):
    assert fashion_mnist_root(str(copied)) == copied
    tv = tmp_path_factory.mktemp("tv")
    shutil.copytree(copied, tv / "FashionMNIST" / "raw", symlinks=True)
    assert fashion_mnist_root(str(tv)) == tv / "FashionMNIST" / "raw"
    *_, test_y = load_fashion_mnist(tv / "FashionMNIST" / "raw")
    assert torch.equal(test_y, torch.from_numpy(real_labels("test").astype(np.int64)))


@needs_real
def test_datasets_normalise_augment_and_subset(copied: Path):
    training = TrainingConfig(dataset=f"fashion-mnist:{copied}", train_subset=1_000, seed=3)
    data = build_datasets(training, fashion_spec())
    assert len(data.train) == 1_000 and len(data.val) == 6_000 and len(data.test) == 10_000
    assert torch.bincount(data.train.labels, minlength=10).tolist() == [100] * 10
    assert data.train.hflip and data.train.max_shift == 3
    assert data.val.max_shift == 0 and not data.val.hflip
    # The same images for another training seed: the subset is the dataset's, not the run's.
    other = build_datasets(training.replace(seed=4), fashion_spec())
    assert torch.equal(other.train.images, data.train.images)
    # Normalised with the recorded statistics: the validation split is ~zero-mean, unit-std.
    x = torch.stack([data.val[i][0] for i in range(0, 6_000, 10)])
    assert abs(x.mean().item()) < 0.05 and abs(x.std().item() - 1) < 0.05
    with pytest.raises(ConfigError) as e:
        build_datasets(training.replace(train_subset=60_000), fashion_spec())
    assert_names_value_and_fix(str(e.value), "60000", "54000")


def test_train_subset_must_be_a_count():
    for bad in (0, -5, 2.5, True, "all"):
        with pytest.raises(ConfigError) as e:
            TrainingConfig(train_subset=bad)
        assert_names_value_and_fix(str(e.value), repr(bad))
    assert TrainingConfig(train_subset=None).train_subset is None


# --------------------------------------------------------------------------- refusals
def test_a_missing_folder_names_the_files_and_how_to_get_them(tmp_path: Path):
    with pytest.raises(ConfigError) as e:
        describe_dataset(f"fashion-mnist:{tmp_path}")
    message = str(e.value)
    assert "train-images-idx3-ubyte" in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert_names_value_and_fix(message, str(tmp_path))


def _fake_release(root: Path, *, train: int = 60_000, test: int = 10_000) -> None:
    """Headers and tiny bodies: enough for `describe_dataset`, which reads headers only."""
    for prefix, count in (("train", train), ("t10k", test)):
        head = bytes([0, 0, 8, 3]) + struct.pack(">3I", count, 28, 28)
        (root / f"{prefix}-images-idx3-ubyte").write_bytes(head)
        (root / f"{prefix}-labels-idx1-ubyte").write_bytes(bytes([0, 0, 8, 1])
                                                           + struct.pack(">I", count))


def test_headers_are_checked_before_anything_loads(tmp_path: Path):
    _fake_release(tmp_path)
    assert describe_dataset(f"fashion-mnist:{tmp_path}").num_classes == 10
    # A wrong count (e.g. MNIST's 60,000 test images would be wrong too): named with the file.
    _fake_release(tmp_path, test=9_999)
    with pytest.raises(ConfigError) as e:
        describe_dataset(f"fashion-mnist:{tmp_path}")
    assert "t10k-images-idx3-ubyte" in str(e.value) and "9999x28x28" in str(e.value)
    assert_names_value_and_fix(str(e.value), "10000x28x28")
    # A wrong magic number (a float IDX file), and a file that is not IDX at all.
    _fake_release(tmp_path)
    plain_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(60_000), magic_type=0x0D)
    with pytest.raises(ConfigError) as e:
        describe_dataset(f"fashion-mnist:{tmp_path}")
    assert "train-labels-idx1-ubyte" in str(e.value) and "00000d01" in str(e.value)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(b"<html>not found</html>")
    with pytest.raises(ConfigError) as e:
        describe_dataset(f"fashion-mnist:{tmp_path}")
    assert_names_value_and_fix(str(e.value), "train-labels-idx1-ubyte")


def test_a_damaged_gzip_is_refused_with_its_name(tmp_path: Path):
    _fake_release(tmp_path)
    path = tmp_path / "t10k-labels-idx1-ubyte"
    gz = gzip.compress(path.read_bytes() + bytes(10_000))
    path.unlink()
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gz[:20])  # cut inside the header
    with pytest.raises(ConfigError) as e:
        describe_dataset(f"fashion-mnist:{tmp_path}")
    assert_names_value_and_fix(str(e.value), "t10k-labels-idx1-ubyte.gz")
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b" + bytes(30))
    with pytest.raises(ConfigError) as e:
        describe_dataset(f"fashion-mnist:{tmp_path}")
    assert_names_value_and_fix(str(e.value), "t10k-labels-idx1-ubyte.gz")


@needs_real
def test_truncated_padded_and_out_of_range_data_is_refused_at_load(copied: Path):
    path = copied / "t10k-labels-idx1-ubyte"
    good = path.read_bytes()
    path.write_bytes(good[:-100])  # header intact, data short: only the full read can tell
    describe_dataset(f"fashion-mnist:{copied}")
    with pytest.raises(ConfigError) as e:
        load_fashion_mnist(copied)
    assert "truncated" in str(e.value)
    assert_names_value_and_fix(str(e.value), "t10k-labels-idx1-ubyte", "9900", "10000")
    path.write_bytes(good + b"\x00")
    with pytest.raises(ConfigError) as e:
        load_fashion_mnist(copied)
    assert_names_value_and_fix(str(e.value), "10001")
    path.write_bytes(good[:-1] + b"\x0c")
    with pytest.raises(ConfigError) as e:
        load_fashion_mnist(copied)
    assert_names_value_and_fix(str(e.value), "t10k-labels-idx1-ubyte", "12")
    # A gzip cut short inside the data (the stream ends early).
    path.unlink()
    (copied / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(good)[:-50])
    with pytest.raises(ConfigError) as e:
        load_fashion_mnist(copied)
    assert_names_value_and_fix(str(e.value), "t10k-labels-idx1-ubyte.gz")


# --------------------------------------------------------------------------- subsets, batches
def test_stratified_subset_is_exact_proportional_and_seeded():
    rng = np.random.default_rng(0)
    labels = rng.choice(4, size=1_003, p=[0.1, 0.2, 0.3, 0.4])
    keep = stratified_subset(labels, 200, seed=7)
    assert len(keep) == 200 and len(set(keep.tolist())) == 200
    counts = np.bincount(labels[keep], minlength=4)
    expected = 200 * np.bincount(labels, minlength=4) / len(labels)
    assert np.all(np.abs(counts - expected) < 1)
    assert np.array_equal(keep, stratified_subset(labels, 200, seed=7))
    assert not np.array_equal(keep, stratified_subset(labels, 200, seed=8))


def test_batched_translation_equals_the_per_image_one():
    x = torch.rand(6, 2, 9, 7)
    shifts = torch.tensor([[0, 0], [3, -2], [-3, 3], [1, 0], [0, -1], [-2, -3]])
    out = _translate_batch(x, shifts, 3)
    for i in range(6):
        assert torch.equal(out[i], _translate(x[i], *shifts[i].tolist()))


def test_a_batch_equals_its_images_and_keeps_the_seeded_stream():
    images = torch.randint(0, 256, (40, 1, 28, 28), dtype=torch.uint8)
    labels = torch.arange(40) % 10
    common = dict(img_size=32, mean=(0.3,), std=(0.4,), out_chans=3)
    plain = TensorImageDataset(images, labels, **common)
    batch = plain.__getitems__([5, 0, 39])
    for (x, y), i in zip(batch, (5, 0, 39), strict=True):
        ref_x, ref_y = plain[i]
        assert x.shape == (3, 32, 32) and y == ref_y
        torch.testing.assert_close(x, ref_x)
    aug = TensorImageDataset(images, labels, max_shift=3, hflip=True, seed=1, **common)
    aug.set_epoch(2)
    first = torch.stack([x for x, _ in aug.__getitems__(list(range(40)))])
    aug.set_epoch(2)
    again = torch.stack([x for x, _ in aug.__getitems__(list(range(40)))])
    assert torch.equal(first, again)
    assert not torch.allclose(first, torch.stack([plain[i][0] for i in range(40)]))


def test_loaders_batch_through_getitems_and_evaluation_keeps_padding():
    images = torch.randint(0, 256, (30, 1, 28, 28), dtype=torch.uint8)
    labels = torch.arange(30) % 10
    ds = TensorImageDataset(images, labels, img_size=28, mean=(0.5,), std=(0.5,), out_chans=1)
    shard = EvalShard(ds, rank=3, world_size=4)  # 7 real samples, padded to 8
    got = shard.__getitems__(list(range(8)))
    assert [y for _, y in got] == [int(labels[i]) for i in range(3, 30, 4)] + [-1]
    for (x, _), i in zip(got[:7], range(3, 30, 4), strict=True):
        torch.testing.assert_close(x, ds[i][0])
    data = Datasets(train=ds, val=ds, test=None, info=None, mean=(0.5,), std=(0.5,))
    loaders = build_loaders(data, micro_batch_size=8)
    x, y = next(iter(loaders.train))
    assert x.shape == (8, 1, 28, 28) and y.dtype == torch.int64
