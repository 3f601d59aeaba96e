"""Gradient noise scale B_simple = tr(Sigma) / |G|^2 (McCandlish et al. 2018, Appendix A.1).

E|g_B|^2 = |G|^2 + tr(Sigma) / B for a batch-B mean gradient g_B of i.i.d. samples, so squared
norms measured at two batch sizes give unbiased estimates of |G|^2 and tr(Sigma) (see
NoiseScale.update). The trial loop draws its batches without replacement from n training samples
(a permutation per epoch), for which the variance term is tr(Sigma) (n - B) / (B (n - 1)): the
i.i.d. formulas would then underestimate |G|^2 by tr(Sigma) / (n - 1), i.e. inflate B_simple by
about B_simple / n (a third at B_simple = n / 4; no estimate at all once B_simple nears n).
In the trial loop "small" is each micro-batch gradient and "big" their mean over the step.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional

import torch


class NoiseScale:
    """Online B_simple from bias-corrected EMAs of the unbiased |G|^2 and tr(Sigma) estimates."""

    def __init__(self, ema: float = 0.95):
        if not 0.0 <= ema < 1.0:
            raise ValueError(f"ema must be in [0, 1), got {ema}")
        self.ema = ema
        self.steps = 0
        self.skipped = 0  # updates ignored for non-finite norms
        self._g2 = 0.0  # raw (biased toward 0) EMA of the |G|^2 estimates
        self._s = 0.0  # raw EMA of the tr(Sigma) estimates

    def update(self, small_sq_norm: float, big_sq_norm: float, b_small: int, b_big: int,
               n: Optional[int] = None) -> None:
        """Fold in one step: small_sq_norm = mean over micro-batches of |g_micro|^2 at b_small,
        big_sq_norm = |g_big|^2 of their mean at b_big (> b_small); n: the size of the set both
        were drawn from without replacement (the training set), None when drawn i.i.d.

        A non-finite norm (an fp16 overflow step that the GradScaler skips) is ignored rather
        than raised: it must not end the trial, nor poison the averages.
        """
        if not b_big > b_small > 0:
            raise ValueError(f"need b_big > b_small > 0, got b_small={b_small}, b_big={b_big}")
        if n is not None and n < b_big:
            raise ValueError(f"need n >= b_big, got n={n}, b_big={b_big}")
        if not (math.isfinite(small_sq_norm) and math.isfinite(big_sq_norm)):
            self.skipped += 1
            return
        w_small, w_big = _noise_weight(b_small, n), _noise_weight(b_big, n)
        s = (small_sq_norm - big_sq_norm) / (w_small - w_big)
        g2 = big_sq_norm - w_big * s
        self.steps += 1
        self._g2 = self.ema * self._g2 + (1.0 - self.ema) * g2
        self._s = self.ema * self._s + (1.0 - self.ema) * s

    def _corrected(self, raw: float) -> Optional[float]:
        """Return the Adam-style bias-corrected EMA, None before the first update."""
        return raw / (1.0 - self.ema ** self.steps) if self.steps else None

    @property
    def g2(self) -> Optional[float]:
        """Return the smoothed estimate of |G|^2 (None before the first update)."""
        return self._corrected(self._g2)

    @property
    def trace_sigma(self) -> Optional[float]:
        """Return the smoothed estimate of tr(Sigma) (None before the first update)."""
        return self._corrected(self._s)

    @property
    def b_simple(self) -> Optional[float]:
        """Return tr(Sigma)_ema / |G|^2_ema, None before the first update or when |G|^2_ema <= 0.

        A ratio of averages, not an average of per-step ratios: a single step's |G|^2
        estimate is noisy and can be near 0 or negative, so per-step ratios are heavy-tailed
        and biased (E[1/X] != 1/E[X]); averaging numerator and denominator first makes each
        nearly unbiased and their ratio consistent (McCandlish et al. A.1).
        """
        g2, s = self.g2, self.trace_sigma
        if g2 is None or s is None or g2 <= 0.0:
            return None
        return s / g2

    def state_dict(self) -> dict:
        """Return the state as plain floats/ints (for checkpoints)."""
        return {"ema": self.ema, "steps": self.steps, "skipped": self.skipped, "g2": self._g2, "s": self._s}

    def load_state_dict(self, state: dict) -> None:
        """Restore the state returned by state_dict()."""
        self.ema, self.steps = float(state["ema"]), int(state["steps"])
        self._g2, self._s = float(state["g2"]), float(state["s"])
        self.skipped = int(state.get("skipped", 0))


def _noise_weight(b: int, n: Optional[int]) -> float:
    """Return w with E|g_b|^2 = |G|^2 + w tr(Sigma) for a mean gradient of b samples: 1 / b when
    drawn i.i.d., (n - b) / (b (n - 1)) when drawn without replacement from n (finite population)."""
    return 1.0 / b if n is None else (n - b) / (b * (n - 1))


class MicroGradNorms:
    """Measure mean |g_micro|^2 and |g_big|^2 during gradient accumulation.

    Convention (the trial loop's): each micro-batch loss is a mean over its samples divided by
    n_micro before backward, so the accumulated gradient is the big-batch mean gradient g_big
    and a micro-batch gradient is g_micro = n_micro * (what its backward adds). With
    `mean_of_micro=False`, losses are not divided: the accumulation is the sum of micro-batch
    gradients, g_micro is each backward's part and g_big = the sum / n_micro.

    Usage per optimiser step, always with the same `params` list:
        optimizer.zero_grad(); norms.begin_step(params)
        for each micro-batch: (loss / n_micro).backward(); norms.after_micro_backward(params)
        small, big = norms.end_step(params)   # before clipping or optimizer.step()

    How: each parameter's .grad is a view of one flat scratch buffer per (device, dtype),
    zeroed before every backward, so autograd adds each micro-batch's gradient into zeros and
    the scratch holds that gradient alone. after_micro_backward takes its norm and adds it into
    a second flat buffer, the accumulation, in the order autograd would have (so the step's
    gradient is bit for bit plain accumulation's); end_step points each .grad at its view of
    the accumulation. Between begin_step and end_step, .grad is the scratch, not the
    accumulation. Per micro-step that is one norm, one add and one zero of a flat buffer: on a
    CPU, three ops whatever the number of parameters (a foreach op there is a loop of
    per-tensor ops), on memory that stays in cache from step to step, and no host sync;
    end_step syncs once. Norms are taken in float32 at least, so fp16 gradients cannot
    overflow them. With fp16 loss scaling pass scaler.get_scale() as loss_scale to get true
    norms (B_simple itself is a ratio, unchanged by a constant scale).

    A parameter gets a view once autograd has given it a gradient; one that never gets a
    gradient keeps .grad None. One that had a gradient in an earlier step and gets none in a
    later one gets zeros, as after zero_grad(set_to_none=False). Memory: the two flat buffers,
    in place of the gradients autograd would allocate.
    """

    def __init__(self, mean_of_micro: bool = True):
        self.mean_of_micro = mean_of_micro
        self._params: Optional[list[torch.Tensor]] = None  # the params the buffers were laid out for
        self._groups: list[_FlatGroup] = []
        self._scratch: list[torch.Tensor] = []  # per param: its view of its group's scratch buffer
        self._accum: list[torch.Tensor] = []  # per param: its view of its group's accumulation
        self._used: list[bool] = []  # per param: has had a gradient (its scratch view is installed)
        self._norms: list[torch.Tensor] = []  # |g| of each micro-step's backward (per group), 0-dim
        self._n_micro = 0
        self._clean = True  # the scratch buffers are all zero (else begin_step zeroes them)

    def begin_step(self, params: Iterable[torch.Tensor]) -> None:
        """Start an optimiser step (call after zero_grad, before the first backward): .grad of
        each parameter that has had a gradient becomes its zeroed scratch view."""
        params = params if isinstance(params, list) else list(params)
        if self._params is None or len(self._params) != len(params) or \
                any(a is not b for a, b in zip(self._params, params)):
            self._lay_out(params)  # once, reused every step
        if not self._clean:  # the last step had no end_step (e.g. a trial that diverged)
            for grp in self._groups:
                grp.scratch.zero_()
        self._point(params, self._scratch)
        self._norms, self._n_micro, self._clean = [], 0, False  # a backward may write there now

    def after_micro_backward(self, params: Iterable[torch.Tensor]) -> None:
        """Record |g| of the latest micro-batch backward and add it to the accumulation (no host sync)."""
        if self._params is None:
            raise RuntimeError("call begin_step before after_micro_backward")
        for i, p in enumerate(params):
            g = p.grad
            if g is not None and g is not self._scratch[i]:  # made afresh by autograd: a first
                self._scratch[i].copy_(g)  # gradient for p, or one it did not add in place
                p.grad, self._used[i] = self._scratch[i], True
        first = self._n_micro == 0
        self._n_micro += 1
        for grp in self._groups:
            self._norms.append(torch.linalg.vector_norm(grp.scratch, dtype=grp.norm_dtype))
            if first:
                grp.accum.copy_(grp.scratch)
            else:
                grp.accum.add_(grp.scratch)
            grp.scratch.zero_()

    def end_step(self, params: Iterable[torch.Tensor], loss_scale: float = 1.0) -> tuple[float, float]:
        """Point .grad at the step's accumulated gradient; return (mean over micro-batches of
        |g_micro|^2, |g_big|^2) with one host sync."""
        n = self._n_micro
        if n == 0:
            raise RuntimeError("end_step without any after_micro_backward in this step")
        self._point(params, self._accum)
        self._clean = True  # no backward reaches the scratch buffers until begin_step
        if not any(self._used):  # nothing measured: NaNs, which NoiseScale skips
            return math.nan, math.nan
        norms = self._norms + [torch.linalg.vector_norm(grp.accum, dtype=grp.norm_dtype)
                               for grp in self._groups]  # |g_big| last
        if len(self._groups) > 1:  # one device and dtype to stack on
            norms = [t.to(self._groups[0].scratch.device, torch.float64) for t in norms]
        values = torch.stack(norms).tolist()
        k = len(self._groups)
        delta_sq = math.fsum(v * v for v in values[:-k])  # squared in float64
        grad_sq = math.fsum(v * v for v in values[-k:])
        if self.mean_of_micro:  # g_micro = n * delta, so mean_k |g_micro|^2 = n * sum_k |delta_k|^2
            small, big = n * delta_sq, grad_sq
        else:  # g_micro = delta, g_big = grad / n
            small, big = delta_sq / n, grad_sq / n ** 2
        return small / loss_scale ** 2, big / loss_scale ** 2

    def _point(self, params: Iterable[torch.Tensor], views: list[torch.Tensor]) -> None:
        """Make .grad of each parameter that has had a gradient its view in `views`."""
        for p, used, view in zip(params, self._used, views):
            if used:
                p.grad = view

    def _lay_out(self, params: list[torch.Tensor]) -> None:
        """Build one _FlatGroup per (device, dtype) of params (usually exactly one)."""
        keys: dict[tuple, list[int]] = {}
        for i, p in enumerate(params):
            keys.setdefault((p.device, p.dtype), []).append(i)
        self._params, self._groups = list(params), []
        self._scratch, self._accum = [None] * len(params), [None] * len(params)
        for index in keys.values():
            members = [params[i] for i in index]
            grp = _FlatGroup(members)
            self._groups.append(grp)
            for i, s, a in zip(index, _views(grp.scratch, members), _views(grp.accum, members)):
                self._scratch[i], self._accum[i] = s, a
        self._used = [False] * len(params)
        self._clean = True


class _FlatGroup:
    """The flat scratch and accumulation buffers of the parameters of one (device, dtype)."""

    __slots__ = ("scratch", "accum", "norm_dtype")

    def __init__(self, params: list[torch.Tensor]):
        n, like = sum(p.numel() for p in params), params[0]
        self.scratch = torch.zeros(n, dtype=like.dtype, device=like.device)
        self.accum = torch.zeros_like(self.scratch)
        self.norm_dtype = torch.promote_types(like.dtype, torch.float32)


def _views(flat: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    """Return consecutive views of flat, shaped as each of params."""
    views, offset = [], 0
    for p in params:
        views.append(flat[offset:offset + p.numel()].view(p.shape))
        offset += p.numel()
    return views
