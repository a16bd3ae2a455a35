"""Actor calls: straight from caller to the actor's worker, in order per caller.

    handle.m.remote() -> ActorSubmitter.submit(spec) -- queued at once, in call order
        argument refs pending --> held in the queue until args_ready(spec); later calls wait
        actor address unknown --> head.GetActor(wait_alive) --> connect --> flush queue
        connected ------------> ("actor_call", spec) on the one connection to that actor
    ("done", task_id, descs) <- worker
    connection lost --> calls in flight retried after restart (max_task_retries) or failed with
                        ActorDiedError; the next call asks the head for the new address
    the head still names the lost address (it has not heard of the death yet) --> ask again
                        shortly; calls lost again on that same address do not count as retries
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

from rayx import rpc, wire
from rayx.exceptions import ActorDiedError, TaskCancelledError
from rayx.protocol import rayx_pb2 as pb
from rayx.submitter import echo_output
from rayx.task_spec import TaskSpec


@dataclass(slots=True)
class ActorConn:
    actor_id: str
    conn: wire.Connection | None = None
    queue: deque = field(default_factory=deque)
    inflight: dict = field(default_factory=dict)
    waiting: set = field(default_factory=set)  # queued task ids whose arguments are pending
    resolving: bool = False
    dead: str = ""  # why the actor is dead, once it is
    lost_address: str = ""  # the address of the incarnation whose connection was last lost
    lost_at: float = 0.0


STALE_ADDRESS_WAIT = 2.0  # seconds to wait for the head to replace a lost address, at most
STALE_ADDRESS_POLL = 0.02


class ActorSubmitter:
    """One connection per actor this process calls; calls queue while the actor is starting."""

    def __init__(self, core):
        self.core = core
        self.actors: dict[str, ActorConn] = {}
        self.lock = threading.Lock()
        self.closed = False

    def submit(self, spec: TaskSpec, args_pending: bool = False) -> bool:
        """Queue a call in call order; with args_pending it is held until args_ready(spec).
        Returns False when the actor is known dead: the call failed at once."""
        with self.lock:
            ac = self.actors.get(spec.actor_id)
            if ac is None:
                ac = self.actors[spec.actor_id] = ActorConn(spec.actor_id)
            dead = ac.dead
            if not dead:
                if args_pending:
                    ac.waiting.add(spec.task_id)
                ac.queue.append(spec)
                self._flush(ac)
        if dead:
            self.core.fail_task(spec, ActorDiedError(dead))
        return not dead

    def args_ready(self, spec: TaskSpec) -> None:
        """The call's argument refs are resolved: it may go once the calls before it went."""
        with self.lock:
            ac = self.actors[spec.actor_id]
            ac.waiting.discard(spec.task_id)
            self._flush(ac)

    def drop(self, spec: TaskSpec) -> None:
        """The call will never be sent (an argument failed): let the calls after it go."""
        with self.lock:
            ac = self.actors[spec.actor_id]
            ac.waiting.discard(spec.task_id)
            if spec in ac.queue:
                ac.queue.remove(spec)
            self._flush(ac)

    def _flush(self, ac: ActorConn) -> None:
        """Send queued calls in order, up to the first one still waiting for arguments. Lock
        held. Without a connection, ask where the actor lives."""
        if ac.conn is None:
            if ac.queue:
                self._resolve(ac)
            return
        while ac.queue and ac.queue[0].task_id not in ac.waiting:
            self._send(ac, ac.queue.popleft())

    def _send(self, ac: ActorConn, spec: TaskSpec) -> None:
        ac.inflight[spec.task_id] = spec
        try:
            ac.conn.send(("actor_call", spec))
        except ConnectionError:
            pass  # the close callback deals with it

    def _resolve(self, ac: ActorConn) -> None:
        """Ask the head where the actor lives, then connect and flush. Lock held."""
        if ac.resolving or ac.conn is not None or self.closed:
            return
        ac.resolving = True
        req = pb.GetActorRequest(actor_id=ac.actor_id, wait_alive=True, timeout=3600)
        # a call that is already done runs its callback right here, under our lock: defer
        rpc.call_async(self.core.head.GetActor, req, callback=lambda f: self.core.timers
                       .call_later(0, lambda: self._on_resolved(ac, f)))

    def _on_resolved(self, ac: ActorConn, fut) -> None:
        try:
            info = fut.result()
            state, cause, address = info.state, info.death_cause, info.worker_address
        except Exception as exc:
            state, cause, address = "DEAD", f"the head could not be reached: {exc}", ""
        conn = None
        if (state == "ALIVE" and address == ac.lost_address
                and time.monotonic() - ac.lost_at < STALE_ADDRESS_WAIT):
            # that incarnation died, but the head has not heard yet (its node reports the death
            # after the caller's connection drops), and a dying process may still accept
            with self.lock:
                ac.resolving = False
            self.core.timers.call_later(STALE_ADDRESS_POLL, lambda: self._resolve_again(ac))
            return
        if state == "ALIVE":
            try:
                conn = wire.connect(address, self.core.token, self._on_msg,
                                    lambda c: self._on_lost(ac, c, address))
                conn.peer = ac
            except OSError:
                conn = None  # it died in between: ask again
        with self.lock:
            ac.resolving = False
            if conn is not None:
                ac.conn = conn
                self._flush(ac)
                return
            if state != "DEAD":
                self._resolve(ac)
                return
            ac.dead = cause or "the actor is dead"
            failed = list(ac.queue)
            ac.queue.clear()
            ac.waiting.clear()
        for spec in failed:
            self.core.fail_task(spec, ActorDiedError(ac.dead))

    def _resolve_again(self, ac: ActorConn) -> None:
        with self.lock:
            if ac.conn is None and not ac.dead:
                self._resolve(ac)

    def _on_msg(self, conn: wire.Connection, msg) -> None:
        if msg[0] == "log":
            echo_output(msg[1], msg[2])
            return
        if msg[0] != "done":
            return
        ac: ActorConn = conn.peer
        with self.lock:
            spec = ac.inflight.pop(msg[1], None)
        if spec is not None:
            self.core.finish_task(spec, msg[2], msg[3] if len(msg) > 3 else None)

    def _on_lost(self, ac: ActorConn, conn: wire.Connection, address: str) -> None:
        with self.lock:
            if ac.conn is conn:
                ac.conn = None
            # the incarnation lost moments ago, reached again before the head knew: no new failure
            again = (address == ac.lost_address
                     and time.monotonic() - ac.lost_at < STALE_ADDRESS_WAIT)
            if not again:
                ac.lost_address, ac.lost_at = address, time.monotonic()
            lost = sorted(ac.inflight.values(), key=lambda s: s.attempt)
            ac.inflight.clear()
            retry = [s for s in lost if again or s.attempt < s.max_retries]
            for s in retry:
                s.attempt += 0 if again else 1
            ac.queue.extendleft(reversed(retry))
            failed = [s for s in lost if s not in retry]
            if ac.queue and not self.closed:
                self._resolve(ac)
        for spec in failed:
            self.core.fail_task(spec, ActorDiedError(
                f"the actor died while running {spec.name}; it was not retried "
                f"(max_task_retries={spec.max_retries})"))

    def cancel(self, spec: TaskSpec, force: bool) -> None:
        with self.lock:
            ac = self.actors.get(spec.actor_id)
            queued = ac is not None and spec in ac.queue
            if queued:
                ac.queue.remove(spec)
                ac.waiting.discard(spec.task_id)
                self._flush(ac)
        if queued:
            self.core.fail_task(spec, TaskCancelledError(f"call {spec.name} was cancelled"))
        elif ac is not None and ac.conn is not None:
            try:
                ac.conn.send(("cancel", spec.task_id))
            except ConnectionError:
                pass

    def forget(self, actor_id: str, cause: str) -> None:
        """The actor was killed from here: fail what waits for it without asking the head."""
        with self.lock:
            ac = self.actors.get(actor_id)
            if ac is None:
                return
            ac.dead = cause

    def close(self) -> None:
        with self.lock:
            self.closed = True
            conns = [ac.conn for ac in self.actors.values() if ac.conn is not None]
        for c in conns:
            c.on_close = None
            c.close()
