"""The owner's bookkeeping of object references, free of I/O (design point 2: ownership).

Fields of one Entry:
    owned         this process created the reference (put, or a task it submitted)
    owner_address the owner's socket, where borrowers ask for the value
    desc          the object descriptor once ready (see task_spec.py); None while pending
    local_refs    live ObjectRef instances in this process
    pins          pending tasks of this process that take the object as an argument
    contained     objects alive here whose value holds this reference (a put, a task result)
    nested        the references this object's value holds, released when it goes
    borrowers     owned only: other processes' registrations, by address -> count
    adds          borrowed only: how many registrations the owner counts for this process
    escaped       pickled into an actor's creation arguments; kept until the owner exits
    callbacks     functions to call with the descriptor when it becomes ready
    lineage       the TaskSpec that makes the object, for retries and reconstruction

The borrower protocol: a process that unpickles a reference it neither owns nor holds yet
registers with the owner (one `adds`), while whatever carried the pickle still holds the
reference; when its entry goes it sends those adds back. An owned entry goes once nothing here
and no borrower holds it; the caller then frees its store copy and releases what it nested.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from rayx.task_spec import TaskSpec


@dataclass(slots=True)
class Entry:
    owned: bool
    owner_address: str
    desc: tuple | None = None
    local_refs: int = 0
    pins: int = 0
    contained: int = 0
    nested: list | None = None
    borrowers: dict | None = None
    adds: int = 0
    escaped: bool = False
    callbacks: list | None = None
    lineage: TaskSpec | None = None


@dataclass(slots=True)
class Drops:
    """What went away in one table operation, for the caller to act on outside the lock."""

    free: list = field(default_factory=list)     # (object id, descriptor) of owned objects
    returns: dict = field(default_factory=dict)  # owner address -> [(object id, adds)]

    def __bool__(self) -> bool:
        return bool(self.free or self.returns)


class OwnershipTable:
    """Object id -> Entry, with the rules for when an entry can go."""

    def __init__(self, address: str = ""):
        self.address = address  # this process's own, so refs it owns are never registered
        self.entries: dict[str, Entry] = {}
        self.lock = threading.Lock()

    def add_owned(self, oid: str, address: str, desc: tuple | None = None,
                  lineage: TaskSpec | None = None) -> None:
        with self.lock:
            self.entries[oid] = Entry(True, address, desc, lineage=lineage)

    def add_ref(self, oid: str, owner_address: str) -> bool:
        """A new ObjectRef instance for `oid` exists in this process. True when this process
        must now register with the owner as a borrower (counted here as one add already)."""
        with self.lock:
            e = self.entries.get(oid)
            if e is None:
                e = self.entries[oid] = Entry(False, owner_address)
            e.local_refs += 1
            if e.owned or e.adds or owner_address == self.address:
                return False
            e.adds = 1
            return True

    def remove_ref(self, oid: str, out: Drops) -> None:
        """An ObjectRef instance died."""
        with self.lock:
            e = self.entries.get(oid)
            if e is not None:
                e.local_refs -= 1
                self._maybe_drop(oid, e, out)

    def _maybe_drop(self, oid: str, e: Entry, out: Drops) -> None:
        """Lock held. Drop the entry if nothing holds it, then what its value nested."""
        stack = [(oid, e)]
        while stack:
            oid, e = stack.pop()
            if (e.local_refs > 0 or e.pins > 0 or e.contained > 0 or e.borrowers
                    or e.escaped or e.callbacks):
                continue
            if e.owned and e.desc is None:  # its task is still running; drop when it completes
                continue
            del self.entries[oid]
            if e.owned:
                if e.desc[0] == "s":
                    out.free.append((oid, e.desc))
            elif e.adds:
                out.returns.setdefault(e.owner_address, []).append((oid, e.adds))
            for nid in e.nested or ():
                ne = self.entries.get(nid)
                if ne is not None:
                    ne.contained -= 1
                    stack.append((nid, ne))

    def pin(self, oids) -> None:
        with self.lock:
            for oid in oids:
                e = self.entries.get(oid)
                if e is not None:
                    e.pins += 1

    def unpin(self, oids, out: Drops) -> None:
        """Release task pins."""
        with self.lock:
            for oid in oids:
                e = self.entries.get(oid)
                if e is not None:
                    e.pins -= 1
                    self._maybe_drop(oid, e, out)

    def mark_escaped(self, oids) -> None:
        with self.lock:
            for oid in oids:
                e = self.entries.get(oid)
                if e is not None:
                    e.escaped = True

    def contain(self, oid: str, nested, registered: bool, out: Drops) -> None:
        """The value of owned object `oid` holds the references `nested` ((id, owner) pairs):
        keep each alive while `oid` lives. `registered`: the process that pickled them has
        already registered this one with their owners (a task's results), one add each."""
        with self.lock:
            outer = self.entries.get(oid)
            held = []
            for nid, owner in nested:
                ne = self.entries.get(nid)
                if ne is None:
                    ne = self.entries[nid] = Entry(False, owner)
                ne.contained += 1
                if registered and not ne.owned and owner != self.address:
                    ne.adds += 1
                held.append(nid)
            if outer is not None:
                outer.nested = (outer.nested or []) + held
                return
            for nid in held:  # the outer object is already gone: let go at once
                ne = self.entries[nid]
                ne.contained -= 1
                self._maybe_drop(nid, ne, out)

    def add_borrower(self, oids, borrower: str, out: Drops) -> list[str]:
        """Count one registration of `borrower` on each owned object; returns the unknown ids.
        A registration that a release overtook brings the count back to zero: then it goes."""
        unknown = []
        with self.lock:
            for oid in oids:
                e = self.entries.get(oid)
                if e is None or not e.owned:
                    unknown.append(oid)
                    continue
                if e.borrowers is None:
                    e.borrowers = {}
                count = e.borrowers.get(borrower, 0) + 1
                if count:
                    e.borrowers[borrower] = count
                else:
                    e.borrowers.pop(borrower, None)
                    self._maybe_drop(oid, e, out)
        return unknown

    def remove_borrower(self, items, borrower: str, out: Drops) -> None:
        """`borrower` let go of (id, adds) pairs. A count below zero stays: an add on its way
        must not find the object freed."""
        with self.lock:
            for oid, n in items:
                e = self.entries.get(oid)
                if e is None or not e.owned:
                    continue
                if e.borrowers is None:
                    e.borrowers = {}
                left = e.borrowers.get(borrower, 0) - n
                if left:
                    e.borrowers[borrower] = left
                else:
                    e.borrowers.pop(borrower, None)
                    self._maybe_drop(oid, e, out)

    def borrower_gone(self, borrower: str, out: Drops) -> None:
        """A borrowing process exited: forget all of its registrations."""
        with self.lock:
            for oid, e in list(self.entries.items()):
                if e.borrowers and e.borrowers.pop(borrower, None) is not None:
                    self._maybe_drop(oid, e, out)

    def complete(self, oid: str, desc: tuple, out: Drops) -> list[Callable]:
        """The object is ready. Returns the callbacks to run."""
        with self.lock:
            e = self.entries.get(oid)
            if e is None:
                if desc[0] == "s":
                    out.free.append((oid, desc))
                return []
            e.desc = desc
            cbs, e.callbacks = e.callbacks or [], None
            self._maybe_drop(oid, e, out)
            return cbs

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
