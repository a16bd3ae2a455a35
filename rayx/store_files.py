"""How drivers and workers write and read the node's store files (the node only keeps the books,
rayx/object_store.py).

    put:  ReserveObject -> (path, reuse) --> rewrite the free file `reuse` under an exclusive
          flock, rename it to path; or write path.tmp afresh, rename it to path --> SealObject
    get:  open path, shared flock, map it read-only (the mapping holds the flock while it lives)

A free file is a freed object's file the store kept for the next put of about its size. Its
pages are allocated already, so rewriting it skips the kernel's page allocation and zeroing;
through a mapping this process kept from writing it before, the put is a plain memory copy.
The flocks make reuse safe: a reader's shared flock lives exactly as long as its mapping (the
mmap object holds a duplicate of the locked descriptor), and a writer that cannot take the
exclusive flock at once unlinks the free file instead, leaving that reader its pages.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import threading
from collections import OrderedDict

from rayx.exceptions import RayxSystemError
from rayx.protocol import rayx_pb2 as pb
from rayx.serialization import SerializedObject

MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux 5.14+
KEPT_MAPPINGS = 16  # the most free-file mappings a writer keeps


def write_object(path: str, obj: SerializedObject, reuse: str = "",
                 kept: KeptMappings | None = None) -> None:
    """Write a serialized object to a store file: the single copy of a large put. `reuse`
    is a free file to rewrite instead of a new one, `kept` this process's mappings of those."""
    if reuse and _rewrite(reuse, obj, kept):
        os.rename(reuse, path)
        return
    fd = os.open(path + ".tmp", os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, obj.size)
        _pwrite_object(fd, obj)
    finally:
        os.close(fd)
    os.rename(path + ".tmp", path)  # readers never see a half-written object


def _pwrite_object(fd: int, obj: SerializedObject) -> None:
    n = len(obj.header)
    os.pwrite(fd, obj.header, 0)
    os.pwrite(fd, obj.main, n)
    for off, buf in zip(obj.offsets, obj.buffers):
        view = buf.cast("B")
        done = 0
        while done < view.nbytes:
            done += os.pwrite(fd, view[done:], off + done)


def _rewrite(free_file: str, obj: SerializedObject, kept: KeptMappings | None) -> bool:
    """Write `obj` into a free file under an exclusive flock; False (the file unlinked) if a
    reader still maps it or it is gone."""
    try:
        fd = os.open(free_file, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.unlink(free_file)  # that reader keeps its pages until it lets go, as after a free
            if kept is not None:
                kept.discard(_file_key(fd))  # and we no longer hold them
            return False
        try:
            if os.fstat(fd).st_size != obj.size:
                os.ftruncate(fd, obj.size)
            view = kept.view(fd, obj.size) if kept is not None else None
            if view is None:
                _pwrite_object(fd, obj)
            else:
                with view:
                    obj.write_into(view)
        except BaseException:
            os.unlink(free_file)  # half written: no object's name, and no one else's
            raise
        fcntl.flock(fd, fcntl.LOCK_UN)  # explicitly: a kept mapping shares this descriptor
        return True
    finally:
        os.close(fd)  # the file gets its object's name only after this


class KeptMappings:
    """Writable mappings of the free files this process rewrote, kept so that its next rewrite
    of the same file is a memory copy: no page faults, its page tables are filled already.

    An entry goes when its file is unlinked (checked every `sweep` seconds on the timer
    thread, so the pages of a dropped free file are held at most that much longer), and the
    least recently used goes when more than KEPT_MAPPINGS are kept.
    """

    def __init__(self, sweep: float, timers):
        self.sweep, self.timers = sweep, timers
        # (device, inode) -> (our fd of the file, the mapping); the fd keeps the inode alive,
        # so no other file can have its number while the entry exists
        self._entries: OrderedDict[tuple[int, int], tuple[int, mmap.mmap]] = OrderedDict()
        self._sweeping = False
        self._lock = threading.Lock()

    def view(self, fd: int, size: int) -> memoryview | None:
        """A writable view of the first `size` bytes of the file open at `fd` (a mapping kept
        from before, or a new one with its page tables filled); None if the kernel cannot
        fill page tables ahead (then a write through the mapping would be the slowest way)."""
        key = _file_key(fd)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and len(entry[1]) >= size:
                self._entries.move_to_end(key)
                return memoryview(entry[1])[:size]
            if entry is not None:
                self._close(key)
        mm = mmap.mmap(fd, size)
        try:
            mm.madvise(MADV_POPULATE_READ)
        except (OSError, ValueError):
            mm.close()
            return None
        own = os.dup(fd)
        with self._lock:
            self._entries[key] = (own, mm)
            while len(self._entries) > KEPT_MAPPINGS:
                self._close(next(iter(self._entries)))
            if not self._sweeping:
                self._sweeping = True
                self.timers.call_later(self.sweep, self._sweep)
        return memoryview(mm)[:size]

    def discard(self, key: tuple[int, int]) -> None:
        """Drop the mapping of a file this process will not rewrite (it unlinked it)."""
        with self._lock:
            if key in self._entries:
                self._close(key)

    def _close(self, key: tuple[int, int]) -> None:
        """Lock held. Views handed out are released by then: each lives for one write."""
        fd, mm = self._entries.pop(key)
        try:
            mm.close()
        except BufferError:
            pass  # a view is still out; the mapping goes with it
        os.close(fd)

    def _sweep(self) -> None:
        with self._lock:
            for key in [k for k, (fd, _) in self._entries.items() if os.fstat(fd).st_nlink == 0]:
                self._close(key)
            self._sweeping = bool(self._entries)
            if self._sweeping:
                self.timers.call_later(self.sweep, self._sweep)

    def clear(self) -> None:
        with self._lock:
            for key in list(self._entries):
                self._close(key)


def _file_key(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def open_shared(path: str) -> int:
    """Open a sealed store file for reading under a shared flock (the caller closes the fd).
    FileNotFoundError if it is gone, or is being rewritten as a free file (it was freed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        if os.stat(path).st_ino != os.fstat(fd).st_ino:  # freed and renamed since the open
            raise FileNotFoundError(path)
    except BlockingIOError:
        os.close(fd)
        raise FileNotFoundError(path) from None
    except BaseException:
        os.close(fd)
        raise
    return fd


class MapCache:

    """Mappings of store objects this process read, kept for the next read of the same
    object: a broadcast argument read by many tasks on one worker maps (and page-faults) once.

    Objects are immutable, so a kept mapping is always right while its file exists. Each hit
    checks that the file is still the one mapped (a freed or spilled object's file is gone; a
    restored one is a new file, whose memory the old mapping must not keep), and a sweep on the
    timer thread drops the mappings of gone files every `sweep` seconds, so a freed or spilled
    object's memory is held at most that much longer. Least recently used entries go first
    when the cache holds more than `capacity` bytes.
    """

    def __init__(self, capacity: int, sweep: float, timers):
        self.capacity, self.sweep, self.timers = capacity, sweep, timers
        self._entries: OrderedDict[str, tuple[str, int, memoryview]] = OrderedDict()
        self._bytes = 0
        self._sweeping = False
        self._lock = threading.Lock()

    def get(self, object_id: str) -> memoryview | None:
        with self._lock:
            entry = self._entries.get(object_id)
            if entry is None:
                return None
            if not _same_file(entry[0], entry[1]):
                self._drop(object_id)
                return None
            self._entries.move_to_end(object_id)
            return entry[2]

    def map(self, object_id: str, path: str) -> memoryview:
        """Map the object's file (FileNotFoundError if it is not there) and keep the mapping."""
        view, inode = map_object(path)
        if view.nbytes > self.capacity:
            return view
        with self._lock:
            if object_id in self._entries:
                self._drop(object_id)
            self._entries[object_id] = (path, inode, view)
            self._bytes += view.nbytes
            while self._bytes > self.capacity:
                self._drop(next(iter(self._entries)))
            if not self._sweeping:
                self._sweeping = True
                self.timers.call_later(self.sweep, self._sweep)
        return view

    def _drop(self, object_id: str) -> None:
        """Lock held. The mapping itself goes when the last value made from it goes."""
        view = self._entries.pop(object_id)[2]
        self._bytes -= view.nbytes

    def _sweep(self) -> None:
        with self._lock:
            for oid in [o for o, (path, inode, _) in self._entries.items()
                        if not _same_file(path, inode)]:
                self._drop(oid)
            self._sweeping = bool(self._entries)
            if self._sweeping:
                self.timers.call_later(self.sweep, self._sweep)

    def forget(self, object_ids) -> None:
        """Drop the mappings of objects this process freed: nothing reads them any more."""
        with self._lock:
            for oid in object_ids:
                if oid in self._entries:
                    self._drop(oid)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0


def _same_file(path: str, inode: int) -> bool:
    try:
        return os.stat(path).st_ino == inode
    except FileNotFoundError:
        return False


def map_object(path: str) -> tuple[memoryview, int]:
    """Map a sealed object read-only; the view keeps the mapping alive, even after a free.
    Returns the view and the inode of the file mapped."""
    fd = open_shared(path)
    try:
        st = os.fstat(fd)
        mm = mmap.mmap(fd, st.st_size, access=mmap.ACCESS_READ)  # holds the flock from here
    finally:
        os.close(fd)
    return memoryview(mm), st.st_ino


class GrpcStoreCalls:
    """Reserve and seal store objects through the node's gRPC service (drivers)."""

    def __init__(self, stub):
        self.stub = stub

    def reserve(self, oid: str, size: int) -> tuple[bool, str, str, str]:
        """(ok, error, path to write, free file to rewrite or "")."""
        reply = self.stub.ReserveObject(pb.ReserveRequest(object_id=oid, size=size))
        return reply.ok, reply.error, reply.path, reply.reuse

    def seal(self, oid: str, size: int, owner_id: str) -> None:
        self.stub.SealObject(pb.SealRequest(object_id=oid, size=size, owner_id=owner_id))


class SocketStoreCalls:
    """Reserve and seal through a worker's framed socket to its node: a unary gRPC call
    cost a busy worker over a millisecond, two per stored result.

        ("reserve", n, oid, size) / ("seal", n, oid, size, owner) --> node
        ("store_reply", n, ("ok", value) | ("error", text)) <-- node; reply() wakes the caller
        ("free", 0, oid) --> node, after a call that timed out (no reply)
    """

    def __init__(self, conn, timeout: float):
        self.conn = conn
        self.timeout = timeout  # Settings.node_call_timeout
        self._lock = threading.Lock()
        self._seq = 0
        self._waiting: dict[int, list] = {}  # request number -> [Event, reply]

    def reserve(self, oid: str, size: int) -> tuple[bool, str, str, str]:
        return self._call("reserve", oid, size)

    def seal(self, oid: str, size: int, owner_id: str) -> None:
        self._call("seal", oid, size, owner_id)

    def reply(self, n: int, answer: tuple) -> None:
        """The node answered request n (called on the socket's reader thread)."""
        with self._lock:
            slot = self._waiting.get(n)
        if slot is not None:
            slot[1] = answer
            slot[0].set()

    def _call(self, kind: str, *args):
        slot = [threading.Event(), None]
        with self._lock:
            self._seq += 1
            n = self._seq
            self._waiting[n] = slot
        try:
            self.conn.send((kind, n, *args))
            if not slot[0].wait(self.timeout):
                # the node may yet serve the call: have it undo that then, as nothing will
                # write or seal the object now (the socket keeps the two in order)
                try:
                    self.conn.send(("free", 0, args[0]))
                except ConnectionError:
                    pass  # the node is gone, and its store with it
                raise ConnectionError(f"the node did not answer a {kind} of object {args[0]} "
                                      f"within {self.timeout:g} s (node_call_timeout)")
        finally:
            with self._lock:
                self._waiting.pop(n, None)
        status, value = slot[1]
        if status != "ok":
            raise RayxSystemError(f"the node could not {kind} object {args[0]}: {value}")
        return value
