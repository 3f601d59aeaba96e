"""The trial loop on tiny MNIST-1D trials: metrics, accumulation, divergence, OOM, target, resume."""
from __future__ import annotations

import math
import types

import pytest
import torch
import torch.nn.functional as F

import scaling.train as train_mod
from scaling.data import SampleStream
from scaling.models import build_model
from scaling.reporters import RecordingReporter
from scaling.train import TrialResult, run_trial

EVAL_KEYS = {"train/loss", "val/loss", "val/acc", "lr", "samples", "step", "epoch",
             "time/elapsed_s", "time/samples_per_s", "mem/peak_mb"}


@pytest.fixture
def trial(compose_cfg, tiny, tiny_data):
    """Return trial(*overrides) -> (TrialResult, RecordingReporter, cfg) of a tiny trial."""
    def run(*overrides: str, **kw):
        cfg = compose_cfg(*tiny, *overrides)
        rec = RecordingReporter()
        result = run_trial(cfg, rec, dataset=tiny_data, **kw)
        assert isinstance(result, TrialResult) and rec.result is result
        return result, rec, cfg
    return run


def curves(history: list[dict]) -> list[dict]:
    """Return the history without wall-clock and memory readings (which vary run to run)."""
    return [{k: v for k, v in h.items() if not k.startswith(("time/", "mem/"))} for h in history]


def test_short_trial_beats_chance(trial):
    result, rec, _ = trial("epochs=2", "scaling.ref_lr=0.2")
    assert result.status == "completed" and result.reason == ""
    assert result.metrics["val/acc"] > 0.2  # 10 classes: chance is 0.1
    assert result.metrics["val/loss"] < rec.history[0]["val/loss"] < math.log(10) + 0.1
    assert result.best_val_loss == min(h["val/loss"] for h in rec.history)


def test_every_evaluation_reports_the_metrics(trial):
    result, rec, cfg = trial("eval_every=0.25")
    info = rec.info
    assert info["steps_per_epoch"] == 1600 // 32 == 50 and info["total_steps"] == 50
    assert info["lr"] == pytest.approx(0.05 * 32 / 128)
    assert len(rec.history) == 4  # at the first step at or past k x 12.5: 13, 25, 38 and the last step (50)
    for h in rec.history:
        assert EVAL_KEYS <= set(h), EVAL_KEYS - set(h)
        assert all(isinstance(h[k], (int, float)) and math.isfinite(h[k]) for k in EVAL_KEYS)
        assert h["samples"] == h["step"] * cfg.batch_size
        assert h["epoch"] == pytest.approx(h["step"] / 50)
        assert 0 <= h["val/acc"] <= 1 and h["time/samples_per_s"] > 0 and h["mem/peak_mb"] >= 0
        assert h["lr"] == pytest.approx(info["lr"])
    assert [h["step"] for h in rec.history] == [13, 25, 38, 50]
    times = [h["time/elapsed_s"] for h in rec.history]
    assert times == sorted(times)
    assert result.metrics["step"] == 50 and result.metrics["epoch"] == 1.0
    assert curves([result.metrics]) == curves([rec.history[-1]])


def test_evaluations_fall_at_whole_multiples_of_eval_every(trial):
    """6.25 steps an epoch (batch 256 of 1,600): the k-th evaluation comes at the first step at or past
    k x 0.25 epoch, so ASHA's rung at a multiple of eval_every (its test: epoch >= rung) is judged by it.
    Not after k x round(1.5625) = 2k steps, which drifts to 0.32, 0.64, 0.96 epoch; not at the nearest
    step either, which put the second at step 3, 0.48 epoch, before a rung at 0.5."""
    _, rec, _ = trial("batch_size=256", "epochs=1", "eval_every=0.25")
    step = 1 / 6.25
    assert [h["step"] for h in rec.history] == [2, 4, 5, 6]
    for k, h in enumerate(rec.history[:-1], start=1):
        assert 0.25 * k <= h["epoch"] < 0.25 * k + step, (k, h["epoch"])


def test_gradient_accumulation_matches_full_batch(trial):
    full, rec_full, _ = trial("batch_size=64", "micro_batch_size=null", "eval_every=0.25")
    acc, rec_acc, _ = trial("batch_size=64", "micro_batch_size=16", "eval_every=0.25")
    assert rec_full.info["n_micro"] == 1 and rec_acc.info["n_micro"] == 4
    assert rec_acc.info["total_steps"] == rec_full.info["total_steps"] == 1600 // 64
    assert [h["step"] for h in rec_acc.history] == [h["step"] for h in rec_full.history]
    assert [h["samples"] for h in rec_acc.history] == [h["samples"] for h in rec_full.history]
    for a, b in zip(rec_acc.history, rec_full.history):
        for key in ("train/loss", "val/loss", "val/acc"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key
    assert acc.status == full.status == "completed"


def test_gns_is_measured_without_changing_training(trial):
    """gns.enabled adds gns/b_simple to every evaluation and leaves the training bit for bit alone."""
    on, rec_on, _ = trial("batch_size=64", "micro_batch_size=16", "eval_every=0.25", "gns.enabled=true")
    off, rec_off, _ = trial("batch_size=64", "micro_batch_size=16", "eval_every=0.25")
    assert on.status == off.status == "completed"
    b_simple = [h.pop("gns/b_simple") for h in rec_on.history]
    assert all(math.isfinite(b) and b > 0 for b in b_simple), b_simple
    assert "gns/b_simple" not in rec_off.history[-1]
    assert curves(rec_on.history) == curves(rec_off.history)
    # gns.micro_batches=4 is the same split at batch 64, so the same measurement, bit for bit
    _, rec_split, _ = trial("batch_size=64", "gns.micro_batches=4", "eval_every=0.25", "gns.enabled=true")
    assert [h.pop("gns/b_simple") for h in rec_split.history] == b_simple
    assert curves(rec_split.history) == curves(rec_on.history)


def test_gns_of_a_model_held_still_is_its_exact_b_simple_on_the_training_set(trial, tiny_data):
    """At lr 1e-9 the model keeps its initial weights, whose B_simple = tr(Sigma) / |G|^2 over the
    1,600 training samples is exact from per-sample gradients (~224). The loop draws its batches
    without replacement, which the i.i.d. formulas read ~18% high (~265 here)."""
    from torch.func import functional_call, grad, vmap

    _, rec, cfg = trial("batch_size=64", "micro_batch_size=16", "epochs=24", "eval_every=24", "lr=1e-9",
                        "gns.enabled=true", "gns.ema=0.998")
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, tiny_data.input_shape, tiny_data.num_classes)
    named = dict(model.named_parameters())

    def loss(params, x, y):
        return F.cross_entropy(functional_call(model, params, (x[None],)), y[None])

    per = vmap(grad(loss), in_dims=(None, 0, 0))(named, tiny_data.x_train, tiny_data.y_train)
    per = torch.cat([g.detach().reshape(len(tiny_data.y_train), -1) for g in per.values()], 1).double()
    exact = float(per.var(0, unbiased=False).sum() / (per.mean(0) ** 2).sum())
    assert rec.history[-1]["gns/b_simple"] == pytest.approx(exact, rel=0.06)


@pytest.fixture
def loss_log(monkeypatch):
    """Record every training-batch loss the loop computes (the warm-ups, once per process and shape, and the
    evaluation call cross_entropy from their own modules, scaling.devices and scaling.evaluation)."""
    losses: list[float] = []

    def cross_entropy(logits, target, *args, **kwargs):
        loss = F.cross_entropy(logits, target, *args, **kwargs)
        losses.append(loss.item())
        return loss

    monkeypatch.setattr(train_mod, "F", types.SimpleNamespace(cross_entropy=cross_entropy))
    return losses


@pytest.mark.parametrize("overrides", [
    ("lr=1e4",),  # finite but far above divergence.factor x the first loss
    ("lr=1e30", "divergence.factor=1e38"),  # the factor cannot trigger: only the non-finite check can
], ids=["huge-loss", "non-finite-loss"])
def test_divergence_stops_within_a_step(trial, loss_log, overrides):
    result, rec, cfg = trial(*overrides)  # must not raise
    assert result.status == "diverged"
    first = loss_log[0]
    bad = [i for i, x in enumerate(loss_log) if not math.isfinite(x) or x > cfg.divergence.factor * first]
    assert bad, loss_log
    # the loss of step i is computed before optimizer step i: stopping there means `step` == i
    assert result.metrics["step"] == bad[0]
    assert len(loss_log) == bad[0] + 1  # no forward pass after the bad one
    assert result.metrics["samples"] == bad[0] * cfg.batch_size
    assert f"at step {bad[0]}" in result.reason and "train/loss=" in result.reason
    if "divergence.factor=1e38" in overrides:
        assert not math.isfinite(result.metrics["train/loss"])
    assert rec.history == []  # diverged before the first evaluation


@pytest.mark.parametrize("overrides", [
    ("lr=5",),  # one adam step: val/loss ~1e4-1e6, far above divergence.factor x the first train/loss
    ("lr=1e30", "divergence.factor=1e38"),  # only the non-finite check can trigger
], ids=["huge-val-loss", "non-finite-val-loss"])
def test_a_last_step_blow_up_the_training_loss_never_saw_ends_as_diverged(trial, loss_log, overrides):
    """The training loss is checked before each step, so a trial whose last step blows up reached its
    evaluation unchecked and counted as a result (val/loss 3.9e6, accuracy below chance: "completed").
    The same rule now applies to val/loss at every evaluation, and that evaluation is not reported."""
    result, rec, cfg = trial("batch_size=1024", "epochs=0.64", "eval_every=0.64", "optimizer=adam", *overrides)
    first, factor = loss_log[0], cfg.divergence.factor  # the only step's
    assert rec.info["total_steps"] == 1 and math.isfinite(first) and first < 3  # its training loss was fine
    assert result.status == "diverged"
    val = result.metrics["val/loss"]
    assert not math.isfinite(val) or val > factor * first
    why = "not finite" if not math.isfinite(val) else f"above divergence.factor={factor:g} x the first train/loss {first:.4g}"
    assert result.reason == f"val/loss={val:.4g} at step 1: {why}"
    assert result.metrics["step"] == 1 and result.metrics["samples"] == 1024 == result.metrics["step"] * cfg.batch_size
    assert rec.history == [] and result.best_val_loss == math.inf  # no result: never reported, never "best"


def test_best_val_loss_is_the_lowest_whatever_early_stopping_min_delta(trial):
    """min_delta decides what counts as an improvement for patience; best/val_loss, which ranks trials and
    picks the best LR, kept the last value that beat it by min_delta (2.3052 against a later 2.2979)."""
    result, rec, _ = trial("epochs=1", "eval_every=0.1", "early_stopping.patience=3", "early_stopping.min_delta=0.5")
    assert result.status == "early_stopped" and len(rec.history) == 4  # nothing improves by 0.5: 3 bad ones
    losses = [m["val/loss"] for m in rec.history]
    assert min(losses) < losses[0]  # a smaller improvement than min_delta happened
    assert [m["best/val_loss"] for m in rec.history] == [min(losses[:k + 1]) for k in range(len(losses))]
    assert result.best_val_loss == min(losses)


def test_early_stopping(trial):
    # Nothing improves val/loss by 10: the second evaluation is the first "bad" one.
    result, rec, _ = trial("eval_every=0.25", "early_stopping.patience=1", "early_stopping.min_delta=10")
    assert result.status == "early_stopped"
    assert "did not improve for 1 evaluations" in result.reason
    assert [h["step"] for h in rec.history] == [13, 25]
    assert result.metrics["step"] == 25 < 50


@pytest.mark.parametrize("overrides", [("memory.limit_mb=1", "model.width=512"),
                                       ("memory.limit_mb=20", "model.width=2048", "batch_size=64")])
def test_memory_limit_ends_as_oom(trial, overrides):
    result, rec, cfg = trial(*overrides)
    assert result.status == "oom"
    assert f"batch_size={cfg.batch_size}" in result.reason and f"memory.limit_mb={cfg.memory.limit_mb:g}" in result.reason
    # the recorded peak is the one that ended it: the kernel's VmHWM can read lower a moment later
    assert f"peak {result.info['mem/peak_mb']:.1f} MB exceeds" in result.reason and result.info["mem/peak_mb"] > 1
    assert rec.history == []  # enforced after the first step, before any evaluation


@pytest.mark.parametrize("fail", ["allocation", "OutOfMemoryError", "MemoryError"])
def test_out_of_memory_in_forward_ends_as_oom(trial, monkeypatch, fail):
    real_build = train_mod.build_model

    def forward(self, x):
        if fail == "allocation":  # a real failure of the CPU allocator: 1 PB
            torch.empty(2**50, dtype=torch.uint8)
        if fail == "OutOfMemoryError":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        raise MemoryError()

    def build_model(*args, **kwargs):
        model = real_build(*args, **kwargs)
        model.forward = types.MethodType(forward, model)
        return model

    monkeypatch.setattr(train_mod, "build_model", build_model)
    result, rec, _ = trial("batch_size=64")  # must not raise
    assert result.status == "oom"
    assert "batch_size=64" in result.reason
    assert rec.result is result and rec.history == []


def test_reachable_target(trial):
    result, rec, cfg = trial("eval_every=0.25", "target.value=0.15")
    first = next(h for h in rec.history if h["val/acc"] >= 0.15)
    t = result.target
    assert t == {"target/steps": first["step"], "target/samples": first["samples"],
                 "target/time_s": first["time/elapsed_s"]}
    assert t["target/samples"] == t["target/steps"] * cfg.batch_size
    assert 0 < t["target/time_s"] <= result.metrics["time/elapsed_s"]
    before = [h for h in rec.history if h["step"] < first["step"]]
    assert all(h["val/acc"] < 0.15 for h in before)
    assert all("target/steps" not in h for h in before)
    assert all(h[k] == t[k] for h in rec.history[len(before):] for k in t)  # carried on once reached
    assert all(result.metrics[k] == t[k] for k in t)


def test_unreachable_target(trial):
    result, rec, _ = trial("target.value=0.99")
    assert result.status == "completed" and result.target is None
    assert not any(k.startswith("target/") for h in rec.history + [result.metrics] for k in h)


def test_min_mode_target(trial):
    result, rec, _ = trial("target.metric=val/loss", "target.mode=min", "target.value=100")
    assert result.target["target/steps"] == rec.history[0]["step"]  # any loss is below 100


def test_deterministic_given_seed(trial):
    _, a, _ = trial("seed=3")
    _, b, _ = trial("seed=3")
    _, c, _ = trial("seed=4")
    assert curves(a.history) == curves(b.history)
    assert [h["train/loss"] for h in a.history] != [h["train/loss"] for h in c.history]
    assert [h["val/loss"] for h in a.history] != [h["val/loss"] for h in c.history]


def test_warmup_follows_goyal_ramp(trial):
    # batch 64 against ref 16: lr = 0.05 x 4 = 0.2, warming up from ref_lr x multiplier = 0.05
    # over one epoch (25 steps). The reported lr is the one the evaluation's last step used.
    result, rec, _ = trial("batch_size=64", "scaling.ref_batch_size=16", "epochs=2", "eval_every=0.2",
                           "warmup.epochs=1")
    start, peak, warm = 0.05, 0.2, 25
    assert rec.info["warmup_steps"] == warm and rec.info["lr"] == pytest.approx(peak)
    steps = [h["step"] for h in rec.history]
    assert steps == [5, 10, 15, 20, 25, 30, 35, 40, 45, 50]
    for h in rec.history:
        t = h["step"] - 1  # index of the optimizer step that used this lr
        expected = start + (peak - start) * t / warm if t < warm else peak
        assert h["lr"] == pytest.approx(expected, rel=1e-9), h["step"]
    assert result.status == "completed"


def test_budget_is_samples_at_a_batch_size_that_does_not_divide_the_training_set(trial):
    """1,600 samples at B=1024 for 2 epochs: 3 steps (3,072 samples, the nearest whole step to 3,200),
    not 2 steps of one ragged epoch dropped twice; the warmup and evaluations count the same way."""
    result, rec, _ = trial("batch_size=1024", "epochs=2", "eval_every=0.5", "warmup.epochs=1")
    assert rec.info["steps_per_epoch"] == pytest.approx(1600 / 1024)
    assert rec.info["total_steps"] == 3 and rec.info["warmup_steps"] == 2  # round(3.125), round(1.5625)
    assert [h["step"] for h in rec.history] == [1, 2, 3]  # every round(0.78) = 1 step
    assert result.metrics["samples"] == 3072 and result.metrics["epoch"] == pytest.approx(3072 / 1600)


def test_a_warmup_shorter_than_half_a_step_still_takes_one(trial):
    """0.2 epoch at 1.5625 steps an epoch (B=1024 of 1,600) is 0.31 steps: to the nearest step that was no
    warmup at all, while the run's params said warmup.epochs=0.2. It takes one step, at the start LR."""
    result, rec, _ = trial("batch_size=1024", "epochs=2", "eval_every=0.5", "warmup.epochs=0.2")
    peak = 0.05 * 1024 / 128
    assert rec.info["warmup_steps"] == 1 and rec.info["total_steps"] == 3
    assert [h["lr"] for h in rec.history] == pytest.approx([peak * 128 / 1024, peak, peak])  # `ref`: B_ref's LR
    assert result.status == "completed"


def test_sample_stream_reads_each_epoch_once_across_boundaries():
    """Concatenated, the batches are one permutation per epoch; any step's batch is the same
    whether the stream got there step by step or was built fresh there (as after a resume)."""
    n, B = 10, 4
    stream = SampleStream(n, seed=3, device=torch.device("cpu"))
    flat = torch.cat([stream.batch(step, B) for step in range(10)])  # 40 samples: 4 epochs
    for e in range(4):
        assert sorted(flat[e * n:(e + 1) * n].tolist()) == list(range(n)), e
    assert not torch.equal(flat[:n], flat[n:2 * n])  # a fresh order each epoch
    for step in (2, 5, 7):  # batches that straddle an epoch boundary (8..11, 20..23, 28..31)
        assert torch.equal(SampleStream(n, 3, torch.device("cpu")).batch(step, B), flat[step * B:(step + 1) * B])


def test_warmup_from_zero(trial):
    _, rec, _ = trial("batch_size=64", "warmup.epochs=0.5", "warmup.start=zero", "eval_every=0.2")
    lr, warm = 0.05 * 64 / 128, round(0.5 * 25)
    assert rec.history[0]["lr"] == pytest.approx(lr * (5 - 1) / warm)


def test_resume_from_checkpoint_matches_uninterrupted(trial, tiny_data):
    overrides = ("eval_every=0.25", "epochs=2", "warmup.epochs=0.5", "schedule=cosine")

    class Capture(RecordingReporter):
        def __init__(self, at_step: int):
            super().__init__()
            self.at_step, self.state = at_step, None

        def report(self, metrics, checkpoint=None):
            super().report(metrics, checkpoint)
            if metrics["step"] == self.at_step:
                self.state = checkpoint()  # kept in memory, not serialised: it must be a snapshot

    full, full_rec, cfg = trial(*overrides)
    assert full.status == "completed"
    capture = Capture(at_step=38)
    first = run_trial(cfg, capture, dataset=tiny_data)
    assert capture.state is not None and capture.state["loop"]["step"] == 38
    assert curves(capture.history) == curves(full_rec.history)  # the capturing run itself is unchanged

    resumed_rec = RecordingReporter()
    resumed = run_trial(cfg, resumed_rec, dataset=tiny_data, resume=capture.state)
    assert resumed.status == "completed"
    assert [h["step"] for h in resumed_rec.history] == [h["step"] for h in full_rec.history if h["step"] > 38]
    for got, want in zip(curves(resumed_rec.history), curves(full_rec.history)[-len(resumed_rec.history):]):
        assert got.keys() == want.keys()
        for k in want:
            assert got[k] == pytest.approx(want[k], rel=1e-6, abs=1e-6), k
    for k, v in curves([full.metrics])[0].items():
        assert resumed.metrics[k] == pytest.approx(v, rel=1e-6, abs=1e-6), k
    assert resumed.best_val_loss == pytest.approx(full.best_val_loss, rel=1e-6)
    assert first.metrics["val/loss"] == full.metrics["val/loss"]

