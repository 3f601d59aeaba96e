"""Grid points that train what another point trains: which are twins (scaling.twins), and a real
study that runs each pair once and records both runs, against the same study running them all."""
from __future__ import annotations

import itertools
import math
import os
import subprocess

import pytest
from omegaconf import OmegaConf
from procs import stop_group, wait_for_text
from records import study_records
from test_study import BIN, TINY, run_cli

from scaling.twins import find_twins, training_key, whole_strata


def point(compose_cfg, *overrides) -> dict:
    return OmegaConf.to_container(compose_cfg("scaling.ref_batch_size=64", *overrides), resolve=True)


@pytest.mark.parametrize("a, b, twins", [
    # below ref_batch_size a `ref` warmup starts at the trained LR: flat, and a constant schedule is the same
    (["batch_size=32", "warmup.epochs=0"], ["batch_size=32", "warmup.epochs=0.5"], True),
    (["batch_size=64", "warmup.epochs=0"], ["batch_size=64", "warmup.epochs=0.5"], True),  # at ref: k = 1
    # above it the warmup ramps: a different training
    (["batch_size=128", "warmup.epochs=0"], ["batch_size=128", "warmup.epochs=0.5"], False),
    # a flat warmup still delays a decaying schedule, which starts after it
    (["batch_size=32", "warmup.epochs=0", "schedule=cosine"], ["batch_size=32", "warmup.epochs=0.5", "schedule=cosine"],
     False),
    # warmup.start=zero ramps at every batch size
    (["batch_size=32", "warmup.epochs=0", "warmup.start=zero"], ["batch_size=32", "warmup.epochs=0.5", "warmup.start=zero"],
     False),
    # at the reference batch size every rule gives the same LR; elsewhere they differ
    (["batch_size=64", "scaling.rule=linear"], ["batch_size=64", "scaling.rule=sqrt"], True),
    (["batch_size=256", "scaling.rule=linear"], ["batch_size=256", "scaling.rule=sqrt"], False),
    # the same LR by another label: linear x 1/4 and sqrt x 1/2 at 4 x ref_batch_size
    (["batch_size=256", "scaling.rule=linear", "lr_multiplier=0.25"], ["batch_size=256", "scaling.rule=sqrt", "lr_multiplier=0.5"],
     True),
    (["batch_size=32", "seed=0"], ["batch_size=32", "seed=1"], False),
    (["batch_size=32", "optimizer=adam"], ["batch_size=32", "optimizer=sgd"], False),
])
def test_twins_are_points_that_train_the_same(compose_cfg, a, b, twins):
    ka, kb = training_key(point(compose_cfg, *a)), training_key(point(compose_cfg, *b))
    assert (ka == kb) is twins


@pytest.mark.parametrize("overrides", [["scaling.ref_lr=auto"], ["schedule=onecycle", "schedule.from_lr_find=true"]])
def test_a_range_test_lr_makes_no_twins(compose_cfg, overrides):
    """An unresolved ref_lr=auto is not known before the run; with schedule.from_lr_find the LR is the
    range test's peak at the trial's own batch size x lr_multiplier, whatever the rule: sqrt x 0.5 and
    none x 1 at 4 x ref_batch_size would key alike on the rule's LR, and train LRs 2x apart."""
    cfgs = {0: point(compose_cfg, *overrides, "batch_size=256", "scaling.rule=sqrt", "lr_multiplier=0.5"),
            1: point(compose_cfg, *overrides, "batch_size=256", "scaling.rule=none", "lr_multiplier=1")}
    assert training_key(cfgs[0]) is None and find_twins(cfgs) == {}
    plain = {i: {**c, "scaling": {**c["scaling"], "ref_lr": 0.1}, "schedule": {**c["schedule"], "from_lr_find": False}}
             for i, c in cfgs.items()}
    assert find_twins(plain) == {1: 0}  # the same LR by the rule's labels, when the rule sets it


def test_the_default_studys_grid_has_a_twin_for_every_flat_warmup(compose_cfg):
    """Batch 16 and 64 (below ref 128) with warmup 0.5 are their warmup-0 points: 32 of 128. At batch
    2048 linear x m and sqrt x 4m are one LR (6 pairs), each alone in its ASHA stratum: they run."""
    from scaling.cli import compose

    base = OmegaConf.to_container(compose(["experiment=default_study"]), resolve=True)
    axes = list(itertools.product((16, 64, 256, 2048), (0.125, 0.25, 0.5, 1, 2, 4, 8, 16), ("linear", "sqrt"), (0, 0.5)))
    cfgs, strata = {}, {}
    for i, (b, m, rule, w) in enumerate(axes):
        c = {**base, "batch_size": b, "lr_multiplier": m, "scaling": {**base["scaling"], "rule": rule},
             "warmup": {**base["warmup"], "epochs": w}}
        cfgs[i], strata[i] = c, (b, rule, w)
    twins = find_twins(cfgs)
    assert len(twins) == 38
    kept = whole_strata(twins, strata)
    assert sorted({(axes[t][0], axes[t][3]) for t in kept}) == [(16, 0.5), (64, 0.5)] and len(kept) == 32
    assert all(axes[s][:3] == axes[t][:3] and axes[s][3] == 0 for t, s in kept.items())


def test_whole_strata_keeps_a_stratum_only_if_all_of_it_mirrors_one_stratum():
    stratum = {0: "a", 1: "a", 2: "b", 3: "b", 4: "c", 5: "c"}
    assert whole_strata({2: 0, 3: 1}, stratum) == {2: 0, 3: 1}
    assert whole_strata({2: 0}, stratum) == {}  # 3 is no twin: 2 would be judged among c's... among b's own
    assert whole_strata({2: 0, 3: 0}, stratum) == {}  # two twins of one source: b is not a's image
    assert whole_strata({4: 0, 5: 2}, stratum) == {}  # sources in two strata


@pytest.mark.slow
def test_a_study_runs_each_twin_pair_once_and_records_both(tmp_path):
    """Batch 32 is below ref_batch_size=64: its warmup-0.25 point is its warmup-0 point. Run once (the
    default) and run twice (run_twins=true), the twin's recorded curve is the same, bit for bit."""
    grid = ["-m", "batch_size=32,128", "warmup.epochs=0,0.25", "scaling.ref_batch_size=64", "warmup.start=ref", *TINY]
    runs = {}
    for mode in ("false", "true"):
        name = f"twins-{mode}"
        proc = run_cli([*grid, f"hydra.sweeper.run_twins={mode}", f"hydra.sweeper.study_name={name}"], tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert ("1 of 4 trials train what another trial trains" in proc.stdout) is (mode == "false"), proc.stdout[-2000:]
        client, studies, trials = study_records(f"sqlite:///{tmp_path / 'mlflow.db'}")
        study = next(s for s in studies if s.info.run_name == name)
        mine = [t for t in trials if t.data.tags["mlflow.parentRunId"] == study.info.run_id]
        assert len(mine) == 4 and {t.data.tags["trial.status"] for t in mine} == {"completed"}
        runs[mode] = (client, study, {(int(t.data.params["batch_size"]), float(t.data.params["warmup.epochs"])): t for t in mine})
    client, study, by_point = runs["false"]
    twin, source = by_point[(32, 0.25)], by_point[(32, 0.0)]
    assert {"batch_size=32", "warmup.epochs=0"} <= set(twin.data.tags["trial.same_as"].split())
    assert twin.info.run_id != source.info.run_id and float(twin.data.params["warmup.epochs"]) == 0.25
    assert all("trial.same_as" not in t.data.tags for p, t in by_point.items() if p != (32, 0.25))
    # what the trial loop derived (warmup steps, ...) belongs to the source's config, not to the twin's params
    assert any(k.startswith("derived.") for k in source.data.params)
    assert not any(k.startswith("derived.") for k in twin.data.params) and "tune.trial_id" not in twin.data.tags
    history = lambda c, run: [(m.step, m.value) for m in c.get_metric_history(run.info.run_id, "val/loss")]  # noqa: E731
    assert history(client, twin) == history(client, source) and len(history(client, twin)) >= 4
    ran_twice = runs["true"][2][(32, 0.25)]
    assert "trial.same_as" not in ran_twice.data.tags
    assert history(client, ran_twice) == history(client, twin), "the twin run on its own trains something else"
    # samples/trained counts the three trainings that ran; the full grid counts all four points
    per_point = {p: t.data.metrics["samples"] for p, t in by_point.items()}
    trained, full = study.data.metrics["samples/trained"], study.data.metrics["samples/full_grid"]
    assert trained == sum(v for p, v in per_point.items() if p != (32, 0.25)) and full == sum(per_point.values())
    assert runs["true"][1].data.metrics["samples/trained"] == full
    assert math.isclose(study.data.metrics["samples/fraction"], trained / full)
    # the report says which rows repeat another's
    from scaling.analysis import analyze
    from scaling.study_data import load_study

    notes = analyze(load_study("twins-false", f"sqlite:///{tmp_path / 'mlflow.db'}")).notes
    assert any(n.startswith("1 of 4 trial runs are twins") for n in notes), notes
    assert not any("trial.same_as" in n for n in analyze(load_study("twins-true", f"sqlite:///{tmp_path / 'mlflow.db'}")).notes)


@pytest.mark.slow
def test_a_study_with_twins_killed_and_resumed_counts_each_training_once(tmp_path):
    """The driver is killed once a source and its twin are recorded; the resume mirrors the other
    pair, and samples/trained still counts two trainings (the state file keeps which were mirrored)."""
    args = ["-m", "batch_size=32", "lr_multiplier=0.5,1", "warmup.epochs=0,0.25", "scaling.ref_batch_size=64",
            "warmup.start=ref", "hydra.sweeper.max_concurrent=1", "hydra.sweeper.checkpoint_interval_s=0", *TINY,
            "hydra.sweeper.asha.enabled=false"]  # every trial to its budget: samples/trained is exact
    log = tmp_path / "first.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([str(BIN / "scaling-train"), *args], cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            wait_for_text(log, "done 2/4", proc, timeout=180)
        finally:
            stop_group(proc)  # the driver and the Ray it started
    proc = run_cli([*args, "hydra.sweeper.resume=true"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "resuming study" in proc.stdout
    client, (study,), trials = study_records(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert len(trials) == 4 and {t.data.tags["trial.status"] for t in trials} == {"completed"}
    twins = [t for t in trials if "trial.same_as" in t.data.tags]
    assert len(twins) == 2 and {float(t.data.params["warmup.epochs"]) for t in twins} == {0.25}
    per_trial = study.data.metrics["samples/full_grid"] / 4
    assert study.data.metrics["samples/trained"] == 2 * per_trial, "a mirrored twin was counted as trained"
    for t in trials:
        steps = [m.step for m in client.get_metric_history(t.info.run_id, "val/loss")]
        assert steps == sorted(set(steps)) and steps[-1] == per_trial, f"{t.info.run_name}: {steps}"
