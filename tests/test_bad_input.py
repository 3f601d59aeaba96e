"""The bad-input catalogue: every case goes through a real console script and must end at once,
non-zero, in ONE line that names the key (or value), without a traceback, and leave nothing
behind: no MLflow store, no Ray process, no output folder.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
SMALL = ["data.n_samples=2000", "epochs=1"]

CASES = [
    # (script, args, text the one line must contain)
    ("scaling-train", ["batch_size=abc"], "batch_size"),
    ("scaling-train", ["batch_size=-1"], "batch_size=-1"),
    ("scaling-train", ["batch_size=0"], "batch_size=0"),
    ("scaling-train", ["lr_multiplier=nan"], "lr_multiplier"),
    ("scaling-train", ["epochs=0"], "epochs=0"),
    ("scaling-train", ["eval_every=5", "epochs=1"], "eval_every=5"),
    ("scaling-train", ["batchsize=3"], "batchsize"),
    ("scaling-train", ["+batchsize=3"], "batchsize"),
    ("scaling-train", ["optimizer=foo"], "optimizer/foo"),
    ("scaling-train", ["model.activation=swish"], "model.activation='swish'"),
    ("scaling-train", ["scaling.rule=cubic"], "scaling.rule='cubic'"),
    ("scaling-train", ["micro_batch_size=3"], "micro_batch_size=3"),
    ("scaling-train", ["batch_size=100000", *SMALL], "batch_size=100000"),
    ("scaling-train", ["target.metric=val/f1"], "target.metric='val/f1'"),
    ("scaling-train", ["mlflow.tracking_uri=http://127.0.0.1:9"], "mlflow.tracking_uri"),
    ("scaling-train", ["mlflow.tracking_uri=ftp://host/x"], "mlflow.tracking_uri"),
    ("scaling-train", ["mlflow.tracking_uri=sqlite:////proc/nope/x.db"], "mlflow.tracking_uri"),
    ("scaling-train", ["seed=-1"], "seed=-1"),
    ("scaling-train", ["seed=100000000000000"], "seed=100000000000000"),
    ("scaling-train", ["data.seed=99999999999"], "data.seed=99999999999"),
    ("scaling-train", ["data.n_samples=2", "batch_size=1"], "data.n_samples=2"),  # no validation sample
    ("scaling-train", ["data.max_train_samples=-5"], "data.max_train_samples=-5"),
    ("scaling-train", ["data.cache_dir=/proc/nope", "data.n_samples=1234"], "data.cache_dir='/proc/nope'"),
    ("scaling-train", ["data=mnist", "data.root=/nonexistent"], "data.root='/nonexistent'"),
    ("scaling-train", ["hydra.run.dir=/proc/nope"], "hydra.run.dir='/proc/nope'"),
    ("scaling-train", ["data=digits", "batch_size=4096"], "batch_size=4096"),
    ("scaling-train", ["-m", "data=digits", "batch_size=32,4096", "epochs=0.5"], "batch_size=4096"),
    ("scaling-train", ["target.value=inf"], "target.value=inf"),
    # a cycle of one step would train at base_lr_fraction x the LR throughout
    ("scaling-train", ["schedule=cyclic", "schedule.cycle_epochs=0.01", *SMALL],
     "schedule.cycle_epochs=0.01: is 1 step at batch_size=128"),
    # reached at the first evaluation (val/loss >= 0.5): mode defaults to max, for val/acc
    ("scaling-train", ["target.metric=val/loss", "target.value=0.5"], "target.mode='max': judges target.metric=val/loss"),
    # an accuracy is a fraction and a loss positive: such a target is never met (or met at once)
    ("scaling-train", ["target.value=70"], "target.value=70.0: cannot be met as meant: val/acc is a fraction, "
                                           "in (0, 1] (70% is 0.7)"),
    ("scaling-train", ["target.value=0"], "target.value=0.0: cannot be met as meant: val/acc is a fraction"),
    ("scaling-train", ["target.metric=val/loss", "target.mode=min", "target.value=-1"],
     "target.value=-1.0: cannot be met as meant: val/loss is positive"),
    ("scaling-train", ["lr=0.1", "scaling.ref_lr=auto"], "lr=0.1"),
    ("scaling-train", ["mlflow.tracking_uri=sqlite:///"], "mlflow.tracking_uri='sqlite:///'"),  # in memory: lost
    ("scaling-train", ["mlflow.tracking_uri=sqlite:////tmp"], "mlflow.tracking_uri='sqlite:////tmp'"),  # a folder
    ("scaling-train", ["mlflow.tracking_uri='sqlite:///~/x.db'"], "mlflow.tracking_uri='sqlite:///~/x.db'"),
    ("scaling-train", ["mlflow.tracking_uri=bogus://x"], "mlflow.tracking_uri='bogus://x'"),
    ("scaling-train", ["mlflow.tracking_uri=file:///tmp/mlruns"], "mlflow.tracking_uri='file:///tmp/mlruns'"),
    ("scaling-train", ["mlflow.tracking_uri=postgresql://u@127.0.0.1:1/db"], "database driver"),
    ("scaling-train", ["warmup.epochs=10", "epochs=1"], "warmup.epochs=10"),
    # 1,600 training samples at B=1024: epochs=2 is 3 steps and a 1.8-epoch warmup rounds to all 3
    ("scaling-train", ["data.n_samples=2000", "batch_size=1024", "epochs=2", "warmup.epochs=1.8"], "warmup.epochs=1.8"),
    ("scaling-train", ["-m", "batch_size=32,1024", "data.n_samples=2000", "epochs=2", "warmup.epochs=1.8"],
     "warmup.epochs=1.8"),
    # epochs=0.5 is 1 step there, and a 0.1-epoch warmup (0.16 of a step) takes one: none is left
    ("scaling-train", ["data.n_samples=2000", "batch_size=1024", "epochs=0.5", "warmup.epochs=0.1"],
     "warmup.epochs=0.1: is 1 step at batch_size=1024 (1600 training samples), which leaves no step of the 1 "
     "that epochs=0.5 gives after it"),
    ("scaling-train", ["batch_size=[1,2"], "batch_size=[1,2"),
    ("scaling-train", ["device=tpu"], "device='tpu'"),
    ("scaling-train", ["precision=fp8"], "precision='fp8'"),
    ("scaling-train", ["memory.limit_mb=-5"], "memory.limit_mb=-5"),
    ("scaling-train", ["scaling.ref_lr=0"], "scaling.ref_lr=0"),
    ("scaling-study", ["batch_size=-1"], "batch_size=-1"),
    ("scaling-train", ["-m", "batch_size=32,abc", *SMALL], "batch_size"),
    ("scaling-train", ["-m", "bogus=1,2", *SMALL], "bogus"),
    ("scaling-train", ["-m", "batch_size=range(5,5)", *SMALL], "batch_size"),
    ("scaling-train", ["-m", "batch_size=32,64", "hydra.sweeper.asha.grace_period=100", *SMALL],
     "hydra.sweeper.asha.grace_period=100.0: is longer than the budget epochs=1; set it to at most 1, "
     "or hydra.sweeper.asha.enabled=false"),
    ("scaling-train", ["-m", "batch_size=32,64", "hydra.sweeper.resources.gpu=4", *SMALL], "resources.gpu"),
    ("scaling-train", ["-m", "batch_size=32,64", "hydra.sweeper.resources.cpu=64", *SMALL], "resources.cpu"),
    ("scaling-train", ["-m", "batch_size=32,64", "hydra.sweeper.max_trials=1", *SMALL], "max_trials"),
    ("scaling-train", ["-m", "batch_size=32,64", "hydra.sweeper.study_name=../../etc", *SMALL], "study_name"),
    ("scaling-train", ["-m", "batch_size=32,64", "hydra.sweeper.study_name=/abs/path", *SMALL], "study_name"),
    ("scaling-train", ["-m", "batch_size=32,64", "hydra.sweeper.ray.address=127.0.0.1:1", *SMALL], "ray.address"),
    ("scaling-train", ["-m", "lr_multiplier=interval(0,1", *SMALL], "lr_multiplier"),
    ("scaling-train", ["-m", "batch_size=32,64", "mlflow.tracking_uri=http://127.0.0.1:9", *SMALL],
     "mlflow.tracking_uri"),
    ("scaling-lr-find", ["lr_find.start_lr=1", "lr_find.end_lr=0.1"], "lr_find.start_lr"),
    ("scaling-lr-find", ["lr_find.start_lr=-1"], "lr_find.start_lr"),
    ("scaling-lr-find", ["lr_find.num_iters=3"], "lr_find.num_iters"),
    ("scaling-lr-find", ["batch_size=100000", *SMALL], "batch_size"),
    ("scaling-report", ["no-such-study", "--tracking-uri", "sqlite:///{tmp}/store.db"], "no-such-study"),
    ("scaling-report", ["--memory-budget", "abc"], "memory-budget"),
    ("scaling-report", ["--memory-budget", "inf"], "memory-budget"),
    ("scaling-report", ["--tracking-uri", "http://127.0.0.1:9"], "--tracking-uri http://127.0.0.1:9: tracking server"),
    ("scaling-report", ["--tracking-uri", "sqlite:////nonexistent/x.db"], "x.db"),
    ("scaling-report", ["--tracking-uri", "sqlite:///{tmp}/empty.db"], "no MLflow store"),  # an empty file
]


def _left_behind(tmp_path: Path) -> list[str]:
    leftovers = [p.name for p in tmp_path.iterdir() if p.name not in ("store.db", "empty.db")]
    for proc in psutil.process_iter(["cwd", "name"]):
        try:
            if proc.info["cwd"] == str(tmp_path):
                leftovers.append(f"process {proc.pid} {proc.info['name']}")
        except (psutil.Error, TypeError):
            pass
    return leftovers


@pytest.mark.parametrize("script, args, needle", CASES, ids=[f"{c[0]}:{' '.join(c[1])[:40]}" for c in CASES])
def test_bad_input_ends_in_one_line_and_leaves_nothing(tmp_path, script, args, needle):
    if script == "scaling-report" and "{tmp}" in " ".join(args):
        from mlflow.tracking import MlflowClient

        MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/store.db").create_experiment("scaling")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if any(a.endswith("/empty.db") for a in args):
        (tmp_path / "empty.db").touch()  # must stay empty: reading a store creates none
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    t0 = time.time()
    proc = subprocess.run([str(BIN / script), *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)
    elapsed = time.time() - t0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode != 0, proc.stdout[-1000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr[-2000:]
    assert needle in lines[0], lines[0]
    assert elapsed < 60, f"took {elapsed:.0f}s"
    assert _left_behind(tmp_path) == []
    assert not (tmp_path / "empty.db").exists() or (tmp_path / "empty.db").stat().st_size == 0


@pytest.mark.parametrize("script, args", [
    ("scaling-train", []),
    ("scaling-train", ["-m", "batch_size=32,64", "hydra.sweeper.report=false"]),
    ("scaling-lr-find", ["lr_find.num_iters=20"]),
], ids=["train", "study", "lr-find"])
def test_a_deleted_experiment_ends_in_one_line_before_any_run(tmp_path, script, args):
    """MLflow keeps a deleted experiment's name and refuses runs in it with a long error."""
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    store = f"sqlite:///{tmp_path}/store.db"
    client = MlflowClient(tracking_uri=store)
    client.delete_experiment(client.create_experiment("gone"))
    proc = subprocess.run([str(BIN / script), *args, *SMALL, "mlflow.experiment=gone", f"mlflow.tracking_uri={store}"],
                          cwd=tmp_path, env={k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"},
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: mlflow.experiment='gone': is deleted"), proc.stderr[-2000:]
    assert not client.search_runs([client.get_experiment_by_name("gone").experiment_id], run_view_type=ViewType.ALL)
    assert _left_behind(tmp_path) == []


@pytest.mark.parametrize("script, args", [
    ("scaling-train", []),
    ("scaling-train", ["-m", "batch_size=32,64", "hydra.sweeper.report=false"]),
    ("scaling-lr-find", ["lr_find.num_iters=20"]),
], ids=["train", "study", "lr-find"])
def test_a_file_that_is_no_store_ends_in_one_line_naming_the_uri(tmp_path, script, args):
    """A study opened it only after Ray had started, and died with SQLAlchemy's traceback."""
    (tmp_path / "store.db").write_text("not a database\n")
    store = f"sqlite:///{tmp_path}/store.db"
    proc = subprocess.run([str(BIN / script), *args, *SMALL, f"mlflow.tracking_uri={store}"], cwd=tmp_path,
                          env={k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"},
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-2000:]
    assert lines == [f"error: mlflow.tracking_uri='{store}': is not a usable MLflow store (file is not a database)"]
    assert (tmp_path / "store.db").read_text() == "not a database\n" and _left_behind(tmp_path) == []


def test_a_store_left_with_a_hot_journal_is_used_not_refused(tmp_path):
    """A study driver SIGKILLed mid-write leaves `mlflow.db-journal` beside the store. The read-only
    check could not roll it back ("attempt to write a readonly database") and refused the store, so the
    resume that should finish the study could not start. MLflow's own connection rolls it back."""
    from scaling.config import ConfigError
    from scaling.store import check_tracking_uri, make_client

    store = f"sqlite:///{tmp_path}/mlflow.db"
    make_client(store).create_experiment("kept")
    writer = ("import os, sqlite3, sys\n"
              "con = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
              "con.execute('PRAGMA cache_size=1')\n"  # pages spill to the file mid-transaction
              "con.execute('BEGIN')\n"
              "con.executemany('INSERT INTO experiments (name, lifecycle_stage) VALUES (?, ?)',"
              " [(f'half-{i}', 'active') for i in range(3000)])\n"
              "os._exit(9)\n")  # killed before COMMIT
    subprocess.run([sys.executable, "-c", writer, str(tmp_path / "mlflow.db")], check=False, timeout=60)
    assert (tmp_path / "mlflow.db-journal").stat().st_size > 0, "the writer left no hot journal"
    check_tracking_uri(store)  # raised ConfigError
    names = {e.name for e in make_client(store).search_experiments()}
    assert "kept" in names and not any(n.startswith("half-") for n in names)  # the half write rolled back
    with pytest.raises(ConfigError, match="is not a usable MLflow store"):  # a file that is no store still is one
        (tmp_path / "other.db").write_bytes(b"x" * 4096)
        check_tracking_uri(f"sqlite:///{tmp_path}/other.db")


def test_a_store_creation_killed_leaves_a_temporary_file_that_the_next_creation_removes(tmp_path):
    """A kill -9 mid-migration skips the clean-up that removes the temporary store; the next command
    that creates the store removes it (under the folder's lock no other creator is writing one)."""
    from mlflow.tracking import MlflowClient

    from scaling.store import make_client

    code = ("import os, signal, threading\n"
            "import mlflow.store.tracking.sqlalchemy_store\n"  # imported first: the kill lands mid-migration
            "from scaling.store import make_client\n"
            "threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGKILL)).start()\n"
            "make_client('sqlite:///new.db')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, "the migration ended before the kill: " + proc.stderr[-2000:]
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left and all(name.startswith(".new.db.creating-") for name in left), left
    assert isinstance(make_client(f"sqlite:///{tmp_path}/new.db"), MlflowClient)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.db"]


def test_a_store_creation_cut_short_leaves_no_half_migrated_store(tmp_path):
    """Ctrl-C while MLflow migrates a new SQLite store (~1.5 s of alembic steps) left a file that every
    later command refused ("duplicate column name"). It is made under another name and renamed.

    The interrupt is raised between two of alembic's ~66 steps, as their version stamp is written (a
    SQLAlchemy cursor event): an alarm 0.3 s in (as before) landed once in CI inside an alembic batch
    operation, which turned it into a PendingRollbackError (exit 1), and on a faster machine it could
    come after the migration."""
    code = ("import sys, sqlalchemy\n"
            "from scaling.store import make_client\n"
            "stamps = []\n"
            "@sqlalchemy.event.listens_for(sqlalchemy.engine.Engine, 'before_cursor_execute')\n"
            "def cut_short(conn, cursor, statement, *args):\n"
            "    if statement.startswith('UPDATE alembic_version'):\n"
            "        stamps.append(statement)\n"
            "        if len(stamps) == 20:\n"
            "            raise KeyboardInterrupt\n"
            "try:\n    make_client('sqlite:///new.db')\nexcept KeyboardInterrupt:\n    sys.exit(130)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 130, "the migration was not cut short at its 20th step: " + proc.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "a partial store or its temporary file was left"
    from mlflow.tracking import MlflowClient

    from scaling.store import make_client

    assert isinstance(make_client(f"sqlite:///{tmp_path}/new.db"), MlflowClient)  # made afresh, whole
