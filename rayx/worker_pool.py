"""The node's workers: started through the fork server, registered, leased, watched.

    node manager --worker id--> fork server --fork--> worker --("register")--> nm socket
    worker --("reserve"|"seal", n, ...)--> nm socket --("store_reply", n, reply)--> worker
    worker --("free", 0, oid)--> nm socket: undo a store call the worker gave up waiting for
    worker connection closes --> on_death(record): the node releases what it held

A worker record's `state` is one of: starting, idle, leased, actor.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from rayx import ids, wire
from rayx.config import socket_path
from rayx.scheduler import Allocation

GROUP_GRACE = 1.0  # seconds the processes a worker started get after SIGTERM, before SIGKILL


@dataclass(slots=True, eq=False)
class WorkerRecord:
    worker_id: str
    state: str = "starting"
    pid: int = 0
    address: str = ""
    conn: wire.Connection | None = None
    alloc: Allocation | None = None
    lease_id: str = ""
    lessee: str = ""  # the owner (driver or worker client id) holding the lease
    lent_cpus: float = 0.0
    actor_id: str = ""
    prestarted: bool = False  # started ahead of demand: joins the idle pool when it registers
    ready: threading.Event = field(default_factory=threading.Event)
    reply: object = None  # the worker's answer to a create_actor


class WorkerPool:
    """Starts workers from the fork server and tracks them by id."""

    def __init__(self, session_dir: str, worker_config: dict, on_death, stdout=None,
                 on_store=None):
        self.session_dir = session_dir
        self.on_death = on_death
        self.on_store = on_store  # (conn, msg) for a worker's "reserve", "seal" and "free"
        self.workers: dict[str, WorkerRecord] = {}
        self.idle: list[WorkerRecord] = []
        self.lock = threading.Lock()
        self.idle_cond = threading.Condition(self.lock)
        sock = socket_path(session_dir, f"nm-{worker_config['node_id'][:12]}.sock")
        self.listener = wire.Listener(f"unix:{sock}", worker_config["token"], self._on_message,
                                      self._on_closed).start()
        worker_config = dict(worker_config, nm_socket=sock)
        self.fork_server = subprocess.Popen(
            [sys.executable, "-m", "rayx.fork_server", json.dumps(worker_config)],
            stdin=subprocess.PIPE, stdout=stdout, stderr=stdout, start_new_session=False)
        self._stopped = False
        # process groups of workers that ended, still holding what their tasks started:
        # pgid -> when they get SIGKILL (reap_groups, from the node's watch loop, and stop)
        self._ending_groups: dict[int, float] = {}

    def start_worker(self, prestart: bool = False) -> WorkerRecord:
        rec = WorkerRecord(ids.new_id(), prestarted=prestart)
        with self.lock:
            self.workers[rec.worker_id] = rec
        try:
            self.fork_server.stdin.write(rec.worker_id.encode() + b"\n")
            self.fork_server.stdin.flush()
        except (BrokenPipeError, ValueError):
            rec.ready.set()
        return rec

    def _on_message(self, conn: wire.Connection, msg) -> None:
        kind = msg[0]
        if kind == "register":
            _, worker_id, pid, address = msg
            with self.lock:
                rec = self.workers.get(worker_id)
                if rec is None:
                    conn.close()
                    return
                rec.pid, rec.address, rec.conn = pid, address, conn
                conn.peer = rec
                if rec.state == "starting":
                    rec.state = "idle"
                    if rec.prestarted:
                        self.idle.append(rec)
                    # every waiter looks again: one takes this worker, the others see whether
                    # a prestarted worker is still starting, else fork their own at once
                    self.idle_cond.notify_all()
            rec.ready.set()
        elif kind == "actor_created":
            rec = conn.peer
            rec.reply = msg[2]
            rec.ready.set()
        elif kind in ("reserve", "seal", "free") and self.on_store is not None:
            self.on_store(conn, msg)

    def _on_closed(self, conn: wire.Connection) -> None:
        rec = conn.peer
        if rec is None:
            return
        with self.lock:
            self.workers.pop(rec.worker_id, None)
            if rec in self.idle:
                self.idle.remove(rec)
            rec.state = "dead"
            self.idle_cond.notify_all()
            if rec.pid:  # its group had SIGTERM from the worker or from kill()
                self._ending_groups.setdefault(rec.pid, time.monotonic() + GROUP_GRACE)
        wire.remove_socket_file(rec.address)  # a worker ends by os._exit or a signal
        rec.ready.set()
        if not self._stopped:
            self.on_death(rec)

    def take_idle(self, timeout: float) -> WorkerRecord | None:
        """An idle worker; waits for a prestarted one still starting rather than fork more."""
        deadline = time.monotonic() + timeout
        with self.lock:
            while True:
                while self.idle:
                    rec = self.idle.pop()
                    if rec.state == "idle":
                        return rec
                starting = any(r.prestarted and r.state == "starting"
                               for r in self.workers.values())
                left = deadline - time.monotonic()
                if not starting or left <= 0:
                    return None
                self.idle_cond.wait(left)

    def put_idle(self, rec: WorkerRecord) -> None:
        with self.lock:
            if rec.state != "dead" and rec.worker_id in self.workers:
                rec.state = "idle"
                self.idle.append(rec)
                self.idle_cond.notify()

    def get(self, worker_id: str) -> WorkerRecord | None:
        return self.workers.get(worker_id)

    def kill(self, rec: WorkerRecord) -> None:
        """SIGKILL the worker, then SIGTERM its process group: what its tasks started goes too
        (what ignores SIGTERM gets SIGKILL GROUP_GRACE later, see reap_groups)."""
        if rec.pid:
            try:
                os.kill(rec.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            _signal_group(rec.pid, signal.SIGTERM)

    def reap_groups(self) -> None:
        """SIGKILL the groups of ended workers whose grace is over; forget the empty ones."""
        now = time.monotonic()
        with self.lock:
            live = {r.pid for r in self.workers.values()}  # a reused pid leads a new worker
            due = [g for g, t in self._ending_groups.items() if t <= now or g in live]
            for pgid in due:
                del self._ending_groups[pgid]
        for pgid in due:
            if pgid not in live:
                _signal_group(pgid, signal.SIGKILL)

    def stop(self) -> None:
        """Kill every worker and what their tasks started, then the fork server."""
        self._stopped = True
        with self.lock:
            recs = list(self.workers.values())
        for rec in recs:
            self.kill(rec)
        with self.lock:
            groups = set(self._ending_groups) | {rec.pid for rec in recs if rec.pid}
            self._ending_groups.clear()
        deadline = time.monotonic() + GROUP_GRACE  # one grace for all: stop is bounded
        for pgid in groups:
            if not _wait_group_gone(pgid, deadline - time.monotonic()):
                _signal_group(pgid, signal.SIGKILL)
        for rec in recs:  # while the fork server lives, it reaps them: no zombies left
            _wait_gone(rec.pid, 2.0)
            wire.remove_socket_file(rec.address)
        try:
            self.fork_server.stdin.close()
        except OSError:
            pass
        self.fork_server.kill()
        self.fork_server.wait(5)
        self.listener.stop()


def _signal_group(pgid: int, sig: int) -> bool:
    """Send `sig` to a worker's process group; False when no process is left in it."""
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _wait_group_gone(pgid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _signal_group(pgid, 0):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _wait_gone(pid: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while pid and time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.01)
