"""Faults a study must survive, each caused for real: a lost tracking server, a killed worker,
a trial beyond its memory ceiling, a diverging LR, a trial that keeps failing.

Every process a test kills is one it started (or a descendant of one), found by its id.
"""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import psutil
import pytest
from cluster_procs import MlflowServer
from procs import BIN, start_group, stop_group, two_second_trials, wait_for_text
from records import evaluated_samples, study_records

pytestmark = pytest.mark.slow

SMALL = ["epochs=1", "eval_every=0.25", "data.n_samples=3000", "model.width=32", "hydra.sweeper.report=false"]


def run_study(args, cwd: Path, log_name="study.log", timeout=300):
    proc = start_group([BIN / "scaling-train", "-m", *args], cwd, cwd / log_name)
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            stop_group(proc)
    return proc.returncode, (cwd / log_name).read_text()


def test_mlflow_server_lost_mid_study_loses_nothing(tmp_path):
    server = MlflowServer(tmp_path)
    # credentials in the URI (this server ignores them): MLflow's error quotes the URL, and the
    # study's warning about it must not show the password
    uri = server.url.replace("http://", "http://alice:not-for-logs@")
    # the server goes while 3 trials are left
    args = ["-m", "batch_size=32,128", "lr_multiplier=0.5,1", "hydra.sweeper.asha.enabled=false",
            "hydra.sweeper.max_concurrent=1", f"mlflow.tracking_uri={uri}", *two_second_trials(SMALL)]
    study = start_group([BIN / "scaling-train", *args], tmp_path, tmp_path / "study.log",
                        env={"SCALING_MLFLOW_WAIT_S": "180"})
    try:
        wait_for_text(tmp_path / "study.log", "done 1/4", study)
        server.kill()  # the tracking server goes away mid-study ...
        wait_for_text(tmp_path / "study.log", "MLflow unreachable", study, timeout=120)
        warning = next(line for line in (tmp_path / "study.log").read_text().splitlines() if "MLflow unreachable" in line)
        assert "alice:***@127.0.0.1" in warning and "not-for-logs" not in warning, warning
        time.sleep(3)
        server = MlflowServer(tmp_path, port=server.port)  # ... and comes back on the same store
        assert study.wait(timeout=300) == 0, (tmp_path / "study.log").read_text()[-3000:]
        client, studies, trials = study_records(uri)
        assert len(studies) == 1 and studies[0].data.tags["trial.status"] == "completed"
        assert len(trials) == 4 and all(t.data.tags["trial.status"] == "completed" for t in trials)
        for t in trials:
            bs = int(t.data.params["batch_size"])
            spe = 16000 / bs  # 1 epoch of 16,000 samples, to the nearest step; an evaluation every 0.25
            expected = evaluated_samples(bs, spe, round(spe))
            assert [m.step for m in client.get_metric_history(t.info.run_id, "val/loss")] == expected
        assert not list(tmp_path.glob(".studies/*/mlflow_journal.jsonl")), "the journal was not drained"
        assert "not-for-logs" not in (tmp_path / "study.log").read_text()
    finally:
        if study.poll() is None:
            stop_group(study)
        server.kill()  # whichever server is current; killing a stopped one is a no-op


def _history(client, run_id: str, key: str = "val/loss") -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


def test_killed_worker_resumes_from_checkpoint_with_identical_metrics(tmp_path):
    # 12 epochs (48 evaluations, a checkpoint at each): the kill must land mid-trial. At 4 epochs the
    # trial trained in ~1 s under the study, and the kill (after the third checkpoint, found by
    # polling) landed at the sixth of 16 evaluations, a margin a loaded machine could eat.
    common = ["batch_size=32", "lr_multiplier=1", "epochs=12", "eval_every=0.25", "data.n_samples=6000",
              "model.width=64", "threads=1"]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ref = start_group([BIN / "scaling-train", *common, f"mlflow.tracking_uri={uri}", "mlflow.experiment=reference"],
                      tmp_path, tmp_path / "ref.log")
    assert ref.wait(timeout=300) == 0, (tmp_path / "ref.log").read_text()[-2000:]

    study = start_group([BIN / "scaling-train", "-m", *common, "seed=0,1", f"mlflow.tracking_uri={uri}",
                         "hydra.sweeper.asha.enabled=false", "hydra.sweeper.max_concurrent=1",
                         "hydra.sweeper.checkpoint_interval_s=0", "hydra.sweeper.report=false"],
                        tmp_path, tmp_path / "study.log")
    try:
        deadline = time.time() + 180
        # checkpoints are numbered per evaluation (only the newest is kept): wait for the third
        while not [p for p in tmp_path.glob(".studies/*/tune-0/trial_00000/checkpoint_*") if int(p.name[-6:]) >= 2]:
            assert time.time() < deadline and study.poll() is None, (tmp_path / "study.log").read_text()[-3000:]
            time.sleep(0.2)
        workers = [p for p in psutil.Process(study.pid).children(recursive=True)
                   if "ImplicitFunc" in " ".join(p.cmdline())]
        assert workers, "no trial worker found among the study's processes"
        for w in workers:
            w.kill()  # the process running the trial dies mid-trial
        assert study.wait(timeout=300) == 0, (tmp_path / "study.log").read_text()[-3000:]
    finally:
        if study.poll() is None:
            stop_group(study)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    reference = client.search_runs([client.get_experiment_by_name("reference").experiment_id])[0]
    trials = [r for r in client.search_runs([client.get_experiment_by_name("scaling").experiment_id])
              if r.data.tags.get("scaling.kind") == "trial"]
    seed0 = next(t for t in trials if t.data.params["seed"] == "0")
    assert seed0.data.tags["trial.status"] == "completed"
    restarted = [p for p in (tmp_path / ".studies").glob("*/tune-0/trial_00000/checkpoint_*")]
    assert restarted, "no checkpoints were written"
    got, want = _history(client, seed0.info.run_id), _history(client, reference.info.run_id)
    assert [s for s, _ in got] == [s for s, _ in want]
    assert [v for _, v in got] == pytest.approx([v for _, v in want], abs=1e-6), \
        "the resumed trial diverged from the uninterrupted run"
    resumed = int(seed0.data.tags["trial.resumed_from_step"])  # restarted from its checkpoint, not from 0
    assert seed0.data.tags["trial.failures"] == "1" and seed0.data.tags["trial.last_failure"]
    assert resumed >= 2 * max(1, round(0.25 * 4800 // 32)), resumed


def test_failing_trial_retries_are_bounded_and_end_as_error(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # a node that advertises a GPU its trials cannot use: the study's own check (a GPU in the
    # cluster) passes, and every attempt fails inside the trial, in torch
    code, log = run_study(["batch_size=32,64", "device=cuda", "hydra.sweeper.ray.num_gpus=1",
                           f"mlflow.tracking_uri={uri}", "hydra.sweeper.max_failures=1", *SMALL], tmp_path)
    assert code == 0, log[-3000:]
    _, studies, trials = study_records(uri)
    assert len(trials) == 2
    for t in trials:
        assert t.data.tags["trial.status"] == "error"
        assert "CUDA" in t.data.tags["trial.reason"]
        assert t.data.tags["trial.failures"] == "2"  # the first attempt and its one retry
        assert "CUDA" in t.data.tags["trial.last_failure"]  # tagged when the retry was scheduled
    assert studies[0].data.metrics["trials/error"] == 2
    progress = [line for line in log.splitlines() if re.match(r"\[\s*\d+s\] done ", line)]
    assert "done 2/2 running 0 pruned 0 diverged 0 error 2 |" in progress[-1], progress  # errors show as they end


FAIL_AT_SECOND_EVALUATION = """
import scaling.train as train

_run_trial, _evaluate, calls = train.run_trial, train.evaluate, [0]

def run_trial(*args, **kwargs):
    calls[0] = 0  # every attempt
    return _run_trial(*args, **kwargs)

def evaluate(*args, **kwargs):
    calls[0] += 1
    if calls[0] == 2:
        raise RuntimeError("failed at the second evaluation")
    return _evaluate(*args, **kwargs)

train.run_trial, train.evaluate = run_trial, evaluate
"""


def test_a_trial_that_fails_between_reports_records_the_evaluations_it_held_back(tmp_path, monkeypatch):
    """An evaluation waits for the next report (checkpoint_interval_s); a failure lost those held back."""
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(FAIL_AT_SECOND_EVALUATION)  # the Ray workers' too
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path / 'inject'}:{os.environ.get('PYTHONPATH', '')}")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code, log = run_study(["batch_size=32", "seed=0,1", "hydra.sweeper.max_failures=0",
                           "hydra.sweeper.asha.enabled=false", f"mlflow.tracking_uri={uri}", *SMALL], tmp_path)
    assert code == 0, log[-3000:]
    client, studies, trials = study_records(uri)
    assert len(trials) == 2
    for t in trials:
        assert t.data.tags["trial.status"] == "error" and "second evaluation" in t.data.tags["trial.reason"]
        assert [m.step for m in client.get_metric_history(t.info.run_id, "val/loss")] == [t.data.metrics["samples"]]
    assert studies[0].data.metrics["samples/trained"] == sum(t.data.metrics["samples"] for t in trials) > 0


def test_resume_errored_trains_the_failed_trials_again_in_their_own_runs(tmp_path, monkeypatch):
    """A resume left `error` trials alone (as Tune does by default), with no way to run them again once the
    cause was fixed; `hydra.sweeper.resume_errored=true` does, from each one's last checkpoint."""
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(FAIL_AT_SECOND_EVALUATION)  # the Ray workers' too
    plain = os.environ.get("PYTHONPATH", "")
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path / 'inject'}:{plain}")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["batch_size=32", "seed=0,1", "hydra.sweeper.max_failures=0", "hydra.sweeper.asha.enabled=false",
            "hydra.sweeper.checkpoint_interval_s=0", f"mlflow.tracking_uri={uri}", *SMALL]
    code, log = run_study(args, tmp_path)
    assert code == 0, log[-3000:]
    client, _, failed = study_records(uri)
    assert sorted(t.data.tags["trial.status"] for t in failed) == ["error", "error"]
    monkeypatch.setenv("PYTHONPATH", plain)  # the cause fixed
    code, log = run_study([*args, "hydra.sweeper.resume=true", "hydra.sweeper.resume_errored=true"], tmp_path,
                          log_name="resume.log")
    assert code == 0, log[-3000:]
    assert "0/2 trials already finished; 2 that ended in error train again" in log, log[-3000:]
    _, studies, trials = study_records(uri)
    assert {t.info.run_id for t in trials} == {t.info.run_id for t in failed}  # reopened, not new runs
    for t in trials:
        assert t.data.tags["trial.status"] == "completed" and t.info.status == "FINISHED"
        # the failure is kept where a retry would put it; no stale reason beside `completed`
        assert "trial.reason" not in t.data.tags and "second evaluation" in t.data.tags["trial.last_failure"]
        assert int(t.data.tags["trial.resumed_from_step"]) > 0  # from the checkpoint of its first evaluation
        steps = [m.step for m in client.get_metric_history(t.info.run_id, "val/loss")]
        assert steps == sorted(set(steps)) and len(steps) == 4, steps  # every evaluation once
    assert studies[0].data.metrics["trials/completed"] == 2 and studies[0].data.metrics["trials/error"] == 0


FAIL_FIRST_EVALUATION_ONCE = """
import os
import scaling.train as train

_run_trial, _evaluate, marker = train.run_trial, train.evaluate, [None]

def run_trial(cfg, *args, **kwargs):
    marker[0] = os.path.join({markers!r}, f"{{cfg.lr_multiplier}}-{{cfg.batch_size}}")
    return _run_trial(cfg, *args, **kwargs)

def evaluate(*args, **kwargs):
    if not os.path.exists(marker[0]):  # the first attempt of each trial, before its first rung
        open(marker[0], "w").close()
        raise RuntimeError("failed at the first evaluation")
    return _evaluate(*args, **kwargs)

train.run_trial, train.evaluate = run_trial, evaluate
"""


def test_a_retry_from_scratch_leaves_a_later_resume_from_a_pause_tagged_as_such(tmp_path, monkeypatch):
    """A retried trial's first resume from a rung (promotion ASHA) was tagged trial.resumed_from_step."""
    (tmp_path / "markers").mkdir()
    (tmp_path / "inject").mkdir()
    code = FAIL_FIRST_EVALUATION_ONCE.format(markers=str(tmp_path / "markers"))
    (tmp_path / "inject" / "sitecustomize.py").write_text(code)  # the Ray workers' too
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path / 'inject'}:{os.environ.get('PYTHONPATH', '')}")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code, log = run_study(["batch_size=32", "lr_multiplier=0.25,0.5,1,2", "hydra.sweeper.ray.num_cpus=1",
                           "hydra.sweeper.asha.variant=promotion",
                           "hydra.sweeper.asha.grace_period=0.25", "hydra.sweeper.asha.reduction_factor=2",
                           f"mlflow.tracking_uri={uri}", *SMALL], tmp_path)
    assert code == 0, log[-3000:]
    _, _, trials = study_records(uri)
    assert all(t.data.tags["trial.failures"] == "1" for t in trials)  # each retried once, from its start
    resumed = [t.data.tags for t in trials if "asha.paused_at_steps" in t.data.tags
               or "trial.resumed_from_step" in t.data.tags]
    assert resumed and all("trial.resumed_from_step" not in tags for tags in resumed), resumed


def test_oom_and_divergence_end_their_trials_and_the_study_completes(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code, log = run_study(["batch_size=16,4096", "lr_multiplier=1,10000", "model.width=4096", "model.depth=1",
                           "memory.limit_mb=100", "data.n_samples=6000", "epochs=1", "eval_every=0.5",
                           "hydra.sweeper.asha.enabled=false", f"mlflow.tracking_uri={uri}",
                           "hydra.sweeper.report=false"], tmp_path)
    assert code == 0, log[-3000:]
    client, studies, trials = study_records(uri)
    by = {(t.data.params["batch_size"], t.data.params["lr_multiplier"]): t for t in trials}
    assert by[("16", "1.0")].data.tags["trial.status"] == "completed"
    diverged = by[("16", "10000.0")]
    assert diverged.data.tags["trial.status"] == "diverged"
    # it stopped between evaluations: its run and the study's samples/trained count the steps it took
    step = int(re.search(r"at step (\d+)", diverged.data.tags["trial.reason"]).group(1))
    assert step > 0 and diverged.data.metrics["samples"] == 16 * step and diverged.data.metrics["step"] == step
    assert studies[0].data.metrics["samples/trained"] == sum(t.data.metrics.get("samples", 0) for t in trials)
    for lr in ("1.0", "10000.0"):
        oom = by[("4096", lr)]
        assert oom.data.tags["trial.status"] == "oom"
        assert "batch_size=4096" in oom.data.tags["trial.reason"]
        # its run holds the peak that ended it (it held the last evaluation's, or none)
        # (the reason prints it to 0.1 MB: compare the same rounding, 197.75 prints as 197.8)
        peak = re.search(r"peak ([\d.]+) MB", oom.data.tags["trial.reason"]).group(1)
        assert float(peak) > 100 and f"{oom.data.metrics['mem/peak_mb']:.1f}" == peak
    assert "largest batch size that fit: 16" in log
    best = json.loads(client.download_artifacts(studies[0].info.run_id, "best_per_batch_size.json", str(tmp_path)) and
                      (tmp_path / "best_per_batch_size.json").read_text())
    assert list(best) == ["16"] and best["16"]["lr_multiplier"] == 1.0, "a diverged or oom trial was chosen as best"
    assert studies[0].data.metrics["trials/oom"] == 2 and studies[0].data.metrics["trials/diverged"] == 1


def test_a_validation_loss_blow_up_ends_the_trial_as_diverged_in_a_study(tmp_path):
    """Adam at lr=5 blows up in its first step, after its training loss was checked: the evaluation
    used to reach ASHA as a rung value (val/loss ~1e5, accuracy below chance) and the trial ended pruned
    or completed, a result the report could recommend. It ends diverged now, before that evaluation is
    reported, where it stopped, and is never best."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code, log = run_study(["batch_size=1024", "optimizer=adam", "lr=0.001,5", "data.n_samples=2000", "model.width=32",
                           "epochs=1.28", "eval_every=0.64", "hydra.sweeper.asha.grace_period=0.64",
                           f"mlflow.tracking_uri={uri}", "hydra.sweeper.report=false"], tmp_path)
    assert code == 0, log[-3000:]
    client, studies, trials = study_records(uri)
    by = {t.data.params["lr"]: t for t in trials}
    assert by["0.001"].data.tags["trial.status"] == "completed"
    blown = by["5.0"]
    assert blown.data.tags["trial.status"] == "diverged", blown.data.tags
    reason = blown.data.tags["trial.reason"]
    assert re.fullmatch(r"val/loss=\S+ at step 1: above divergence.factor=5 x the first train/loss \S+", reason), reason
    assert blown.data.metrics["samples"] == 1024 and blown.data.metrics["step"] == 1
    assert client.get_metric_history(blown.info.run_id, "val/loss") == []  # no evaluation recorded as a result
    assert studies[0].data.metrics["trials/diverged"] == 1
    best = json.loads(client.download_artifacts(studies[0].info.run_id, "best_per_batch_size.json", str(tmp_path)) and
                      (tmp_path / "best_per_batch_size.json").read_text())
    assert best["1024"]["run_id"] == by["0.001"].info.run_id
