"""Several node managers on this machine, each with its own store and workers."""

from __future__ import annotations

import os
import time

import grpc
import numpy as np
import pytest

import rayx
from rayx.cluster_utils import Cluster
from rayx.exceptions import RayxError
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


def test_worker_output_reaches_a_remote_driver(three_nodes):
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(f"""
        import rayx
        rayx.init(address="{three_nodes.address}", token="{three_nodes.session.token}")
        @rayx.remote(resources={{"b": 1}})
        def speak():
            print("hello from node b")
            return 1
        rayx.get(speak.remote())
    """)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, PYTHONPATH=repo))
    assert out.returncode == 0, out.stderr
    line = next(ln for ln in out.stdout.splitlines() if "hello from node b" in ln)
    assert line.startswith("(pid=") and "node=" in line


def _jobs() -> list:
    return list(rayx.api.core().head.ListJobs(pb.Empty(), timeout=10).jobs)


def _job_of(pid: int):
    return next((j for j in _jobs() if j.driver_pid == pid), None)


def _driver(three_nodes, body: str, **popen):
    import subprocess
    import sys
    import textwrap

    code = (f'import os, sys, rayx\nrayx.init(address="{three_nodes.address}", '
            f'token="{three_nodes.session.token}")\n' + textwrap.dedent(body))
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.Popen([sys.executable, "-c", code, "an-arg"], text=True,
                            env=dict(os.environ, PYTHONPATH=repo), **popen)


def test_jobs_this_driver_is_running(three_nodes):
    me = _job_of(os.getpid())
    assert me is not None and me.state == "RUNNING"
    assert me.end_time == 0 and me.start_time <= time.time()
    assert me.driver_id == rayx.api.core().client_id
    assert me.node_id in {n["NodeID"] for n in rayx.nodes()}
    assert me.entrypoint.startswith("python ")


def test_jobs_succeed_fail_and_die(three_nodes):
    import signal
    import subprocess

    ok = _driver(three_nodes, "rayx.shutdown()\n")
    raised = _driver(three_nodes, "raise ValueError('bad input')\n",
                     stderr=subprocess.DEVNULL)
    killed = _driver(three_nodes, "print('READY', flush=True)\nsys.stdin.read()\n",
                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert killed.stdout.readline().strip() == "READY"
        assert _job_of(killed.pid).state == "RUNNING"
        killed.send_signal(signal.SIGKILL)
        assert ok.wait(60) == 0 and raised.wait(60) == 1
    finally:
        for p in (ok, raised, killed):
            p.kill()
            p.wait(10)
    done = _job_of(ok.pid)
    assert done.state == "SUCCEEDED" and done.end_time >= done.start_time > 0
    assert done.entrypoint == "python -c an-arg"
    failed = _job_of(raised.pid)
    assert failed.state == "FAILED" and "ValueError: bad input" in failed.message
    dead = wait_for(lambda: (j := _job_of(killed.pid)) and j.state == "FAILED" and j, 15,
                    what="the killed driver's job to be marked FAILED")
    assert "died" in dead.message and dead.end_time > 0
    ids = [j.job_id for j in _jobs()]
    assert len(ids) == len(set(ids))


def test_jobs_persist_in_head_db(three_nodes):
    import sqlite3

    db = sqlite3.connect(os.path.join(three_nodes.session.dir, "head.db"))
    try:
        stored = {pb.JobInfo.FromString(b).job_id: pb.JobInfo.FromString(b)
                  for (b,) in db.execute("SELECT info FROM jobs")}
    finally:
        db.close()
    assert {j.job_id: j.state for j in _jobs()} == {k: j.state for k, j in stored.items()}


def test_local_driver_registers_its_job():
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import os, rayx
        from rayx.protocol import rayx_pb2 as pb
        rayx.init(num_cpus=1)
        head = rayx.api.core().head
        (job,) = head.ListJobs(pb.Empty()).jobs
        print("JOB", job.state, job.driver_pid == os.getpid())
        rayx.api._finish_job(rayx.api.core(), "SUCCEEDED")
        (job,) = head.ListJobs(pb.Empty()).jobs
        print("JOB", job.state, job.end_time > 0)
    """)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, env=dict(os.environ, PYTHONPATH=repo))
    assert out.returncode == 0, out.stderr
    assert "JOB RUNNING True\nJOB SUCCEEDED True" in out.stdout


def test_kv_from_the_driver(three_nodes):
    assert rayx.kv_get("kvt/missing") is None
    rayx.kv_put("kvt/a", b"1")
    rayx.kv_put("kvt/b", bytearray(b"\x00\xff"))
    rayx.kv_put("kvt_c", b"")  # '_' is no wildcard for the prefix
    rayx.kv_put("kvt/a", b"one")  # replaces
    assert rayx.kv_get("kvt/a") == b"one"
    assert rayx.kv_get("kvt/b") == b"\x00\xff"
    assert rayx.kv_get("kvt_c") == b""  # empty, not missing
    assert rayx.kv_keys("kvt/") == ["kvt/a", "kvt/b"]
    assert set(rayx.kv_keys()) >= {"kvt/a", "kvt/b", "kvt_c"}
    assert rayx.kv_delete("kvt/a") is True
    assert rayx.kv_delete("kvt/a") is False
    assert rayx.kv_get("kvt/a") is None
    assert rayx.kv_keys("kvt") == ["kvt/b", "kvt_c"]
    with pytest.raises(TypeError, match="bytes"):
        rayx.kv_put("kvt/x", "text")
    with pytest.raises(TypeError, match="str"):
        rayx.kv_get(b"kvt/b")
    for k in rayx.kv_keys("kvt"):
        rayx.kv_delete(k)
    assert rayx.kv_keys("kvt") == []


def test_kv_from_tasks_and_actors_on_other_nodes(three_nodes):
    @rayx.remote(resources={"a": 1})
    def writer(n):
        for i in range(n):
            rayx.kv_put(f"kvtask/{i}", str(i * i).encode())
        return rayx.get_runtime_context().get_node_id()

    @rayx.remote(resources={"b": 1})
    def reader():
        keys = rayx.kv_keys("kvtask/")
        values = [rayx.kv_get(k) for k in keys]
        gone = rayx.kv_delete("kvtask/0")
        return keys, values, gone, rayx.kv_get("kvtask/0")

    @rayx.remote(resources={"b": 0.5})
    class Reader:
        def get(self, key):
            return rayx.kv_get(key)

    assert rayx.get(writer.remote(3), timeout=60) == _node_with("a")
    keys, values, gone, after = rayx.get(reader.remote(), timeout=60)
    assert keys == ["kvtask/0", "kvtask/1", "kvtask/2"]
    assert values == [b"0", b"1", b"4"] and gone is True and after is None
    actor = Reader.remote()
    assert rayx.get(actor.get.remote("kvtask/2"), timeout=60) == b"4"
    rayx.kill(actor)
    assert rayx.kv_keys("kvtask/") == ["kvtask/1", "kvtask/2"]  # the driver sees the same
    import sqlite3
    db = sqlite3.connect(os.path.join(three_nodes.session.dir, "head.db"))
    try:  # kept in the head's SQLite file
        assert db.execute("SELECT value FROM kv WHERE key = 'kvtask/2'").fetchone() == (b"4",)
    finally:
        db.close()
    for k in rayx.kv_keys("kvtask/"):
        rayx.kv_delete(k)


def test_refused_calls_are_logged_by_the_node_that_refused_them(three_nodes):
    from rayx import rpc

    def log_of(node) -> str:
        path = os.path.join(three_nodes.session.dir, "logs", f"node-{node.node_id[:12]}.log")
        with open(path, errors="replace") as f:
            return f.read()

    head, other = three_nodes.nodes[0], three_nodes.nodes[2]
    with pytest.raises(grpc.RpcError) as err:
        rpc.head_stub(rpc.channel(head.address, "wrong-token-x1")).ListJobs(pb.Empty(),
                                                                             timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with grpc.insecure_channel(other.address) as ch:  # no token at all, to a node manager
        with pytest.raises(grpc.RpcError) as err:
            rayx_pb2_grpc.NodeManagerStub(ch).GetResources(pb.Empty(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    line = "refused /rayx.Head/ListJobs: missing or wrong cluster token"
    wait_for(lambda: line in log_of(head), 10, what="the head to log the refused call")
    wait_for(lambda: "refused /rayx.NodeManager/GetResources" in log_of(other), 10,
             what="the node manager to log the refused call")
    assert "wrong-token-x1" not in log_of(head)  # what a caller sent is not echoed
    assert "refused /rayx.NodeManager/GetResources" not in log_of(head)


def _context() -> dict:
    ctx = rayx.get_runtime_context()
    return {"node": ctx.get_node_id(), "node_prop": ctx.node_id, "worker": ctx.get_worker_id(),
            "task": ctx.get_task_id(), "actor": ctx.get_actor_id(), "mode": ctx.worker_mode,
            "pid": os.getpid()}


def test_runtime_context_in_the_driver(three_nodes):
    me = _context()
    assert me["mode"] == "DRIVER" and me["task"] is None and me["actor"] is None
    assert me["node"] == me["node_prop"] == rayx.api.core().node_id
    assert me["node"] in {n["NodeID"] for n in rayx.nodes()}
    assert me["worker"] == rayx.api.core().client_id


def test_runtime_context_in_tasks(three_nodes):
    ctx_task = rayx.remote(resources={"a": 1})(_context)
    refs = [ctx_task.remote() for _ in range(3)]
    got = rayx.get(refs, timeout=60)
    driver = rayx.api.core().client_id
    for ref, c in zip(refs, got):
        assert c["mode"] == "WORKER" and c["actor"] is None
        assert c["node"] == c["node_prop"] == _node_with("a")
        assert c["task"] == ref.id[:-2]  # a task's return ids are its id plus an index
        assert c["worker"] and c["worker"] != driver
    assert len({c["task"] for c in got}) == 3
    by_pid: dict[int, set] = {}
    for c in got:
        by_pid.setdefault(c["pid"], set()).add(c["worker"])
    assert all(len(ws) == 1 for ws in by_pid.values())  # one id per worker process
    assert len({c["worker"] for c in got}) == len(by_pid)
    other = rayx.get(rayx.remote(resources={"b": 1})(_context).remote(), timeout=60)
    assert other["node"] == _node_with("b")
    assert other["worker"] not in {c["worker"] for c in got}


def test_runtime_context_in_an_actor(three_nodes):
    @rayx.remote(resources={"b": 0.5})
    class Where:
        def ctx(self):
            return _context()

    actor = Where.remote()
    refs = [actor.ctx.remote() for _ in range(3)]
    got = rayx.get(refs, timeout=60)
    for ref, c in zip(refs, got):
        assert c["actor"] == actor.actor_id and c["mode"] == "WORKER"
        assert c["node"] == _node_with("b")
        assert c["task"] == ref.id[:-2]
    assert len({c["worker"] for c in got}) == 1 and len({c["pid"] for c in got}) == 1
    assert got[0]["worker"] != rayx.api.core().client_id
    rayx.kill(actor)


def test_runtime_context_in_constructors_and_concurrent_actors(three_nodes):
    @rayx.remote(resources={"b": 0.1})
    class Built:
        def __init__(self):
            self.at_init = rayx.get_runtime_context().get_actor_id()

        def at_init_id(self):
            return self.at_init

    @rayx.remote(resources={"b": 0.1}, max_concurrency=2)
    class Threaded:
        def task_id(self):
            return rayx.get_runtime_context().get_task_id()

    @rayx.remote(resources={"b": 0.1})
    class Async:
        async def task_id(self):
            return rayx.get_runtime_context().get_task_id()

    actors = [Built.remote(), Threaded.remote(), Async.remote()]
    try:
        assert rayx.get(actors[0].at_init_id.remote(), timeout=60) == actors[0].actor_id
        for a in actors[1:]:
            ref = a.task_id.remote()
            assert rayx.get(ref, timeout=60) == ref.id[:-2]
    finally:
        for a in actors:
            rayx.kill(a)


def test_leases_a_dead_owner_held_on_another_node_are_released(three_nodes, tmp_path):
    from .test_scheduling import _kill_an_owner_holding_a_lease

    _kill_an_owner_holding_a_lease(tmp_path, {"num_cpus": 0, "resources": {"a": 0.5}},
                                   {"num_cpus": 0, "resources": {"b": 1}}, "b")


def test_a_task_goes_to_the_node_holding_its_large_arguments(three_nodes):
    @rayx.remote(num_cpus=0, resources={"b": 0.5})
    def make():
        return np.ones(2_000_000)  # 16 MB: stored in node b's store

    @rayx.remote(num_cpus=1)
    def use(array, small):
        return rayx.get_runtime_context().get_node_id(), float(array.sum()) + small

    node_b = _node_with("b")
    data = make.remote()
    rayx.wait([data], timeout=30)
    # The driver's own node (the head) has a free CPU, yet each task is leased where its
    # argument lives instead of pulling 16 MB across.
    for i in range(3):
        assert rayx.get(use.remote(data, i), timeout=30) == (node_b, 2_000_000.0 + i)
    # a small argument makes no preference: such tasks may run anywhere
    assert rayx.get(use.remote(np.ones(1), 1), timeout=30)[1] == 2.0


def test_a_ref_made_on_one_node_and_relayed_by_another_is_freed_when_all_let_go(three_nodes):
    @rayx.remote(num_cpus=0, resources={"a": 0.5})
    class Maker:
        def make(self):
            return [rayx.put(np.ones(1_000_000))]  # owned by this actor, in node a's store

    @rayx.remote(num_cpus=0, resources={"b": 0.5})
    def relay(value):
        return value

    store_a = next(n["StoreDir"] for n in rayx.nodes() if "a" in n["Resources"])
    maker = Maker.remote()
    first = rayx.get(maker.make.remote(), timeout=30)
    oid = first[0].id
    second = rayx.get(relay.remote(first), timeout=30)  # node b hands node a's ref back
    del first
    time.sleep(0.5)
    assert oid in os.listdir(store_a)  # the driver still borrows it through `second`
    assert float(rayx.get(second[0], timeout=30).sum()) == 1_000_000.0
    del second
    wait_for(lambda: oid not in os.listdir(store_a), 10, what="the relayed object to be freed")
    rayx.kill(maker)


def test_tls_cluster_over_tcp_moves_tasks_and_objects(tmp_path, monkeypatch):
    """Nodes and driver on TCP listeners (node_ip set) with TLS: task pushes, replies and
    object pulls between nodes all run over TLS."""
    import shutil
    import subprocess

    from rayx import wire

    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a test certificate")
    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=rayx-test", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", key, "-out", cert], check=True, capture_output=True)
    tls = {"tls_cert": cert, "tls_key": key, "tls_ca": cert, "node_ip": "127.0.0.1"}
    for name, value in tls.items():
        monkeypatch.setenv("RAYX_" + name.upper(), value)
    if rayx.is_initialized():
        rayx.shutdown()
    c = Cluster(head_cpus=1, **tls)
    try:
        c.add_node(num_cpus=1, resources={"b": 1})
        c.connect()
        assert rayx.api.core().address.startswith("tcp:127.0.0.1:")
        assert wire._tls_client is not None and wire._tls_server is not None

        @rayx.remote(num_cpus=0, resources={"b": 0.5})
        def make():
            return np.arange(1_000_000, dtype=np.float64)  # 8 MB, in node b's store

        @rayx.remote(num_cpus=1, resources={})
        def total(a):
            return rayx.get_runtime_context().get_node_id(), float(a.sum())

        ref = make.remote()
        assert float(rayx.get(ref, timeout=60).sum()) == 499999500000.0  # pulled to the driver
        head = next(n["NodeID"] for n in rayx.nodes() if "b" not in n["Resources"])
        node, s = rayx.get(total.options(
            scheduling_strategy=rayx.NodeAffinitySchedulingStrategy(node_id=head)).remote(ref),
            timeout=60)
        assert (node, s) == (head, 499999500000.0)  # pulled node to node
    finally:
        c.shutdown()
        wire.configure_tls(rayx.config.load_settings(tls_cert="", tls_key="", tls_ca=""))
