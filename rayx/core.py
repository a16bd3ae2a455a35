"""The core client: the part of every driver and worker that owns objects and submits work.

    put/get/wait/cancel ---------------------------> OwnershipTable (ownership.py)
    f.remote() -> encode args -> wait for deps --> TaskSubmitter (submitter.py) -> leased worker
    actor.m.remote() ------------------------------> ActorSubmitter (actor_submitter.py)
    borrowers --("get_object")--> listener --------> reply when the object is ready
    borrowers --("add_borrower"|"remove_borrower")--> the owner's counts (ownership.py)
    node manager (gRPC): leases, store reservations, blocked/unblocked, frees

Everything a process does with the cluster goes through one CoreClient, held in rayx.api.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque

from rayx import ids, rpc, serialization, wire
from rayx.actor_submitter import ActorSubmitter
from rayx.config import Settings, socket_path
from rayx.exceptions import (
    GetTimeoutError,
    ObjectLostError,
    OwnerDiedError,
    RayxError,
    RayxTaskError,
    TaskCancelledError,
)
from rayx.object_ref import ObjectRef
from rayx.ownership import Drops, OwnershipTable
from rayx.protocol import rayx_pb2 as pb
from rayx.store_files import GrpcStoreCalls, KeptMappings, MapCache, write_object
from rayx.submitter import TaskSubmitter
from rayx.task_spec import TaskSpec
from rayx.timers import Timers

# Dropped refs are released in batches this far apart: one timer wake-up per batch, not one
# per ref (on a busy driver each wake-up costs as much CPU as the release itself).
RELEASE_BATCH = 0.002  # seconds


class CoreClient:
    """Ownership, submission and object access for one process."""

    def __init__(self, *, node_address: str, head_address: str, token: str, session_dir: str,
                 settings: Settings, client_id: str | None = None, is_driver: bool = True,
                 listener: wire.Listener | None = None):
        self.client_id = client_id or ids.new_id()
        self.is_driver = is_driver
        self.settings = settings
        self.token = token
        self.session_dir = session_dir
        self.node_address = node_address
        self.head_address = head_address
        self.tls = rpc.client_tls(settings)
        self.channel = rpc.channel(node_address, token, self.tls)
        self.node = rpc.node_stub(self.channel)
        self.node_store = GrpcStoreCalls(self.node)  # a worker swaps in its node socket
        self.head_channel = (self.channel if head_address == node_address
                             else rpc.channel(head_address, token, self.tls))
        self.head = rpc.head_stub(self.head_channel)
        info = self.node.GetResources(pb.Empty(), timeout=settings.start_timeout)
        self.node_id, self.store_dir = info.node_id, info.store_dir
        self._node_stubs: dict[str, object] = {node_address: self.node}
        self.table = OwnershipTable()
        self.timers = Timers().start()
        self.maps = MapCache(settings.map_cache_bytes, settings.map_cache_sweep, self.timers)
        self.kept = KeptMappings(settings.map_cache_sweep, self.timers)
        self._released: deque[str] = deque()  # refs dropped in __del__, released by the timers
        self._release_scheduled = False
        self._owned_listener = listener is None
        if listener is None:
            listener = wire.Listener(listen_address(session_dir, self.client_id, settings),
                                     token, self.handle_request).start()
        self.listener = listener
        self.address = listener.address
        self.table.address = self.address
        self._owner_conns: dict[str, wire.Connection] = {}
        self._adds_pending: dict[int, tuple[threading.Event, str]] = {}  # request -> (acked, owner)
        self._add_seq = 0
        self._watched: set[str] = set()  # borrowers whose exit this owner watches for
        self._nested_pins: dict[str, list[str]] = {}  # task id -> refs nested in its arguments
        self._fetches: dict[str, list] = {}  # object id -> waiting callbacks, while fetching
        self._lock = threading.Lock()
        self.submitter = TaskSubmitter(self)
        self.actors = ActorSubmitter(self)
        self.blocked_hook = None  # set by workers: lends the CPU back while blocked in get
        self.closed = False
        if is_driver:
            self.node.RegisterClient(pb.ClientInfo(client_id=self.client_id, pid=os.getpid(),
                                                   is_driver=True))

    # ------------------------------------------------------------------ objects

    def new_ref(self, oid: str) -> ObjectRef:
        return ObjectRef(oid, self.address, self)

    def put(self, value) -> ObjectRef:
        """Store a value and return a reference owned by this process."""
        oid = ids.new_id()
        with serialization.collect_refs() as nested:
            so = serialization.serialize(value)
        self.table.add_owned(oid, self.address, self.store_serialized(oid, so))
        ref = self.new_ref(oid)
        if nested:  # the stored value holds these refs: keep them while it lives
            self.table.contain(oid, ref_pairs(nested), False, Drops())
        return ref

    def store_serialized(self, oid: str, so: serialization.SerializedObject,
                         owner_id: str | None = None) -> tuple:
        """Put serialized bytes inline or into the node's store; returns the descriptor."""
        if so.size <= self.settings.inline_threshold:
            return ("i", so.to_bytes())
        owner_id = owner_id or self.client_id
        ok, error, path, reuse = self.node_store.reserve(oid, so.size)
        if not ok:
            from rayx.exceptions import ObjectStoreFullError
            raise ObjectStoreFullError(error)
        write_object(path, so, reuse, self.kept)
        self.node_store.seal(oid, so.size, owner_id)
        return ("s", self.node_id, self.node_address, so.size)

    def release_ref_soon(self, oid: str) -> None:
        """For ObjectRef.__del__, which can run inside any lock of any thread (a GC pass in
        the middle of a gRPC call, of the ownership table...): only queue the release here;
        the timer thread takes the locks and sends the frees."""
        self._released.append(oid)
        if not self._release_scheduled and not self.closed:
            self._release_scheduled = True
            self.timers.call_later(RELEASE_BATCH, self._release_queued)

    def _release_queued(self) -> None:
        self._release_scheduled = False  # before draining: a ref dropped from now on re-arms
        drops = Drops()
        while self._released:
            self.table.remove_ref(self._released.popleft(), drops)
        if drops and not self.closed:
            self.apply(drops)

    def apply(self, drops: Drops) -> None:
        """Free the store copies of owned objects that went; give borrowed ones back."""
        if drops.free:
            self._free(drops.free)
        for owner, items in drops.returns.items():
            try:
                self._owner_conn(owner).send(("remove_borrower", items, self.address))
            except (OSError, ConnectionError):
                pass  # the owner is gone, and its objects with it

    def _free(self, items) -> None:
        by_node: dict[str, list[str]] = {}
        for oid, desc in items:
            if desc[0] == "s":
                by_node.setdefault(desc[2], []).append(oid)
        self.maps.forget(oid for oids in by_node.values() for oid in oids)
        for address, oids in by_node.items():
            try:
                rpc.call_async(self.node_stub(address).FreeObjects,
                               pb.ObjectIds(object_ids=oids))
            except Exception:
                pass

    def node_stub(self, address: str):
        stub = self._node_stubs.get(address)
        if stub is None:
            stub = self._node_stubs[address] = rpc.node_stub(
                rpc.channel(address, self.token, self.tls))
        return stub

    def when_ready(self, ref: ObjectRef, cb) -> None:
        """Call cb(desc) once the object behind `ref` is ready (or known lost); value(ref, desc)
        then turns the descriptor into the value."""
        self._when_ready(ref.id, ref.owner_address, cb)

    def _when_ready(self, oid: str, owner_address: str, cb) -> None:
        """Call cb(desc) when ready; asks the owner when this process only borrows the ref."""
        entry = self.table.get(oid)
        if entry is None or not entry.owned:
            if entry is not None and entry.desc is not None:
                cb(entry.desc)
                return
            if owner_address == self.address:
                cb(("lost",))
                return
            self._fetch(oid, owner_address, cb)
            return
        desc = self.table.on_ready(oid, cb)
        if desc is not None:
            cb(desc)

    def _fetch(self, oid: str, owner_address: str, cb) -> None:
        with self._lock:
            waiting = self._fetches.get(oid)
            if waiting is not None:
                waiting.append(cb)
                return
            self._fetches[oid] = [cb]
        try:
            conn = self._owner_conn(owner_address)
            conn.send(("get_object", oid))
        except (OSError, ConnectionError):
            self._fetched(oid, ("lost", "owner"))

    def _owner_conn(self, address: str) -> wire.Connection:
        with self._lock:
            conn = self._owner_conns.get(address)
            if conn is not None and not conn.closed:
                return conn
        conn = wire.connect(address, self.token, self._on_owner_reply, self._on_owner_closed)
        conn.peer = address
        with self._lock:
            self._owner_conns[address] = conn
        return conn

    def _on_owner_reply(self, conn, msg) -> None:
        if msg[0] == "object":
            self._fetched(msg[1], msg[2])
        elif msg[0] == "borrowers_added":
            with self._lock:
                pending = self._adds_pending.pop(msg[1], None)
            if pending is not None:
                pending[0].set()

    def _on_owner_closed(self, conn) -> None:
        """A process this one talks to exited: as an owner its objects are lost, as a
        borrower its registrations go."""
        with self._lock:
            if self._owner_conns.get(conn.peer) is conn:
                del self._owner_conns[conn.peer]
            lost = list(self._fetches)
            acks = [k for k, (_, owner) in self._adds_pending.items() if owner == conn.peer]
            unacked = [self._adds_pending.pop(k)[0] for k in acks]
            watched = conn.peer in self._watched
            self._watched.discard(conn.peer)
        for event in unacked:
            event.set()
        if self.closed:
            return
        for oid in lost:  # only fetches that were sent to this owner are affected in practice
            entry = self.table.get(oid)
            if entry is None or entry.owner_address == conn.peer:
                self._fetched(oid, ("lost", "owner"))
        if watched:
            drops = Drops()
            self.table.borrower_gone(conn.peer, drops)
            self.apply(drops)

    # ------------------------------------------------------------------ borrowers

    def register_borrow(self, oid: str, owner: str) -> None:
        """This process just unpickled a ref it did not hold: tell the owner. Inside
        `loads` the registration is batched and waited for; elsewhere it is only sent."""
        if not serialization.note_borrow(oid, owner):
            self._send_adds(owner, [oid], self.address)

    def loads(self, data):
        """Deserialize a value; refs in it that are new here are registered with their
        owners before it is returned, while what carried them still holds them."""
        with serialization.collect_borrows() as borrows:
            value = serialization.deserialize(data)[0]
        if borrows:
            self._register(borrows, self.address)
        return value

    def lend(self, refs: list[ObjectRef], borrower: str) -> list[tuple[str, str]]:
        """Refs pickled into a result for `borrower` (the caller): register the caller with
        each owner, and wait, before the result is sent. Returns their (id, owner) pairs."""
        pairs = ref_pairs(refs)
        remote = []
        for oid, owner in pairs:
            if owner == borrower:
                continue
            if owner == self.address:
                drops = Drops()
                self.table.add_borrower([oid], borrower, drops)
                self._watch_soon(borrower)
                self.apply(drops)
            else:
                remote.append((oid, owner))
        if remote:
            self._register(remote, borrower)
        return pairs

    def _register(self, pairs, borrower: str) -> None:
        by_owner: dict[str, list[str]] = {}
        for oid, owner in pairs:
            by_owner.setdefault(owner, []).append(oid)
        events = [self._send_adds(owner, oids, borrower) for owner, oids in by_owner.items()]
        deadline = time.monotonic() + self.settings.start_timeout
        for event in events:
            event.wait(max(0.0, deadline - time.monotonic()))

    def _send_adds(self, owner: str, oids: list[str], borrower: str) -> threading.Event:
        event = threading.Event()
        with self._lock:
            self._add_seq += 1
            req = self._add_seq
            self._adds_pending[req] = (event, owner)
        try:
            self._owner_conn(owner).send(("add_borrower", req, oids, borrower))
        except (OSError, ConnectionError):
            with self._lock:
                self._adds_pending.pop(req, None)
            event.set()  # the owner is gone: nothing to wait for
        return event

    def _watch_soon(self, borrower: str) -> None:
        """Keep a connection to a borrower, so its exit releases what it borrowed."""
        with self._lock:
            if borrower in self._watched or borrower == self.address:
                return
            self._watched.add(borrower)
        self.timers.call_later(0, lambda: self._watch(borrower))

    def _watch(self, borrower: str) -> None:
        if self.closed:
            return
        try:
            self._owner_conn(borrower)
        except (OSError, ConnectionError):
            with self._lock:
                self._watched.discard(borrower)
            drops = Drops()
            self.table.borrower_gone(borrower, drops)
            self.apply(drops)

    def _forget_callback(self, oid: str, cb) -> None:
        self.table.remove_callback(oid, cb)
        with self._lock:
            waiting = self._fetches.get(oid)
            if waiting and cb in waiting:
                waiting.remove(cb)

    def _fetched(self, oid: str, desc: tuple) -> None:
        with self._lock:
            cbs = self._fetches.pop(oid, [])
        entry = self.table.get(oid)
        if entry is not None and desc[0] != "lost":
            entry.desc = desc  # immutable objects: cache the location for later gets
        for cb in cbs:
            cb(desc)

    def handle_request(self, conn: wire.Connection, msg) -> None:
        """Requests from other processes to this process as an owner."""
        kind = msg[0]
        if kind == "get_object":
            oid = msg[1]
            self._when_ready(oid, self.address,
                             lambda desc: _send_quietly(conn, ("object", oid, desc)))
        elif kind == "add_borrower":
            _, req, oids, borrower = msg
            drops = Drops()
            self.table.add_borrower(oids, borrower, drops)
            self._watch_soon(borrower)
            _send_quietly(conn, ("borrowers_added", req))
            self.apply(drops)
        elif kind == "remove_borrower":
            drops = Drops()
            self.table.remove_borrower(msg[1], msg[2], drops)
            self._watch_soon(msg[2])  # a count left below zero goes with the borrower, too
            self.apply(drops)

    def get(self, refs: list[ObjectRef], timeout: float | None) -> list:
        """Values of `refs`, in order; raises the first task error met."""
        descs = self._wait_descs(refs, timeout)
        return [self.value(r, d, timeout) for r, d in zip(refs, descs)]

    def value(self, ref: ObjectRef, desc: tuple, timeout: float | None = None):
        """The value behind a ready descriptor; a lost object is rebuilt from its lineage."""
        try:
            return self.materialize(ref.id, desc)
        except ObjectLostError:
            if not self._reconstruct(ref.id):
                raise
        return self.materialize(ref.id, self._wait_descs([ref], timeout)[0])

    def _reconstruct(self, oid: str) -> bool:
        """Re-run the task that made a lost object (its lineage); False if there is none."""
        entry = self.table.get(oid)
        if entry is None or not entry.owned or entry.lineage is None:
            return False
        spec = entry.lineage
        if spec.actor_id or spec.attempt >= spec.max_retries:
            return False
        spec.attempt += 1
        for rid in spec.return_ids:
            self.table.reset(rid)
        deps = [a[1] for a in spec.args if a[0] == "r"] + [
            a[1] for a in spec.kwargs.values() if a[0] == "r"]
        self.table.pin(deps)
        self.submitter.submit(spec)
        return True

    def _wait_descs(self, refs: list[ObjectRef], timeout: float | None) -> list[tuple]:
        n = len(refs)
        descs: list = [None] * n
        remaining = [n]
        done = threading.Event()
        lock = threading.Lock()

        def settle(i, desc):
            with lock:
                if descs[i] is not None:
                    return
                descs[i] = desc
                remaining[0] -= 1
                if remaining[0] == 0:
                    done.set()

        for i, ref in enumerate(refs):
            self._when_ready(ref.id, ref.owner_address, lambda d, i=i: settle(i, d))
        if n == 0 or done.is_set():
            return descs
        self._wait_blocked(done, timeout, refs)
        return descs

    def _wait_blocked(self, event: threading.Event, timeout: float | None, refs) -> None:
        hook = self.blocked_hook
        if hook is not None:
            hook(True)
        try:
            if not event.wait(timeout):
                raise GetTimeoutError(
                    f"get() timed out after {timeout} s waiting for {len(refs)} object(s) "
                    f"(first: {refs[0]!r}); raise timeout= or check that their tasks can run")
        finally:
            if hook is not None:
                hook(False)

    def materialize(self, oid: str, desc: tuple):
        """Turn a ready descriptor into a value (zero-copy for store objects on this node)."""
        kind = desc[0]
        if kind == "i":
            return self.loads(desc[1])
        if kind == "e":
            raise _as_raisable(self.loads(desc[1]))
        if kind == "s":
            return self.loads(self._map(oid, desc))
        if kind == "lost":
            if len(desc) > 1 and desc[1] == "owner":
                raise OwnerDiedError(f"object {oid}: its owner process is gone, so is the object")
            raise ObjectLostError(f"object {oid} was freed or lost and cannot be rebuilt")
        raise RayxError(f"unknown object descriptor {kind!r}")

    def _map(self, oid: str, desc: tuple) -> memoryview:
        view = self.maps.get(oid)
        if view is not None:
            return view
        path = os.path.join(self.store_dir, oid)
        if desc[1] == self.node_id:
            try:
                return self.maps.map(oid, path)
            except FileNotFoundError:
                pass
        reply = self.node.RestoreObject(pb.RestoreRequest(
            object_id=oid, from_node=desc[2] if desc[1] != self.node_id else ""))
        if not reply.ok:
            raise ObjectLostError(f"object {oid} is lost: {reply.error}")
        return self.maps.map(oid, reply.path)

    def wait(self, refs: list[ObjectRef], num_returns: int, timeout: float | None):
        """Ready and not-ready refs, once num_returns are ready or the timeout passes."""
        ready_flags = [False] * len(refs)
        count = [0]
        cond = threading.Condition()

        def mark(i):
            with cond:
                if not ready_flags[i]:
                    ready_flags[i] = True
                    count[0] += 1
                    cond.notify_all()

        callbacks = [lambda d, i=i: mark(i) for i in range(len(refs))]
        for ref, cb in zip(refs, callbacks):
            self._when_ready(ref.id, ref.owner_address, cb)
        deadline = None if timeout is None else time.monotonic() + timeout
        with cond:
            if count[0] < num_returns and self.blocked_hook is not None:
                self.blocked_hook(True)
                blocked = True
            else:
                blocked = False
            try:
                while count[0] < num_returns:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        break
                    cond.wait(left)
            finally:
                if blocked:
                    self.blocked_hook(False)
            flags = list(ready_flags)
        for ref, cb, flag in zip(refs, callbacks, flags):
            if not flag:  # repeated waits on pending refs must not pile up callbacks
                self._forget_callback(ref.id, cb)
        ready = [r for r, f in zip(refs, flags) if f][:num_returns]
        chosen = {id(r) for r in ready}
        return ready, [r for r in refs if id(r) not in chosen]

    # ------------------------------------------------------------------ tasks

    def submit(self, spec: TaskSpec, deps: list[ObjectRef],
               nested: list[ObjectRef] | None = None) -> list[ObjectRef]:
        """Register the task's results as owned, then send it once its arguments are ready.
        Top-level `deps` and the refs `nested` in arguments stay pinned until it is over."""
        for rid in spec.return_ids:
            self.table.add_owned(rid, self.address, lineage=spec)
        refs = [self.new_ref(rid) for rid in spec.return_ids]
        if deps:  # the table's lock is shared by every thread: take it only when needed
            self.table.pin(d.id for d in deps)
        if nested:
            held = [oid for oid, _ in ref_pairs(nested)]
            self.table.pin(held)
            self._nested_pins[spec.task_id] = held
        if spec.actor_id:  # queued now, so calls keep their order while arguments resolve
            if self.actors.submit(spec, args_pending=bool(deps)) and deps:
                self._resolve_then(spec, deps, self.actors.args_ready, self.actors.drop)
        else:
            self._resolve_then(spec, deps, self.submitter.submit)
        return refs

    def _resolve_then(self, spec: TaskSpec, deps: list[ObjectRef], then,
                      on_failed=None) -> None:
        """Fill each top-level ref argument with its descriptor, then call then(spec); if an
        argument failed, call on_failed(spec) and fail the task with that error instead."""
        slots = [a for a in spec.args if a[0] == "r"] + [
            a for a in spec.kwargs.values() if a[0] == "r"]
        if not slots:
            then(spec)
            return
        pending = [len(slots)]
        lock = threading.Lock()

        def filled(slot, desc):
            slot[3] = desc
            with lock:
                pending[0] -= 1
                last = pending[0] == 0
            if last:
                failed = next((s[3] for s in slots if s[3][0] in ("e", "lost")), None)
                if failed is not None:  # a dependency failed: so does this task, with its error
                    if on_failed is not None:
                        on_failed(spec)
                    self.finish_task(spec, [_dep_error(failed, spec)] * len(spec.return_ids))
                else:
                    then(spec)

        for slot in slots:
            self._when_ready(slot[1], slot[2], lambda d, s=slot: filled(s, d))

    def finish_task(self, spec: TaskSpec, descs: list[tuple], nested=None) -> None:
        """A task is over for good: publish its results and release its argument pins.
        `nested`, per result, lists the (id, owner) refs its value holds; the worker has
        registered this process as their borrower."""
        drops = Drops()
        for i, (rid, desc) in enumerate(zip(spec.return_ids, descs)):
            if nested and nested[i]:
                self.table.contain(rid, nested[i], True, drops)
            for cb in self.table.complete(rid, desc, drops):
                cb(desc)
        deps = [a[1] for a in spec.args if a[0] == "r"] + [
            a[1] for a in spec.kwargs.values() if a[0] == "r"]
        if deps:
            self.table.unpin(deps, drops)
        held = self._nested_pins.pop(spec.task_id, None)
        if held:
            self.table.unpin(held, drops)
        if drops:
            self.apply(drops)

    def fail_task(self, spec: TaskSpec, error: BaseException) -> None:
        so = serialization.serialize(error, error=True)
        self.finish_task(spec, [("e", so.to_bytes())] * len(spec.return_ids))

    def cancel(self, ref: ObjectRef, force: bool, interrupt: bool = True) -> None:
        entry = self.table.get(ref.id)
        if entry is None or not entry.owned or entry.lineage is None:
            raise ValueError(f"cancel() takes a reference returned by a task this process "
                             f"submitted; {ref!r} is not one")
        if entry.desc is not None:
            return
        spec = entry.lineage
        if spec.actor_id:
            self.actors.cancel(spec, force)
        else:
            self.submitter.cancel(spec, force, interrupt)

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Hand back leases, close connections, stop the timer thread."""
        if self.closed:
            return
        self.closed = True
        self.submitter.close()
        self.actors.close()
        self.timers.stop()
        self.maps.clear()
        self.kept.clear()
        with self._lock:
            conns = list(self._owner_conns.values())
        for c in conns:
            c.close()
        if self._owned_listener:
            self.listener.stop()
        if self.is_driver:
            try:
                self.node.UnregisterClient(pb.ClientInfo(client_id=self.client_id), timeout=2)
            except Exception:
                pass
        if self.head_channel is not self.channel:
            self.head_channel.close()
        self.channel.close()


def listen_address(session_dir: str, name: str, settings: Settings) -> str:
    """Where a driver or worker listens: a Unix socket on one machine, TCP on the node's IP
    when the cluster spans hosts (settings.node_ip set)."""
    if settings.node_ip:
        return f"tcp:{settings.node_ip}:0"
    return f"unix:{socket_path(session_dir, name + '.sock')}"


def ref_pairs(refs) -> list[tuple[str, str]]:
    """(id, owner address) of each distinct ref, in order."""
    seen: dict[str, str] = {}
    for r in refs:
        seen.setdefault(r.id, r.owner_address)
    return list(seen.items())


def _send_quietly(conn: wire.Connection, msg) -> None:
    try:
        conn.send(msg)
    except ConnectionError:
        pass


def _as_raisable(err) -> BaseException:
    if isinstance(err, RayxTaskError):
        return err.as_instanceof_cause()
    if isinstance(err, BaseException):
        return err
    return RayxError(f"task failed: {err!r}")


def _dep_error(desc: tuple, spec: TaskSpec) -> tuple:
    if desc[0] == "e":
        return desc
    err = ObjectLostError(f"an argument of task {spec.name} was lost before it could run")
    return ("e", serialization.serialize(err, error=True).to_bytes())


__all__ = ["CoreClient", "TaskCancelledError"]
