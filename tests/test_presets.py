"""Study presets (scaling/conf/experiment): each is documented, every grid point validates, and each runs as a study.

The smoke runs drive the real `scaling-train -m experiment=<name>` (Hydra, the Ray Tune sweeper,
MLflow) with every grid axis pinned to one value, so each is a one-trial study of half an epoch.
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from scaling.cli import CONF_DIR
from scaling.validation import validate

BIN = Path(sys.executable).parent
PRESETS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
NEW = ("rule_comparison", "optimizers", "architecture", "schedules", "cifar10_resnet")

# One value per grid axis (a shell override replaces the preset's axis): one trial per preset,
# picked to exercise the non-default paths (a rule with warmup, Adam, GELU + He, one-cycle after warmup).
PIN = {
    "rule_comparison": ["batch_size=64", "scaling.rule=sqrt", "warmup.epochs=0.25", "lr_multiplier=1"],
    "optimizers": ["optimizer=adam", "batch_size=64", "lr_multiplier=0.1"],
    "architecture": ["model.width=16", "model.depth=3", "model.activation=gelu", "model.init=he",
                     "batch_size=64", "lr_multiplier=1"],
    "schedules": ["schedule=onecycle", "batch_size=64", "lr_multiplier=1", "warmup.epochs=0.1"],
    "cifar10_resnet": ["batch_size=32", "lr_multiplier=1", "model.width=4", "model.depth=1", "warmup.epochs=0.1",
                       "eval_every=0.5"],
}
SMALL = ["epochs=0.5", "eval_every=0.25", "data.n_samples=1500", "model.width=16", "threads=1",
         "hydra.sweeper.asha.enabled=false", "hydra.sweeper.report=false"]


def preset_grid(name: str):
    """Return (the preset's composed config with its hydra node, its Grid)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from scaling.config import register_configs
    from scaling.grid import build_grid

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={name}"], return_hydra_config=True)
    params = [f"{k}={v}" for k, v in (cfg.hydra.sweeper.params or {}).items()]
    return cfg, build_grid(OverridesParser.create().parse_overrides(params))


def test_the_new_presets_exist():
    assert set(NEW) <= set(PRESETS)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_is_documented(name):
    text = (CONF_DIR / "experiment" / f"{name}.yaml").read_text()
    lines = text.splitlines()
    assert lines[0] == "# @package _global_"
    assert f"\nname: {name}\n" in text
    header = [line for line in lines[1:] if line.startswith("#")]
    assert len(header) >= 3, "a preset's header says what it answers and how to read it"


@pytest.mark.parametrize("name", PRESETS)
def test_every_grid_point_validates(compose_cfg, name):
    from omegaconf import OmegaConf

    cfg, grid = preset_grid(name)
    assert cfg.name == name and grid.axes
    assert len(grid.points) <= cfg.hydra.sweeper.max_trials
    # Hydra composes a point as: the groups it names, then its plain keys set on the result. Compose
    # once per distinct group choice and set the plain keys with OmegaConf (typed, struct mode):
    # the same configs as composing every point, in a fraction of the time.
    groups = {p.name for p in CONF_DIR.iterdir() if p.is_dir()}
    bases = {}
    for point in grid.points:
        chosen = tuple(o for o in point if o.split("=")[0] in groups)
        if chosen not in bases:
            bases[chosen] = compose_cfg(f"experiment={name}", *chosen)
        trial = copy.deepcopy(bases[chosen])
        for o in point:
            key, value = o.split("=", 1)
            if key not in groups:
                OmegaConf.update(trial, key, yaml.safe_load(value), merge=False)
        validate(trial)


def test_pins_cover_every_axis():
    for name, pins in PIN.items():
        _, grid = preset_grid(name)
        pinned = {p.split("=")[0] for p in pins}
        assert set(grid.axes) <= pinned, f"{name}: unpinned axes {set(grid.axes) - pinned}"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """Return one MLflow store for every smoke run (creating its tables costs seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('presets')}/mlflow.db"


@pytest.mark.slow
@pytest.mark.parametrize("name", NEW)
def test_preset_runs_as_a_one_trial_study(tmp_path, store, name):
    from mlflow.tracking import MlflowClient

    uri = store
    extra = []
    if name == "cifar10_resnet":
        from fake_vision import write_fake_cifar10

        write_fake_cifar10(tmp_path / "data", n_train=400, n_test=100)
        extra = [f"data.root={tmp_path / 'data'}"]  # bf16 autocast and device=auto (the CPU here) as preset
    args = ["-m", f"experiment={name}", *SMALL, *PIN[name], *extra, f"mlflow.tracking_uri={uri}",
            f"mlflow.experiment={name}"]
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    proc = subprocess.run([str(BIN / "scaling-train"), *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"study {name}-" in proc.stdout and ": 1 trials |" in proc.stdout, proc.stdout[-2000:]

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    [trial] = [r for r in runs if r.data.tags.get("scaling.kind") == "trial"]
    assert trial.data.tags["trial.status"] == "completed", trial.data.tags.get("trial.reason")
    p = trial.data.params
    assert p["name"] == name
    for pin in PIN[name]:
        key, value = pin.split("=", 1)
        key = {"optimizer": "optimizer.name", "schedule": "schedule.name"}.get(key, key)
        assert float(p[key]) == float(value) if value[0].isdigit() else p[key] == value
    if name == "cifar10_resnet":
        assert (p["data.name"], p["model.name"], p["precision"]) == ("cifar10", "resnet", "bf16")
