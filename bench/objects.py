"""A 200 MB numpy array: put it, get it back, and pass it to 20 tasks (time and peak memory).

Each task reads one float from every 4 KiB page of the array, so a zero-copy view still pays
for mapping the pages. Peak memory is the largest whole-system figure (PSS of the driver and
all its processes, plus unmapped shared memory) seen while one round runs; the driver's own
copy of the array is part of every system's figure.
"""

from __future__ import annotations

import time

from bench import limits
from bench.harness import Case, Metric, Runner, Target, Workload, timed
from bench.payloads import make_array, touch
from bench.systems import (
    dask_local,
    joblib_globs,
    joblib_loky,
    process_pool,
    ray_local,
    rayx_local,
)


def _settle() -> None:
    time.sleep(1.0)  # let asynchronous frees of the previous round land before measuring memory


def _store_case(r: Runner, put, get, pass_to_tasks) -> None:
    """put/get/pass for systems with an object store (rayx, Ray, Dask)."""
    arr = make_array(r.p["mb"])
    k = r.p["tasks"]

    def put_get():
        t0 = time.perf_counter()
        ref = put(arr)
        t1 = time.perf_counter()
        value = get(ref)
        t2 = time.perf_counter()
        assert value.nbytes == arr.nbytes
        del value, ref
        return t1 - t0, t2 - t1

    def once():
        put_s, get_s = put_get()
        return {"put_s": put_s, "get_ms": get_s * 1e3,
                "pass_s": timed(lambda: pass_to_tasks(arr, k))}

    r.measure(once)
    _settle()
    r.peak_memory(put_get, "putget_peak")
    _settle()
    r.peak_memory(lambda: pass_to_tasks(arr, k), "pass_peak")


def _native(r: Runner, api) -> None:
    """rayx and Ray: the same code through `api` (the rayx or ray module)."""
    f = api.remote(touch)

    def pass_to_tasks(arr, k):
        ref = api.put(arr)
        api.get([f.remote(ref) for _ in range(k)])

    _store_case(r, api.put, api.get, pass_to_tasks)


def rayx_objects(r: Runner) -> None:
    with rayx_local(r) as rayx:
        _native(r, rayx)


def ray_objects(r: Runner) -> None:
    with ray_local() as ray:
        _native(r, ray)


def dask_objects(r: Runner) -> None:
    with dask_local() as client:
        def put(arr):
            return client.scatter(arr, hash=False)

        def pass_to_tasks(arr, k):
            fut = put(arr)
            client.gather([client.submit(touch, fut, pure=False) for _ in range(k)])

        _store_case(r, put, lambda fut: fut.result(), pass_to_tasks)


def _pass_only(r: Runner, pass_to_tasks) -> None:
    arr = make_array(r.p["mb"])
    k = r.p["tasks"]
    r.measure(lambda: {"pass_s": timed(lambda: pass_to_tasks(arr, k))})
    _settle()
    r.peak_memory(lambda: pass_to_tasks(arr, k), "pass_peak")


def loky_objects(r: Runner) -> None:
    """joblib's loky backend: large arrays are memmapped through /dev/shm automatically."""
    import joblib

    r.shm = joblib_globs()
    with joblib_loky():
        _pass_only(r, lambda arr, k: joblib.Parallel()(
            joblib.delayed(touch)(arr) for _ in range(k)))


def ppe_objects(r: Runner) -> None:
    """ProcessPoolExecutor pickles the array into every task."""
    with process_pool() as ex:
        _pass_only(r, lambda arr, k: [f.result() for f in [ex.submit(touch, arr)
                                                          for _ in range(k)]])


def numpy_objects(r: Runner) -> None:
    arr = make_array(r.p["mb"])
    dst = arr.copy()
    r.measure(lambda: {"put_s": limits.numpy_copy(arr, dst)})


def shm_objects(r: Runner) -> None:
    arr = make_array(r.p["mb"])
    r.measure(lambda: {"put_s": limits.shm_copy(arr)})


WORKLOADS = [
    Workload(
        name="objects",
        title="a {mb} MB float64 array: put, get, and passed to {tasks} tasks",
        metrics=[
            Metric("put_s", "put {mb} MB", "s", targets=(
                Target("numpy", "<=", 2.0, "near memcpy speed (within 2x of a numpy copy)"),)),
            Metric("get_ms", "get {mb} MB", "ms", targets=(
                Target(None, "<=", 1.0, "constant time (under 1 ms)"),)),
            Metric("putget_peak", "put + get, peak memory", "MB"),
            Metric("pass_s", "put + pass to {tasks} tasks", "s"),
            Metric("pass_peak", "pass to {tasks} tasks, peak memory", "MB"),
        ],
        cases=[Case("rayx", "rayx_objects", ("rayx", "numpy")),
               Case("ray", "ray_objects", ("ray", "numpy")),
               Case("dask", "dask_objects", ("distributed", "numpy")),
               Case("loky", "loky_objects", ("joblib", "numpy")),
               Case("ppe", "ppe_objects", ("numpy",)),
               Case("numpy", "numpy_objects", ("numpy",)),
               Case("shm", "shm_objects", ("numpy",))],
        full={"mb": 200, "tasks": 20},
        quick={"mb": 50, "tasks": 6, "repeats": 2},
        notes="loky is joblib.Parallel(backend='loky'), which memmaps large arrays; "
              "ppe pickles the array into each of the tasks. numpy is np.copyto into memory "
              "already touched (memcpy bandwidth); shm is a write() into a new /dev/shm file "
              "(page allocation included): the floors for a put.",
    ),
]
