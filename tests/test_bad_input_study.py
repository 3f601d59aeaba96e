"""Bad study input ends before anything is written: ASHA and resource settings when the sweeper plans,
trials that could never run (a batch larger than its data, CUDA without a GPU) before the study run
opens, and a huge grid before it is built. Every case goes through the real console script and must
end non-zero in ONE line naming the key and the value, leaving nothing behind: no MLflow store, no
.studies/, no outputs, no Ray process.
"""
from __future__ import annotations

import os
import resource
import shutil
import subprocess
import time

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from procs import stop_group
from test_bad_input import BIN, SMALL, _left_behind

pytestmark = pytest.mark.slow

STUDY = ["-m", "batch_size=32,64", *SMALL]
NO_GPU = pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has a GPU")

CASES = [
    # (args, text the one line must contain)
    # too short a range test for scaling.ref_lr=auto: refused before the study run or .studies exist
    ([*STUDY, "scaling.ref_lr=auto", "optimizer=adam", "lr_find.start_lr=10", "lr_find.end_lr=1e6",
      "lr_find.num_iters=50"], "scaling.ref_lr='auto': the LR range test at batch size 128 diverged after"),
    ([*STUDY, "hydra.sweep.dir=/proc/nope"], "hydra.sweep.dir='/proc/nope': folder /proc/nope is not writable"),
    ([*STUDY, "hydra.sweeper.asha.grace_period=0"], "hydra.sweeper.asha.grace_period=0.0: must be positive"),
    ([*STUDY, "hydra.sweeper.asha.grace_period=-1"], "hydra.sweeper.asha.grace_period=-1.0"),
    ([*STUDY, "hydra.sweeper.asha.mode=up"], "hydra.sweeper.asha.mode='up'"),
    ([*STUDY, "hydra.sweeper.asha.metric=foo"], "hydra.sweeper.asha.metric='foo'"),
    # ASHA would keep the least accurate trials: mode defaults to min, for val/loss
    ([*STUDY, "hydra.sweeper.asha.metric=val/acc"], "hydra.sweeper.asha.mode='min': judges hydra.sweeper.asha.metric=val/acc"),
    ([*STUDY, "hydra.sweeper.asha.reduction_factor=nan"], "hydra.sweeper.asha.reduction_factor=nan"),
    ([*STUDY, "hydra.sweeper.asha.variant=sync"], "hydra.sweeper.asha.variant='sync'"),
    # promotion-based ASHA pauses trials: it needs checkpoints, no concurrency cap, single-worker trials
    ([*STUDY, "hydra.sweeper.asha.variant=promotion", "hydra.sweeper.checkpoint=false"],
     "hydra.sweeper.asha.variant='promotion': pauses trials at rungs, which needs hydra.sweeper.checkpoint=true"),
    ([*STUDY, "hydra.sweeper.asha.variant=promotion", "hydra.sweeper.max_concurrent=1"],
     "which needs hydra.sweeper.max_concurrent=null"),
    ([*STUDY, "hydra.sweeper.asha.variant=promotion", "parallel.workers=2"], "which needs single-worker trials"),
    ([*STUDY, "hydra.sweeper.resources.cpu=nan"], "hydra.sweeper.resources.cpu=nan"),
    ([*STUDY, "hydra.sweeper.resources.gpu=nan"], "hydra.sweeper.resources.gpu=nan"),
    ([*STUDY, "hydra.sweeper.max_failures=-1"], "hydra.sweeper.max_failures=-1"),
    ([*STUDY, "hydra.sweeper.resume_errored=true"], "hydra.sweeper.resume_errored=True: needs hydra.sweeper.resume=true"),
    # a data-parallel trial larger than the cluster (here a local Ray of 2 CPUs): Ray Train would wait for ever
    ([*STUDY, "parallel.workers=2", "hydra.sweeper.resources.cpu=2", "hydra.sweeper.ray.num_cpus=2"],
     "parallel.workers=2: 2 workers of hydra.sweeper.resources.cpu=2 each need 4 CPUs, more than the cluster's 2"),
    ([*STUDY, "hydra.sweeper.max_concurrent=0"], "hydra.sweeper.max_concurrent=0"),
    ([*STUDY, "lr_multiplier=range(0,1,0)"], "lr_multiplier='range(0,1,0)'"),
    # digits has 1,438 training samples: validation knows the size of generated data only
    (["-m", "data=digits", "batch_size=32,4096", "epochs=1"], "batch_size=4096: is larger than the training set"),
    (["-m", "data=digits", "batch_size=32,1024", "epochs=2", "warmup.epochs=1.8"], "warmup.epochs=1.8"),
]


def run_cli(args, cwd, timeout=90, limit_bytes=None) -> tuple[subprocess.CompletedProcess, float]:
    """Run scaling-train in its own process group; on a timeout stop that group (all it started) and fail."""
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    cap = (lambda: resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))) if limit_bytes else None
    t0 = time.time()
    proc = subprocess.Popen([str(BIN / "scaling-train"), *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, start_new_session=True,
                            preexec_fn=cap)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_group(proc)
        pytest.fail(f"scaling-train {' '.join(args)} still ran after {timeout}s")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), time.time() - t0


def assert_one_line(proc: subprocess.CompletedProcess, needle: str) -> None:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr + proc.stdout
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr[-2000:]
    assert needle in lines[0], lines[0]


@pytest.mark.parametrize("args, needle", CASES, ids=[" ".join(a for a in c[0] if a not in STUDY) for c in CASES])
def test_bad_study_input_ends_in_one_line_before_anything_is_written(tmp_path, args, needle):
    proc, elapsed = run_cli(args, tmp_path)
    assert_one_line(proc, needle)
    assert elapsed < 60, f"took {elapsed:.0f}s"
    assert _left_behind(tmp_path) == []


@NO_GPU
def test_cuda_without_a_gpu_ends_in_one_line_before_the_study_run_opens(tmp_path):
    """Every attempt of such a trial would fail; Ray's resources tell, and the driver never imports torch."""
    proc, _ = run_cli([*STUDY, "device=cuda"], tmp_path)
    assert_one_line(proc, "device='cuda': needs a GPU, and the Ray cluster has none")
    assert _left_behind(tmp_path) == []


@NO_GPU
@pytest.mark.parametrize("args, needle", [
    (["-m", "batch_size=32,64", "parallel.workers=2", "parallel.backend=nccl", *SMALL],
     "parallel.backend='nccl': needs a GPU per worker, and hydra.sweeper.resources.gpu=0"),
    (["parallel.workers=2", "parallel.backend=nccl", *SMALL],
     "parallel.backend='nccl': needs CUDA, and the ranks run on the CPU (device=auto)"),
    (["device=cuda", *SMALL], "device='cuda': no CUDA device is visible to this process"),
], ids=["study nccl", "run nccl", "run cuda"])
def test_a_trial_this_machine_cannot_run_ends_in_one_line_before_hydra_or_mlflow_write(tmp_path, args, needle):
    """nccl with device=auto on a CPU, or device=cuda without a GPU, failed inside the trial (every
    attempt of a study's), after Hydra's output folder and the MLflow store were made."""
    proc, _ = run_cli(args, tmp_path)
    assert_one_line(proc, needle)
    assert _left_behind(tmp_path) == []


def test_a_huge_grid_is_refused_before_it_is_built(tmp_path):
    """10^8 trials would take ~10 GB as override lists: the driver, capped at 3 GB, must not build them."""
    proc, elapsed = run_cli(["-m", "seed=range(0,100000000)", *SMALL], tmp_path, timeout=60, limit_bytes=3 << 30)
    assert_one_line(proc, "hydra.sweeper.max_trials=1000: the grid has 100000000 trials")
    assert elapsed < 30, f"took {elapsed:.0f}s"
    assert _left_behind(tmp_path) == []


@pytest.mark.parametrize("sweeps, num_samples", [
    (["batch_size=32,64", "lr_multiplier=range(1,4)", "epochs=2"], 1),
    (["lr_multiplier=range(0.1,1,0.1)", "batch_size=16,32,64"], 1),
    (["lr_multiplier=range(1,0,-0.25)", "seed=range(3)"], 1),
    (["batch_size=32,64", "lr_multiplier=tag(log,interval(0.01,100))"], 5),
    (["batch_size=16,32", "batch_size=128", "seed=range(10,0,-3)"], 3),
])
def test_grid_size_counts_what_build_grid_builds(sweeps, num_samples):
    from scaling.grid import build_grid, grid_size

    overrides = OverridesParser.create().parse_overrides(sweeps)
    assert grid_size(overrides, num_samples=num_samples) == len(build_grid(overrides, num_samples=num_samples).points)
