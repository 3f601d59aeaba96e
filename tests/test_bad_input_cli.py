"""Bad input that used to slip past the command-line check: composition errors of a multirun,
a basic-sweeper grid point that fails validation, Hydra's flags that take a value, and error lines
that named the wrong key. Each goes through a real console script and must end in ONE line (exit 2)
naming the key and the value, with nothing left in the cwd.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from scaling.cli import CONF_DIR
from test_bad_input import _left_behind

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
SMALL = ["data.n_samples=2000", "epochs=0.5"]

CASES = [
    # (script, args, texts the line must contain, texts it must not)
    # a multirun's composition errors (scaling-study is a multirun)
    ("scaling-study", ["optimizer=foo"], ["optimizer/foo", "options for optimizer"], []),
    ("scaling-study", ["experiment=nope"], ["experiment/nope"], []),
    ("scaling-study", ["batch_size=abc"], ["batch_size=abc"], []),
    ("scaling-study", ["foo=1"], ["'foo'"], []),
    ("scaling-study", ["hydra.sweeper.asha.nope=1"], ["hydra.sweeper.asha.nope"], []),
    ("scaling-study", ["hydra.sweeper.num_samples=abc"], ["hydra.sweeper.num_samples=abc"], []),
    # an interval's draw is merged alone: named by the interval, not by the first trial holding it
    ("scaling-study", ["model.width=interval(8,16)"], ["model.width='interval(8,16)'", "int(interval(a,b))"],
     ["trial"]),
    ("scaling-study", ["optimizer=interval(8,16)"], ["optimizer='interval(8,16)'", "config group"], ["trial"]),
    ("scaling-train", ["-m", "lr_multiplier=tag(log,interval(0,1))", *SMALL],
     ["lr_multiplier='tag(log,interval(0,1))': a log interval needs a positive start"], ["'lr_multiplier="]),
    ("scaling-train", ["-m", "batch_size="], ["batch_size="], []),
    ("scaling-train", ["-m", "optimizer=adam,foo", *SMALL], ["optimizer/foo"], ["data.n_samples", "epochs"]),
    # every grid point of a basic-sweeper multirun is validated before its first job
    ("scaling-train", ["-m", "hydra/sweeper=basic", "batch_size=32,-1", *SMALL], ["batch_size=-1"], []),
    ("scaling-train", ["-m", "hydra/sweeper=basic", "batch_size=range(5,5)", *SMALL], ["batch_size", "range(5,5)"], []),
    # two of Hydra's modes at once: Hydra's refusal was a ValueError traceback
    ("scaling-train", ["-m", "batch_size=32,64", "--cfg", "job"], ["--multirun and --cfg: give one of them"], []),
    ("scaling-train", ["--cfg", "job", "--info"], ["--cfg and --info: give one of them"], []),
    # Hydra's flags that take a value
    ("scaling-train", ["--config-name", "config", "batch_size=-1"], ["batch_size=-1"], []),
    ("scaling-train", ["-cn", "config", "batch_size=-1"], ["batch_size=-1"], []),
    ("scaling-train", ["--config-dir", str(CONF_DIR), "batch_size=-1"], ["batch_size=-1"], []),
    ("scaling-train", ["-cd", str(CONF_DIR), "batch_size=-1"], ["batch_size=-1"], []),
    ("scaling-study", ["-cn", "config", "batch_size=-1"], ["batch_size=-1"], []),
    ("scaling-train", ["--config-name=foo"], ["--config-name", "foo"], []),
    ("scaling-train", ["-cd", "/nonexistent/conf"], ["--config-dir", "/nonexistent/conf"], []),
    # the line names the key that is wrong, and only that
    ("scaling-train", ["lr_find.batch_sizes.x=1", *SMALL],  # OmegaConf's message names no key
     ["lr_find.batch_sizes.x=1", "null"], ["data.n_samples", "epochs"]),
    # a grid axis in a single run: Hydra would run one trial and ignore it
    ("scaling-train", ["hydra.sweeper.params.batch_size=32,64", *SMALL],
     ["hydra.sweeper.params.batch_size='32,64'", "add -m"], ["data.n_samples", "epochs"]),
    ("scaling-train", ["hydra/launcher=nope"], ["hydra/launcher/nope", "options for hydra/launcher:"], []),
    # a deleted key: every key of the trial config is required (it failed as "Key 'seed' not in 'TrialConfig'")
    ("scaling-train", ["~seed", *SMALL], ["~seed: deletes seed", "set it instead (seed=...)"], ["TrialConfig"]),
    ("scaling-study", ["~early_stopping.patience"], ["~early_stopping.patience: deletes"], ["does not exist"]),
    ("scaling-lr-find", ["~model"], ["~model: deletes model"], []),
    ("scaling-train", ["-m", "batch_size=32,abc", *SMALL], ["batch_size=abc"], ["data.n_samples", "epochs"]),
    # a key the schema lacks: Hydra's "Could not override 'k'" named the key but not the value
    ("scaling-train", ["batch_sze=32", *SMALL], ["batch_sze=32: Key 'batch_sze' not in"], ["Could not override"]),
    ("scaling-lr-find", ["model.widht=3", *SMALL], ["model.widht=3: Key 'widht' not in"], ["Could not override"]),
    ("scaling-train", ["-m", "batch_sze=32,64", *SMALL], ["batch_sze='32'"], ["Could not override"]),
    ("scaling-train", ["-m", "hydra.sweeper.params={batch_sze:'32,64'}", *SMALL], ["batch_sze='32'"],
     ["Could not override"]),
    # a preset that configures the scaling sweeper, run under Hydra's basic one: which preset, which key
    *[("scaling-train", ["-m", "hydra/sweeper=basic", f"experiment={name}"],
       [f"experiment={name}: sets hydra.sweeper.{key}", "scaling sweeper", "without hydra/sweeper=basic"],
       ["raised while composing"])
      for name, key in (("default_study", "asha"), ("rule_comparison", "asha"), ("cifar10_resnet", "resources"))],
]


def run(script: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "SCALING_PROGRESS")}
    return subprocess.run([str(BIN / script), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("script, args, needles, absent", CASES,
                         ids=[f"{c[0]}:{' '.join(c[1])[:50]}" for c in CASES])
def test_bad_input_ends_in_one_line_naming_it(tmp_path, script, args, needles, absent):
    proc = run(script, args, tmp_path)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr[-2000:]
    assert all(n in lines[0] for n in needles), lines[0]
    assert not any(a in lines[0] for a in absent), lines[0]
    assert _left_behind(tmp_path) == []  # no multirun/, outputs/, mlflow.db, no trial's process


def test_basic_sweeper_runs_with_flags_among_the_overrides(tmp_path):
    """A valid basic-sweeper grid still runs every job, with `-cn NAME` after an override."""
    proc = run("scaling-train", ["-m", "hydra/sweeper=basic", "batch_size=32,64", "-cn", "config", *SMALL,
                                 "mlflow.enabled=false"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("trial completed") == 2, proc.stdout


INFO_CASES = [
    # (script, args, a text of the answer): a bare --info after an override, and scaling-study's own
    # experiment=, were read as --info's value; --hydra-help failed on any override of the job's config
    ("scaling-study", ["--info"], "experiment/default_study"),
    ("scaling-study", ["-i", "defaults"], "experiment/default_study"),
    ("scaling-train", ["model.width=64", "--info"], "width: 64"),
    ("scaling-lr-find", ["model.width=64", "--info", "config"], "width: 64"),
    ("scaling-study", ["--hydra-help"], "Hydra (1."),
    ("scaling-train", ["--hydra-help", "optimizer=adam", "hydra.job.name=x"], "Hydra (1."),
    # the tool's own help header, not Hydra's "cli is powered by Hydra" (the module's name)
    ("scaling-train", ["--help"], "scaling-study [overrides]      the default study"),
    ("scaling-lr-find", ["--help"], "scaling-lr-find [overrides]    the LR range test"),
]


@pytest.mark.parametrize("script, args, needle", INFO_CASES, ids=[f"{c[0]}:{' '.join(c[1])}" for c in INFO_CASES])
def test_hydras_information_flags_answer_wherever_they_stand(tmp_path, script, args, needle):
    proc = run(script, args, tmp_path)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert needle in proc.stdout, proc.stdout[-2000:]
    assert _left_behind(tmp_path) == []


def test_a_preset_composition_error_keeps_its_reason(tmp_path):
    """Hydra words an error in a config file over two lines ("In 'experiment/x': ValidationError raised while
    composing config:", then the reason); the one line keeps the reason and the key."""
    conf = tmp_path / "conf" / "experiment"
    conf.mkdir(parents=True)
    (conf / "bad.yaml").write_text("# @package _global_\nbatch_size: abc\n")
    (tmp_path / "run").mkdir()
    proc = run("scaling-train", ["-cd", str(tmp_path / "conf"), "experiment=bad"], tmp_path / "run")
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert "experiment/bad" in lines[0] and "could not be converted to Integer" in lines[0], lines[0]
    assert "(key: batch_size)" in lines[0], lines[0]
    assert _left_behind(tmp_path / "run") == []
