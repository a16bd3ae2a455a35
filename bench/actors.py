"""Actor method calls: sequential (wait for each) and pipelined (send all, then wait)."""

from __future__ import annotations

from bench import limits
from bench.harness import Case, Metric, Runner, Target, Workload, timed
from bench.payloads import Counter
from bench.systems import dask_local, ray_local, rayx_local


def _measure(r: Runner, sequential, pipelined) -> None:
    n = r.p["calls"]
    r.measure(lambda: {"seq_rate": n / timed(lambda: sequential(n)),
                       "pipe_rate": n / timed(lambda: pipelined(n))})


def rayx_actor(r: Runner) -> None:
    with rayx_local(r) as rayx:
        a = rayx.remote(Counter).remote()
        rayx.get(a.inc.remote())

        def sequential(n):
            for _ in range(n):
                rayx.get(a.inc.remote())

        _measure(r, sequential, lambda n: rayx.get([a.inc.remote() for _ in range(n)]))


def ray_actor(r: Runner) -> None:
    with ray_local() as ray:
        a = ray.remote(Counter).remote()
        ray.get(a.inc.remote())

        def sequential(n):
            for _ in range(n):
                ray.get(a.inc.remote())

        _measure(r, sequential, lambda n: ray.get([a.inc.remote() for _ in range(n)]))


def dask_actor(r: Runner) -> None:
    with dask_local() as client:
        a = client.submit(Counter, actor=True).result()
        a.inc().result()

        def sequential(n):
            for _ in range(n):
                a.inc().result()

        def pipelined(n):
            for fut in [a.inc() for _ in range(n)]:
                fut.result()

        _measure(r, sequential, pipelined)


def pipe_actor(r: Runner) -> None:
    n = r.p["calls"]
    r.measure(lambda: {"seq_rate": n / sum(limits.pipe_round_trips(n)),
                       "pipe_rate": n / limits.pipe_pipelined(n)})


WORKLOADS = [
    Workload(
        name="actor_calls",
        title="{calls:,} calls to one actor's method",
        metrics=[
            Metric("seq_rate", "actor calls, sequential", "calls/s", higher_is_better=True,
                   targets=(Target("ray", ">=", 2.0, "at least 2x Ray's rate"),)),
            Metric("pipe_rate", "actor calls, pipelined", "calls/s", higher_is_better=True,
                   targets=(Target("ray", ">=", 2.0, "at least 2x Ray's rate"),)),
        ],
        cases=[Case("rayx", "rayx_actor", ("rayx",)), Case("ray", "ray_actor", ("ray",)),
               Case("dask", "dask_actor", ("distributed",)), Case("pipe", "pipe_actor")],
        full={"calls": 5_000},
        quick={"calls": 500, "repeats": 2},
    ),
]
