"""Several node managers on this machine, each with its own store and workers."""

from __future__ import annotations

import os
import time

import grpc
import numpy as np
import pytest

import rayx
from rayx.cluster_utils import Cluster
from rayx.exceptions import ObjectLostError, RayxError, WorkerCrashedError
from rayx.protocol import rayx_pb2 as pb
from rayx.protocol import rayx_pb2_grpc

from .conftest import wait_for


@rayx.remote(num_cpus=0)
def where():
    return rayx.get_runtime_context().get_node_id()


@pytest.fixture(scope="module")
def three_nodes():
    """A head with 1 CPU plus two joined nodes with 1 CPU each and a resource of their own."""
    if rayx.is_initialized():
        rayx.shutdown()
    c = Cluster(head_cpus=1, node_timeout=2.0, heartbeat_interval=0.2)
    c.add_node(num_cpus=1, resources={"a": 1})
    c.add_node(num_cpus=1, resources={"b": 1})
    c.connect()
    wait_for(lambda: len([n for n in rayx.nodes() if n["Alive"]]) == 3, 20, what="3 nodes")
    yield c
    c.shutdown()


def _node_with(resource: str) -> str:
    return next(n["NodeID"] for n in rayx.nodes() if resource in n["Resources"])


def test_nodes_and_cluster_resources(three_nodes):
    assert rayx.cluster_resources()["CPU"] == 3
    assert {n["Address"] for n in rayx.nodes()} == {n.address for n in three_nodes.nodes}
    stores = {n["StoreDir"] for n in rayx.nodes()}
    assert len(stores) == 3  # each node has its own object store


def test_custom_resources_place_tasks_on_their_node(three_nodes):
    assert rayx.get(where.options(resources={"a": 1}).remote()) == _node_with("a")
    assert rayx.get(where.options(resources={"b": 1}).remote()) == _node_with("b")


def test_spread_reaches_every_node(three_nodes):
    @rayx.remote(num_cpus=1)
    def slow_where():
        time.sleep(0.2)
        return rayx.get_runtime_context().get_node_id()

    seen = set(rayx.get([slow_where.options(scheduling_strategy="SPREAD").remote()
                         for _ in range(9)], timeout=60))
    assert seen == {n["NodeID"] for n in rayx.nodes()}


def test_node_affinity_pins(three_nodes):
    target = _node_with("b")
    strategy = rayx.NodeAffinitySchedulingStrategy(node_id=target)
    assert set(rayx.get([where.options(scheduling_strategy=strategy).remote()
                         for _ in range(4)])) == {target}


def test_objects_cross_nodes(three_nodes):
    @rayx.remote(resources={"a": 1})
    def make():
        return np.arange(3_000_000, dtype=np.int64)

    @rayx.remote(resources={"b": 1})
    def consume(arr):
        return int(arr.sum()), rayx.get_runtime_context().get_node_id()

    ref = make.remote()
    total, node = rayx.get(consume.remote(ref), timeout=60)
    assert total == int(np.arange(3_000_000, dtype=np.int64).sum())
    assert node == _node_with("b")
    assert int(rayx.get(ref).sum()) == total  # and to the driver's node


def test_actor_on_another_node(three_nodes):
    @rayx.remote(resources={"b": 0.5})
    class Box:
        def __init__(self):
            self.items = []

        def add(self, x):
            self.items.append(x)
            return len(self.items), rayx.get_runtime_context().get_node_id()

    box = Box.remote()
    assert rayx.get([box.add.remote(i) for i in range(3)])[-1] == (3, _node_with("b"))
    rayx.kill(box)


def test_driver_put_read_on_another_node(three_nodes):
    ref = rayx.put(np.ones(2_000_000))

    @rayx.remote(resources={"a": 1})
    def total(arr):
        return float(arr.sum())

    assert rayx.get(total.remote(ref), timeout=60) == 2_000_000.0


def test_infeasible_everywhere_fails(three_nodes):
    with pytest.raises(rayx.exceptions.TaskUnschedulableError):
        rayx.get(where.options(resources={"c": 1}).remote(), timeout=30)


def test_wrong_or_missing_token_is_refused(three_nodes):
    with grpc.insecure_channel(three_nodes.address) as ch:
        stub = rayx_pb2_grpc.HeadStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            stub.GetNodes(pb.Empty(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    from rayx import rpc
    with pytest.raises(grpc.RpcError):
        rpc.head_stub(rpc.channel(three_nodes.address, "bad-token")).GetNodes(pb.Empty(),
                                                                              timeout=5)


def test_init_address_without_token_is_a_clear_error(three_nodes, monkeypatch):
    monkeypatch.delenv("RAYX_TOKEN", raising=False)
    from rayx.config import load_settings
    from rayx.connect import find_token
    with pytest.raises(RayxError) as info:
        find_token("127.0.0.1:1", load_settings())
    assert "RAYX_TOKEN" in str(info.value)


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


def test_pulled_copies_are_freed_with_the_original(three_nodes):
    import gc

    ref = rayx.put(np.ones(2_000_000))

    @rayx.remote(resources={"b": 1})
    def total(arr):
        return float(arr.sum())

    assert rayx.get(total.remote(ref), timeout=60) == 2_000_000.0
    store_b = next(n["StoreDir"] for n in rayx.nodes() if "b" in n["Resources"])
    assert ref.id in os.listdir(store_b)  # a copy was pulled to node b
    oid = ref.id
    del ref
    gc.collect()
    wait_for(lambda: oid not in os.listdir(store_b), 10, what="the pulled copy to be freed")
