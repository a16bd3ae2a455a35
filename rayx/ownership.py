"""The owner's bookkeeping of object references, free of I/O (design point 2: ownership).

Fields of one Entry:
    owned        this process created the reference (put, or a task it submitted)
    owner_address the owner's socket, where borrowers ask for the value
    desc         the object descriptor once ready (see task_spec.py); None while pending
    local_refs   live ObjectRef instances in this process
    pins         pending tasks of this process that take the object as an argument
    escaped      the reference was pickled into another value; kept until the owner exits
    callbacks    functions to call with the descriptor when it becomes ready
    lineage      the TaskSpec that makes the object, for retries and reconstruction

An owned entry goes away when nothing refers to it; the caller then frees its store copy.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from rayx.task_spec import TaskSpec


@dataclass(slots=True)
class Entry:
    owned: bool
    owner_address: str
    desc: tuple | None = None
    local_refs: int = 0
    pins: int = 0
    escaped: bool = False
    callbacks: list | None = None
    lineage: TaskSpec | None = None


class OwnershipTable:
    """Object id -> Entry, with the rules for when an entry can go."""

    def __init__(self):
        self.entries: dict[str, Entry] = {}
        self.lock = threading.Lock()

    def add_owned(self, oid: str, address: str, desc: tuple | None = None,
                  lineage: TaskSpec | None = None) -> None:
        with self.lock:
            self.entries[oid] = Entry(True, address, desc, lineage=lineage)

    def add_ref(self, oid: str, owner_address: str) -> None:
        """A new ObjectRef instance for `oid` exists in this process."""
        with self.lock:
            e = self.entries.get(oid)
            if e is None:
                e = self.entries[oid] = Entry(False, owner_address)
            e.local_refs += 1

    def remove_ref(self, oid: str) -> tuple | None:
        """An ObjectRef instance died; returns the descriptor to free when the entry went."""
        with self.lock:
            e = self.entries.get(oid)
            if e is None:
                return None
            e.local_refs -= 1
            return self._maybe_drop(oid, e)

    def _maybe_drop(self, oid: str, e: Entry) -> tuple | None:
        if e.local_refs > 0 or e.pins > 0 or e.escaped or e.callbacks:
            return None
        if e.owned and e.desc is None:  # its task is still running; drop when it completes
            return None
        del self.entries[oid]
        return e.desc if e.owned else None

    def pin(self, oids) -> None:
        with self.lock:
            for oid in oids:
                e = self.entries.get(oid)
                if e is not None:
                    e.pins += 1

    def unpin(self, oids) -> list[tuple[str, tuple]]:
        """Release task pins; returns (id, descriptor) of owned entries that went away."""
        out = []
        with self.lock:
            for oid in oids:
                e = self.entries.get(oid)
                if e is None:
                    continue
                e.pins -= 1
                d = self._maybe_drop(oid, e)
                if d is not None:
                    out.append((oid, d))
        return out

    def mark_escaped(self, oids) -> None:
        with self.lock:
            for oid in oids:
                e = self.entries.get(oid)
                if e is not None:
                    e.escaped = True

    def complete(self, oid: str, desc: tuple) -> tuple[list[Callable], tuple | None]:
        """The object is ready. Returns (callbacks to run, descriptor to free if unreferenced)."""
        with self.lock:
            e = self.entries.get(oid)
            if e is None:
                return [], desc if desc[0] == "s" else None
            e.desc = desc
            cbs, e.callbacks = e.callbacks or [], None
            return cbs, self._maybe_drop(oid, e)

    def on_ready(self, oid: str, cb: Callable[[tuple], None]) -> tuple | None:
        """Call cb(desc) when ready. Returns the descriptor at once (cb not kept) if ready."""
        with self.lock:
            e = self.entries.get(oid)
            if e is None:
                return ("lost",)
            if e.desc is not None:
                return e.desc
            if e.callbacks is None:
                e.callbacks = []
            e.callbacks.append(cb)
            return None

    def remove_callback(self, oid: str, cb: Callable) -> None:
        """Forget a callback that is no longer wanted (a wait() that timed out)."""
        with self.lock:
            e = self.entries.get(oid)
            if e is not None and e.callbacks and cb in e.callbacks:
                e.callbacks.remove(cb)
                if not e.callbacks:
                    e.callbacks = None

    def get(self, oid: str) -> Entry | None:
        return self.entries.get(oid)

    def reset(self, oid: str) -> None:
        """Forget a result so a retried task can fill it in again."""
        with self.lock:
            e = self.entries.get(oid)
            if e is not None:
                e.desc = None
