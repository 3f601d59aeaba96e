"""Gradient noise scale B_simple = tr(Sigma) / |G|^2 (McCandlish et al. 2018, Appendix A.1).

E|g_B|^2 = |G|^2 + tr(Sigma) / B for a batch-B mean gradient g_B, so squared norms measured
at two batch sizes give unbiased estimates of |G|^2 and tr(Sigma) (see NoiseScale.update).
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

    def update(self, small_sq_norm: float, big_sq_norm: float, b_small: int, b_big: int) -> None:
        """Fold in one step: small_sq_norm = mean over micro-batches of |g_micro|^2 at b_small,
        big_sq_norm = |g_big|^2 of their mean at b_big (> b_small).

        A non-finite norm (an fp16 overflow step that the GradScaler skips) is ignored rather
        than raised: it must not end the trial, nor poison the averages.
        """
        if not b_big > b_small > 0:
            raise ValueError(f"need b_big > b_small > 0, got b_small={b_small}, b_big={b_big}")
        if not (math.isfinite(small_sq_norm) and math.isfinite(big_sq_norm)):
            self.skipped += 1
            return
        g2 = (b_big * big_sq_norm - b_small * small_sq_norm) / (b_big - b_small)
        s = (small_sq_norm - big_sq_norm) / (1.0 / b_small - 1.0 / b_big)
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


class MicroGradNorms:
    """Measure mean |g_micro|^2 and |g_big|^2 during gradient accumulation.

    Convention (the trial loop's): each micro-batch loss is a mean over its samples divided by
    n_micro before backward, so after all micro-steps p.grad is the big-batch mean gradient
    g_big and a micro-batch gradient is g_micro = n_micro * (the change of p.grad its backward
    made). With `mean_of_micro=False`, losses are not divided: p.grad is the sum of micro-batch
    gradients, g_micro is the change itself and g_big = p.grad / n_micro.

    Usage per optimiser step, always with the same `params` list:
        optimizer.zero_grad(); norms.begin_step(params)
        for each micro-batch: (loss / n_micro).backward(); norms.after_micro_backward(params)
        small, big = norms.end_step(params)   # before clipping or optimizer.step()
    Gradients must be zero or None at begin_step, and unchanged between the last
    after_micro_backward and end_step (|g_big|^2 is read from the copy taken there).

    Memory: one flat copy of the gradients per (device, dtype) of the parameters (fp32 at
    least, so fp16 differences and squares cannot overflow), allocated once. Cost per
    micro-step, whatever the number of parameters: a foreach subtract, one norm over the flat
    buffer and a foreach copy, no allocation of gradient size and no host sync; end_step
    syncs once. With fp16 loss scaling pass scaler.get_scale() as loss_scale to get true
    norms (B_simple itself is a ratio, unchanged by a constant scale).
    """

    def __init__(self, mean_of_micro: bool = True):
        self.mean_of_micro = mean_of_micro
        self._params: Optional[list[torch.Tensor]] = None  # the params the buffers were laid out for
        self._groups: list[_FlatGroup] = []
        self._norms: list[torch.Tensor] = []  # |delta p.grad| of each micro-step (per group), 0-dim
        self._n_micro = 0
        self._have_prev = False  # False: the buffers stand for an all-zero accumulation

    def begin_step(self, params: Iterable[torch.Tensor]) -> None:
        """Reset for a new optimiser step (call after zero_grad, before the first backward)."""
        params = params if isinstance(params, list) else list(params)
        if self._params is None or len(self._params) != len(params) or \
                any(a is not b for a, b in zip(self._params, params)):
            self._params, self._groups = list(params), _layout(params)  # once, reused every step
        self._norms, self._n_micro, self._have_prev = [], 0, False

    def after_micro_backward(self, params: Iterable[torch.Tensor]) -> None:
        """Record |delta p.grad| of the latest micro-batch backward (no host sync)."""
        if self._params is None:
            raise RuntimeError("call begin_step before after_micro_backward")
        grads = [p.grad for p in params]
        self._n_micro += 1
        if all(g is None for g in grads):
            return  # nothing accumulated yet: the buffers still stand for zero
        have_prev = self._have_prev
        for grp in self._groups:
            gs = grads if grp.index is None else [grads[i] for i in grp.index]
            if any(g is None for g in gs):  # e.g. an unused parameter: its accumulation is zero
                views = [v for v, g in zip(grp.views, gs) if g is not None]
                unset = [v for v, g in zip(grp.views, gs) if g is None]
                gs = [g for g in gs if g is not None]
            else:
                views, unset = grp.views, []
            if have_prev:
                if gs:
                    torch._foreach_sub_(views, gs)  # flat := previous - current = -delta, in place
                self._norms.append(torch.linalg.vector_norm(grp.flat))
                if gs:
                    torch._foreach_copy_(views, gs)  # the accumulation the next backward starts from
                if unset:
                    torch._foreach_zero_(unset)
            else:  # first contribution: delta is the accumulation itself
                if gs:
                    torch._foreach_copy_(views, gs)
                if unset:
                    torch._foreach_zero_(unset)
                self._norms.append(torch.linalg.vector_norm(grp.flat))
        self._have_prev = True

    def end_step(self, params: Iterable[torch.Tensor], loss_scale: float = 1.0) -> tuple[float, float]:
        """Return (mean over micro-batches of |g_micro|^2, |g_big|^2) with one host sync."""
        n = self._n_micro
        if n == 0:
            raise RuntimeError("end_step without any after_micro_backward in this step")
        if not self._norms or all(p.grad is None for p in params):  # nothing measured: NaNs, which NoiseScale skips
            return math.nan, math.nan
        norms = self._norms + [torch.linalg.vector_norm(grp.flat) for grp in self._groups]  # |g_big| last
        if len(self._groups) > 1:  # one device and dtype to stack on
            norms = [t.to(self._groups[0].flat.device, torch.float64) for t in norms]
        values = torch.stack(norms).tolist()
        k = len(self._groups)
        delta_sq = math.fsum(v * v for v in values[:-k])  # squared in float64
        grad_sq = math.fsum(v * v for v in values[-k:])
        if self.mean_of_micro:  # g_micro = n * delta, so mean_k |g_micro|^2 = n * sum_k |delta_k|^2
            small, big = n * delta_sq, grad_sq
        else:  # g_micro = delta, g_big = grad / n
            small, big = delta_sq / n, grad_sq / n ** 2
        return small / loss_scale ** 2, big / loss_scale ** 2


class _FlatGroup:
    """One flat buffer for the parameters of one (device, dtype), with a view shaped as each."""

    __slots__ = ("index", "flat", "views")

    def __init__(self, index: Optional[list[int]], params: list[torch.Tensor]):
        self.index = index  # positions in the params list; None: all of them, in order
        dtype = torch.promote_types(params[0].dtype, torch.float32)
        self.flat = torch.zeros(sum(p.numel() for p in params), dtype=dtype, device=params[0].device)
        self.views, offset = [], 0
        for p in params:
            self.views.append(self.flat[offset:offset + p.numel()].view(p.shape))
            offset += p.numel()


def _layout(params: list[torch.Tensor]) -> list[_FlatGroup]:
    """Return one _FlatGroup per (device, dtype) of params (usually exactly one)."""
    keys: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        keys.setdefault((p.device, p.dtype), []).append(i)
    if len(keys) == 1:
        return [_FlatGroup(None, params)] if params else []
    return [_FlatGroup(index, [params[i] for i in index]) for index in keys.values()]
