"""Failures: task exceptions, crashed workers, retries, cancellation, and bad input."""

from __future__ import annotations

import gc
import os
import signal
import threading
import time

import psutil
import pytest

import rayx
from rayx.exceptions import (
    InvalidOptionError,
    ObjectLostError,
    OwnerDiedError,
    RayxTaskError,
    SerializationError,
    TaskCancelledError,
    TaskUnschedulableError,
    WorkerCrashedError,
)

from .conftest import wait_for


class CustomError(Exception):
    def __init__(self, msg, code):
        super().__init__(msg, code)
        self.code = code


@rayx.remote
def fail(msg):
    raise CustomError(msg, 7)


@rayx.remote
def sleep(seconds):
    time.sleep(seconds)
    return "slept"


def test_exception_keeps_type_and_carries_remote_traceback(rayx_cluster):
    with pytest.raises(CustomError) as info:
        rayx.get(fail.remote("boom"))
    err = info.value
    assert isinstance(err, RayxTaskError)
    assert err.code == 7
    assert "boom" in str(err) and "Traceback" in str(err) and "fail" in str(err)


def test_error_propagates_through_dependencies(rayx_cluster):
    @rayx.remote
    def consume(x):
        return x

    with pytest.raises(CustomError):
        rayx.get(consume.remote(fail.remote("upstream")))


def test_builtin_exception_types(rayx_cluster):
    @rayx.remote
    def zero():
        return 1 / 0

    with pytest.raises(ZeroDivisionError):
        rayx.get(zero.remote())


def test_unpicklable_exception_still_reported(rayx_cluster):
    @rayx.remote
    def bad():
        class Local(Exception):
            pass

        err = Local("local class")
        err.lock = threading.Lock()
        raise err

    with pytest.raises(RayxTaskError) as info:
        rayx.get(bad.remote())
    assert "local class" in str(info.value)


def test_worker_crash_is_retried_then_fails(rayx_cluster, tmp_path):
    marker = tmp_path / "attempts"

    @rayx.remote(max_retries=2)
    def die_twice(path):
        with open(path, "a") as f:
            f.write("x")
        if len(open(path).read()) < 3:
            os.kill(os.getpid(), signal.SIGKILL)
        return "survived"

    assert rayx.get(die_twice.remote(str(marker)), timeout=60) == "survived"
    assert marker.read_text() == "xxx"

    @rayx.remote(max_retries=1)
    def always_die():
        os.kill(os.getpid(), signal.SIGKILL)

    with pytest.raises(WorkerCrashedError) as info:
        rayx.get(always_die.remote(), timeout=60)
    assert "max_retries=1" in str(info.value)


def test_retry_exceptions(rayx_cluster, tmp_path):
    marker = tmp_path / "n"

    @rayx.remote(max_retries=3, retry_exceptions=[CustomError])
    def flaky(path):
        with open(path, "a") as f:
            f.write("x")
        if len(open(path).read()) < 3:
            raise CustomError("flaky", 1)
        return "ok"

    assert rayx.get(flaky.remote(str(marker)), timeout=60) == "ok"

    @rayx.remote(max_retries=3, retry_exceptions=[KeyError])
    def wrong_type():
        raise CustomError("not retried", 2)

    with pytest.raises(CustomError):
        rayx.get(wrong_type.remote())


def test_cancel_running_and_queued_tasks(rayx_cluster):
    running = [sleep.remote(30) for _ in range(2)]
    queued = sleep.remote(30)
    wait_for(lambda: rayx.available_resources().get("CPU", 2) < 1, 10, what="tasks to start")
    t0 = time.monotonic()
    for ref in running + [queued]:
        rayx.cancel(ref)
    for ref in running + [queued]:
        with pytest.raises(TaskCancelledError):
            rayx.get(ref, timeout=20)
    assert time.monotonic() - t0 < 15
    assert rayx.get(sleep.remote(0)) == "slept"  # the workers are fine afterwards
    task_ids = {ref.id[:-2] for ref in running + [queued]}  # a result id is task id + index
    assert not task_ids & rayx.api.core().submitter.cancelled  # nothing kept once settled


def test_cancel_while_its_arguments_load_stops_the_task(rayx_cluster, tmp_path):
    marker = tmp_path / "loading"

    def slow_load(path):
        open(path, "w").close()
        time.sleep(1.0)
        return path

    class SlowArg:
        def __reduce__(self):
            return slow_load, (str(marker),)

    @rayx.remote
    def long_task(arg):
        time.sleep(30)
        return arg

    # the cancel reaches the worker after it took the task, before the function is called
    ref = long_task.remote(SlowArg())
    wait_for(marker.exists, 20, what="the worker to load the argument")
    t0 = time.monotonic()
    rayx.cancel(ref)
    with pytest.raises(TaskCancelledError):
        rayx.get(ref, timeout=20)
    assert time.monotonic() - t0 < 10


def test_force_cancel_kills_the_worker(rayx_cluster):
    @rayx.remote
    def stubborn():
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        while True:
            time.sleep(0.05)

    ref = stubborn.remote()
    time.sleep(0.5)
    rayx.cancel(ref, force=True)
    with pytest.raises(TaskCancelledError):
        rayx.get(ref, timeout=20)


def test_infeasible_task_fails_clearly(rayx_cluster):
    with pytest.raises(TaskUnschedulableError) as info:
        rayx.get(sleep.options(num_cpus=64).remote(0), timeout=20)
    assert "CPU" in str(info.value)
    with pytest.raises(TaskUnschedulableError):
        rayx.get(sleep.options(resources={"nowhere": 1}).remote(0), timeout=20)


def test_unpicklable_argument_fails_at_call_site(rayx_cluster):
    with pytest.raises(SerializationError) as info:
        sleep.remote(threading.Lock())
    assert "lock" in str(info.value).lower()


def test_unpicklable_function_fails_at_call_site(rayx_cluster):
    lock = threading.Lock()

    @rayx.remote
    def uses_lock():
        return lock.locked()

    with pytest.raises(SerializationError) as info:
        uses_lock.remote()
    assert "uses_lock" in str(info.value)


@pytest.mark.parametrize("options, fragment", [
    ({"num_cpu": 1}, "unknown option"),
    ({"num_cpus": -1}, ">= 0"),
    ({"num_cpus": "two"}, "must be a number"),
    ({"num_gpus": 1.5}, "whole number"),
    ({"resources": {"CPU": 1}}, "num_cpus"),
    ({"resources": {"x": -2}}, ">= 0"),
    ({"num_returns": 0}, ">= 1"),
    ({"max_retries": "3"}, "must be an int"),
    ({"scheduling_strategy": "FAST"}, "scheduling_strategy"),
    ({"_lease_group": ("g", 0)}, "_lease_group"),
    ({"_lease_group": "g"}, "(str, int >= 1)"),
])
def test_bad_options_raise_clear_errors(rayx_cluster, options, fragment):
    with pytest.raises(InvalidOptionError) as info:
        sleep.options(**options).remote(0)
    assert fragment in str(info.value)
    with pytest.raises(InvalidOptionError):
        rayx.remote(**options)(lambda: None)


def test_unknown_option_lists_only_public_options(rayx_cluster):
    with pytest.raises(InvalidOptionError) as info:
        sleep.options(num_cpu=1)
    assert "num_cpus" in str(info.value) and "_lease_group" not in str(info.value)


def test_bad_calls_to_the_api(rayx_cluster):
    with pytest.raises(TypeError):
        sleep(1)
    with pytest.raises(TypeError):
        rayx.get(42)
    with pytest.raises(ValueError):
        rayx.wait([rayx.put(1)], num_returns=2)
    with pytest.raises(TypeError):
        rayx.remote(42)


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.parametrize("size", [10, 300_000], ids=["inline", "in-store"])
def test_object_put_by_an_exited_worker_raises_owner_died(rayx_cluster, size):
    @rayx.remote(max_calls=1)
    def make(n):
        return [rayx.put(b"x" * n)], os.getpid()  # the worker owns what it puts

    [inner], pid = rayx.get(make.remote(size), timeout=30)
    wait_for(lambda: _gone(pid), 20, what="the worker to retire after max_calls=1")
    with pytest.raises(OwnerDiedError) as info:
        rayx.get(inner, timeout=20)
    assert isinstance(info.value, ObjectLostError) and "owner" in str(info.value)
    store = rayx.nodes()[0]["StoreDir"]
    wait_for(lambda: inner.id not in os.listdir(store), 10, what="the owner's objects to go")


def _footprint() -> tuple[set[str], set[str]]:
    """What a failed call must not leave behind: store files and ownership entries."""
    gc.collect()  # refs made for the call's arguments die with the call
    store = {f for f in os.listdir(rayx.nodes()[0]["StoreDir"])
             if not f.endswith(".tmp") and not f.startswith("free-")}  # objects only
    return store, set(rayx.api.core().table.entries)


@rayx.remote
class Holder:
    def __init__(self, *args):
        self.n = len(args)

    def size(self):
        return self.n


@pytest.mark.parametrize("call", ["task argument", "actor option", "actor argument"])
def test_nothing_half_submitted_after_bad_argument(rayx_cluster, call):
    wait_for(lambda: rayx.available_resources()["CPU"] == 2, 10, what="idle CPUs")
    store_before, entries_before = _footprint()
    big = b"x" * (1 << 20)  # large enough to go into the store before the bad value is met
    if call == "task argument":
        with pytest.raises(SerializationError):
            sleep.remote(big, threading.Lock())
    elif call == "actor option":
        with pytest.raises(InvalidOptionError):
            Holder.options(num_cpus=-1).remote(big)
    else:
        with pytest.raises(SerializationError):
            Holder.remote(big, threading.Lock())
    def nothing_left():  # what earlier tests left may still go meanwhile: only new counts
        store, entries = _footprint()
        return store <= store_before and entries <= entries_before

    wait_for(nothing_left, 10, what="the store and the ownership table to hold nothing new")
    assert rayx.available_resources()["CPU"] == 2
    assert rayx.get(Holder.remote(big).size.remote(), timeout=30) == 1  # still usable
