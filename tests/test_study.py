"""End to end: the study is a Hydra multirun on Ray Tune with stratified ASHA, recorded in MLflow.

Every test drives the real console script in a subprocess (real Hydra, real Ray bound to
127.0.0.1, real MLflow on a temporary SQLite file) at tiny sizes.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from procs import stop_group, wait_for_text
from records import client_for, evaluated_samples, study_records

from scaling.tracking import UI_COMMAND

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
TINY = ["epochs=1", "eval_every=0.25", "data.n_samples=3000", "model.width=32",
        "hydra.sweeper.asha.grace_period=0.25", "hydra.sweeper.report=false"]


def run_cli(args, cwd, script="scaling-train", timeout=240, extra_env=None, **kw):
    """Run a console script in `cwd` with its output piped and COLUMNS=80, as CI and pytest often set
    it (and `extra_env`); return the CompletedProcess (text)."""
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONUNBUFFERED": "1", "COLUMNS": "80", **(extra_env or {})}
    return subprocess.run([str(BIN / script), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, **kw)


def study_runs(path: Path):
    """Return (study runs, trial runs) of the default experiment in `path`'s store."""
    return study_records(f"sqlite:///{path / 'mlflow.db'}")[1:]


@pytest.fixture(scope="module")
def small_study(tmp_path_factory):
    """2 batch sizes x 4 LR multipliers, one trial at a time (in the sweeper's seeded shuffled order)."""
    cwd = tmp_path_factory.mktemp("study")
    proc = run_cli(["-m", "batch_size=32,256", "lr_multiplier=1,2,0.01,0.003", "hydra.sweeper.max_concurrent=1",
                    *TINY], cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cwd, proc


def test_study_records_one_parent_and_a_child_per_trial(small_study):
    cwd, proc = small_study
    studies, trials = study_runs(cwd)
    assert len(studies) == 1 and len(trials) == 8
    study = studies[0]
    assert {t.data.tags["mlflow.parentRunId"] for t in trials} == {study.info.run_id}
    # what produced each trial's numbers, as on the study run (the README's promise for every trial run)
    assert all(t.data.tags["git.revision"] == study.data.tags["git.revision"] and "version.torch" in t.data.tags
               for t in trials)
    assert study.data.tags["trial.status"] == "completed"
    assert study.data.metrics["trials/total"] == 8
    assert '"batch_size": ["32", "256"]' in study.data.params["grid"]
    # the Hydra sweep folder it names exists, with multirun.yaml as Hydra's own sweeper writes it
    multirun = OmegaConf.load(Path(study.data.tags["scaling.sweep_dir"]) / "multirun.yaml")
    assert "batch_size=32,256" in multirun.hydra.overrides.task and multirun.hydra.mode == "MULTIRUN"
    # the last line opens the study run: `mlflow ui` over this store (as tests/test_mlflow_ui.py runs it), then its page
    page = f"http://127.0.0.1:5000/#/experiments/{study.info.experiment_id}/runs/{study.info.run_id}"
    assert proc.stdout.strip().splitlines()[-1] == f"{UI_COMMAND} --backend-store-uri sqlite:///mlflow.db   # then open {page}"
    names = {t.info.run_name for t in trials}
    assert "bs=32 lr×0.01 linear s0" in names


def test_every_batch_size_keeps_a_full_budget_trial_and_asha_prunes(small_study):
    cwd, _ = small_study
    _, trials = study_runs(cwd)
    statuses = [t.data.tags["trial.status"] for t in trials]
    assert "pruned" in statuses
    def at_budget(t) -> bool:  # 1 epoch of 2,400 samples: 75 steps of 32, 9 of 256 (0.96 epoch)
        return t.data.metrics.get("step") == int(t.data.params["derived.total_steps"])

    for bs in ("32", "256"):
        full = [t for t in trials if t.data.params["batch_size"] == bs and at_budget(t)]
        assert full, f"batch size {bs} lost every trial before the full budget"
        assert all(t.data.tags["trial.status"] == "completed" for t in full)
    pruned = [t for t in trials if t.data.tags["trial.status"] == "pruned"]
    assert pruned and not any(at_budget(t) for t in pruned)
    assert all(t.data.metrics["epoch"] < 0.96 for t in pruned)


def test_metric_step_axis_is_samples_seen(small_study):
    cwd, _ = small_study
    _, trials = study_runs(cwd)
    client = client_for(cwd)
    for t in trials:
        bs = int(t.data.params["batch_size"])
        hist = client.get_metric_history(t.info.run_id, "val/loss")
        steps = [m.step for m in hist]
        assert steps == sorted(set(steps)), "a metric point was logged twice"
        assert all(s % bs == 0 and s > 0 for s in steps)
        samples = {m.step: m.value for m in client.get_metric_history(t.info.run_id, "samples")}
        assert all(samples[s] == s for s in steps)
        if t.data.tags["trial.status"] == "completed":  # every evaluation, including those a trial
            total = int(t.data.params["derived.total_steps"])  # held back from Tune between rungs
            spe = float(t.data.params["derived.steps_per_epoch"])
            assert steps == evaluated_samples(bs, spe, total), (bs, steps)


def test_short_trials_skip_checkpoints_younger_than_the_interval(small_study, tmp_path):
    """Sub-second trials under the default 10 s interval save none; interval 0 saves one per evaluation."""
    cwd, _ = small_study
    assert list(cwd.glob(".studies/*/tune-0/trial_*/")) and not list(cwd.glob(".studies/*/tune-0/trial_*/checkpoint_*"))
    proc = run_cli(["-m", "batch_size=256", "hydra.sweeper.checkpoint_interval_s=0", *TINY], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    kept = list(tmp_path.glob(".studies/*/tune-0/trial_00000/checkpoint_*"))
    # 9.375 steps of 256 per epoch, 9 trained, evaluations at steps 2, 5, 7 and 9: four checkpoints, the newest kept
    assert len(kept) == 1 and kept[0].name == "checkpoint_000003", kept


def test_bare_multirun_sweeps_only_the_given_axes(tmp_path):
    proc = run_cli(["-m", "batch_size=32,64", *TINY], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    studies, trials = study_runs(tmp_path)
    assert len(trials) == 2
    assert {t.data.params["lr_multiplier"] for t in trials} == {"1.0"}
    assert {t.data.params["scaling.rule"] for t in trials} == {"linear"}


MIXED = ("note: ASHA compares trials of different batch sizes at each rung (hydra.sweeper.asha.stratified=false): "
         "a batch size can be pruned whole; add batch_size to group_by for the best LR of each batch size")


@pytest.mark.parametrize("asha, strata, note", [([], '["batch_size"]', False),
                                                (["hydra.sweeper.asha.stratified=false"], "[]", True),
                                                (["hydra.sweeper.asha.enabled=false"], "[]", False)])
def test_the_study_run_records_the_strata_asha_judged_within(tmp_path, asha, strata, note):
    """An unstratified ASHA (or none) was recorded with strata ["batch_size"]. One that compares batch
    sizes says so at the start."""
    proc = run_cli(["-m", "batch_size=32,64", "lr_multiplier=0.5,1", *asha, *TINY], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    studies, _ = study_runs(tmp_path)
    assert studies[0].data.params["strata"] == strata
    assert (MIXED in proc.stdout) == note, proc.stdout[-3000:]


@pytest.mark.parametrize("grid", ["hydra.sweeper.params.batch_size='32,64'", "+hydra.sweeper.params.batch_size='32,64'",
                                  "hydra.sweeper.params={batch_size:'32,64'}"], ids=["key", "plus", "dict"])
def test_a_grid_given_in_hydra_sweeper_params_on_the_command_line_runs(tmp_path, grid):
    """hydra.sweeper.params was null, so no axis could be set under it from the shell."""
    proc = run_cli(["-m", grid, *TINY], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    studies, trials = study_runs(tmp_path)
    assert len(studies) == 1 and len(trials) == 2
    assert sorted(t.data.params["batch_size"] for t in trials) == ["32", "64"]
    assert '"batch_size": ["32", "64"]' in studies[0].data.params["grid"]


@pytest.mark.parametrize("where", ["preset", "shell"])
def test_a_list_in_hydra_sweeper_params_sweeps_its_values(tmp_path, where):
    """A list (a preset's `batch_size: [32, 64]`) was merged as one value and ended in a garbled line."""
    conf = tmp_path / "conf" / "experiment"
    conf.mkdir(parents=True)
    (conf / "listy.yaml").write_text("# @package _global_\nhydra:\n  sweeper:\n    params:\n      batch_size: [32, 64]\n")
    grid = ["-cd", str(tmp_path / "conf"), "experiment=listy"] if where == "preset" else \
        ["hydra.sweeper.params.batch_size=[32,64]"]
    proc = run_cli(["-m", *grid, *TINY], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    studies, trials = study_runs(tmp_path)
    assert len(studies) == 1 and sorted(t.data.params["batch_size"] for t in trials) == ["32", "64"]


def test_resume_finds_its_study_in_any_order_and_refuses_a_store_without_it(small_study, tmp_path):
    """A resume finds the study by its name (its points, whatever the order of the fixed overrides), then
    reopens its MLflow run: in another experiment, or in a store that lost it, the resume would find none
    of its trials and run them all again under a run it cannot reopen. One line, and nothing made."""
    work = tmp_path / "copy"
    shutil.copytree(small_study[0], work)  # the finished study: its store and its state in .studies
    (name,) = [p.name for p in (work / ".studies").iterdir()]
    resume = ["-m", "batch_size=32,256", "lr_multiplier=1,2,0.01,0.003", *reversed(TINY),
              "hydra.sweeper.max_concurrent=1", "hydra.sweeper.resume=true"]
    proc = run_cli(resume, work, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"resuming study {name} " in proc.stdout and "8/8 trials already finished" in proc.stdout

    proc = run_cli([*resume, "mlflow.experiment=elsewhere", f"hydra.sweeper.study_name={name}"], work, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("error: mlflow.experiment='elsewhere'") and "mlflow.experiment=scaling" in lines[0]
    assert "elsewhere" not in {e.name for e in client_for(work).search_experiments()}

    # its name with another grid: trials are matched by index, so bs=128's trial 0 would pass for bs=32's
    other = ["-m", "batch_size=32,128", "lr_multiplier=1,2,0.01,0.003", *TINY, "hydra.sweeper.resume=true"]
    proc = run_cli([*other, f"hydra.sweeper.study_name={name}"], work, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith(f"error: hydra.sweeper.resume=True: study {name} was started with another grid")
    assert len(study_runs(work)[1]) == 8

    (work / "mlflow.db").unlink()
    proc = run_cli(resume, work, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("error: hydra.sweeper.resume=True: the study's MLflow run ") and \
        "cannot be read: mlflow.tracking_uri=sqlite:///mlflow.db names no existing store" in lines[0], lines[0]
    assert not (work / "mlflow.db").exists(), "an empty store was created in its place"


def test_resume_after_driver_kill_finishes_without_duplicates(tmp_path):
    """Kill the driver twice mid-study (each time after one more trial finished), then finish it."""
    args = ["-m", "batch_size=32,256", "lr_multiplier=0.5,1,2", *TINY]
    finished = 1  # kill the first attempt once 2 trials are done; each resume, once one more is
    for attempt in range(2):
        log = tmp_path / f"attempt{attempt}.log"
        extra = ["hydra.sweeper.resume=true"] if attempt else []
        with open(log, "w") as out:
            proc = subprocess.Popen([str(BIN / "scaling-train"), *args, *extra], cwd=tmp_path, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1"})
            try:
                if attempt:  # the kill may land after more trials ended than the marker said
                    wait_for_text(log, "trials already finished", proc, timeout=180)
                    finished = int(re.search(r"(\d+)/6 trials already finished", log.read_text()).group(1))
                if finished + 1 < 6:
                    wait_for_text(log, f"done {finished + 1}/6", proc, timeout=180)
            finally:
                stop_group(proc)  # the driver and the Ray processes it started, nothing else
    proc = run_cli([*args, "hydra.sweeper.resume=true"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "resuming study" in proc.stdout
    done_before = re.search(r"(\d+)/6 trials already finished", proc.stdout).group(1)
    assert f"ASHA: rung values of {done_before} finished trials restored" in proc.stdout, proc.stdout[-2000:]
    studies, trials = study_runs(tmp_path)
    assert len(studies) == 1 and len(trials) == 6, "a resume created duplicate runs"
    assert studies[0].data.tags["trial.status"] == "completed"
    assert sum(studies[0].data.metrics[f"trials/{s}"] for s in ("completed", "pruned")) == 6
    client = client_for(tmp_path)
    for t in trials:
        assert t.data.tags["trial.status"] in ("completed", "pruned")
        assert float(t.data.params["lr.effective"]) > 0, f"{t.info.run_name}: params lost to the kill"
        steps = [m.step for m in client.get_metric_history(t.info.run_id, "val/loss")]
        assert steps == sorted(set(steps)), f"{t.info.run_name}: doubled points {steps}"
        if t.data.tags["trial.status"] == "completed":
            bs = int(t.data.params["batch_size"])
            spe = 2400 / bs  # one epoch of the 80% training split, to the nearest step
            expected = evaluated_samples(bs, spe, round(spe))
            assert steps == expected, f"{t.info.run_name}: lost points {steps} != {expected}"



@pytest.mark.parametrize("args, key", [
    (["batch_size=32,-1"], "batch_size"),
    (["batch_sise=32,64"], "batch_sise"),
    (["batch_size=range(5,5)"], "batch_size"),
    (["batch_size=32,64", "hydra.sweeper.asha.grace_period=2"], "grace_period"),
    (["batch_size=32,64", "hydra.sweeper.resources.gpu=1"], "resources.gpu"),
    (["batch_size=32,64", "mlflow.tracking_uri=http://127.0.0.1:9"], "mlflow.tracking_uri"),
    (["batch_size=32,64", "hydra.sweeper.study_name=../escape"], "study_name"),
    (["batch_size=32,64", "hydra.sweeper.ray.address=127.0.0.1:1"], "ray.address"),
    (["batch_size=32,64", "hydra.sweeper.ray.num_cpus=0"], "hydra.sweeper.ray.num_cpus=0"),
    (["batch_size=32,64", "hydra.sweeper.ray.num_gpus=-1"], "hydra.sweeper.ray.num_gpus=-1"),
    (["batch_size=32,64", "hydra.sweeper.ray.address=auto", "hydra.sweeper.ray.num_cpus=2"],
     "hydra.sweeper.ray.num_cpus=2: sizes a local Ray only"),
    (["batch_size=32,64", "hydra.sweeper.storage_path=/proc/no/such"], "storage_path"),
    (["batch_size=32,64", "hydra.sweeper.max_trials=1"], "max_trials"),
    (["batch_size=32,64", "hydra.sweeper.checkpoint_interval_s=-1"], "checkpoint_interval_s"),
    (["batch_size=32,64", "mlflow.enabled=true,false"], "mlflow.enabled"),
    (["batch_size=32,64", "mlflow.enabled=false", "hydra.sweeper.resume=true"], "hydra.sweeper.resume"),
])
def test_bad_study_input_is_one_line_and_leaves_nothing(tmp_path, args, key):
    proc = run_cli(["-m", *args, "epochs=1", "data.n_samples=3000"], tmp_path, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0
    assert len(lines) == 1 and lines[0].startswith("error:") and key in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not (tmp_path / "mlflow.db").exists(), "an MLflow store was created for a rejected study"


def test_basic_sweeper_with_joblib_launcher_records_one_run_per_job(tmp_path):
    """The plain grid without Ray: Hydra's basic sweeper, jobs in 2 joblib processes, one writer each."""
    proc = run_cli(["-m", "hydra/sweeper=basic", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                    "batch_size=32,64", "lr_multiplier=0.5,1", "epochs=0.5", "eval_every=0.25",
                    "data.n_samples=3000", "model.width=32", "threads=1"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    studies, trials = study_runs(tmp_path)
    assert studies == [] and len(trials) == 4
    assert {(t.data.params["batch_size"], t.data.params["lr_multiplier"]) for t in trials} == \
        {("32", "0.5"), ("32", "1.0"), ("64", "0.5"), ("64", "1.0")}
    assert all(t.data.tags["trial.status"] == "completed" for t in trials)


def test_ref_lr_auto_runs_the_range_test_first_and_trials_use_it(tmp_path):
    """One range test for every seed: seeds of a grid point train the same LRs, so the report pools them."""
    proc = run_cli(["-m", "batch_size=32,128", "seed=0,1", "scaling.ref_lr=auto", "lr_find.num_iters=40",
                    "hydra.sweeper.asha.enabled=false", *TINY], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    studies, trials = study_runs(tmp_path)
    chosen = float(studies[0].data.tags["scaling.ref_lr_auto"])
    assert proc.stdout.count("chose ref_lr=") == 1 and f"chose ref_lr={chosen:.4g}" in proc.stdout
    assert sorted(t.data.params["seed"] for t in trials) == ["0", "0", "1", "1"]
    assert "lr_find.png" in {a.path for a in client_for(tmp_path).list_artifacts(studies[0].info.run_id)}
    for t in trials:
        assert float(t.data.params["scaling.ref_lr"]) == pytest.approx(chosen)
        bs = int(t.data.params["batch_size"])
        assert float(t.data.params["lr.effective"]) == pytest.approx(chosen * bs / 128)


def test_trials_whose_own_range_test_sets_their_lr_record_the_lr_they_trained(tmp_path):
    """schedule.from_lr_find: each trial's LR comes from a test at its batch size, run in the trial; its
    lr.effective and lr.base (what the report reads) were the rule's from the config, not the LR trained."""
    proc = run_cli(["-m", "batch_size=32,128", "schedule=onecycle", "schedule.from_lr_find=true",
                    "lr_find.num_iters=40", "hydra.sweeper.asha.enabled=false", *TINY], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, trials = study_runs(tmp_path)
    rows = {line.split("│")[1].strip(): float(line.split("│")[2]) for line in proc.stdout.splitlines()
            if line.startswith("│")}
    for t in trials:
        p = t.data.params
        assert float(p["lr.effective"]) == pytest.approx(float(p["derived.lr"]), rel=1e-12)  # the loop's own LR
        assert float(p["lr.base"]) == pytest.approx(float(t.data.tags["lr_find.ref_lr"]), rel=1e-12)
        assert rows[p["batch_size"]] == pytest.approx(float(p["lr.effective"]), rel=1e-3)  # the summary's too
    assert len({t.data.params["lr.effective"] for t in trials}) == 2


def test_study_with_mlflow_disabled_runs_and_records_nothing(tmp_path):
    proc = run_cli(["-m", "batch_size=32,256", "lr_multiplier=1,2", "mlflow.enabled=false", *TINY], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "not recorded (mlflow.enabled=false)" in proc.stdout
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()
    rows = [line for line in proc.stdout.splitlines() if line.startswith("│")]
    assert [r.split("│")[1].strip() for r in rows] == ["32", "256"]
    for r in rows:  # the summary is built from the run itself: a real LR and loss, no MLflow lookups
        lr, loss = float(r.split("│")[2]), float(r.split("│")[5])
        assert lr > 0 and 0 < loss < 10
        assert r.split("│")[8].strip() == "completed", r
    assert "…" not in proc.stdout, proc.stdout[-3000:]  # piped, the summary takes its full width


def _study_driver_imports(tmp_path, args: list[str], modules: tuple[str, ...]):
    """Run a 2-trial study in a driver process of its own; return it and which of `modules` it
    had imported when it exited."""
    code = ("import atexit, sys\n"
            f"atexit.register(lambda: print('imported:', [m for m in {modules!r} if m in sys.modules], flush=True))\n"
            f"sys.argv = ['scaling-train', '-m', 'batch_size=32,256', 'lr_multiplier=1', *{args!r}]\n"
            "from scaling.cli import train_entry\n"
            "train_entry()\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 trials in" in proc.stdout and "completed 2" in proc.stdout, proc.stdout[-2000:]
    return proc, re.search(r"^imported: (.*)$", proc.stdout, re.M).group(1)


def test_the_study_driver_never_imports_torch(tmp_path):
    """Only trials need torch: in the driver its import costs ~1.2 s of CPU on the study's critical
    path (start-up, benchmark row 2b), taken from the trials' cores. Report included."""
    proc, imported = _study_driver_imports(tmp_path, TINY[:-1], ("torch", "mlflow"))
    assert (tmp_path / "mlflow.db").exists() and imported == "['mlflow']", proc.stdout[-2000:]


def test_a_study_without_mlflow_never_imports_it(tmp_path):
    """With mlflow.enabled=false the driver imports no MLflow: Ray Tune's usage tags used to import
    it at Tuner.fit, on the way to the first trial (~0.95 s of CPU; scaling.local_ray)."""
    proc, imported = _study_driver_imports(tmp_path, ["mlflow.enabled=false", *TINY], ("torch", "mlflow"))
    assert not (tmp_path / "mlflow.db").exists() and imported == "[]", proc.stdout[-2000:]
