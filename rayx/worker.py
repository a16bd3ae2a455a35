"""A worker process: runs tasks pushed by owners, or hosts exactly one actor.

    fork server --fork--> main() --register--> node manager (framed socket: liveness, commands,
                                               and the reserve/seal of each stored result)
    owners --("task"|"actor_call"|"cancel"|"get_object")--> listener --> task queue
    main thread: take from queue -> resolve args -> run -> store results -> ("done", ...) to owner

Actors with max_concurrency > 1 run calls on a thread pool; actors with `async def` methods run
them on one event loop thread. When the node manager's connection closes, the worker exits.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import queue
import signal
import sys
import threading
import traceback
from concurrent.futures import ThreadPoolExecutor

from rayx import api, serialization, wire
from rayx.config import load_settings
from rayx.core import CoreClient, listen_address
from rayx.exceptions import RayxTaskError, TaskCancelledError
from rayx.protocol import rayx_pb2 as pb
from rayx.store_files import SocketStoreCalls
from rayx.task_spec import ActorCreation, TaskSpec

# The id of the task or actor call running in this thread or asyncio task (threaded and async
# actors run several at once), for get_runtime_context().
current_task_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "rayx_task_id", default=None)

# Remote functions a worker keeps unpickled, oldest dropped first: a driver that makes a new
# remote function per call (rayx.remote inside a loop) must not grow every worker forever.
FUNCTIONS_KEPT = 256


class Worker:
    """State of one worker process; `run()` is its main loop."""

    def __init__(self, worker_id: str, config: dict):
        self.worker_id = worker_id
        self.config = config
        self.settings = load_settings()
        wire.configure_tls(self.settings)
        self.tasks: queue.SimpleQueue = queue.SimpleQueue()
        self.functions: dict[str, object] = {}
        self.calls: dict[str, int] = {}  # function id -> runs, for max_calls
        self.cancelled: set[str] = set()
        self.current: TaskSpec | None = None
        self.in_user_code = False
        self.actor = None
        self.actor_id = ""
        self.actor_pool: ThreadPoolExecutor | None = None
        self.actor_loop: asyncio.AbstractEventLoop | None = None
        self.output_conn: wire.Connection | None = None  # where printed text goes, if forwarded
        self.cpus_for_lease = 0.0
        self.blocked_depth = 0
        self.listener = wire.Listener(
            listen_address(config["session_dir"], f"w-{worker_id}", self.settings),
            config["token"], self._on_message).start()
        self.core = CoreClient(node_address=config["node_address"],
                               head_address=config["head_address"], token=config["token"],
                               session_dir=config["session_dir"], settings=self.settings,
                               client_id=worker_id, is_driver=False, listener=self.listener)
        self.core.blocked_hook = self._blocked
        api.set_worker_core(self.core, self)
        self.nm = wire.connect(f"unix:{config['nm_socket']}", config["token"],
                               self._on_nm_message,
                               lambda c: exit_worker())
        self.core.node_store = SocketStoreCalls(self.nm, self.settings.node_call_timeout)
        signal.signal(signal.SIGUSR1, self._on_cancel_signal)
        self.nm.send(("register", worker_id, os.getpid(), self.listener.address))

    # ------------------------------------------------------------------ messages

    def _on_message(self, conn: wire.Connection, msg) -> None:
        kind = msg[0]
        if kind == "task":
            self.tasks.put((conn, msg[1]))
        elif kind == "actor_call":
            self._on_actor_call(conn, msg[1])
        elif kind == "cancel":  # ("cancel", task_id[, interrupt: stop it if it already runs])
            self._cancel(msg[1], msg[2] if len(msg) > 2 else True)
        else:
            self.core.handle_request(conn, msg)

    def _on_nm_message(self, conn: wire.Connection, msg) -> None:
        if msg[0] == "store_reply":
            self.core.node_store.reply(msg[1], msg[2])
        elif msg[0] == "create_actor":
            self.tasks.put((conn, msg))
        elif msg[0] == "exit":
            exit_worker()

    def _on_actor_call(self, conn, spec: TaskSpec) -> None:
        if self.actor_loop is not None:
            asyncio.run_coroutine_threadsafe(self._run_async_call(conn, spec), self.actor_loop)
        elif self.actor_pool is not None:
            self.actor_pool.submit(self._execute, conn, spec)
        else:
            self.tasks.put((conn, spec))

    def _cancel(self, task_id: str, interrupt: bool = True) -> None:
        cur = self.current
        running = cur is not None and cur.task_id == task_id
        if running and not interrupt:
            return
        self.cancelled.add(task_id)
        if running and self.in_user_code:
            # to the main thread itself: a process-wide signal taken by another thread would
            # not interrupt a task blocked in a call like time.sleep
            signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR1)

    def _on_cancel_signal(self, signum, frame) -> None:
        cur = self.current
        if cur is not None and cur.task_id in self.cancelled and self.in_user_code:
            raise TaskCancelledError(f"task {cur.name} was cancelled")

    # ------------------------------------------------------------------ execution

    def run(self) -> None:
        while True:
            conn, item = self.tasks.get()
            if isinstance(item, tuple):
                self._create_actor(conn, item)
            else:
                self._execute(conn, item)

    def _execute(self, conn: wire.Connection, spec: TaskSpec) -> None:
        if spec.task_id in self.cancelled:
            self.cancelled.discard(spec.task_id)
            result = _error_descs(spec, TaskCancelledError(f"task {spec.name} was cancelled")), None
        else:
            self.output_conn = conn
            result = self._run(spec)
        try:
            conn.send(_done(spec, *result))
        except ConnectionError:
            pass  # the owner is gone; its objects go with it
        if spec.max_calls and not spec.actor_id:
            self.calls[spec.fn_id] = self.calls.get(spec.fn_id, 0) + 1
            if self.calls[spec.fn_id] >= spec.max_calls:
                self._retire(conn)

    def _retire(self, conn: wire.Connection) -> None:
        """max_calls reached: tell the owner to resend what it queued here, then exit."""
        try:
            conn.send(("retire",))
        except ConnectionError:
            pass
        sys.stdout.flush()
        sys.stderr.flush()
        exit_worker()

    def _run(self, spec: TaskSpec) -> tuple[list, list | None]:
        """Run one task: (result descriptors, refs nested in each result or None)."""
        threaded = self.actor_pool is not None
        if not threaded:
            if not spec.actor_id:  # an actor keeps the environment it was created with
                self._set_env(spec)
            self.current = spec
        token = current_task_id.set(spec.task_id)
        try:
            fn = self._callable(spec)
            args, kwargs = self._resolve(spec)
            self.in_user_code = not threaded
            try:
                if spec.task_id in self.cancelled:  # came while its arguments were loaded
                    raise TaskCancelledError(f"task {spec.name} was cancelled")
                result = fn(*args, **kwargs)
            finally:
                self.in_user_code = False
            return self._store_results(spec, result)
        except TaskCancelledError as exc:
            return _error_descs(spec, exc), None
        except Exception as exc:
            return _error_descs(spec, _task_error(spec, exc)), None
        finally:
            current_task_id.reset(token)
            self.current = None
            self.cancelled.discard(spec.task_id)

    def _callable(self, spec: TaskSpec):
        if spec.actor_id:
            if self.actor is None:
                raise RuntimeError(f"this worker hosts no actor {spec.actor_id}")
            return getattr(self.actor, spec.method)
        fn = self.functions.get(spec.fn_id)
        if fn is None:
            fn = serialization.loads(spec.fn_bytes)
            if len(self.functions) >= FUNCTIONS_KEPT:  # every spec carries its function's
                self.functions.pop(next(iter(self.functions)))  # bytes: a dropped one reloads
            self.functions[spec.fn_id] = fn
        return fn

    def _resolve(self, spec: TaskSpec):
        args = [self._arg(a) for a in spec.args]
        kwargs = {k: self._arg(a) for k, a in spec.kwargs.items()}
        return args, kwargs

    def _arg(self, a):
        if a[0] == "v":
            return self.core.loads(a[1])
        return self.core.materialize(a[1], a[3])

    def _store_results(self, spec: TaskSpec, result) -> tuple[list, list | None]:
        """Serialize and store each result; refs pickled into one are lent to the caller."""
        n = len(spec.return_ids)
        if n == 1:
            values = [result]
        else:
            values = list(result) if isinstance(result, (tuple, list)) else None
            if values is None or len(values) != n:
                raise ValueError(f"task {spec.name} declared num_returns={n} but returned "
                                 f"{type(result).__name__} of length "
                                 f"{len(values) if values is not None else 'n/a'}")
        descs, lent = [], []
        for rid, value in zip(spec.return_ids, values):
            with serialization.collect_refs() as nested:
                so = serialization.serialize(value)
            lent.append(self.core.lend(nested, spec.owner_address) if nested else None)
            descs.append(self.core.store_serialized(rid, so, owner_id=spec.owner_id))
        return descs, (lent if any(lent) else None)

    def _set_env(self, spec: TaskSpec) -> None:
        cpus = spec.resources.get("CPU", 0.0)
        self.cpus_for_lease = cpus
        env = os.environ
        if self.config.get("num_gpus", 0) > 0 or spec.gpu_ids:  # the node's ids -> devices
            devices = self.config["gpu_devices"]
            _set_var(env, "CUDA_VISIBLE_DEVICES", ",".join(devices[i] for i in spec.gpu_ids))
        threads = str(max(1, int(cpus)))
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            _set_var(env, var, threads)

    def forward_output(self, text: str, err: bool) -> None:
        """Send printed text to the owner of the running task, whose terminal shows it."""
        conn = self.output_conn
        if conn is not None:
            try:
                conn.send(("log", text, err))
            except ConnectionError:
                pass

    def _blocked(self, blocked: bool) -> None:
        """Tell the node this worker waits in get(), so its CPU can run the tasks it waits on."""
        if self.actor_pool is not None or self.actor_loop is not None:
            return
        self.blocked_depth += 1 if blocked else -1
        if (blocked and self.blocked_depth == 1) or (not blocked and self.blocked_depth == 0):
            try:
                self.core.node.SetBlocked(pb.BlockedRequest(worker_id=self.worker_id,
                                                            blocked=blocked))
            except Exception:
                pass

    # ------------------------------------------------------------------ actors

    def _create_actor(self, conn: wire.Connection, msg) -> None:
        _, creation_bytes, gpu_ids, resources = msg
        creation: ActorCreation = serialization.loads(creation_bytes)
        spec = TaskSpec(creation.actor_id, creation.class_name, creation.args, creation.kwargs,
                        [], "", "", resources=resources, gpu_ids=gpu_ids)
        self._set_env(spec)
        error = None
        try:
            cls = serialization.loads(creation.cls_bytes)
            args, kwargs = self._resolve(spec)
            self.actor_id = creation.actor_id  # the constructor may ask for it
            self.actor = cls(*args, **kwargs)
        except Exception as exc:
            self.actor_id = ""
            err = _task_error(spec, exc)
            error = _error_descs(spec, err, 1)[0][1]
        if error is None:
            if creation.is_async:
                self._start_loop(creation.max_concurrency)
            elif creation.max_concurrency > 1:
                self.actor_pool = ThreadPoolExecutor(creation.max_concurrency,
                                                     thread_name_prefix="rayx-actor")
        conn.send(("actor_created", creation.actor_id, error))

    def _start_loop(self, max_concurrency: int) -> None:
        loop = asyncio.new_event_loop()
        self._semaphore_limit = max_concurrency
        ready = threading.Event()

        def run():
            asyncio.set_event_loop(loop)
            self._semaphore = asyncio.Semaphore(max_concurrency)
            ready.set()
            loop.run_forever()

        threading.Thread(target=run, name="rayx-actor-loop", daemon=True).start()
        ready.wait()
        self.actor_loop = loop

    async def _run_async_call(self, conn, spec: TaskSpec) -> None:
        async with self._semaphore:
            current_task_id.set(spec.task_id)  # this asyncio task's own context
            try:
                method = getattr(self.actor, spec.method)
                args, kwargs = await asyncio.to_thread(self._resolve, spec)
                result = method(*args, **kwargs)
                if asyncio.iscoroutine(result):
                    result = await result
                done = _done(spec, *self._store_results(spec, result))
            except Exception as exc:
                done = _done(spec, _error_descs(spec, _task_error(spec, exc)), None)
        try:
            conn.send(done)
        except ConnectionError:
            pass


def exit_worker() -> None:
    """End this worker now, and with it what its tasks started: the fork server made the worker
    lead a process group, which its children (loky's workers, subprocesses) join, so SIGTERM to
    the group ends them. loky's resource tracker ignores SIGTERM; it removes its semaphores
    once the others are gone, then exits."""
    try:
        if os.getpgrp() == os.getpid():  # the worker is in the group: SIGTERM may end it first
            os.killpg(os.getpid(), signal.SIGTERM)
    finally:
        os._exit(0)


def _set_var(env, name: str, value: str) -> None:
    """Set an environment variable unless it already holds the value (most tasks of a worker
    ask for what the last one had; reading is cheaper than a putenv)."""
    if env.get(name) != value:
        env[name] = value


def _done(spec: TaskSpec, descs: list, nested: list | None) -> tuple:
    """The message that ends a task; the nested refs only when there are some."""
    if nested is None:
        return ("done", spec.task_id, descs)
    return ("done", spec.task_id, descs, nested)


def _task_error(spec: TaskSpec, exc: BaseException) -> RayxTaskError:
    tb = traceback.format_exc()
    return RayxTaskError(spec.name, tb, exc)


def _error_descs(spec: TaskSpec, err: BaseException, n: int | None = None) -> list:
    try:
        data = serialization.serialize(err, error=True).to_bytes()
    except Exception:  # the exception itself cannot be pickled: keep its text
        text = f"{type(getattr(err, 'cause', err)).__name__}: {err}"
        data = serialization.serialize(RayxTaskError(spec.name, text, None),
                                       error=True).to_bytes()
    return [("e", data)] * (n if n is not None else max(1, len(spec.return_ids)))


class _PrefixWriter:
    """A text stream that prefixes each line with the worker's pid, as Ray does."""

    def __init__(self, stream, prefix: str, forward=None):
        self._stream, self._prefix, self._at_start = stream, prefix, True
        self._forward = forward  # in a multi-node cluster: also send the text to the owner
        self._lock = threading.Lock()

    def write(self, s: str) -> int:
        if not s:
            return 0
        with self._lock:
            out = []
            for line in s.splitlines(keepends=True):
                if self._at_start and not line.startswith("(pid="):  # forwarded: prefixed
                    out.append(self._prefix)
                out.append(line)
                self._at_start = line.endswith("\n")
            text = "".join(out)
            self._stream.write(text)
            self._stream.flush()
        if self._forward is not None:
            self._forward(text, self._stream is sys.__stderr__)
        return len(s)

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name):
        return getattr(self._stream, name)


def main(worker_id: str, config: dict) -> None:
    """Entry point of a forked worker."""
    prefix = f"(pid={os.getpid()}, node={config['node_id'][:8]}) "
    holder: list = []
    forward = (lambda text, err: holder[0].forward_output(text, err)
               if holder else None) if config.get("forward_output") else None
    sys.stdout = _PrefixWriter(sys.__stdout__, prefix, forward)
    sys.stderr = _PrefixWriter(sys.__stderr__, prefix, forward)
    worker = Worker(worker_id, config)
    holder.append(worker)
    worker.run()
