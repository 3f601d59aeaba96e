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
    """Measure mean |g_micro|^2 and |g_big|^2 during gradient accumulation, with foreach ops.

    Convention (the trial loop's): each micro-batch loss is a mean over its samples divided by
    n_micro before backward, so after all micro-steps p.grad is the big-batch mean gradient
    g_big and a micro-batch gradient is g_micro = n_micro * (the change of p.grad its backward
    made). With `mean_of_micro=False`, losses are not divided: p.grad is the sum of micro-batch
    gradients, g_micro is the change itself and g_big = p.grad / n_micro.

    Usage per optimiser step, always with the same `params` list:
        optimizer.zero_grad(); norms.begin_step(params)
        for each micro-batch: (loss / n_micro).backward(); norms.after_micro_backward(params)
        small, big = norms.end_step(params)   # before clipping or optimizer.step()
    Gradients must be zero or None at begin_step. Memory: one copy of the gradients (the
    previous accumulation). Cost per micro-step: a few foreach kernels and no host sync;
    end_step syncs once. With fp16 loss scaling pass scaler.get_scale() as loss_scale to get
    true norms (B_simple itself is a ratio, unchanged by a constant scale).
    """

    def __init__(self, mean_of_micro: bool = True):
        self.mean_of_micro = mean_of_micro
        self._prev: Optional[list[torch.Tensor]] = None  # p.grad before the latest backward
        self._delta_sq: Optional[torch.Tensor] = None  # sum over micro-steps of |delta p.grad|^2
        self._n_micro = 0

    def begin_step(self, params: Iterable[torch.Tensor]) -> None:
        """Reset for a new optimiser step (call after zero_grad, before the first backward)."""
        params = list(params)
        if self._prev is None or len(self._prev) != len(params):
            self._prev = [torch.zeros_like(p) for p in params]  # once, reused every step
        else:
            torch._foreach_zero_(self._prev)
        self._delta_sq, self._n_micro = None, 0

    def after_micro_backward(self, params: Iterable[torch.Tensor]) -> None:
        """Accumulate |delta p.grad|^2 of the latest micro-batch backward (no host sync)."""
        if self._prev is None:
            raise RuntimeError("call begin_step before after_micro_backward")
        pairs = [(p.grad, b) for p, b in zip(params, self._prev) if p.grad is not None]
        self._n_micro += 1
        if not pairs:
            return
        grads, prev = [g for g, _ in pairs], [b for _, b in pairs]
        torch._foreach_sub_(prev, grads)  # prev := prev - grad = -delta, in place: no new buffers
        sq = _sum_sq(prev)
        self._delta_sq = sq if self._delta_sq is None else self._delta_sq + sq
        torch._foreach_copy_(prev, grads)  # the accumulation the next backward starts from

    def end_step(self, params: Iterable[torch.Tensor], loss_scale: float = 1.0) -> tuple[float, float]:
        """Return (mean over micro-batches of |g_micro|^2, |g_big|^2) with one host sync."""
        n = self._n_micro
        if n == 0:
            raise RuntimeError("end_step without any after_micro_backward in this step")
        grads = [p.grad for p in params if p.grad is not None]
        if not grads or self._delta_sq is None:  # nothing measured: NaNs, which NoiseScale skips
            return math.nan, math.nan
        delta_sq, grad_sq = torch.stack([self._delta_sq, _sum_sq(grads).to(self._delta_sq.device)]).tolist()
        if self.mean_of_micro:  # g_micro = n * delta, so mean_k |g_micro|^2 = n * sum_k |delta_k|^2
            small, big = n * delta_sq, grad_sq
        else:  # g_micro = delta, g_big = grad / n
            small, big = delta_sq / n, grad_sq / n ** 2
        return small / loss_scale ** 2, big / loss_scale ** 2


def _sum_sq(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Return the sum of squared entries of tensors as one scalar tensor (no host sync).

    Squared in fp32 (fp64 if any tensor is fp64): an fp16 norm above 256 would overflow.
    """
    norms = torch._foreach_norm(tensors)
    dtype = torch.float64 if any(n.dtype == torch.float64 for n in norms) else torch.float32
    device = norms[0].device
    return torch.stack([n.to(device, dtype) for n in norms]).square().sum()
