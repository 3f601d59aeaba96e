"""Datasets as in-memory tensors: generated offline (mnist1d, digits, synthetic) or read from disk.

Every dataset is small enough to live on the device whole, so trials index tensors instead of
running a DataLoader. Loading never touches the global torch, numpy or `random` RNG state.
"""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
import pickle
import random
import struct
import tempfile
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from scaling import interrupts
from scaling.config import DATASETS, ConfigError

CACHE_FORMAT = 1  # bump when the cached arrays change meaning, so old files are not reused


@dataclass
class Dataset:
    """Train and validation tensors of one dataset; y holds int64 class labels."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    input_shape: tuple[int, ...]
    num_classes: int
    name: str

    @property
    def n_train(self) -> int:
        """Return the number of training samples."""
        return len(self.y_train)

    def to(self, device: Any) -> "Dataset":
        """Return a copy with all tensors on `device`."""
        return dataclasses.replace(self, x_train=self.x_train.to(device), y_train=self.y_train.to(device),
                                   x_val=self.x_val.to(device), y_val=self.y_val.to(device))


def load_dataset(cfg: Any, device: Any = "cpu") -> Dataset:
    """Return the dataset `cfg.name` (a DataConfig or its DictConfig), standardised, on `device`.

    mnist1d, digits and synthetic hold out `val_fraction` by a permutation seeded with `cfg.seed`.
    mnist, fashion_mnist and cifar10 use the official test set as validation split, so results
    compare with the literature and no training images are lost. Inputs are standardised with
    statistics of the whole training split (per feature; per channel for images) before
    `max_train_samples` truncates it, so a sample's input does not depend on the truncation.
    """
    if _is_vision(cfg):
        x_tr, y_tr, x_va, y_va = _read_vision(cfg)
        (mean, std), num_classes = _channel_stats(x_tr), 10
    else:
        x, y, num_classes = _generate(cfg)
        n_val = _n_val(len(y), cfg)
        perm = np.random.default_rng(cfg.seed).permutation(len(y))
        x_va, y_va, x_tr, y_tr = x[perm[:n_val]], y[perm[:n_val]], x[perm[n_val:]], y[perm[n_val:]]
        mean, std = x_tr.mean(0, dtype=np.float64), x_tr.std(0, dtype=np.float64)
    x_tr, y_tr = x_tr[: cfg.max_train_samples], y_tr[: cfg.max_train_samples]
    x_train, x_val = (_to_float(x, mean, std) for x in (x_tr, x_va))
    import torch

    y_train, y_val = (torch.as_tensor(np.asarray(y, dtype=np.int64)) for y in (y_tr, y_va))
    data = Dataset(x_train, y_train, x_val, y_val, tuple(x_train.shape[1:]), num_classes, cfg.name)
    return data.to(device)


def _to_float(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> torch.Tensor:
    """Return (x - mean) / std as a float32 tensor; constant features (std 0) are only centred."""
    import torch

    shape = (-1,) + (1,) * (x.ndim - 2)  # (F,) per feature, or (C, 1, 1) per image channel
    mean_t = torch.as_tensor(mean, dtype=torch.float32).reshape(shape)
    std_t = torch.as_tensor(np.where(std > 1e-8, std, 1.0), dtype=torch.float32).reshape(shape)
    return torch.from_numpy(np.ascontiguousarray(x)).to(torch.float32).sub_(mean_t).div_(std_t)


class SampleStream:
    """The training data order: each epoch a fresh permutation of the n training samples, read B at
    a time straight across epoch boundaries (the trial loop's; torch is imported on first use).

    Every step sees exactly B samples, and a budget of e epochs is e x n samples at every batch size
    (to the nearest step). Dropping each epoch's ragged tail instead would cut the largest batches'
    budgets, warmups and evaluation intervals (n = 19,200 at B = 2048: 9 steps an epoch, 4% fewer
    samples, and a 0.5-epoch warmup 15% short), just where a scaling study compares them. Each
    permutation is a pure function of (seed, epoch), so a resumed trial needs no RNG state.
    """

    def __init__(self, n: int, seed: int, device: Any):
        self.n, self.seed, self.device = n, seed, device
        self._perms: dict[int, Any] = {}

    def _perm(self, epoch: int) -> Any:
        if epoch not in self._perms:
            import torch

            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}  # at most two are live
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms[epoch] = torch.randperm(self.n, generator=g).to(self.device)
        return self._perms[epoch]

    def batch(self, step: int, B: int) -> Any:
        """Return the indices of step `step`'s batch of B (B <= n): samples step*B .. step*B + B - 1."""
        epoch, off = divmod(step * B, self.n)
        perm = self._perm(epoch)
        if off + B <= self.n:
            return perm[off:off + B]
        import torch

        return torch.cat((perm[off:], self._perm(epoch + 1)[:off + B - self.n]))


def _is_vision(cfg: Any) -> bool:
    """Return True for a dataset read from files (its test set is the validation split), False for a
    generated one; raise ConfigError naming data.name when the name is unknown."""
    if cfg.name not in DATASETS:
        raise ConfigError("data.name", cfg.name, f"unknown; choose one of {', '.join(DATASETS)}")
    return cfg.name in ("mnist", "fashion_mnist", "cifar10")


def _n_val(n: int, cfg: Any) -> int:
    """Return the validation share of n generated samples (the rounding validation.validate assumes)."""
    return int(round(n * cfg.val_fraction))


def count_train(cfg: Any) -> int:
    """Make the dataset ready for trials and return its training-set size, without torch.

    A study's driver calls this once per dataset: mnist1d is generated into its cache here (the
    trials only read it) and a vision dataset's files are read, so a missing one fails before
    any trial starts. The driver never needs torch itself (~2-3 s of a 2-core study's start).
    """
    if _is_vision(cfg):
        n = len(_read_vision(cfg)[1])
    else:
        n_all = int(cfg.n_samples) if cfg.name == "synthetic" else len(_generate(cfg)[1])  # synthetic: torch RNG
        n = n_all - _n_val(n_all, cfg)
    return n if cfg.max_train_samples is None else min(n, int(cfg.max_train_samples))


# --------------------------------------------------------------------------- generated datasets


def _generate(cfg: Any) -> tuple[np.ndarray, np.ndarray, int]:
    """Return (x, y, num_classes) of a generated dataset, before the split."""
    if cfg.name == "digits":
        from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

        d = load_digits()
        return d.data.astype(np.float32), d.target.astype(np.int64), 10
    if cfg.name == "synthetic":
        x, y = _teacher_student(cfg.n_samples, cfg.n_features, cfg.n_classes, cfg.noise, cfg.seed)
        return x, y, cfg.n_classes
    x, y = _cached_mnist1d(cfg.n_samples, cfg.seed, os.path.expanduser(cfg.cache_dir))
    return x, y, 10


def _teacher_student(n: int, n_features: int, n_classes: int, noise: float, seed: int,
                     hidden: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Return Gaussian inputs and labels = argmax(teacher logits + N(0, noise^2) noise).

    The teacher is a fixed random tanh MLP, drawn first so it is the same for every n, and
    scaled so its logits have unit variance in expectation: `noise` is in units of logit std.
    """
    import torch

    g = torch.Generator().manual_seed(seed)  # local generator: the global RNG stays untouched
    w1 = torch.randn(n_features, hidden, generator=g)
    w2 = torch.randn(hidden, n_classes, generator=g)
    x = torch.randn(n, n_features, generator=g)
    # E[tanh(z)^2] = 0.394 for z ~ N(0, 1): a fixed scale, unlike logits.std(), which varies with n.
    logits = torch.tanh(x @ w1 / n_features**0.5) @ w2 / (0.394 * hidden) ** 0.5
    y = (logits + noise * torch.randn(n, n_classes, generator=g)).argmax(1)
    return x.numpy(), y.numpy()


def _mnist1d_cache_path(n_samples: int, seed: int, cache_dir: str) -> str:
    from importlib.metadata import version

    # The package version stands for its default arguments; reading it does not import mnist1d.
    key = {"name": "mnist1d", "n_samples": n_samples, "seed": seed, "format": CACHE_FORMAT,
           "mnist1d": version("mnist1d")}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return os.path.join(cache_dir, f"mnist1d-{digest}.npz")


def _cached_mnist1d(n_samples: int, seed: int, cache_dir: str) -> tuple[np.ndarray, np.ndarray]:
    """Return mnist1d's (x, y), read from the cache or generated and written there atomically."""
    path = _mnist1d_cache_path(n_samples, seed, cache_dir)
    try:
        with np.load(path) as f:
            return f["x"], f["y"]
    except (OSError, ValueError, KeyError):  # missing, or unreadable: regenerate below
        pass
    x, y = _generate_mnist1d(n_samples, seed)
    # Concurrent trials may generate at once: each writes its own temp file, and os.replace
    # swaps it in atomically, so a reader sees either no file or a complete one.
    with interrupts.deferred():  # a Ctrl-C as a study starts waits for the file, or its removal
        fd, tmp = _temp_in_cache(cache_dir)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, x=x, y=y)
            os.chmod(tmp, 0o644)  # mkstemp makes it 0600; a shared cache should be readable by all
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    return x, y


def _temp_in_cache(cache_dir: str, shown: Optional[str] = None) -> tuple[int, str]:
    """Make cache_dir and a temp file in it; return (fd, path), or raise ConfigError naming
    data.cache_dir (as `shown`, the value given) when no file can be written there."""
    try:
        os.makedirs(cache_dir, exist_ok=True)
        return tempfile.mkstemp(dir=cache_dir, prefix=".mnist1d-", suffix=".tmp")
    except OSError as exc:
        raise ConfigError("data.cache_dir", shown or cache_dir,
                          f"cannot hold the generated dataset ({exc.strerror})") from None


def _generate_mnist1d(n_samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Return n_samples float32 mnist1d signals (n, 40) and int64 labels, generated offline."""
    from mnist1d.data import get_dataset_args, make_dataset  # imports matplotlib: only on a cache miss

    args = get_dataset_args()  # the package's defaults; `url` is unused as we never download
    # make_dataset draws num_samples // 10 per class: ask for enough, keep the first n_samples.
    args.num_samples, args.seed, args.train_split = -(-n_samples // 10) * 10, seed, 1.0
    # make_dataset reseeds the global numpy and `random` RNGs; restore them afterwards.
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        d = make_dataset(args)  # templates are built in-package; nothing downloaded
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    x = np.concatenate([d["x"], d["x_test"]])[:n_samples].astype(np.float32)
    y = np.concatenate([d["y"], d["y_test"]])[:n_samples].astype(np.int64)
    return x, y


# --------------------------------------------------------------------------- torchvision's on-disk format
# torchvision cannot be installed beside every torch build, so these readers parse its files directly.

_VISION_DIRS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}


def _read_vision(cfg: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return uint8 (x_train, y_train, x_test, y_test) images as (N, C, H, W) from cfg.root."""
    if cfg.download:
        _download(cfg.name, os.path.expanduser(cfg.root))
    files = _vision_files(cfg)
    if cfg.name == "cifar10":
        x_tr, y_tr = zip(*(_read_cifar_batch(f) for f in files[:-1]))
        return (np.concatenate(x_tr), np.concatenate(y_tr), *_read_cifar_batch(files[-1]))
    x_tr, y_tr, x_te, y_te = (_read_idx(f) for f in files)
    return x_tr[:, None], y_tr, x_te[:, None], y_te


def _vision_files(cfg: Any) -> list[str]:
    """Return the dataset's files in cfg.root (cifar10: 5 training batches, then the test batch;
    mnist-like: train images, train labels, test images, test labels); ConfigError if one is missing."""
    root = os.path.expanduser(cfg.root)
    if cfg.name == "cifar10":
        folder = os.path.join(root, "cifar-10-batches-py")
        files = [os.path.join(folder, f"data_batch_{i}") for i in range(1, 6)] + [os.path.join(folder, "test_batch")]
        if not all(os.path.exists(f) for f in files):
            _missing(cfg, files[0])
        return files
    folder = os.path.join(root, _VISION_DIRS[cfg.name], "raw")
    files = []
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        path = os.path.join(folder, stem)
        path = path if os.path.exists(path) else path + ".gz"
        if not os.path.exists(path):
            _missing(cfg, os.path.join(folder, stem))
        files.append(path)
    return files


def check_sources(cfg: Any) -> None:
    """Raise ConfigError when the dataset can be neither read nor generated: a file dataset's files
    are not in data.root (and data.download is off), or mnist1d is not in its cache yet and
    data.cache_dir cannot be written. Cheap (nothing is read, no torch): the command line checks
    it before Hydra's output folder or the MLflow store exists."""
    if _is_vision(cfg):
        if not cfg.download:
            _vision_files(cfg)
        return
    if cfg.name != "mnist1d":
        return
    cache_dir = os.path.expanduser(cfg.cache_dir)
    if os.path.exists(_mnist1d_cache_path(cfg.n_samples, cfg.seed, cache_dir)):
        return
    with interrupts.deferred():
        fd, tmp = _temp_in_cache(cache_dir, cfg.cache_dir)
        os.close(fd)
        os.unlink(tmp)


def _missing(cfg: Any, expected: str) -> None:
    """Raise the ConfigError for dataset files that are not in cfg.root."""
    raise ConfigError("data.root", cfg.root, f"no {cfg.name} files found in torchvision's format "
                      f"(expected {expected}); set data.download=true or point data.root at them")


def _download(name: str, root: str) -> None:
    """Download `name` into root with torchvision (imported only here: it is optional)."""
    try:
        import torchvision.datasets as tvd
    except ImportError as e:
        raise ConfigError("data.download", True, "needs torchvision, which is not importable "
                          f"({e}); install it, or put the files into data.root yourself") from None
    cls = {"mnist": tvd.MNIST, "fashion_mnist": tvd.FashionMNIST, "cifar10": tvd.CIFAR10}[name]
    for train in (True, False):
        cls(root, train=train, download=True)


def _read_idx(path: str) -> np.ndarray:
    """Return the uint8 array of an idx file (optionally gzipped): zero bytes, type, ndim, dims, data."""
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        raw = f.read()
    zeros, dtype, ndim = struct.unpack(">HBB", raw[:4])
    if zeros != 0 or dtype != 0x08:
        raise ValueError(f"{path}: not a uint8 idx file")
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    # bytearray: a writable buffer, which torch.from_numpy needs
    return np.frombuffer(bytearray(raw), np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _read_cifar_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Return (uint8 (N, 3, 32, 32) images, int64 labels) of one CIFAR-10 python pickle."""
    with open(path, "rb") as f:
        d = pickle.load(f, encoding="bytes")
    return np.asarray(d[b"data"], np.uint8).reshape(-1, 3, 32, 32), np.asarray(d[b"labels"], np.int64)


def _channel_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return per-channel (mean, std) of uint8 images, exact, from 256-bin histograms.

    Histograms avoid a float64 copy of the training set (1.2 GB for CIFAR-10).
    """
    values = np.arange(256, dtype=np.float64)
    mean, std = [], []
    for c in range(x.shape[1]):
        p = np.bincount(x[:, c].ravel(), minlength=256) / x[:, c].size
        m = (p * values).sum()
        mean.append(m)
        std.append(np.sqrt((p * (values - m) ** 2).sum()))
    return np.array(mean), np.array(std)
