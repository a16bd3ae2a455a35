"""Values <-> bytes: cloudpickle with pickle protocol 5 out-of-band buffers.

Layout of one serialized object (the same inline and in the shared-memory store):

    magic "RXO1" | flags u32 | nbuf u32 | main_len u64 | (offset u64, length u64) * nbuf
    | main pickle | buffers, each aligned to 64 bytes

Reading maps buffers as slices of one memoryview, so a numpy array read from shared memory is a
zero-copy, read-only view of the store.
"""

from __future__ import annotations

import pickle
import struct
import threading
from dataclasses import dataclass

import cloudpickle

from rayx.exceptions import SerializationError

MAGIC = b"RXO1"
FLAG_ERROR = 1
_HEAD = struct.Struct("<4sIIQ")
_BUF = struct.Struct("<QQ")
_ALIGN = 64

_local = threading.local()


@dataclass(slots=True)
class SerializedObject:
    """A value pickled with its large buffers kept apart, ready to be written somewhere."""

    header: bytes
    main: bytes
    buffers: list[memoryview]
    offsets: list[int]
    size: int

    def write_into(self, target: memoryview) -> None:
        """Copy the object into `target` (at least `size` bytes) — the one copy of a put."""
        n = len(self.header)
        target[:n] = self.header
        target[n:n + len(self.main)] = self.main
        for off, buf in zip(self.offsets, self.buffers):
            target[off:off + buf.nbytes] = buf

    def to_bytes(self) -> bytes:
        """The object as one bytes value, for inline transport."""
        if not self.buffers:
            return self.header + self.main
        out = bytearray(self.size)
        self.write_into(memoryview(out))
        return bytes(out)


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


# types plain pickle handles as cloudpickle does, without cloudpickle's per-call pickler: most
# task arguments and results are one of these
_PLAIN = frozenset((type(None), bool, int, float, complex, str, bytes))


def serialize(value, *, error: bool = False) -> SerializedObject:
    """Pickle `value`; raise SerializationError naming the value when it cannot be pickled."""
    if type(value) in _PLAIN:
        main = pickle.dumps(value, protocol=5)
        return SerializedObject(_HEAD.pack(MAGIC, FLAG_ERROR if error else 0, 0, len(main)),
                                main, [], [], _HEAD.size + len(main))
    buffers: list[pickle.PickleBuffer] = []
    try:
        main = cloudpickle.dumps(value, protocol=5, buffer_callback=buffers.append)
    except Exception as exc:
        raise SerializationError(
            f"could not serialize {_describe(value)}: {type(exc).__name__}: {exc}") from exc
    views = [b.raw() for b in buffers]
    head_len = _HEAD.size + _BUF.size * len(views)
    pos = _align(head_len + len(main))
    offsets = []
    for v in views:
        offsets.append(pos)
        pos = _align(pos + v.nbytes)
    size = pos if views else head_len + len(main)
    header = _HEAD.pack(MAGIC, FLAG_ERROR if error else 0, len(views), len(main)) + b"".join(
        _BUF.pack(o, v.nbytes) for o, v in zip(offsets, views))
    return SerializedObject(header, main, views, offsets, size)


def deserialize(data) -> tuple[object, bool]:
    """Unpickle an object from bytes or a memoryview; returns (value, is_error)."""
    mv = memoryview(data)
    magic, flags, nbuf, main_len = _HEAD.unpack_from(mv, 0)
    if magic != MAGIC:
        raise SerializationError("corrupt object: bad magic bytes")
    pos = _HEAD.size
    bufs = []
    for _ in range(nbuf):
        off, length = _BUF.unpack_from(mv, pos)
        pos += _BUF.size
        bufs.append(mv[off:off + length])
    main = mv[pos:pos + main_len]
    try:
        value = pickle.loads(main, buffers=bufs)
    except Exception as exc:
        raise SerializationError(f"could not deserialize an object: {type(exc).__name__}: "
                                 f"{exc}") from exc
    return value, bool(flags & FLAG_ERROR)


def dumps(obj) -> bytes:
    """Pickle a function, spec or small value with cloudpickle (no out-of-band buffers)."""
    try:
        return cloudpickle.dumps(obj, protocol=5)
    except Exception as exc:
        raise SerializationError(
            f"could not serialize {_describe(obj)}: {type(exc).__name__}: {exc}") from exc


def loads(data):
    """Inverse of dumps()."""
    return pickle.loads(data)


def _describe(value) -> str:
    name = getattr(value, "__qualname__", None) or type(value).__qualname__
    return f"{name!s} ({type(value).__name__})"


class _Collector:
    """Context manager opening a list on this thread, under `slot`, for the pickling hooks
    below to append to; nested uses each get their own list."""

    slot = ""

    def __enter__(self) -> list:
        self.prev = getattr(_local, self.slot, None)
        setattr(_local, self.slot, [])
        return getattr(_local, self.slot)

    def __exit__(self, *exc) -> None:
        setattr(_local, self.slot, self.prev)


class collect_refs(_Collector):
    """Records every ObjectRef pickled on this thread inside it."""

    slot = "refs"


class collect_borrows(_Collector):
    """Records (id, owner) of refs unpickled on this thread inside it that this process must
    register as a borrower (see CoreClient.loads)."""

    slot = "borrows"


def note_pickled_ref(ref) -> None:
    """Called by ObjectRef.__reduce__ so the owner learns which refs escape the process."""
    refs = getattr(_local, "refs", None)
    if refs is not None:
        refs.append(ref)


def note_borrow(oid: str, owner: str) -> bool:
    """Record a borrow inside collect_borrows; False when none is open on this thread."""
    borrows = getattr(_local, "borrows", None)
    if borrows is None:
        return False
    borrows.append((oid, owner))
    return True
