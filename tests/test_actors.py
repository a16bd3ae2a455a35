"""Actors: state, ordering, concurrency, async, names, handles, kill, restarts."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import pytest

import rayx
from rayx.exceptions import ActorDiedError

from .conftest import wait_for


@rayx.remote
class Counter:
    def __init__(self, start=0):
        self.value = start

    def add(self, n=1):
        self.value += n
        return self.value

    def get(self):
        return self.value

    def pid(self):
        return os.getpid()

    def fail(self):
        raise KeyError("no such thing")

    @rayx.method(num_returns=2)
    def pair(self):
        return self.value, -self.value


def test_actor_keeps_state_and_runs_calls_in_order(rayx_cluster):
    c = Counter.remote(10)
    refs = [c.add.remote(1) for _ in range(200)]
    assert rayx.get(refs) == list(range(11, 211))
    assert rayx.get(c.get.remote()) == 210


def test_actor_method_errors_keep_the_actor_alive(rayx_cluster):
    c = Counter.remote()
    with pytest.raises(KeyError):
        rayx.get(c.fail.remote())
    assert rayx.get(c.add.remote(2)) == 2


def test_method_num_returns(rayx_cluster):
    c = Counter.remote(3)
    a, b = c.pair.remote()
    assert rayx.get([a, b]) == [3, -3]


def test_handles_pass_to_tasks_and_other_actors(rayx_cluster):
    c = Counter.remote()

    @rayx.remote
    def bump(handle, n):
        return rayx.get(handle.add.remote(n))

    @rayx.remote
    class Relay:
        def __init__(self, target):
            self.target = target

        def bump(self):
            return rayx.get(self.target.add.remote(100))

    assert rayx.get(bump.remote(c, 5)) == 5
    relay = Relay.remote(c)
    assert rayx.get(relay.bump.remote()) == 105
    assert rayx.get(c.get.remote()) == 105


def test_actor_refs_as_arguments(rayx_cluster):
    c = Counter.remote(rayx.put(7))
    assert rayx.get(c.add.remote(rayx.put(3))) == 10


def test_threaded_actor_runs_calls_concurrently(rayx_cluster):
    @rayx.remote
    class Gate:
        def __init__(self):
            self.event = threading.Event()

        def wait(self):
            return self.event.wait(20)

        def open(self):
            self.event.set()
            return True

    g = Gate.options(max_concurrency=4).remote()
    waiting = g.wait.remote()
    assert rayx.get(g.open.remote(), timeout=20)
    assert rayx.get(waiting, timeout=20) is True


def test_async_actor_runs_calls_concurrently(rayx_cluster):
    @rayx.remote
    class AsyncGate:
        def __init__(self):
            self.event = None

        async def wait(self):
            if self.event is None:
                self.event = asyncio.Event()
            await asyncio.wait_for(self.event.wait(), 20)
            return "opened"

        async def open(self):
            if self.event is None:
                self.event = asyncio.Event()
            self.event.set()
            return True

    g = AsyncGate.remote()
    waiting = g.wait.remote()
    wait_for(lambda: rayx.wait([waiting], timeout=0.05)[1], 5)  # still pending
    assert rayx.get(g.open.remote(), timeout=20)
    assert rayx.get(waiting, timeout=20) == "opened"


def test_named_actor_and_get_actor(rayx_cluster):
    c = Counter.options(name="the-counter").remote(1)
    same = rayx.get_actor("the-counter")
    assert rayx.get(same.add.remote(1)) == 2
    assert rayx.get(c.get.remote()) == 2
    with pytest.raises(ValueError):
        Counter.options(name="the-counter").remote()
    again = Counter.options(name="the-counter", get_if_exists=True).remote()
    assert rayx.get(again.get.remote()) == 2
    with pytest.raises(ValueError):
        rayx.get_actor("no-such-actor")
    rayx.kill(c)


def test_kill_makes_calls_raise_actor_died(rayx_cluster):
    c = Counter.remote()
    assert rayx.get(c.add.remote()) == 1
    pid = rayx.get(c.pid.remote())
    rayx.kill(c)
    with pytest.raises(ActorDiedError):
        rayx.get(c.add.remote(), timeout=20)
    wait_for(lambda: not _alive(pid), 10, what="the actor's worker to exit")


def test_crashed_actor_restarts_up_to_max_restarts(rayx_cluster):
    c = Counter.options(max_restarts=1, max_task_retries=1).remote()
    pid = rayx.get(c.pid.remote())
    os.kill(pid, signal.SIGKILL)
    assert rayx.get(c.add.remote(5), timeout=30) == 5  # a fresh instance after the restart
    pid2 = rayx.get(c.pid.remote())
    assert pid2 != pid
    os.kill(pid2, signal.SIGKILL)
    with pytest.raises(ActorDiedError):
        rayx.get(c.add.remote(), timeout=30)


def test_constructor_failure_kills_the_actor(rayx_cluster):
    @rayx.remote
    class Broken:
        def __init__(self):
            raise RuntimeError("cannot build")

        def ping(self):
            return 1

    b = Broken.remote()
    with pytest.raises(ActorDiedError) as info:
        rayx.get(b.ping.remote(), timeout=20)
    assert "cannot build" in str(info.value)


def test_actor_gpu_and_custom_resources(rayx_cluster):
    @rayx.remote(num_gpus=1, resources={"custom": 1})
    class GpuActor:
        def ids(self):
            return rayx.get_gpu_ids(), os.environ["CUDA_VISIBLE_DEVICES"]

    a = GpuActor.remote()
    ids, visible = rayx.get(a.ids.remote(), timeout=20)
    assert len(ids) == 1 and visible == str(ids[0])
    rayx.kill(a)


def test_direct_calls_raise_type_error(rayx_cluster):
    with pytest.raises(TypeError):
        Counter()
    c = Counter.remote()
    with pytest.raises(TypeError):
        c.add(1)
    with pytest.raises(AttributeError):
        getattr(c, "no_such_method")  # noqa: B009


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_unreferenced_actor_is_stopped(rayx_cluster):
    c = Counter.remote()
    pid = rayx.get(c.pid.remote())
    del c
    wait_for(lambda: not _alive(pid), 10, what="the dropped actor's worker to exit")


def test_slow_constructor_does_not_hold_up_other_actors(rayx_cluster):
    @rayx.remote
    class Slow:
        def __init__(self):
            time.sleep(5)

        def ping(self):
            return "slow"

    @rayx.remote
    class Quick:
        def ping(self):
            return "quick"

    slow = Slow.remote()
    t0 = time.monotonic()
    assert rayx.get(Quick.remote().ping.remote(), timeout=20) == "quick"
    assert time.monotonic() - t0 < 4
    assert rayx.get(slow.ping.remote(), timeout=20) == "slow"


def test_calls_keep_their_order_while_an_argument_is_pending(rayx_cluster):
    @rayx.remote
    def slow(x):
        time.sleep(0.5)
        return x

    @rayx.remote
    def broken():
        raise ValueError("no value")

    @rayx.remote
    class Log:
        def __init__(self):
            self.seen = []

        def add(self, x):
            self.seen.append(x)
            return list(self.seen)

    log = Log.remote()
    first = log.add.remote(slow.remote(1))      # waits for its argument...
    failed = log.add.remote(broken.remote())    # ...this one's argument fails...
    last = log.add.remote(2)                    # ...and this one must not overtake either
    assert rayx.get(last) == [1, 2]
    assert rayx.get(first) == [1]
    with pytest.raises(ValueError):
        rayx.get(failed)


@rayx.remote
class Sleeper:
    def pid(self):
        return os.getpid()

    def slow(self, marker):
        """The first attempt announces itself and hangs; a retry returns at once."""
        if os.path.exists(marker):
            return "retried", os.getpid()
        open(marker, "w").close()
        time.sleep(60)
        return "first attempt", os.getpid()


def _kill_during_slow_call(actor, marker: str):
    pid = rayx.get(actor.pid.remote(), timeout=30)
    ref = actor.slow.remote(marker)
    wait_for(lambda: os.path.exists(marker), 20, what="the slow call to start")
    os.kill(pid, signal.SIGKILL)
    return pid, ref


@pytest.mark.timeout(120)
def test_call_in_flight_is_retried_after_a_restart(rayx_cluster, tmp_path):
    a = Sleeper.options(max_restarts=1, max_task_retries=1).remote()
    pid, ref = _kill_during_slow_call(a, str(tmp_path / "started"))
    outcome, new_pid = rayx.get(ref, timeout=60)
    assert outcome == "retried" and new_pid != pid
    rayx.kill(a)


@pytest.mark.timeout(120)
def test_a_lost_address_the_head_still_names_is_not_called_again(rayx_cluster, tmp_path):
    """The caller's connection drops while the head still names the actor's address, whose
    process still accepts (here: stopped, then killed). Calling it again there would spend the
    one retry on a dying incarnation; the caller waits for the head to name the restarted one."""
    marker = str(tmp_path / "started")
    a = Sleeper.options(max_restarts=1, max_task_retries=1).remote()
    pid = rayx.get(a.pid.remote(), timeout=30)
    ref = a.slow.remote(marker)
    wait_for(lambda: os.path.exists(marker), 20, what="the slow call to start")
    os.kill(pid, signal.SIGSTOP)  # it still accepts connections, and answers nothing
    try:
        rayx.api.core().actors.actors[a._meta.actor_id].conn.close()  # the connection drops
        time.sleep(0.5)  # the head still names the stopped worker meanwhile
    finally:
        os.kill(pid, signal.SIGKILL)
    outcome, new_pid = rayx.get(ref, timeout=60)
    assert outcome == "retried" and new_pid != pid
    rayx.kill(a)


@pytest.mark.timeout(120)
def test_call_in_flight_fails_without_task_retries(rayx_cluster, tmp_path):
    a = Sleeper.options(max_restarts=1, max_task_retries=0).remote()
    pid, ref = _kill_during_slow_call(a, str(tmp_path / "started"))
    with pytest.raises(ActorDiedError) as info:
        rayx.get(ref, timeout=60)
    assert "max_task_retries=0" in str(info.value)
    assert rayx.get(a.pid.remote(), timeout=60) != pid  # the actor itself was restarted
    rayx.kill(a)
