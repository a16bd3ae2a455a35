"""The 'rayx' joblib backend: each batch of a Parallel call runs as a rayx task.

    Parallel --batch--> RayxBackend.submit --pickle, large arrays/frames swapped for refs-->
        RayxExecutor.submit(_run_batch, payload, *refs)   (n_jobs caps the calls in flight)
    worker: _run_batch gets the refs resolved (zero-copy views), unpickles, runs the batch
    result --> RayxFuture --done callback--> joblib's BatchCompletionCallBack

Large arguments go into the object store once per Parallel call, whichever batch first needs
them, and every later batch of that call passes the same reference. Inside a worker, the
backend lends its task's CPU back while the Parallel call waits for its batches, so nested
Parallel calls neither deadlock nor oversubscribe the node.
"""

from __future__ import annotations

import contextlib
import io
import pickle
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import cloudpickle
from joblib._parallel_backends import (
    AutoBatchingMixin,
    FallbackToBackend,
    ParallelBackendBase,
    SequentialBackend,
)

import rayx
from rayx_futures.executor import RayxExecutor, RayxFuture, _cpu_lent

# Arrays and frames from this size on are shared via the store, once per Parallel call. It is
# the inline limit of task arguments: a batch holding one would go through the store anyway,
# once per batch.
LARGE_ARGUMENT_BYTES = 100 * 1024


# --------------------------------------------------------------------------- worker side


_unpickling = threading.local()  # .shared: the resolved large arguments of the batch being loaded


def _shared_argument(slot: int) -> Any:
    """Unpickles to the large argument the driver took out of the batch at `slot`."""
    return _unpickling.shared[slot]


def _run_batch(payload: bytes, *shared: Any) -> list:
    outer = getattr(_unpickling, "shared", ())
    _unpickling.shared = shared
    try:
        batch = pickle.loads(payload)
    finally:
        _unpickling.shared = outer
    return batch()


# --------------------------------------------------------------------------- driver side


_KIND_BY_TYPE: dict[type, str] = {}  # type -> "ndarray" | "pandas" | "sparse" | ""


def _kind(cls: type) -> str:
    """Which sizing rule applies to instances of cls; computed once per type."""
    kind = _KIND_BY_TYPE.get(cls)
    if kind is None:
        np, pd = sys.modules.get("numpy"), sys.modules.get("pandas")
        sparse = sys.modules.get("scipy.sparse")
        if np is not None and issubclass(cls, np.ndarray):
            kind = "ndarray"
        elif pd is not None and issubclass(cls, (pd.DataFrame, pd.Series, pd.Index)):
            kind = "pandas"
        elif sparse is not None and issubclass(cls, _sparse_bases(sparse)):
            kind = "sparse"
        else:
            kind = ""
        _KIND_BY_TYPE[cls] = kind
    return kind


def _sparse_bases(sparse: Any) -> tuple[type, ...]:
    return tuple(b for b in (getattr(sparse, "spmatrix", None), getattr(sparse, "sparray", None))
                 if isinstance(b, type))


def _nbytes(obj: Any) -> int:
    """Size of numpy arrays, pandas objects and scipy sparse matrices; 0 for anything else."""
    kind = _kind(type(obj))
    if kind == "ndarray":
        return obj.nbytes
    if kind == "pandas":
        usage = obj.memory_usage(index=True, deep=False)
        return int(usage.sum()) if hasattr(usage, "sum") else int(usage)
    if kind == "sparse":
        return sum(getattr(obj, a).nbytes for a in ("data", "indices", "indptr")
                   if hasattr(obj, a))
    return 0


class _SharingPickler(cloudpickle.Pickler):
    """Pickles a batch, swapping each large argument for its index in the task's arguments.

    A reducer_override, not a persistent_id: pickle calls the latter for every object of the
    batch (thousands for a scikit-learn fit), the former only for non-builtin types."""

    def __init__(self, file: io.BytesIO, share: Callable[[Any], int | None]):
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self._share = share

    def reducer_override(self, obj: Any) -> Any:
        if _kind(type(obj)):
            slot = self._share(obj)
            if slot is not None:
                return _shared_argument, (slot,)
        return super().reducer_override(obj)


class _SharedArguments:
    """The object-store copies of one Parallel call's large arguments, by identity."""

    def __init__(self, threshold: int):
        self.threshold = threshold
        self._lock = threading.Lock()
        self._refs: dict[int, tuple[Any, rayx.ObjectRef]] = {}  # id -> (the object, its ref)

    def ref_for(self, obj: Any) -> rayx.ObjectRef:
        with self._lock:
            entry = self._refs.get(id(obj))
            if entry is None:  # holding obj keeps its id from being reused during the call
                entry = self._refs[id(obj)] = (obj, rayx.put(obj))
            return entry[1]

    def encode(self, batch: Any) -> tuple[bytes, list[rayx.ObjectRef]]:
        """Pickle a batch; returns the bytes and the refs its task must take as arguments."""
        refs: list[rayx.ObjectRef] = []
        slots: dict[int, int] = {}

        def share(obj: Any) -> int | None:
            slot = slots.get(id(obj))
            if slot is None:
                if _nbytes(obj) < self.threshold:
                    return None
                slot = slots[id(obj)] = len(refs)
                refs.append(self.ref_for(obj))
            return slot

        buffer = io.BytesIO()
        _SharingPickler(buffer, share).dump(batch)
        return buffer.getvalue(), refs

    def clear(self) -> None:
        with self._lock:
            self._refs.clear()


class RayxBackend(AutoBatchingMixin, ParallelBackendBase):
    """joblib backend running batches as rayx tasks; n_jobs=-1 means all CPUs of the cluster."""

    supports_retrieve_callback = True
    supports_return_generator = True
    supports_timeout = True
    supports_inner_max_num_threads = False
    supports_sharedmem = False
    uses_threads = False
    default_n_jobs = -1

    def __init__(
        self,
        nesting_level: int | None = None,
        inner_max_num_threads: int | None = None,
        *,
        address: str | None = None,
        num_cpus: float = 1,
        num_gpus: float = 0,
        resources: dict[str, float] | None = None,
        large_argument_bytes: int = LARGE_ARGUMENT_BYTES,
        **backend_kwargs: Any,
    ) -> None:
        super().__init__(nesting_level=nesting_level,
                         inner_max_num_threads=inner_max_num_threads, **backend_kwargs)
        self._options = {"address": address, "num_cpus": num_cpus, "num_gpus": num_gpus,
                         "resources": resources, "large_argument_bytes": large_argument_bytes}
        self._executor: RayxExecutor | None = None
        self._shared = _SharedArguments(large_argument_bytes)

    def __reduce__(self):
        # Only the settings travel (to nested Parallel calls in workers), never the executor.
        return (_rebuild_backend, (self.nesting_level, self._options))

    def effective_n_jobs(self, n_jobs: int | None) -> int:
        """n_jobs as given; negative counts back from the cluster's CPUs (-1: all of them)."""
        if n_jobs == 0:
            raise ValueError("n_jobs == 0 in Parallel has no meaning")
        if n_jobs is None:
            n_jobs = self.default_n_jobs
        if n_jobs < 0:
            n_jobs = max(_cluster_cpus(self._options["address"]) + 1 + n_jobs, 1)
        return n_jobs

    def configure(self, n_jobs: int | None = 1, parallel: Any = None, prefer: Any = None,
                  require: Any = None, **backend_kwargs: Any) -> int:
        """Size this Parallel call: n_jobs caps how many of its batches run at once."""
        n_jobs = self.effective_n_jobs(n_jobs)
        if n_jobs == 1:
            raise FallbackToBackend(SequentialBackend(nesting_level=self.nesting_level))
        self.parallel = parallel
        _ensure_cluster(self._options["address"])  # joined, never owned by the executor
        if self._executor is not None and self._executor._max_workers != n_jobs:
            self._stop_executor()
        if self._executor is None:
            self._executor = RayxExecutor(
                max_workers=n_jobs, num_cpus=self._options["num_cpus"],
                num_gpus=self._options["num_gpus"], resources=self._options["resources"])
        return n_jobs

    def start_call(self) -> None:
        self._shared.clear()

    def stop_call(self) -> None:
        self._shared.clear()  # drops this call's store copies of large arguments

    def submit(self, func: Callable, callback: Callable | None = None) -> RayxFuture:
        """Run one batch as a task; its large arguments travel as object references."""
        payload, refs = self._shared.encode(func)
        future = self._executor.submit(_run_batch, payload, *refs)
        if callback is not None:
            future.add_done_callback(callback)
        return future

    def retrieve_result_callback(self, out: RayxFuture) -> list:
        return out.result()

    def abort_everything(self, ensure_ready: bool = True) -> None:
        """Cancel the batches not started and kill the tasks running (joblib stops on errors)."""
        if self._executor is not None:
            self._executor._abort()
            if not ensure_ready:
                self._stop_executor()

    def terminate(self) -> None:
        self._stop_executor()
        self.reset_batch_stats()

    def get_nested_backend(self) -> tuple[RayxBackend, None]:
        return RayxBackend(nesting_level=(self.nesting_level or 0) + 1, **self._options), None

    @contextlib.contextmanager
    def retrieval_context(self) -> Iterator[None]:
        """While Parallel waits for its batches inside a task, that task's CPU is lent back."""
        with _cpu_lent():
            yield

    def _stop_executor(self) -> None:
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)


def _rebuild_backend(nesting_level: int | None, options: dict) -> RayxBackend:
    return RayxBackend(nesting_level=nesting_level, **options)


def _ensure_cluster(address: str | None) -> None:
    """Join the running cluster, or start a local one that lives as long as this process."""
    if not rayx.is_initialized():
        rayx.init(address=address)


def _cluster_cpus(address: str | None) -> int:
    _ensure_cluster(address)
    return int(rayx.cluster_resources().get("CPU", 1))


__all__ = ["LARGE_ARGUMENT_BYTES", "RayxBackend"]
