"""The analysis of studies recorded in a real MLflow store, from configs Hydra really composed.

Each study is written by the study driver's own recorder (StudyRecorder) with made-up evaluations
instead of training, so a grid the report must handle with care (an `lr=` sweep, one LR per batch
size) costs a second, not a study; `load_study` and `analyze` then read it back as a report does.
"""
from __future__ import annotations

import io
import math
import json

import pytest

from scaling.analysis import analyze, load_study
from scaling.report import ReportResult, print_report
from scaling.study_record import StudyRecorder

BATCHES = (16, 64, 256)


def record_study(uri: str, compose_cfg, trials: list[tuple[list[str], list[float]]], axes: dict,
                 extra: tuple[dict, ...] = ()) -> None:
    """Record one study: per trial its overrides and its val/loss at each evaluation (every 0.25 epoch),
    with extra[i]'s values at each of trial i's evaluations."""
    rec = StudyRecorder(uri, "scaling", study_name="recorded")
    rec.start({"grid": json.dumps({"axes": axes, "sampled": {}})}, {})
    for i, (overrides, losses) in enumerate(trials):
        cfg = compose_cfg("data.n_samples=2000", "epochs=1", "eval_every=0.25", *overrides)
        rec.trial_started(i, cfg)
        every = max(1, round(0.25 * 1600 / cfg.batch_size))
        for k, loss in enumerate(losses, 1):
            samples = k * every * cfg.batch_size
            rec.trial_metrics(i, {"samples": samples, "step": k * every, "epoch": samples / 1600, "val/loss": loss,
                                  "val/acc": 1 - loss / 3, "best/val_loss": min(losses[:k]),
                                  "time/elapsed_s": 0.1 * k, "time/samples_per_s": 1e4, "mem/peak_mb": 5.0,
                                  **(extra[i] if i < len(extra) else {})})
        rec.trial_finished(i, "completed", summary={"best/val_loss": min(losses)})
    rec.finish(len(trials), 1, 1, {})


def report_text(uri: str) -> tuple[object, str]:
    """Return the analysis of the store's study and its terminal report."""
    study = load_study(None, uri)
    a = analyze(study)
    out = io.StringIO()
    print_report(ReportResult(study, a), logged=False, file=out)
    return a, out.getvalue()


# ---------------------------------------------------------------- an lr= sweep compares no rule
def test_an_lr_sweep_bypasses_the_rule_so_the_rule_table_is_left_out_with_a_note(tracking_uri, compose_cfg):
    """`lr=` trials train no rule's LR (lr_multiplier stays 1): comparing them with "the rule at
    lr_multiplier=1" gave a gap of 0 at every batch size, a perfect fit of a rule never applied."""
    loss = {0.01: 2.0, 0.1: 1.8, 0.5: 1.9}
    trials = [([f"batch_size={b}", f"lr={lr}"], [loss[lr] + 0.1, loss[lr]]) for b in BATCHES for lr in loss]
    record_study(tracking_uri, compose_cfg, trials, {"batch_size": BATCHES, "lr": list(loss)})
    a, text = report_text(tracking_uri)
    assert a.trials["lr.rule_bypassed"].all()
    assert a.rules.empty, a.rules
    assert "Scaling rules" not in text, text
    assert ("note: rule comparison: no trial trained its scaling.rule's LR at lr_multiplier=1 (9 of 9 set lr=, "
            "lr.rule_bypassed=True" in " ".join(text.split())), text


def test_lr_trials_beside_rule_trials_count_as_lrs_tried_never_as_the_rule(tracking_uri, compose_cfg):
    """A rule trial at lr_multiplier=1 is compared with the best LR tried, an `lr=` one included; the
    `lr=` trial at the rule's own multiplier (1) is no row of the table."""
    trials = []
    for b in BATCHES:
        trials += [([f"batch_size={b}"], [1.6, 1.5]),  # the linear rule's LR
                   ([f"batch_size={b}", "lr_multiplier=2"], [1.5, 1.4]),
                   ([f"batch_size={b}", "lr=0.5"], [1.3, 1.2])]  # lr_multiplier=1 too, but no rule's
    record_study(tracking_uri, compose_cfg, trials, {"batch_size": BATCHES, "lr_multiplier": [1, 2], "lr": [None, 0.5]})
    a, _ = report_text(tracking_uri)
    rules = a.rules.set_index("batch_size")
    assert sorted(rules.index) == list(BATCHES) and (rules["scaling.rule"] == "linear").all()
    assert rules["loss_at_1"].tolist() == pytest.approx([1.5] * 3)  # the rule trial's, not the lr=0.5 one's
    assert rules["tuned"].tolist() == pytest.approx([1.2] * 3) and rules["tuned_lr"].tolist() == [0.5] * 3
    assert rules["gap"].tolist() == pytest.approx([0.3] * 3)


# ---------------------------------------------------------------- one LR per batch size tunes nothing
def test_one_lr_per_batch_size_fits_no_lr_law(tracking_uri, compose_cfg):
    """With the rule's LR alone at each batch size, "best LR ~ B^alpha" fitted the rule back
    (alpha = 1.00, CI 1.00 to 1.00, "linear holds up to B=256") and the rule table showed it as
    the tuned LR (gap 0): nothing was chosen."""
    record_study(tracking_uri, compose_cfg, [([f"batch_size={b}"], [2.0, 1.8]) for b in BATCHES],
                 {"batch_size": BATCHES})
    a, text = report_text(tracking_uri)
    assert a.lr_fit is None
    assert a.best["edge"].tolist() == ["only"] * 3 and a.best["lr_refined"].isna().all()
    flat = " ".join(text.split())
    assert "LR scaling: not fitted" in flat and "holds up to" not in flat and "alpha =" not in flat, text
    assert ("note: LR scaling law: not fitted: needs a best LR chosen among 2 or more LRs at 3 or more batch "
            "sizes, found 0 (one LR tried at B=16,64,256: sweep lr_multiplier there)") in flat, text
    assert "(only LR tried)" in flat
    assert a.rules.empty and "Scaling rules" not in flat
    assert ("note: rule comparison: needs 2 or more LRs tried at a batch size to tune its rule's LR against, "
            "found one at B=16,64,256: sweep lr_multiplier") in flat, text


def test_the_lr_law_uses_only_batch_sizes_that_chose_among_lrs(tracking_uri, compose_cfg):
    """B=1024 tried one LR, a quarter of the rule's: it is no point of the fit, nor of "holds up to"."""
    loss = {0.5: 1.6, 1: 1.5, 2: 1.6}  # the rule's LR is best at every tuned batch size
    trials = [([f"batch_size={b}", f"lr_multiplier={m}"], [v + 0.1, v]) for b in BATCHES for m, v in loss.items()]
    trials.append((["batch_size=1024", "lr_multiplier=0.25"], [1.9, 1.7]))
    record_study(tracking_uri, compose_cfg, trials, {"batch_size": [*BATCHES, 1024], "lr_multiplier": [0.25, *loss]})
    a, text = report_text(tracking_uri)
    f = a.lr_fit
    assert f.n_points == 3 and f.alpha == pytest.approx(1.0, abs=1e-6) and f.verdict == "linear" and f.up_to == 256
    best = a.best.set_index("batch_size")
    assert best.loc[1024, "edge"] == "only" and best["lr_refined"].isna().tolist() == [False] * 3 + [True]
    assert ("note: LR scaling law: fitted without the batch sizes that tried one LR (one LR tried at B=1024"
            in " ".join(text.split())), text


# ---------------------------------------------------------------- the noise scale, per batch size
def test_b_simple_is_reported_per_batch_size(tracking_uri, compose_cfg):
    """The line said 'median over trials' and printed the median of the batch sizes' medians (165 for
    trials whose median was 160): it now gives each batch size's median over its trials."""
    trials = [([f"batch_size={b}", f"lr_multiplier={m}"], [1.6, 1.5 - 0.1 * m]) for b in (16, 64) for m in (1, 2)]
    b_simple = ({"gns/b_simple": 140.0}, {"gns/b_simple": 166.0}, {"gns/b_simple": 150.0}, {"gns/b_simple": 206.0})
    record_study(tracking_uri, compose_cfg, trials, {"batch_size": [16, 64], "lr_multiplier": [1, 2]}, b_simple)
    _, text = report_text(tracking_uri)
    assert "B_simple (gradient noise scale, the median over each batch size's trials): 16: 153, 64: 178" in \
        " ".join(text.split()), text


# ---------------------------------------------------------------- the recommendation
def test_the_recommendation_names_the_configuration_beside_its_lr(tracking_uri, compose_cfg):
    """Over an optimizer axis the recommendation said "batch size 64, ..., lr 0.025", the LR of adam at
    half the rule's, and named neither: an LR with no optimizer is no configuration to run."""
    trials = [([f"batch_size={b}", f"optimizer={o}", f"lr_multiplier={m}"],
               [0.8, 0.7] if (o, m) == ("adam", 0.5) else [1.2, 0.85])  # target val/acc >= 0.7: loss <= 0.9
              for b in (16, 64) for o in ("sgd", "adam") for m in (0.5, 1)]
    record_study(tracking_uri, compose_cfg, trials,
                 {"batch_size": [16, 64], "optimizer": ["sgd", "adam"], "lr_multiplier": [0.5, 1]})
    a, text = report_text(tracking_uri)
    assert a.recommendation["optimizer.name"] == "adam" and a.recommendation["lr_multiplier"] == 0.5
    assert "(optimizer.name=adam, lr_multiplier=0.5):" in a.verdict, a.verdict
    assert "(optimizer.name=adam, lr_multiplier=0.5):" in " ".join(text.split()), text


# ---------------------------------------------------------------- a group axis over a user's own configs
def test_a_group_axis_over_configs_of_one_architecture_keeps_them_apart(tracking_uri, compose_cfg, tmp_path):
    """`model=small,big`, a user's two configs with `name: mlp`: the report told the options apart by model.name
    alone, so at each LR it took the median of the two models as if they were seeds, and gave a best val/loss
    (1.25 here) that no trial had."""
    conf = tmp_path / "conf" / "model"
    conf.mkdir(parents=True)
    for name, depth in (("small", 1), ("big", 3)):
        (conf / f"{name}.yaml").write_text(f"name: mlp\nwidth: 32\ndepth: {depth}\n")
    search = f"hydra.searchpath=[file://{tmp_path / 'conf'}]"
    loss = {("small", 1): 1.0, ("small", 2): 1.1, ("big", 1): 1.5, ("big", 2): 1.4}
    trials = [([search, f"model={m}", f"batch_size={b}", f"lr_multiplier={k}"], [v + 0.1, v])
              for b in BATCHES for (m, k), v in loss.items()]
    record_study(tracking_uri, compose_cfg, trials,
                 {"model": ["small", "big"], "batch_size": list(BATCHES), "lr_multiplier": [1, 2]})
    a, _ = report_text(tracking_uri)
    assert "model.depth" in a.trials.attrs["axes"], a.trials.attrs["axes"]
    assert (a.grid["n_seeds"] == 1).all(), a.grid
    assert a.best["best"].tolist() == pytest.approx([1.0] * 3) and a.best["edge"].tolist() == ["low"] * 3
    assert "model.depth=1" in a.verdict, a.verdict


def test_the_lr_law_line_says_how_far_each_rule_holds(tracking_uri, compose_cfg):
    """Linear up to B=256, the same LR past it: the line named only the verdict's reach ("sqrt holds up
    to B=4096"), never where linear scaling stops, which is what the study was run to find."""
    mults = [1 / 64, 1 / 16, 1 / 4, 1, 4]
    batches = [16 * 2 ** k for k in range(9)]  # 16 ... 4096
    best_m = {b: min(1, 256 / b) for b in batches}  # the best LR is the rule's up to 256, then flat
    trials = [([f"batch_size={b}", f"lr_multiplier={m}"], [1.5 + 0.1 * abs(math.log(m / bm, 2))] * 2)
              for b, bm in best_m.items() for m in mults]
    record_study(tracking_uri, compose_cfg, trials, {"batch_size": batches, "lr_multiplier": mults})
    a, text = report_text(tracking_uri)
    f = a.lr_fit
    assert f.n_points == 9 and f.verdict != "linear" and f.up_to == f.holds_up_to[f.verdict]
    assert f.holds_up_to["linear"] in (256, 512)  # one point past the break is not yet evidence against it
    line = " ".join(text.split()).split("LR scaling: ")[1].split(" Critical batch size")[0]
    assert f"; linear holds up to B={f.holds_up_to['linear']:g}" in line, line
    assert f"{f.verdict} holds up to B={f.up_to:g}" in line, line


def test_rules_of_one_reach_are_named_together():
    """With a wide interval every rule held to the largest B, and the line said so three times over."""
    from scaling.report import _reach

    assert _reach({"none": 2048.0, "sqrt": 2048.0, "linear": 2048.0}) == "; linear, sqrt and none hold up to B=2048"
    assert _reach({"none": 1024.0, "sqrt": 4096.0, "linear": 1024.0}) == \
        "; linear and none hold up to B=1024; sqrt holds up to B=4096"
    assert _reach({"none": None, "sqrt": None, "linear": None}) == ""
