"""Start to first result, and idle memory of the whole system, each run in a new interpreter.

The clock starts before the system's package is imported and stops when the result of one
trivial task is in the driver's hands. Idle memory is read after the system has sat idle for
`settle` seconds: PSS of the driver and every process it spawned, plus unmapped shared memory.
"""

from __future__ import annotations

import time

from bench.harness import NCPU, Case, Metric, Runner, Target, Workload, measurements_over
from bench.payloads import one

MB = 1024 * 1024


def _finish(r: Runner, t0: float) -> None:
    r.record("first_result", time.perf_counter() - t0)
    time.sleep(r.p["settle"])
    mem = r.memory()
    r.record("idle_memory", mem["bytes"] / MB)
    r.info["processes"] = mem["procs"]


def rayx_startup(r: Runner) -> None:
    t0 = time.perf_counter()
    import rayx
    from bench.systems import rayx_store_globs

    rayx.init(num_cpus=NCPU)
    try:
        rayx.get(rayx.remote(one).remote())
        r.shm = rayx_store_globs()
        _finish(r, t0)
    finally:
        measurements_over()
        rayx.shutdown()


def ray_startup(r: Runner) -> None:
    t0 = time.perf_counter()
    import ray

    ray.init(num_cpus=NCPU, include_dashboard=False, log_to_driver=False)
    try:
        ray.get(ray.remote(one).remote())
        _finish(r, t0)
    finally:
        measurements_over()
        ray.shutdown()


def dask_startup(r: Runner) -> None:
    t0 = time.perf_counter()
    from bench.systems import dask_local

    with dask_local() as client:
        client.submit(one).result()
        _finish(r, t0)


def loky_startup(r: Runner) -> None:
    t0 = time.perf_counter()
    from bench.systems import loky_executor

    with loky_executor() as ex:
        ex.submit(one).result()
        _finish(r, t0)


def ppe_startup(r: Runner) -> None:
    t0 = time.perf_counter()
    from bench.systems import process_pool

    with process_pool() as ex:
        ex.submit(one).result()
        _finish(r, t0)


WORKLOADS = [
    Workload(
        name="startup",
        title="start to first result, and idle memory (new interpreter each run)",
        metrics=[
            Metric("first_result", "start to first result", "s",
                   targets=(Target("ray", "<=", 0.2, "at most 1/5 of Ray's"),)),
            Metric("idle_memory", "idle memory, whole system", "MB",
                   targets=(Target("ray", "<=", 1 / 3, "at most 1/3 of Ray's"),)),
        ],
        cases=[
            Case("rayx", "rayx_startup", ("rayx",)),
            Case("ray", "ray_startup", ("ray",)),
            Case("dask", "dask_startup", ("distributed",)),
            Case("loky", "loky_startup", ("loky",)),
            Case("ppe", "ppe_startup"),
        ],
        full={"settle": 2.0, "timeout": 120},
        quick={"settle": 1.0, "warmup": 0, "repeats": 2, "timeout": 90},
        fresh=True,
    ),
]
