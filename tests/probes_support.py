"""Small real data for the probe tests: scikit-learn's digits as arrays, Features, and store files."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from featurebank.features.store import Features


def digits_features(n: int | None = None) -> Features:
    """scikit-learn's digits (64-D) as a Features object, split 75/25 by index (every 4th is test)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    X, y = d.data.astype(np.float32), d.target.astype(np.int64)
    if n is not None:
        X, y = X[:n], y[:n]
    ids = [f"{c}/{i:04d}.png" for i, c in enumerate(y)]
    splits = np.array(["test" if i % 4 == 0 else "train" for i in range(len(y))], dtype=object)
    return Features(X, y, ids, [str(c) for c in range(10)], splits, "f" * 64, Path("digits.h5"), {"backbone": "pixels"})


def write_store(path: Path, X: np.ndarray, y: np.ndarray, splits) -> Path:
    """A store file with the layout of features.store (format attributes, embeddings, ids, labels,
    splits, content) written directly, so tests need no backbone."""
    import h5py

    from featurebank.features.store import FORMAT_VERSION, ROWS_PER_CHUNK, STORE_FORMAT, STR, write_failures

    fingerprint = hashlib.sha256(X.tobytes()).hexdigest()
    with h5py.File(path, "w") as f:
        f.attrs.update(format=STORE_FORMAT, format_version=FORMAT_VERSION, fingerprint=fingerprint,
                       backbone="test-arrays", dim=X.shape[1], dtype=str(X.dtype))
        f.create_dataset("embeddings", data=X, chunks=(min(len(X), ROWS_PER_CHUNK), X.shape[1]))
        f.create_dataset("ids", data=np.array([f"s{i:06d}" for i in range(len(X))], dtype=object), dtype=STR)
        labels = f.create_dataset("labels", data=np.asarray(y, np.int64))
        labels.attrs["class_names"] = [str(c) for c in range(int(np.max(y)) + 1)]
        f.create_dataset("splits", data=np.asarray(splits, dtype=object), dtype=STR)
        f.create_dataset("content", data=np.array(["stat:0:0"] * len(X), dtype=object), dtype=STR)
        write_failures(f, [])
    return path


def blobs(n: int, dim: int, classes: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian classes that overlap a little: a stand-in for embeddings of a larger size."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)) * 0.6
    y = rng.integers(0, classes, n)
    return (centres[y] + rng.normal(size=(n, dim))).astype(np.float32), y
