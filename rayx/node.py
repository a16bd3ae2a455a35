"""The node manager: one per node; workers, leases, resources and the object store.

    owners --RequestLease--> fits now? idle or new worker --> GRANTED (worker socket, GPU ids)
                             never fits here --> SPILLBACK (another node) or INFEASIBLE
                             busy --> RETRY (the owner backs off and asks again)
    owners --ReturnLease--> worker back to the idle pool, resources freed
    workers --SetBlocked--> CPU lent back while blocked in get(), reclaimed after
    head --StartActor--> a dedicated worker builds the actor
    anyone --Reserve/Seal/Free/RestoreObject--> the object store; other nodes pull objects
    through the TransferServer (transfer.py), and copies are freed with their original
    watcher thread: heartbeats to the head; drivers' pids (local mode: driver gone -> shut down)

In local mode the head service lives in this process too (node_main.py wires them together).
"""

from __future__ import annotations

import logging
import threading
import time

import psutil

from rayx import ids, rpc, wire
from rayx.exceptions import ObjectLostError, ObjectStoreFullError
from rayx.object_store import ObjectStore
from rayx.protocol import rayx_pb2 as pb
from rayx.protocol import rayx_pb2_grpc
from rayx.scheduler import ResourcePool
from rayx.transfer import TransferServer, pull
from rayx.worker_pool import WorkerPool, WorkerRecord

log = logging.getLogger(__name__)


class NodeManager(rayx_pb2_grpc.NodeManagerServicer):
    """Serves one node's resources, workers and objects."""

    def __init__(self, *, node_id: str, address: str, head_address: str, token: str,
                 session_dir: str, resources: dict, num_gpus: int, store: ObjectStore,
                 settings, driver_pid: int = 0, stdout=None, forward_output: bool = False,
                 gpu_devices: list[str] | None = None, preimport: list[str] | None = None):
        self.node_id, self.address, self.head_address = node_id, address, head_address
        self.token, self.session_dir, self.settings = token, session_dir, settings
        self.store = store
        self.pool = ResourcePool(resources, num_gpus)
        self.lock = threading.Lock()
        self.leases: dict[str, WorkerRecord] = {}
        self.clients: dict[str, int] = {}  # driver client id -> pid
        self.driver_pid = driver_pid
        self.stopped = threading.Event()
        self.tls = rpc.client_tls(settings)
        self.head = rpc.head_stub(rpc.channel(head_address, token, self.tls))
        self._peers: dict[str, object] = {}
        self._nodes_cache: list[pb.NodeInfo] = []
        self._nodes_at = 0.0
        self.copies: dict[str, set[str]] = {}  # object id -> nodes that pulled a copy
        self.demand: dict[str, float] = {}  # resources of lease requests refused since the
        # last heartbeat: what `rayx status` shows as pending demand
        self.workers = WorkerPool(session_dir, {
            "session_dir": session_dir, "node_id": node_id, "node_address": address,
            "head_address": head_address, "token": token, "num_gpus": num_gpus,
            "gpu_devices": gpu_devices or [str(i) for i in range(num_gpus)],
            "forward_output": forward_output,
            "preimport": preimport,  # None: the fork server's default
        }, self._on_worker_death, stdout=stdout, on_store=self._on_worker_store)
        self._watcher = threading.Thread(target=self._watch_loop, name="rayx-node-watch",
                                         daemon=True)
        self.transfer = TransferServer(address.rsplit(":", 1)[0], token, self._serve_copy)

    def start(self) -> NodeManager:
        self.transfer.start()
        self._register()
        n = self.settings.prestart_workers
        n = int(self.pool.total.get("CPU", 1)) if n is None else n
        for _ in range(max(0, n)):
            self.workers.start_worker(prestart=True)
        self._watcher.start()
        return self

    def _info(self) -> pb.NodeInfo:
        with self.lock:
            avail = {k: max(0.0, v) for k, v in self.pool.available.items()}
        return pb.NodeInfo(node_id=self.node_id, address=self.address,
                           total=pb.ResourceMap(amounts=self.pool.total),
                           available=pb.ResourceMap(amounts=avail), alive=True,
                           store_dir=self.store.store_dir,
                           transfer_port=self.transfer.port)

    def _register(self) -> None:
        self.head.RegisterNode(self._info(), timeout=self.settings.start_timeout)

    # ------------------------------------------------------------------ leases

    def RequestLease(self, request, context):
        need = dict(request.resources.amounts)
        if request.node_affinity and request.node_affinity != self.node_id:
            hard = request.strategy == "AFFINITY"
            if hard or any(n.node_id == request.node_affinity for n in self._nodes()):
                return self._redirect(need, request, only=request.node_affinity)
        if not self.pool.fits_total(need):
            return self._redirect(need, request)
        if request.strategy == "SPREAD" and not request.spilled:
            target = self._spread_target(need)
            if target is not None and target.node_id != self.node_id:
                return pb.LeaseReply(status="SPILLBACK", spillback_address=target.address)
        with self.lock:
            alloc = self.pool.acquire(need)
        if alloc is None:
            if not request.spilled:
                target = self._spill_target(need, available=True)
                if target is not None:
                    return pb.LeaseReply(status="SPILLBACK", spillback_address=target.address)
            with self.lock:
                for k, v in need.items():
                    self.demand[k] = self.demand.get(k, 0.0) + v
            return pb.LeaseReply(status="RETRY")
        rec = self.workers.take_idle(self.settings.start_timeout) or self._new_worker()
        if rec is None:
            with self.lock:
                self.pool.release(alloc)
            return pb.LeaseReply(status="RETRY", error="a worker could not be started")
        rec.state, rec.alloc, rec.lease_id = "leased", alloc, ids.new_id()
        rec.lessee = request.owner_id
        with self.lock:
            self.leases[rec.lease_id] = rec
        return pb.LeaseReply(status="GRANTED", lease_id=rec.lease_id, worker_id=rec.worker_id,
                             worker_address=rec.address, gpu_ids=alloc.gpu_ids,
                             node_id=self.node_id)

    def _new_worker(self) -> WorkerRecord | None:
        rec = self.workers.start_worker()
        if not rec.ready.wait(self.settings.start_timeout) or rec.state != "idle":
            self.workers.kill(rec)
            return None
        return rec

    def _redirect(self, need: dict, request, only: str = "") -> pb.LeaseReply:
        target = self._spill_target(need, available=False, only=only)
        if target is not None and not request.spilled:
            return pb.LeaseReply(status="SPILLBACK", spillback_address=target.address)
        totals = {n.node_id[:12]: dict(n.total.amounts) for n in self._nodes()}
        where = f"node {only[:12]}" if only else "any node"
        return pb.LeaseReply(status="INFEASIBLE", error=(
            f"the task needs {need}, which {where} of the cluster cannot offer "
            f"(node totals: {totals}); lower its resource request or add a node that has them"))

    def _nodes(self) -> list[pb.NodeInfo]:
        """Live nodes as the head last heard of them (cached for 0.2 s)."""
        now = time.monotonic()
        if now - self._nodes_at > 0.2:
            try:
                self._nodes_cache = [n for n in self.head.GetNodes(pb.Empty(), timeout=5).nodes
                                     if n.alive]
            except Exception:
                self._nodes_cache = [self._info()]
            self._nodes_at = now
        return self._nodes_cache

    def _spill_target(self, need: dict, available: bool, only: str = "") -> pb.NodeInfo | None:
        """Another node where `need` fits: now (by its last heartbeat), or ever. Of those that
        fit now, the one with the most of the asked resources free, so a busy cluster's work
        reaches its idlest node rather than the first one listed."""
        fits = []
        for n in self._nodes():
            if n.node_id == self.node_id or (only and n.node_id != only):
                continue
            amounts = n.available.amounts if available else n.total.amounts
            if all(amounts.get(k, 0.0) + 1e-9 >= v for k, v in need.items()):
                if not available:
                    return n
                fits.append((sum(amounts.get(k, 0.0) for k in need), n.node_id, n))
        return max(fits, key=lambda f: f[:2])[2] if fits else None

    def _spread_target(self, need: dict) -> pb.NodeInfo | None:
        """The node with the most free CPU among those where the task fits now."""
        fits = [n for n in self._nodes()
                if all(n.available.amounts.get(k, 0.0) + 1e-9 >= v for k, v in need.items())]
        if not fits:
            return None
        self._spread_turn = getattr(self, "_spread_turn", -1) + 1
        fits.sort(key=lambda n: n.node_id)
        return fits[self._spread_turn % len(fits)]

    def ReturnLease(self, request, context):
        with self.lock:
            rec = self.leases.pop(request.lease_id, None)
            if rec is None:
                return pb.Empty()
            self._release(rec)
        if request.worker_dead:
            self.workers.kill(rec)
        else:
            self.workers.put_idle(rec)
        return pb.Empty()

    def _release(self, rec: WorkerRecord) -> None:
        """Lock held. Give back what the worker's lease or actor holds."""
        if rec.alloc is not None:
            if rec.lent_cpus:
                self.pool.reclaim_cpu(rec.lent_cpus)
                rec.lent_cpus = 0.0
            self.pool.release(rec.alloc)
            rec.alloc = None
        rec.lease_id = rec.lessee = ""

    def SetBlocked(self, request, context):
        with self.lock:
            rec = self.workers.get(request.worker_id)
            if rec is None or rec.alloc is None:
                return pb.Empty()
            if request.blocked and not rec.lent_cpus:
                rec.lent_cpus = self.pool.lend_cpu(rec.alloc)
            elif not request.blocked and rec.lent_cpus:
                self.pool.reclaim_cpu(rec.lent_cpus)
                rec.lent_cpus = 0.0
        return pb.Empty()

    def _on_worker_death(self, rec: WorkerRecord) -> None:
        with self.lock:
            if rec.lease_id:
                self.leases.pop(rec.lease_id, None)
            self._release(rec)
        self._owner_gone(rec.worker_id)
        if rec.actor_id and not self.stopped.is_set():
            try:
                self.head.ReportActorState(pb.ActorStateUpdate(
                    actor_id=rec.actor_id, state="WORKER_DIED", worker_id=rec.worker_id,
                    node_id=self.node_id), timeout=10)
            except Exception as exc:
                log.warning("could not report the death of actor %s: %s", rec.actor_id, exc)

    def KillWorker(self, request, context):
        rec = self.workers.get(request.worker_id)
        if rec is not None:
            self.workers.kill(rec)
        return pb.Empty()

    # ------------------------------------------------------------------ actors

    def StartActor(self, request, context):
        spec = request.spec
        need = dict(spec.resources.amounts)
        if not self.pool.fits_total(need):
            return pb.StartActorReply(ok=False, error=f"the actor needs {need}; this node "
                                      f"offers {self.pool.total}")
        with self.lock:
            alloc = self.pool.acquire(need)
        if alloc is None:
            return pb.StartActorReply(ok=False, error="RETRY")
        rec = self.workers.take_idle(self.settings.start_timeout) or self._new_worker()
        if rec is None:
            with self.lock:
                self.pool.release(alloc)
            return pb.StartActorReply(ok=False, error="RETRY")
        rec.state, rec.alloc, rec.actor_id = "actor", alloc, spec.actor_id
        rec.ready.clear()
        rec.conn.send(("create_actor", spec.creation_task, alloc.gpu_ids, need))
        rec.ready.wait()
        if rec.state == "dead":
            return pb.StartActorReply(ok=False, error="RETRY")
        if rec.reply is not None:
            from rayx import serialization
            err = serialization.deserialize(rec.reply)[0]
            self.workers.kill(rec)
            return pb.StartActorReply(ok=False, error=(
                f"the actor's constructor raised: {err}"), error_value=rec.reply)
        return pb.StartActorReply(ok=True, worker_address=rec.address, worker_id=rec.worker_id)

    # ------------------------------------------------------------------ objects

    def ReserveObject(self, request, context):
        ok, error, path, reuse = self._reserve(request.object_id, request.size)
        return pb.ReserveReply(ok=ok, error=error, path=path, reuse=reuse)

    def SealObject(self, request, context):
        self.store.seal(request.object_id, request.size, request.owner_id)
        return pb.Empty()

    def _reserve(self, oid: str, size: int) -> tuple[bool, str, str, str]:
        try:
            path, reuse = self.store.reserve(oid, size, reuse=True)
        except ObjectStoreFullError as exc:
            return False, str(exc), "", ""
        return True, "", path, reuse

    def _on_worker_store(self, conn: wire.Connection, msg) -> None:
        """A worker's reserve or seal over its node socket (store_files.SocketStoreCalls),
        answered on the same socket; the gRPC methods above serve drivers."""
        kind, n = msg[0], msg[1]
        if kind == "free":  # the worker gave up waiting for its last call: undo that call
            self.store.free([msg[2]])
            return
        try:
            if kind == "reserve":
                answer = ("ok", self._reserve(msg[2], msg[3]))
            else:
                self.store.seal(msg[2], msg[3], msg[4])
                answer = ("ok", None)
        except Exception as exc:  # the worker's call fails, not this node's socket
            log.exception("store %s of object %s failed", kind, msg[2])
            answer = ("error", f"{type(exc).__name__}: {exc}")
        try:
            conn.send(("store_reply", n, answer))
        except ConnectionError:
            pass  # the worker is gone: nothing waits for this answer

    def FreeObjects(self, request, context):
        self._free(list(request.object_ids))
        return pb.Empty()

    def _free(self, oids: list[str]) -> None:
        """Free objects here and the copies other nodes pulled from here."""
        self.store.free(oids)
        by_node: dict[str, list[str]] = {}
        with self.lock:
            for oid in oids:
                for address in self.copies.pop(oid, ()):
                    by_node.setdefault(address, []).append(oid)
        for address, copies in by_node.items():
            rpc.call_async(self._peer(address).FreeObjects, pb.ObjectIds(object_ids=copies),
                           timeout=10)

    def _peer(self, address: str):
        peer = self._peers.get(address)
        if peer is None:
            peer = self._peers[address] = rpc.node_stub(rpc.channel(address, self.token,
                                                                    self.tls))
        return peer

    def RestoreObject(self, request, context):
        try:
            if request.from_node and not self.store.contains(request.object_id):
                return self._pull(request.object_id, request.from_node)
            return pb.RestoreReply(ok=True, path=self.store.restore(request.object_id))
        except (ObjectLostError, ObjectStoreFullError, OSError) as exc:
            return pb.RestoreReply(ok=False, error=str(exc))

    def _pull(self, oid: str, from_address: str) -> pb.RestoreReply:
        """Copy an object from another node's store into this one (rayx/transfer.py)."""
        node = next((n for n in self._nodes() if n.address == from_address), None)
        if node is None:
            self._nodes_at = 0.0  # maybe a node that joined since the last look
            node = next((n for n in self._nodes() if n.address == from_address), None)
        if node is None or not node.transfer_port:
            return pb.RestoreReply(ok=False, error=f"the node at {from_address} is gone")
        try:
            path, size = pull(from_address.rsplit(":", 1)[0], node.transfer_port, self.token,
                              oid, self.address, lambda size: self.store.reserve(oid, size)[0])
        except (ObjectLostError, ObjectStoreFullError, OSError) as exc:
            self.store.free([oid])
            return pb.RestoreReply(ok=False, error=f"pulling from {from_address}: {exc}")
        self.store.seal(oid, size, owner_id="")
        return pb.RestoreReply(ok=True, path=path)

    def _serve_copy(self, oid: str, puller: str) -> str:
        path = self.store.restore(oid)
        with self.lock:
            self.copies.setdefault(oid, set()).add(puller)
        return path

    # ------------------------------------------------------------------ clients

    def RegisterClient(self, request, context):
        with self.lock:
            self.clients[request.client_id] = request.pid
        return pb.Empty()

    def UnregisterClient(self, request, context):
        with self.lock:
            self.clients.pop(request.client_id, None)
        self._owner_gone(request.client_id)
        return pb.Empty()

    def _owner_gone(self, owner_id: str) -> None:
        """Free what a gone driver or worker of this node owned: its objects, its leases here;
        the head then releases its leases elsewhere and ends its non-detached actors."""
        self._free(self.store.free_owner(owner_id))
        self._release_leases_of(owner_id)
        if not self.stopped.is_set():
            rpc.call_async(self.head.OwnerDied, pb.OwnerInfo(owner_id=owner_id), timeout=10)

    def OwnerGone(self, request, context):
        """The head says an owner of another node is gone: release the leases it held here."""
        self._release_leases_of(request.owner_id)
        return pb.Empty()

    def _release_leases_of(self, owner_id: str) -> None:
        """The owner will never return these leases; their workers may still run its tasks,
        so they are killed (the pool starts fresh ones)."""
        with self.lock:
            held = [r for r in self.leases.values() if r.lessee == owner_id]
            for rec in held:
                self.leases.pop(rec.lease_id, None)
                self._release(rec)
        for rec in held:
            self.workers.kill(rec)

    def GetResources(self, request, context):
        return self._info()

    def Shutdown(self, request, context):
        self.stopped.set()
        return pb.Empty()

    def _watch_loop(self) -> None:
        """Heartbeats to the head; drivers' liveness; the local cluster's driver; SIGKILL for
        what ended workers started and left behind; free store files left unused."""
        last_beat = 0.0
        while not self.stopped.wait(0.1):
            if self.driver_pid and not psutil.pid_exists(self.driver_pid):
                log.info("driver %d exited: shutting the local cluster down", self.driver_pid)
                self.stopped.set()
                return
            with self.lock:
                gone = [c for c, pid in self.clients.items() if not psutil.pid_exists(pid)]
                for c in gone:
                    del self.clients[c]
            for c in gone:
                self._owner_gone(c)
            self.workers.reap_groups()
            self.store.trim_free_files()
            if time.monotonic() - last_beat >= self.settings.heartbeat_interval:
                last_beat = time.monotonic()
                info = self._info()
                with self.lock:
                    demand, self.demand = self.demand, {}
                try:
                    self.head.Heartbeat(pb.HeartbeatRequest(
                        node_id=self.node_id, available=info.available,
                        pending_demand=pb.ResourceMap(amounts=demand)), timeout=5)
                except Exception as exc:
                    log.warning("heartbeat to the head failed: %s", exc)

    def stop(self) -> None:
        """Stop the watcher, every worker and the fork server; remove every object."""
        self.stopped.set()
        if self._watcher.is_alive() and self._watcher is not threading.current_thread():
            self._watcher.join(5)
        self.transfer.stop()
        self.workers.stop()
        self.store.destroy()
