"""The LR range test: a known answer (the 2/L stability limit), torch-lr-finder, fastai's suggestions,
the config-driven test and scaling.ref_lr=auto / schedule.from_lr_find (the console scripts: test_lr_find_cli.py)."""
from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from scaling.config import ConfigError, effective_lr
from scaling.lr_finder import (RangeTestResult, lr_range_test, lr_schedule, range_test, resolve_ref_lr, suggest,
                               trial_ref_lr)
from scaling.validation import validate

# --------------------------------------------------------------------------- a known answer: 2/L
# Least squares f(w) = (1/n)|Xw - y|^2 (F.mse_loss) has the constant Hessian H = (2/n) X^T X, so
# L = lambda_max(H) = 2 lambda_max(X^T X / n). Gradient descent moves the error along H's top
# eigenvector by (1 - lr L) per step: it diverges iff lr > 2/L. Heavy-ball momentum beta solves
# z^2 - (1 + beta - lr L) z + beta = 0 there, stable iff lr < 2 (1 + beta) / L. Mini-batch SGD's
# mean iterate follows the same recursion (its second moment adds a correction of order
# tr(H) / (batch L), small here: d = 10, batch 256).


def least_squares(n: int = 8192, d: int = 10, seed: int = 0, noise: float = 0.5):
    """Return (X, y, L) of an ill-conditioned least-squares problem (feature scales 1..10)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.logspace(0, 1, d, dtype=torch.float64)
    y = X @ torch.randn(d, 1, generator=g, dtype=torch.float64) + noise * torch.randn(n, 1, generator=g,
                                                                                     dtype=torch.float64)
    L = 2 * torch.linalg.eigvalsh(X.T @ X / n).max().item()
    return X, y, L


def minibatches(X, y, batch_size: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(y), generator=g)
        for i in range(len(y) // batch_size):
            idx = order[i * batch_size:(i + 1) * batch_size]
            yield X[idx], y[idx]


def linear_model(d: int) -> torch.nn.Module:
    model = torch.nn.Linear(d, 1, bias=False).to(torch.float64)
    torch.nn.init.zeros_(model.weight)
    return model


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("mode, start, end, iters", [("exp", 1e-3, 1e2, 200), ("linear", 1e-2, 4.0, 100)])
@pytest.mark.parametrize("seed", [0, 1])
def test_divergence_point_is_the_stability_limit(momentum, mode, start, end, iters, seed):
    X, y, L = least_squares(seed=seed)
    limit = 2 * (1 + momentum) / L
    model = linear_model(X.shape[1])
    opt = torch.optim.SGD(model.parameters(), lr=1.0, momentum=momentum)
    r = lr_range_test(model, F.mse_loss, minibatches(X, y, 256, seed), opt, start * limit, end * limit, iters, mode,
                      smooth=0.05, diverge_factor=4.0)
    assert r.stopped_early and r.stop_lr is not None
    # The test stops a few iterations after the instability sets in (the unstable mode must grow
    # and the EMA must follow): measured 1.1-2.0 x the limit for these settings.
    assert 1.0 <= r.stop_lr / limit <= 2.5, r.stop_lr / limit
    # fastai's suggestions all lie below the divergence point
    assert all(v < r.stop_lr for v in r.suggestions.values())


def test_full_batch_gradient_descent_never_stops_below_2_over_L():
    # With the full batch every step contracts every mode while lr < 2/L, so the loss cannot rise
    # before: a strict lower bound (the overshoot above it is the unstable mode's regrowth).
    X, y, L = least_squares(n=512, noise=0.1)
    model = linear_model(X.shape[1])
    opt = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.0)
    r = lr_range_test(model, F.mse_loss, [(X, y)], opt, 1e-3 * 2 / L, 1e3 * 2 / L, 400, "exp")
    assert r.stopped_early and 1.0 <= r.stop_lr / (2 / L) <= 5.0


def test_lr_schedule_hits_both_ends():
    exp = lr_schedule(1e-4, 1.0, 5, "exp")
    np.testing.assert_allclose(exp, [1e-4, 1e-3, 1e-2, 1e-1, 1.0], rtol=1e-12)
    np.testing.assert_allclose(lr_schedule(0.1, 0.5, 5, "linear"), [0.1, 0.2, 0.3, 0.4, 0.5], rtol=1e-12)


# --------------------------------------------------------------------------- torch-lr-finder


def _classification(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2048, 20, generator=g)
    y = (x[:, :5].sum(1) > 0).long() + 2 * (x[:, 5] > 0).long()
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    return x, y, model


@pytest.mark.parametrize("mode", ["exp", "linear"])
def test_agrees_with_torch_lr_finder(mode):
    pytest.importorskip("torch_lr_finder")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torch.utils.data import DataLoader, TensorDataset
    from torch_lr_finder import LRFinder

    x, y, model = _classification()
    ours_model, theirs_model = copy.deepcopy(model), copy.deepcopy(model)
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=False)  # same batches, same order
    start, end = (1e-5, 10.0) if mode == "exp" else (1e-3, 3.0)
    ours = lr_range_test(ours_model, F.cross_entropy, loader,
                         torch.optim.SGD(ours_model.parameters(), lr=start, momentum=0.9),
                         start, end, 100, mode, smooth=0.05, diverge_factor=5.0)
    finder = LRFinder(theirs_model, torch.optim.SGD(theirs_model.parameters(), lr=start, momentum=0.9),
                      torch.nn.CrossEntropyLoss(), device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        finder.range_test(loader, start_lr=start, end_lr=end, num_iter=100, step_mode=mode, smooth_f=0.05,
                          diverge_th=5)
    theirs_lr, theirs_loss = finder.history["lr"], finder.history["loss"]
    n = min(len(ours.lrs), len(theirs_lr))
    assert n >= 30
    np.testing.assert_allclose(ours.lrs[:n], theirs_lr[:n], rtol=1e-12)
    np.testing.assert_allclose(ours.smoothed[:n], theirs_loss[:n], rtol=1e-5)
    assert len(ours.lrs) == len(theirs_lr)  # both stop at the same iteration
    fig, ax = plt.subplots()
    _, theirs_steep = finder.plot(skip_start=10, skip_end=5, ax=ax, suggest_lr=True)
    plt.close(fig)
    assert 0.5 <= ours.steep / theirs_steep <= 2.0, (ours.steep, theirs_steep)


# --------------------------------------------------------------------------- fastai's suggestions


def fastai_valley(lrs, losses):
    """fastai.callback.schedule.valley, verbatim but for the numpy types."""
    n = len(losses)
    max_start, max_end = 0, 0
    lds = [1] * n
    for i in range(1, n):
        for j in range(0, i):
            if (losses[i] < losses[j]) and (lds[i] < lds[j] + 1):
                lds[i] = lds[j] + 1
            if lds[max_end] < lds[i]:
                max_end = i
                max_start = max_end - lds[max_end]
    sections = (max_end - max_start) / 3
    idx = max_start + int(sections) + int(sections / 2)
    return float(lrs[idx])


def fastai_steep(lrs, losses):
    grads = (losses[1:] - losses[:-1]) / (np.log(lrs[1:]) - np.log(lrs[:-1]))
    return float(lrs[grads.argmin()])


@pytest.mark.parametrize("seed", range(6))
def test_suggestions_match_fastai(seed):
    rng = np.random.default_rng(seed)
    n = 100
    lrs = lr_schedule(1e-6, 10.0, n, "exp")
    x = np.log10(lrs)
    losses = 2.3 - 1.5 / (1 + np.exp(-3 * (x + 2 + rng.normal()))) + 0.3 * np.maximum(0, x) ** 2 \
        + 0.02 * rng.standard_normal(n)
    found = suggest(list(lrs), list(losses), n)
    trimmed_lrs, trimmed = lrs[n // 10:-5], losses[n // 10:-5]  # fastai: [num_it//10 : -5]
    assert found["valley"] == fastai_valley(trimmed_lrs, trimmed)
    assert found["steep"] == fastai_steep(trimmed_lrs, trimmed)
    assert found["minimum/10"] == pytest.approx(trimmed_lrs[trimmed.argmin()] / 10)


def test_a_curve_too_short_has_no_suggestion():
    found = suggest([1e-6], [2.0], 100)
    assert all(np.isnan(v) for v in found.values())
    r = RangeTestResult([1e-6], [2.0], [2.0], *found.values(), stopped_early=True, num_iters=100, batch_size=8)
    assert np.isnan(r.lr)


def test_non_finite_loss_stops_before_its_step():
    model = linear_model(3)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    nan_at = 15

    def loss_fn(out, target, calls=[0]):  # noqa: B006 - a call counter
        calls[0] += 1
        loss = F.mse_loss(out, target)
        return loss * float("nan") if calls[0] > nan_at else loss

    X = torch.randn(64, 3, dtype=torch.float64)
    r = lr_range_test(model, loss_fn, [(X, X.sum(1, keepdim=True))], opt, 1e-4, 1e-2, 40)
    assert r.stopped_early and len(r.lrs) == nan_at + 1 and np.isinf(r.smoothed[-1])
    assert all(np.isfinite(r.suggestions[k]) for k in r.suggestions)


# --------------------------------------------------------------------------- from a trial config


@pytest.fixture
def lf_tiny(tiny):
    return [*tiny, "lr_find.num_iters=40"]


def test_range_test_from_config_is_fresh_and_reproducible(compose_cfg, lf_tiny, tiny_data):
    cfg = compose_cfg(*lf_tiny)
    a, b = range_test(cfg, tiny_data, 64), range_test(cfg, tiny_data, 64)
    assert a.lrs == b.lrs and a.losses == b.losses  # a fresh seeded model each time: nothing carries over
    assert a.batch_size == 64 and a.num_iters == 40 and len(a.lrs) <= 40
    assert a.lrs[0] == pytest.approx(cfg.lr_find.start_lr)
    assert a.suggestion == "valley" and a.lr == a.valley
    assert all(cfg.lr_find.start_lr <= v <= cfg.lr_find.end_lr for v in a.suggestions.values())
    c = range_test(compose_cfg(*lf_tiny, "lr_find.suggestion=minimum/10"), tiny_data, 64)
    assert c.lr == c.minimum_div10 and c.lrs == a.lrs


def test_smiths_validation_variant(compose_cfg, lf_tiny, tiny_data):
    r = range_test(compose_cfg(*lf_tiny, "lr_find.val_every=10", "lr_find.end_lr=0.1"), tiny_data, 32)
    assert sorted(r.val_losses) == [i for i in (9, 19, 29, 39) if i < len(r.lrs)]
    assert all(np.isfinite(v) for v in r.val_losses.values())


def test_resolve_ref_lr_runs_at_the_reference_batch_size(compose_cfg, lf_tiny, tiny_data):
    cfg = compose_cfg(*lf_tiny, "scaling.ref_lr=auto", "scaling.ref_batch_size=64")
    lr, details = resolve_ref_lr(cfg, tiny_data)
    assert lr == range_test(cfg, tiny_data, 64).lr
    assert details["lr_find.batch_size"] == 64 and details["lr_find.lr"] == lr
    assert {"lr_find.valley", "lr_find.steep", "lr_find.minimum_div10", "lr_find.suggestion"} <= set(details)
    ref, found = trial_ref_lr(cfg, tiny_data)
    assert ref == lr and found["lr_find.ref_lr"] == lr
    assert effective_lr(cfg, ref) == pytest.approx(lr * 32 / 64)  # batch_size=32, linear rule


def test_from_lr_find_sets_the_peak_lr_at_the_trials_batch_size(compose_cfg, lf_tiny, tiny_data):
    cfg = compose_cfg(*lf_tiny, "schedule=onecycle", "schedule.from_lr_find=true", "scaling.rule=sqrt",
                      "lr_multiplier=2", "batch_size=256")
    ref, found = trial_ref_lr(cfg, tiny_data)
    peak = range_test(cfg, tiny_data, 256).lr
    assert found["lr_find.batch_size"] == 256
    assert effective_lr(cfg, ref) == pytest.approx(2 * peak)  # max_lr = suggestion x lr_multiplier


def test_no_range_test_when_not_asked(compose_cfg, tiny):
    assert trial_ref_lr(compose_cfg(*tiny)) == (None, {})
    assert trial_ref_lr(compose_cfg(*tiny), ref_lr=0.3) == (0.3, {})


def test_run_trial_with_the_found_ref_lr(compose_cfg, lf_tiny, tiny_data):
    from scaling.train import run_trial

    cfg = compose_cfg(*lf_tiny, "scaling.ref_lr=auto")
    ref, _ = trial_ref_lr(cfg, tiny_data)
    result = run_trial(cfg, dataset=tiny_data, ref_lr=ref)
    assert result.status == "completed" and result.info["lr"] == pytest.approx(effective_lr(cfg, ref))


@pytest.mark.parametrize("overrides, key", [
    (["lr_find.start_lr=1", "lr_find.end_lr=0.5"], "lr_find.start_lr"),
    (["lr_find.start_lr=0"], "lr_find.start_lr"),
    (["lr_find.end_lr=-1"], "lr_find.end_lr"),
    (["lr_find.num_iters=5"], "lr_find.num_iters"),
    (["lr_find.smooth=0.01", "lr_find.num_iters=50"], "lr_find.num_iters"),
    (["lr_find.smooth=1.5"], "lr_find.smooth"),
    (["lr_find.mode=cubic"], "lr_find.mode"),
    (["lr_find.diverge_factor=1"], "lr_find.diverge_factor"),
    (["lr_find.suggestion=best"], "lr_find.suggestion"),
    (["lr_find.val_every=0"], "lr_find.val_every"),
    (["lr_find.batch_sizes=[32,100000]"], "lr_find.batch_sizes"),
    (["lr_find.batch_sizes=[32,32]"], "lr_find.batch_sizes"),
    (["lr_find.batch_sizes=[]"], "lr_find.batch_sizes"),
    (["scaling.ref_lr=auto", "scaling.ref_batch_size=100000"], "scaling.ref_batch_size"),
    (["schedule.from_lr_find=true"], "schedule.from_lr_find"),
    (["schedule=onecycle", "schedule.from_lr_find=true", "lr=0.1"], "lr"),
])
def test_bad_lr_find_config_names_the_key(compose_cfg, overrides, key):
    with pytest.raises(ConfigError) as e:
        validate(compose_cfg(*overrides))
    assert e.value.key == key and "\n" not in str(e.value)


def test_a_test_that_diverges_at_once_is_a_config_error(compose_cfg, lf_tiny, tiny_data):
    cfg = compose_cfg(*lf_tiny, "scaling.ref_lr=auto", "lr_find.start_lr=1e5", "lr_find.end_lr=1e9")
    with pytest.raises(ConfigError) as e:
        resolve_ref_lr(cfg, tiny_data)
    assert e.value.key == "scaling.ref_lr" and "lr_find.start_lr" in str(e.value)
