"""Peak memory of one trial, measured (never estimated), resettable per trial.

CUDA: torch's peak-allocated counter, reset at trial start. Evaluation runs in `excluded()`: it
goes through the validation split in chunks of 4096, which at small batch sizes needs more memory
than a training step (ResNet-20 on CIFAR-10 in bf16 on an H100: 644 MB with evaluation, 103 MB
without, at batch 128), and would hide what the batch size costs. Its own peak is `eval_peak_mb`.
CPU (Linux): the kernel's resettable peak RSS. Writing "5" to /proc/self/clear_refs resets
VmHWM to the current RSS, so a process that runs many trials (a reused Ray worker) still
gets each trial's own peak. Freed heap that glibc keeps would hide a new trial's
allocations, so the reset first returns it to the kernel with malloc_trim.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import os
from typing import Optional

_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"


def _status_kb(field: str) -> Optional[int]:
    try:
        with open(_STATUS) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_mb() -> float:
    """Return the process's current resident set size in MB (0 where /proc is missing)."""
    return (_status_kb("VmRSS") or 0) / 1024


def _malloc_trim() -> None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


class PeakMemory:
    """Measures the peak memory a trial adds on its device, in MB, from the last reset()."""

    def __init__(self, device) -> None:
        self.device = device
        self.is_cuda = getattr(device, "type", str(device)) == "cuda"
        self.baseline_mb = 0.0 if self.is_cuda else rss_mb()
        self.resettable = self.is_cuda or (os.path.exists(_CLEAR_REFS) and _status_kb("VmHWM") is not None)
        self._floor = 0  # CUDA: the peak (bytes) reached outside excluded() blocks before the last one
        self.eval_peak_mb = 0.0  # CUDA: the largest peak inside an excluded() block, above the baseline
        self._seen_mb = 0.0  # CPU: the largest peak_mb() returned since reset()

    def reset(self) -> None:
        """Start a new measurement window: the peak becomes what is allocated now."""
        gc.collect()
        gc.freeze()  # long-lived objects (torch, ray, mlflow) leave the GC's scans: a full collect took ~0.5 s per trial
        if self.is_cuda:
            import torch

            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline_mb = torch.cuda.memory_allocated(self.device) / 2**20
            self._floor, self.eval_peak_mb = 0, 0.0
            return
        _malloc_trim()
        self._seen_mb = 0.0
        if self.resettable:
            with open(_CLEAR_REFS, "w") as f:
                f.write("5")
        self.baseline_mb = rss_mb()

    def peak_mb(self) -> float:
        """Return the peak memory above the baseline since reset() (process-wide on CPU)."""
        if self.is_cuda:
            import torch

            return max(self._floor, torch.cuda.max_memory_allocated(self.device)) / 2**20 - self.baseline_mb
        # The kernel updates VmHWM lazily: pages freed by madvise (glibc's free) are not counted in it, so it
        # can read ~0.2 MB lower after a peak (an out-of-memory trial recorded less than the peak that ended it)
        hwm = _status_kb("VmHWM")
        self._seen_mb = max(self._seen_mb, (hwm or 0) / 1024 - self.baseline_mb)
        return self._seen_mb

    @contextlib.contextmanager
    def excluded(self):
        """Keep the block's allocations out of peak_mb() (CUDA), recording them in eval_peak_mb.

        On CPU this is a no-op: the peak RSS is process-wide and a reset costs a malloc_trim and a
        page-table walk, while evaluating the small models the CPU runs adds little to it.
        """
        if not self.is_cuda:
            yield
            return
        import torch

        self._floor = max(self._floor, torch.cuda.max_memory_allocated(self.device))
        torch.cuda.reset_peak_memory_stats(self.device)
        try:
            yield
        finally:
            self.eval_peak_mb = max(self.eval_peak_mb,
                                    torch.cuda.max_memory_allocated(self.device) / 2**20 - self.baseline_mb)
            torch.cuda.reset_peak_memory_stats(self.device)
