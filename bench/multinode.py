"""Two node managers on this machine (one CPU each): object transfer bandwidth between them,
and the rate of no-op tasks spread over both.

Transfer: a task on node A makes the array (so it lives in A's store); the clock runs while a
task on node B receives it and reads one float from each page. Dask's two worker processes of a
LocalCluster stand in for its two nodes.
"""

from __future__ import annotations

import time

from bench import limits
from bench.harness import Case, Metric, Runner, Workload, timed
from bench.payloads import make_array, noop, touch

GB = 1e9
STORE = 1024 * 1024 * 1024


def _wait_for(resources, name: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while resources().get(name, 0) < 1:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the second node (resource {name!r}) never joined")
        time.sleep(0.1)


def _native(r: Runner, api, wait_local) -> None:
    """rayx and Ray: the same code through `api` (the rayx or ray module)."""
    _wait_for(api.cluster_resources, "far")
    make = api.remote(make_array).options(resources={"near": 1})
    recv = api.remote(touch).options(resources={"far": 1})
    spread = api.remote(noop).options(scheduling_strategy="SPREAD")
    mb, n = r.p["mb"], r.p["tasks"]

    def transfer():
        ref = make.remote(mb)
        wait_local(ref)
        seconds = timed(lambda: api.get(recv.remote(ref)))
        return mb * 1024 * 1024 / seconds / GB

    def tasks():
        return n / timed(lambda: api.get([spread.remote(i) for i in range(n)]))

    r.measure(lambda: {"transfer": transfer()})
    r.measure(lambda: {"tasks": tasks()})


def rayx_multinode(r: Runner) -> None:
    import rayx
    from bench.systems import rayx_cluster_class, rayx_store_globs

    cluster_class = rayx_cluster_class()
    cluster = cluster_class(head_cpus=1, head_resources={"near": 1}, object_store_memory=STORE)
    try:
        cluster.add_node(num_cpus=1, resources={"far": 1}, object_store_memory=STORE)
        cluster.connect()
        r.shm = rayx_store_globs()
        _native(r, rayx, lambda ref: rayx.wait([ref], timeout=120))
    finally:
        cluster.shutdown()


def ray_multinode(r: Runner) -> None:
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "resources": {"near": 1}, "object_store_memory": STORE})
    try:
        cluster.add_node(num_cpus=1, resources={"far": 1}, object_store_memory=STORE)
        ray.init(address=cluster.address, log_to_driver=False)
        try:
            _native(r, ray, lambda ref: ray.wait([ref], timeout=120, fetch_local=False))
        finally:
            ray.shutdown()
    finally:
        cluster.shutdown()


def dask_multinode(r: Runner) -> None:
    from distributed import wait

    from bench.systems import dask_local

    mb, n = r.p["mb"], r.p["tasks"]
    with dask_local(n_workers=2) as client:
        client.wait_for_workers(2)
        near, far = sorted(client.scheduler_info()["workers"])

        def transfer():
            fut = client.submit(make_array, mb, workers=[near], pure=False)
            wait([fut])
            seconds = timed(lambda: client.submit(touch, fut, workers=[far],
                                                  pure=False).result())
            return mb * 1024 * 1024 / seconds / GB

        def tasks():
            return n / timed(lambda: client.gather(client.map(noop, range(n), pure=False)))

        r.measure(lambda: {"transfer": transfer()})
        r.measure(lambda: {"tasks": tasks()})


def tcp_multinode(r: Runner) -> None:
    nbytes = r.p["mb"] * 1024 * 1024
    r.measure(lambda: {"transfer": nbytes / limits.tcp_transfer(nbytes) / GB})


WORKLOADS = [
    Workload(
        name="multinode",
        title="two node managers with one CPU each",
        metrics=[
            Metric("transfer", "object transfer node to node ({mb} MB)", "GB/s",
                   higher_is_better=True),
            Metric("tasks", "{tasks:,} no-op tasks over both nodes", "tasks/s",
                   higher_is_better=True),
        ],
        cases=[Case("rayx", "rayx_multinode", ("rayx", "numpy")),
               Case("ray", "ray_multinode", ("ray", "numpy")),
               Case("dask", "dask_multinode", ("distributed", "numpy")),
               Case("tcp", "tcp_multinode")],
        full={"mb": 200, "tasks": 5_000},
        quick={"mb": 100, "tasks": 1_000, "repeats": 2},
        notes="tcp is one loopback TCP stream between two processes, the transfer limit here.",
    ),
]
