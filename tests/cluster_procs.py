"""Real clusters for the "beyond one machine" tests, on this machine, bound to 127.0.0.1.

Every daemon is started by the test in its own process group and stopped by that group's id
(never `ray stop`, `pkill` or `scancel` for everyone: other tests and people share the machine):

- `RayCluster`: a Ray head and extra worker nodes (a second raylet on the same host acts as a
  worker node), with token authentication and every port picked free.
- `SlurmCluster`: munged, slurmctld and slurmd with a generated slurm.conf (one node: this
  host, its real CPUs and memory), state and sockets in a tmp dir.
- `MlflowServer`: `mlflow server` (or `mlflow ui`) on a SQLite store.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Callable, Optional

from scaling.tracking import ui_command

BIN = Path(sys.executable).parent
ROOT_DIR = Path(__file__).resolve().parent.parent


_GIVEN: set[int] = set()  # ports this process has handed out


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago, and that this process has not handed out.

    The OS may give the port it just gave again, once its socket is closed: a Ray node's six ports, picked
    one after another, once held one twice (Ray refused to start: "runtime_env_agent is trying to use a
    port number 58425 that is used by other components"). Every socket bound here stays open until a new
    port is found, and a port is never handed out twice.
    """
    held = []
    try:
        while True:
            s = socket.socket()
            held.append(s)
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            if port not in _GIVEN:
                _GIVEN.add(port)
                return port
    finally:
        for s in held:
            s.close()


def wait_until(check: Callable[[], object], timeout: float, what: str, proc: Optional[subprocess.Popen] = None,
               log: Optional[Path] = None, every: float = 0.5):
    """Return check()'s first truthy value; fail after `timeout` s or if `proc` ends first."""
    deadline = time.time() + timeout
    while True:
        value = check()
        if value:
            return value
        tail = log.read_text()[-3000:] if log is not None and log.exists() else ""
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: the process ended (exit {proc.returncode})\n{tail}")
        if time.time() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{tail}")
        time.sleep(every)


class Group:
    """A process started in its own session (process group); stop() ends the whole group."""

    def __init__(self, args, log: Path, env: Optional[dict] = None, cwd=None):
        self.log = Path(log)
        self.args = [str(a) for a in args]
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(self.args, stdout=out, stderr=subprocess.STDOUT, cwd=cwd,
                                         start_new_session=True, env={**os.environ, **(env or {})})
        self.pid = self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the group, then SIGKILL what is left of it after `grace` seconds."""
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 30.0)):
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
            if not _group_alive(self.pid):
                break
        try:
            os.killpg(self.pid, signal.SIGKILL)  # children that outlived their leader
        except ProcessLookupError:
            pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def listeners(pids: set[int]) -> list[str]:
    """Return the local addresses (ip:port) that the given processes listen on (TCP)."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout
    found = []
    for line in out.splitlines():
        if any(f"pid={p}," in line for p in pids):
            found.append(line.split()[3])
    return found


def group_pids(pgid: int) -> set[int]:
    """Return the pids of the processes in process group `pgid`."""
    out = subprocess.run(["ps", "-e", "-o", "pid=,pgid="], capture_output=True, text=True).stdout
    return {int(p) for p, g in (line.split() for line in out.splitlines()) if int(g) == pgid}


def is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    return host.startswith("127.") or host in ("::1", "::ffff:127.0.0.1") or host.startswith("::ffff:127.")


# ------------------------------------------------------------------ Ray

# `ray start` swaps 127.0.0.1 for the host's routable address (and then listens on every
# interface) unless Ray is told the cluster is single-machine (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0),
# and in that mode it refuses to add worker nodes. This runs the real `ray` CLI with the swap
# turned off and worker nodes allowed, in the CLI's process only: the processes it starts
# (raylet, agents, job drivers) inherit the single-machine setting and stay on loopback.
_RAY_LOOPBACK = ("import sys; from ray._private import ray_constants, services; ray_constants.ENABLE_RAY_CLUSTER = True; "
                 "services.resolve_ip_for_localhost = lambda h: h; "
                 "from ray.scripts.scripts import main; sys.argv = ['ray', *sys.argv[1:]]; sys.exit(main())")


def ray_cli(*args) -> list[str]:
    """A `ray` command line: the real CLI, with 127.0.0.1 kept as is (see _RAY_LOOPBACK)."""
    return [str(BIN / "python"), "-c", _RAY_LOOPBACK, *[str(a) for a in args]]


class RayCluster:
    """A real multi-node Ray cluster on 127.0.0.1: a head plus worker nodes, each its own raylet."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.token = self.root / "ray-token"
        self.token.write_text(secrets.token_hex(32))
        self.token.chmod(0o600)
        self.nodes: list[Group] = []
        self.nodes_info: list[dict] = []  # what wait_for_nodes() saw last
        self.temp_dirs: list[str] = []
        self.dashboard_url: Optional[str] = None

    @property
    def env(self) -> dict[str, str]:
        """The environment a driver needs to join: token auth, and 127.0.0.1 kept as is."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token), "RAY_USAGE_STATS_ENABLED": "0",
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
                # the project's console scripts on the nodes' PATH, as on a cluster where it is installed
                "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}

    def _start(self, role: str, args: list[str], num_cpus: int, resources: dict) -> Group:
        # short paths: Ray's unix sockets live under the temp dir (108-byte limit)
        tmp = tempfile.mkdtemp(prefix=f"ray{role[0]}", dir="/tmp")
        self.temp_dirs.append(tmp)
        ports = []
        for flag in ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
                     "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port"):
            ports += [flag, str(free_port())]
        group = Group([BIN / "python", "-c", _RAY_LOOPBACK, "start", "--block", "--node-ip-address=127.0.0.1",
                       f"--num-cpus={num_cpus}", f"--resources={json.dumps(resources)}", f"--temp-dir={tmp}",
                       "--disable-usage-stats", *args, *ports], self.root / f"ray-{role}-{len(self.nodes)}.log", env=self.env)
        self.nodes.append(group)
        return group

    def start_head(self, num_cpus: int = 1, resources: Optional[dict] = None, dashboard: bool = False) -> None:
        """Start the head; with `dashboard`, also the dashboard and its jobs API (needs ray[default])."""
        args = ["--head", f"--port={self.port}", "--include-dashboard=false"]
        if dashboard:
            self.dashboard_url = f"http://127.0.0.1:{free_port()}"
            args = ["--head", f"--port={self.port}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={self.dashboard_url.rsplit(':', 1)[1]}", f"--ray-client-server-port={free_port()}"]
        head = self._start("head", args, num_cpus, resources or {"head_node": 1})
        wait_until(lambda: "Ray runtime started" in head.log.read_text(), 120, "the Ray head", head.proc, head.log)

    def add_node(self, num_cpus: int = 1, resources: Optional[dict] = None) -> None:
        node = self._start("worker", [f"--address={self.address}"], num_cpus, resources or {"worker_node": 1})
        wait_until(lambda: "Ray runtime started" in node.log.read_text(), 120, "a Ray worker node", node.proc, node.log)

    def alive_nodes(self) -> list[dict]:
        """Return the cluster's alive nodes, as seen by a fresh driver."""
        code = ("import json, ray; ray.init(address=%r, logging_level='ERROR', log_to_driver=False); "
                "print(json.dumps([{'id': n['NodeID'], 'resources': n['Resources']} for n in ray.nodes() if n['Alive']]))"
                % self.address)
        proc = subprocess.run([str(BIN / "python"), "-c", code], capture_output=True, text=True, timeout=120,
                              env={**os.environ, **self.env})
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    def wait_for_nodes(self, n: int, timeout: float = 120) -> list[dict]:
        """Wait until `n` nodes are alive; return (and keep in nodes_info) their ids and resources."""
        self.nodes_info = wait_until(lambda: (lambda nodes: nodes if len(nodes) >= n else None)(self.alive_nodes()),
                                     timeout, f"{n} alive Ray nodes", every=1)
        return self.nodes_info

    def pids(self) -> set[int]:
        return set().union(*(group_pids(g.pid) for g in self.nodes)) if self.nodes else set()

    def stop(self) -> None:
        for node in reversed(self.nodes):  # workers first, the head last
            node.stop()
        for tmp in self.temp_dirs:
            shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------ SLURM

SLURM_BINARIES = ("slurmctld", "slurmd", "sbatch", "sinfo", "squeue", "scontrol", "munged", "mungekey")


def slurm_missing() -> list[str]:
    return [b for b in SLURM_BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]


def _which(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


class SlurmCluster:
    """A one-node SLURM cluster of this host: munged + slurmctld + slurmd, all state under `root`."""

    def __init__(self, keep: Path):
        # munged wants every folder above its socket searchable by all (pytest's tmp dirs are
        # private): the cluster lives in a folder of its own under /tmp; its logs are copied to
        # `keep` at stop().
        self.keep = Path(keep)
        self.root = Path(tempfile.mkdtemp(prefix="slurm-", dir="/tmp"))
        self.root.chmod(0o755)
        self.conf = self.root / "slurm.conf"
        self.daemons: list[Group] = []
        self.host = subprocess.run(["hostname", "-s"], capture_output=True, text=True, check=True).stdout.strip()

    @property
    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf)}

    def run(self, *args, check=True, timeout=60, **kw) -> subprocess.CompletedProcess:
        """Run a SLURM client command against this cluster."""
        return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout, check=check,
                              env={**os.environ, **self.env, **kw.pop("env", {})}, **kw)

    def _node_line(self) -> str:
        """This host's real hardware, as slurmd sees it: `NodeName=... CPUs=... RealMemory=...`."""
        out = subprocess.run([_which("slurmd"), "-C"], capture_output=True, text=True, check=True).stdout
        line = out.splitlines()[0]
        return f"{line} NodeAddr=127.0.0.1 State=UNKNOWN"

    def write_conf(self) -> None:
        r = self.root
        for d in ("state", "spool", "log"):
            (r / d).mkdir(exist_ok=True)
        user = subprocess.run(["id", "-un"], capture_output=True, text=True, check=True).stdout.strip()
        self.conf.write_text(f"""# generated by tests/cluster_procs.py: a throwaway one-node cluster
ClusterName=scalingtest
SlurmctldHost={self.host}(127.0.0.1)
SlurmUser={user}
SlurmdUser={user}
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
AuthType=auth/munge
AuthInfo=socket={r / 'munge.sock'}
CredType=cred/munge
# bind every daemon and client to the address the host name resolves to (127.0.0.1), not to all
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}
SlurmctldPidFile={r / 'slurmctld.pid'}
SlurmdPidFile={r / 'slurmd.pid'}
SlurmctldLogFile={r / 'log' / 'slurmctld.log'}
SlurmdLogFile={r / 'log' / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
ReturnToService=2
MpiDefault=none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
SwitchType=switch/none
MinJobAge=600
KillWait=5
{self._node_line()}
PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP
""")

    def start(self) -> None:
        r = self.root
        self.write_conf()
        subprocess.run([_which("mungekey"), "--create", f"--keyfile={r / 'munge.key'}", "--bits=1024"], check=True,
                       capture_output=True)
        (r / "munge.key").chmod(0o400)
        munged = Group([_which("munged"), "--foreground", f"--socket={r / 'munge.sock'}",
                        f"--key-file={r / 'munge.key'}", f"--pid-file={r / 'munged.pid'}",
                        f"--log-file={r / 'log' / 'munged.log'}", f"--seed-file={r / 'munged.seed'}"],
                       r / "munged.out")
        self.daemons.append(munged)
        wait_until(lambda: (r / "munge.sock").exists(), 30, "munged's socket", munged.proc, munged.log)
        ctld = Group([_which("slurmctld"), "-D", "-i", "-f", self.conf], r / "slurmctld.out", env=self.env)
        self.daemons.append(ctld)
        wait_until(lambda: self.run("scontrol", "ping", check=False).stdout.count("UP") > 0, 60,
                   "slurmctld", ctld.proc, ctld.log)
        slurmd = Group([_which("slurmd"), "-D", "-f", self.conf], r / "slurmd.out", env=self.env)
        self.daemons.append(slurmd)
        wait_until(lambda: self.run("sinfo", "-h", "-o", "%T", check=False).stdout.strip() == "idle", 90,
                   "the node to be idle", slurmd.proc, slurmd.log)

    def job_state(self, job: str) -> str:
        out = self.run("scontrol", "show", "job", job, check=False).stdout
        for word in out.split():
            if word.startswith("JobState="):
                return word.split("=", 1)[1]
        return "UNKNOWN"

    def wait_job(self, job: str, timeout: float) -> str:
        final = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")
        return wait_until(lambda: (lambda s: s if s in final else None)(self.job_state(job)), timeout,
                          f"job {job} to end", every=1)

    def pids(self) -> set[int]:
        return set().union(*(group_pids(g.pid) for g in self.daemons)) if self.daemons else set()

    def stop(self) -> None:
        if any(d.alive() for d in self.daemons[1:]):
            # cancel this cluster's jobs (only ours: this slurmctld knows no other), let slurmd end them
            jobs = self.run("squeue", "-h", "-o", "%i", check=False).stdout.split()
            if jobs:
                self.run("scancel", *jobs, check=False)
                try:
                    wait_until(lambda: not self.run("squeue", "-h", "-o", "%i", check=False).stdout.strip(), 60,
                               "cancelled jobs to end")
                except AssertionError:
                    pass
        for daemon in reversed(self.daemons):  # slurmd, slurmctld, munged
            daemon.stop()
        for log in [*self.root.glob("*.out"), *self.root.glob("log/*"), self.conf]:
            if log.is_file():
                shutil.copy(log, self.keep / log.name)
        shutil.rmtree(self.root, ignore_errors=True)


# ------------------------------------------------------------------ MLflow


class MlflowServer:
    """`mlflow server` (or `mlflow ui`) on 127.0.0.1 with a SQLite store, started and stopped by pid.

    Both run as the docs say: without MLflow 3's job runner, whose 7 huey consumers a study never
    uses and which cost ~30 s of CPU at each start (README); `ui` is the command the study prints.
    """

    def __init__(self, root: Path, command: str = "server", backend: Optional[str] = None,
                 extra_args: tuple = (), env: Optional[dict] = None, port: Optional[int] = None):
        self.root = Path(root)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.backend = backend or f"sqlite:///{self.root / 'server.db'}"
        assignments, args = ui_command(self.backend, self.port)  # mlflow ui --workers 1 ... --backend-store-uri B
        args[:2] = [BIN / "mlflow", command]
        if command == "server":
            # artifacts go through the server (proxied): clients need no access to its disk
            self.artifacts = self.root / "artifacts"
            args += ["--artifacts-destination", str(self.artifacts)]
        log = self.root / f"mlflow-{command}-{self.port}-{time.time_ns()}.log"  # a restart keeps the old log
        self.group = Group([*args, *extra_args], log, cwd=self.root, env={**assignments, **(env or {})})
        wait_until(self._healthy, 120, f"mlflow {command} at {self.url}", self.group.proc, self.group.log)

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def pids(self) -> set[int]:
        return group_pids(self.group.pid)

    def stop(self) -> None:
        self.group.stop(grace=5)

    def kill(self) -> None:
        """SIGKILL the server's process group: the server is lost at once, mid-request if it is in one."""
        try:
            os.killpg(self.group.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.group.proc.wait(timeout=60)
