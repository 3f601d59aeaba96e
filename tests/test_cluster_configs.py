"""The cluster configurations users start from, checked without launching anything.

- cluster/ray/cluster.yaml against Ray's own schema and `ray up`'s own config preparation;
- cluster/k8s/rayjob.yaml by structure (KubeRay's RayJob: ray.io/v1, head and GPU workers);
- cluster/slurm: the sbatch script parses, submit.py renders the allocation from slurm.yaml;
- scaling/conf/hydra/launcher: the submitit launchers compose;
- every server the project starts or documents binds to 127.0.0.1 (no 0.0.0.0 anywhere).
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def sweeper_keys() -> set[str]:
    from scaling.sweeper import AshaConf, RayConf, ResourcesConf, ScalingSweeperConf

    keys = {f.name for f in fields(ScalingSweeperConf)}
    for name, conf in (("asha", AshaConf), ("ray", RayConf), ("resources", ResourcesConf)):
        keys |= {f"{name}.{f.name}" for f in fields(conf)}
    return keys


def check_study_overrides(overrides: list[str]) -> None:
    """Fail unless every override names a real key: hydra.sweeper.* of the sweeper, the rest of the trial config."""
    from scaling.cli import compose

    trial = [o for o in overrides if not o.startswith("hydra.")]
    for o in overrides:
        if o.startswith("hydra.sweeper."):
            assert o.split("=", 1)[0][len("hydra.sweeper."):] in sweeper_keys(), o
    compose(["experiment=default_study", *trial])  # raises on an unknown key or a bad value


# ------------------------------------------------------------------ ray up


@pytest.fixture(scope="module")
def ray_cluster() -> dict:
    return load(CLUSTER / "ray" / "cluster.yaml")


def test_ray_cluster_yaml_matches_rays_schema(ray_cluster):
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(ray_cluster, schema)
    # what `ray up` itself does: fill in the provider's defaults, then validate
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(ray_cluster))


def test_ray_cluster_yaml_has_gpu_nodes_token_auth_and_a_loopback_dashboard(ray_cluster):
    types = ray_cluster["available_node_types"]
    assert ray_cluster["head_node_type"] in types
    gpu_types = [t for t in types.values() if re.match(r"(g4dn|g5|g6|p3|p4d|p5)\.", t["node_config"]["InstanceType"])]
    assert gpu_types and any(t.get("max_workers", 0) > 0 for t in gpu_types)
    head = " ".join(ray_cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    for cmds in (ray_cluster["head_start_ray_commands"], ray_cluster["worker_start_ray_commands"]):
        assert "RAY_AUTH_MODE=token" in " ".join(cmds)
    assert "~/.ray/auth_token" in ray_cluster["file_mounts"]
    setup = " ".join(ray_cluster["setup_commands"])
    assert "pip install" in setup and "~/scaling" in setup


# ------------------------------------------------------------------ KubeRay


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return load(CLUSTER / "k8s" / "rayjob.yaml")


def test_rayjob_runs_scaling_study_on_gpu_workers(rayjob):
    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
    spec = rayjob["spec"]
    command = spec["entrypoint"].split()
    assert command[0] == "scaling-study"
    assert "hydra.sweeper.ray.address=auto" in command
    check_study_overrides(command[1:])
    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    assert head["template"]["spec"]["containers"][0]["image"]
    workers = cluster["workerGroupSpecs"]
    assert workers and all(w["groupName"] and w["maxReplicas"] >= w["minReplicas"] for w in workers)
    gpus = [c["resources"]["limits"].get("nvidia.com/gpu", 0) for w in workers
            for c in w["template"]["spec"]["containers"]]
    assert any(int(g) >= 1 for g in gpus), "no worker asks for a GPU"
    per_trial = float(next(o.split("=")[1] for o in command if o.startswith("hydra.sweeper.resources.gpu=")))
    assert per_trial <= max(int(g) for g in gpus), "a trial asks for more GPUs than a worker has"


def test_rayjob_keeps_the_jobs_api_private(rayjob):
    spec = rayjob["spec"]
    cluster = spec["rayClusterSpec"]
    assert cluster["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    assert spec["submissionMode"] == "SidecarMode"  # the submitter reaches the dashboard on localhost
    assert cluster["authOptions"]["mode"] == "token"
    assert cluster["headGroupSpec"]["template"]["spec"]["restartPolicy"] == "Never"


def claimed_volumes(node) -> list[str]:
    """Return the claimName of every persistentVolumeClaim volume anywhere in a parsed manifest."""
    if isinstance(node, list):
        return [name for item in node for name in claimed_volumes(item)]
    if not isinstance(node, dict):
        return []
    if "persistentVolumeClaim" in node:
        return [node["persistentVolumeClaim"]["claimName"]]
    return [name for value in node.values() for name in claimed_volumes(value)]


def test_every_claimed_volume_is_defined_shared_and_documented():
    docs = [d for path in sorted((CLUSTER / "k8s").glob("*.yaml")) for d in yaml.safe_load_all(path.read_text()) if d]
    claims = {d["metadata"]["name"]: d for d in docs if d["kind"] == "PersistentVolumeClaim"}
    job = next(d for d in docs if d["kind"] == "RayJob")
    claimed = claimed_volumes(job)
    assert claimed, "rayjob.yaml mounts no volume?"
    for name in claimed:
        assert name in claims, f"rayjob.yaml mounts the claim {name!r}, which no manifest in cluster/k8s defines"
        claim = claims[name]
        assert claim["apiVersion"] == "v1"
        assert claim["metadata"].get("namespace") == job["metadata"].get("namespace"), name
        assert "ReadWriteMany" in claim["spec"]["accessModes"], f"{name}: the head and the workers mount it at once"
        assert claim["spec"]["resources"]["requests"]["storage"]
    readme = (CLUSTER / "README.md").read_text()
    assert any(c.startswith("kubectl apply -f cluster/k8s/pvc.yaml") for c in shell_commands(readme)), "undocumented"


def test_ray_versions_agree_across_the_cluster_configs(ray_cluster, rayjob):
    version = rayjob["spec"]["rayClusterSpec"]["rayVersion"]
    assert f"ray[default,tune]=={version}" in " ".join(ray_cluster["setup_commands"])
    assert f"rayproject/ray:{version}-" in (CLUSTER / "k8s" / "Dockerfile").read_text()


# ------------------------------------------------------------------ SLURM


def test_sbatch_script_parses_and_follows_rays_slurm_pattern():
    script = CLUSTER / "slurm" / "study.sbatch"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    assert "#SBATCH --ntasks-per-node=1" in text
    assert "ray start --head" in text and "ray start --address=" in text
    assert 'hydra.sweeper.ray.address="$ip_head"' in text
    assert "ray stop" not in text.replace("`ray stop`", "")  # only this job's Ray is stopped, by pid


def submit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CLUSTER / "slurm" / "submit.py"), "--dry-run", *args],
                          capture_output=True, text=True, timeout=60)


def test_submit_renders_the_allocation_from_the_config():
    proc = submit("nodes=4", "gpus_per_node=8", "cpus_per_task=32", "time=12:00:00", "partition=gpu",
                  "additional.mail-type=END", "--", "batch_size=64,128", "hydra.sweeper.resources.gpu=1")
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.splitlines()[0]
    for flag in ("--nodes=4", "--gpus-per-node=8", "--cpus-per-task=32", "--time=12:00:00", "--partition=gpu",
                 "--ntasks-per-node=1", "--mail-type=END"):
        assert flag in line.split(), line
    assert line.endswith("study.sbatch batch_size=64,128 hydra.sweeper.resources.gpu=1")


@pytest.mark.parametrize("args, message", [
    (["nodez=2"], "nodez"),
    (["nodes=0"], "nodes=0: must be at least 1"),
    (["gpus_per_node=-1"], "gpus_per_node=-1: must be at least 0"),
    (["gpus_per_node=abc"], "gpus_per_node=abc: "),
    (["--", "hydra.sweeper.resources.gpu=1"], "gpus_per_node=0"),
    (["cpus_per_task=2", "--", "hydra.sweeper.resources.cpu=4"], "cpus_per_task=2"),
    (["--", "hydra.sweeper.resources.gpu=-1"], "hydra.sweeper.resources.gpu='-1': must be at least 0"),
])
def test_submit_refuses_typos_and_trials_that_do_not_fit(args, message):
    proc = submit(*args)
    assert proc.returncode == 2 and message in proc.stderr and proc.stdout == ""


def job_environment(line: str) -> dict[str, str]:
    """Return the variables a dry run's command line sets for the job: `env NAME=value` words ahead of
    sbatch, and --export's NAME=value items, which sbatch splits at every comma (man sbatch)."""
    words, env = shlex.split(line), {}
    if words[0] == "env":
        words.pop(0)
        while "=" in words[0]:
            name, value = words.pop(0).split("=", 1)
            env[name] = value
    assert words[0] == "sbatch", line
    for word in words:
        if word.startswith("--export="):
            env.update(item.split("=", 1) for item in word[len("--export="):].split(",") if "=" in item)
    return env


def test_submit_passes_env_values_with_commas_quotes_and_spaces_whole():
    values = {"RAY_START_ARGS": "--min-worker-port=10002,--max-worker-port=10100 --a=1,--b=2",
              "SCALING_ENV_SETUP": """source ~/venvs/scaling/bin/activate; echo "a,b" '$HOME'""", "RAY_PORT": "6380"}
    proc = submit(*(f"env.{k}={v}" for k, v in values.items()), "--", "batch_size=64,128")
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.splitlines()[0]
    assert job_environment(line) == values, line
    assert "--export=ALL" in shlex.split(line) and line.endswith("study.sbatch batch_size=64,128")


@pytest.mark.parametrize("name", ["1X", "A-B", "A B"])
def test_submit_refuses_an_env_name_the_job_cannot_read(name):
    proc = submit(f"env.{name}=1")
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout
    assert proc.stderr.startswith(f"error: env.{name}: "), proc.stderr


@pytest.mark.parametrize("arg, message", [
    ("mem_gb=-5", "mem_gb=-5: must be at least 1"),
    ("mem_gb=0", "mem_gb=0: must be at least 1"),
    ("time=abc", "time='abc': must be"),
    ("time=", "time='': must be"),
    ("time=-5", "time='-5': must be"),
    ("time=1:2:3:4", "time='1:2:3:4': must be"),
])
def test_submit_refuses_an_allocation_out_of_range(arg, message):
    proc = submit(arg)
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout
    assert proc.stderr.startswith(f"error: {message}") and proc.stderr.count("\n") == 1, proc.stderr


@pytest.mark.parametrize("time", ["0", "90", "90:30", "12:00:00", "2-0", "2-12:30", "2-12:30:00", "UNLIMITED"])
def test_submit_takes_every_sbatch_time_format(time):
    proc = submit(f"time={time}", "mem_gb=32")
    assert proc.returncode == 0, proc.stderr
    assert f"--time={time}" in proc.stdout.split() and "--mem=32G" in proc.stdout.split()


@pytest.mark.parametrize("value", ["abc", "nan", "", "1,2"])
@pytest.mark.parametrize("resource", ["cpu", "gpu"])
def test_submit_names_a_trial_resource_that_is_not_a_number(resource, value):
    key = f"hydra.sweeper.resources.{resource}"
    proc = submit("gpus_per_node=1", "--", f"{key}={value}")
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout
    assert proc.stderr == f"error: {key}={value!r}: must be a number\n", proc.stderr


# ------------------------------------------------------------------ Hydra launchers


@pytest.mark.parametrize("launcher, target", [("slurm", "SlurmLauncher"), ("slurm_local", "LocalLauncher")])
def test_submitit_launchers_compose(launcher, target):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="hydra-submitit-launcher (the slurm extra)")
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from scaling.config import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "scaling" / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["hydra/sweeper=basic", f"hydra/launcher={launcher}",
                                           "hydra.launcher.timeout_min=5"], return_hydra_config=True)
    GlobalHydra.instance().clear()
    assert cfg.hydra.launcher._target_.endswith(target)
    assert cfg.hydra.launcher.timeout_min == 5 and cfg.hydra.launcher.stderr_to_stdout


# ------------------------------------------------------------------ nothing listens on every interface

SCANNED = {".yaml", ".yml", ".md", ".sh", ".sbatch", ".toml", ".cfg", ".ini", ".json", ".py", ".txt", ".conf", ""}
ANY_ADDRESS = re.compile(r"0\.0\.0\.0|--host[= ]::(\s|$)|dashboard-host[=: ]+['\"]?::")


def project_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, text=True)
    if out.returncode != 0:  # not a git checkout (an sdist): scan the usual folders
        names = [str(p.relative_to(ROOT)) for d in ("cluster", "scaling", "notebooks") for p in (ROOT / d).rglob("*")]
        names += ["README.md", "Makefile", "pyproject.toml"]
    else:
        names = out.stdout.splitlines()
    me = Path(__file__).resolve()
    files = []
    for name in names:
        path = ROOT / name
        if path.is_file() and path.resolve() != me and (path.suffix in SCANNED or path.name in ("Makefile", "Dockerfile")):
            files.append(path)
    return files


def test_no_config_doc_or_script_opens_a_server_on_every_interface():
    offenders = []
    for path in project_files():
        try:
            text = path.read_text()
        except (UnicodeDecodeError, OSError):
            continue
        for n, line in enumerate(text.splitlines(), 1):
            if ANY_ADDRESS.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, ("bind to 127.0.0.1 and document an SSH tunnel / kubectl port-forward instead:\n"
                           + "\n".join(offenders))


def shell_commands(markdown: str) -> list[str]:
    """Return the commands of a markdown file's code blocks, continuation lines joined."""
    commands = []
    for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", markdown, flags=re.S):
        commands += [c.strip() for c in block.replace("\\\n", " ").splitlines() if c.strip()]
    return commands


def test_documented_servers_bind_loopback():
    commands = shell_commands((CLUSTER / "README.md").read_text())
    servers = [c for c in commands if re.search(r"\bmlflow (server|ui)\b", c)]
    assert len(servers) >= 3, servers
    for command in servers:
        assert "--host 127.0.0.1" in command, command
    heads = [c for c in commands if "ray start --head" in c]
    assert heads
    for command in heads:
        assert "--include-dashboard=false" in command or "--dashboard-host=127.0.0.1" in command, command
    assert any("--app-name basic-auth" in c for c in servers)
    assert any(re.search(r"ssh -N -L (\d+):127\.0\.0\.1:\1 ", c) for c in commands), "no SSH tunnel documented"


def test_make_ui_runs_the_ui_command_that_a_study_prints():
    """`make ui` serves the UI as the study's last line says: one worker, no job runner (README)."""
    import shlex

    from procs import make_dry_run
    from scaling.tracking import ui_command

    words = shlex.split(next(line for line in make_dry_run("ui").splitlines() if " ui " in line))
    env, argv = ui_command("sqlite:///mlflow.db")
    assert words[0] == "MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false" and env == dict([words[0].split("=")]), words
    assert [Path(words[1]).name, *words[2:]] == argv, (words, argv)
