"""PeakMemory on CPU: measured, resettable per trial, and tracking what a trial allocates."""
from __future__ import annotations

import pytest
import torch

from scaling.memory import PeakMemory, rss_mb
from scaling.train import run_trial

pytestmark = pytest.mark.skipif(not PeakMemory(torch.device("cpu")).resettable,
                                reason="needs Linux's resettable peak RSS (/proc/self/clear_refs)")


def test_known_allocation_shows_up():
    meter = PeakMemory(torch.device("cpu"))
    for _ in range(2):  # the second window starts after the first one's 200 MB were freed
        meter.reset()
        assert meter.peak_mb() < 20
        x = torch.ones(200 * 2**20, dtype=torch.uint8)  # ones: every page is touched
        assert 0.8 * 200 <= meter.peak_mb() <= 1.2 * 200, meter.peak_mb()
        del x
    assert meter.baseline_mb == pytest.approx(rss_mb(), abs=50)


def test_untouched_allocation_is_not_counted():
    meter = PeakMemory(torch.device("cpu"))
    meter.reset()
    x = torch.empty(200 * 2**20, dtype=torch.uint8)  # reserved, never written: no resident pages
    assert meter.peak_mb() < 0.2 * 200
    del x


def test_larger_batch_larger_peak(compose_cfg):
    # A wide, shallow MLP (few parameters, big activations) on a synthetic task generated in
    # milliseconds; one optimizer step for batch 2048, a few for batch 64. The small trial runs
    # second: if reset() did not restart the window, it would report the large trial's peak.
    from scaling.data import load_dataset

    base = ["data=synthetic", "data.n_samples=4000", "data.val_fraction=0.05", "model.width=4096",
            "model.depth=1", "epochs=0.1", "eval_every=0.1", "mlflow.enabled=false", "threads=1"]
    data = load_dataset(compose_cfg(*base).data)
    large = run_trial(compose_cfg(*base, "batch_size=2048"), dataset=data)
    small = run_trial(compose_cfg(*base, "batch_size=64"), dataset=data)
    assert large.status == small.status == "completed"
    p_large, p_small = large.metrics["mem/peak_mb"], small.metrics["mem/peak_mb"]
    # batch 2048 x width 4096 x 4 B = 32 MB per activation, a few live at once (about 100 MB
    # measured); batch 64: 1 MB, so the small peak is mostly parameters and evaluation (about 10 MB)
    assert p_large > 50 and p_large > 3 * p_small, (p_large, p_small)
    assert p_small > 0


def test_a_workers_first_trial_at_a_shape_measures_what_a_later_one_does(compose_cfg, tiny, tiny_data):
    # A reused worker runs trial after trial; torch on CPU keeps state from the first pass at each
    # shape, which landed in the first trial's peak (bf16: 12.4 MB, then 0.34 MB for the same trial).
    # The width and batch size are this test's own, so no earlier trial in the process warmed them.
    cfg = compose_cfg(*tiny, "precision=bf16", "model.width=56", "batch_size=200")
    first, again = (run_trial(cfg, dataset=tiny_data).metrics["mem/peak_mb"] for _ in range(2))
    assert first < again + 2.0, (first, again)
