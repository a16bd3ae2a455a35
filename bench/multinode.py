"""Two node managers (one CPU each): object transfer bandwidth between them, for a 100-200 MiB
object and for a 1 GB one, and the rate of no-op tasks spread over both.

Transfer: a task on node A makes the array (so it lives in A's store) and the clock starts once
it is there; it stops when a no-op task on node B, which got the array as its argument, returns.
B's runtime fetches the whole object before the task runs, so the span is the transfer plus one
small task round trip (about a millisecond). Pages are not touched afterwards: that would time
page faults, not the network. Dask's two worker processes of a LocalCluster stand in for its
two nodes. Bandwidth is in GB/s with GB = 1e9 bytes; sizes are given in MiB (2**20 bytes),
as bench.payloads.make_array takes them, and converted exactly.
"""

from __future__ import annotations

import time

from bench import limits
from bench.harness import Case, Metric, Runner, Target, Workload, measurements_over, timed
from bench.payloads import make_array, noop

GB = 1e9  # bytes
MIB = 1024 * 1024  # bytes; make_array(n) makes exactly n * MIB bytes of float64
STORE = 3 * 1024 * 1024 * 1024  # room for the 1 GB object and the next one while it is freed


def _wait_for(resources, name: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while resources().get(name, 0) < 1:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the second node (resource {name!r}) never joined")
        time.sleep(0.1)


def _gbps(mib: int, seconds: float) -> float:
    return mib * MIB / seconds / GB


def _native(r: Runner, api, wait_local) -> None:
    """rayx and Ray: the same code through `api` (the rayx or ray module)."""
    _wait_for(api.cluster_resources, "far")
    make = api.remote(make_array).options(resources={"near": 1})
    recv = api.remote(noop).options(resources={"far": 1})
    spread = api.remote(noop).options(scheduling_strategy="SPREAD")
    n = r.p["tasks"]

    def transfer(mib: int) -> float:
        ref = make.remote(mib)
        wait_local(ref)  # made and sealed in node A's store before the clock starts
        seconds = timed(lambda: api.get(recv.remote(ref)))
        return _gbps(mib, seconds)  # ref goes with this frame: freed before the next

    def tasks():
        return n / timed(lambda: api.get([spread.remote(i) for i in range(n)]))

    r.measure(lambda: {"transfer": transfer(r.p["mib"])})
    _measure_big(r, lambda: {"transfer_1gb": transfer(r.p["big_mib"])})
    r.measure(lambda: {"tasks": tasks()})


def _measure_big(r: Runner, once) -> None:
    """The 1 GB transfer: with --quick a single round and no warm-up (the smaller transfer
    before it has warmed the path), since it is the slowest part of the quick run."""
    r.measure(once, warmup=r.p.get("big_warmup"), repeats=r.p.get("big_repeats"))


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
        measurements_over()
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
            measurements_over()
            ray.shutdown()
    finally:
        measurements_over()
        cluster.shutdown()


def dask_multinode(r: Runner) -> None:
    from distributed import wait

    from bench.systems import dask_local

    n = r.p["tasks"]
    with dask_local(n_workers=2) as client:
        client.wait_for_workers(2)
        near, far = sorted(client.scheduler_info()["workers"])

        def transfer(mib: int) -> float:
            fut = client.submit(make_array, mib, workers=[near], pure=False)
            wait([fut])
            seconds = timed(lambda: client.submit(noop, fut, workers=[far],
                                                  pure=False).result())
            return _gbps(mib, seconds)

        def tasks():
            return n / timed(lambda: client.gather(client.map(noop, range(n), pure=False)))

        r.measure(lambda: {"transfer": transfer(r.p["mib"])})
        _measure_big(r, lambda: {"transfer_1gb": transfer(r.p["big_mib"])})
        r.measure(lambda: {"tasks": tasks()})


def tcp_multinode(r: Runner) -> None:
    r.measure(lambda: {"transfer": _gbps(r.p["mib"], limits.tcp_transfer(r.p["mib"] * MIB))})
    _measure_big(r, lambda: {"transfer_1gb": _gbps(r.p["big_mib"],
                                                 limits.tcp_transfer(r.p["big_mib"] * MIB))})


WORKLOADS = [
    Workload(
        name="multinode",
        title="two node managers with one CPU each",
        metrics=[
            Metric("transfer", "object transfer node to node ({mib} MiB)", "GB/s",
                   higher_is_better=True),
            Metric("transfer_1gb", "1 GB object node to node ({big_mib} MiB)", "GB/s",
                   higher_is_better=True,
                   targets=(Target(None, ">=", 0.5, "at least 500 MB/s"),)),
            Metric("tasks", "{tasks:,} no-op tasks over both nodes", "tasks/s",
                   higher_is_better=True),
        ],
        cases=[Case("rayx", "rayx_multinode", ("rayx", "numpy")),
               Case("ray", "ray_multinode", ("ray", "numpy")),
               Case("dask", "dask_multinode", ("distributed", "numpy")),
               Case("tcp", "tcp_multinode")],
        full={"mib": 200, "big_mib": 954, "tasks": 5_000},  # 954 MiB = 1.0003 GB
        quick={"mib": 50, "big_mib": 954, "big_warmup": 0, "big_repeats": 1, "tasks": 500,
               "repeats": 2},
        notes="GB = 1e9 bytes. tcp is one loopback TCP stream between two processes, the "
              "transfer limit here.",
    ),
]
