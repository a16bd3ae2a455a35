"""RayxExecutor: a concurrent.futures.Executor whose calls run as rayx tasks.

    submit(fn, *args) -> RayxFuture --a slot is free--> _run_call.remote(spec, fn, *args)
                                   --all slots busy--> pending deque (future PENDING)
    task done, on rayx's thread:
        a value, and the future has no user callbacks -> set_result here, send the next call
        else -> events --> dispatcher thread: set_result / set_exception (user callbacks run
                here), then send what is ready
    sending: while fewer than `window` calls are in flight, pop pending -> RUNNING -> send
    (window = max_workers, or one more when the cluster alone caps the calls below it; for a
     map()'s calls, max_workers times the tasks a worker may have queued, see map_window)
    every task of the executor is in one lease group of max_workers: rayx itself never runs
    more than max_workers of them at once, however many are in flight

User callbacks and task errors run on the dispatcher thread only, never on rayx's own threads;
a plain result skips that thread switch, which on a small machine costs as much as the call.
A call that cannot even be sent (unpicklable) fails at once in the thread that sent it. Each
executor owns its dispatcher, and the local cluster when it started one: the dispatcher shuts
that cluster down when it exits, after the last call.

A call is PENDING while it waits in this executor's queue (cancel() drops it before any task
exists) and RUNNING once its task is sent, as in ProcessPoolExecutor. Top-level ObjectRef
arguments reach `fn` as their values, as for any rayx task.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import itertools
import logging
import queue
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import BrokenExecutor, CancelledError, Executor, Future, InvalidStateError
from concurrent.futures import wait as futures_wait
from typing import Any

import rayx
from rayx import api
from rayx.exceptions import (
    RayxError,
    RayxSystemError,
    TaskCancelledError,
    WorkerCrashedError,
)
from rayx_futures.calls import (
    _REMOTE_CALL,
    _BoundFn,
    _by_reference,
    _call_name,
    _CallSpec,
    _for_map,
    _InitializerFailed,
    _process_chunk,
    _process_items,
    _StoredFn,
    _submit_call,
)

LOGGER = logging.getLogger("concurrent.futures")

_TERMINATE = "terminate"
_KILL = "kill"
_SHUTDOWN_OPERATIONS = (_TERMINATE, _KILL)
_HEALTH_INTERVAL = 1.0  # seconds between cluster checks while calls are in flight
_WINDOW_REFRESH = 5.0  # seconds between looks at the cluster's capacity
_WAKEUP = None


class BrokenRayxExecutor(BrokenExecutor, RayxError):
    """The executor cannot run calls any more: its cluster died or its initializer failed."""


def _in_worker() -> bool:
    return api.worker() is not None


_cpu_lent = api.cpu_lent


class RayxFuture(Future):
    """A concurrent.futures.Future for one call; blocking on it inside a task lends the CPU."""

    def __init__(self) -> None:
        super().__init__()
        self._has_callbacks = False  # read by the dispatcher under self._condition

    def add_done_callback(self, fn: Callable[[Future], object]) -> None:
        with self._condition:
            self._has_callbacks = True
            super().add_done_callback(fn)

    def result(self, timeout: float | None = None) -> Any:
        return super().result(self._wait_lending(timeout))

    def exception(self, timeout: float | None = None) -> BaseException | None:
        return super().exception(self._wait_lending(timeout))

    def _wait_lending(self, timeout: float | None) -> float | None:
        """In a worker, wait here with the CPU lent; returns the timeout left for the base class."""
        if self.done() or not _in_worker():
            return timeout
        with _cpu_lent():
            futures_wait([self], timeout)
        return None if timeout is None else 0


class _WorkItem:
    __slots__ = ("future", "fn", "args", "kwargs", "ref", "of_map", "dropped")

    def __init__(self, future: RayxFuture, fn: Callable, args: tuple, kwargs: dict,
                 of_map: bool = False):
        self.future, self.fn, self.args, self.kwargs = future, fn, args, kwargs
        self.ref: rayx.ObjectRef | None = None
        self.of_map = of_map  # a map()'s call: its future is map's own, never the user's
        self.dropped = False  # its task was cancelled before it started (cancel_unstarted)


_global_shutdown = False
_live_dispatchers: weakref.WeakSet[_Dispatcher] = weakref.WeakSet()
_atexit_lock = threading.Lock()
_atexit_registered = False


def _python_exit() -> None:
    """At interpreter exit, let every executor finish the work it was given, then stop."""
    global _global_shutdown
    _global_shutdown = True
    dispatchers = list(_live_dispatchers)
    for d in dispatchers:
        d.release()
    for d in dispatchers:
        d.join()


def _register_atexit() -> None:
    # Registered after rayx started, so it runs before rayx's own atexit shutdown.
    global _atexit_registered
    with _atexit_lock:
        if not _atexit_registered:
            threading._register_atexit(_python_exit)
            _atexit_registered = True


class _Dispatcher:
    """Owns the calls waiting to be sent, the calls in flight, and the thread that runs both."""

    def __init__(self, max_workers: int, options: dict, spec: _CallSpec, owns_cluster: bool):
        self.max_workers = max_workers
        self.window = max_workers  # calls in flight at most; see refresh_window
        # map()'s calls: enough that each worker finds its next short call queued with it
        # (the submitter pipelines short tasks), so none waits a round trip through this driver
        self.map_window = max_workers * api.core().settings.max_tasks_in_flight_per_worker
        self._window_checked = 0.0
        self.options = options
        self.spec = spec
        self.owns_cluster = owns_cluster
        self.lock = threading.Lock()
        self.pending: collections.deque[_WorkItem] = collections.deque()
        self.running: dict[int, _WorkItem] = {}
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self.closing = False
        self.broken: bool | str = False
        self.force_operation: str | None = None
        self._remotes: dict[str, Any] = {}  # task name -> the remote function with our options
        self.thread = threading.Thread(target=self._loop, name=f"RayxExecutor-{spec.token[:8]}")

    # -- verbs used by the executor (any thread)

    def start(self) -> None:
        _live_dispatchers.add(self)
        self.thread.start()

    def submit(self, item: _WorkItem) -> None:
        """Send the call now if a slot is free and none waits before it, else queue it."""
        with self.lock:
            free = len(self.running) < (self.map_window if item.of_map else self.window)
            direct = free and not self.pending
            if direct:
                item.future.set_running_or_notify_cancel()
                self.running[id(item)] = item
            else:
                self.pending.append(item)
        if not direct:
            if free:  # else the call that frees a slot sends the queue on: no wake-up per call
                self.events.put(_WAKEUP)
            return
        try:
            self._send(item)
        except BaseException as exc:  # KeyboardInterrupt while pickling: the call never left
            with self.lock:
                self.running.pop(id(item), None)
            item.future.set_exception(exc)
            raise

    def release(self) -> None:
        """No more calls will come: finish what is queued and in flight, then exit."""
        self.closing = True
        self.events.put(_WAKEUP)

    def join(self) -> None:
        if self.thread is not threading.current_thread() and self.thread.ident is not None:
            self.thread.join()

    def take_pending(self) -> list[_WorkItem]:
        with self.lock:
            items = list(self.pending)
            self.pending.clear()
        return items

    def inflight(self) -> list[_WorkItem]:
        with self.lock:
            return list(self.running.values())

    def cancel_unstarted(self, futures) -> None:
        """Cancel the tasks of map calls among `futures` that are in flight but that no
        worker has started yet (map sends calls ahead); started ones run to their end."""
        wanted = {id(f) for f in futures if not f.done()}
        if not wanted:
            return
        with self.lock:
            items = [it for it in self.running.values()
                     if it.of_map and id(it.future) in wanted and it.ref is not None]
        for item in items:
            item.dropped = True
            with contextlib.suppress(Exception):
                api.core().cancel(item.ref, force=False, interrupt=False)

    def cancel_inflight(self, force: bool) -> None:
        """Cancel the tasks of the calls in flight; their futures then fail."""
        for item in self.inflight():
            ref = item.ref
            if ref is not None:
                with contextlib.suppress(Exception):
                    rayx.cancel(ref, force=force)

    # -- the dispatcher thread

    def _loop(self) -> None:
        try:
            while True:
                try:
                    event = self.events.get(timeout=_HEALTH_INTERVAL)
                except queue.Empty:
                    self._check_cluster()
                    event = _WAKEUP
                if event is _WAKEUP:
                    pass
                elif event[1] is None:  # a send that failed on a rayx thread: its error is
                    self._send(event[0])  # met again and handled here
                else:
                    self._complete(*event)
                del event  # holds the call's result: keep no reference once it is delivered
                self._send_ready()
                if self._finished():
                    break
        finally:
            self._exit()

    def _finished(self) -> bool:
        with self.lock:
            idle = not self.pending and not self.running
        return idle and (self.closing or _global_shutdown or bool(self.broken))

    def _exit(self) -> None:
        _live_dispatchers.discard(self)
        if self.owns_cluster:
            with contextlib.suppress(Exception):
                rayx.shutdown()

    def refresh_window(self) -> None:
        """Send one call ahead while the cluster alone keeps us from running max_workers.

        When the cluster's resources cannot run more than max_workers of these calls at once,
        one more call is sent, so that the first worker to finish finds the next call already
        queued: ProcessPoolExecutor's one extra queued call, with the same consequence (that
        call is RUNNING and cannot be cancelled). Otherwise max_workers is the limit itself.
        Calls that take no resources are never capped by the cluster.
        """
        now = time.monotonic()
        if now - self._window_checked < _WINDOW_REFRESH:
            return
        self._window_checked = now
        try:
            capacity = _capacity(self.options, unbounded=self.max_workers + 1)
        except Exception:  # the cluster is going away: the health check deals with it
            return
        self.window = self.max_workers + (1 if capacity <= self.max_workers else 0)

    def _send_ready(self, inline: bool = False) -> bool:
        """Send queued calls while the window has room; True if nothing is queued or in
        flight any more."""
        if not inline:
            self.refresh_window()
        while True:
            with self.lock:
                if self.broken or not self.pending:
                    return not self.running and not self.pending
                window = self.map_window if self.pending[0].of_map else self.window
                if len(self.running) >= window:
                    return False
                item = self.pending.popleft()
                if not item.future.set_running_or_notify_cancel():
                    continue
                self.running[id(item)] = item
            self._send(item, inline)

    def _send(self, item: _WorkItem, inline: bool = False) -> None:
        """Submit the call's task. `inline` (on a rayx thread): any failure is left to the
        dispatcher thread, which sends the call again and handles the error there."""
        if inline:
            try:
                ref = _submit_call(self._remote_for, self.spec, item.fn, item.args, item.kwargs)
            except BaseException:
                self.events.put((item, None))
                return
            self._track(item, ref)
            return
        if not rayx.is_initialized():
            self._break("the rayx cluster this executor used was shut down")
            return
        try:
            ref = _submit_call(self._remote_for, self.spec, item.fn, item.args, item.kwargs)
        except (RayxSystemError, ConnectionError) as exc:
            self._break(f"the rayx cluster is unreachable: {exc}", exc)
            return
        except Exception as exc:  # unpicklable call, bad options: only this call fails
            with self.lock:
                self.running.pop(id(item), None)
            item.future.set_exception(exc)
            return
        self._track(item, ref)

    def _track(self, item: _WorkItem, ref: rayx.ObjectRef) -> None:
        item.ref, item.fn, item.args, item.kwargs = ref, None, (), {}
        core = api.core()
        core.when_ready(ref, lambda desc, item=item: self._on_done(item, core, desc))

    def _on_done(self, item: _WorkItem, core, desc: tuple) -> None:
        """On the rayx thread that saw the task finish. A success whose future has no user
        callbacks is delivered here and the next call sent at once, sparing a thread switch
        per call; errors and futures with callbacks go to the dispatcher thread."""
        try:
            box = [core.value(item.ref, desc)]
        except BaseException as exc:
            self.events.put((item, (None, exc)))
            return
        if not self._deliver(item, box):
            self.events.put((item, (box.pop(), None)))
            return
        if self._send_ready(inline=True):  # idle: the dispatcher may be waiting to exit
            self.events.put(_WAKEUP)

    def _deliver(self, item: _WorkItem, box: list) -> bool:
        """Set the future's result from `box` unless it has callbacks (False: not delivered).
        The waiter wakes only once the future's condition is released, and by then this thread
        holds neither the value nor the future: the caller of result() has the only references
        (as map's callers expect, freeing each result when they drop it)."""
        fut = item.future
        with fut._condition:
            if fut._has_callbacks:
                return False
            with self.lock:
                if self.running.pop(id(item), None) is not None:  # else _break has it
                    item.future = None
            item.ref = None
            if not fut.done():  # else already failed by _break
                fut.set_result(box.pop())
            box.clear()
            del fut
        return True

    def _remote_for(self, name: str):
        remote = self._remotes.get(name)
        if remote is None:
            if len(self._remotes) > 256:
                self._remotes.clear()
            remote = self._remotes[name] = _REMOTE_CALL.options(**self.options, name=name)
        return remote

    def _complete(self, item: _WorkItem, outcome: tuple[Any, BaseException | None]) -> None:
        with self.lock:
            self.running.pop(id(item), None)
        item.ref = None
        if item.future.done():  # already failed by _break
            return
        value, exc = outcome
        if exc is None:
            item.future.set_result(value)
        elif item.dropped and isinstance(exc, TaskCancelledError):
            item.future.set_exception(CancelledError())  # as result() of a cancelled future
        else:
            item.future.set_exception(self._translate(exc))

    def _translate(self, exc: BaseException) -> BaseException:
        if isinstance(exc, _InitializerFailed):
            LOGGER.critical("Exception in initializer:\n%s", exc.args[0] if exc.args else exc)
            msg = ("A process in the executor's initializer failed, the executor is not usable "
                   "anymore; fix the initializer or pass initializer=None")
            self._break(msg, exc)
            return _broken_error(msg, exc)
        if isinstance(exc, TaskCancelledError) and self.force_operation is not None:
            return _broken_error(f"the executor was forcefully shut down by "
                                 f"{self.force_operation}_workers() while this call ran", exc)
        if isinstance(exc, (WorkerCrashedError, RayxSystemError)) and not _cluster_alive():
            msg = f"the rayx cluster died while this call ran: {exc}"
            self._break(msg, exc)
            return _broken_error(msg, exc)
        return exc

    def _check_cluster(self) -> None:
        with self.lock:
            busy = bool(self.running)
        if busy and not _cluster_alive():
            self._break("the rayx cluster this executor used died; its calls in flight are lost")

    def _break(self, message: str, cause: BaseException | None = None) -> None:
        """Fail every queued and in-flight call and refuse new ones."""
        with self.lock:
            if self.broken:
                return
            self.broken = message
            items = list(self.pending) + list(self.running.values())
            self.pending.clear()
            self.running.clear()
        for item in items:
            if item.ref is not None:
                with contextlib.suppress(Exception):
                    rayx.cancel(item.ref, force=True)
            fut = item.future
            try:
                if fut.done() or not (fut.running() or fut.set_running_or_notify_cancel()):
                    continue
                fut.set_exception(_broken_error(message, cause))
            except (RuntimeError, InvalidStateError):  # its result was delivered meanwhile
                continue


def _broken_error(message: str, cause: BaseException | None) -> BrokenRayxExecutor:
    err = BrokenRayxExecutor(message)
    err.__cause__ = cause
    return err


def _cluster_alive() -> bool:
    if not rayx.is_initialized():
        return False
    try:
        return any(node["Alive"] for node in rayx.nodes())
    except Exception:
        return False


# --------------------------------------------------------------------------- the executor


class RayxExecutor(Executor):
    """A concurrent.futures.Executor that runs each call as a task on a rayx cluster."""

    def __init__(
        self,
        max_workers: int | None = None,
        *,
        address: str | None = None,
        initializer: Callable[..., object] | None = None,
        initargs: tuple = (),
        max_tasks_per_child: int | None = None,
        num_cpus: float = 1,
        num_gpus: float = 0,
        resources: dict[str, float] | None = None,
    ) -> None:
        _check_arguments(max_workers, initializer, max_tasks_per_child)
        options = {"num_cpus": num_cpus, "num_gpus": num_gpus, "resources": resources}
        if max_tasks_per_child is not None:
            options["max_calls"] = max_tasks_per_child
        _check_options(options)
        token = uuid.uuid4().hex
        owns_cluster = not rayx.is_initialized()
        if owns_cluster:
            rayx.init(address=address)
        try:
            if max_workers is None:
                max_workers = _capacity(options)
            init = None if initializer is None else (rayx.put((initializer, tuple(initargs))),)
        except BaseException:
            if owns_cluster:
                rayx.shutdown()
            raise
        self._max_workers = max_workers
        self._max_tasks_per_child = max_tasks_per_child
        self._shutdown_lock = threading.Lock()
        self._shutdown_thread = False
        options["_lease_group"] = (token, max_workers)  # rayx runs max_workers at most
        self._dispatcher = _Dispatcher(max_workers, options, _CallSpec(token, init),
                                       owns_cluster)
        self._dispatcher.refresh_window()
        _register_atexit()
        self._dispatcher.start()
        weakref.finalize(self, self._dispatcher.release)

    def _for_map(self, fn: Callable, name: str) -> Callable | _BoundFn | _StoredFn:
        return _for_map(fn, name, self._dispatcher.spec, self._dispatcher.options)

    @property
    def _broken(self) -> bool | str:
        return self._dispatcher.broken

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> RayxFuture:
        """Schedule fn(*args, **kwargs) as a rayx task; returns its future at once."""
        return self._submit(fn, args, kwargs, of_map=False)

    def _submit(self, fn: Callable, args: tuple, kwargs: dict, of_map: bool) -> RayxFuture:
        with self._shutdown_lock:
            if self._dispatcher.broken:
                raise BrokenRayxExecutor(self._dispatcher.broken)
            if self._shutdown_thread:
                raise RuntimeError("cannot schedule new futures after shutdown")
            if _global_shutdown:
                raise RuntimeError("cannot schedule new futures after interpreter shutdown")
            future = RayxFuture()
            self._dispatcher.submit(_WorkItem(future, fn, args, kwargs, of_map))
            return future

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
        buffersize: int | None = None,
    ) -> Iterator[Any]:
        """Like map(fn, *iterables), in order; `chunksize` items per task, lazy with buffersize."""
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        if chunksize == 1:
            return _map(self, self._for_map(fn, _call_name(fn)), zip(*iterables, strict=False),
                        timeout, buffersize)
        if len(iterables) == 1:
            chunks, run_chunk = _batched(iterables[0], chunksize), _process_items
        else:
            chunks, run_chunk = _batched(zip(*iterables, strict=False), chunksize), _process_chunk
        call_chunk = self._for_map(functools.partial(run_chunk, _by_reference(fn)),
                                   f"{_call_name(fn)}[chunk]")
        results = _map(self, call_chunk, zip(chunks, strict=False), timeout, buffersize)
        return _chain_from_iterable_of_lists(results)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Refuse new calls; with wait, return once all calls ran (and an owned cluster stopped)."""
        with self._shutdown_lock:
            self._shutdown_thread = True
            if cancel_futures:
                for item in self._dispatcher.take_pending():
                    item.future.cancel()
                self._dispatcher.cancel_unstarted(
                    [it.future for it in self._dispatcher.inflight() if it.future is not None])
            self._dispatcher.release()
        if wait:
            self._dispatcher.join()

    def terminate_workers(self) -> None:
        """Shut down now: drop queued calls and interrupt the tasks in flight (Python 3.14)."""
        self._force_shutdown(operation=_TERMINATE)

    def kill_workers(self) -> None:
        """Shut down now: drop queued calls and kill the workers running calls (Python 3.14)."""
        self._force_shutdown(operation=_KILL)

    def _force_shutdown(self, operation: str) -> None:
        if operation not in _SHUTDOWN_OPERATIONS:
            raise ValueError(f"Unsupported operation: {operation!r}")
        self._dispatcher.force_operation = operation
        self.shutdown(wait=False, cancel_futures=True)
        self._dispatcher.cancel_inflight(force=operation == _KILL)

    # -- used by rayx_joblib

    def _abort(self) -> None:
        """Cancel every queued call and kill the tasks in flight; the executor stays usable."""
        for item in self._dispatcher.take_pending():
            item.future.cancel()
        self._dispatcher.cancel_inflight(force=True)


def _check_arguments(max_workers, initializer, max_tasks_per_child) -> None:
    if max_workers is not None and max_workers <= 0:
        raise ValueError("max_workers must be greater than 0")
    if initializer is not None and not callable(initializer):
        raise TypeError("initializer must be a callable")
    if max_tasks_per_child is not None:
        if not isinstance(max_tasks_per_child, int):
            raise TypeError("max_tasks_per_child must be an integer")
        if max_tasks_per_child <= 0:
            raise ValueError("max_tasks_per_child must be >= 1")


def _check_options(options: dict) -> None:
    """Bad resources fail here, at construction, not on the first call."""
    _REMOTE_CALL.options(**options)


def _capacity(options: dict, unbounded: int | None = None) -> int:
    """How many calls of this shape the whole cluster can run at once (at least 1). A shape
    that takes no resources has no such limit: `unbounded` if given, else the cluster's CPUs
    (the default max_workers)."""
    total = rayx.cluster_resources()
    wanted = {"CPU": options["num_cpus"], "GPU": options["num_gpus"],
              **(options["resources"] or {})}
    fits = [total.get(name, 0.0) / amount for name, amount in wanted.items() if amount]
    if fits:
        return max(1, int(min(fits)))
    return unbounded if unbounded is not None else max(1, int(total.get("CPU", 1)))


def _batched(iterable: Iterable, n: int) -> Iterator[tuple]:
    it = iter(iterable)
    while chunk := tuple(itertools.islice(it, n)):
        yield chunk


def _chain_from_iterable_of_lists(iterable: Iterable[list]) -> Iterator[Any]:
    for element in iterable:
        element.reverse()
        while element:
            yield element.pop()


def _result_or_cancel(fut: Future, timeout: float | None = None) -> Any:
    try:
        try:
            return fut.result(timeout)
        finally:
            fut.cancel()
    finally:
        del fut  # break the cycle through the exception's traceback


def _map(executor: RayxExecutor, fn: Callable, args_iter: Iterator[tuple],
         timeout: float | None, buffersize: int | None) -> Iterator[Any]:
    """Executor.map of Python 3.14: submit now (or `buffersize` ahead), yield in order."""
    if buffersize is not None and not isinstance(buffersize, int):
        raise TypeError("buffersize must be an integer or None")
    if buffersize is not None and buffersize < 1:
        raise ValueError("buffersize must be None or > 0")
    end_time = None if timeout is None else timeout + time.monotonic()

    def submit(ex: RayxExecutor, args: tuple) -> RayxFuture:
        return ex._submit(fn, args, {}, of_map=True)

    if buffersize:
        fs = collections.deque(submit(executor, args)
                               for args in itertools.islice(args_iter, buffersize))
    else:
        fs = collections.deque(submit(executor, args) for args in args_iter)
    executor_ref = weakref.ref(executor)

    def result_iterator() -> Iterator[Any]:
        try:
            fs.reverse()
            while fs:
                if buffersize and (ex := executor_ref()) and (args := next(args_iter, None)):
                    fs.appendleft(submit(ex, args))
                if end_time is None:
                    yield _result_or_cancel(fs.pop())
                else:
                    yield _result_or_cancel(fs.pop(), end_time - time.monotonic())
        finally:
            for future in fs:
                future.cancel()
            if fs and (ex := executor_ref()) is not None:
                ex._dispatcher.cancel_unstarted(fs)  # the calls map sent ahead

    return result_iterator()


__all__ = ["BrokenRayxExecutor", "RayxExecutor", "RayxFuture"]
