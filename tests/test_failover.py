"""Failures across nodes: a node killed mid-run, a driver that exits."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

import rayx
from rayx import rpc
from rayx.cluster_utils import Cluster
from rayx.exceptions import ObjectLostError
from rayx.protocol import rayx_pb2 as pb

from .conftest import wait_for


def _node_with(resource: str) -> str:
    return next(n["NodeID"] for n in rayx.nodes() if resource in n["Resources"])


def _markers(directory) -> list[list[str]]:
    """The lines tasks wrote into marker files: [what, node id] per run, oldest first."""
    names = [n for n in os.listdir(directory) if not n.endswith(".tmp")]  # complete ones
    names.sort(key=lambda n: os.stat(directory / n).st_mtime_ns)
    return [(directory / n).read_text().split() for n in names]


def test_node_death_fails_over(tmp_path):
    """SIGKILL a node mid-run: its tasks retry elsewhere, its actor restarts elsewhere, its
    objects are rebuilt from lineage — or get raises ObjectLostError, never hangs."""
    if rayx.is_initialized():
        rayx.shutdown()
    c = Cluster(head_cpus=1, node_timeout=2.0, heartbeat_interval=0.2)
    try:
        doomed = c.add_node(num_cpus=1, resources={"doomed": 1})
        c.connect()
        wait_for(lambda: len(rayx.nodes()) == 2, 20, what="2 nodes")
        doomed_id = _node_with("doomed")

        def mark(what: str) -> str:
            """Record that `what` runs now, and where; returns this node's id."""
            node = rayx.get_runtime_context().get_node_id()
            path = tmp_path / f"{what}-{os.getpid()}-{time.monotonic_ns()}"
            path.with_suffix(".tmp").write_text(f"{what} {node}")
            path.with_suffix(".tmp").rename(path)
            return node

        @rayx.remote(num_cpus=1, max_retries=2)
        def slow(i):
            node = mark(f"slow{i}")
            time.sleep(60 if node == doomed_id else 0.3)  # on the doomed node: until it dies
            return i, node

        @rayx.remote(num_cpus=0, max_restarts=1, max_task_retries=1,
                     scheduling_strategy=rayx.NodeAffinitySchedulingStrategy(doomed_id, True))
        class Survivor:
            def where(self):
                return rayx.get_runtime_context().get_node_id()

        @rayx.remote(num_cpus=0, scheduling_strategy=rayx.NodeAffinitySchedulingStrategy(
            doomed_id, soft=True))
        def made_there():
            return np.full(500_000, 7), mark("made")

        @rayx.remote(resources={"doomed": 1}, max_retries=0)
        def only_there():
            return np.full(500_000, 1), mark("only")

        survivor = Survivor.remote()
        assert rayx.get(survivor.where.remote(), timeout=30) == doomed_id
        rebuilt = made_there.remote()
        lost = only_there.remote()
        ready, _ = rayx.wait([rebuilt, lost], num_returns=2, timeout=30)
        assert len(ready) == 2
        assert sorted(_markers(tmp_path)) == [["made", doomed_id], ["only", doomed_id]]
        running = [slow.remote(i) for i in range(4)]
        on_doomed = wait_for(lambda: [m for m in _markers(tmp_path)
                                      if m[0].startswith("slow") and m[1] == doomed_id], 30,
                             what="a slow task to be running on the doomed node")
        c.kill_node(doomed)

        results = rayx.get(running, timeout=60)
        assert sorted(i for i, _ in results) == [0, 1, 2, 3]
        assert all(node != doomed_id for _, node in results)
        retried = int(on_doomed[0][0][len("slow"):])
        runs = [m[1] for m in _markers(tmp_path) if m[0] == f"slow{retried}"]
        assert runs[0] == doomed_id and runs[-1] == results[retried][1] != doomed_id
        assert rayx.get(survivor.where.remote(), timeout=60) != doomed_id
        arr, rebuilt_on = rayx.get(rebuilt, timeout=60)
        assert int(arr[0]) == 7 and rebuilt_on != doomed_id
        assert [m for m in _markers(tmp_path) if m[0] == "made"] == [
            ["made", doomed_id], ["made", rebuilt_on]]  # made there, then rebuilt elsewhere
        with pytest.raises(ObjectLostError):  # max_retries=0: no lineage to rebuild it from
            rayx.get(lost, timeout=60)
        assert [m for m in _markers(tmp_path) if m[0] == "only"] == [["only", doomed_id]]
        wait_for(lambda: not next(n for n in rayx.nodes() if n["NodeID"] == doomed_id)["Alive"],
                 20, what="the dead node to be marked dead")
    finally:
        c.shutdown()
    assert not os.path.exists(doomed.store_dir)


def test_driver_exit_ends_its_actors_but_not_detached_ones():
    """In a standing cluster, a driver's actors end with it; detached ones outlive it."""
    import subprocess
    import sys
    import textwrap

    if rayx.is_initialized():
        rayx.shutdown()
    c = Cluster(head_cpus=1)
    try:
        code = textwrap.dedent(f"""
            import os, rayx
            rayx.init(address="{c.address}", token="{c.session.token}")
            @rayx.remote
            class A:
                def pid(self):
                    return os.getpid()
            mine = A.remote()
            kept = A.options(name="kept", lifetime="detached").remote()
            print("PIDS", rayx.get(mine.pid.remote()), rayx.get(kept.pid.remote()))
        """)
        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=60, env=dict(os.environ, PYTHONPATH=repo))
        assert out.returncode == 0, out.stderr
        mine, kept = map(int, out.stdout.split("PIDS")[1].split())
        wait_for(lambda: not _pid_alive(mine), 15, what="the driver's actor to end")
        assert _pid_alive(kept)
        c.connect()
        handle = rayx.get_actor("kept")
        assert rayx.get(handle.pid.remote(), timeout=30) == kept
        rayx.kill(handle)
    finally:
        c.shutdown()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_job_fails_when_the_node_its_driver_uses_dies():
    """The head on 127.0.0.2, a node on 127.0.0.1: a driver on this host joins through the
    node on its own address, 127.0.0.1; that node dies and the job is marked FAILED."""
    import subprocess

    from .test_multinode import _driver

    if rayx.is_initialized():
        rayx.shutdown()
    c = Cluster(head_cpus=1, host="127.0.0.2", node_timeout=2.0, heartbeat_interval=0.2)
    head = rpc.head_stub(rpc.channel(c.address, c.session.token, None))

    def job_of(pid: int):
        return next((j for j in head.ListJobs(pb.Empty(), timeout=10).jobs
                     if j.driver_pid == pid), None)

    try:
        node = c.add_node(num_cpus=1, host="127.0.0.1")
        driver = _driver(c, "print('READY', rayx.get_runtime_context().get_node_id(), "
                         "flush=True)\nsys.stdin.read()\n",
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        try:
            assert driver.stdout.readline().split() == ["READY", node.node_id]
            assert job_of(driver.pid).state == "RUNNING"
            assert job_of(driver.pid).node_id == node.node_id
            c.kill_node(node)
            failed = wait_for(lambda: (j := job_of(driver.pid)).state == "FAILED" and j, 20,
                              what="the job of a driver whose node died to be marked FAILED")
            assert "connected to died" in failed.message and failed.end_time > 0
        finally:
            driver.kill()
            driver.wait(10)
    finally:
        c.shutdown()
