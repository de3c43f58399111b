"""autobits.cluster: launcher YAMLs, job-path handling, batched evaluation, and (``ray``) a
real two-node local cluster: a search through ``--address`` that loses an evaluator actor
mid-evaluation, and a search submitted as a Ray job."""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

import autobits.cluster  # noqa: F401  (sets Ray's loopback environment before Ray is imported)
from autobits.cluster.runtime import RAY_ENV

CLUSTER_DIR = Path(__file__).resolve().parents[1] / "cluster"
RAY = Path(sys.executable).with_name("ray")


# ------------------------------------------------------------------- no Ray started
@pytest.mark.parametrize("name", ["local.yaml", "aws.yaml"])
def test_launcher_yaml_is_accepted_by_ray_up_validation(name):
    """What `ray up` does before it touches a machine: fill defaults, validate the schema."""
    import yaml
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((CLUSTER_DIR / name).read_text())
    for key in ("cluster_name", "provider", "auth", "setup_commands", "head_start_ray_commands",
                "worker_start_ray_commands", "file_mounts"):
        assert key in raw, f"{name} lacks {key}"
    assert raw["provider"]["type"] in ("local", "aws")
    if raw["provider"]["type"] == "local":
        assert raw["provider"]["head_ip"] and raw["provider"]["worker_ips"]
    assert any("ray start --head" in c for c in raw["head_start_ray_commands"])
    assert any("ray start --address" in c for c in raw["worker_start_ray_commands"])
    validate_config(prepare_config(copy.deepcopy(raw)))
    # secure by default: the job server on the head's loopback, token authentication everywhere
    head = " ".join(raw["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in (CLUSTER_DIR / name).read_text()
    for cmd in (c for c in raw["head_start_ray_commands"] + raw["worker_start_ray_commands"]
                if "ray start" in c):
        assert "RAY_AUTH_MODE=token" in cmd, cmd
    assert any(k.endswith(".ray/auth_token") for k in raw["file_mounts"])
    assert "ray dashboard" in (CLUSTER_DIR / name).read_text()


def test_nothing_outside_the_test_fixtures_turns_ray_authentication_off():
    root = CLUSTER_DIR.parent
    for path in [*root.glob("autobits/**/*.py"), *root.glob("cluster/*"), *root.glob("agents/*.py"),
                 *root.glob("bench/*.py"), *root.glob("exports/*.py"), *root.glob("envs/*.py")]:
        text = path.read_text() if path.is_file() else ""
        assert "RAY_AUTH_MODE=disabled" not in text and '"RAY_AUTH_MODE"' not in text, path


def test_job_client_without_ray_default_names_the_extra(monkeypatch):
    """Core ray has no job client (ray[default] does): the error says which extra to add."""
    import ray.job_submission

    from autobits.cluster import jobs
    from autobits.errors import AutobitsError

    def core_ray_client(*_a, **_k):  # what ray's SDK raises without ray[default]
        raise RuntimeError("The Ray jobs CLI & SDK require the ray[default] installation: "
                           "`pip install 'ray[default]'`")

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", core_ray_client)
    with pytest.raises(AutobitsError, match=r"pip install 'autobits\[cluster\]'"):
        jobs._client("127.0.0.1:8265")


def test_submit_passes_no_loopback_or_auth_setting_to_the_job(monkeypatch):
    from autobits.cluster import jobs

    sent = {}

    class Client:
        def submit_job(self, **kw):
            sent.update(kw)
            return "job-1"

    monkeypatch.setattr(jobs, "_client", lambda address: Client())
    assert jobs.submit(address="127.0.0.1:1", module="autobits.app.cli", command=["search", "--out", "r"]) == "job-1"
    env = sent["runtime_env"]["env_vars"]
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in env and "RAY_AUTH_MODE" not in env
    assert env["RAY_USAGE_STATS_ENABLED"] == "0"


def _job_server(status: int, seen: list):
    """A stand-in job server answering every request with ``status`` (401: token needed)."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(dict(self.headers))
            body = b'{"ray_version": "2.60.0"}' if status == 200 else b"Unauthorized"
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.mark.parametrize("status", [401, 403])
def test_submit_refuses_a_job_server_that_needs_a_token(monkeypatch, tmp_path, status):
    from autobits.cluster import jobs
    from autobits.errors import AutobitsError

    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    if status == 403:
        monkeypatch.setenv("RAY_AUTH_TOKEN", "a" * 32)
    seen: list = []
    server = _job_server(status, seen)
    address = f"127.0.0.1:{server.server_address[1]}"
    try:
        with pytest.raises(AutobitsError) as e:
            jobs.submit(address=address, module="autobits.app.cli", command=["search", "--out", str(tmp_path / "r")])
    finally:
        server.shutdown()
    msg = str(e.value)
    assert "\n" not in msg and f"http://{address}" in msg and "ray get-auth-token" in msg
    assert ("requires an authentication token" if status == 401 else "rejected") in msg
    # the token configured here (if any) is what was sent
    auth = [h.get("Authorization") for h in seen]
    assert auth and all(a == (None if status == 401 else "Bearer " + "a" * 32) for a in auth)


def test_absolutize_paths_for_jobs(tmp_path):
    from autobits.cluster.jobs import absolutize, dashboard_url

    (tmp_path / "text.txt").write_text("x")
    argv = ["search", "--out", "runs/a", "--text=text.txt", "--model", "smollm2-135m",
            "--json", "/abs/m.json", "--target-bpw", "4.5"]
    out = absolutize(argv, cwd=tmp_path)
    assert out[:3] == ["search", "--out", str(tmp_path / "runs" / "a")]
    assert out[3] == f"--text={tmp_path / 'text.txt'}"
    assert out[4:] == ["--model", "smollm2-135m", "--json", "/abs/m.json", "--target-bpw", "4.5"]
    assert dashboard_url("127.0.0.1:8265") == "http://127.0.0.1:8265"
    assert dashboard_url("https://h:1") == "https://h:1"


def test_ray_options_and_no_ray_mode():
    import argparse

    from autobits.app.options import add_ray_args, ray_options_from_args
    from autobits.cluster import RayOptions, cluster_evaluate_factory
    from autobits.errors import AutobitsError

    p = argparse.ArgumentParser()
    add_ray_args(p)
    a = ray_options_from_args(p.parse_args(["--address", "127.0.0.1:1", "--workers", "3",
                                            "--worker-threads", "2"]))
    assert a == RayOptions(address="127.0.0.1:1", workers=3, worker_threads=2) and a.uses_ray
    many, close = cluster_evaluate_factory(None, ray_options_from_args(p.parse_args(["--workers", "0"])))
    assert many is None
    close()
    with pytest.raises(AutobitsError, match="--workers must be 0"):
        ray_options_from_args(p.parse_args(["--workers", "-1"]))
    with pytest.raises(AutobitsError, match="cannot use --address"):
        RayOptions(address="127.0.0.1:1", workers=0)


def test_lost_actor_classification():
    """System losses are replaced and retried; our own exceptions are raised."""
    from ray import exceptions as rx

    from autobits.cluster.actors import _lost

    assert _lost(rx.ActorDiedError()) and _lost(rx.OutOfMemoryError("low memory"))
    assert _lost(rx.ActorUnavailableError("restarting", None))
    assert not _lost(ValueError("bad allocation")) and not _lost(rx.RayTaskError("f", "tb", ValueError()))


# ------------------------------------------------------------ a local Ray cluster
def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _node_args(ports: list[int]) -> list[str]:
    nm, om, agent, agent_grpc, metrics, rt = ports
    return ["--node-ip-address=127.0.0.1", f"--node-manager-port={nm}", f"--object-manager-port={om}",
            f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={rt}",
            "--min-worker-port=0", "--max-worker-port=0", "--object-store-memory=400000000",
            "--disable-usage-stats", "--block"]


#: `ray start` (Ray's own CLI code) for the worker node.  With
#: RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 -- what keeps every address on loopback here -- the CLI
#: refuses to start a non-head node ("multi-node clusters are not supported"), and with =1 it
#: resolves 127.0.0.1 to the machine's external address.  The shim lifts only that guard:
#: the CLI module alone sees the flag as 1, address resolution still sees 0.
WORKER_NODE_SHIM = """
import sys, types
from ray._private import ray_constants
from ray.scripts import scripts
view = types.ModuleType("ray_constants_for_cli")
view.__dict__.update(ray_constants.__dict__)
view.ENABLE_RAY_CLUSTER = True
scripts.ray_constants = view
sys.argv = ["ray", *sys.argv[1:]]
sys.exit(scripts.main())
"""


class LocalCluster:
    """A head (2 CPUs, dashboard on: the job server) and a worker node (1 CPU) on 127.0.0.1,
    as two ``ray start --block`` processes of this test (the worker's through
    :data:`WORKER_NODE_SHIM`): terminating them stops their Ray processes, and only theirs."""

    def __init__(self):
        if not RAY.exists():
            pytest.skip(f"no ray executable next to {sys.executable}")
        self.temp = tempfile.mkdtemp(prefix="abray-", dir="/tmp")
        ports = _free_ports(16)
        self.gcs_port, self.dash_port, self.client_port = ports[:3]
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.dashboard = f"127.0.0.1:{self.dash_port}"
        # the test cluster's own nodes only: all on 127.0.0.1 (loopback pinned), and without
        # Ray's token authentication (a throwaway cluster of this test process; the pytest
        # process, whose token mode an embedded Ray may have switched on, and the jobs'
        # drivers, which inherit the nodes' environment, connect to it without a token)
        self.env = {**os.environ, **RAY_ENV, "RAY_AUTH_MODE": "disabled"}
        self.env.pop("RAY_ADDRESS", None)
        self.procs: list[subprocess.Popen] = []
        try:
            self._start_nodes(ports)
        except BaseException:
            self.stop()
            raise

    def _start_nodes(self, ports: list[int]) -> None:
        self._start([str(RAY), "start", "--head", f"--port={self.gcs_port}", "--num-cpus=2",
                     "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                     f"--dashboard-port={self.dash_port}",
                     f"--ray-client-server-port={self.client_port}",
                     f"--temp-dir={self.temp}", *_node_args(ports[3:9])], "head")
        # the worker node's `ray start` waits for the head's GCS itself: no wait in between
        self._start([sys.executable, "-c", WORKER_NODE_SHIM, "start", f"--address={self.address}",
                     "--num-cpus=1", f"--temp-dir={self.temp}", *_node_args(ports[9:15])], "worker")
        self._wait_cpus(3, timeout=180)

    def _start(self, cmd: list[str], name: str, env: dict | None = None) -> None:
        with open(Path(self.temp) / f"{name}.log", "w") as log:
            self.procs.append(subprocess.Popen(cmd, env={**self.env, **(env or {})}, stdout=log,
                                               stderr=subprocess.STDOUT, start_new_session=True))

    def _wait_cpus(self, cpus: int, timeout: float) -> None:
        """Poll `ray status`-equivalent through a short-lived driver-free check."""
        code = ("import ray,sys; ray.init(address=sys.argv[1], logging_level='ERROR');"
                "print(int(ray.cluster_resources().get('CPU',0)))")
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if any(p.poll() is not None for p in self.procs):
                raise RuntimeError(f"ray start exited: {self.logs()}")
            r = subprocess.run([sys.executable, "-c", code, self.address], env=self.env,
                               capture_output=True, text=True, timeout=120)
            if r.returncode == 0 and r.stdout.strip().splitlines()[-1:] == [str(cpus)]:
                return
            time.sleep(2)
        raise RuntimeError(f"cluster did not reach {cpus} CPUs in {timeout}s: {self.logs()}")

    def logs(self) -> str:
        return "\n".join(p.read_text()[-2000:] for p in Path(self.temp).glob("*.log"))

    def stop(self) -> None:
        for p in reversed(self.procs):  # worker first
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
        shutil.rmtree(self.temp, ignore_errors=True)


@pytest.fixture(scope="module")
def local_cluster():
    cluster = LocalCluster()
    try:
        yield cluster
    finally:
        cluster.stop()


def _search_args(tiny_folder, *extra: str):
    import argparse

    from autobits.app.options import add_prepare_args, add_ray_args

    p = argparse.ArgumentParser()
    add_prepare_args(p)
    add_ray_args(p)
    return p.parse_args(["--model", str(tiny_folder), "--ctx", "64", "--calib-windows", "2",
                         "--windows", "1", "--reward-windows", "2", "--reward-ctx", "64", *extra])


@pytest.mark.ray
@pytest.mark.timeout(400)
def test_search_through_address_survives_a_killed_actor(local_cluster, tiny_lm, tiny_folder):
    import ray

    from autobits.agents import SearchProblem
    from autobits.agents.optuna_agent import OptunaAgent, OptunaConfig
    from autobits.cluster import cluster_evaluate_factory
    from autobits.app.options import prepare_config_from_args, ray_options_from_args
    from autobits.errors import AutobitsError
    from autobits.pipeline import prepare
    from autobits.solvers import solve

    args = _search_args(tiny_folder, "--address", local_cluster.address)
    prepared = prepare(prepare_config_from_args(args), lm=tiny_lm)
    table = prepared.table
    # the tiny model's embedding outweighs its blocks: a budget that leaves the blocks a real
    # choice (with the embedding at its smallest) gives distinct allocations to search
    span = sum(o[0].bytes - o[-1].bytes for n, o in table.options.items() if n != "token_embd.weight")
    limit = table.min_bytes() + span // 2
    warm = solve("greedy", table, limit_bytes=limit)
    evals = 9

    def problem(evaluate_many, evaluate=prepared.reward):
        return SearchProblem(table=table, features=prepared.features, limit_bytes=limit,
                             evaluate=evaluate, warm_start=warm, evaluate_many=evaluate_many)

    # the undisturbed reference: the same batched search, evaluated in this process
    local = OptunaAgent(OptunaConfig(sampler="random", space="categorical", batch=3)).search(
        problem(lambda allocs: [prepared.reward(a) for a in allocs]), evals=evals, seed=1)

    many, close = cluster_evaluate_factory(prepared, ray_options_from_args(args))
    pool = many.__self__
    killed: list[int] = []
    try:
        assert pool.workers == 3  # the cluster's CPUs
        assert len({i["node"] for i in pool.info}) == 2  # actors on both nodes
        dispatched = []

        def kill_mid_evaluation(pool, slot, index):
            dispatched.append(index)
            if len(dispatched) == 5 and not killed:  # the 5th evaluation was just sent: running
                pid = pool.info[slot]["pid"]
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)

        pool.on_dispatch = kill_mid_evaluation
        result = OptunaAgent(OptunaConfig(sampler="random", space="categorical", batch=3)).search(
            problem(many, evaluate=lambda a: many([a])[0]), evals=evals, seed=1)
        stats = pool.stats
        with pytest.raises(AutobitsError, match="need 10 CPUs, the Ray cluster has 3"):
            type(pool).from_prepared(prepared, workers=10)
    finally:
        close()
    assert not ray.is_initialized()  # disconnected; the cluster keeps running
    assert killed and stats.replacements == 1 and stats.retries >= 1
    assert stats.evaluations == evals
    # all evaluations done, same proposals and (up to float rounding) same measurements
    assert len(result.history) == evals == len(local.history)
    assert [e.bytes for e in result.history] == [e.bytes for e in local.history]
    np.testing.assert_allclose([e.kld for e in result.history], [e.kld for e in local.history],
                               rtol=1e-4, atol=1e-9)
    assert type(result) is type(local) and result.agent == local.agent
    assert set(result.meta) == set(local.meta) and result.meta["evals"] == evals
    assert result.best.bytes <= limit and result.best.tensors == local.best.tensors


@pytest.mark.ray
@pytest.mark.timeout(400)
def test_cli_search_through_address(local_cluster, tiny_folder, tmp_path, capsys, caplog):
    """`autobits search --agent optuna --address ...`: the evaluations run on the cluster's
    actors, in batches of its 3 CPUs, and the run directory is complete."""
    import logging

    import ray

    from autobits.app.cli import main

    out = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="autobits.cluster.search"):
        code = main(["search", "--model", str(tiny_folder), "--ctx", "64", "--calib-windows", "2",
                     "--windows", "1", "--reward-windows", "1", "--reward-ctx", "64",
                     "--target-bpw", "6", "--agent", "optuna", "--evals", "6", "--sampler", "tpe",
                     "--address", local_cluster.address, "--out", str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.err[-3000:]
    assert "evaluating on Ray: 3 evaluator actors" in caplog.text
    assert not ray.is_initialized()  # the search disconnected when it ended
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["agent"] == "optuna" and metrics["bpw"] <= 6.0
    assert (out / "report.md").is_file() and "optuna" in printed.out


@pytest.mark.ray
@pytest.mark.timeout(400)
def test_submit_search_as_job_and_list_it(local_cluster, tiny_folder, tmp_path, capsys):
    from autobits.app.cli import main

    out = tmp_path / "run"
    code = main(["submit", "--address", local_cluster.dashboard, "--wait", "--timeout", "300", "--",
                 "search", "--model", str(tiny_folder), "--ctx", "64", "--calib-windows", "2",
                 "--windows", "1", "--reward-windows", "1", "--reward-ctx", "64",
                 "--target-bpw", "6", "--agent", "greedy", "--out", str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.err[-3000:]
    job_id = printed.out.splitlines()[0].strip()
    assert "SUCCEEDED" in printed.out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["agent"] == "greedy" and metrics["kld"] >= 0 and metrics["bpw"] <= 6.0
    assert json.loads((out / "allocation.json").read_text())["tensors"]

    listing = tmp_path / "jobs.json"
    assert main(["jobs", "--address", local_cluster.dashboard, "--json", str(listing)]) == 0
    table = capsys.readouterr().out
    assert job_id in table and "SUCCEEDED" in table
    jobs = {j["id"]: j for j in json.loads(listing.read_text())["jobs"]}
    assert jobs[job_id]["status"] == "SUCCEEDED" and "search" in jobs[job_id]["entrypoint"]


@pytest.mark.ray
@pytest.mark.timeout(400)
def test_stages_on_two_nodes_are_bit_identical_and_survive_a_killed_actor(local_cluster, tiny_lm,
                                                                          smol_tokenizer):
    """Calibration shards and candidate items on 3 stage actors over the two nodes give the
    local threads' statistics and table bit for bit, also when an actor is killed mid-stage
    (replaced, its item sent again)."""
    import ray

    from autobits.calibrate import calibrate
    from autobits.cluster.runtime import ray_session
    from autobits.cluster.stages import RayStageRunner
    from autobits.evaluate import WeightCache
    from autobits.features import build_candidates
    from autobits.text import load_text, make_windows

    windows = make_windows(load_text("stdlib"), smol_tokenizer, ctx=64).split(calib=3, eval=0).calib
    formats = ("Q8_0", "Q4_K", "Q4_0", "Q2_K")
    want = calibrate(tiny_lm, windows, fisher_windows=2, workers=2, progress=False)
    want_cache = WeightCache(tiny_lm)
    want_table = build_candidates(tiny_lm, want, formats=formats, cache=want_cache, workers=2,
                                  progress=False)
    killed: list[int] = []

    def kill_third_item(runner, slot, index):
        if index == 2 and not killed:
            pid = runner.info[slot]["pid"]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    with ray_session(local_cluster.address):
        with RayStageRunner() as runner:
            assert runner.workers == 3  # the cluster's CPUs
            got = calibrate(tiny_lm, windows, fisher_windows=2, workers=2, progress=False,
                            runner=runner)
            assert len({i["node"] for i in runner.info}) == 2  # actors on both nodes
            runner.on_dispatch = kill_third_item
            cache = WeightCache(tiny_lm)
            table = build_candidates(tiny_lm, got, formats=formats, cache=cache, progress=False,
                                     runner=runner)
            replaced = runner.replacements
    assert not ray.is_initialized()
    assert killed and replaced == 1
    assert got.fisher_tokens == want.fisher_tokens and set(got.sites) == set(want.sites)
    for k, st in want.sites.items():
        for field in ("h", "sq_mean", "abs_mean", "abs_max", "x4_mean"):
            np.testing.assert_array_equal(getattr(got.sites[k], field), getattr(st, field),
                                          err_msg=f"{k}.{field}")
    assert set(got.gains) == set(want.gains)
    for k, g in want.gains.items():
        np.testing.assert_array_equal(got.gains[k], g, err_msg=k)
    np.testing.assert_array_equal(got.head_gain, want.head_gain)
    assert table.options == want_table.options and table.meta["runner"] == "remote"
    # the quantized bytes came back into the driver's cache, the same bytes
    assert len(cache) == len(want_cache) > 0
    for s in tiny_lm.quantizable:
        for fmt in formats:
            if want_cache.has(s.name, fmt):
                np.testing.assert_array_equal(cache.quantize(s.name, fmt),
                                              want_cache.quantize(s.name, fmt))
