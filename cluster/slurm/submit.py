#!/usr/bin/env python3
"""Submit a scaling study to SLURM: cluster/slurm/study.sbatch with resources from slurm.yaml.

    python cluster/slurm/submit.py [--dry-run] [--wait] [--config FILE] [key=value ...] -- [study overrides ...]

The keys (nodes, cpus_per_task, gpus_per_node, time, partition, ...) are checked against a typed
schema, so a typo fails before anything is submitted. Everything after `--` is passed to
`scaling-study` (experiment=..., batch_size=..., hydra.sweeper.resources.gpu=1, mlflow.tracking_uri=...)
as typed, once the study is planned here as its job will plan it (scaling.preflight.plan_study): a
value the job would refuse, or a trial that does not fit on one node, fails before anything is submitted.
env.NAME=value goes to the job through sbatch's environment (`env NAME=value sbatch --export=ALL`),
never in --export's own list, which sbatch splits at commas.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

HERE = Path(__file__).resolve().parent


@dataclass
class SlurmConf:
    job_name: str = "scaling-study"
    nodes: int = 1
    cpus_per_task: int = 4
    gpus_per_node: int = 0
    mem_gb: Optional[int] = None
    time: str = "01:00:00"
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    output: str = "scaling-study-%j.out"
    additional: Dict[str, Any] = field(default_factory=dict)
    env: Dict[str, str] = field(default_factory=dict)


STRINGS = {"job_name", "time", "partition", "account", "qos", "constraint", "output"}
LEAST = {"nodes": 1, "cpus_per_task": 1, "gpus_per_node": 0, "mem_gb": 1}  # mem_gb: null is the partition's default
# sbatch --time: minutes[:seconds], hours:minutes:seconds, days-hours[:minutes[:seconds]]
TIME = re.compile(r"(\d+-)?\d+(:\d+){0,2}")
SWITCHES = {"true": True, "false": False, "null": None}  # additional.exclusive=true -> --exclusive


def load(config: Path, overrides: List[str]) -> SlurmConf:
    """Return the typed config: `config` merged with key=value overrides (unknown keys fail).

    Numbers are read as YAML. String fields, env.* and additional.* take the text as given: YAML
    would read time=12:00:00 and additional.begin=16:00 as base-60 integers, additional.nodelist=010
    as 8 and additional.hint=off as false; a `${...}` in them is the job's shell's, not OmegaConf's.
    Only additional.FLAG=true, false or null keep their YAML meaning (a switch; left out).
    """
    import yaml
    from omegaconf import OmegaConf

    typed, text = [], []
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"'{item}' is not key=value")
        key, value = item.split("=", 1)
        (text if key in STRINGS or key.startswith(("env.", "additional.")) else typed).append((key, value))
    cfg = OmegaConf.merge(OmegaConf.structured(SlurmConf), OmegaConf.load(config))
    for key, value in typed:
        try:
            OmegaConf.update(cfg, key, yaml.safe_load(value), merge=True)
        except Exception as exc:  # noqa: BLE001 - OmegaConf's message names the type, not always the key
            raise ValueError(f"{key}={value}: {str(exc).splitlines()[0]}") from None
    try:
        conf = OmegaConf.to_object(cfg)  # the config file's own ${...} resolved here, or one line naming its key
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"{getattr(exc, 'full_key', '') or config}: {str(exc).splitlines()[0]}") from None
    for key, value in text:
        group, _, name = key.partition(".")
        if name:
            getattr(conf, group)[name] = SWITCHES.get(value, value) if group == "additional" else value
        else:
            setattr(conf, key, value)
    check_allocation(conf)
    check_env(conf)
    return conf


def check_env(cfg) -> None:
    """Fail unless every env.* name is a shell variable the job can read and the job gets sbatch's environment."""
    for name in cfg.env:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ValueError(f"env.{name}: not a shell variable name (letters, digits, _; no digit first)")
    export = str(cfg.additional.get("export", "ALL"))
    if cfg.env and "ALL" not in export.upper().split(","):
        raise ValueError(f"additional.export={export}: env.* reaches the job only with ALL (--export=ALL)")


def check_allocation(cfg) -> None:
    """Fail unless every number of the allocation is in range and `time` is in one of sbatch's formats."""
    for key, least in LEAST.items():
        value = getattr(cfg, key)
        if value is not None and value < least:
            raise ValueError(f"{key}={value}: must be at least {least}")
    if not TIME.fullmatch(cfg.time) and cfg.time.upper() not in ("INFINITE", "UNLIMITED"):
        raise ValueError(f"time={cfg.time!r}: must be minutes, minutes:seconds, hours:minutes:seconds, "
                         "days-hours, days-hours:minutes or days-hours:minutes:seconds (0: no limit)")


def trial_resource(key: str, text: str) -> float:
    """Return a study override's per-trial resource as a number; a ValueError names key and value."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise ValueError(f"{key}={text!r}: must be a number")
    if value < 0:
        raise ValueError(f"{key}={text!r}: must be at least 0")
    return value


def check_trial_resources(study: List[str]) -> None:
    """Fail if a study override gives a per-trial resource that is not a number of at least 0."""
    given = dict(a.lstrip("+").split("=", 1) for a in study if "=" in a and not a.startswith("-"))
    for key in ("hydra.sweeper.resources.cpu", "hydra.sweeper.resources.gpu"):
        if key in given and "${" not in given[key]:  # an interpolation is Hydra's to resolve
            trial_resource(key, given[key])


def job_environment(cfg: SlurmConf) -> Dict[str, str]:
    """Return what the study's driver will see beyond this environment (which sbatch hands on), as far as
    it is known before the job exists: what SLURM sets for every job (its id a placeholder), then env.*."""
    slurm = {"SLURM_JOB_ID": "0", "SLURM_JOBID": "0", "SLURM_JOB_NAME": cfg.job_name, "SLURM_SUBMIT_DIR": os.getcwd(),
             "SLURM_JOB_NUM_NODES": str(cfg.nodes), "SLURM_NNODES": str(cfg.nodes),
             "SLURM_CPUS_PER_TASK": str(cfg.cpus_per_task), "SLURM_GPUS_PER_NODE": str(cfg.gpus_per_node)}
    return {**slurm, **cfg.env}


def check_study(cfg: SlurmConf, study: List[str]) -> None:
    """Fail unless the study's job would start it: the grid composes and validates, as scaling-study plans
    it on the allocation's Ray (the address study.sbatch adds), and one trial fits on one node.

    A `${oc.env:NAME}` that only the job's node has (its setup line exports it) cannot be checked
    here: the study is then submitted as given, with a note.
    """
    from scaling.preflight import plan_study

    check_trial_resources(study)
    environ = dict(os.environ)
    os.environ.update(job_environment(cfg))
    try:
        sweeper = plan_study(["hydra.sweeper.ray.address=127.0.0.1:6379", *study])
    except ValueError as exc:
        unset = re.search(r"Environment variable '(\w+)' not found", str(exc))
        if not unset:
            raise
        print(f"note: the study was not checked here: {unset[1]} is not set here (is it the job's?)", file=sys.stderr)
        return
    finally:
        os.environ.clear()
        os.environ.update(environ)
    if sweeper is None:  # another sweeper: no Ray, no per-trial resources
        return
    for key, need, have, what in (("cpu", sweeper.resources.cpu, cfg.cpus_per_task, "cpus_per_task"),
                                  ("gpu", sweeper.resources.gpu, cfg.gpus_per_node, "gpus_per_node")):
        if need > have:
            raise ValueError(f"hydra.sweeper.resources.{key}={need:g} does not fit on one node ({what}={have})")


def sbatch_command(cfg, study: List[str], wait: bool = False) -> List[str]:
    """Return the sbatch command line for study.sbatch with `cfg`'s resources."""
    flags = {"job-name": cfg.job_name, "nodes": cfg.nodes, "ntasks-per-node": 1, "cpus-per-task": cfg.cpus_per_task,
             "time": cfg.time, "output": cfg.output, "partition": cfg.partition, "account": cfg.account,
             "qos": cfg.qos, "constraint": cfg.constraint}
    if cfg.gpus_per_node:
        flags["gpus-per-node"] = cfg.gpus_per_node
    if cfg.mem_gb is not None:
        flags["mem"] = f"{cfg.mem_gb}G"
    if cfg.env:
        flags["export"] = "ALL"  # also over an SBATCH_EXPORT in the submitting environment
    flags.update(dict(cfg.additional))
    cmd = ["sbatch", "--parsable"]
    for k, v in flags.items():
        if v is True:  # a switch: {exclusive: true} -> --exclusive
            cmd.append(f"--{k}")
        elif v is not None and v is not False:
            cmd.append(f"--{k}={v}")
    if wait:
        cmd.append("--wait")
    # env.* rides in sbatch's own environment, which --export=ALL hands to the job whole: --export's
    # NAME=value list is split at every comma, so a value with one (RAY_START_ARGS) arrived cut.
    env = ["env", *(f"{k}={v}" for k, v in cfg.env.items())] if cfg.env else []
    return env + cmd + [str(HERE / "study.sbatch"), *study]


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    study: List[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, study = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=HERE / "slurm.yaml")
    parser.add_argument("--dry-run", action="store_true", help="print the sbatch command, submit nothing")
    parser.add_argument("--wait", action="store_true", help="block until the job ends; exit with its status")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of slurm.yaml")
    args = parser.parse_args(argv)
    try:
        cfg = load(args.config, args.overrides)
        check_study(cfg, study)
    except Exception as exc:  # noqa: BLE001 - one line naming the key
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    cmd = sbatch_command(cfg, study, wait=args.wait)
    print(" ".join(shlex.quote(c) for c in cmd), flush=True)
    if args.dry_run:
        return 0
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=os.environ)
    except OSError as exc:  # no SLURM client on this machine's PATH
        print(f"error: {cmd[0] if cmd[0] != 'env' else 'sbatch'}: {exc.strerror} (run this on a SLURM login node)",
              file=sys.stderr)
        return 1
    job = proc.stdout.strip().split(";")[0]
    if job:
        print(f"submitted job {job}; log: {cfg.output.replace('%j', job)}", flush=True)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
