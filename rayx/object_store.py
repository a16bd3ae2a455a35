"""The node's shared-memory object store: capacity, spilling, restoring and freeing.

    writer --ReserveObject--> store makes room (spills the oldest sealed objects to disk)
    writer --writes the file under store_dir--> --SealObject--> store records size and owner
    (a worker's ReserveObject and SealObject travel over its node socket, not gRPC)
    reader --maps store_dir/<id>; if it is missing--> --RestoreObject--> store copies it back
    owner  --FreeObjects--> store unlinks, or keeps a large file as a free file for a writer
    writer --ReserveObject--> may be handed a free file: it rewrites it, then renames it

Each object is one file in a per-node directory on /dev/shm, immutable once sealed. The store
process never maps objects itself; writers and readers do (rayx/store_files.py).

Free files spare a put the cost of fresh pages (allocated and zeroed by the kernel, page by
page): a writer that reuses one, through a mapping it kept from writing it before, writes at
memory-copy speed. Readers hold a shared flock on every object they map, for as long as the
mapping lives; a writer rewrites a free file only under an exclusive flock taken without
waiting, and unlinks it instead when a reader still maps it (that reader keeps its pages, as
after an unlink). Free files count as used memory; they go first when room is needed and
after free_file_keep seconds unused.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from rayx.exceptions import ObjectLostError, ObjectStoreFullError

FREE_FILE_MIN = 1024 * 1024  # smaller objects are unlinked at once: fresh small files are cheap


@dataclass(slots=True)
class StoredObject:
    size: int
    owner_id: str
    spilled: bool = False
    sealed: bool = False
    free_file: str = ""  # a free file handed to its writer: gone once renamed to the object


class ObjectStore:
    """Bookkeeping of one node's objects. Thread-safe; all methods are short."""

    def __init__(self, store_dir: str, spill_dir: str, capacity: int,
                 free_file_keep: float = 10.0):
        self.store_dir, self.spill_dir, self.capacity = store_dir, spill_dir, capacity
        self.free_file_keep = free_file_keep  # seconds a free file waits for a writer
        os.makedirs(store_dir, mode=0o700, exist_ok=True)
        os.makedirs(spill_dir, mode=0o700, exist_ok=True)
        self.objects: OrderedDict[str, StoredObject] = OrderedDict()  # oldest first, for spilling
        self.used = 0  # bytes in shared memory, reservations and free files included
        self.spilled_bytes = 0
        self.free_files: OrderedDict[str, tuple[int, float]] = OrderedDict()  # path ->
        self.free_bytes = 0  # (size, when freed), oldest first; free_bytes: their sizes
        self.free_limit = capacity // 4 if free_file_keep > 0 else 0
        self._free_seq = 0
        self._lock = threading.Lock()

    def path(self, object_id: str) -> str:
        return os.path.join(self.store_dir, object_id)

    def reserve(self, object_id: str, size: int, owner_id: str = "",
                reuse: bool = False) -> tuple[str, str]:
        """Make room for `size` bytes. Returns the path to write the object to and, with
        `reuse`, a free file of about that size to write it into first ("" if none)."""
        if size > self.capacity:
            raise ObjectStoreFullError(
                f"object of {size} bytes is larger than the whole object store "
                f"({self.capacity} bytes); raise object_store_memory in rayx.init()")
        with self._lock:
            if object_id in self.objects:
                return self.path(object_id), ""
            free_file = self._take_free_file(size) if reuse else ""
            self._make_room(size)
            self.objects[object_id] = StoredObject(size, owner_id, free_file=free_file)
            self.used += size
        return self.path(object_id), free_file

    def _take_free_file(self, size: int) -> str:
        """The free file closest to `size` (half to twice it), no longer counted. Lock held."""
        best, best_size = "", 0
        for path, (fsize, _) in self.free_files.items():
            if size // 2 <= fsize <= size * 2 and (
                    not best or abs(fsize - size) < abs(best_size - size)):
                best, best_size = path, fsize
        if best:
            del self.free_files[best]
            self.free_bytes -= best_size
            self.used -= best_size
        return best

    def _keep_free_file(self, object_id: str, size: int) -> bool:
        """Rename a freed object's file into a free file, if it is worth keeping. Lock held."""
        if size < FREE_FILE_MIN or self.free_bytes + size > self.free_limit:
            return False
        self._free_seq += 1
        path = os.path.join(self.store_dir, f"free-{self._free_seq}")
        try:
            os.rename(self.path(object_id), path)
        except FileNotFoundError:
            return False
        self.free_files[path] = (size, time.monotonic())
        self.free_bytes += size
        return True

    def _drop_free_file(self) -> None:
        """Unlink the oldest free file. Lock held."""
        path, (size, _) = self.free_files.popitem(last=False)
        _unlink(path)
        self.free_bytes -= size
        self.used -= size

    def trim_free_files(self) -> None:
        """Give back the memory of free files no writer took for free_file_keep seconds."""
        deadline = time.monotonic() - self.free_file_keep
        with self._lock:
            while self.free_files and next(iter(self.free_files.values()))[1] < deadline:
                self._drop_free_file()

    def seal(self, object_id: str, size: int, owner_id: str) -> None:
        with self._lock:
            obj = self.objects.get(object_id)
            if obj is None:  # written without a reservation (restored elsewhere): count it now
                self._make_room(size)
                obj = self.objects[object_id] = StoredObject(size, owner_id)
                self.used += size
            if obj.free_file:  # renamed into the object by now, unless the writer that was
                _unlink(obj.free_file)  # handed it died and a retry wrote the object anew
            obj.sealed, obj.owner_id, obj.free_file = True, owner_id, ""

    def _make_room(self, size: int) -> None:
        """Drop free files, then spill sealed objects, oldest first, until `size` more bytes
        fit. Lock held."""
        while self.free_files and self.used + size > self.capacity:
            self._drop_free_file()
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
                elif not (obj.sealed and self._keep_free_file(oid, obj.size)):
                    self.used -= obj.size
                    _unlink(self.path(oid))
                    if obj.free_file:  # its writer never sealed it (it died writing)
                        _unlink(obj.free_file)

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
            self.free_files.clear()
            self.used = self.spilled_bytes = self.free_bytes = 0
        shutil.rmtree(self.store_dir, ignore_errors=True)
        shutil.rmtree(self.spill_dir, ignore_errors=True)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
