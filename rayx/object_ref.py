"""ObjectRef: a handle to a value that is, or will be, in the cluster."""

from __future__ import annotations

import asyncio
import concurrent.futures

from rayx import serialization


class ObjectRef:
    """A reference to an object owned by one process; counted so the owner knows when to free."""

    __slots__ = ("id", "owner_address", "_core", "__weakref__")

    def __init__(self, object_id: str, owner_address: str, core, *, counted: bool = True):
        self.id = object_id
        self.owner_address = owner_address
        self._core = core if counted else None
        if counted and core.table.add_ref(object_id, owner_address):
            core.register_borrow(object_id, owner_address)

    def hex(self) -> str:
        return self.id

    def __dask_tokenize__(self) -> str:
        return self.id

    def __repr__(self) -> str:
        return f"ObjectRef({self.id})"

    def __hash__(self) -> int:
        return hash(self.id)

    def __eq__(self, other) -> bool:
        return isinstance(other, ObjectRef) and other.id == self.id

    def __del__(self) -> None:
        core = self._core
        if core is not None:
            try:
                core.release_ref_soon(self.id)
            except Exception:  # interpreter shutdown: modules may already be gone
                pass

    def __reduce__(self):
        serialization.note_pickled_ref(self)
        return (_rebuild, (self.id, self.owner_address))

    def future(self) -> concurrent.futures.Future:
        """A concurrent.futures.Future completed with the value (or error) when it is ready."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        core = self._core or _current_core()
        core.when_ready(self, lambda desc: _settle(core, self, fut, desc))
        return fut

    def __await__(self):
        return asyncio.wrap_future(self.future()).__await__()


def _settle(core, ref: ObjectRef, fut: concurrent.futures.Future, desc: tuple) -> None:
    if not fut.set_running_or_notify_cancel():
        return
    try:
        fut.set_result(core.value(ref, desc))
    except BaseException as exc:
        fut.set_exception(exc)


def _current_core():
    from rayx import api
    return api.core()


def _rebuild(object_id: str, owner_address: str) -> ObjectRef:
    return ObjectRef(object_id, owner_address, _current_core())
