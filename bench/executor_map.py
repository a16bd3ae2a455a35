"""`Executor.map` over many small items, one item per call and with a chunksize."""

from __future__ import annotations

from bench.harness import NCPU, Case, Metric, Runner, Target, Workload, measurements_over, timed
from bench.payloads import square
from bench.systems import dask_local, loky_executor, process_pool, ray_local, rayx_local

MIN_ROUND = 0.25  # seconds: a round repeats its map until it has run this long


def _measure(r: Runner, plain, chunked) -> None:
    """`plain(items)` / `chunked(items, chunksize)` map `square` and return the results.
    A chunked map of 10,000 items takes a few milliseconds on the fast systems, where one
    scheduling hiccup is a third of the time: each round repeats its map until MIN_ROUND
    seconds have passed (a slow system's round is one map) and reports the mean rate."""
    n, c = r.p["items"], r.p["chunksize"]
    items = range(n)
    expected = sum(x * x for x in items)

    def run(fn):
        def go():
            assert sum(fn()) == expected

        maps, spent = 0, 0.0
        while spent < MIN_ROUND:
            spent += timed(go)
            maps += 1
        return n * maps / spent

    r.measure(lambda: {"plain": run(lambda: plain(items)),
                       "chunked": run(lambda: chunked(items, c))})


def _executor(r: Runner, ex) -> None:
    _measure(r, lambda items: list(ex.map(square, items)),
             lambda items, c: list(ex.map(square, items, chunksize=c)))


def rayx_map(r: Runner) -> None:
    from rayx_futures import RayxExecutor

    with rayx_local(r), RayxExecutor(max_workers=NCPU) as ex:
        _executor(r, ex)


def ppe_map(r: Runner) -> None:
    with process_pool() as ex:
        _executor(r, ex)


def loky_map(r: Runner) -> None:
    with loky_executor() as ex:
        _executor(r, ex)


def dask_map(r: Runner) -> None:
    """distributed's ClientExecutor; its map ignores chunksize."""
    with dask_local() as client:
        with client.get_executor() as ex:
            _executor(r, ex)


def ray_map(r: Runner) -> None:
    """Ray has no concurrent.futures Executor; ray.util.multiprocessing.Pool.map is its map."""
    with ray_local():
        from ray.util.multiprocessing import Pool

        pool = Pool(processes=NCPU)
        try:
            _measure(r, lambda items: pool.map(square, items, chunksize=1),
                     lambda items, c: pool.map(square, items, chunksize=c))
        finally:
            measurements_over()
            pool.terminate()


WORKLOADS = [
    Workload(
        name="executor_map",
        title="Executor.map(square, range({items:,})), one item per call and chunked",
        metrics=[
            Metric("plain", "map, one item per call", "items/s", higher_is_better=True),
            Metric("chunked", "map, chunksize={chunksize}", "items/s", higher_is_better=True,
                   targets=(Target("ppe", ">=", 1.0, "no slower than ProcessPoolExecutor"),)),
        ],
        cases=[Case("rayx", "rayx_map", ("rayx", "rayx_futures")),
               Case("ray", "ray_map", ("ray",)),
               Case("dask", "dask_map", ("distributed",)),
               Case("loky", "loky_map", ("loky",)),
               Case("ppe", "ppe_map")],
        full={"items": 10_000, "chunksize": 250},
        quick={"items": 200, "chunksize": 20, "repeats": 2},
        passes=3,  # its target is a ratio near 1: pool three passes against drift
        notes="ray is ray.util.multiprocessing.Pool.map (Ray has no Executor); "
              "Dask's ClientExecutor ignores chunksize. Each round repeats its map until "
              "0.25 s have passed and reports the mean rate.",
    ),
]
