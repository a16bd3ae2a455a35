"""Normal-task submission: leases per resource shape, tasks pushed straight to leased workers.

    submit(spec) -> queue of its shape --pump--> leased worker ("task", spec)
                    (shape: resources, strategy, affinity, and the node holding most of its
                     argument bytes when that is another node: the lease is asked there)
                       |                           |
           RequestLease (gRPC, one at a time)      ("done", task_id, descs) -> finish_task
           RETRY -> backoff; SPILLBACK -> ask that node; INFEASIBLE -> fail the queue
    idle lease -> returned after settings.lease_idle_timeout
    worker connection lost -> retry its tasks (max_retries) or fail with WorkerCrashedError

While the node still grants leases, each worker gets one task at a time so work spreads; once
the node is saturated (it answered RETRY) and tasks of this shape take under PIPELINE_BELOW,
up to max_tasks_in_flight_per_worker are pipelined. Tasks of a lease group (spec.lease_group,
a RayxExecutor's max_workers) have a queue of their own, which holds at most that many leases
and pipelines once it holds them all.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from rayx import rpc, wire
from rayx.exceptions import TaskCancelledError, TaskUnschedulableError, WorkerCrashedError
from rayx.protocol import rayx_pb2 as pb
from rayx.task_spec import TaskSpec


@dataclass(slots=True, eq=False)  # a lease is itself: compared by identity
class Lease:
    lease_id: str
    worker_id: str
    node_address: str
    conn: wire.Connection | None
    gpu_ids: list
    key: tuple = ()  # the shape (TaskSubmitter.shapes) it serves
    inflight: dict = field(default_factory=dict)
    idle_since: float = 0.0
    last_done: float = 0.0  # when its worker last finished a task (monotonic)
    return_armed: bool = False  # a _maybe_return timer is pending (at most one per lease)


@dataclass(slots=True)
class ShapeQueue:
    """Tasks of one scheduling key and the leases that serve them."""

    resources: dict
    strategy: str
    affinity: str
    home: str = ""  # the node to ask for leases first (its arguments live there); "" = ours
    queue: deque = field(default_factory=deque)
    leases: list = field(default_factory=list)
    requesting: bool = False
    retry_scheduled: bool = False
    saturated: bool = False
    backoff: float = 0.002
    task_time: float | None = None  # moving average of a task's time on its worker, seconds
    max_leases: int = 0  # 0: as many as the nodes grant

    def at_lease_limit(self) -> bool:
        return bool(self.max_leases) and len(self.leases) >= self.max_leases


# Pipelining several tasks onto one worker pays only for short tasks; for long ones it would
# queue work behind a busy worker while another node frees up.
PIPELINE_BELOW = 0.002  # seconds


def echo_output(text: str, err: bool) -> None:
    """Print what a worker of another node printed, already prefixed with its pid and node."""
    stream = sys.stderr if err else sys.stdout
    stream.write(text)
    stream.flush()


def shape_key(spec: TaskSpec, local_node: str = "") -> tuple:
    """A lease group's tasks share one queue (no home node), so its lease limit is one count."""
    home = "" if spec.lease_group else _home_node(spec, local_node)
    return (tuple(sorted(spec.resources.items())), spec.strategy, spec.node_affinity, home,
            spec.lease_group)


def _home_node(spec: TaskSpec, local_node: str) -> str:
    """The address of the node holding most of the task's argument bytes in its store, when
    that is not `local_node` and the task has no placement of its own: a task goes to its
    data rather than pulling it over the network. "" means no preference."""
    if spec.strategy != "DEFAULT" or spec.node_affinity:
        return ""
    per_node: dict[str, int] = {}
    for a in (*spec.args, *spec.kwargs.values()):
        if a[0] == "r" and a[3] is not None and a[3][0] == "s":
            per_node[a[3][2]] = per_node.get(a[3][2], 0) + a[3][3]
    if not per_node:
        return ""
    best = max(per_node, key=per_node.get)
    return "" if best == local_node else best


class TaskSubmitter:
    """Owns the leases of one core client and pushes its normal tasks through them."""

    def __init__(self, core):
        self.core = core
        self.shapes: dict[tuple, ShapeQueue] = {}
        self.cancelled: set[str] = set()
        self.lock = threading.Lock()
        self.closed = False

    def submit(self, spec: TaskSpec) -> None:
        key = shape_key(spec, self.core.node_address)
        sends = []
        with self.lock:
            sq = self.shapes.get(key)
            if sq is None:
                sq = self.shapes[key] = ShapeQueue(
                    spec.resources, spec.strategy, spec.node_affinity, key[3],
                    max_leases=spec.lease_group[1] if spec.lease_group else 0)
            if spec.task_id in self.cancelled:
                self.cancelled.discard(spec.task_id)
                cancelled = True
            else:
                sq.queue.append(spec)
                cancelled = False
                sends = self._pump(key, sq)
        self._push(sends)
        if cancelled:
            self.core.fail_task(spec, TaskCancelledError(f"task {spec.name} was cancelled"))

    def _pump(self, key: tuple, sq: ShapeQueue) -> list[tuple[Lease, TaskSpec]]:
        """Give queued tasks to leases with room; ask for a lease if work is left. Lock held.
        Returns the (lease, task) pairs to send once the lock is released (see _push)."""
        sends: list[tuple[Lease, TaskSpec]] = []
        cap = 1
        full = sq.saturated or sq.at_lease_limit()
        if full and sq.task_time is not None and sq.task_time < PIPELINE_BELOW:
            cap = self.core.settings.max_tasks_in_flight_per_worker
        while sq.queue and sq.leases:
            lease = min(sq.leases, key=lambda le: len(le.inflight))
            if len(lease.inflight) >= cap:
                break
            spec = sq.queue.popleft()
            spec.gpu_ids = lease.gpu_ids
            spec.sent_at = time.monotonic()
            lease.inflight[spec.task_id] = spec
            sends.append((lease, spec))
        if (sq.queue and not sq.requesting and not sq.retry_scheduled and not self.closed
                and not sq.at_lease_limit()):
            self._request_lease(key, sq, sq.home or self.core.node_address)
        now = time.monotonic()
        for lease in sq.leases:
            if not lease.inflight and not lease.idle_since:
                lease.idle_since = now
                if not lease.return_armed:
                    self._arm_return(key, lease, self.core.settings.lease_idle_timeout)
            elif lease.inflight:
                lease.idle_since = 0.0
        return sends

    @staticmethod
    def _push(sends: list[tuple[Lease, TaskSpec]]) -> None:
        """Send what _pump gave out, outside the lock: a socket write gives up the GIL, and
        under the lock every other thread that submits or settles a task queued behind it.
        A send that fails needs nothing here: the lease's close callback requeues or fails
        what it held, this task included."""
        for lease, spec in sends:
            try:
                lease.conn.send(("task", spec))
            except ConnectionError:
                pass

    def _request_lease(self, key: tuple, sq: ShapeQueue, address: str, spilled=False) -> None:
        sq.requesting = True
        req = pb.LeaseRequest(resources=pb.ResourceMap(amounts=sq.resources),
                              owner_id=self.core.client_id, strategy=sq.strategy,
                              node_affinity=sq.affinity, spilled=spilled)
        try:
            # a call that is already done runs its callback right here, under our lock: defer
            rpc.call_async(self.core.node_stub(address).RequestLease, req, timeout=60,
                           callback=lambda f: self.core.timers.call_later(
                               0, lambda: self._on_lease_reply(key, sq, address, f)))
        except Exception as exc:  # channel already closed: we are shutting down
            sq.requesting = False
            self._fail_queue(key, sq, WorkerCrashedError(f"cannot reach the node: {exc}"))

    def _on_lease_reply(self, key: tuple, sq: ShapeQueue, address: str, fut) -> None:
        try:
            reply = fut.result()
        except Exception as exc:
            if address != self.core.node_address:  # a remote node died: ask our own again
                sq.home = ""
                reply = pb.LeaseReply(status="RETRY")
            else:
                with self.lock:
                    sq.requesting = False
                if not self.closed:
                    self._fail_queue(key, sq, WorkerCrashedError(
                        f"the node manager at {address} did not answer a lease request: {exc}"))
                return
        if reply.status == "GRANTED":
            self._granted(key, sq, address, reply)
        elif reply.status == "SPILLBACK":
            with self.lock:
                self._request_lease(key, sq, reply.spillback_address, spilled=True)
        elif reply.status == "INFEASIBLE":
            with self.lock:
                sq.requesting = False
            self._fail_queue(key, sq, TaskUnschedulableError(reply.error))
        else:  # RETRY: the node is busy; pipeline on the leases we hold and ask again later
            self._return_idle_leases(but=key)
            with self.lock:
                sq.requesting = False
                sq.saturated = True
                sq.retry_scheduled = True
                delay, sq.backoff = sq.backoff, min(sq.backoff * 2, 0.1)
                sends = self._pump(key, sq)
            self._push(sends)
            self.core.timers.call_later(delay, lambda: self._retry(key, sq))

    def _retry(self, key: tuple, sq: ShapeQueue) -> None:
        with self.lock:
            sq.retry_scheduled = False
            sends = self._pump(key, sq)
        self._push(sends)

    def _granted(self, key: tuple, sq: ShapeQueue, address: str, reply) -> None:
        lease = Lease(reply.lease_id, reply.worker_id, address, None, list(reply.gpu_ids), key)
        try:
            lease.conn = wire.connect(reply.worker_address, self.core.token,
                                      self._on_worker_msg,
                                      lambda c: self._on_worker_lost(key, sq, lease))
        except OSError:
            self._return(lease, dead=True)
            with self.lock:
                sq.requesting = False
                sends = self._pump(key, sq)
            self._push(sends)
            return
        lease.conn.peer = lease
        with self.lock:
            sq.requesting = False
            sq.backoff = 0.002
            if self.closed:
                lease.conn.close()
                return
            sq.leases.append(lease)
            sends = self._pump(key, sq)
        self._push(sends)

    def _on_worker_msg(self, conn: wire.Connection, msg) -> None:
        if msg[0] == "log":
            echo_output(msg[1], msg[2])
            return
        if msg[0] == "retire":
            self._retired(conn.peer)
            return
        if msg[0] != "done":
            return
        lease: Lease = conn.peer
        with self.lock:
            spec = lease.inflight.pop(msg[1], None)
        if spec is None:
            return
        # from when the worker could start it (pushed, or its previous task done) to done:
        # time spent queued behind pipelined tasks is not the task's own
        now = time.monotonic()
        took, lease.last_done = now - max(spec.sent_at, lease.last_done), now
        descs = msg[2]
        if descs[0][0] == "e" and self._retry_on_error(spec, descs[0]):
            self.submit(spec)
        else:
            if self.cancelled:  # a cancel that reached it while it ran is settled now
                self.cancelled.discard(spec.task_id)
            self.core.finish_task(spec, descs, msg[3] if len(msg) > 3 else None)
        sends = []
        with self.lock:
            sq = self.shapes.get(lease.key)
            if sq is not None and lease in sq.leases:
                sq.task_time = took if sq.task_time is None else (
                    0.8 * sq.task_time + 0.2 * took)
                sends = self._pump(lease.key, sq)
        self._push(sends)

    def _retired(self, lease: Lease) -> None:
        """The worker reached max_calls and exits: resend what it had not run, elsewhere."""
        with self.lock:
            sq = next((s for s in self.shapes.values() if lease in s.leases), None)
            if sq is not None:
                sq.leases.remove(lease)
            unrun = list(lease.inflight.values())
            lease.inflight.clear()
        lease.conn.on_close = None
        lease.conn.close()
        self._return(lease, dead=True)
        for spec in unrun:
            self.submit(spec)

    def _retry_on_error(self, spec: TaskSpec, desc: tuple) -> bool:
        if not spec.retry_exceptions or spec.attempt >= spec.max_retries:
            return False
        if spec.task_id in self.cancelled:
            return False
        if isinstance(spec.retry_exceptions, tuple):
            from rayx import serialization
            err = serialization.deserialize(desc[1])[0]
            cause = getattr(err, "cause", err)
            if not isinstance(cause, spec.retry_exceptions):
                return False
        spec.attempt += 1
        return True

    def _on_worker_lost(self, key: tuple, sq: ShapeQueue, lease: Lease) -> None:
        with self.lock:
            if lease in sq.leases:
                sq.leases.remove(lease)
            lost = list(lease.inflight.values())
            lease.inflight.clear()
        if self.closed:
            return
        self._return(lease, dead=True)
        for spec in lost:
            if spec.task_id in self.cancelled:
                self.cancelled.discard(spec.task_id)
                self.core.fail_task(spec, TaskCancelledError(f"task {spec.name} was cancelled"))
            elif spec.attempt < spec.max_retries:
                spec.attempt += 1
                self.submit(spec)
            else:
                self.core.fail_task(spec, WorkerCrashedError(
                    f"the worker running task {spec.name} died (worker {lease.worker_id}); "
                    f"it was tried {spec.attempt + 1} time(s) (max_retries={spec.max_retries}). "
                    "It was likely killed or ran out of memory; raise max_retries= or memory="))
        with self.lock:
            sends = self._pump(key, sq)
        self._push(sends)

    def _arm_return(self, key: tuple, lease: Lease, delay: float) -> None:
        """One pending idle check per lease, not one per time it goes idle: a lease that
        runs one task at a time goes idle after every task. Lock held."""
        lease.return_armed = True
        self.core.timers.call_later(delay, lambda: self._maybe_return(key, lease))

    def _maybe_return(self, key: tuple, lease: Lease) -> None:
        with self.lock:
            lease.return_armed = False
            sq = self.shapes.get(key)
            if (sq is None or lease not in sq.leases or lease.inflight or not lease.idle_since
                    or sq.queue):
                return  # busy (its next idle spell arms a new check) or gone
            idle = time.monotonic() - lease.idle_since
            timeout = self.core.settings.lease_idle_timeout
            if idle < timeout * 0.9:  # busy and idle again since the check was armed
                self._arm_return(key, lease, timeout - idle)
                return
            sq.leases.remove(lease)
        lease.conn.on_close = None
        lease.conn.close()
        self._return(lease)

    def _return_idle_leases(self, but: tuple) -> None:
        """Hand back idle leases of other shapes at once: they may hold what `but` waits for."""
        idle = []
        with self.lock:
            for key, sq in self.shapes.items():
                if key == but or sq.queue:
                    continue
                for lease in [le for le in sq.leases if not le.inflight]:
                    sq.leases.remove(lease)
                    idle.append(lease)
        for lease in idle:
            lease.conn.on_close = None
            lease.conn.close()
            self._return(lease)

    def _return(self, lease: Lease, dead: bool = False) -> None:
        try:
            rpc.call_async(self.core.node_stub(lease.node_address).ReturnLease,
                           pb.ReturnLeaseRequest(lease_id=lease.lease_id, worker_dead=dead))
        except Exception:
            pass

    def _fail_queue(self, key: tuple, sq: ShapeQueue, error: Exception) -> None:
        with self.lock:
            specs = list(sq.queue)
            sq.queue.clear()
        for spec in specs:
            self.core.fail_task(spec, error)

    def cancel(self, spec: TaskSpec, force: bool, interrupt: bool = True) -> None:
        """Drop a queued task, or ask its worker to interrupt it (force: kill the worker).
        Without `interrupt`, a task its worker already runs is left to finish."""
        with self.lock:
            sq = self.shapes.get(shape_key(spec, self.core.node_address))
            at = next((i for i, s in enumerate(sq.queue) if s is spec), None) if sq else None
            if at is not None:
                del sq.queue[at]
                queued = True
            else:
                queued = False
                holder = next((le for s in self.shapes.values() for le in s.leases
                               if spec.task_id in le.inflight), None)
                if interrupt or holder is None:  # else the worker's answer settles it
                    self.cancelled.add(spec.task_id)
        if queued:
            self.core.fail_task(spec, TaskCancelledError(f"task {spec.name} was cancelled"))
            return
        if holder is None:
            return  # still resolving its arguments: submit() will see it in `cancelled`
        if force:
            self.core.node_stub(holder.node_address).KillWorker(
                pb.KillWorkerRequest(worker_id=holder.worker_id))
        else:
            try:
                holder.conn.send(("cancel", spec.task_id, interrupt))
            except ConnectionError:
                pass

    def close(self) -> None:
        with self.lock:
            self.closed = True
            leases = [le for sq in self.shapes.values() for le in sq.leases]
            for sq in self.shapes.values():
                sq.leases.clear()
        for lease in leases:
            lease.conn.on_close = None
            lease.conn.close()
            self._return(lease)
