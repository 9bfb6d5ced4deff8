"""A real multi-node Ray cluster on this one machine, for tests: one ``ray start --block`` process per node.

Each node is its own raylet (its own node id, object store and workers) joined to one GCS, exactly as on
a cloud cluster, only on one host. The cluster lives in a private temp dir and on free ports, so it never
collides with the embedded Ray of the test session, and nobody's ``ray.init()`` joins it by accident (the
address file is written to that temp dir, not to Ray's default temp dir). Stopping kills only the processes it started.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

VENV_BIN = Path(sys.executable).parent
RAY = str(VENV_BIN / "ray")
REPO = Path(__file__).resolve().parent.parent


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port free now on 127.0.0.1 that this process has not handed out before: the kernel may offer a port
    it just released again, and ``ray start`` refuses two of its components one port."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` from /proc (Linux; no psutil in the environment)."""
    out = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as fh:
                out += [int(x) for x in fh.read().split()]
    except OSError:
        pass
    return out


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        if os.path.exists(f"/proc/{p}"):
            out.append(p)
            todo += _children(p)
    return out


def process_name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as fh:
            return fh.read().strip()
    except OSError:
        return ""


def _kill(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Wait until none of ``pids`` is alive (zombies count as gone); returns those still alive."""
    deadline = time.time() + timeout
    while True:
        alive = []
        for pid in pids:
            try:
                with open(f"/proc/{pid}/stat") as fh:
                    if fh.read().rsplit(")", 1)[1].split()[0] != "Z":
                        alive.append(pid)
            except OSError:
                pass
        if not alive or time.time() > deadline:
            return alive
        time.sleep(0.1)


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update({"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"})
    return env


class Node:
    """One ``ray start --block`` process and everything it spawned (raylet, workers, …)."""

    def __init__(self, proc: subprocess.Popen, log: Path, head: bool):
        self.proc, self.log, self.head = proc, log, head
        self.node_id: Optional[str] = None

    def processes(self) -> list[int]:
        return descendants(self.proc.pid)

    def raylet(self) -> int:
        for pid in self.processes():
            if process_name(pid) == "raylet":
                return pid
        raise RuntimeError(f"no raylet under ray start pid {self.proc.pid} (log {self.log})")


class LocalCluster:
    """``head_cpus`` on the head, then ``add_worker(cpus)`` per worker node; ``stop()`` in a finally."""

    def __init__(self, head_cpus: int = 1, object_store_mb: int = 300, head_env: Optional[dict] = None,
                 node_env: Optional[dict] = None):
        """``head_env``: extra environment of the head's processes; ``node_env``: of every node's (a value of
        None removes the variable, e.g. credentials the nodes must not have)."""
        self.node_env = dict(node_env or {})
        # A short path: Ray's Unix sockets live under it and must stay below ~100 characters.
        self.temp_dir = tempfile.mkdtemp(prefix="ccr", dir="/tmp")
        self.gcs_port = free_port()
        self.dashboard_port = free_port()
        self.object_store = str(object_store_mb * 1024 * 1024)
        self.nodes: list[Node] = []
        self.total_cpus = 0
        self.gcs_address = f"127.0.0.1:{self.gcs_port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        try:
            self._start(head_cpus, head=True, env=head_env)
        except BaseException:
            self.stop()
            raise

    # -- nodes --------------------------------------------------------------------------------

    def _start(self, cpus: int, head: bool, resources: Optional[dict] = None, env: Optional[dict] = None) -> Node:
        args = [RAY, "start", "--block", f"--num-cpus={cpus}", "--num-gpus=0",
                f"--object-store-memory={self.object_store}", "--disable-usage-stats",
                f"--dashboard-agent-listen-port={free_port()}", f"--node-manager-port={free_port()}",
                f"--object-manager-port={free_port()}", f"--metrics-export-port={free_port()}",
                f"--runtime-env-agent-port={free_port()}"]
        if resources:
            args.append(f"--resources={json.dumps(resources)}")
        if head:
            args += ["--head", f"--port={self.gcs_port}", f"--temp-dir={self.temp_dir}",
                     "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                     f"--dashboard-port={self.dashboard_port}", f"--ray-client-server-port={free_port()}"]
        else:
            args.append(f"--address={self.gcs_address}")
        log = Path(self.temp_dir) / f"node{len(self.nodes)}.log"
        env = {k: v for k, v in {**_env(), **self.node_env, **(env or {})}.items() if v is not None}  # None: unset
        with open(log, "wb") as fh:
            proc = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, env=env,
                                    cwd=self.temp_dir, start_new_session=True)
        node = Node(proc, log, head)
        self.nodes.append(node)
        self.total_cpus += cpus
        node.node_id = self._wait_for_node(node, before={n.node_id for n in self.nodes if n.node_id})
        return node

    def add_worker(self, cpus: int = 1, resources: Optional[dict] = None) -> Node:
        return self._start(cpus, head=False, resources=resources)

    def _wait_for_node(self, node: Node, before: set, timeout: float = 90.0) -> str:
        """Block until a new alive node shows in the GCS (and, for the head, the job API answers)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if node.proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {node.proc.returncode}: {node.log.read_text()[-3000:]}")
            try:
                alive = [n for n in self.list_nodes() if n["state"] == "ALIVE"]
                new = [n["node_id"] for n in alive if n["node_id"] not in before]
                if new and (not node.head or self._get("/api/version")):
                    return new[0]
            except Exception:  # noqa: BLE001 (the dashboard is not up yet: ServerUnavailable, refused, …)
                pass
            time.sleep(0.5)
        raise TimeoutError(f"node did not join in {timeout:.0f} s: {node.log.read_text()[-3000:]}")

    def session_logs(self) -> Path:
        """The Ray session's log folder (every node writes under the head's temp dir on this one host)."""
        return Path(self.temp_dir) / "session_latest" / "logs"

    def wait_until_idle(self, timeout: float = 120.0) -> None:
        """Block until every node has reported all its CPUs free (what an earlier test's jobs held, e.g. a
        killed driver's workers, is released), so a stage that follows can be scheduled on every node."""
        deadline, usage = time.time() + timeout, None
        while time.time() < deadline:
            try:
                usage = self._get("/api/cluster_status")["data"]["clusterStatus"]["loadMetricsReport"]["usage"]
                used, total = usage["CPU"]
                if used == 0 and total == self.total_cpus:
                    return
            except (KeyError, TypeError, ValueError, OSError):  # no report yet
                pass
            time.sleep(0.5)
        raise TimeoutError(f"the cluster's CPUs are not all free after {timeout:.0f} s: {usage}")

    def kill_raylet(self, node: Node) -> int:
        """SIGKILL the node's raylet: the node dies as on a lost machine (its workers die with it)."""
        pid = node.raylet()
        os.kill(pid, signal.SIGKILL)
        return pid

    # -- state over HTTP (no ray.init in the test process) ------------------------------------------

    def _get(self, path: str):
        with urllib.request.urlopen(self.dashboard + path, timeout=10) as resp:
            return json.loads(resp.read())

    def list_nodes(self) -> list[dict]:
        from ray.util.state import list_nodes

        return [dict(n.__dict__) if hasattr(n, "__dict__") else dict(n)
                for n in list_nodes(address=self.dashboard, raise_on_missing_output=False)]

    def list_tasks(self, job_id: Optional[str] = None, name: Optional[str] = None) -> list[dict]:
        from ray.util.state import list_tasks

        filters = []
        if job_id:
            filters.append(("job_id", "=", job_id))
        if name:
            filters.append(("func_or_class_name", "=", name))
        tasks = list_tasks(address=self.dashboard, filters=filters, limit=10000, detail=False,
                           raise_on_missing_output=False)
        return [dict(t.__dict__) if hasattr(t, "__dict__") else dict(t) for t in tasks]

    def job_client(self):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.dashboard)

    # -- jobs ----------------------------------------------------------------------------------

    python = sys.executable  # the venv's python: the entrypoint the job runs on the head

    def submit(self, entrypoint: list[str], timeout: float = 300.0, env: Optional[dict] = None,
               no_wait: bool = False):
        """``ray job submit --working-dir <repo> [--runtime-env-json {env_vars}] -- <entrypoint>``.

        Without ``no_wait`` it blocks until the job ends (the CLI tails its logs) and returns the finished
        CLI process with ``submission_id`` set; with ``no_wait`` it returns the submission id."""
        args = [RAY, "job", "submit", "--address", self.dashboard, "--working-dir", str(REPO)]
        if env:
            args += ["--runtime-env-json", json.dumps({"env_vars": env})]
        if no_wait:
            args.append("--no-wait")
        args += ["--", *entrypoint]
        out = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=_env(), cwd=str(REPO))
        match = re.search(r"raysubmit_[A-Za-z0-9]+", out.stdout + out.stderr)
        if not match:
            raise RuntimeError(f"ray job submit printed no submission id:\n{out.stdout}\n{out.stderr}")
        if no_wait:
            return match.group(0)
        out.submission_id = match.group(0)
        return out

    def job_info(self, submission_id: str) -> SimpleNamespace:
        """status (str), job_id (the hex id tasks carry), message."""
        info = self.job_client().get_job_info(submission_id)
        return SimpleNamespace(status=str(getattr(info.status, "value", info.status)), job_id=info.job_id,
                               message=info.message)

    def job_logs(self, submission_id: str) -> str:
        return self.job_client().get_job_logs(submission_id)

    def wait_job(self, submission_id: str, timeout: float = 180.0) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            status = self.job_info(submission_id).status
            if status in ("SUCCEEDED", "FAILED", "STOPPED"):
                return status
            time.sleep(0.5)
        raise TimeoutError(f"job {submission_id} still running after {timeout:.0f} s")

    # -- teardown ------------------------------------------------------------------------------

    def stop(self) -> None:
        """Terminate every process this cluster started (by pid, never by name), then its temp dir.

        SIGTERM first; `ray start --block` is slow to wind down, so whatever is left after a few seconds
        gets SIGKILL (a test cluster has nothing to save)."""
        procs = [p for node in reversed(self.nodes) for p in node.processes()]
        _kill(procs, signal.SIGTERM)
        alive = _wait_gone(procs, timeout=3)
        _kill(alive, signal.SIGKILL)
        _wait_gone(alive, timeout=5)
        for node in self.nodes:
            try:
                node.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                node.proc.kill()
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
