"""Tests of the stratified ASHA scheduler: synthetic curves driven by hand, then one real Tune run."""
from __future__ import annotations

import math
import random
import time

import pytest
from ray.tune.experiment import Trial
from ray.tune.schedulers import TrialScheduler

from scaling.asha import StratifiedASHA, get_dotted, rung_levels

MAX_T, GRACE, RF = 9.0, 0.75, 3  # rungs 0.75, 2.25, 6.75; reports every 0.5 epoch land after them
MULTIPLIERS = [0.25, 0.5, 1.0, 2.0, 4.0, 8.0]
# Final accuracy per multiplier. Small batches learn fast; large ones slowly but end higher.
FINAL = {32: [0.74, 0.78, 0.80, 0.77, 0.72, 0.70], 512: [0.80, 0.86, 0.92, 0.89, 0.83, 0.77]}


def curve(batch_size: int, i: int, t: float) -> float:
    """Return the synthetic val/acc of multiplier index i after t epochs."""
    if batch_size == 32:
        return FINAL[32][i] * t / (t + 0.5)
    return FINAL[512][i] * (t / MAX_T) ** 2


def make_trials() -> list[Trial]:
    """Return stub trials s0..s5 (batch 32) then l0..l5 (batch 512); no Ray needed."""
    return [Trial("fake", stub=True, trial_id=f"{'s' if bs == 32 else 'l'}{i}",
                  config={"batch_size": bs, "lr_multiplier": m, "seed": 0, "scaling": {"rule": "linear"}})
            for bs in (32, 512) for i, m in enumerate(MULTIPLIERS)]


def drive(sched: StratifiedASHA, trials: list[Trial]) -> set[str]:
    """Return the ids of trials that ran to MAX_T, reporting round-robin every 0.5 epoch."""
    for trial in trials:
        sched.on_trial_add(None, trial)
    alive, finished = list(trials), set()
    for step in range(1, int(2 * MAX_T) + 1):
        t = step / 2
        for trial in list(alive):  # small batches report first at every step
            i = MULTIPLIERS.index(trial.config["lr_multiplier"])
            acc = curve(trial.config["batch_size"], i, t)
            action = sched.on_trial_result(None, trial, {"epoch": t, "val/acc": acc})
            if action == TrialScheduler.STOP:
                alive.remove(trial)
                sched.on_trial_complete(None, trial, {})
                if t >= MAX_T:
                    finished.add(trial.trial_id)
    return finished


def asha(**kw) -> StratifiedASHA:
    return StratifiedASHA(metric="val/acc", mode="max", max_t=MAX_T, grace_period=GRACE, reduction_factor=RF,
                          axes=["batch_size", "lr_multiplier", "seed"], **kw)


def test_rungs_are_floats_below_max_t():
    assert rung_levels(0.75, 9.0, 3) == [0.75, 2.25, 6.75]
    assert rung_levels(1.0, 9.0, 3) == pytest.approx([1.0, 3.0])  # no rung at max_t itself
    assert rung_levels(1.0, 1.0, 3) == []


def test_plain_asha_prunes_the_large_batch_stratified_keeps_it():
    assert max(FINAL[512]) * 1.0 > max(FINAL[32]) * MAX_T / (MAX_T + 0.5)  # large batch wins at the end
    plain = asha(stratified=False)
    assert drive(plain, make_trials()) == {"s0", "s1", "s2"}
    assert plain.pruned_trial_ids == {"s3", "s4", "s5", "l0", "l1", "l2", "l3", "l4", "l5"}

    strat = asha()
    assert strat.group_by == ["batch_size"]
    # Within each stratum, in arrival order: the first always continues; then each trial
    # must reach the 2/3 percentile of the values recorded before it (see the module docstring).
    assert drive(strat, make_trials()) == {"s0", "s1", "s2", "l0", "l1", "l2", "l3"}
    assert strat.pruned_trial_ids == {"s3", "s4", "s5", "l4", "l5"}
    stops = [(d.trial_id, d.rung, d.time) for d in strat.decisions if d.action == "stop"]
    assert stops == [("s3", 0.75, 1.0), ("s4", 0.75, 1.0), ("s5", 0.75, 1.0), ("l4", 0.75, 1.0), ("l5", 0.75, 1.0)]
    # Survivors are judged at the first report at or past each rung, once per rung.
    l2 = [(d.rung, d.time, d.action) for d in strat.decisions if d.trial_id == "l2"]
    assert l2 == [(0.75, 1.0, "continue"), (2.25, 2.5, "continue"), (6.75, 7.0, "continue")]
    assert {d.stratum for d in strat.decisions} == {(("batch_size", 32),), (("batch_size", 512),)}
    assert "batch_size" in strat.debug_string()


def test_random_async_orders_never_prune_a_stratum_whole():
    rng = random.Random(0)
    for _ in range(200):
        sched, trials = asha(), make_trials()
        for trial in trials:
            sched.on_trial_add(None, trial)
        level = {trial.trial_id: rng.random() for trial in trials}
        clock, alive, finished = {tr.trial_id: 0.0 for tr in trials}, list(trials), set()
        while alive:  # random interleaving; a step of 1.5 epochs can jump over a rung
            trial = rng.choice(alive)
            clock[trial.trial_id] = t = min(MAX_T, clock[trial.trial_id] + rng.choice([0.5, 1.0, 1.5]))
            result = {"epoch": t, "val/acc": level[trial.trial_id] + rng.gauss(0, 0.2)}
            if sched.on_trial_result(None, trial, result) == TrialScheduler.STOP:
                alive.remove(trial)
                if t >= MAX_T:
                    finished.add(trial.trial_id)
        best: dict = {}
        for d in sched.decisions:  # the best so far at a rung within its stratum always continues
            key = (d.stratum, d.rung)
            if d.value >= best.get(key, -math.inf):
                assert d.action == "continue", d
            best[key] = max(best.get(key, -math.inf), d.value)
        assert {tid[0] for tid in finished} == {"s", "l"}  # each batch size reached max_t


@pytest.mark.parametrize("bad", [{"val/acc": math.nan}, {"val/acc": math.inf}, {"val/acc": 0.99, "trial_status": "diverged"}])
def test_non_finite_or_diverged_stops_at_once_and_never_sets_the_cutoff(bad):
    sched = StratifiedASHA(metric="val/acc", mode="max", max_t=9, grace_period=1, axes=["batch_size", "lr_multiplier"])
    a, b, c, d = [Trial("fake", stub=True, trial_id=x, config={"batch_size": 32, "lr_multiplier": i})
                  for i, x in enumerate("abcd")]
    for trial in (a, b, c, d):
        sched.on_trial_add(None, trial)
    assert sched.on_trial_result(None, a, {"epoch": 0.5, "val/acc": 0.1}) == TrialScheduler.CONTINUE
    assert sched.on_trial_result(None, a, {"epoch": 1.0, **bad}) == TrialScheduler.STOP  # at a rung
    assert sched.on_trial_result(None, b, {"epoch": 0.5, **bad}) == TrialScheduler.STOP  # before any rung
    assert sched.diverged_trial_ids == {"a", "b"} and not sched.pruned_trial_ids
    assert [(x.rung, x.reason) for x in sched.decisions] == [(1.0, "diverged"), (None, "diverged")]
    # The diverged value counts as the worst at rung 1: c continues, whatever it reports.
    assert sched.on_trial_result(None, c, {"epoch": 1.0, "val/acc": 0.5}) == TrialScheduler.CONTINUE
    # Recorded {a: -inf, c: 0.5}: the cutoff is 0.5, not -inf (nor 0.99), so d at 0.3 stops.
    assert sched.on_trial_result(None, d, {"epoch": 1.0, "val/acc": 0.3}) == TrialScheduler.STOP
    assert sched.pruned_trial_ids == {"d"}


def test_min_mode_and_budget_stop_is_not_a_pruning():
    sched = StratifiedASHA(metric="val/loss", mode="min", max_t=2, grace_period=1, axes=["batch_size"])
    a, b = [Trial("fake", stub=True, trial_id=x, config={"batch_size": 8}) for x in "ab"]
    for trial in (a, b):
        sched.on_trial_add(None, trial)
    assert sched.on_trial_result(None, a, {"epoch": 1, "val/loss": 0.5}) == TrialScheduler.CONTINUE
    assert sched.on_trial_result(None, b, {"epoch": 1, "val/loss": 0.9}) == TrialScheduler.STOP  # higher loss
    assert sched.on_trial_result(None, a, {"epoch": 2, "val/loss": 0.4}) == TrialScheduler.STOP  # budget spent
    assert sched.pruned_trial_ids == {"b"}


def test_group_by_default_and_override():
    cfg = lambda bs, rule, m, seed: {"batch_size": bs, "lr_multiplier": m, "seed": seed, "scaling": {"rule": rule}}
    assert get_dotted(cfg(32, "sqrt", 1, 0), "scaling.rule") == "sqrt"
    assert get_dotted({}, "scaling.rule") is None
    sched = StratifiedASHA(metric="m", mode="max", axes=["batch_size", "scaling.rule", "lr_multiplier", "seed", "lr"])
    assert sched.group_by == ["batch_size", "scaling.rule"]
    assert sched.stratum_of(cfg(32, "sqrt", 1, 0)) == sched.stratum_of(cfg(32, "sqrt", 4, 3))
    assert sched.stratum_of(cfg(32, "sqrt", 1, 0)) != sched.stratum_of(cfg(32, "linear", 1, 0))
    merged = StratifiedASHA(metric="m", mode="max", group_by=["batch_size"], axes=["batch_size", "scaling.rule"])
    assert merged.stratum_of(cfg(32, "sqrt", 1, 0)) == merged.stratum_of(cfg(32, "linear", 2, 1)) == (("batch_size", 32),)
    assert StratifiedASHA(group_by=[]).stratum_of(cfg(32, "sqrt", 1, 0)) == ()


def test_a_config_group_and_a_key_under_it_are_both_axes_of_a_stratum():
    """optimizer=sgd,adam optimizer.momentum=0.5,0.9: a grid point nested its axes, so the group's choice
    (a string) had no room for the key under it, and the study died with a TypeError before it began."""
    from scaling.study import TrialSpec
    from scaling.study_runner import _point

    axes = ["point.optimizer", "point.optimizer.momentum", "point.batch_size", "point.lr_multiplier"]
    sched = StratifiedASHA(metric="m", mode="max", group_by=axes[:3], axes=axes)
    point = lambda opt, mom, m: {"point": _point(TrialSpec(0, {}, {"optimizer": opt, "optimizer.momentum": mom,
                                                                   "batch_size": 32, "+lr_multiplier": m}))}
    assert sched.stratum_of(point("sgd", 0.5, 1)) == (("point.optimizer", "sgd"), ("point.optimizer.momentum", 0.5),
                                                      ("point.batch_size", 32))
    assert sched.stratum_of(point("sgd", 0.5, 1)) == sched.stratum_of(point("sgd", 0.5, 4))
    assert len({sched.stratum_of(point(o, m, 1)) for o in ("sgd", "adam") for m in (0.5, 0.9)}) == 4
    assert get_dotted({"point": {"a": {"b": 1}, "c.d": 2}}, "point.c.d") == 2 and get_dotted({"a": "x"}, "a.b") is None
    assert StratifiedASHA(stratified=False, axes=["batch_size"]).group_by == []
    with pytest.raises(ValueError, match="metric"):
        StratifiedASHA(axes=["batch_size"]).on_trial_add(None, make_trials()[0])


class _Controller:
    """The one method of Tune's controller that choose_trial_to_run reads."""

    def __init__(self, trials: list[Trial]):
        self.trials = trials

    def get_trials(self) -> list[Trial]:
        return self.trials


def start_order(sched: StratifiedASHA, trials: list[Trial]) -> list[str]:
    """Return the ids in the order the scheduler starts them, one slot at a time."""
    order = []
    while (trial := sched.choose_trial_to_run(_Controller(trials))) is not None:
        trial.set_status(Trial.RUNNING)
        order.append(trial.trial_id)
    return order


def test_trials_start_at_the_rules_lr_and_move_outward_interleaving_strata():
    trials = make_trials()  # s0..s5, l0..l5: multipliers 0.25 .. 8 in list order
    random.Random(3).shuffle(trials)  # the study's seeded shuffle: it only breaks ties
    sched = asha()
    for trial in trials:
        sched.on_trial_add(None, trial)
    order = start_order(sched, trials)
    mult = lambda tid: MULTIPLIERS[int(tid[1])]  # noqa: E731
    assert [round(abs(math.log2(mult(t)))) for t in order] == [0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3]
    for i in range(0, 12, 2):  # each pair of equal rank draws from both strata, not one twice
        assert {order[i][0], order[i + 1][0]} == {"s", "l"}, order
    # among equals, the earlier in Tune's (shuffled) list goes first
    assert order[2] == next(t.trial_id for t in trials if mult(t.trial_id) in (0.5, 2.0))
    assert order[0] == next(t.trial_id for t in trials if mult(t.trial_id) == 1.0)


def test_without_an_lr_multiplier_axis_the_order_is_tunes():
    trials = [Trial("fake", stub=True, trial_id=f"t{i}", config={"batch_size": 8, "lr": 10.0 ** -i}) for i in range(4)]
    sched = StratifiedASHA(metric="m", mode="max", axes=["batch_size", "lr"])
    assert sched.lr_key is None and start_order(sched, trials) == ["t0", "t1", "t2", "t3"]
    bad = StratifiedASHA(metric="m", mode="max", axes=["batch_size", "lr_multiplier"])
    assert bad.lr_key == "lr_multiplier"
    assert [bad.lr_distance({"lr_multiplier": v}) for v in (1, "2", 0, -1, "x", None)][2:] == [math.inf] * 4


@pytest.mark.slow
@pytest.mark.parametrize("cpus", [2, 1])
def test_real_tune_run(tmp_path, monkeypatch, cpus):
    import logging

    import ray
    import ray._private.ray_constants as ray_constants
    from ray import tune

    for key, value in {"RAY_DEDUP_LOGS": "0", "RAY_AIR_NEW_OUTPUT": "0", "RAY_USAGE_STATS_ENABLED": "0",
                       "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}.items():
        monkeypatch.setenv(key, value)
    # ray.init maps _node_ip_address="127.0.0.1" to the routable IP and then binds gRPC to every
    # interface, unless "clusters" are off (read at import, hence the setattr too).
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)

    def trainable(config: dict) -> None:
        """Report a synthetic curve every 0.5 epoch up to 4 epochs (defined here: pickled by value)."""
        final = {0.5: 0.8, 1.0: 0.9, 2.0: 0.6}[config["lr_multiplier"]]
        tau = 0.5 if config["batch_size"] == 32 else 8.0
        started = time.time()
        for step in range(1, 9):
            tune.report({"epoch": step / 2, "val/acc": final * step / 2 / (step / 2 + tau), "started": started})
            time.sleep(0.05)

    sched = StratifiedASHA(time_attr="epoch", max_t=4.0, grace_period=1.0, reduction_factor=3,
                           axes=["batch_size", "lr_multiplier"])
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             logging_level=logging.ERROR, configure_logging=False)
    try:
        assert ray.nodes()[0]["NodeManagerAddress"] == "127.0.0.1"
        start = time.time()
        results = tune.Tuner(
            trainable,
            param_space={"batch_size": tune.grid_search([32, 512]), "lr_multiplier": tune.grid_search([0.5, 1.0, 2.0])},
            tune_config=tune.TuneConfig(metric="val/acc", mode="max", scheduler=sched, reuse_actors=True),
            run_config=tune.RunConfig(storage_path=str(tmp_path), name="asha", verbose=0),
        ).fit()
        elapsed = time.time() - start
    finally:
        ray.shutdown()
    assert not results.errors and len(results) == 6
    epochs = {r.config["batch_size"]: [] for r in results}
    for r in results:
        epochs[r.config["batch_size"]].append(r.metrics["epoch"])
    assert all(max(e) == 4.0 for e in epochs.values()), epochs  # every batch size reached max_t
    starts = sorted(results, key=lambda r: r.metrics["started"])
    seen = [(r.config["batch_size"], r.config["lr_multiplier"], round(r.metrics["started"] - starts[0].metrics["started"], 2),
             r.metrics["epoch"]) for r in starts]
    # 1.0 is the best at every rung, so it always goes on; what is pruned is 0.5 or 2.0
    assert all(r.metrics["epoch"] == 4.0 for r in results if r.config["lr_multiplier"] == 1.0), seen
    others = {r.metrics["trial_id"] for r in results if r.config["lr_multiplier"] != 1.0}
    assert sched.pruned_trial_ids and sched.pruned_trial_ids <= others, seen
    if cpus == 1:  # one slot: every start is the scheduler's choice, nearest the rule's LR first
        distances = [abs(math.log2(r.config["lr_multiplier"])) for r in starts]
        assert distances == [0, 0, 1, 1, 1, 1], seen
        assert sorted(sched.pruned_trial_ids) == sorted(others), seen  # each is judged against its 1.0
    assert elapsed < 60


def _replay(sched: StratifiedASHA, trial: Trial, times: list[float], accs: list[float]) -> list[str]:
    return [sched.on_trial_result(None, trial, {"epoch": t, "val/acc": a}) for t, a in zip(times, accs)]


def test_a_resume_seeds_the_rungs_with_finished_trials_and_decides_as_the_uninterrupted_study():
    """Seeded histories (as MLflow holds them, every evaluation) record the same rung values as the
    live reports did, so a trial that reports after a resume meets the same cutoffs."""
    times = [0.5 * k for k in range(1, 19)]
    cfg = {"batch_size": 32, "lr_multiplier": 1.0, "seed": 0}
    good, newcomer = [0.5 + 0.02 * k for k in range(18)], [0.3] * 18

    live = asha()
    first = Trial("fake", stub=True, trial_id="a", config=cfg)
    live.on_trial_add(None, first)
    assert _replay(live, first, times, good)[-1] == TrialScheduler.STOP  # budget spent
    late = Trial("fake", stub=True, trial_id="b", config={**cfg, "lr_multiplier": 2.0})
    live.on_trial_add(None, late)
    assert _replay(live, late, times[:2], newcomer) == [TrialScheduler.CONTINUE, TrialScheduler.STOP]  # at 0.75

    resumed = asha()
    assert resumed.seed("resumed-0", cfg, list(zip(times, good))) == 3  # rungs 0.75, 2.25, 6.75
    for (m, rec), (m2, rec2) in zip(resumed._brackets[resumed.stratum_of(cfg)]._rungs,
                                    live._brackets[live.stratum_of(cfg)]._rungs):
        assert m == m2 and rec["resumed-0"] == rec2["a"]
    again = Trial("fake", stub=True, trial_id="b2", config={**cfg, "lr_multiplier": 2.0})
    resumed.on_trial_add(None, again)
    assert _replay(resumed, again, times[:2], newcomer) == [TrialScheduler.CONTINUE, TrialScheduler.STOP]
    assert resumed.pruned_trial_ids == {"b2"} and not resumed.decisions[0].trial_id.startswith("resumed")

    unseeded = asha()  # what a resume did before: the newcomer is first at its rung and goes on
    alone = Trial("fake", stub=True, trial_id="b3", config={**cfg, "lr_multiplier": 2.0})
    unseeded.on_trial_add(None, alone)
    assert _replay(unseeded, alone, times[:2], newcomer) == [TrialScheduler.CONTINUE] * 2


def test_seeding_a_diverged_or_other_stratum_trial():
    sched = asha()
    cfg = {"batch_size": 32, "lr_multiplier": 1.0, "seed": 0}
    # diverged at 2.5 (NaN): recorded as -inf at the rung it crossed there, nothing after
    assert sched.seed("d", cfg, [(0.5, 0.4), (1.0, 0.5), (2.5, math.nan), (3.0, 0.9)]) == 2
    rungs = dict(sched._brackets[sched.stratum_of(cfg)]._rungs)
    assert rungs[0.75]["d"] == 0.5 and rungs[2.25]["d"] == -math.inf and "d" not in rungs[6.75]
    # ended "oom": its last value is the worst whatever it was
    assert sched.seed("o", cfg, [(1.0, 0.95)], bad=True) == 1
    assert rungs[0.75]["o"] == -math.inf
    # another batch size is another stratum: its rungs are untouched by these
    other = {**cfg, "batch_size": 512}
    assert sched.seed("x", other, [(1.0, 0.1)]) == 1
    assert set(dict(sched._brackets[sched.stratum_of(other)]._rungs)[0.75]) == {"x"}
