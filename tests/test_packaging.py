"""The project as a wheel (`pip install .`, not `-e`): what it carries must be enough to compose and check a study."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_a_wheel_carries_the_configs_and_composes_a_study_outside_the_checkout(tmp_path):
    """The Hydra configs lay beside the package, not in it: an installed wheel had no conf/ to compose."""
    src = tmp_path / "src"  # a copy: building in the checkout would leave build/ there
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for folder in ("scaling", "hydra_plugins"):
        shutil.copytree(REPO / folder, src / folder, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)],
                   check=True, capture_output=True, timeout=300)
    wheel = next((tmp_path / "dist").glob("scaling-*.whl"))
    subprocess.run([*pip, "install", "--no-deps", "--target", str(tmp_path / "site"), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    run = tmp_path / "run"
    run.mkdir()
    code = ("import sys, scaling.cli as c\n"
            "print('module', c.__file__)\n"
            "sys.argv = ['scaling-study', '--cfg', 'job', 'model.width=8']\n"
            "c.study_entry()\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    proc = subprocess.run([sys.executable, "-c", code], cwd=run, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"module {tmp_path / 'site' / 'scaling' / 'cli.py'}" in proc.stdout  # the wheel's, not the checkout's
    # the default study's preset (scaling/conf/experiment) and the groups it selects composed
    assert "width: 8" in proc.stdout and "name: mnist1d" in proc.stdout, proc.stdout[-2000:]
    assert sorted(p.name for p in run.iterdir()) == []


def _make_install_plan(venv: Path, *args: str) -> list[str]:
    """Return the commands `make -n install VENV=venv` would run."""
    from procs import make_dry_run

    return make_dry_run("install", f"VENV={venv}", *args).splitlines()


def test_make_install_with_another_torch_spec_installs_it_into_an_existing_venv(tmp_path):
    """The venv's stamp once made `make install TORCH_SPEC=...` (the README's CUDA line) a no-op on a venv
    that `make test` had built: the CPU build stayed. Each spec has its own stamp now."""
    venv = tmp_path / "venv"
    fresh = _make_install_plan(venv)
    assert any("pip install -q --force-reinstall torch==2.13.0" in c for c in fresh), fresh
    assert any('pip install -q -e ".[dev,slurm]"' in c for c in fresh), fresh
    venv.mkdir()
    for line in fresh:  # what the install leaves: the stamps, by the plan's own touch commands
        for word in line.split():
            if word.startswith(str(venv) + "/."):
                Path(word).touch()
    assert _make_install_plan(venv) == [], "an installed venv reinstalls"
    cuda = "torch --index-url https://download.pytorch.org/whl/cu124"
    plan = _make_install_plan(venv, f"TORCH_SPEC={cuda}")
    assert any(f"pip install -q --force-reinstall {cuda}" in c for c in plan), plan
    assert any('pip install -q -e ".[dev,slurm]"' in c for c in plan), plan  # the project again, on that torch
