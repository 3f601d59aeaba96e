"""The Ray a study runs on: a local head started by the driver (bound to 127.0.0.1, in a session of
its own), or a cluster it joins, started in the background while the driver prepares the rest
(start_ray) and checked against the study's resources (check_cluster); and how the driver stops it at
the end. What the tool changes in Ray Tune itself is in scaling.lean_tune."""
from __future__ import annotations

import contextlib
import logging
import os
import sys
from concurrent.futures import Future
from typing import Any, Optional

from scaling.lean_tune import local_head_env


# The raylet connects to its own object store, which a thread of its own is still starting, and retries
# after raylet_client_connect_timeout_milliseconds: 1 s by default, so a local head lost that race
# in ~1 start in 5 here (5 of 26) and ray.init took a whole second longer (the raylet's log: 1.001 s between the
# store's start and the ObjectManager's server, against ~2 ms; a study's "study" line at 4.2-4.3 s
# instead of 3.1-3.4 s). Retrying every 50 ms, as often within the same 10 s, costs nothing.
CONNECT_RETRY = {"raylet_client_connect_timeout_milliseconds": 50, "raylet_client_num_connect_attempts": 200}


def starts_local_head(address: Optional[str]) -> bool:
    """Whether `hydra.sweeper.ray.address` asks for a new local head (null, empty or Ray's own `local`)
    rather than a cluster to join (`auto`, host:port)."""
    return address in (None, "", "local")


def init_ray(address: Optional[str], num_cpus: Optional[int], num_gpus: Optional[float]) -> None:
    """Start a local Ray bound to 127.0.0.1 (address null or `local`) or join `address`, quiet, without
    the dashboard."""
    from scaling.heap import imports_without_gc

    with imports_without_gc():  # in a study, while the driver imports Ray Tune
        import ray

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    # Tune saves its experiment state every few seconds by default; MLflow + our checkpoints
    # already hold what a resume needs, so save it less often (measured: 4.4 s of a 60 s study)
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "30")
    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = dict(include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False,
                                  configure_logging=True)
    if not starts_local_head(address):
        ray.init(address=address, **kwargs)
    else:
        # A local study listens on loopback only: Ray otherwise swaps 127.0.0.1 for the routable
        # address and its GCS and raylet listen on every interface. The flag is Ray's own
        # "single-node, no firewall prompts" switch (ray_constants, read at call time).
        from ray._private import ray_constants

        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        ray_constants.ENABLE_RAY_CLUSTER = False
        # Ray prestarts a worker per CPU when the driver connects, without a runtime_env. Tune's
        # trial actors carried one then (env_vars, ray/tune/execution/class_cache.py), so Ray never
        # handed them those workers and booted their own: the prestarted pair only took ~0.7 s of CPU
        # from the start-up (the benchmark study, 4 alternating pairs by a scratch script: launch to
        # first trial 5.19 s against 5.56 s; benchmarks/README.md). They carry none now
        # (lean_tune.trial_actors_inherit_env), but a pair booted while the driver starts takes the
        # CPU the driver needs on a small machine, and Ray places actors before the pair has
        # registered in some starts (benchmarks/README.md, "Tried the same evening").
        system_config = {"prestart_worker_first_driver": False, **CONNECT_RETRY}
        # local_head_env: Tune's trial actors then start without a runtime_env (lean_tune)
        with _lean_head(), _prompt_node_wait(), _own_session(), local_head_env():
            ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, _node_ip_address="127.0.0.1",
                     _system_config=system_config, **kwargs)


@contextlib.contextmanager
def _lean_head():
    """Start a local Ray head without its API server (the dashboard process), autoscaler monitor
    and log monitor.

    A local study uses none of them (`include_dashboard=False` still starts the API server,
    minimal; with `log_to_driver=False` nothing reads what the log monitor streams), and they
    sit on its critical path on a small machine: ray.init waits for the API server to publish
    its address before it starts the raylet (~0.8 s), ray.shutdown gives the monitor a 1 s grace
    it never uses (benchmark row 2c: start + stop 2.35 s against 4.15 s for plain ray.init,
    median of 3 pairs on 2 cores), and the log monitor's ~0.4 s of CPU lands in the start-up
    (the benchmark study, 10 alternating pairs by a scratch script: start-up ratio 0.97). Ray has
    no public switch for any of them (RayParams.no_monitor and include_log_monitor exist, ray.init
    passes neither), so they are set here, for this call only; where Ray's internals differ, Ray
    starts them as usual.
    """
    from ray._private import node, parameter

    start_api_server, params_init = getattr(node.Node, "start_api_server", None), parameter.RayParams.__init__
    if start_api_server is None or "no_monitor" not in params_init.__code__.co_varnames:
        yield
        return

    def no_api_server(self, **_):
        self._webui_url = None

    def without_monitor(self, *args, **kw):
        params_init(self, *args, **kw)
        self.no_monitor = True
        self.include_log_monitor = False  # it streams worker logs to the driver: log_to_driver=False

    node.Node.start_api_server, parameter.RayParams.__init__ = no_api_server, without_monitor
    try:
        yield
    finally:
        node.Node.start_api_server, parameter.RayParams.__init__ = start_api_server, params_init


@contextlib.contextmanager
def _own_session():
    """Start the local head's processes (GCS, raylet, and through the raylet the agents and trial
    workers) in a session of their own, not in the driver's process group.

    A signal to the driver's whole group (`kill -TERM -- -<pgid>`, a terminal's hang-up, a supervisor
    that signals the group) reached Ray too: Ray blocks only SIGINT in its processes, so the GCS and
    raylet shut down under the driver, which then waited Ray's 60 s for its GCS and exited with the
    study's runs RUNNING. Apart, the driver alone takes the signal, as a Ctrl-C (scaling.interrupts), and
    stops its Ray itself. They still die with the driver: Ray starts them with PR_SET_PDEATHSIG (kernel
    fate-sharing), the reason this applies only where Ray detects that support. Without it Ray relies
    on a reaper that kills the process group the driver leads, which these processes must then stay in
    (Ray's own ConsolePopen says so for Windows' process groups).
    """
    from ray._private import services, utils

    popen = getattr(services, "ConsolePopen", None)
    if popen is None or not utils.detect_fate_sharing_support():
        yield
        return

    class SessionPopen(popen):
        def __init__(self, *args, **kwargs):
            kwargs.setdefault("start_new_session", True)
            super().__init__(*args, **kwargs)

    services.ConsolePopen = SessionPopen
    try:
        yield
    finally:
        services.ConsolePopen = popen


@contextlib.contextmanager
def _prompt_node_wait(poll_s: float = 0.02, timeout_s: float = 10.0):
    """Let a local ray.init see its raylet register within `poll_s`, not on a whole second.

    ray.init starts the raylet, sleeps 0.1 s and asks the GCS for the new node
    (`services.get_node`); until the raylet has registered, Ray's C++ side of that call sleeps a
    hard-coded 1 s between tries (GlobalStateAccessor::GetNode). The raylet registers ~0.1-0.5 s
    after it starts here, so every local start waited ~0.5-0.9 s for nothing, and ~2 s when the
    registration came late. This polls the GCS's node table first, then makes Ray's own call, which
    then finds the node at once. After `timeout_s` (a raylet that is slow to start, or one that died)
    it hands over to Ray's call, which waits on or fails as it would have, so a failed start takes at
    most `timeout_s` longer to say so. Where Ray's internals differ, Ray waits as usual.
    """
    import time

    from ray._private import services, state

    get_node, options = getattr(services, "get_node", None), getattr(services, "_get_gcs_client_options", None)
    table_api = all(hasattr(state.GlobalState, m) for m in ("node_table", "disconnect"))
    if get_node is None or options is None or not table_api:
        yield
        return

    def get_node_promptly(gcs_address, node_id):
        table = state.GlobalState()
        table._initialize_global_state(options(gcs_address))
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                try:
                    seen = node_registered(table.node_table(), node_id)
                except Exception:  # noqa: BLE001 - the GCS not answering: Ray's own call says why
                    break
                if seen is not False:  # registered, or a table this cannot read: Ray's own call decides
                    break
                time.sleep(poll_s)
        finally:
            table.disconnect()  # its own GCS client, not Ray's
        return get_node(gcs_address, node_id)

    services.get_node = get_node_promptly
    try:
        yield
    finally:
        services.get_node = get_node


def node_registered(rows: list, node_id: str) -> Optional[bool]:
    """Whether the GCS node table `rows` holds `node_id` alive; None where the rows lack the fields."""
    if any(not isinstance(r, dict) or "NodeID" not in r or "Alive" not in r for r in rows):
        return None
    return any(r["NodeID"] == node_id and r["Alive"] for r in rows)


def _probe_address(address) -> None:
    """Raise ConfigError at once if nothing listens at a host:port Ray address (ray.init would retry for minutes)."""
    import socket

    from scaling.config import ConfigError

    if starts_local_head(address) or address == "auto":
        return
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError("hydra.sweeper.ray.address", address, "must be auto, local or host:port")
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
    except OSError as exc:
        raise ConfigError("hydra.sweeper.ray.address", address, f"unreachable ({exc.strerror or exc})") from None


def start_ray(sweeper) -> Future:
    """Start (or join) Ray in a background thread and return its future.

    A local `ray.init` takes ~4 s here, and the driver still has the data, the tracking store
    and its imports to prepare: started first, it is ready when they are (row 2 of the
    benchmarks). The thread then waits, never ending: Ray starts its GCS and raylet with
    PR_SET_PDEATHSIG, which fires when the starting *thread* exits (a pool thread that
    finished its task killed them, and the study then hung on "Failed to connect to GCS").
    Ray sets its SIGTERM handler only from the main thread, so one is set here where the console's
    guard has not made SIGTERM a Ctrl-C (scaling.interrupts): it exits through atexit, which stops
    the local Ray. It is set before the thread starts, which keeps SIGTERM's handler as it found it
    (_keeping_sigterm).
    """
    import signal
    import threading

    r = sweeper.conf.ray
    started: Future = Future()

    def start() -> None:
        try:
            _probe_address(r.address)
            with _keeping_sigterm():
                init_ray(r.address, r.num_cpus, r.num_gpus)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            started.set_exception(exc)
            return
        started.set_result(None)
        threading.Event().wait()  # keep Ray's processes alive: see above

    if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))
    threading.Thread(target=start, name="ray-start", daemon=True).start()
    return started


@contextlib.contextmanager
def _keeping_sigterm():
    """Put SIGTERM's handler back as it was before the block, from any thread.

    Ray's core worker puts absl's failure handler under SIGTERM as it connects, from the thread that
    starts Ray: until the main thread took the signal back (check_cluster, ~1 s later here, while it
    prepares the data and the store), a SIGTERM printed a stack dump like a crash's before it reached
    the handler in place. `signal.signal` works from the main thread only, so the disposition is
    saved and restored whole with libc's sigaction, as an opaque buffer (larger than any platform's
    struct sigaction), here, where Ray replaced it: the main thread no longer takes it back later.
    Where libc has no sigaction, Ray's handler stays.
    """
    import ctypes
    import signal

    try:
        sigaction = ctypes.CDLL(None, use_errno=True).sigaction
    except (AttributeError, OSError, TypeError):
        yield
        return
    saved = ctypes.create_string_buffer(512)
    if sigaction(signal.SIGTERM, None, saved) != 0:
        yield
        return
    try:
        yield
    finally:
        sigaction(signal.SIGTERM, saved, None)


def check_cluster(sweeper, started: Future, most_workers: int = 1, needs_gpu: bool = False) -> None:
    """Wait for start_ray; raise ConfigError if it failed or the cluster lacks the resources asked for
    (needs_gpu: a trial has device=cuda, which fails every attempt on a cluster without a GPU)."""
    import ray

    from scaling.config import ConfigError

    r = sweeper.conf.ray
    try:
        started.result()
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise ConfigError("hydra.sweeper.ray.address", r.address, f"cannot start or reach Ray ({str(exc).splitlines()[0]})") from None
    res = ray.cluster_resources()
    want = {"GPU": sweeper.conf.resources.gpu, "CPU": sweeper.conf.resources.cpu}
    # `not n <= have`, so that a NaN request is lacking too: Tune would wait for it forever
    lacking = [ConfigError(f"hydra.sweeper.resources.{kind.lower()}", n, f"exceeds the cluster's {res.get(kind, 0):g} {kind}s")
               for kind, n in want.items() if not n <= res.get(kind, 0)]
    if most_workers > 1:
        lacking += [ConfigError("parallel.workers", most_workers, f"{most_workers} workers of "
                                f"hydra.sweeper.resources.{kind.lower()}={n:g} each need {most_workers * n:g} {kind}s, "
                                f"more than the cluster's {res.get(kind, 0):g}")
                    for kind, n in sorted(want.items()) if not most_workers * n <= res.get(kind, 0)]
    if needs_gpu and not res.get("GPU", 0):
        lacking.append(ConfigError("device", "cuda", "needs a GPU, and the Ray cluster has none"))
    if lacking:
        ray.shutdown()
        raise lacking[0]


def abandon_ray(started: Future, wait_s: float = 120.0) -> None:
    """Wait for start_ray and stop what it started, for a study refused after start_ray (a batch
    larger than its data, a missing data file): exiting mid-start left Ray's agents running.

    The wait is bounded. A Ctrl-C that lands while the main thread imports can leave that module's
    import lock held (CPython releases it only on the normal path), and `ray.init` in the start thread
    then waits on it forever (seen importing aiohttp for the raylet's dashboard check): waiting for the
    start deadlocks. A start not done in `wait_s` is left to the process's exit, which stops what it
    has started (Ray starts its GCS and raylet with PR_SET_PDEATHSIG; see start_ray); calling
    `ray.shutdown` beside an `init` still running would race it.
    """
    import concurrent.futures

    import ray

    try:
        started.result(timeout=wait_s)
    except concurrent.futures.TimeoutError:
        return
    except BaseException:  # noqa: BLE001 - a start that failed started nothing to stop
        pass
    ray.shutdown()


def stop_ray_aside() -> Any:
    """Shut Ray down in a thread while the driver drains MLflow, prints the summary and builds the
    report: nothing after the trials needs Ray."""
    import threading

    import ray

    t = threading.Thread(target=ray.shutdown, name="ray-stop", daemon=True)
    t.start()
    return t
