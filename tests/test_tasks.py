"""Tasks: submission, arguments, nested tasks, get/wait/put, futures and asyncio."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import os
import pickle
import time

import pytest

import rayx
from rayx import ids
from rayx.exceptions import GetTimeoutError
from rayx.task_spec import TaskSpec


def test_a_task_spec_travels_with_every_field():
    """TaskSpec pickles by its own __reduce__: every field, none left at its default."""
    values = {}
    for i, f in enumerate(dataclasses.fields(TaskSpec)):
        default = f.default if f.default is not dataclasses.MISSING else None
        values[f.name] = {str: f"v{i}", int: i, float: i + 0.5, list: [i], dict: {"k": i},
                          tuple: (f"g{i}", i)}.get(type(default), f"v{i}")
    values["fn_bytes"], values["retry_exceptions"] = b"fn", (ValueError,)
    spec = TaskSpec(**values)
    plain = TaskSpec("t", "n", [], {}, [], "o", "a")
    assert all(getattr(spec, k) != getattr(plain, k) for k in values if k not in
               ("task_id", "name", "args", "kwargs", "return_ids", "owner_id", "owner_address"))
    back = pickle.loads(pickle.dumps(("task", spec), protocol=5))[1]
    assert back == spec and back is not spec


def test_ids_are_unique_across_a_fork():
    r, w = os.pipe()
    child = os.fork()
    if child == 0:
        os.write(w, ids.new_id().encode())
        os._exit(0)
    os.close(w)
    os.waitpid(child, 0)
    theirs = os.read(r, 100).decode()
    os.close(r)
    mine = ids.new_id()
    assert theirs[:12] != mine[:12] and len(theirs) == len(mine)


@rayx.remote
def add(a, b):
    return a + b


@rayx.remote
def echo(x):
    return x


@rayx.remote
def pid():
    return os.getpid()


@rayx.remote
def sleep_then(seconds, value):
    time.sleep(seconds)
    return value


def test_remote_returns_ref_at_once_and_get_resolves(rayx_cluster):
    ref = add.remote(1, 2)
    assert isinstance(ref, rayx.ObjectRef)
    assert rayx.get(ref) == 3
    assert rayx.get([add.remote(i, i) for i in range(20)]) == [2 * i for i in range(20)]


def test_tasks_run_in_other_processes(rayx_cluster):
    pids = set(rayx.get([pid.remote() for _ in range(10)]))
    assert os.getpid() not in pids


def test_kwargs_and_large_args(rayx_cluster):
    big = b"x" * (2 * 1024 * 1024)
    assert rayx.get(add.remote(a=big, b=b"y")) == big + b"y"


def test_top_level_refs_resolve_nested_refs_stay_refs(rayx_cluster):
    inner = rayx.put(41)

    @rayx.remote
    def inspect(top, nested):
        return top, isinstance(nested[0], rayx.ObjectRef), rayx.get(nested[0])

    assert rayx.get(inspect.remote(inner, [inner])) == (41, True, 41)


def test_chained_dependencies(rayx_cluster):
    ref = add.remote(0, 1)
    for _ in range(20):
        ref = add.remote(ref, 1)
    assert rayx.get(ref) == 21


def test_nested_tasks_submit_and_get(rayx_cluster):
    @rayx.remote
    def fan_out(n):
        return sum(rayx.get([add.remote(i, 0) for i in range(n)]))

    assert rayx.get(fan_out.remote(10)) == 45


def test_deeply_nested_tasks_do_not_deadlock(rayx_cluster):
    """Each level blocks in get; blocked workers lend their CPU, so 2 CPUs run 6 levels."""

    @rayx.remote
    def depth(n):
        if n == 0:
            return 0
        return 1 + rayx.get(depth.remote(n - 1))

    assert rayx.get(depth.remote(6), timeout=60) == 6


def test_num_returns(rayx_cluster):
    @rayx.remote(num_returns=3)
    def three():
        return 1, 2, 3

    refs = three.remote()
    assert len(refs) == 3
    assert rayx.get(refs) == [1, 2, 3]


def test_put_get_roundtrip_values(rayx_cluster):
    for value in (None, 1, "s", {"a": [1, 2]}, b"\x00" * 200_000, list(range(1000))):
        assert rayx.get(rayx.put(value)) == value


def test_get_timeout_raises(rayx_cluster):
    ref = sleep_then.remote(3, 1)
    t0 = time.monotonic()
    with pytest.raises(GetTimeoutError) as info:
        rayx.get(ref, timeout=0.2)
    assert isinstance(info.value, TimeoutError)
    assert time.monotonic() - t0 < 2.5
    assert rayx.get(ref, timeout=30) == 1


def test_wait_num_returns_and_timeout(rayx_cluster):
    fast = [echo.remote(i) for i in range(3)]
    slow = sleep_then.remote(5, "slow")
    ready, not_ready = rayx.wait(fast + [slow], num_returns=3, timeout=10)
    assert len(ready) == 3 and set(ready) <= set(fast)
    assert not_ready == [slow]
    ready, not_ready = rayx.wait([slow], num_returns=1, timeout=0.1)
    assert ready == [] and not_ready == [slow]
    rayx.cancel(slow)


def test_future_and_asyncio(rayx_cluster):
    fut = add.remote(2, 3).future()
    assert isinstance(fut, concurrent.futures.Future)
    assert fut.result(timeout=30) == 5

    async def main():
        return await add.remote(4, 5)

    assert asyncio.run(main()) == 9


def test_calls_are_not_deduplicated(rayx_cluster):
    import random

    @rayx.remote
    def rand():
        return random.random()

    a, b = rayx.get([rand.remote(), rand.remote()])
    assert a != b


def test_many_small_tasks(rayx_cluster):
    refs = [add.remote(i, 1) for i in range(2000)]
    assert sum(rayx.get(refs)) == sum(range(1, 2001))


def test_api_before_init_starts_a_local_cluster():
    if rayx.is_initialized():
        rayx.shutdown()
    try:
        assert rayx.get(add.remote(1, 1)) == 2
        assert rayx.is_initialized()
    finally:
        rayx.shutdown()
    assert not rayx.is_initialized()


def test_max_calls_retires_the_worker(rayx_cluster):
    @rayx.remote(max_calls=2)
    def whoami(i):
        return os.getpid()

    pids = [rayx.get(whoami.remote(i)) for i in range(4)]
    assert pids[0] == pids[1] != pids[2] == pids[3]
    pipelined = rayx.get([whoami.remote(i) for i in range(20)])  # none lost or run twice
    assert len(pipelined) == 20
    from collections import Counter
    assert max(Counter(pipelined).values()) <= 2


def test_repeated_waits_leave_no_callbacks_behind(rayx_cluster):
    from rayx import api

    ref = sleep_then.remote(5, "done")
    for _ in range(50):
        rayx.wait([ref], timeout=0)
    entry = api.core().table.get(ref.id)
    assert not entry.callbacks
    rayx.cancel(ref)


def _functions_kept_here(tag):
    from rayx import api

    return tag, os.getpid(), len(api.worker().functions)


def test_workers_keep_a_bounded_number_of_remote_functions(rayx_cluster):
    """A driver that makes a new remote function per call (rayx.remote in a loop) must not
    grow its workers without end; a function dropped by a worker still runs when called."""
    from rayx.worker import FUNCTIONS_KEPT

    n = 2400  # over any likely number of workers, one of them runs more than FUNCTIONS_KEPT
    made = [rayx.remote(lambda i=i: _functions_kept_here(i)) for i in range(n)]
    results = rayx.get([f.remote() for f in made])
    assert [tag for tag, _, _ in results] == list(range(n))
    ran: dict[int, int] = {}
    for _, worker_pid, _ in results:
        ran[worker_pid] = ran.get(worker_pid, 0) + 1
    assert max(ran.values()) > FUNCTIONS_KEPT  # so the bound had to apply somewhere
    assert max(kept for _, _, kept in results) <= FUNCTIONS_KEPT
    assert rayx.get(made[0].remote())[0] == 0  # long dropped by its worker: unpickled again
