"""Reference counting across processes: a ref pickled into arguments, results or stored values
keeps its object alive exactly while some process still holds it (the borrower protocol)."""

from __future__ import annotations

import gc
import os
import signal
import time

import numpy as np

import rayx
from rayx.ownership import Drops, OwnershipTable

from .conftest import wait_for

MB8 = 1_000_000  # float64 elements: 8 MB, far above the inline threshold


def _in_store(oid: str) -> bool:
    return any(oid in os.listdir(n["StoreDir"]) for n in rayx.nodes() if n["Alive"])


def _freed(oid: str) -> None:
    def gone():
        gc.collect()
        return not _in_store(oid)
    wait_for(gone, 10, what=f"object {oid} to be freed")


def _stays(oid: str, seconds: float = 0.5) -> None:
    """The object is still stored after every release queued so far had time to act."""
    gc.collect()
    time.sleep(seconds)
    gc.collect()
    assert _in_store(oid), f"object {oid} was freed while a process still held it"


@rayx.remote
def total(refs):
    return float(sum(rayx.get(r).sum() for r in refs))


@rayx.remote
def relay(value):
    return value


@rayx.remote
def make_inner(scale):
    return [rayx.put(np.full(MB8, float(scale)))]


@rayx.remote
class Holder:
    def __init__(self):
        self.kept = None

    def hold(self, refs):
        self.kept = refs
        return len(refs)

    def value(self):
        return float(rayx.get(self.kept[0]).sum())

    def drop(self):
        self.kept = None
        return True


@rayx.remote
class Maker:
    def make(self, scale):
        return [rayx.put(np.full(MB8, float(scale)))]

    def pid(self):
        return os.getpid()

    def make_after(self, seconds, marker):
        """Wait, then put an object and return a ref to it, noting its id in `marker`."""
        time.sleep(seconds)
        ref = rayx.put(np.full(MB8, 7.0))
        with open(marker, "w") as f:
            f.write(ref.id)
        return [ref]


@rayx.remote
class Caller:
    def start(self, maker, seconds, marker):
        rayx.get(maker.pid.remote())  # connected: the next call leaves at once
        self.pending = maker.make_after.remote(seconds, marker)  # the result comes back here
        time.sleep(0.3)  # ... and is running when this returns
        return os.getpid()


@rayx.remote
def hand_to(holder, refs):
    """A borrower passing what it borrowed on to an actor, then finishing."""
    return rayx.get(holder.hold.remote(refs))


def test_ref_nested_in_arguments_is_freed_once_the_task_is_done(rayx_cluster):
    ref = rayx.put(np.ones(MB8))
    oid = ref.id
    assert rayx.get(total.remote([ref])) == MB8
    del ref
    _freed(oid)


def _held_by_an_actor() -> tuple:
    """An actor keeping the only remaining reference to a stored object: (actor, object id)."""
    holder = Holder.remote()
    ref = rayx.put(np.full(MB8, 2.0))
    assert rayx.get(holder.hold.remote([ref])) == 1
    oid = ref.id
    del ref
    _stays(oid)
    return holder, oid


def test_actor_keeping_a_nested_ref_keeps_its_object_until_it_lets_go(rayx_cluster):
    holder, oid = _held_by_an_actor()
    assert rayx.get(holder.value.remote()) == 2.0 * MB8  # the borrower can still read it
    rayx.get(holder.drop.remote())
    _freed(oid)
    rayx.kill(holder)


def test_a_borrower_can_lend_onward(rayx_cluster):
    holder = Holder.remote()
    ref = rayx.put(np.full(MB8, 4.0))
    oid = ref.id
    assert rayx.get(hand_to.remote(holder, [ref])) == 1  # the task ends; the actor keeps it
    del ref
    _stays(oid)
    assert rayx.get(holder.value.remote()) == 4.0 * MB8
    rayx.get(holder.drop.remote())
    _freed(oid)
    rayx.kill(holder)


def test_ref_returned_inside_a_result_lives_while_the_caller_holds_it(rayx_cluster):
    outer = make_inner.remote(3)
    inner = rayx.get(outer)[0]
    oid = inner.id
    del outer  # the result is gone; the ref got out of it is what remains
    _stays(oid)
    assert rayx.get(inner).sum() == 3.0 * MB8
    del inner
    _freed(oid)


def test_ref_inside_a_put_value_lives_while_the_outer_object_lives(rayx_cluster):
    ref = rayx.put(np.ones(MB8))
    oid = ref.id
    outer = rayx.put([ref])
    del ref
    _stays(oid)
    assert rayx.get(rayx.get(outer)[0]).sum() == MB8
    gc.collect()
    _stays(oid)
    del outer
    _freed(oid)


def test_a_borrower_that_dies_gives_back_what_it_held(rayx_cluster):
    holder, oid = _held_by_an_actor()
    rayx.kill(holder)
    _freed(oid)


def test_ref_relayed_by_a_third_process_stays_with_the_owner_until_released(rayx_cluster):
    maker = Maker.remote()
    first = rayx.get(maker.make.remote(5))
    oid = first[0].id
    second = rayx.get(relay.remote(first))  # a task hands the actor's ref back to the driver
    del first
    _stays(oid)
    assert rayx.get(second[0]).sum() == 5.0 * MB8
    del second
    _freed(oid)
    rayx.kill(maker)


def test_many_nested_refs_in_one_argument(rayx_cluster):
    refs = [rayx.put(np.full(20_000, float(i))) for i in range(200)]
    ids = [r.id for r in refs]
    assert rayx.get(total.remote(refs)) == sum(20_000.0 * i for i in range(200))
    del refs
    for oid in ids:
        _freed(oid)


def test_the_same_ref_borrowed_by_several_actors_at_once(rayx_cluster):
    holders = [Holder.remote() for _ in range(3)]
    ref = rayx.put(np.ones(MB8))
    oid = ref.id
    rayx.get([h.hold.remote([ref]) for h in holders])
    del ref
    for h in holders[:-1]:
        rayx.get(h.drop.remote())
    _stays(oid)
    assert rayx.get(holders[-1].value.remote()) == MB8
    rayx.get(holders[-1].drop.remote())
    _freed(oid)
    for h in holders:
        rayx.kill(h)


def test_a_borrower_waiting_on_an_owner_that_dies_is_not_held_up(rayx_cluster):
    """The holder unpickles a ref owned by a stopped actor: its registration is never
    acknowledged. When the owner dies the wait ends at once, not after start_timeout (30 s)."""
    maker, holder = Maker.remote(), Holder.remote()
    inner = rayx.get(maker.make.remote(6))
    pid = rayx.get(maker.pid.remote())
    rayx.get(holder.drop.remote())  # the holder is up before the owner stops
    os.kill(pid, signal.SIGSTOP)
    try:
        held = holder.hold.remote(inner)
        time.sleep(0.5)  # the holder now waits for the stopped owner's acknowledgement
        assert not rayx.wait([held], timeout=0)[0]
    finally:
        os.kill(pid, signal.SIGKILL)
    assert rayx.get(held, timeout=15) == 1
    rayx.kill(holder)


def test_an_object_returned_to_a_caller_that_died_is_freed(rayx_cluster, tmp_path):
    """An actor returns a ref it owns to a caller that died meanwhile: the owner registers
    the caller as borrower, cannot reach it, and frees the object instead of keeping it."""
    marker = str(tmp_path / "object-id")
    maker, caller = Maker.remote(), Caller.remote()
    pid = rayx.get(caller.start.remote(maker, 1.0, marker))
    os.kill(pid, signal.SIGKILL)
    oid = wait_for(lambda: os.path.exists(marker) and open(marker).read(), 20,
                   what="the task to put its object")
    _freed(oid)
    assert rayx.get(maker.pid.remote()) > 0  # the owner lives on: the free was not its exit
    rayx.kill(maker)
    rayx.kill(caller)


def test_a_release_that_overtakes_its_registration_keeps_the_object():
    """A borrower's release can reach the owner before a registration made for it by a third
    process: the count goes below zero and the object stays until that registration lands."""
    table = OwnershipTable("owner")
    table.add_owned("o1", "owner", desc=("s", 0, "node", 100))
    drops = Drops()
    table.add_borrower(["o1"], "b1", drops)
    table.remove_borrower([("o1", 2)], "b1", drops)
    assert "o1" in table.entries and not drops.free
    table.add_borrower(["o1"], "b1", drops)  # the late registration brings it back to zero
    assert "o1" not in table.entries and drops.free == [("o1", ("s", 0, "node", 100))]


def test_a_release_that_comes_before_any_registration_is_counted():
    table = OwnershipTable("owner")
    table.add_owned("o2", "owner", desc=("s", 0, "node", 100))
    drops = Drops()
    table.remove_borrower([("o2", 1)], "b1", drops)
    assert "o2" in table.entries and not drops.free
    table.add_borrower(["o2"], "b1", drops)
    assert "o2" not in table.entries and [oid for oid, _ in drops.free] == ["o2"]
