"""The native API's state: the process's one CoreClient and the local cluster it may own.

    rayx.init() -> new session -> node process (head + node manager) -> CoreClient
    rayx.shutdown() / interpreter exit -> close CoreClient -> stop node process
In a worker, the worker sets its own CoreClient here (set_worker_core) and init() is a no-op.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from rayx import cluster, rpc, serialization, wire
from rayx.config import OPTIONAL_PREIMPORTS, Settings, load_settings
from rayx.core import CoreClient
from rayx.exceptions import InvalidOptionError, RayxError
from rayx.object_ref import ObjectRef
from rayx.protocol import rayx_pb2 as pb
from rayx.scheduler import validate_resources

_lock = threading.RLock()
_core: CoreClient | None = None
_node: cluster.NodeProcess | None = None
_worker = None  # the Worker object, in worker processes
_private_dir: str | None = None  # a connected driver's socket directory


@dataclass(slots=True)
class ClusterInfo:
    """What init() returns: where the cluster is and how to reach it."""

    address: str
    session_dir: str
    node_id: str


def init(address: str | None = None, *, num_cpus: float | None = None,
         num_gpus: int | None = None, resources: dict | None = None,
         object_store_memory: int | None = None, ignore_reinit_error: bool = False,
         token: str | None = None, _settings: Settings | None = None,
         **settings) -> ClusterInfo:
    """Start a local cluster (no address) or connect to one ("HOST:PORT" or "auto")."""
    global _core, _node, _private_dir
    with _lock:
        if _core is not None:
            if _worker is not None or ignore_reinit_error:
                return _info()
            raise RuntimeError("rayx.init() was already called; call rayx.shutdown() first, "
                               "or pass ignore_reinit_error=True")
        _check_settings(settings)
        conf = _settings or load_settings(**settings)
        wire.configure_tls(conf)
        if address is None and os.environ.get("RAYX_ADDRESS"):
            address = os.environ["RAYX_ADDRESS"]
        if address is not None:
            from rayx.connect import connect_driver
            _core, _private_dir = connect_driver(address, conf, token)
        else:
            _core, _node = _start_local(conf, num_cpus, num_gpus, resources,
                                        object_store_memory)
        _start_job(_core)
        return _info()


def _start_local(conf: Settings, num_cpus, num_gpus, resources, object_store_memory):
    _check_init_args(num_cpus, num_gpus, resources, object_store_memory)
    table, gpus = cluster.node_resources(num_cpus, num_gpus, resources)
    store = object_store_memory or cluster.default_store_memory(conf)
    session = cluster.new_session(conf)
    preimport = [name for name in OPTIONAL_PREIMPORTS if name in sys.modules]  # what we use
    node = cluster.start_node(session, conf, head=True, resources=table, num_gpus=gpus,
                              object_store_memory=store, driver_pid=os.getpid(),
                              extra={"preimport": preimport})
    try:
        core = CoreClient(node_address=node.address, head_address=node.address,
                          token=session.token, session_dir=session.dir, settings=conf)
    except BaseException:
        cluster.stop_node(node)
        raise
    return core, node


def _check_settings(settings: dict) -> None:
    known = set(Settings.__slots__)
    unknown = sorted(set(settings) - known)
    if unknown:
        raise InvalidOptionError(f"unknown argument(s) {unknown} for rayx.init(); besides its "
                                 f"named arguments it takes the settings {sorted(known)}")


def _check_init_args(num_cpus, num_gpus, resources, object_store_memory) -> None:
    if num_cpus is not None:
        validate_resources({"CPU": num_cpus}, "num_cpus")
    if num_gpus is not None:
        if isinstance(num_gpus, bool) or not isinstance(num_gpus, int) or num_gpus < 0:
            raise InvalidOptionError(f"num_gpus must be a whole number >= 0, got {num_gpus!r}")
    if resources is not None:
        validate_resources(resources, "resources")
    if object_store_memory is not None and (
            not isinstance(object_store_memory, int) or object_store_memory <= 0):
        raise InvalidOptionError(f"object_store_memory must be a positive number of bytes, "
                                 f"got {object_store_memory!r}")


def _info() -> ClusterInfo:
    return ClusterInfo(_core.node_address, _core.session_dir, _core.node_id)


def shutdown() -> None:
    """Disconnect, and stop the local cluster if this process started it."""
    global _core, _node, _private_dir
    with _lock:
        if _worker is not None:
            return
        core, node, private = _core, _node, _private_dir
        _core = _node = _private_dir = None
    if core is not None:
        _finish_job(core, "SUCCEEDED")
        core.close()
    if node is not None:
        cluster.stop_node(node)
    if private is not None:
        from rayx.connect import remove_private_dir
        remove_private_dir(private)


def is_initialized() -> bool:
    return _core is not None


def core() -> CoreClient:
    """The process's CoreClient; starts a local cluster if none exists yet, as Ray does."""
    c = _core
    if c is None:
        init(ignore_reinit_error=True)
        c = _core
    return c


def set_worker_core(c: CoreClient, worker) -> None:
    global _core, _worker
    _core, _worker = c, worker


def worker():
    return _worker


@contextlib.contextmanager
def cpu_lent() -> Iterator[None]:
    """Inside a worker, lend the running task's CPU back while this thread waits on other
    work (as get() and wait() do), so nested parallelism cannot deadlock the node."""
    hook = _core.blocked_hook if _worker is not None and _core is not None else None
    if hook is None:
        yield
        return
    hook(True)
    try:
        yield
    finally:
        hook(False)


def _as_list(refs, what: str) -> tuple[list[ObjectRef], bool]:
    if isinstance(refs, ObjectRef):
        return [refs], True
    if isinstance(refs, (list, tuple)):
        bad = [r for r in refs if not isinstance(r, ObjectRef)]
        if bad:
            raise TypeError(f"{what}() takes ObjectRefs, got {type(bad[0]).__name__}: "
                            f"{bad[0]!r}")
        return list(refs), False
    raise TypeError(f"{what}() takes an ObjectRef or a list of them, got "
                    f"{type(refs).__name__}")


def get(refs, *, timeout: float | None = None):
    """The value(s) behind refs, waiting up to `timeout` seconds."""
    items, single = _as_list(refs, "get")
    values = core().get(items, timeout)
    return values[0] if single else values


def put(value) -> ObjectRef:
    """Store a value in the cluster; returns its reference."""
    if isinstance(value, ObjectRef):
        raise TypeError("put() of an ObjectRef is not allowed; pass the ref itself instead")
    return core().put(value)


def wait(refs, *, num_returns: int = 1, timeout: float | None = None,
         fetch_local: bool = True) -> tuple[list[ObjectRef], list[ObjectRef]]:
    """Wait until num_returns of refs are ready or timeout passes; returns (ready, not_ready)."""
    items, single = _as_list(refs, "wait")
    if single:
        raise TypeError("wait() takes a list of ObjectRefs")
    if len(set(items)) != len(items):
        raise ValueError("wait() got the same ObjectRef more than once")
    if not isinstance(num_returns, int) or not 0 <= num_returns <= len(items):
        raise ValueError(f"num_returns must be between 0 and {len(items)}, got {num_returns!r}")
    return core().wait(items, num_returns, timeout)


def cancel(ref: ObjectRef, *, force: bool = False) -> None:
    """Cancel the task behind ref: queued tasks are dropped, running ones interrupted."""
    if not isinstance(ref, ObjectRef):
        raise TypeError(f"cancel() takes an ObjectRef, got {type(ref).__name__}")
    core().cancel(ref, force)


def kill(actor, *, no_restart: bool = True) -> None:
    """Kill an actor now; calls to it then raise ActorDiedError."""
    from rayx.actor import ActorHandle
    if not isinstance(actor, ActorHandle):
        raise TypeError(f"kill() takes an actor handle, got {type(actor).__name__}")
    core().head.KillActor(pb.KillActorRequest(actor_id=actor.actor_id, no_restart=no_restart))


def kill_quietly(actor_id: str) -> None:
    """For ActorHandle.__del__, which can run inside a gRPC call's locks (a GC pass): the kill
    is sent from the timer thread."""
    c = _core
    if c is not None and not c.closed:
        request = pb.KillActorRequest(actor_id=actor_id, no_restart=True)
        c.timers.call_later(0, lambda: rpc.call_async(c.head.KillActor, request))


def lookup_actor(name: str):
    from rayx.actor import ActorHandle
    info = core().head.GetActor(pb.GetActorRequest(name=name))
    if info.state in ("NONE", "DEAD"):
        return None
    return ActorHandle(serialization.loads(info.handle_meta))


def get_actor(name: str):
    """The handle of the live actor called `name`."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"get_actor() takes a non-empty actor name, got {name!r}")
    handle = lookup_actor(name)
    if handle is None:
        raise ValueError(f"no live actor named {name!r}")
    return handle


def _nodes_raw() -> list[pb.NodeInfo]:
    return list(core().head.GetNodes(pb.Empty()).nodes)


def nodes() -> list[dict]:
    """Every node the head knows, alive or dead, with address and resources."""
    return [{"NodeID": n.node_id, "Alive": n.alive, "Address": n.address,
             "Resources": dict(n.total.amounts), "Available": dict(n.available.amounts),
             "StoreDir": n.store_dir} for n in _nodes_raw()]


def cluster_resources() -> dict[str, float]:
    """Total resources of the live nodes."""
    return _sum(n.total.amounts for n in _nodes_raw() if n.alive)


def available_resources() -> dict[str, float]:
    """Resources not held by any task or actor right now (as of the last heartbeats)."""
    c = core()
    out = {}
    for n in _nodes_raw():
        if not n.alive:
            continue
        amounts = (c.node.GetResources(pb.Empty()).available.amounts
                   if n.node_id == c.node_id else n.available.amounts)
        for k, v in amounts.items():
            out[k] = out.get(k, 0.0) + v
    return out


def _sum(maps) -> dict[str, float]:
    out: dict[str, float] = {}
    for m in maps:
        for k, v in m.items():
            out[k] = out.get(k, 0.0) + v
    return out


def get_gpu_ids() -> list[int | str]:
    """The GPUs given to the running task or actor, as CUDA_VISIBLE_DEVICES names them (ints,
    or UUID strings); in the driver, the GPUs it can see."""
    if _worker is not None and "CUDA_VISIBLE_DEVICES" not in os.environ:
        return []  # a node without GPUs
    return [int(d) if d.isdigit() else d for d in cluster.visible_gpu_devices()]


class RuntimeContext:
    """What running code can learn about where it runs."""

    def get_node_id(self) -> str:
        return core().node_id

    def get_worker_id(self) -> str:
        return core().client_id

    def get_task_id(self) -> str | None:
        if _worker is None:
            return None
        from rayx.worker import current_task_id

        return current_task_id.get()

    def get_actor_id(self) -> str | None:
        return getattr(_worker, "actor_id", None) or None

    @property
    def node_id(self) -> str:
        return self.get_node_id()

    @property
    def worker_mode(self) -> str:
        return "WORKER" if _worker is not None else "DRIVER"


def get_runtime_context() -> RuntimeContext:
    return RuntimeContext()


atexit.register(shutdown)


# ---------------------------------------------------------------------- jobs and KV

_job_id: str | None = None  # this driver's job at the head, from init() to shutdown()


def _start_job(c: CoreClient) -> None:
    """Register this driver's job with the head (init() calls this)."""
    global _job_id
    import shlex
    import socket
    import sys
    import time
    argv = [a for a in sys.argv if a is not None]
    entry = "python " + shlex.join(argv) if argv and argv[0] else "python (interactive)"
    try:
        job = c.head.RegisterJob(pb.JobInfo(
            driver_id=c.client_id, driver_pid=os.getpid(), driver_host=socket.gethostname(),
            entrypoint=entry, start_time=time.time(), node_id=c.node_id), timeout=10)
    except Exception as exc:  # the driver still works; only `rayx status` misses its job
        import logging
        logging.getLogger(__name__).warning("could not register the job at the head: %s", exc)
        return
    _job_id = job.job_id


def _finish_job(c: CoreClient, state: str, message: str = "") -> None:
    global _job_id
    job_id, _job_id = _job_id, None
    if job_id is None or c.closed:
        return
    try:
        c.head.FinishJob(pb.JobInfo(job_id=job_id, state=state, message=message), timeout=5)
    except Exception:
        pass  # the head is gone: nobody is left to tell


def _finish_job_at_exit() -> None:
    """At interpreter exit (before shutdown, atexit runs hooks last-in first-out): a driver
    that ends with an uncaught exception fails its job."""
    import sys
    err = getattr(sys, "last_value", None)
    c = _core
    if err is not None and c is not None and _worker is None:
        _finish_job(c, "FAILED", f"the driver raised {type(err).__name__}: {err}"[:1000])


atexit.register(_finish_job_at_exit)


def _check_key(key) -> str:
    if not isinstance(key, str):
        raise TypeError(f"KV keys are str, got {type(key).__name__}: {key!r}")
    return key


def kv_put(key: str, value: bytes) -> None:
    """Store `value` under `key` in the head's key-value store (kept in head.db), replacing
    what was there. Any process of the cluster can read it: drivers, tasks and actors."""
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise TypeError(f"kv_put() stores bytes, got {type(value).__name__}; serialize the "
                        "value first (e.g. pickle.dumps or json.dumps(...).encode())")
    core().head.KvPut(pb.KvRequest(key=_check_key(key), value=bytes(value)))


def kv_get(key: str) -> bytes | None:
    """The bytes stored under `key`, or None when there is no such key."""
    reply = core().head.KvGet(pb.KvRequest(key=_check_key(key)))
    return reply.value if reply.found else None


def kv_delete(key: str) -> bool:
    """Remove `key`; True if it existed."""
    return core().head.KvDel(pb.KvRequest(key=_check_key(key))).found


def kv_keys(prefix: str = "") -> list[str]:
    """The keys that start with `prefix` (all keys by default), sorted."""
    return list(core().head.KvKeys(pb.KvKeysRequest(prefix=_check_key(prefix))).keys)


__all__ = ["RayxError"]
