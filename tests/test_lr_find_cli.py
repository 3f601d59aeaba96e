"""The scaling-lr-find console script (and scaling-train's ref_lr=auto) end to end: one run per batch
size in a real MLflow sqlite store, and its bad input, each in one line naming the key the user wrote."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def run_cli(args, cwd, script="scaling-lr-find", timeout=240, env_extra=None):
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "SCALING_PROGRESS")}
    env.update(env_extra or {})
    return subprocess.run([str(BIN / script), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_lr_find_cli_checks_the_tested_batch_sizes_not_the_unused_batch_size(tmp_path):
    """80 training samples: batch_size's default (128) would not fit, but only 16 and 32 are tested."""
    proc = run_cli(["data.n_samples=100", "model.width=8", "threads=1", "lr_find.num_iters=20",
                    "batch_size=16,32", "mlflow.enabled=false"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [line.split(":")[0] for line in proc.stdout.splitlines() if line.startswith("bs=")] == ["bs=16", "bs=32"]
    proc = run_cli(["data.n_samples=100", "batch_size=16,128", "mlflow.enabled=false"], tmp_path)
    assert proc.returncode != 0 and proc.stderr.strip().splitlines() == [
        "error: lr_find.batch_sizes=128: is larger than the training set (80 samples)"], proc.stderr[-2000:]


@pytest.mark.parametrize("args, line", [
    (["lr_find.batch_sizes=[0,32]"], "lr_find.batch_sizes=0: must be positive"),
    (["data.n_samples=100", "batch_size=128,256"],
     "lr_find.batch_sizes=128: is larger than the training set (80 samples)"),
    (["parallel.workers=3", "batch_size=48,64"],
     "parallel.workers=3: must divide batch size 64 of lr_find.batch_sizes"),
])
def test_lr_find_cli_blames_the_tested_batch_size_not_batch_size(tmp_path, args, line):
    """A check made at a tested batch size names lr_find.batch_sizes, the key the user wrote, before Hydra starts."""
    proc = run_cli([*args, "mlflow.enabled=false"], tmp_path, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [f"error: {line}"], proc.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []  # no Hydra output folder: the preflight refused it


@pytest.mark.parametrize("args, line", [
    (["batch_size=32,256", "lr_find.batch_sizes=[64]"], "batch_size='32,256': conflicts with "
     "lr_find.batch_sizes=[64], which the range tests would use instead; give one of the two"),
    (["lr_find.batch_sizes=[64]", "batch_size=32"], "batch_size='32': conflicts with "
     "lr_find.batch_sizes=[64], which the range tests would use instead; give one of the two"),
    (["batch_size=[32,64"], "batch_size='[32,64': must be one integer or a comma list of integers, e.g. 32,256,2048"),
    (["batch_size=32,64]"], "batch_size='32,64]': must be one integer or a comma list of integers, "
     "e.g. 32,256,2048"),
])
def test_lr_find_cli_refuses_conflicting_or_malformed_batch_sizes(tmp_path, args, line):
    """Two lists of batch sizes, or brackets that do not pair, were taken silently (the last list, or as if paired)."""
    proc = run_cli([*args, "mlflow.enabled=false", "data.n_samples=2000", "lr_find.num_iters=20"], tmp_path,
                   timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [f"error: {line}"], proc.stderr[-2000:]
    assert proc.stdout == "" and list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_lr_find_cli_records_one_run_per_batch_size(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    proc = run_cli(["data.n_samples=2000", "model.width=32", "threads=1", "lr_find.num_iters=30",
                    "batch_size=32,128,512", f"mlflow.tracking_uri={uri}", "mlflow.experiment=lrf"], tmp_path,
                   env_extra={"SCALING_PROGRESS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = {int(m.group(1)): line for line in proc.stdout.splitlines() if (m := re.match(r"bs=(\d+): ", line))}
    assert sorted(lines) == [32, 128, 512]
    for line in lines.values():
        assert re.search(r"valley=\S+ steep=\S+ minimum/10=\S+ -> using valley=", line), line
    [fit] = [line for line in proc.stdout.splitlines() if "alpha = " in line]
    assert "linear rule: 1" in fit and "sqrt rule: 0.5" in fit and "95% interval" in fit
    assert "lr_find bs=" in proc.stderr  # the tqdm bar

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("lrf")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 3 and {r.data.tags["scaling.kind"] for r in runs} == {"lr_find"}
    assert len({r.data.tags["lr_find.group"] for r in runs}) == 1
    for r in runs:
        p, b = r.data.params, int(r.data.params["batch_size"])
        assert r.info.run_name == f"lr_find bs={b}" and r.info.status == "FINISHED"
        assert f"valley={float(p['lr_find.valley']):.3g}" in lines[b]
        assert p["lr_find.suggestion"] == "valley" and "lr_find.alpha" in r.data.tags
        lrs = client.get_metric_history(r.info.run_id, "lr")
        losses = client.get_metric_history(r.info.run_id, "lr_find/loss")
        assert [m.step for m in lrs] == list(range(int(p["lr_find.iterations"]))) == [m.step for m in losses]
        assert lrs[0].value == pytest.approx(1e-6)
        names = {a.path for a in client.list_artifacts(r.info.run_id)}
        assert {"lr_find.png", "lr_find.json"} <= names
        png = Path(client.download_artifacts(r.info.run_id, "lr_find.png", str(tmp_path / r.info.run_id)))
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        curve = json.loads(Path(client.download_artifacts(r.info.run_id, "lr_find.json",
                                                          str(tmp_path / r.info.run_id))).read_text())
        assert len(curve["lrs"]) == len(lrs) and curve["batch_size"] == b


@pytest.mark.slow
@pytest.mark.parametrize("args, failed, recorded", [
    # Adam from lr 10 diverges after 2 iterations at every batch size: the first one tested ends it
    (["batch_size=32,64,128", "optimizer=adam", "lr_find.start_lr=10", "lr_find.end_lr=1e6", "lr_find.num_iters=50"],
     "lr_find.start_lr=10.0: the LR range test at batch size 32", []),
    # SGD from lr 3: batch 512 runs 17 of 20 iterations (a real result, kept), batch 8 diverges after 5
    (["batch_size=512,8", "lr_find.start_lr=3", "lr_find.end_lr=300", "lr_find.num_iters=20"],
     "lr_find.start_lr=3.0: the LR range test at batch size 8", [512]),
])
def test_lr_find_cli_a_test_that_diverges_at_once_fails_and_records_no_nan(tmp_path, args, failed, recorded):
    """It printed `using valley=nan`, exited 0 and recorded NaN suggestions as a FINISHED run."""
    from mlflow.tracking import MlflowClient

    from scaling.tracking import get_experiment_id

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    # the store exists: MLflow's own log lines stay out of stderr; the artifacts go beside it, not into
    # ./mlruns of the folder pytest runs in (MLflow's default for a database store)
    exp_id = get_experiment_id(client, "lrf")
    proc = run_cli(["data.n_samples=2000", "model.width=32", "threads=1", *args, f"mlflow.tracking_uri={uri}",
                    "mlflow.experiment=lrf"], tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and re.fullmatch(
        f"error: {re.escape(failed)} diverged after \\d+ iterations, too early to suggest an LR: lower "
        "lr_find.start_lr", lines[0]), proc.stderr[-2000:]
    assert "nan" not in proc.stdout and "alpha" not in proc.stdout
    assert [int(m.group(1)) for m in re.finditer(r"^bs=(\d+): ", proc.stdout, re.M)] == recorded
    runs = client.search_runs([exp_id])
    assert sorted(int(r.data.params["batch_size"]) for r in runs) == recorded
    for r in runs:  # the batch sizes tested before the failure are real results
        assert r.info.status == "FINISHED" and float(r.data.params["lr_find.lr"]) > 0
    if recorded:
        group = runs[0].data.tags["lr_find.group"]
        assert f"recorded in 'lrf' at {uri} (tag lr_find.group={group})" in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("args, key", [
    (["lr_find.start_lr=1", "lr_find.end_lr=0.1"], "lr_find.start_lr"),
    (["lr_find.start_lr=-1"], "lr_find.start_lr"),
    (["lr_find.num_iters=5"], "lr_find.num_iters"),
    (["batch_size=32,100000"], "lr_find.batch_sizes"),
    (["batch_size=32,abc"], "batch_size"),
    (["lr_find.suggestion=best"], "lr_find.suggestion"),
    (["-m", "batch_size=32,64"], "drop -m"),
    (["data=cifar10", "data.root=EMPTY"], "data.root"),
])
def test_bad_lr_find_input_is_one_line_and_leaves_nothing(tmp_path, args, key):
    (tmp_path / "empty").mkdir()
    args = [a.replace("EMPTY", str(tmp_path / "empty")) for a in args]
    proc = run_cli([*args, f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db"], tmp_path, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error:") and key in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not (tmp_path / "mlflow.db").exists() or not _runs(f"sqlite:///{tmp_path}/mlflow.db")


def _runs(uri: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    return [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]


@pytest.mark.slow
def test_train_with_ref_lr_auto_records_the_found_lr(tmp_path, tiny):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = [o for o in tiny if not o.startswith("mlflow.enabled")]
    proc = run_cli([*args, "scaling.ref_lr=auto", "lr_find.num_iters=30", f"mlflow.tracking_uri={uri}"], tmp_path,
                   script="scaling-train")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"lr range test: valley=\S+ at bs=128 -> ref_lr=", proc.stdout), proc.stdout
    [r] = _runs(uri)
    assert r.data.tags["trial.status"] == "completed"
    ref = float(r.data.tags["lr_find.lr"])
    assert float(r.data.params["lr.base"]) == pytest.approx(ref)
    assert float(r.data.params["lr.effective"]) == pytest.approx(ref * 32 / 128)


def test_lr_find_cli_whose_first_test_fails_leaves_no_store(tmp_path):
    """The store and its experiment were made before the first test ran: one that diverged at once left an
    empty mlflow.db (and experiment) behind. They are made at the first result now."""
    proc = run_cli(["data.n_samples=2000", "model.width=32", "threads=1", "batch_size=8", "lr_find.start_lr=3",
                    "lr_find.end_lr=300", "lr_find.num_iters=20", "mlflow.experiment=lrf"], tmp_path)
    assert proc.returncode == 2 and "diverged after" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()


def test_ctrl_c_before_and_after_the_first_recorded_test(tmp_path):
    """A Ctrl-C while scaling-lr-find imports (torch, MLflow) is one line and exit 130 with nothing recorded
    (scaling.interrupts); once a batch size's test is recorded, a Ctrl-C is `interrupted` and keeps it."""
    import signal
    import time

    from procs import interrupt_once_recorded

    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "SCALING_PROGRESS")}
    args = ["data.n_samples=8000", "model.width=32", "threads=1", "batch_size=32,2048", "lr_find.num_iters=3000",
            "lr_find.end_lr=1e-3", "mlflow.experiment=lrf"]
    early = subprocess.Popen([str(BIN / "scaling-lr-find"), *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    time.sleep(0.4)
    early.send_signal(signal.SIGINT)
    out, err = early.communicate(timeout=60)
    assert (early.returncode, out, err.strip()) == (
        130, "", "error: interrupted before any range test was recorded: nothing was recorded"), err[-2000:]
    assert not (tmp_path / "mlflow.db").exists()

    proc = subprocess.Popen([str(BIN / "scaling-lr-find"), *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    db = tmp_path / "mlflow.db"  # interrupted once batch 32's run is recorded
    out, err = interrupt_once_recorded(proc, db, "select count(*) from runs where status = 'FINISHED'")
    assert proc.returncode == 130 and "Traceback" not in out + err, err[-2000:]
    assert err.strip().splitlines()[-1] == "error: interrupted", err[-2000:]
    assert out.startswith("bs=32: ") and "bs=2048" not in out, out
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    runs = client.search_runs([client.get_experiment_by_name("lrf").experiment_id])
    assert [(r.info.run_name, r.info.status) for r in runs] == [("lr_find bs=32", "FINISHED")]
