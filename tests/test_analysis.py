"""The study analysis over synthetic trial tables: no MLflow, no training."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from scaling import analysis as an
from scaling import costs as co
from scaling.analysis import LR, Study, StudyError, Target
from scaling.cli import CONF_DIR

INF = math.inf


def trials(*rows: dict, axes=("batch_size", "lr_multiplier", "seed")) -> pd.DataFrame:
    """Return a trial table: each row overrides defaults (B=32, mult 1, seed 0, completed, ...)."""
    base = {"status": "completed", "batch_size": 32, "lr_multiplier": 1.0, "seed": 0, "scaling.rule": "linear",
            "warmup.epochs": 0.0, "precision": "fp32", "best/val_loss": 1.0, "mem/peak_mb": 100.0,
            "time/samples_per_s": 1000.0, "target.metric": "val/loss", "target.value": "1.5", "target.mode": "min"}
    df = pd.DataFrame([{**base, **r} for r in rows])
    df["trial"] = [f"t{i}" for i in range(len(df))]
    if LR not in df:
        df[LR] = 0.1 * df["lr_multiplier"] * df["batch_size"] / 32
    df["micro_batch_size"] = df.get("micro_batch_size", df["batch_size"]).fillna(df["batch_size"])
    df.attrs["axes"] = list(axes)
    return df


def with_costs(df: pd.DataFrame, steps) -> pd.DataFrame:
    """Set steps-to-target per row (inf = never reached); samples = steps * B, time = steps / 10."""
    df = df.copy()
    df["steps_to_target"] = np.asarray(steps, dtype=float)
    df["samples_to_target"] = df["steps_to_target"] * df["batch_size"]
    df["time_to_target_s"] = df["steps_to_target"] / 10
    return df


# ---------------------------------------------------------------- loading helpers
def test_typed_params_become_int_float_bool_or_str():
    assert an.typed(pd.Series(["32", "128"])).dtype == "int64"
    assert an.typed(pd.Series(["0.5", "2"])).tolist() == [0.5, 2.0]
    assert an.typed(pd.Series(["null", "4"])).isna().tolist() == [True, False]
    assert an.typed(pd.Series(["True", "False"])).tolist() == [True, False]
    assert an.typed(pd.Series(["linear", "sqrt"])).tolist() == ["linear", "sqrt"]


def test_trials_frame_types_params_and_keeps_metrics_apart():
    df = an.trials_frame([{"trial": "a", "run_name": "bs=32", "status": "completed",
                           "params": {"batch_size": "32", "lr": "null", "micro_batch_size": "null", "lr.effective": "0.1",
                                      "name": "default_study"},
                           "metrics": {"lr": 0.05, "val/loss": 1.2}}], axes=["batch_size", "nope"])
    row = df.iloc[0]
    assert row["batch_size"] == 32 and row["micro_batch_size"] == 32  # null micro-batch = the whole batch
    assert row["lr/last"] == 0.05 and pd.isna(row["lr"]) and row["val/loss"] == 1.2
    assert df.attrs["axes"] == ["batch_size"]
    # the run's name and the config's `name` are two columns (trials.csv had two called name)
    assert df.columns.is_unique and (row["run_name"], row["name"]) == ("bs=32", "default_study")


def test_default_tracking_uri_is_the_configs():
    from omegaconf import OmegaConf

    conf = OmegaConf.load(CONF_DIR / "config.yaml")
    assert an.DEFAULT_TRACKING_URI == conf.mlflow.tracking_uri


# ---------------------------------------------------------------- cost to target
def test_cost_to_target_is_min_over_lr_of_the_seed_median():
    df = with_costs(trials(
        {"lr_multiplier": 1.0, "seed": 0}, {"lr_multiplier": 1.0, "seed": 1}, {"lr_multiplier": 1.0, "seed": 2},
        {"lr_multiplier": 2.0, "seed": 0}, {"lr_multiplier": 2.0, "seed": 1}, {"lr_multiplier": 2.0, "seed": 2},
        # B=64: the faster LR reaches the target with one seed of three only: its median is inf
        {"batch_size": 64, "lr_multiplier": 1.0, "seed": 0}, {"batch_size": 64, "lr_multiplier": 1.0, "seed": 1},
        {"batch_size": 64, "lr_multiplier": 1.0, "seed": 2}, {"batch_size": 64, "lr_multiplier": 2.0, "seed": 0},
        {"batch_size": 64, "lr_multiplier": 2.0, "seed": 1}, {"batch_size": 64, "lr_multiplier": 2.0, "seed": 2}),
        [10, 12, 30, 9, INF, 14, 8, 9, 40, 2, INF, INF])
    costs = co.cost_to_target(df).set_index("batch_size")
    assert costs.loc[32, "steps_to_target"] == 12 and costs.loc[32, "lr_multiplier"] == 1.0  # 12 < median(9, 14, inf)
    assert costs.loc[32, "samples_to_target"] == 12 * 32 and costs.loc[32, "n_seeds"] == 3
    assert costs.loc[64, "steps_to_target"] == 9 and costs.loc[64, "lr_multiplier"] == 1.0
    assert costs["reached"].all()


def test_configurations_tied_on_steps_show_the_faster_ones_time():
    """Two LRs at B=64 reached the target in 18 steps; the time column showed the first one's (0.053 s)
    though the other took 0.033 s, so "time to target" was not the fastest time there."""
    df = with_costs(trials({"batch_size": 64, "lr_multiplier": 1.0}, {"batch_size": 64, "lr_multiplier": 2.0}), [18, 18])
    df["time_to_target_s"] = [0.0531, 0.0326]
    costs = co.cost_to_target(df).set_index("batch_size")
    assert costs.loc[64, "steps_to_target"] == 18 and costs.loc[64, "time_to_target_s"] == 0.0326
    assert costs.loc[64, "lr_multiplier"] == 2.0


def test_cost_to_target_ignores_diverged_and_error_trials_and_flags_unreached():
    df = with_costs(trials({"status": "diverged"}, {"status": "error"}, {"lr_multiplier": 0.5},
                           {"batch_size": 64}), [1, 1, 20, INF])
    df = co._unreached_is_inf(df)
    costs = co.cost_to_target(df).set_index("batch_size")
    assert costs.loc[32, "steps_to_target"] == 20
    assert not costs.loc[64, "reached"] and costs.loc[64, "steps_to_target"] == INF


def test_common_target_is_the_weakest_batch_sizes_best_with_every_seed():
    df = trials({"seed": 0}, {"seed": 1}, {"lr_multiplier": 2.0}, {"batch_size": 64, "seed": 0},
                {"batch_size": 64, "seed": 1})
    best = pd.Series([0.50, 0.60, 0.55, 0.80, 0.70], index=df.index)  # val/loss: lower is better
    t = co.common_target(df, best, "val/loss", "min")
    # B=32: configs' worst seeds 0.60 (x1) and 0.55 (x2) -> 0.55; B=64: worst seed 0.80 -> target 0.80
    assert (t.value, t.mode, t.source) == (0.80, "min", "common")
    assert co.common_target(df, 1 - best, "val/acc", "max").value == pytest.approx(0.20)


def fake_study(df: pd.DataFrame, histories: dict) -> Study:
    return Study("run", "study-x", df, df.attrs["axes"], fetch=lambda t, m: histories.get((t, m), []))


def test_unreached_configured_target_falls_back_to_a_common_one_and_says_so():
    df = trials({"batch_size": 32}, {"batch_size": 64}, {"batch_size": 128})
    df["target.metric"], df["target.value"], df["target.mode"] = "val/acc", "0.9", "max"
    df["target/steps"] = [5.0, np.nan, np.nan]  # only B=32 reached 0.9
    df["target/samples"], df["target/time_s"] = df["target/steps"] * 32, df["target/steps"]
    acc = {"t0": [0.65, 0.95], "t1": [0.4, 0.7], "t2": [0.3, 0.6]}
    hist = {}
    for t, values in acc.items():
        b = int(df.loc[df["trial"] == t, "batch_size"].iloc[0])
        hist[(t, "val/acc")] = [(b * (i + 1), v) for i, v in enumerate(values)]
        hist[(t, "time/elapsed_s")] = [(b * (i + 1), float(i + 1)) for i in range(len(values))]
    target, costed, notes = co.targeted(fake_study(df, hist))
    assert target == Target("val/acc", 0.6, "max", "common")
    assert costed.set_index("batch_size")["samples_to_target"].to_dict() == {32: 32, 64: 128, 128: 256}
    assert costed.set_index("batch_size")["steps_to_target"].to_dict() == {32: 1, 64: 2, 128: 2}
    assert "reached at B=32 but not at B=64,128" in notes[0] and "val/acc >= 0.6" in notes[1]


def test_configured_target_reached_everywhere_uses_the_logged_costs():
    df = trials({"batch_size": 32}, {"batch_size": 64})
    df["target/steps"], df["target/samples"], df["target/time_s"] = [4.0, 3.0], [128.0, 192.0], [0.4, 0.3]
    target, costed, notes = co.targeted(fake_study(df, {}))
    assert target.source == "configured" and notes == []
    assert costed["steps_to_target"].tolist() == [4.0, 3.0]


# ---------------------------------------------------------------- LR
def parabola_trials(batch_size: int, best_lr: float, lrs, diverge_above: float = INF) -> list[dict]:
    return [{"batch_size": batch_size, LR: lr, "lr_multiplier": lr,
             "status": "diverged" if lr > diverge_above else "completed",
             "best/val_loss": 1.0 + (math.log(lr) - math.log(best_lr)) ** 2} for lr in lrs]


def test_best_lr_is_refined_between_grid_points_and_flags_the_grid_edge():
    lrs = [0.05, 0.1, 0.2, 0.4, 0.8]
    df = trials(*parabola_trials(32, 0.3, lrs), *parabola_trials(64, 2.0, lrs))
    best = an.best_lr(an.lr_grid(df)).set_index("batch_size")
    assert best.loc[32, "lr_grid"] == 0.4 and best.loc[32, "lr_refined"] == pytest.approx(0.3, rel=1e-6)
    assert best.loc[32, "edge"] == "" and best.loc[64, "edge"] == "high" and best.loc[64, "lr_refined"] == 0.8


def test_a_pruned_neighbour_of_the_best_lr_does_not_move_the_refined_lr():
    """ASHA stopped lr 0.2 early: its best loss (2.0, against 1.48 at the full budget) is of a
    shorter budget and would push the vertex towards 0.8. Refinement then stops at the grid point; a pruned seed of the winning
    configuration counts, one of a losing configuration at the same LR does not."""
    rows = parabola_trials(32, 0.4, [0.1, 0.2, 0.4, 0.8])
    rows[1].update(status="pruned", **{"best/val_loss": 2.0})
    best = an.best_lr(an.lr_grid(trials(*rows))).iloc[0]
    assert best["lr_grid"] == 0.4 and best["lr_refined"] == 0.4
    rows[1].update(status="completed")  # the same loss at the full budget: a real asymmetry, refined
    assert 0.4 < an.best_lr(an.lr_grid(trials(*rows))).iloc[0]["lr_refined"] < 0.8
    rows[1].update(status="pruned")
    loser = {"batch_size": 32, LR: 0.2, "lr_multiplier": 0.2, "status": "completed",
             "best/val_loss": 1 + math.log(2) ** 2, "warmup.epochs": 1.0}  # the full-budget value at 0.2
    axes = ("batch_size", "lr_multiplier", "warmup.epochs", "seed")
    grid = an.lr_grid(trials(*rows, loser, axes=axes))
    assert grid.set_index(LR).loc[0.2, "pruned"] == 0.0  # the winner at 0.2 is the completed one
    assert an.best_lr(grid).iloc[0]["lr_refined"] == pytest.approx(0.4, rel=1e-6)


def test_a_diverged_lr_is_never_best_and_one_diverged_seed_of_three_is_outvoted():
    df = trials(*parabola_trials(32, 0.3, [0.1, 0.2, 0.4, 0.8], diverge_above=0.5),
                {LR: 0.4, "lr_multiplier": 0.4, "seed": 1, "best/val_loss": 1.05},
                {LR: 0.4, "lr_multiplier": 0.4, "seed": 2, "status": "diverged"})
    grid = an.lr_grid(df).set_index(LR)
    assert grid.loc[0.8, "value"] == INF and grid.loc[0.8, "diverged"] == 1.0
    # seeds at 0.4: 1.083, 1.05 and diverged (inf): the median is 1.083
    assert grid.loc[0.4, "value"] == pytest.approx(1 + math.log(4 / 3) ** 2)
    assert grid.loc[0.4, "diverged"] == pytest.approx(1 / 3)
    best = an.best_lr(an.lr_grid(df)).iloc[0]
    assert best["lr_grid"] in (0.2, 0.4) and 0.2 <= best["lr_refined"] <= 0.4


def test_lr_law_recovers_linear_scaling_and_needs_three_batch_sizes():
    rows = [r for b in (32, 64, 128, 256) for r in parabola_trials(b, 0.01 * b, [0.0025 * b * 2 ** k for k in range(5)])]
    fit, notes = an.lr_law(an.best_lr(an.lr_grid(trials(*rows))))
    assert fit.alpha == pytest.approx(1.0, abs=1e-6) and fit.verdict == "linear" and notes == []
    fit, notes = an.lr_law(an.best_lr(an.lr_grid(trials(*rows[:10]))))
    assert fit is None and "3 or more" in notes[0]


# ---------------------------------------------------------------- critical batch size, rules, divergence
def test_critical_batch_fit_and_regimes_from_a_perfect_hyperbola():
    bs = np.array([16, 32, 64, 128, 256, 512, 1024, 2048])
    costs = pd.DataFrame({"batch_size": bs, "steps_to_target": 100 * (1 + 128 / bs), "reached": True})
    fit, notes = co.critical_batch(costs)
    assert fit.b_crit == pytest.approx(128, rel=1e-3) and notes == []
    assert [co.regime(b, fit) for b in (16, 128, 1024)] == ["perfect scaling", "diminishing returns", "plateau"]
    fit, notes = co.critical_batch(costs.head(2))
    assert fit is None and "3 or more" in notes[0]


def test_rule_gaps_compare_multiplier_one_with_the_tuned_lr_per_warmup():
    rows = [{"batch_size": 256, "scaling.rule": rule, "lr_multiplier": m, "warmup.epochs": w, "best/val_loss": loss}
            for rule, m, w, loss in [("linear", 1.0, 0.0, 2.0), ("linear", 0.25, 0.0, 1.2), ("sqrt", 1.0, 0.0, 1.5),
                                     ("sqrt", 4.0, 0.0, 1.4), ("linear", 1.0, 1.0, 1.1), ("linear", 0.25, 1.0, 1.3)]]
    df = trials(*rows, axes=("batch_size", "lr_multiplier", "scaling.rule", "warmup.epochs"))
    gaps = an.rule_gaps(df).set_index(["scaling.rule", "warmup.epochs"])["gap"]
    assert gaps[("linear", 0.0)] == pytest.approx(0.8) and gaps[("sqrt", 0.0)] == pytest.approx(0.3)
    assert gaps[("linear", 1.0)] == pytest.approx(0.0)  # with warmup, the linear rule is the tuned optimum
    assert an.rule_gaps(df[df["lr_multiplier"] != 1.0]).empty


def test_a_target_met_at_the_first_evaluation_is_named_as_a_bound():
    """1,600 training samples, an evaluation every quarter epoch: B=32 first evaluates after ceil(12.5) = 13
    steps, B=64 after 7, B=128 after 4 (416, 448 and 512 samples). B=32 met the target before then, somewhere
    in its first 416 samples; B=64 and 128 at later evaluations, each within one interval."""
    df = trials(*({"batch_size": b, "eval_every": 0.25, "samples": 1600.0, "epoch": 1.0} for b in (32, 64, 128)))
    df["target/steps"] = [12.0, 12.0, 9.0]
    df["target/samples"], df["target/time_s"] = df["target/steps"] * df["batch_size"], df["target/steps"]
    assert co.first_evaluation(df).tolist() == [416.0, 448.0, 512.0]
    notes = an.analyze(fake_study(df, {})).notes
    assert [n for n in notes if "first evaluation" in n] == [
        "B=32 reached the target at the first evaluation: the cost to target there is only an upper bound "
        "(the critical batch size fit takes it as measured); lower eval_every"]
    assert not any("first evaluation" in n for n in an.analyze(fake_study(df.drop(columns="epoch"), {})).notes)


def test_divergence_map_gives_the_smallest_diverging_lr_and_the_largest_stable_one():
    df = trials({LR: 0.1}, {LR: 0.4}, {LR: 1.6, "status": "diverged"}, {LR: 0.8, "status": "diverged"},
                {"batch_size": 64, LR: 0.2})
    d = an.divergence_map(df).set_index("batch_size")
    assert d.loc[32, "diverges_at"] == 0.8 and d.loc[32, "stable_up_to"] == 0.4 and d.loc[32, "n_diverged"] == 2
    assert np.isnan(d.loc[64, "diverges_at"]) and d.loc[64, "stable_up_to"] == 0.2


# ---------------------------------------------------------------- memory
def memory_trials() -> pd.DataFrame:
    rows = [  # (B, micro-batch, precision, peak MB, steps to target; time = steps / 10)
        (32, 32, "fp32", 100.0, 50), (128, 128, "fp32", 400.0, 20), (128, 32, "fp32", 120.0, 25),
        (512, 512, "fp32", 1600.0, 10), (512, 512, "bf16", 900.0, 12), (512, 128, "bf16", 300.0, 60)]
    df = trials(*[{"batch_size": b, "micro_batch_size": mb, "precision": p, "mem/peak_mb": mem}
                  for b, mb, p, mem, _ in rows], axes=("batch_size", "micro_batch_size", "precision"))
    return with_costs(df, [r[4] for r in rows])


def test_memory_frontier_and_recommendation_under_a_budget():
    mem = co.memory_table(memory_trials())
    front = {(r.batch_size, r.micro_batch_size, r.precision) for r in mem[mem["on_frontier"]].itertuples()}
    assert front == {(32, 32, "fp32"), (128, 32, "fp32"), (128, 128, "fp32"), (512, 512, "bf16"), (512, 512, "fp32")}
    row, verdict = co.recommend(mem, 1000)
    assert (row["batch_size"], row["precision"]) == (512, "bf16") and "within 1000 MB" in verdict
    row, _ = co.recommend(mem, 350)
    assert (row["batch_size"], row["micro_batch_size"]) == (128, 32)
    row, _ = co.recommend(mem, None)
    assert (row["batch_size"], row["precision"]) == (512, "fp32")
    row, verdict = co.recommend(mem, 50)
    assert row is None and "smallest needs 100 MB" in verdict


def test_a_batch_size_that_ran_out_of_memory_holds_that_peak_in_the_memory_table():
    """An oom trial's peak is what a budget must hold for its batch size: the table took only the trials
    that fit, and recommended batch 512 'within 33 MB' beside a 512 trial that ran out at 38 MB."""
    df = with_costs(trials({"batch_size": 32, "mem/peak_mb": 27.0}, {"batch_size": 512, "mem/peak_mb": 29.0},
                           {"batch_size": 512, "lr_multiplier": 2.0, "mem/peak_mb": 38.0, "status": "oom"}),
                    [12, 1, np.inf])
    mem = co.memory_table(df).set_index("batch_size")
    assert mem.loc[512, "peak_mb"] == 38.0 and mem.loc[32, "peak_mb"] == 27.0
    row, _ = co.recommend(co.memory_table(df), 33)
    assert row["batch_size"] == 32



def test_the_memory_table_keeps_the_micro_batch_that_ran():
    """parallel.max_micro_batch leaves micro_batch_size null, which read as the whole batch: a batch-64 trial
    split 1x16x4 (1.7 MB) shared the row for micro-batch 64 with a 1x64x1 one (3.8 MB), whose peak it got."""
    def record(i, max_micro, split, peak):
        params = {"batch_size": "64", "micro_batch_size": "null", "parallel.max_micro_batch": max_micro,
                  "derived.split": split, "precision": "fp32", "lr.effective": "0.1", "seed": "0"}
        return {"trial": f"t{i}", "run_name": f"t{i}", "status": "completed", "params": params,
                "metrics": {"mem/peak_mb": peak, "time/samples_per_s": 1e4, "target/time_s": 1.0 + i}}
    df = an.trials_frame([record(0, "16", "1x16x4", 1.7), record(1, "256", "1x64x1", 3.8),
                          record(2, "null", "2x32x1", 2.0)], axes=["parallel.max_micro_batch"])
    assert df.set_index("trial")["micro_batch_size"].to_dict() == {"t0": 16, "t1": 64, "t2": 32}
    mem = co.memory_table(co.logged_costs(df)).set_index("micro_batch_size")
    assert mem["peak_mb"].to_dict() == {16: 1.7, 32: 2.0, 64: 3.8}

# ---------------------------------------------------------------- the whole analysis
def test_analyze_without_results_raises_one_line():
    df = trials({"status": "diverged"}, {"status": "diverged", "batch_size": 64})
    with pytest.raises(StudyError, match="no completed trials .diverged 2.: nothing to report"):
        an.analyze(fake_study(df, {}))


def test_analyze_one_batch_size_reports_what_it_can():
    df = with_costs(trials(*parabola_trials(32, 0.3, [0.1, 0.2, 0.4])), [5, 4, 6])
    for col, src in (("target/steps", "steps_to_target"), ("target/samples", "samples_to_target"),
                     ("target/time_s", "time_to_target_s")):
        df[col] = df[src]
    a = an.analyze(fake_study(df, {}))
    assert a.lr_fit is None and a.crit_fit is None
    assert any("one batch size" in n for n in a.notes)
    assert a.summary().iloc[0]["steps_to_target"] == 4
