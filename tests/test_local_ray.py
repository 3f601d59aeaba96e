"""The local Ray a study starts (scaling.local_ray): real Ray, loopback only, and only the
processes a study uses."""
from __future__ import annotations

import base64
import ipaddress
import json
import os
import time

import psutil
import pytest

pytestmark = pytest.mark.slow


def _loopback(ip: str) -> bool:
    """Whether a listening address is loopback (127.0.0.1, or its IPv4-mapped form ::ffff:127.0.0.1)."""
    address = ipaddress.ip_address(ip)
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback


def _ray_processes(raylet_pid: int) -> list[str]:
    """Return the command lines of the processes the local Ray runs (its raylet's children and the driver's)."""
    found = []
    for root in (psutil.Process(raylet_pid), psutil.Process()):
        for p in root.children(recursive=True):
            try:
                found.append(" ".join(p.cmdline()))
            except psutil.Error:  # ended in between
                pass
    return found


@pytest.mark.parametrize("address", [None, "local"])  # `local`, Ray's own word for a new head, is the same head
def test_local_head_starts_no_idle_workers_api_server_or_monitors(monkeypatch, address):
    import ray
    from ray._private import node, parameter, ray_constants, services

    from scaling.local_ray import CONNECT_RETRY, init_ray

    start_api_server, params_init = node.Node.start_api_server, parameter.RayParams.__init__
    get_node, console_popen = services.get_node, services.ConsolePopen
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    # init_ray sets these for the driver process; restored after the test for the tests that follow
    for key in ("RAY_AIR_NEW_OUTPUT", "RAY_DEDUP_LOGS", "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS",
                "RAY_ENABLE_UV_RUN_RUNTIME_ENV", "TUNE_GLOBAL_CHECKPOINT_S", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", ray_constants.ENABLE_RAY_CLUSTER)
    init_ray(address, 1, 0)
    try:
        assert ray.nodes()[0]["NodeManagerAddress"] == "127.0.0.1"
        gcs = next(p for p in psutil.Process().children(recursive=True) if "gcs_server" in p.name())
        listening = {c.laddr.ip for c in gcs.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN}
        assert listening and all(_loopback(ip) for ip in listening), listening  # loopback, not every interface
        raylet = next(p for p in psutil.Process().children(recursive=True) if "raylet" in p.name())
        time.sleep(1.5)  # Ray's prestarted workers appear ~0.3 s after the driver connects
        procs = _ray_processes(raylet.pid)
        assert not [c for c in procs if c.startswith("ray::IDLE")], procs
        unused = ("dashboard/dashboard.py", "autoscaler/_private/monitor.py", "_private/log_monitor.py")
        assert not [c for c in procs if any(u in c for u in unused)], procs
        # the functions patched for the start are Ray's own again
        assert (node.Node.start_api_server, parameter.RayParams.__init__) == (start_api_server, params_init)
        assert services.get_node is get_node and services.ConsolePopen is console_popen
        # Ray's processes are in a session of their own: a signal to the driver's process group
        # (`kill -TERM -- -<pgid>`) reaches the driver alone, which then stops them itself
        assert os.getsid(gcs.pid) != os.getsid(0) and os.getsid(raylet.pid) != os.getsid(0)
        # the cluster's config (the GCS hands it to the raylet) retries the object store's socket promptly
        config = json.loads(base64.b64decode(next(a for a in gcs.cmdline() if a.startswith("--config_list="))
                                             .split("=", 1)[1]))
        assert {k: config.get(k) for k in CONNECT_RETRY} == CONNECT_RETRY
        assert CONNECT_RETRY["raylet_client_connect_timeout_milliseconds"] * \
            CONNECT_RETRY["raylet_client_num_connect_attempts"] >= 10_000  # Ray's own 10 x 1 s budget, kept
        # and a worker still starts on demand
        def pid() -> int:  # defined here: pickled by value
            return os.getpid()

        worker = ray.get(ray.remote(pid).remote(), timeout=60)
        assert worker != os.getpid() and psutil.pid_exists(worker) and os.getsid(worker) != os.getsid(0)
    finally:
        ray.shutdown()


def test_tune_trials_on_the_local_head_start_without_a_runtime_env_and_with_tune_s_environment(monkeypatch, tmp_path):
    """lean_tune.trial_actors_inherit_env: on the local head init_ray started, Tune's trial actors carry
    no runtime_env (so Ray boots them without setup_worker.py, one Python start less each) and still
    see what Tune's env_vars would have set; outside the block Tune's runtime_env is back."""
    import ray
    from ray import tune
    from ray.tune.execution import class_cache

    from scaling.lean_tune import TUNE_ACTOR_ENV, trial_actors_inherit_env
    from scaling.local_ray import init_ray

    assert class_cache.DEFAULT_ENV_VARS == TUNE_ACTOR_ENV  # this Ray's defaults are the ones init_ray sets
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    for key in ("RAY_AIR_NEW_OUTPUT", "RAY_DEDUP_LOGS", "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "PL_DISABLE_FORK",
                "RAY_ENABLE_UV_RUN_RUNTIME_ENV", "TUNE_GLOBAL_CHECKPOINT_S", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"):
        monkeypatch.delenv(key, raising=False)

    def trial_env(config: dict) -> None:  # defined here: pickled by value
        tune.report({"runtime_env": ray.get_runtime_context().get_runtime_env_string(),
                     "pl_disable_fork": os.environ.get("PL_DISABLE_FORK", "unset"), "pid": os.getpid()})

    def run(name: str) -> dict:
        tuner = tune.Tuner(trial_env, run_config=tune.RunConfig(name=name, storage_path=str(tmp_path), verbose=0))
        [result] = tuner.fit()
        return result.metrics

    init_ray(None, 1, 0)
    try:
        with trial_actors_inherit_env():
            assert class_cache.DEFAULT_ENV_VARS == {}
            lean = run("lean")
        assert class_cache.DEFAULT_ENV_VARS == TUNE_ACTOR_ENV  # restored
        tunes = run("tunes")
    finally:
        ray.shutdown()
    assert (json.loads(lean["runtime_env"]), lean["pl_disable_fork"]) == ({}, "1")
    assert json.loads(tunes["runtime_env"]).get("env_vars") == TUNE_ACTOR_ENV and tunes["pl_disable_fork"] == "1"
    assert not psutil.pid_exists(lean["pid"]) or "setup_worker" not in " ".join(psutil.Process(lean["pid"]).cmdline())


def test_tune_s_runtime_env_stays_whole_where_the_workers_did_not_inherit_it(monkeypatch):
    """A Ray this process did not start as a local head (a cluster joined, or one started by other
    code) gives its workers no environment of the driver's: Tune's env_vars stay in the block."""
    import ray
    from ray.tune.execution import class_cache

    from scaling import lean_tune

    monkeypatch.setattr(lean_tune, "_local_head", {})
    monkeypatch.delenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", raising=False)
    ray.init(num_cpus=1, include_dashboard=False, _node_ip_address="127.0.0.1")
    try:
        with lean_tune.trial_actors_inherit_env():
            assert class_cache.DEFAULT_ENV_VARS == lean_tune.TUNE_ACTOR_ENV
        # a local head started here earlier, then stopped: its note does not hold for this Ray
        monkeypatch.setattr(lean_tune, "_local_head", {"node_id": "f" * 56, "inherited": dict(lean_tune.TUNE_ACTOR_ENV)})
        with lean_tune.trial_actors_inherit_env():
            assert class_cache.DEFAULT_ENV_VARS == lean_tune.TUNE_ACTOR_ENV
    finally:
        ray.shutdown()


def test_tune_tags_its_callbacks_as_before_without_importing_other_tools(monkeypatch):
    """count_callbacks_by_name: Tune's usage tag for a run's callbacks, counted by class name, equals
    what Tune's own count (which imports MLflow, W&B, Comet and Aim's integrations) gives."""
    from ray.air._internal import usage
    from ray.tune import Callback
    from ray.tune.logger import CSVLoggerCallback, LoggerCallback

    from scaling.lean_tune import count_callbacks_by_name

    class MLflowLoggerCallback(LoggerCallback):  # a name Tune counts as its own integration
        pass

    class Mine(Callback):
        pass

    callbacks = [Mine(), Callback(), CSVLoggerCallback(), LoggerCallback(), MLflowLoggerCallback(), "not one"]
    tunes = usage._count_callbacks
    monkeypatch.setattr(usage, "_count_callbacks", tunes)  # restored after the test
    count_callbacks_by_name()
    assert usage._count_callbacks is not tunes
    assert dict(usage._count_callbacks(callbacks)) == dict(tunes(callbacks)) == {
        "CustomCallback": 2, "CSVLoggerCallback": 1, "CustomLoggerCallback": 1, "MLflowLoggerCallback": 1}


def test_the_prompt_node_wait_reads_the_node_table_and_leaves_what_it_cannot_read_to_ray():
    from scaling.local_ray import node_registered

    alive = {"NodeID": "ab12", "Alive": True, "NodeManagerAddress": "127.0.0.1"}
    assert node_registered([], "ab12") is False  # the raylet has not registered yet
    assert node_registered([{**alive, "NodeID": "cd34"}], "ab12") is False
    assert node_registered([{**alive, "Alive": False}], "ab12") is False  # registered, then died
    assert node_registered([{**alive, "NodeID": "cd34"}, alive], "ab12") is True
    assert node_registered([{"node_id": "ab12", "state": "ALIVE"}], "ab12") is None  # another Ray's fields
