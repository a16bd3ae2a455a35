"""The shared-memory object store: zero-copy reads, freeing, capacity and spilling."""

from __future__ import annotations

import gc
import os
import signal
import time

import numpy as np
import psutil
import pytest

import rayx
from rayx.exceptions import ObjectStoreFullError, RayxTaskError

from .conftest import rayx_processes, wait_for


def _store_files(info) -> list[str]:
    """The objects' files in the store (not half-written ones, not free files)."""
    store_dir = rayx.nodes()[0]["StoreDir"]
    return [f for f in os.listdir(store_dir)
            if not f.endswith(".tmp") and not f.startswith("free-")]


def _free_files() -> list[str]:
    return [f for f in os.listdir(rayx.nodes()[0]["StoreDir"]) if f.startswith("free-")]


def _inode(oid: str) -> int:
    return os.stat(os.path.join(rayx.nodes()[0]["StoreDir"], oid)).st_ino


def _freed(box: list) -> tuple[str, int]:
    """Drop the only reference to a stored object (`box` holds it, and is emptied); returns
    its id and its file's inode once it is freed."""
    ref = box.pop()
    oid, inode = ref.id, _inode(ref.id)
    del ref
    gc.collect()
    wait_for(lambda: oid not in _store_files(None), 10, what="the object to be freed")
    return oid, inode


def test_small_values_travel_inline(rayx_cluster):
    before = set(_store_files(rayx_cluster))
    ref = rayx.put(list(range(100)))
    assert rayx.get(ref) == list(range(100))
    assert set(_store_files(rayx_cluster)) == before


@pytest.mark.parametrize("value", [None, True, 7, 2**100, 1.5, 1j, "é" * 3, b"x" * 100_000])
def test_plain_values_take_plain_pickle_and_read_back_the_same(value, monkeypatch):
    """Built-in scalars, strings and bytes skip cloudpickle's pickler; their bytes are what
    the general path writes, and errors keep their flag."""
    import cloudpickle

    from rayx import serialization

    expected = cloudpickle.dumps(value, protocol=5)
    monkeypatch.setattr(serialization.cloudpickle, "dumps", None)  # not called for these
    so = serialization.serialize(value)
    assert so.main == expected and not so.buffers
    assert serialization.deserialize(so.to_bytes()) == (value, False)
    flagged = serialization.serialize(value, error=True).to_bytes()
    assert serialization.deserialize(flagged) == (value, True)


def test_large_array_is_a_read_only_zero_copy_view(rayx_cluster):
    arr = np.arange(5_000_000, dtype=np.float64)
    ref = rayx.put(arr)
    assert ref.id in _store_files(rayx_cluster)
    got = rayx.get(ref)
    assert np.array_equal(got, arr)
    assert not got.flags.writeable
    assert not got.flags.owndata  # a view of the mapping, not a copy
    again = rayx.get(ref)
    assert np.array_equal(again, arr) and not again.flags.writeable
    assert np.shares_memory(got, again)  # the second get reuses the kept mapping
    base = got.base
    while getattr(base, "base", None) is not None and not isinstance(base, memoryview):
        base = base.base
    assert isinstance(base, memoryview)


def test_task_reads_argument_from_the_store_without_copy(rayx_cluster):
    @rayx.remote
    def info(a):
        return a.flags.writeable, a.flags.owndata, float(a.sum())

    arr = np.ones(2_000_000)
    writeable, owndata, total = rayx.get(info.remote(rayx.put(arr)))
    assert (writeable, owndata, total) == (False, False, 2_000_000.0)


def test_large_task_results_go_through_the_store(rayx_cluster):
    @rayx.remote
    def make(n):
        return np.full(n, 3, dtype=np.int64)

    ref = make.remote(1_000_000)
    out = rayx.get(ref)
    assert out.sum() == 3_000_000
    assert ref.id in _store_files(rayx_cluster)


def test_object_is_freed_when_the_last_reference_goes(rayx_cluster):
    ref = rayx.put(np.zeros(1_000_000))
    oid = ref.id
    assert oid in _store_files(rayx_cluster)
    del ref
    gc.collect()
    wait_for(lambda: oid not in _store_files(rayx_cluster), 10, what="the object to be freed")


def test_value_got_before_free_stays_valid(rayx_cluster):
    ref = rayx.put(np.arange(1_000_000))
    arr = rayx.get(ref)
    del ref
    gc.collect()
    assert arr[-1] == 999_999  # the mapping outlives the unlink


def test_object_larger_than_the_store_is_refused(rayx_cluster):
    with pytest.raises(ObjectStoreFullError) as info:
        rayx.put(np.zeros(300 * 1024 * 1024 // 8 + 1024))
    assert "object_store_memory" in str(info.value)


def test_spilling_lets_a_workload_larger_than_the_store_complete(rayx_cluster):
    """The store holds 256 MB; keep 480 MB referenced, then read all of it back."""
    refs = [rayx.put(np.full(10_000_000, i, dtype=np.float64)) for i in range(6)]  # 6 x 80 MB
    spill_dir = os.path.join(rayx_cluster.session_dir,
                             f"spill-{rayx_cluster.node_id[:12]}")
    assert os.listdir(spill_dir), "nothing was spilled"
    for i, ref in enumerate(refs):
        arr = rayx.get(ref)
        assert arr[0] == i and arr[-1] == i

    @rayx.remote
    def first(a):
        return float(a[0])

    assert rayx.get([first.remote(r) for r in refs]) == [float(i) for i in range(6)]
    del refs, ref, arr
    gc.collect()
    wait_for(lambda: not os.listdir(spill_dir), 10, what="spilled objects to be freed")


def test_kept_mappings_go_once_their_object_is_freed(rayx_cluster):
    maps = rayx.api.core().maps
    ref = rayx.put(np.ones(1_000_000))
    oid = ref.id
    assert rayx.get(ref).sum() == 1_000_000
    assert maps.get(oid) is not None
    del ref
    wait_for(lambda: oid not in _store_files(rayx_cluster), 10, what="the object to be freed")
    assert maps.get(oid) is None  # its file is gone: the mapping is not handed out again
    wait_for(lambda: oid not in maps._entries, 10, what="the sweep to drop the mapping")


def test_tasks_on_one_worker_map_a_broadcast_argument_once(rayx_cluster):
    @rayx.remote(num_cpus=0)
    class Reader:
        def __init__(self):
            self.kept = []

        def read(self, a):
            self.kept.append(a)  # both values alive at once: two mappings would differ
            return float(a[::512].sum()), a.__array_interface__["data"][0]

    reader = Reader.remote()
    ref = rayx.put(np.ones(2_000_000))
    first = rayx.get(reader.read.remote(ref))
    second = rayx.get(reader.read.remote(ref))
    assert first == second  # the same sum, read from the same (kept) mapping
    rayx.kill(reader)


# Sizes below differ from test to test: a put takes the free file closest to its size.

def test_the_next_put_of_a_size_rewrites_a_freed_file_of_that_size(rayx_cluster):
    box = [rayx.put(np.full(1_100_001, 1.0))]
    assert rayx.get(box[0])[0] == 1.0  # read once, and let go: no mapping holds the file
    _, inode = _freed(box)
    wait_for(lambda: any(os.stat(os.path.join(rayx.nodes()[0]["StoreDir"], f)).st_ino == inode
                         for f in _free_files()), 10, what="the freed file to be kept")
    for value in (2.0, 3.0):  # the second time through the mapping the writer kept
        box = [rayx.put(np.full(1_100_001, value))]
        assert _inode(box[0].id) == inode
        got = rayx.get(box[0])
        assert got.min() == got.max() == value
        del got
        _, inode = _freed(box)


def test_a_freed_file_this_process_still_maps_is_never_rewritten(rayx_cluster):
    box = [rayx.put(np.full(1_200_007, 1.0))]
    held = rayx.get(box[0])
    _, inode = _freed(box)
    ref = rayx.put(np.full(1_200_007, 2.0))
    assert _inode(ref.id) != inode  # the writer could not lock it, so it wrote a new file
    assert held.min() == held.max() == 1.0
    assert rayx.get(ref)[-1] == 2.0


def test_a_freed_file_a_worker_still_maps_is_never_rewritten(rayx_cluster):
    @rayx.remote(num_cpus=0)
    class Keeper:
        def keep(self, a):
            self.a = a
            return float(a[0])

        def range(self):
            return float(self.a.min()), float(self.a.max())

    keeper = Keeper.remote()
    box = [rayx.put(np.full(1_300_003, 1.0))]
    assert rayx.get(keeper.keep.remote(box[0])) == 1.0
    _, inode = _freed(box)
    ref = rayx.put(np.full(1_300_003, 2.0))
    assert _inode(ref.id) != inode
    assert rayx.get(keeper.range.remote()) == (1.0, 1.0)
    assert rayx.get(ref)[0] == 2.0
    rayx.kill(keeper)


def test_an_unused_free_file_goes_after_free_file_keep(fresh_cluster):
    fresh_cluster(num_cpus=1, object_store_memory=64 * 1024 * 1024, free_file_keep=0.5)
    _freed([rayx.put(np.ones(1_000_000))])
    wait_for(lambda: not _free_files(), 10, what="the unused free file to go")


def test_free_files_make_room_before_anything_is_spilled(fresh_cluster):
    info = fresh_cluster(num_cpus=1, object_store_memory=64 * 1024 * 1024)
    _freed([rayx.put(np.ones(1_500_000))])  # 12 MB
    assert _free_files()
    big = rayx.put(np.ones(7_500_000))  # 60 MB: too large for that file, and 72 MB > 64 MB
    assert not _free_files()
    assert not os.listdir(os.path.join(info.session_dir, f"spill-{info.node_id[:12]}"))
    assert rayx.get(big)[-1] == 1.0


def test_free_file_keep_0_unlinks_freed_files_at_once(fresh_cluster):
    fresh_cluster(num_cpus=1, object_store_memory=64 * 1024 * 1024, free_file_keep=0)
    _freed([rayx.put(np.ones(1_000_000))])
    assert not _free_files()


def test_a_store_call_the_node_does_not_answer_fails_its_task_and_is_undone(fresh_cluster):
    """A worker waits node_call_timeout for its node to answer a store call, then fails the
    task storing the result with an error naming the call, and has the node undo the call
    when it gets to it: the 30 MiB reservation does not stay counted, which here would
    spill the 20 MiB object already stored when the next 30 MiB come."""
    info = fresh_cluster(num_cpus=1, object_store_memory=64 * 1024 * 1024,
                         node_call_timeout=1.0)
    (node,) = [p for p in rayx_processes(info.session_dir) if "rayx.node_main" in
               " ".join(p.cmdline())]
    spill_dir = next(os.path.join(info.session_dir, d) for d in os.listdir(info.session_dir)
                     if d.startswith("spill-"))
    first = rayx.put(np.zeros(20 * 1024 * 1024 // 8))

    @rayx.remote
    def slow_big():
        time.sleep(1.0)
        return np.zeros(30 * 1024 * 1024 // 8)

    ref = slow_big.remote()
    time.sleep(0.5)  # it runs: its lease came from the node before the node stops
    node.send_signal(signal.SIGSTOP)
    try:
        with pytest.raises(RayxTaskError, match="did not answer a reserve"):
            rayx.get(ref, timeout=30)
    finally:
        node.send_signal(signal.SIGCONT)
    barrier = rayx.get(rayx.remote(lambda: np.ones(1024 * 1024 // 8)).remote())  # same worker
    assert barrier.sum() == 1024 * 1024 // 8  # socket, so the node has seen the free by now
    second = rayx.put(np.zeros(30 * 1024 * 1024 // 8))
    assert os.listdir(spill_dir) == []
    assert rayx.get(first).nbytes == 20 * 1024 * 1024
    assert rayx.get(second).nbytes == 30 * 1024 * 1024


def test_a_free_file_half_rewritten_is_removed_not_named(tmp_path):
    from rayx import serialization
    from rayx.store_files import write_object

    free_file, path = tmp_path / "free-1", tmp_path / "object"
    free_file.write_bytes(b"\0" * 4096)
    obj = serialization.serialize(np.ones(1000))
    obj.buffers[0].release()  # writing the buffer now raises
    with pytest.raises(ValueError):
        write_object(str(path), obj, str(free_file))
    assert not free_file.exists() and not path.exists()


def _sealed_then_freed(store, oid: str, size: int) -> str:
    """Write, seal and free an object in `store`; returns the free file it became."""
    path, _ = store.reserve(oid, size, "owner")
    with open(path, "wb") as f:
        f.write(b"\0" * size)
    store.seal(oid, size, "owner")
    store.free([oid])
    return next(reversed(store.free_files))


def test_a_free_file_whose_writer_never_sealed_does_not_outlive_its_object(tmp_path):
    """A writer handed a free file that dies before it renames it: the free file goes when
    the reservation is freed (its owner's exit), or when a retry of the task seals the
    object anew. Before, it stayed on /dev/shm, uncounted, until the node stopped."""
    from rayx.object_store import FREE_FILE_MIN, ObjectStore

    size = 2 * FREE_FILE_MIN
    store = ObjectStore(str(tmp_path / "store"), str(tmp_path / "spill"), 64 * FREE_FILE_MIN)
    try:
        free_file = _sealed_then_freed(store, "a", size)
        assert store.reserve("b", size, "owner", reuse=True)[1] == free_file  # writer dies
        store.free_owner("owner")
        assert os.listdir(store.store_dir) == [] and store.used == 0

        free_file = _sealed_then_freed(store, "c", size)
        assert store.reserve("d", size, "owner", reuse=True)[1] == free_file  # writer dies
        path, handed = store.reserve("d", size, "owner", reuse=True)  # the task's retry
        assert handed == ""
        with open(path, "wb") as f:
            f.write(b"\0" * size)
        store.seal("d", size, "owner")
        assert os.listdir(store.store_dir) == ["d"] and store.used == size
    finally:
        store.destroy()


def test_a_workers_store_calls_go_over_its_node_socket_and_fail_cleanly(fresh_cluster):
    """Workers reserve and seal through their node socket, not gRPC. A call the node cannot
    serve fails that call with a clear error; the worker and its socket carry on."""
    fresh_cluster(num_cpus=2, object_store_memory=128 * 1024 * 1024)

    @rayx.remote
    def probe():
        from rayx import api
        from rayx.exceptions import RayxSystemError

        store = api.core().node_store
        try:
            store.reserve("0" * 22, "not a size")  # the node's store raises TypeError
        except RayxSystemError as exc:
            return type(store).__name__, str(exc), os.getpid()
        return type(store).__name__, "", os.getpid()

    @rayx.remote
    def big(n):
        return np.full(2_000_000, n), os.getpid()  # 16 MB: a store object

    kind, error, pid = rayx.get(probe.remote())
    assert kind == "SocketStoreCalls"
    assert "could not reserve" in error and "TypeError" in error
    assert psutil.pid_exists(pid)
    arrays = rayx.get([big.remote(i) for i in range(4)])
    assert [int(a[-1]) for a, _ in arrays] == [0, 1, 2, 3]

    @rayx.remote
    def too_big():
        return np.zeros(129 * 1024 * 1024 // 8)  # more than the whole store

    with pytest.raises(ObjectStoreFullError):
        rayx.get(too_big.remote())
