"""Starting and stopping each system the same way in every workload.

Every system gets one worker per CPU of this machine. Each helper is a context manager that
shuts its system down on the way out, whatever happened inside, and first says the case's
measurements are over (harness.measurements_over), so the next case's process may start.
"""

from __future__ import annotations

import contextlib
import os

from bench.harness import NCPU, Runner, Skip, measurements_over


def rayx_store_globs() -> list[str]:
    """Where a rayx node keeps its objects: unmapped files there are memory too."""
    import rayx

    dirs = []
    try:
        for node in rayx.nodes():
            if node.get("StoreDir"):
                dirs.append(node["StoreDir"])
    except Exception:  # noqa: BLE001 - older cores may lack nodes(); fall back to the pattern
        pass
    return dirs


@contextlib.contextmanager
def rayx_local(r: Runner | None = None, **kwargs):
    import rayx

    rayx.init(num_cpus=NCPU, **kwargs)
    try:
        if r is not None:
            r.shm = rayx_store_globs()
        yield rayx
    finally:
        measurements_over()
        rayx.shutdown()


@contextlib.contextmanager
def ray_local(**kwargs):
    import ray

    ray.init(num_cpus=NCPU, include_dashboard=False, log_to_driver=False, **kwargs)
    try:
        yield ray
    finally:
        measurements_over()
        ray.shutdown()


@contextlib.contextmanager
def dask_local(n_workers: int = NCPU):
    """A distributed LocalCluster: one single-threaded worker process per CPU, and a Client."""
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                           dashboard_address=None)
    try:
        client = Client(cluster)
        try:
            yield client
        finally:
            measurements_over()
            client.close()
    finally:
        measurements_over()
        cluster.close()


@contextlib.contextmanager
def loky_executor():
    import loky

    ex = loky.get_reusable_executor(max_workers=NCPU)
    try:
        yield ex
    finally:
        measurements_over()
        ex.shutdown(wait=True, kill_workers=True)


@contextlib.contextmanager
def process_pool():
    from concurrent.futures import ProcessPoolExecutor

    ex = ProcessPoolExecutor(max_workers=NCPU)
    try:
        yield ex
    finally:
        measurements_over()
        ex.shutdown(wait=True, cancel_futures=True)


@contextlib.contextmanager
def joblib_loky():
    """joblib's own loky backend (the vendored copy); its worker pool is stopped on the way out."""
    import joblib
    from joblib.externals.loky import get_reusable_executor

    try:
        with joblib.parallel_backend("loky", n_jobs=NCPU):
            yield
    finally:
        measurements_over()
        get_reusable_executor().shutdown(wait=True, kill_workers=True)


def joblib_globs() -> list[str]:
    """joblib's memmapping folders of this process (large arguments of the loky backend)."""
    base = os.environ.get("JOBLIB_TEMP_FOLDER", "/dev/shm")
    return [os.path.join(base, f"joblib_memmapping_folder_{os.getpid()}_*")]


def rayx_cluster_class():
    """rayx.cluster_utils.Cluster, or Skip when this rayx cannot start extra node managers."""
    try:
        from rayx.cluster_utils import Cluster
    except ImportError as exc:
        raise Skip("rayx has no rayx.cluster_utils.Cluster (no extra node managers yet)") from exc
    return Cluster
