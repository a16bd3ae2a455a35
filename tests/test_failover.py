"""Failures across nodes: a node killed mid-run, a driver that exits."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

import rayx
from rayx.cluster_utils import Cluster
from rayx.exceptions import ObjectLostError, WorkerCrashedError

from .conftest import wait_for


def _node_with(resource: str) -> str:
    return next(n["NodeID"] for n in rayx.nodes() if resource in n["Resources"])


def test_node_death_fails_over():
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

        @rayx.remote(num_cpus=1, max_retries=2)
        def slow(i):
            time.sleep(1.0)
            return i, rayx.get_runtime_context().get_node_id()

        @rayx.remote(num_cpus=0, max_restarts=1, max_task_retries=1,
                     scheduling_strategy=rayx.NodeAffinitySchedulingStrategy(doomed_id, True))
        class Survivor:
            def where(self):
                return rayx.get_runtime_context().get_node_id()

        @rayx.remote(num_cpus=0, scheduling_strategy=rayx.NodeAffinitySchedulingStrategy(
            doomed_id, soft=True))
        def made_there():
            return np.full(500_000, 7), rayx.get_runtime_context().get_node_id()

        @rayx.remote(resources={"doomed": 1}, max_retries=0)
        def only_there():
            return np.full(500_000, 1)

        survivor = Survivor.remote()
        assert rayx.get(survivor.where.remote(), timeout=30) == doomed_id
        rebuilt = made_there.remote()
        lost = only_there.remote()
        rayx.wait([rebuilt, lost], num_returns=2, timeout=30)
        running = [slow.remote(i) for i in range(4)]
        time.sleep(0.3)  # let some of them start on the doomed node before it dies
        c.kill_node(doomed)

        results = rayx.get(running, timeout=60)
        assert sorted(i for i, _ in results) == [0, 1, 2, 3]
        assert all(node != doomed_id for _, node in results)
        assert rayx.get(survivor.where.remote(), timeout=60) != doomed_id
        arr, _ = rayx.get(rebuilt, timeout=60)
        assert int(arr[0]) == 7
        with pytest.raises((ObjectLostError, WorkerCrashedError)):
            rayx.get(lost, timeout=60)
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
