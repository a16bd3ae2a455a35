"""The node's shared-memory object store: capacity, spilling, restoring and freeing.

    writer --ReserveObject--> store makes room (spills the oldest sealed objects to disk)
    writer --writes the file under store_dir--> --SealObject--> store records size and owner
    reader --maps store_dir/<id>; if it is missing--> --RestoreObject--> store copies it back
    owner  --FreeObjects--> store unlinks (readers keep their mappings: POSIX unlink semantics)

Each object is one file in a per-node directory on /dev/shm, immutable once sealed. The store
process never maps objects itself; writers and readers do (see write_object / map_object).
"""

from __future__ import annotations

import mmap
import os
import shutil
import threading
from collections import OrderedDict
from dataclasses import dataclass

from rayx.exceptions import ObjectLostError, ObjectStoreFullError
from rayx.serialization import SerializedObject


@dataclass(slots=True)
class StoredObject:
    size: int
    owner_id: str
    spilled: bool = False
    sealed: bool = False


class ObjectStore:
    """Bookkeeping of one node's objects. Thread-safe; all methods are short."""

    def __init__(self, store_dir: str, spill_dir: str, capacity: int):
        self.store_dir, self.spill_dir, self.capacity = store_dir, spill_dir, capacity
        os.makedirs(store_dir, mode=0o700, exist_ok=True)
        os.makedirs(spill_dir, mode=0o700, exist_ok=True)
        self.objects: OrderedDict[str, StoredObject] = OrderedDict()  # oldest first, for spilling
        self.used = 0  # bytes in shared memory, reservations included
        self.spilled_bytes = 0
        self._lock = threading.Lock()

    def path(self, object_id: str) -> str:
        return os.path.join(self.store_dir, object_id)

    def reserve(self, object_id: str, size: int, owner_id: str = "") -> str:
        """Make room for `size` bytes and return the path to write the object to."""
        if size > self.capacity:
            raise ObjectStoreFullError(
                f"object of {size} bytes is larger than the whole object store "
                f"({self.capacity} bytes); raise object_store_memory in rayx.init()")
        with self._lock:
            if object_id in self.objects:
                return self.path(object_id)
            self._make_room(size)
            self.objects[object_id] = StoredObject(size, owner_id)
            self.used += size
        return self.path(object_id)

    def seal(self, object_id: str, size: int, owner_id: str) -> None:
        with self._lock:
            obj = self.objects.get(object_id)
            if obj is None:  # written without a reservation (restored elsewhere): count it now
                self._make_room(size)
                obj = self.objects[object_id] = StoredObject(size, owner_id)
                self.used += size
            obj.sealed, obj.owner_id = True, owner_id

    def _make_room(self, size: int) -> None:
        """Spill sealed objects, oldest first, until `size` more bytes fit. Lock held."""
        for oid, obj in list(self.objects.items()):
            if self.used + size <= self.capacity:
                return
            if obj.sealed and not obj.spilled:
                self._spill(oid, obj)

    def _spill(self, object_id: str, obj: StoredObject) -> None:
        src, dst = self.path(object_id), os.path.join(self.spill_dir, object_id)
        try:
            shutil.copyfile(src, dst)
            os.unlink(src)
        except FileNotFoundError:
            return
        obj.spilled = True
        self.used -= obj.size
        self.spilled_bytes += obj.size

    def restore(self, object_id: str) -> str:
        """Bring a spilled object back into shared memory; return its path."""
        with self._lock:
            obj = self.objects.get(object_id)
            if obj is None:
                raise ObjectLostError(f"object {object_id} is not in this node's store "
                                      "(it was freed, or its owner died)")
            if not obj.spilled:
                return self.path(object_id)
            self.objects.move_to_end(object_id)
            self._make_room(obj.size)
            src = os.path.join(self.spill_dir, object_id)
            tmp = self.path(object_id) + ".restore"
            shutil.copyfile(src, tmp)
            os.rename(tmp, self.path(object_id))
            os.unlink(src)
            obj.spilled = False
            self.used += obj.size
            self.spilled_bytes -= obj.size
            return self.path(object_id)

    def contains(self, object_id: str) -> bool:
        with self._lock:
            return object_id in self.objects

    def free(self, object_ids) -> None:
        with self._lock:
            for oid in object_ids:
                obj = self.objects.pop(oid, None)
                if obj is None:
                    continue
                if obj.spilled:
                    self.spilled_bytes -= obj.size
                    _unlink(os.path.join(self.spill_dir, oid))
                else:
                    self.used -= obj.size
                    _unlink(self.path(oid))

    def free_owner(self, owner_id: str) -> list[str]:
        """Free every object of an owner that exited: nobody can resolve them any more."""
        with self._lock:
            ids = [oid for oid, o in self.objects.items() if o.owner_id == owner_id]
        self.free(ids)
        return ids

    def destroy(self) -> None:
        """Remove every object, in memory and on disk."""
        with self._lock:
            self.objects.clear()
            self.used = self.spilled_bytes = 0
        shutil.rmtree(self.store_dir, ignore_errors=True)
        shutil.rmtree(self.spill_dir, ignore_errors=True)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def write_object(path: str, obj: SerializedObject) -> None:
    """Write a serialized object to a store file: the single copy of a large put."""
    fd = os.open(path + ".tmp", os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, obj.size)
        n = len(obj.header)
        os.pwrite(fd, obj.header, 0)
        os.pwrite(fd, obj.main, n)
        for off, buf in zip(obj.offsets, obj.buffers):
            view = buf.cast("B")
            done = 0
            while done < view.nbytes:
                done += os.pwrite(fd, view[done:], off + done)
    finally:
        os.close(fd)
    os.rename(path + ".tmp", path)  # readers never see a half-written object


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
    fd = os.open(path, os.O_RDONLY)
    try:
        st = os.fstat(fd)
        mm = mmap.mmap(fd, st.st_size, access=mmap.ACCESS_READ)
    finally:
        os.close(fd)
    return memoryview(mm), st.st_ino
