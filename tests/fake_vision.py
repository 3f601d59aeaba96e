"""Tiny MNIST / FashionMNIST / CIFAR-10 files in torchvision's on-disk layout, for tests."""
from __future__ import annotations

import gzip
import os
import pickle
import struct

import numpy as np


def _write_idx(path: str, array: np.ndarray, gz: bool) -> None:
    """Write a uint8 array in idx format: two zero bytes, type 0x08, ndim, big-endian dims, data."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with (gzip.open(path + ".gz", "wb") if gz else open(path, "wb")) as f:
        f.write(header + np.ascontiguousarray(array, np.uint8).tobytes())


def write_fake_mnist(root, n_train: int, n_test: int, kind: str = "MNIST", gz: bool = False) -> dict[str, np.ndarray]:
    """Return the arrays written as root/<kind>/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz].

    kind is "MNIST" or "FashionMNIST"; labels cycle 0..9, images are seeded random uint8.
    """
    rng = np.random.default_rng(0)
    out = {"x_train": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
           "y_train": (np.arange(n_train) % 10).astype(np.uint8),
           "x_test": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
           "y_test": (np.arange(n_test)[::-1] % 10).astype(np.uint8)}
    raw = os.path.join(str(root), kind, "raw")
    os.makedirs(raw, exist_ok=True)
    _write_idx(os.path.join(raw, "train-images-idx3-ubyte"), out["x_train"], gz)
    _write_idx(os.path.join(raw, "train-labels-idx1-ubyte"), out["y_train"], gz)
    _write_idx(os.path.join(raw, "t10k-images-idx3-ubyte"), out["x_test"], gz)
    _write_idx(os.path.join(raw, "t10k-labels-idx1-ubyte"), out["y_test"], gz)
    return out


def write_fake_cifar10(root, n_train: int, n_test: int) -> dict[str, np.ndarray]:
    """Return the arrays written as root/cifar-10-batches-py/data_batch_1..5 and test_batch.

    The training images are split over the five batches as evenly as possible (like the real
    set); images are (N, 3, 32, 32) seeded random uint8, labels cycle 0..9.
    """
    rng = np.random.default_rng(1)
    out = {"x_train": rng.integers(0, 256, (n_train, 3, 32, 32), dtype=np.uint8),
           "y_train": np.arange(n_train) % 10,
           "x_test": rng.integers(0, 256, (n_test, 3, 32, 32), dtype=np.uint8),
           "y_test": (np.arange(n_test) + 3) % 10}
    folder = os.path.join(str(root), "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    parts = np.array_split(np.arange(n_train), 5)
    batches = [(f"data_batch_{i + 1}", p) for i, p in enumerate(parts)]
    for name, x, y in [(n, out["x_train"][p], out["y_train"][p]) for n, p in batches] + \
            [("test_batch", out["x_test"], out["y_test"])]:
        # Same keys and types as the real pickles: bytes keys, uint8 (N, 3072) data, list labels.
        d = {b"batch_label": name.encode(), b"data": x.reshape(len(x), 3072),
             b"labels": [int(v) for v in y], b"filenames": [b"img%d.png" % i for i in range(len(y))]}
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(d, f, protocol=2)
    return out
