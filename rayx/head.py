"""The head service: cluster state that is not on the per-task path.

    node managers --RegisterNode/Heartbeat--> node table (dead after settings.node_timeout)
    callers --CreateActor--> actor directory --StartActor--> a node manager that fits
    callers --GetActor(wait_alive)--> address of the actor's worker
    node managers --ReportActorState(WORKER_DIED)--> restart (max_restarts) or DEAD
    anyone --KvPut/KvGet/KvDel/KvKeys--> small key-value store
    drivers --RegisterJob (init) / FinishJob (shutdown)--> job table; OwnerDied of a driver
                                                           whose job still runs, or the death
                                                           of its node -> FAILED

State persists in SQLite (head.db in the session directory), so a restarted head recovers its
actors, names, jobs and KV entries. One background thread (the monitor) owns node liveness and actor
(re)scheduling, handing each start to a small pool of starter threads; stop() ends both.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from rayx import rpc
from rayx.protocol import rayx_pb2 as pb
from rayx.protocol import rayx_pb2_grpc

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ActorRecord:
    spec: pb.ActorSpec
    state: str = "PENDING"
    address: str = ""
    node_id: str = ""
    worker_id: str = ""
    cause: str = ""
    restarts: int = 0
    killed: bool = False


@dataclass(slots=True)
class NodeRecord:
    info: pb.NodeInfo
    last_seen: float = field(default_factory=time.time)


class HeadService(rayx_pb2_grpc.HeadServicer):
    """Node table, actor directory, named actors and KV of one cluster."""

    def __init__(self, db_path: str, token: str, settings):
        self.token = token
        self.settings = settings
        self.nodes: dict[str, NodeRecord] = {}
        self.actors: dict[str, ActorRecord] = {}
        self.names: dict[str, str] = {}
        self.jobs: dict[str, pb.JobInfo] = {}  # job id -> job, in the order they started
        self.cond = threading.Condition()
        self.db = sqlite3.connect(db_path, check_same_thread=False, isolation_level=None)
        self.db.execute("CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value BLOB)")
        self.db.execute("CREATE TABLE IF NOT EXISTS actors (id TEXT PRIMARY KEY, spec BLOB, "
                        "state TEXT, cause TEXT)")
        self.db.execute("CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, info BLOB)")
        self._stubs: dict[str, object] = {}
        self._to_schedule: list[str] = []
        self._starting: set[str] = set()  # actors a starter thread is placing right now
        self._starter = ThreadPoolExecutor(8, thread_name_prefix="rayx-actor-start")
        self._stopped = False
        self._load()
        self._monitor = threading.Thread(target=self._monitor_loop, name="rayx-head-monitor",
                                         daemon=True)

    def start(self) -> HeadService:
        self._monitor.start()
        return self

    def _load(self) -> None:
        for aid, spec_bytes, state, cause in self.db.execute(
                "SELECT id, spec, state, cause FROM actors"):
            spec = pb.ActorSpec.FromString(spec_bytes)
            rec = ActorRecord(spec, state="DEAD" if state == "DEAD" else "RESTARTING",
                              cause=cause or "")
            self.actors[aid] = rec
            if spec.name and rec.state != "DEAD":
                self.names[spec.name] = aid
            if rec.state != "DEAD":
                self._to_schedule.append(aid)
        for (info_bytes,) in self.db.execute("SELECT info FROM jobs ORDER BY rowid"):
            job = pb.JobInfo.FromString(info_bytes)
            self.jobs[job.job_id] = job

    def _persist(self, rec: ActorRecord) -> None:
        with self.cond:
            self.db.execute("INSERT OR REPLACE INTO actors VALUES (?, ?, ?, ?)",
                            (rec.spec.actor_id, rec.spec.SerializeToString(), rec.state,
                             rec.cause))

    # ------------------------------------------------------------------ nodes

    def RegisterNode(self, request, context):
        with self.cond:
            self.nodes[request.node_id] = NodeRecord(request)
            request.alive = True
            self.cond.notify_all()
        return pb.RegisterNodeReply()

    def Heartbeat(self, request, context):
        with self.cond:
            rec = self.nodes.get(request.node_id)
            if rec is not None and rec.info.alive:
                rec.last_seen = time.time()
                rec.info.available.CopyFrom(request.available)
                rec.info.pending_demand.CopyFrom(request.pending_demand)
                rec.info.last_heartbeat = rec.last_seen
        return pb.Empty()

    def GetNodes(self, request, context):
        with self.cond:
            return pb.NodeList(nodes=[r.info for r in self.nodes.values()])

    def alive_nodes(self) -> list[pb.NodeInfo]:
        with self.cond:
            return [r.info for r in self.nodes.values() if r.info.alive]

    def _node_stub(self, address: str):
        stub = self._stubs.get(address)
        if stub is None:
            stub = self._stubs[address] = rpc.node_stub(
                rpc.channel(address, self.token, rpc.client_tls(self.settings)))
        return stub

    # ------------------------------------------------------------------ actors

    def CreateActor(self, request, context):
        with self.cond:
            if request.name:
                other = self.names.get(request.name)
                if other is not None and self.actors[other].state != "DEAD":
                    return pb.CreateActorReply(ok=False, error=(
                        f"an actor named {request.name!r} already exists; pick another name "
                        "or fetch it with rayx.get_actor()"))
                self.names[request.name] = request.actor_id
            rec = self.actors[request.actor_id] = ActorRecord(request)
            self._to_schedule.append(request.actor_id)
            self.cond.notify_all()
        self._persist(rec)
        return pb.CreateActorReply(ok=True)

    def GetActor(self, request, context):
        deadline = time.monotonic() + (request.timeout or 0)
        with self.cond:
            aid = request.actor_id or self.names.get(request.name, "")
            rec = self.actors.get(aid)
            while (rec is not None and request.wait_alive and rec.state not in ("ALIVE", "DEAD")
                   and time.monotonic() < deadline and context.is_active()):
                self.cond.wait(min(1.0, max(0.0, deadline - time.monotonic())))
            if rec is None:
                return pb.ActorInfo(state="NONE")
            return self._info(rec)

    def _info(self, rec: ActorRecord) -> pb.ActorInfo:
        return pb.ActorInfo(actor_id=rec.spec.actor_id, state=rec.state,
                            worker_address=rec.address, death_cause=rec.cause,
                            handle_meta=rec.spec.handle_meta, num_restarts=rec.restarts,
                            node_id=rec.node_id)

    def ReportActorState(self, request, context):
        """A node reports that an actor's worker died: restart it or declare it dead."""
        with self.cond:
            rec = self.actors.get(request.actor_id)
            if rec is None or rec.state == "DEAD" or rec.worker_id != request.worker_id:
                return pb.Empty()
            self._worker_died(rec, request.death_cause or "its worker process died")
        self._persist(rec)
        return pb.Empty()

    def _worker_died(self, rec: ActorRecord, cause: str) -> None:
        """Lock held."""
        rec.address = ""
        limit = rec.spec.max_restarts
        if not rec.killed and (limit < 0 or rec.restarts < limit):
            rec.restarts += 1
            rec.state = "RESTARTING"
            self._to_schedule.append(rec.spec.actor_id)
        else:
            rec.state = "DEAD"
            rec.cause = (f"actor {rec.spec.actor_id[:12]} died: {cause}"
                         + (f" (restarted {rec.restarts} of max_restarts={limit} times)"
                            if not rec.killed else ""))
        self.cond.notify_all()

    def KillActor(self, request, context):
        with self.cond:
            rec = self.actors.get(request.actor_id)
            if rec is None:
                return pb.Empty()
            rec.killed = rec.killed or request.no_restart
            address, worker_id = rec.node_id, rec.worker_id
            if rec.state in ("PENDING", "RESTARTING") and rec.killed:
                rec.state, rec.cause = "DEAD", "the actor was killed with rayx.kill()"
                self.cond.notify_all()
        node = self._node_by_id(address)
        if node is not None and worker_id:
            self._node_stub(node.address).KillWorker(pb.KillWorkerRequest(worker_id=worker_id))
        with self.cond:
            if rec.killed and rec.state != "DEAD" and not worker_id:
                rec.state, rec.cause = "DEAD", "the actor was killed with rayx.kill()"
            self.cond.notify_all()
        self._persist(rec)
        return pb.Empty()

    def OwnerDied(self, request, context):
        """A driver or worker is gone: release the leases it held on every node, end its actors
        not created detached, and fail its job if it was a driver that had not finished."""
        self._driver_gone(request.owner_id)
        for node in self.alive_nodes():  # leases it held on other nodes than its own
            try:
                rpc.call_async(self._node_stub(node.address).OwnerGone, request, timeout=10)
            except Exception as exc:
                log.warning("could not tell node %s that owner %s is gone: %s",
                            node.node_id[:12], request.owner_id[:12], exc)
        for aid in self.actors_owned_by(request.owner_id):
            self.KillActor(pb.KillActorRequest(actor_id=aid, no_restart=True), context)
        return pb.Empty()

    def _node_by_id(self, node_id: str) -> pb.NodeInfo | None:
        with self.cond:
            rec = self.nodes.get(node_id)
            return rec.info if rec is not None else None

    def actors_owned_by(self, owner_id: str) -> list[str]:
        with self.cond:
            return [a for a, r in self.actors.items()
                    if r.spec.owner_id == owner_id and not r.spec.detached
                    and r.state != "DEAD"]

    def _schedule(self, aid: str) -> bool:
        """Start one actor on a node that fits; False to try again later."""
        with self.cond:
            rec = self.actors.get(aid)
            if rec is None or rec.state not in ("PENDING", "RESTARTING"):
                return True  # dead, or already placed by an earlier attempt
            spec = rec.spec
        need = dict(spec.resources.amounts)
        nodes = self.alive_nodes()
        if spec.node_affinity:
            pinned = [n for n in nodes if n.node_id == spec.node_affinity]
            nodes = pinned if pinned or not spec.affinity_soft else nodes
        fitting = [n for n in nodes if all(n.total.amounts.get(k, 0) + 1e-9 >= v
                                           for k, v in need.items())]
        if not fitting:
            if not nodes:
                return False
            with self.cond:
                rec.state = "DEAD"
                rec.cause = (f"the actor needs {need}, more than any node offers "
                             f"({[dict(n.total.amounts) for n in nodes]})")
                self.cond.notify_all()
            self._persist(rec)
            return True
        fitting.sort(key=lambda n: -sum(n.available.amounts.get(k, 0) for k in need))
        for node in fitting:
            try:
                reply = self._node_stub(node.address).StartActor(
                    pb.StartActorRequest(spec=spec), timeout=3600)
            except Exception as exc:
                log.warning("starting actor %s on %s failed: %s", aid, node.address, exc)
                continue
            if reply.ok:
                return self._started(rec, node, reply)
            if reply.error == "RETRY":
                continue
            with self.cond:
                rec.state, rec.cause = "DEAD", reply.error
                self.cond.notify_all()
            self._persist(rec)
            return True
        return False

    def _started(self, rec: ActorRecord, node: pb.NodeInfo, reply) -> bool:
        with self.cond:
            rec.node_id, rec.worker_id = node.node_id, reply.worker_id
            if rec.killed:
                kill = True
            else:
                kill = False
                rec.state, rec.address = "ALIVE", reply.worker_address
            self.cond.notify_all()
        if kill:
            self._node_stub(node.address).KillWorker(
                pb.KillWorkerRequest(worker_id=reply.worker_id))
        self._persist(rec)
        return True

    # ------------------------------------------------------------------ jobs

    def RegisterJob(self, request, context):
        with self.cond:
            job = pb.JobInfo()
            job.CopyFrom(request)
            job.job_id = f"{len(self.jobs) + 1:04d}"
            job.state, job.end_time, job.message = "RUNNING", 0.0, ""
            job.start_time = job.start_time or time.time()
            self.jobs[job.job_id] = job
            self._persist_job(job)
        log.info("job %s started: driver pid %d on %s: %s", job.job_id, job.driver_pid,
                 job.driver_host, job.entrypoint)
        return job

    def FinishJob(self, request, context):
        with self.cond:
            job = self.jobs.get(request.job_id)
            if job is not None and job.state == "RUNNING":
                self._end_job(job, request.state or "SUCCEEDED", request.message)
        return pb.Empty()

    def ListJobs(self, request, context):
        with self.cond:
            return pb.JobList(jobs=list(self.jobs.values()))

    def _driver_gone(self, owner_id: str) -> None:
        with self.cond:
            for job in self.jobs.values():
                if job.driver_id == owner_id and job.state == "RUNNING":
                    self._end_job(job, "FAILED", "the driver process died before "
                                  "rayx.shutdown()")

    def _end_job(self, job: pb.JobInfo, state: str, message: str) -> None:
        """Lock held."""
        job.state = state if state in ("SUCCEEDED", "FAILED") else "FAILED"
        job.message, job.end_time = message, time.time()
        self._persist_job(job)
        log.info("job %s %s%s", job.job_id, job.state.lower(), f": {message}" if message else "")

    def _persist_job(self, job: pb.JobInfo) -> None:
        """Lock held."""
        self.db.execute("INSERT OR REPLACE INTO jobs VALUES (?, ?)",
                        (job.job_id, job.SerializeToString()))

    # ------------------------------------------------------------------ KV

    def KvPut(self, request, context):
        with self.cond:
            self.db.execute("INSERT OR REPLACE INTO kv VALUES (?, ?)",
                            (request.key, request.value))
        return pb.Empty()

    def KvGet(self, request, context):
        with self.cond:
            row = self.db.execute("SELECT value FROM kv WHERE key = ?",
                                  (request.key,)).fetchone()
        return pb.KvReply(found=row is not None, value=row[0] if row else b"")

    def KvDel(self, request, context):
        with self.cond:
            cur = self.db.execute("DELETE FROM kv WHERE key = ?", (request.key,))
        return pb.KvReply(found=cur.rowcount > 0)

    def KvKeys(self, request, context):
        prefix = request.prefix
        with self.cond:  # a range scan, not LIKE: '%' and '_' in keys are not wildcards
            if prefix:
                rows = self.db.execute("SELECT key FROM kv WHERE key >= ? AND substr(key, 1, ?)"
                                       " = ? ORDER BY key", (prefix, len(prefix), prefix))
            else:
                rows = self.db.execute("SELECT key FROM kv ORDER BY key")
            keys = [k for (k,) in rows]
        return pb.KvKeysReply(keys=keys)

    # ------------------------------------------------------------------ monitor

    def _monitor_loop(self) -> None:
        """Declare silent nodes dead; (re)start actors waiting for a node."""
        while True:
            with self.cond:
                if self._stopped:
                    return
                if not self._to_schedule:
                    self.cond.wait(0.2)
                waiting = list(dict.fromkeys(self._to_schedule))
                todo = [a for a in waiting if a not in self._starting]
                self._to_schedule = [a for a in waiting if a in self._starting]
                self._starting.update(todo)
                self._check_nodes()
            for aid in todo:  # a slow constructor must not hold up other actors or liveness
                self._starter.submit(self._start_one, aid)

    def _start_one(self, aid: str) -> None:
        done = self._schedule_safely(aid)
        with self.cond:
            self._starting.discard(aid)
            if not done and not self._stopped and aid not in self._to_schedule:
                self._to_schedule.append(aid)
                self.cond.wait(0.05)  # back off before the monitor tries it again

    def _schedule_safely(self, aid: str) -> bool:
        try:
            return self._schedule(aid)
        except Exception:
            log.exception("scheduling actor %s failed", aid)
            return False

    def _check_nodes(self) -> None:
        """Lock held."""
        now = time.time()
        for rec in self.nodes.values():
            if rec.info.alive and now - rec.last_seen > self.settings.node_timeout:
                rec.info.alive = False
                log.warning("node %s missed heartbeats for %.1f s: declared dead",
                            rec.info.node_id, now - rec.last_seen)
                for actor in self.actors.values():
                    if actor.node_id == rec.info.node_id and actor.state == "ALIVE":
                        self._worker_died(actor, f"its node {rec.info.node_id[:12]} died")
                for job in self.jobs.values():  # its drivers can no longer reach the cluster
                    if job.node_id == rec.info.node_id and job.state == "RUNNING":
                        self._end_job(job, "FAILED", f"the node {rec.info.node_id[:12]} the "
                                      "driver was connected to died")
                self.cond.notify_all()

    def stop(self) -> None:
        with self.cond:
            self._stopped = True
            self.cond.notify_all()
        if self._monitor.is_alive():
            self._monitor.join(5)
        self._starter.shutdown(wait=False, cancel_futures=True)
        self.db.close()
