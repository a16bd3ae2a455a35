"""Task throughput (no-op tasks submitted together) and sequential round-trip latency."""

from __future__ import annotations

import time

from bench import limits
from bench.harness import Case, Metric, Runner, Target, Workload, timed
from bench.payloads import noop
from bench.systems import dask_local, loky_executor, process_pool, ray_local, rayx_local

# ---------------------------------------------------------------- many no-op tasks


def _rate(n: int, run) -> dict:
    return {"rate": n / timed(run)}


def rayx_noop(r: Runner) -> None:
    n = r.p["n"]
    with rayx_local(r) as rayx:
        f = rayx.remote(noop)
        r.measure(lambda: _rate(n, lambda: rayx.get([f.remote(i) for i in range(n)])))


def ray_noop(r: Runner) -> None:
    n = r.p["n"]
    with ray_local() as ray:
        f = ray.remote(noop)
        r.measure(lambda: _rate(n, lambda: ray.get([f.remote(i) for i in range(n)])))


def dask_noop(r: Runner) -> None:
    n = r.p["n"]
    with dask_local() as client:
        r.measure(lambda: _rate(
            n, lambda: client.gather(client.map(noop, range(n), pure=False))))


def _executor_noop(r: Runner, ex) -> None:
    n = r.p["n"]

    def run():
        for fut in [ex.submit(noop, i) for i in range(n)]:
            fut.result()

    r.measure(lambda: _rate(n, run))


def loky_noop(r: Runner) -> None:
    with loky_executor() as ex:
        _executor_noop(r, ex)


def ppe_noop(r: Runner) -> None:
    with process_pool() as ex:
        _executor_noop(r, ex)


# ---------------------------------------------------------------- sequential round trips


def latency_stats(samples: list[float]) -> dict:
    s = sorted(samples)
    return {"rtt_median": s[len(s) // 2] * 1e6, "rtt_p99": s[int(0.99 * (len(s) - 1))] * 1e6}


def _round_trips(r: Runner, call) -> None:
    n = r.p["calls"]

    def once():
        out = []
        for i in range(n):
            t = time.perf_counter()
            call(i)
            out.append(time.perf_counter() - t)
        return latency_stats(out)

    r.measure(once)


def rayx_rtt(r: Runner) -> None:
    with rayx_local(r) as rayx:
        f = rayx.remote(noop)
        _round_trips(r, lambda i: rayx.get(f.remote(i)))


def ray_rtt(r: Runner) -> None:
    with ray_local() as ray:
        f = ray.remote(noop)
        _round_trips(r, lambda i: ray.get(f.remote(i)))


def dask_rtt(r: Runner) -> None:
    with dask_local() as client:
        _round_trips(r, lambda i: client.submit(noop, i, pure=False).result())


def loky_rtt(r: Runner) -> None:
    with loky_executor() as ex:
        _round_trips(r, lambda i: ex.submit(noop, i).result())


def ppe_rtt(r: Runner) -> None:
    with process_pool() as ex:
        _round_trips(r, lambda i: ex.submit(noop, i).result())


def pipe_rtt(r: Runner) -> None:
    r.measure(lambda: latency_stats(limits.pipe_round_trips(r.p["calls"])))


EXECUTORS = [Case("loky", "loky_noop", ("loky",)), Case("ppe", "ppe_noop")]

WORKLOADS = [
    Workload(
        name="noop_tasks",
        title="no-op tasks, all submitted, then all results fetched",
        metrics=[Metric("rate", "{n:,} no-op tasks", "tasks/s", higher_is_better=True,
                        targets=(Target("ray", ">=", 2.0, "at least 2x Ray's rate"),))],
        cases=[Case("rayx", "rayx_noop", ("rayx",)), Case("ray", "ray_noop", ("ray",)),
               Case("dask", "dask_noop", ("distributed",)), *EXECUTORS],
        full={"n": 10_000},
        quick={"n": 1_000, "repeats": 2},
    ),
    Workload(
        name="round_trip",
        title="sequential round trip: submit one no-op task, wait for its result; {calls:,} times",
        metrics=[
            Metric("rtt_median", "round trip, median", "us",
                   targets=(Target("ray", "<=", 0.5, "at most 1/2 of Ray's"),)),
            Metric("rtt_p99", "round trip, p99", "us"),
        ],
        cases=[Case("rayx", "rayx_rtt", ("rayx",)), Case("ray", "ray_rtt", ("ray",)),
               Case("dask", "dask_rtt", ("distributed",)), Case("loky", "loky_rtt", ("loky",)),
               Case("ppe", "ppe_rtt"), Case("pipe", "pipe_rtt")],
        full={"calls": 2_000},
        quick={"calls": 200, "repeats": 2},
    ),
]
