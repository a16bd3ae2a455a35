"""A dask.array and a dask.dataframe computation on each Dask scheduler.

array:     x = random (n, n) in (c, c) chunks; (x + x.T).mean(axis=0)
dataframe: p partitions made in tasks (dd.from_map), rows each; a groupby mean and a filtered sum
"""

from __future__ import annotations

from bench.harness import NCPU, Case, Metric, Runner, Target, Workload, timed
from bench.payloads import make_partition
from bench.systems import dask_local, ray_local, rayx_local


def array_graph(n: int, c: int):
    import dask.array as da

    x = da.random.default_rng(0).random((n, n), chunks=(c, c))
    return ((x + x.T).mean(axis=0),)


def dataframe_graph(parts: int, rows: int):
    import functools

    import dask.dataframe as dd

    df = dd.from_map(functools.partial(make_partition, rows=rows), range(parts))
    return (df.groupby("k").v.mean(), df[df.w > 0.5].v.sum())


def _run(r: Runner, scheduler, **kwargs) -> None:
    import dask

    p = r.p

    def array():
        (y,) = dask.compute(*array_graph(p["n"], p["chunk"]), scheduler=scheduler, **kwargs)
        assert y.shape == (p["n"],)

    def dataframe():
        means, total = dask.compute(*dataframe_graph(p["parts"], p["rows"]),
                                    scheduler=scheduler, **kwargs)
        assert len(means) == 100 and total > 0

    r.measure(lambda: {"array": timed(array), "dataframe": timed(dataframe)})


def rayx_dask(r: Runner) -> None:
    import rayx.dask

    with rayx_local(r):
        _run(r, rayx.dask.get)


def ray_dask(r: Runner) -> None:
    with ray_local():
        from ray.util.dask import ray_dask_get

        _run(r, ray_dask_get)


def distributed_dask(r: Runner) -> None:
    with dask_local() as client:
        _run(r, client)


def threads_dask(r: Runner) -> None:
    _run(r, "threads", num_workers=NCPU)


def processes_dask(r: Runner) -> None:
    _run(r, "processes", num_workers=NCPU)


WORKLOADS = [
    Workload(
        name="dask",
        title="dask.array and dask.dataframe on each Dask scheduler",
        metrics=[
            Metric("array", "dask.array {n}x{n} (x + x.T).mean(0)", "s", targets=(
                Target("ray", "<", 1.0, "faster than ray_dask_get"),
                Target("dask", "<", 1.0, "faster than a LocalCluster"))),
            Metric("dataframe", "dask.dataframe {parts}x{rows:,} rows, groupby", "s", targets=(
                Target("ray", "<", 1.0, "faster than ray_dask_get"),
                Target("dask", "<", 1.0, "faster than a LocalCluster"))),
        ],
        cases=[Case("rayx", "rayx_dask", ("rayx", "dask", "numpy", "pandas")),
               Case("ray", "ray_dask", ("ray", "dask", "numpy", "pandas")),
               Case("dask", "distributed_dask", ("distributed", "numpy", "pandas")),
               Case("threads", "threads_dask", ("dask", "numpy", "pandas")),
               Case("processes", "processes_dask", ("dask", "numpy", "pandas"))],
        full={"n": 10_000, "chunk": 1_000, "parts": 32, "rows": 250_000},
        quick={"n": 2_000, "chunk": 500, "parts": 4, "rows": 50_000, "repeats": 2},
        passes=3,  # its targets are ratios near 1: pool three passes against drift
        notes="dask = a distributed LocalCluster; threads and processes are Dask's local "
              "schedulers.",
    ),
]
