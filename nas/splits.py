"""Stratified, seeded splits and subsets of a labelled dataset's sample indices.

`nas.data` and the readers of the stored datasets (`nas.fashion_mnist`, `nas.cifar`) carve their
validation splits (`stratified_split`) and `training.train_subset` (`stratified_subset`) here.
Each is fixed by its seed (`SPLIT_SEED` by default, independent of the training seed), so every
candidate of a search is ranked on the same validation images, and neither reads global random
state.
"""

from __future__ import annotations

import numpy as np

SPLIT_SEED = 0


def stratified_split(labels: np.ndarray, fraction: float, *, seed: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Split sample indices into (kept, held out), holding out `fraction` of every class.

    Each class's indices are permuted by a generator seeded with `seed` and its first
    `round(fraction * n)` are held out (at least one where the class has two or more samples), so
    the split is fixed for a seed, stratified, and independent of any global random state. Both
    index arrays come back sorted.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    held: list[np.ndarray] = []
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        idx = idx[rng.permutation(len(idx))]
        k = int(round(fraction * len(idx)))
        if len(idx) >= 2:
            k = min(max(k, 1), len(idx) - 1)
        held.append(idx[:k])
    held_idx = np.sort(np.concatenate(held)) if held else np.zeros(0, dtype=np.int64)
    kept_idx = np.setdiff1d(np.arange(len(labels)), held_idx)
    return kept_idx, held_idx



def stratified_subset(labels: np.ndarray, size: int, *, seed: int) -> np.ndarray:
    """Exactly `size` sample indices, each class kept in proportion (largest remainders), sorted.

    Each class's indices are permuted by a generator seeded with `seed`, so the subset is fixed
    for a seed and independent of any global random state; a larger `size` keeps a superset of
    a smaller one's per-class prefix.
    """
    labels = np.asarray(labels)
    if not 0 < size <= len(labels):
        raise ValueError(f"size must be in 1..{len(labels)}, got {size}")
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    quota = size * counts / counts.sum()
    take = np.floor(quota).astype(np.int64)
    order = np.argsort(-(quota - take), kind="stable")
    take[order[:size - take.sum()]] += 1
    kept = []
    for cls, k in zip(classes, take, strict=True):
        idx = np.flatnonzero(labels == cls)
        kept.append(idx[rng.permutation(len(idx))][:k])
    return np.sort(np.concatenate(kept))

