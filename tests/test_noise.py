"""Tests for scaling.noise: unbiased |G|^2 and tr(Sigma), B_simple convergence, MicroGradNorms."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from scaling.noise import MicroGradNorms, NoiseScale

D, SIGMA, B_MICRO, N_MICRO = 100, 0.5, 8, 4
G = np.full(D, 0.1)
G2_TRUE, TR_TRUE = float(G @ G), D * SIGMA ** 2  # 1.0 and 25.0: B_simple = 25


def _step_norms(rng: np.random.Generator, trials: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (mean_k |g_micro_k|^2, |mean_k g_micro_k|^2) for `trials` independent steps.

    Per-sample gradients are G + N(0, SIGMA^2 I); a micro-batch mean of B_MICRO of them is
    G + N(0, SIGMA^2 / B_MICRO I), which is sampled directly.
    """
    micro = G + SIGMA / math.sqrt(B_MICRO) * rng.standard_normal((trials, N_MICRO, D))
    return (micro ** 2).sum(-1).mean(-1), (micro.mean(1) ** 2).sum(-1)


def test_single_step_estimates_are_unbiased() -> None:
    small, big = _step_norms(np.random.default_rng(0), 20000)
    g2, tr = [], []
    for s, b in zip(small, big):
        ns = NoiseScale(ema=0.0)  # no smoothing: the property is this step's estimate
        ns.update(float(s), float(b), B_MICRO, B_MICRO * N_MICRO)
        g2.append(ns.g2)
        tr.append(ns.trace_sigma)
    for est, truth in ((np.array(g2), G2_TRUE), (np.array(tr), TR_TRUE)):
        se = est.std() / math.sqrt(est.size)
        assert abs(est.mean() - truth) < 4 * se, (est.mean(), truth, se)
    # The naive |g_big|^2 is biased upward by tr(Sigma)/B_big: the correction matters here.
    assert big.mean() - G2_TRUE > 20 * big.std() / math.sqrt(big.size)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_b_simple_converges(seed: int) -> None:
    small, big = _step_norms(np.random.default_rng(seed), 3000)
    ns = NoiseScale(ema=0.995)
    for s, b in zip(small, big):
        ns.update(float(s), float(b), B_MICRO, B_MICRO * N_MICRO)
    assert ns.b_simple == pytest.approx(TR_TRUE / G2_TRUE, rel=0.05)


def test_bias_correction_and_none() -> None:
    ns = NoiseScale(ema=0.9)
    assert ns.b_simple is None and ns.g2 is None
    ns.update(3.0, 1.5, 8, 32)
    g2 = (32 * 1.5 - 8 * 3.0) / 24
    tr = (3.0 - 1.5) / (1 / 8 - 1 / 32)
    assert ns.g2 == pytest.approx(g2)  # not 0.1 * g2: the first value is not pulled toward 0
    assert ns.trace_sigma == pytest.approx(tr)
    assert ns.b_simple == pytest.approx(tr / g2)
    ns2 = NoiseScale(ema=0.9)
    ns2.update(3.0, 0.5, 8, 32)  # |G|^2 estimate negative: noise dominates, no B_simple
    assert ns2.g2 < 0 and ns2.b_simple is None


def test_non_finite_norms_are_skipped() -> None:
    ns = NoiseScale(ema=0.9)
    ns.update(3.0, 1.5, 8, 32)
    before = ns.b_simple
    ns.update(float("inf"), 1.5, 8, 32)  # an fp16 overflow step
    ns.update(3.0, float("nan"), 8, 32)
    assert ns.b_simple == before and ns.steps == 1 and ns.skipped == 2


def test_state_dict_round_trip() -> None:
    a = NoiseScale(ema=0.8)
    a.update(3.0, 1.5, 8, 32)
    b = NoiseScale()
    b.load_state_dict(a.state_dict())
    for ns in (a, b):
        ns.update(2.5, 1.2, 8, 32)
    assert b.ema == 0.8 and b.steps == 2 and b.b_simple == a.b_simple


@pytest.mark.parametrize("args,msg", [
    ((1.0, 0.5, 8, 8), "b_big > b_small"),
    ((1.0, 0.5, 0, 8), "b_big > b_small"),
])
def test_update_errors(args, msg) -> None:
    with pytest.raises(ValueError, match=msg):
        NoiseScale().update(*args)
    with pytest.raises(ValueError, match="ema"):
        NoiseScale(ema=1.0)


def _linear_problem(seed: int, n: int, d: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    noise = 0.5 * torch.randn(n, generator=gen, dtype=torch.float64)
    y = x @ torch.randn(d, generator=gen, dtype=torch.float64) + noise
    w = torch.nn.Parameter(0.1 * torch.randn(d, generator=gen, dtype=torch.float64))
    bias = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))
    unused = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))  # never gets a .grad
    return x, y, [w, unused, bias]


def _per_sample_grads(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Return exact per-sample gradients of 0.5 (x.w + b - y)^2 w.r.t. (w, b), shape (n, d + 1)."""
    r = (x @ w + bias - y).detach()
    return torch.cat([r[:, None] * x, r[:, None]], dim=1)


@pytest.mark.parametrize("mean_of_micro", [True, False])
def test_micro_grad_norms_match_exact_per_sample_gradients(mean_of_micro: bool) -> None:
    x, y, params = _linear_problem(0, 48, 5)
    w, _, bias = params
    norms, opt, n_micro = MicroGradNorms(mean_of_micro), torch.optim.SGD(params, lr=0.05), 4
    for _ in range(3):  # several steps: buffers must reset between them
        opt.zero_grad()
        norms.begin_step(params)
        for xb, yb in zip(x.chunk(n_micro), y.chunk(n_micro)):
            loss = 0.5 * ((xb @ w + bias - yb) ** 2).mean()
            (loss / n_micro if mean_of_micro else loss).backward()
            norms.after_micro_backward(params)
        small, big = norms.end_step(params, loss_scale=2.0)
        micro = _per_sample_grads(x, y, w, bias).reshape(n_micro, -1, 6).mean(1)
        want_small = float((micro ** 2).sum(1).mean()) / 4.0
        want_big = float((micro.mean(0) ** 2).sum()) / 4.0
        assert small == pytest.approx(want_small, rel=1e-5)
        assert big == pytest.approx(want_big, rel=1e-5)
        opt.step()


def test_micro_grad_norms_feed_noise_scale() -> None:
    """B_simple of a fixed linear model, sampled with replacement, matches the population value."""
    x, y, params = _linear_problem(1, 4096, 10)
    w, _, bias = params
    per = _per_sample_grads(x, y, w, bias)
    truth = float(per.var(0, unbiased=False).sum() / (per.mean(0) ** 2).sum())
    gen, norms, ns, b_micro, n_micro = torch.Generator().manual_seed(2), MicroGradNorms(), NoiseScale(0.995), 8, 4
    for _ in range(1500):
        for p in params:
            p.grad = None
        norms.begin_step(params)
        for _ in range(n_micro):
            i = torch.randint(0, x.shape[0], (b_micro,), generator=gen)
            (0.5 * ((x[i] @ w + bias - y[i]) ** 2).mean() / n_micro).backward()
            norms.after_micro_backward(params)
        ns.update(*norms.end_step(params), b_micro, b_micro * n_micro)
    assert ns.b_simple == pytest.approx(truth, rel=0.1)


def test_micro_grad_norms_call_order() -> None:
    norms = MicroGradNorms()
    p = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(RuntimeError, match="begin_step"):
        norms.after_micro_backward([p])
    norms.begin_step([p])
    with pytest.raises(RuntimeError, match="end_step without"):
        norms.end_step([p])


def test_micro_grad_norms_fp16_gradients_do_not_overflow() -> None:
    """|g|^2 of an fp16 gradient beyond fp16's range (65504) is taken in float32."""
    p = torch.nn.Parameter(torch.zeros(10_000, dtype=torch.float16))
    norms = MicroGradNorms(mean_of_micro=False)
    norms.begin_step([p])
    for _ in range(2):
        (p * 1000).sum().backward()  # each element's gradient 1000: |g| = 1e5, |g|^2 = 1e10
        norms.after_micro_backward([p])
    small, big = norms.end_step([p])
    assert small == pytest.approx(1e10, rel=1e-3)
    assert big == pytest.approx(1e10, rel=1e-3)  # the sum (2000 each) over n = 2, squared


def _reference_norms(model: torch.nn.Module, params: list[torch.Tensor], xs: list[torch.Tensor],
                     ys: list[torch.Tensor]) -> tuple[float, float]:
    """Straightforward (small, big): each micro-batch gradient on its own, in float64."""
    micro = []
    for xb, yb in zip(xs, ys):
        loss = torch.nn.functional.cross_entropy(model(xb), yb)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        micro.append(torch.cat([(g if g is not None else torch.zeros_like(p)).double().flatten()
                                for g, p in zip(grads, params)]))
    micro = torch.stack(micro)
    return float((micro ** 2).sum(1).mean()), float((micro.mean(0) ** 2).sum())


@pytest.mark.parametrize("mixed_dtypes", [False, True])
def test_micro_grad_norms_b_simple_matches_reference_on_a_tiny_model(mixed_dtypes: bool) -> None:
    """The trial loop's use of MicroGradNorms gives the same B_simple as a per-micro-batch reference,
    and leaves the accumulated gradients exactly as plain accumulation does (an unused parameter's None)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    if mixed_dtypes:  # parameters of two dtypes (float32 and float64)
        model[2].double()
        model.insert(2, _ToDouble())
    unused = torch.nn.Parameter(torch.ones(2, 2))  # never gets a .grad
    params = list(model.parameters())
    params.insert(2, unused)
    x, y = torch.randn(96, 6), torch.randint(0, 3, (96,))
    n_micro, b_micro = 4, 8
    norms, ns, ref = MicroGradNorms(), NoiseScale(0.5), NoiseScale(0.5)
    opt = torch.optim.SGD(params, lr=0.1)
    for step in range(3):  # several steps: the buffers must carry nothing over
        idx = torch.arange(step * 32, (step + 1) * 32)
        xs, ys = list(x[idx].chunk(n_micro)), list(y[idx].chunk(n_micro))
        want_small, want_big = _reference_norms(model, params, xs, ys)
        opt.zero_grad(set_to_none=True)  # plain accumulation first, for the gradients it leaves
        for xb, yb in zip(xs, ys):
            (torch.nn.functional.cross_entropy(model(xb), yb) / n_micro).backward()
        plain = [None if p.grad is None else p.grad.clone() for p in params]
        opt.zero_grad(set_to_none=True)
        norms.begin_step(params)
        for xb, yb in zip(xs, ys):
            (torch.nn.functional.cross_entropy(model(xb), yb) / n_micro).backward()
            norms.after_micro_backward(params)
        small, big = norms.end_step(params)
        assert small == pytest.approx(want_small, rel=1e-5)
        assert big == pytest.approx(want_big, rel=1e-5)
        for p, g in zip(params, plain):  # after end_step, the gradients are plain accumulation's, bit for bit
            assert (p.grad is None and g is None) or torch.equal(p.grad, g)
        ns.update(small, big, b_micro, b_micro * n_micro)
        ref.update(want_small, want_big, b_micro, b_micro * n_micro)
        opt.step()
    assert ns.b_simple == pytest.approx(ref.b_simple, rel=1e-4)


class _ToDouble(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.double()


def test_micro_grad_norms_follow_parameters_that_join_late_and_steps_that_end_early() -> None:
    """A parameter first used by a later micro-batch is measured from then on, and a step left
    without end_step (a trial that diverged mid-step) leaves nothing in the next one."""
    torch.manual_seed(1)
    first, late = torch.nn.Linear(4, 3), torch.nn.Linear(3, 3)
    params = list(first.parameters()) + list(late.parameters())
    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))

    def loss_of(xb, yb, use_late):
        h = first(xb)
        return torch.nn.functional.cross_entropy(late(h) if use_late else h, yb)

    norms, n_micro = MicroGradNorms(), 4
    norms.begin_step(params)  # an abandoned step: two backwards, the second one unrecorded
    for xb, yb in list(zip(x[:16].chunk(n_micro), y[:16].chunk(n_micro)))[:2]:
        (loss_of(xb, yb, False) / n_micro).backward()
    norms.after_micro_backward(params)
    (loss_of(x[:4], y[:4], False) / n_micro).backward()
    for p in params:
        p.grad = None
    xs, ys = list(x[16:32].chunk(n_micro)), list(y[16:32].chunk(n_micro))
    uses = [False, True, False, True]  # `late` joins at the second micro-batch
    micro = []
    for xb, yb, use in zip(xs, ys, uses):
        grads = torch.autograd.grad(loss_of(xb, yb, use), params, allow_unused=True)
        micro.append(torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params)]))
    micro = torch.stack(micro).double()
    for p in params:  # plain accumulation, for the gradients it leaves
        p.grad = None
    for xb, yb, use in zip(xs, ys, uses):
        (loss_of(xb, yb, use) / n_micro).backward()
    plain = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    norms.begin_step(params)
    for xb, yb, use in zip(xs, ys, uses):
        (loss_of(xb, yb, use) / n_micro).backward()
        norms.after_micro_backward(params)
    small, big = norms.end_step(params)
    assert small == pytest.approx(float((micro ** 2).sum(1).mean()), rel=1e-5)
    assert big == pytest.approx(float((micro.mean(0) ** 2).sum()), rel=1e-5)
    for p, g in zip(params, plain):
        assert torch.equal(p.grad, g)


def test_b_simple_of_the_trial_loops_sampling_without_replacement_matches_the_population_value() -> None:
    """The trial loop reads each epoch's permutation (SampleStream): batches drawn without replacement
    from n. Near the least-squares optimum tr(Sigma) / |G|^2 is ~n / 4 here; the i.i.d. formulas
    would then read |G|^2 low by tr(Sigma) / (n - 1) and B_simple a third too high."""
    from scaling.data import SampleStream

    n, b_micro, n_micro = 1000, 25, 4
    x, y, params = _linear_problem(3, n, 4)
    w, _, bias = params
    with torch.no_grad():
        fit = torch.linalg.lstsq(torch.cat([x, torch.ones(n, 1, dtype=x.dtype)], 1), y[:, None]).solution[:, 0]
        w.copy_(fit[:-1] + 0.035)
        bias.copy_(fit[-1])
    per = _per_sample_grads(x, y, w, bias)
    truth = float(per.var(0, unbiased=False).sum() / (per.mean(0) ** 2).sum())
    stream, norms, steps, mean = SampleStream(n, 0, "cpu"), MicroGradNorms(), 4000, np.zeros(2)
    for step in range(steps):
        idx = stream.batch(step, b_micro * n_micro)
        for p in params:
            p.grad = None
        norms.begin_step(params)
        for i in idx.chunk(n_micro):
            (0.5 * ((x[i] @ w + bias - y[i]) ** 2).mean() / n_micro).backward()
            norms.after_micro_backward(params)
        mean += np.array(norms.end_step(params)) / steps
    ns, naive = NoiseScale(ema=0.0), NoiseScale(ema=0.0)  # one update with the mean norms: no EMA noise
    ns.update(*mean, b_micro, b_micro * n_micro, n=n)
    naive.update(*mean, b_micro, b_micro * n_micro)
    assert 200 < truth < 300
    assert ns.b_simple == pytest.approx(truth, rel=0.1)
    assert naive.b_simple > 1.2 * truth  # what the trial loop reported before it passed n
