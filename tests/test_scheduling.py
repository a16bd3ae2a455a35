"""Resources and scheduling: CPUs, GPU ids, custom resources, lending CPUs while blocked."""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest

import rayx
from rayx.exceptions import TaskUnschedulableError
from rayx.scheduler import ResourcePool

from .conftest import wait_for


@rayx.remote
def env(name):
    return os.environ.get(name)


@rayx.remote
def gpu_ids():
    return rayx.get_gpu_ids(), os.environ.get("CUDA_VISIBLE_DEVICES")


@rayx.remote
def same(x):
    return x


def test_a_lease_keeps_one_idle_check_and_goes_back_once_idle(rayx_cluster):
    """A lease that runs one task at a time goes idle after each one: it holds one pending
    idle check (not one per task, which cost the timer thread a wake-up per task), and its
    CPU goes back to the node once it stays idle past lease_idle_timeout."""
    for i in range(300):
        assert rayx.get(same.remote(i)) == i
    pending = len(rayx.api.core().timers._heap)
    assert pending < 20, f"{pending} timers pending after 300 sequential tasks"
    wait_for(lambda: rayx.available_resources()["CPU"] == 2, 10, what="the lease returned")


def test_cluster_resources_and_nodes(rayx_cluster):
    total = rayx.cluster_resources()
    assert total["CPU"] == 2 and total["GPU"] == 4 and total["custom"] == 2
    nodes = rayx.nodes()
    assert len(nodes) == 1 and nodes[0]["Alive"] and nodes[0]["Resources"]["CPU"] == 2
    wait_for(lambda: rayx.available_resources()["CPU"] == 2, 10, what="idle CPUs")


def test_task_sees_its_gpu_ids(rayx_cluster):
    ids, visible = rayx.get(gpu_ids.options(num_gpus=2).remote())
    assert len(ids) == 2 and visible == ",".join(map(str, ids))
    ids, visible = rayx.get(gpu_ids.remote())
    assert ids == [] and visible == ""


def test_concurrent_gpu_tasks_get_disjoint_ids(rayx_cluster):
    @rayx.remote(num_gpus=1, num_cpus=0)
    def hold(seconds):
        time.sleep(seconds)
        return rayx.get_gpu_ids()

    wait_for(lambda: rayx.available_resources()["GPU"] == 4, 10, what="idle GPUs")
    got = rayx.get([hold.remote(0.5) for _ in range(4)])
    flat = [i for ids in got for i in ids]
    assert sorted(flat) == [0, 1, 2, 3]


def test_fractional_gpus_share_one_device(rayx_cluster, tmp_path):
    @rayx.remote(num_gpus=0.5, num_cpus=0)
    def half(rendezvous, me):
        open(os.path.join(rendezvous, me), "w").close()
        deadline = time.monotonic() + 30
        while len(os.listdir(rendezvous)) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)  # hold the half GPU until the other half runs too
        return rayx.get_gpu_ids(), len(os.listdir(rendezvous))

    wait_for(lambda: rayx.available_resources()["GPU"] == 4, 10, what="idle GPUs")
    (ids_a, seen_a), (ids_b, seen_b) = rayx.get(
        [half.remote(str(tmp_path), name) for name in "ab"], timeout=60)
    assert seen_a == seen_b == 2  # they ran at the same time
    assert len(ids_a) == 1 and ids_a == ids_b  # and packed onto one device


def test_omp_threads_follow_cpu_allocation(rayx_cluster):
    assert rayx.get(env.remote("OMP_NUM_THREADS")) == "1"
    assert rayx.get(env.options(num_cpus=2).remote("OMP_NUM_THREADS")) == "2"


def test_a_task_that_changes_its_thread_variables_does_not_pass_them_on(rayx_cluster):
    """A worker sets OMP_NUM_THREADS and friends only where they differ from what the task
    needs; a task that changed them itself must not hand its values to the next task."""

    @rayx.remote
    def change_then_report():
        os.environ["OMP_NUM_THREADS"] = "7"
        os.environ["MKL_NUM_THREADS"] = "7"
        return os.getpid()

    @rayx.remote
    def report():
        return os.getpid(), os.environ.get("OMP_NUM_THREADS"), os.environ.get("MKL_NUM_THREADS")

    seen = set()
    for _ in range(20):  # until both ran in one worker (there are two)
        pid = rayx.get(change_then_report.remote())
        for _ in range(4):
            other, omp, mkl = rayx.get(report.remote())
            if other == pid:
                assert (omp, mkl) == ("1", "1")
                seen.add(pid)
        if seen:
            break
    assert seen, "no task ran in the worker whose variables were changed"


def test_task_waits_until_resources_fit(rayx_cluster):
    @rayx.remote(num_cpus=2)
    def span(seconds):
        start = time.monotonic()
        time.sleep(seconds)
        return start, time.monotonic()

    (s1, e1), (s2, e2) = rayx.get([span.remote(0.3), span.remote(0.3)], timeout=30)
    assert s2 >= e1 - 0.05 or s1 >= e2 - 0.05  # never both at once on 2 CPUs


def test_custom_resources_limit_concurrency(rayx_cluster):
    @rayx.remote(resources={"custom": 2}, num_cpus=0)
    def exclusive(seconds):
        start = time.monotonic()
        time.sleep(seconds)
        return start, time.monotonic()

    spans = sorted(rayx.get([exclusive.remote(0.2) for _ in range(3)], timeout=30))
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert start >= end - 0.05


def test_blocked_worker_lends_its_cpu(rayx_cluster):
    """Two tasks each wait on two children: 2 CPUs would deadlock without lending."""

    @rayx.remote
    def child(i):
        return i

    @rayx.remote
    def parent():
        return sum(rayx.get([child.remote(i) for i in range(2)]))

    assert rayx.get([parent.remote() for _ in range(4)], timeout=60) == [1, 1, 1, 1]


@pytest.mark.timeout(120)
def test_memory_option_holds_memory_while_the_task_runs(rayx_cluster, tmp_path):
    total = rayx.cluster_resources()["memory"]
    wait_for(lambda: rayx.available_resources()["memory"] == total, 10, what="idle memory")
    need = 256 * 1024 * 1024
    release = tmp_path / "release"

    @rayx.remote(num_cpus=0)
    def hold(path):
        deadline = time.monotonic() + 60
        while not os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.01)
        return "done"

    ref = hold.options(memory=need).remote(str(release))
    wait_for(lambda: rayx.available_resources()["memory"] == total - need, 20,
             what="the task's memory to be held")
    release.touch()
    assert rayx.get(ref, timeout=60) == "done"
    wait_for(lambda: rayx.available_resources()["memory"] == total, 10,
             what="the task's memory to be returned")


def test_memory_beyond_the_cluster_is_unschedulable(rayx_cluster):
    total = rayx.cluster_resources()["memory"]
    with pytest.raises(TaskUnschedulableError) as info:
        rayx.get(env.options(memory=int(total * 2)).remote("HOME"), timeout=20)
    assert "memory" in str(info.value)


def test_resource_pool_accounting():
    pool = ResourcePool({"CPU": 2.0, "GPU": 2.0, "x": 1.0}, num_gpus=2)
    a = pool.acquire({"CPU": 1.0, "GPU": 0.5})
    b = pool.acquire({"CPU": 1.0, "GPU": 0.5})
    assert a.gpu_ids == b.gpu_ids  # fractions pack onto one GPU
    assert pool.acquire({"CPU": 0.5}) is None
    assert pool.fits_total({"GPU": 2.0}) and not pool.fits_total({"GPU": 3.0})
    whole = pool.acquire({"GPU": 1.0})
    assert whole.gpu_ids != a.gpu_ids
    lent = pool.lend_cpu(a)
    assert pool.available["CPU"] == 1.0
    pool.reclaim_cpu(lent)
    for alloc in (a, b, whole):
        pool.release(alloc)
    assert pool.available == pool.total and pool.gpu_free == [1.0, 1.0]


@pytest.mark.parametrize("kwargs", [{"num_cpus": -1}, {"num_gpus": 1.5}, {"resources": {"x": "1"}},
                                    {"object_store_memory": -5}])
def test_bad_init_arguments(kwargs):
    if rayx.is_initialized():
        rayx.shutdown()
    with pytest.raises(rayx.exceptions.InvalidOptionError):
        rayx.init(**kwargs)
    assert not rayx.is_initialized()


def test_plain_init_takes_cpus_and_memory_from_the_machine(fresh_cluster):
    fresh_cluster()
    total = rayx.cluster_resources()
    assert total["CPU"] == psutil.cpu_count()
    assert total["memory"] > 0
    assert total["memory"] <= psutil.virtual_memory().total


def _kill_an_owner_holding_a_lease(tmp_path, outer_opts: dict, inner_opts: dict, resource: str):
    """An outer task leases a worker for an inner task, then its own worker is SIGKILLed: the
    lease it never returned is released and the inner task's worker ends."""
    @rayx.remote(max_retries=0, **inner_opts)
    def inner(path):
        with open(path, "w") as f:
            f.write(str(os.getpid()))
        time.sleep(60)

    @rayx.remote(max_retries=0, **outer_opts)
    def outer(path_outer, path_inner):
        ref = inner.remote(path_inner)
        with open(path_outer, "w") as f:
            f.write(str(os.getpid()))
        rayx.get(ref)

    full = rayx.available_resources()[resource]
    p_out, p_in = str(tmp_path / "outer"), str(tmp_path / "inner")
    ref = outer.remote(p_out, p_in)
    wait_for(lambda: os.path.exists(p_out) and os.path.exists(p_in)
             and open(p_out).read() and open(p_in).read(), 20, what="both tasks running")
    wait_for(lambda: rayx.available_resources()[resource] < full, 10,
             what="the inner lease to show")  # other nodes' figures come with heartbeats
    inner_pid = int(open(p_in).read())
    os.kill(int(open(p_out).read()), signal.SIGKILL)
    with pytest.raises(rayx.exceptions.WorkerCrashedError):
        rayx.get(ref, timeout=30)
    wait_for(lambda: rayx.available_resources()[resource] >= full, 20,
             what="the dead owner's lease to be released")
    wait_for(lambda: not psutil.pid_exists(inner_pid)
             or psutil.Process(inner_pid).status() == psutil.STATUS_ZOMBIE, 20,
             what="the inner task's worker to be killed")


def test_leases_of_a_dead_owner_are_released(fresh_cluster, tmp_path):
    fresh_cluster(num_cpus=2, resources={"custom": 2})
    _kill_an_owner_holding_a_lease(tmp_path, {"num_cpus": 0},
                                   {"num_cpus": 0, "resources": {"custom": 1}}, "custom")
