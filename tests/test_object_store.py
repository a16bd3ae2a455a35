"""The shared-memory object store: zero-copy reads, freeing, capacity and spilling."""

from __future__ import annotations

import gc
import os

import numpy as np
import pytest

import rayx
from rayx.exceptions import ObjectStoreFullError

from .conftest import wait_for


def _store_files(info) -> list[str]:
    store_dir = rayx.nodes()[0]["StoreDir"]
    return [f for f in os.listdir(store_dir) if not f.endswith(".tmp")]


def test_small_values_travel_inline(rayx_cluster):
    before = set(_store_files(rayx_cluster))
    ref = rayx.put(list(range(100)))
    assert rayx.get(ref) == list(range(100))
    assert set(_store_files(rayx_cluster)) == before


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
