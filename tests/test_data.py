"""scaling.data: shapes, splits, the mnist1d cache, RNG hygiene and torchvision-format readers."""
from __future__ import annotations

import os
import random
import socket
import sys

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from fake_vision import write_fake_cifar10, write_fake_mnist
from scaling import data as data_mod
from scaling.config import ConfigError, DataConfig
from scaling.data import Dataset, load_dataset

GENERATED = {"mnist1d": (40,), "digits": (64,), "synthetic": (12,)}


def make_cfg(tmp_path, **kw):
    kw.setdefault("n_samples", 600)
    kw.setdefault("n_features", 12)
    kw.setdefault("cache_dir", str(tmp_path / "cache"))
    kw.setdefault("root", str(tmp_path / "vision"))
    return OmegaConf.structured(DataConfig(**kw))


@pytest.fixture
def no_network(monkeypatch):
    """Make any attempt to open a connection fail loudly."""
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("name", GENERATED)
def test_generated_shapes_dtypes_and_standardisation(tmp_path, no_network, name):
    d = load_dataset(make_cfg(tmp_path, name=name, n_classes=5 if name == "synthetic" else 10))
    n_total = 1797 if name == "digits" else 600
    n_val = round(n_total * 0.2)
    assert isinstance(d, Dataset) and d.name == name
    assert d.input_shape == GENERATED[name]
    assert d.x_train.shape == (n_total - n_val, *d.input_shape) and d.x_val.shape == (n_val, *d.input_shape)
    assert d.x_train.dtype == d.x_val.dtype == torch.float32
    assert d.y_train.dtype == d.y_val.dtype == torch.int64
    assert d.n_train == n_total - n_val
    assert d.num_classes == (5 if name == "synthetic" else 10)
    assert set(d.y_train.tolist()) == set(range(d.num_classes))
    # Standardised on the training split: per-feature mean 0, std 1 (or 0 for constant pixels).
    assert d.x_train.mean(0).abs().max() < 1e-4
    std = d.x_train.std(0, unbiased=False)
    assert torch.all(((std - 1).abs() < 1e-3) | (std < 1e-6))
    assert torch.isfinite(d.x_val).all()


def test_mnist1d_exact_sample_count_when_not_a_multiple_of_ten(tmp_path):
    d = load_dataset(make_cfg(tmp_path, name="mnist1d", n_samples=605))
    assert d.n_train + len(d.y_val) == 605


@pytest.mark.parametrize("name", GENERATED)
def test_split_is_deterministic_and_seeded(tmp_path, name):
    a, b = (load_dataset(make_cfg(tmp_path / str(i), name=name, seed=3)) for i in range(2))
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_val, b.y_val)
    c = load_dataset(make_cfg(tmp_path, name=name, seed=4))
    assert not torch.equal(a.x_val, c.x_val)


def test_digits_split_is_a_partition(tmp_path):
    # digits' data do not depend on the seed, so the same rows must land in train or val.
    a, b = (load_dataset(make_cfg(tmp_path, name="digits", seed=s)) for s in (0, 1))
    assert not torch.equal(a.y_val, b.y_val)
    assert torch.equal(torch.bincount(torch.cat([a.y_train, a.y_val])), torch.bincount(torch.cat([b.y_train, b.y_val])))


def test_mnist1d_cache_is_written_once_and_reused(tmp_path, monkeypatch):
    cfg = make_cfg(tmp_path, name="mnist1d")
    first = load_dataset(cfg)
    files = os.listdir(cfg.cache_dir)
    assert len(files) == 1 and files[0].startswith("mnist1d-") and files[0].endswith(".npz")  # no temp file left

    def regenerate(*args):
        raise AssertionError("regenerated despite the cache")
    monkeypatch.setattr(data_mod, "_generate_mnist1d", regenerate)
    second = load_dataset(cfg)
    assert torch.equal(first.x_train, second.x_train) and torch.equal(first.y_val, second.y_val)
    # Other generation arguments are a different file, not a stale hit.
    with pytest.raises(AssertionError, match="regenerated"):
        load_dataset(make_cfg(tmp_path, name="mnist1d", n_samples=700))
    with pytest.raises(AssertionError, match="regenerated"):
        load_dataset(make_cfg(tmp_path, name="mnist1d", seed=1))


def test_mnist1d_unreadable_cache_is_regenerated(tmp_path):
    cfg = make_cfg(tmp_path, name="mnist1d")
    good = load_dataset(cfg)
    [name] = os.listdir(cfg.cache_dir)
    with open(os.path.join(cfg.cache_dir, name), "wb") as f:
        f.write(b"truncated")
    assert torch.equal(load_dataset(cfg).x_train, good.x_train)


@pytest.mark.parametrize("name", GENERATED)
def test_loading_leaves_global_rngs_alone(tmp_path, name):
    torch.manual_seed(123), np.random.seed(123), random.seed(123)
    states = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    load_dataset(make_cfg(tmp_path, name=name))  # mnist1d: a cache miss, so make_dataset runs
    assert torch.equal(torch.get_rng_state(), states[0])
    assert np.array_equal(np.random.get_state()[1], states[1])
    assert random.getstate() == states[2]


def test_synthetic_noise_free_labels_follow_the_teacher(tmp_path):
    clean = load_dataset(make_cfg(tmp_path, name="synthetic", noise=0.0))
    noisy = load_dataset(make_cfg(tmp_path, name="synthetic", noise=1.0))
    assert torch.equal(clean.x_train, noisy.x_train)  # same inputs, only the labels differ
    agree = (clean.y_train == noisy.y_train).float().mean()
    assert 0.2 < agree < 0.9


@pytest.mark.parametrize("kind,name,gz", [("MNIST", "mnist", False), ("FashionMNIST", "fashion_mnist", True)])
def test_mnist_format_round_trips(tmp_path, kind, name, gz):
    raw = write_fake_mnist(tmp_path / "vision", 20, 10, kind=kind, gz=gz)
    d = load_dataset(make_cfg(tmp_path, name=name))
    assert d.input_shape == (1, 28, 28) and d.num_classes == 10 and d.name == name
    assert d.x_train.shape == (20, 1, 28, 28) and d.x_val.shape == (10, 1, 28, 28)  # val = official test set
    assert d.x_train.dtype == torch.float32 and d.y_train.dtype == torch.int64
    assert d.y_train.tolist() == raw["y_train"].tolist() and d.y_val.tolist() == raw["y_test"].tolist()
    mean, std = raw["x_train"].mean(), raw["x_train"].std()
    assert np.allclose(d.x_train[:, 0].numpy() * std + mean, raw["x_train"], atol=1e-3)
    assert np.allclose(d.x_val[:, 0].numpy() * std + mean, raw["x_test"], atol=1e-3)


def test_cifar10_format_round_trips(tmp_path):
    raw = write_fake_cifar10(tmp_path / "vision", 23, 7)
    d = load_dataset(make_cfg(tmp_path, name="cifar10"))
    assert d.input_shape == (3, 32, 32) and d.x_train.shape == (23, 3, 32, 32) and d.x_val.shape == (7, 3, 32, 32)
    assert d.y_train.tolist() == raw["y_train"].tolist() and d.y_val.tolist() == raw["y_test"].tolist()
    mean = raw["x_train"].mean(axis=(0, 2, 3), keepdims=True)[0]
    std = raw["x_train"].std(axis=(0, 2, 3), keepdims=True)[0]
    assert np.allclose(d.x_train.numpy() * std + mean, raw["x_train"], atol=1e-3)
    assert np.allclose(d.x_val.numpy() * std + mean, raw["x_test"], atol=1e-3)
    assert d.x_train.mean(dim=(0, 2, 3)).abs().max() < 1e-4  # per-channel standardised


@pytest.mark.parametrize("name,expected", [("mnist", "train-images-idx3-ubyte"), ("fashion_mnist", "FashionMNIST"),
                                           ("cifar10", "data_batch_1")])
def test_missing_files_name_data_root(tmp_path, name, expected):
    with pytest.raises(ConfigError) as e:
        load_dataset(make_cfg(tmp_path, name=name))
    assert e.value.key == "data.root" and "data.root=" in str(e.value)
    assert expected in str(e.value) and "data.download=true" in str(e.value)


def test_download_without_torchvision_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # makes `import torchvision` fail
    with pytest.raises(ConfigError) as e:
        load_dataset(make_cfg(tmp_path, name="mnist", download=True))
    assert e.value.key == "data.download" and "torchvision" in str(e.value)


@pytest.mark.parametrize("name", ["digits", "mnist", "cifar10"])
def test_max_train_samples_truncates_train_only(tmp_path, name):
    write_fake_mnist(tmp_path / "vision", 20, 10)
    write_fake_cifar10(tmp_path / "vision", 20, 10)
    full = load_dataset(make_cfg(tmp_path, name=name))
    cut = load_dataset(make_cfg(tmp_path, name=name, max_train_samples=7))
    assert cut.n_train == 7 and torch.equal(cut.x_train, full.x_train[:7])  # same standardisation
    assert torch.equal(cut.x_val, full.x_val)


def test_to_moves_every_tensor_and_unknown_name_fails(tmp_path):
    d = load_dataset(make_cfg(tmp_path, name="digits")).to("meta")
    assert all(t.device.type == "meta" for t in (d.x_train, d.y_train, d.x_val, d.y_val))
    cfg = make_cfg(tmp_path)
    cfg.name = "imagenet"
    with pytest.raises(ConfigError, match="data.name"):
        load_dataset(cfg)


@pytest.mark.parametrize("name,kw", [("mnist1d", {}), ("mnist1d", {"max_train_samples": 100}), ("digits", {}),
                                     ("synthetic", {"val_fraction": 0.3}), ("cifar10", {}),
                                     ("cifar10", {"max_train_samples": 7})])
def test_count_train_is_load_datasets_size(tmp_path, name, kw):
    """The study's driver sizes the grid with count_train; the trials train on load_dataset's split."""
    if name == "cifar10":
        write_fake_cifar10(tmp_path / "vision", 23, 7)
    cfg = make_cfg(tmp_path, name=name, **kw)
    assert data_mod.count_train(cfg) == load_dataset(cfg).n_train
    if name != "cifar10":  # validation's own count, which checks batch_size before anything is read
        from scaling.data_fit import generated_n_train

        assert generated_n_train(cfg) == load_dataset(cfg).n_train


def test_count_train_needs_no_torch(tmp_path):
    """A study's driver prepares its data without importing torch (a few seconds of its start-up)."""
    import subprocess

    code = ("import sys; from omegaconf import OmegaConf; from scaling.config import DataConfig; "
            "from scaling.data import count_train; "
            f"cfg = OmegaConf.structured(DataConfig(name='mnist1d', n_samples=300, cache_dir={str(tmp_path)!r})); "
            "n = count_train(cfg); assert 'torch' not in sys.modules, 'torch imported'; print(n)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) == 300 - round(300 * DataConfig.val_fraction)
    assert list(tmp_path.glob("mnist1d-*.npz")), "the cache the trials read was not written"
