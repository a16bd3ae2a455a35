"""RayxExecutor: the concurrent.futures.Executor contract, on a real local cluster."""

from __future__ import annotations

import collections
import concurrent.futures as cf
import logging
import os
import random
import subprocess
import sys
import textwrap
import threading
import time
import weakref

import pytest

import rayx
from rayx.exceptions import RayxTaskError
from rayx_futures import BrokenRayxExecutor, RayxExecutor, RayxFuture

from .conftest import wait_for
from .test_joblib import max_overlap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def mul(x, y):
    return x * y


def capture(*args, **kwargs):
    return args, kwargs


def raise_runtime_error():
    raise RuntimeError(123)  # the remote traceback shows this line


def slow_identity(x, seconds):
    time.sleep(seconds)
    return x


def interval(seconds):
    start = time.monotonic()
    time.sleep(seconds)
    return start, time.monotonic()


def touch_then_sleep(path, seconds):
    with open(path, "w") as f:
        f.write("started")
    time.sleep(seconds)
    with open(path, "w") as f:
        f.write("finished")


def write_file(path):
    with open(path, "w") as f:
        f.write("ran")


def crash_once(path):
    if not os.path.exists(path):
        open(path, "w").close()
        os._exit(1)
    return "recovered"


def crash_always():
    os._exit(1)


def set_env(name, value):
    os.environ[name] = value


def get_env(name):
    return os.environ.get(name)


def failing_initializer():
    raise ValueError("error in initializer")


class MyObject:
    def my_method(self):
        pass


def make_dummy_object(_):
    return MyObject()


def run_script(code: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run a driver script in a fresh interpreter with its own local cluster."""
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def executor(rayx_cluster):
    ex = RayxExecutor(max_workers=2)
    yield ex
    ex.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------- construction


def test_uses_running_cluster_and_defaults_to_its_cpus(rayx_cluster):
    with RayxExecutor() as ex:
        assert ex._max_workers == int(rayx.cluster_resources()["CPU"]) == 2
        assert ex._broken is False
    assert rayx.is_initialized()  # not ours to stop


@pytest.mark.parametrize("number", [0, -1])
def test_max_workers_must_be_positive(rayx_cluster, number):
    with pytest.raises(ValueError, match="max_workers must be greater than 0"):
        RayxExecutor(max_workers=number)


def test_initializer_must_be_callable(rayx_cluster):
    with pytest.raises(TypeError):
        RayxExecutor(initializer=42)


def test_bad_resources_fail_at_construction(rayx_cluster):
    with pytest.raises(ValueError):
        RayxExecutor(num_cpus=-1)


# --------------------------------------------------------------------------- submit and map


def test_submit_returns_real_futures(executor):
    future = executor.submit(pow, 2, 8)
    assert isinstance(future, cf.Future) and isinstance(future, RayxFuture)
    assert future.result(timeout=30) == 256


def test_submit_keyword_arguments(executor):
    assert executor.submit(mul, 2, y=8).result() == 16
    assert executor.submit(capture, 1, self=2, fn=3).result() == ((1,), {"self": 2, "fn": 3})
    with pytest.raises(TypeError):
        executor.submit(fn=capture, arg=1)
    with pytest.raises(TypeError):
        executor.submit(arg=1)


def test_map_in_order_with_and_without_chunks(executor):
    expected = list(map(pow, range(40), range(40)))
    assert list(executor.map(pow, range(40), range(40))) == expected
    for chunksize in (3, 6, 40, 50):
        assert list(executor.map(pow, range(40), range(40), chunksize=chunksize)) == expected
    with pytest.raises(ValueError):
        executor.map(pow, range(4), range(4), chunksize=0)


def test_chunked_map_over_one_iterable_passes_each_item_whole(executor):
    """One iterable's chunks carry the items themselves (not 1-tuples): tuples, None and
    lists among them must still reach fn as single arguments."""
    items = [(1, 2), None, [3], "s", (), 7] * 5
    for chunksize in (2, 7, 30):
        assert list(executor.map(repr, items, chunksize=chunksize)) == [repr(x) for x in items]
    gen = (i for i in range(25))  # any iterable, consumed once
    assert list(executor.map(abs, gen, chunksize=4)) == list(range(25))
    with pytest.raises(TypeError):
        executor.map(abs, 5, chunksize=2)


def test_map_exception_reaches_the_right_item(executor):
    it = executor.map(divmod, [1, 1, 1, 1], [2, 3, 0, 5])
    assert next(it) == (0, 1)
    assert next(it) == (0, 1)
    with pytest.raises(ZeroDivisionError):
        next(it)


def test_map_timeout_raises_and_cancels_the_rest(rayx_cluster, tmp_path):
    paths = [str(tmp_path / f"f{i}") for i in range(4)]
    with RayxExecutor(max_workers=1) as ex:
        ex.submit(int).result()  # a worker is up: the 1 s below is not spent starting one
        it = ex.map(touch_then_sleep, paths, [0, 2, 2, 2], timeout=1)
        assert next(it) is None
        with pytest.raises(TimeoutError):
            next(it)
    assert [os.path.exists(p) for p in paths] == [True, True, False, False]


def test_closing_map_early_cancels_the_rest(rayx_cluster, tmp_path):
    paths = [str(tmp_path / f"f{i}") for i in range(6)]
    with RayxExecutor(max_workers=1) as ex:
        it = ex.map(touch_then_sleep, paths, [0.5] * 6)
        next(it)
        it.close()
    started = [p for p in paths if os.path.exists(p)]
    assert len(started) <= 2, started  # the one yielded and at most the one already running


def test_shutdown_cancel_futures_drops_the_calls_map_sent_ahead(rayx_cluster, tmp_path):
    """map sends calls ahead of the one running; cancel_futures drops those that no worker
    started, lets the running one finish, and map then raises CancelledError for the rest."""
    paths = [str(tmp_path / f"f{i}") for i in range(5)]
    ex = RayxExecutor(max_workers=1)
    it = ex.map(touch_then_sleep, paths, [0.5] * 5)
    assert next(it) is None
    wait_for(lambda: os.path.exists(paths[1]), 10, what="the second call to start")
    ex.shutdown(wait=True, cancel_futures=True)
    assert open(paths[1]).read() == "finished"  # the running call was left to finish
    assert not any(os.path.exists(p) for p in paths[2:])
    assert next(it) is None
    with pytest.raises(cf.CancelledError):
        next(it)


def test_map_buffersize_is_lazy(executor):
    consumed = []

    def numbers():
        for i in range(100):
            consumed.append(i)
            yield i

    it = executor.map(abs, numbers(), buffersize=2)
    assert len(consumed) == 2
    assert next(it) == 0
    assert len(consumed) == 3
    assert list(it) == list(range(1, 100))
    with pytest.raises(ValueError):
        executor.map(abs, range(3), buffersize=0)
    with pytest.raises(TypeError):
        executor.map(abs, range(3), buffersize=1.5)


def test_map_keeps_no_reference_to_results(executor):
    for obj in executor.map(make_dummy_object, range(10)):
        ref = weakref.ref(obj)
        del obj
        assert ref() is None


def test_no_stale_reference_to_the_callable(executor):
    obj = MyObject()
    collected = threading.Event()
    ref = weakref.ref(obj, lambda _: collected.set())  # noqa: F841
    executor.submit(obj.my_method).result()
    del obj
    assert collected.wait(10)


def test_max_workers_caps_concurrency(rayx_cluster):
    with RayxExecutor(max_workers=1) as ex:
        spans = sorted(ex.map(interval, [0.3] * 4))
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False)), spans


def test_max_workers_caps_calls_that_take_no_resources(rayx_cluster):
    with RayxExecutor(max_workers=2, num_cpus=0) as ex:
        spans = list(ex.map(interval, [0.3] * 6))
    assert max_overlap(spans) == 2, spans


def test_default_executor_sends_one_call_ahead_as_a_process_pool_does(rayx_cluster):
    with RayxExecutor() as ex:
        assert ex._max_workers == 2  # the cluster's CPUs
        futures = [ex.submit(time.sleep, 1.0) for _ in range(6)]
        cancelled = [f.cancel() for f in futures]
        assert cancelled == [False, False, False, True, True, True]


def test_gpu_and_custom_resource_executors(rayx_cluster):
    with RayxExecutor(num_cpus=0, num_gpus=1) as ex:
        assert ex._max_workers == 4  # the fixture's 4 virtual GPUs
        assert all(len(ids) == 1 for ids in ex.map(lambda _: rayx.get_gpu_ids(), range(4)))
    with RayxExecutor(num_cpus=1, num_gpus=1) as ex:
        assert ex._max_workers == 2  # CPUs run out first
    with RayxExecutor(num_cpus=0, resources={"custom": 1}) as ex:
        assert ex._max_workers == 2
        spans = list(ex.map(interval, [0.3] * 4))
    assert max_overlap(spans) <= 2, spans


def test_lambdas_and_closures(executor):
    offset = 10
    assert executor.submit(lambda x: x + offset, 5).result() == 15
    assert list(executor.map(lambda x: x * offset, range(3))) == [0, 10, 20]


def test_interactively_defined_function():
    result = run_script("""
        from rayx_futures import RayxExecutor
        def square(x):
            return x * x
        with RayxExecutor(max_workers=2) as ex:
            print(list(ex.map(square, range(5))))
    """)
    assert result.returncode == 0, result.stderr
    assert "[0, 1, 4, 9, 16]" in result.stdout


def test_calls_are_never_deduplicated(executor):
    values = [executor.submit(random.random).result() for _ in range(2)]
    values += [f.result() for f in [executor.submit(random.random) for _ in range(4)]]
    assert len(set(values)) == len(values)


# --------------------------------------------------------------------------- futures


def test_as_completed_wait_and_callbacks(executor):
    seen = []
    futures = [executor.submit(slow_identity, i, 0.1 * (3 - i)) for i in range(3)]
    futures[0].add_done_callback(lambda f: seen.append(f.result()))
    assert sorted(f.result() for f in cf.as_completed(futures, timeout=30)) == [0, 1, 2]
    done, not_done = cf.wait(futures, timeout=30)
    assert len(done) == 3 and not not_done
    wait_for(lambda: seen == [0], what="the done callback")


def test_callbacks_run_on_the_dispatcher_thread_never_on_rayx_threads(executor):
    """Plain results are delivered on rayx's connection thread; user callbacks must not be."""
    threads = []
    futures = [executor.submit(slow_identity, i, 0.05) for i in range(6)]
    for fut in futures:
        fut.add_done_callback(lambda f: threads.append(threading.current_thread().name))
    failing = executor.submit(raise_runtime_error)
    failing.add_done_callback(lambda f: threads.append(threading.current_thread().name))
    assert [f.result(timeout=30) for f in futures] == list(range(6))
    with pytest.raises(RuntimeError):
        failing.result(timeout=30)
    wait_for(lambda: len(threads) == 7, what="the done callbacks")
    assert all(name.startswith("RayxExecutor-") for name in threads), threads


def test_results_without_callbacks_reach_waiters(executor):
    """The path that skips the dispatcher still wakes result(), as_completed and wait."""
    futures = [executor.submit(mul, i, 2) for i in range(50)]
    assert sorted(f.result() for f in cf.as_completed(futures, timeout=30)) == [
        2 * i for i in range(50)]
    done, not_done = cf.wait(futures, timeout=30)
    assert len(done) == 50 and not not_done


def test_cancel_pending_future_never_runs_its_call(rayx_cluster, tmp_path):
    marker = str(tmp_path / "cancelled-ran")
    with RayxExecutor(max_workers=1) as ex:
        blocker = ex.submit(slow_identity, "first", 1.0)
        victim = ex.submit(write_file, marker)
        assert victim.cancel()
        assert victim.cancelled()
        assert blocker.result() == "first"
    assert not os.path.exists(marker)


def test_exception_keeps_type_and_remote_traceback(executor):
    future = executor.submit(raise_runtime_error)
    with pytest.raises(RuntimeError) as info:
        future.result()
    assert isinstance(info.value, RayxTaskError)
    assert info.value.args == (123,)
    assert "raise RuntimeError(123)  # the remote traceback shows this line" in str(info.value)
    assert isinstance(future.exception(), RuntimeError)


@pytest.mark.timeout(120)
def test_lost_worker_is_retried(executor, tmp_path):
    assert executor.submit(crash_once, str(tmp_path / "crashed")).result() == "recovered"


@pytest.mark.timeout(120)
def test_lost_worker_after_retries_fails_only_its_future(executor):
    doomed = executor.submit(crash_always)
    with pytest.raises(cf.BrokenExecutor):
        doomed.result(timeout=60)
    assert not executor._broken
    assert executor.submit(mul, 6, 7).result() == 42


def test_nested_executor_inside_a_task_does_not_deadlock(executor):
    def outer(n):
        with RayxExecutor(max_workers=2) as inner:
            return sum(inner.submit(mul, i, i).result() for i in range(n))

    # Both CPUs are held by the outer calls; their blocked result() lends them back.
    assert list(executor.map(outer, [3, 4], timeout=60)) == [5, 14]


# --------------------------------------------------------------------------- initializer


def test_initializer_runs_in_each_worker_first(rayx_cluster):
    with RayxExecutor(max_workers=2, initializer=set_env,
                      initargs=("RAYX_TEST_INIT", "initialized")) as ex:
        futures = [ex.submit(get_env, "RAYX_TEST_INIT") for _ in range(4)]
        assert [f.result() for f in futures] == ["initialized"] * 4


def test_failing_initializer_breaks_the_executor(rayx_cluster, caplog):
    with caplog.at_level(logging.CRITICAL, logger="concurrent.futures"):
        ex = RayxExecutor(max_workers=2, initializer=failing_initializer)
        futures = []
        for _ in range(5):  # the executor may break before the last submit, which then raises
            try:
                futures.append(ex.submit(mul, 1, 2))
            except cf.BrokenExecutor:
                break
        assert futures
        for future in futures:
            with pytest.raises(cf.BrokenExecutor):
                future.result(timeout=30)
        wait_for(lambda: ex._broken, what="the executor to be broken")
        with pytest.raises(cf.BrokenExecutor):
            ex.submit(mul, 1, 2)
        ex.shutdown()
    assert any("ValueError: error in initializer" in r.getMessage() for r in caplog.records)


def test_map_calls_run_after_the_initializer(rayx_cluster):
    with RayxExecutor(max_workers=2, initializer=set_env,
                      initargs=("RAYX_TEST_INIT", "mapped")) as ex:
        for chunksize in (1, 2):
            assert list(ex.map(get_env, ["RAYX_TEST_INIT"] * 4, chunksize=chunksize)) == \
                ["mapped"] * 4


def test_map_with_a_large_closure(executor):
    import numpy as np

    big = np.arange(200_000)  # 1.6 MB: the function travels through the object store
    assert list(executor.map(lambda i: int(big[i]), [0, 199_999])) == [0, 199_999]
    assert list(executor.map(lambda i: int(big[i]), range(4), chunksize=2)) == [0, 1, 2, 3]


def test_max_tasks_per_child_counts_map_calls_too(rayx_cluster):
    with RayxExecutor(1, max_tasks_per_child=2) as ex:
        pids = [ex.submit(os.getpid).result()]
        pids += list(ex.map(lambda _: os.getpid(), range(3)))
    counts = collections.Counter(pids)
    assert len(counts) == 2 and max(counts.values()) == 2, pids


def test_max_tasks_per_child_retires_workers(rayx_cluster):
    with RayxExecutor(1, max_tasks_per_child=3) as ex:
        pids = [ex.submit(os.getpid).result() for _ in range(4)]
    assert pids[0] == pids[1] == pids[2] != pids[3]


# --------------------------------------------------------------------------- shutdown


def test_submit_after_shutdown_raises(rayx_cluster):
    ex = RayxExecutor(max_workers=1)
    ex.shutdown()
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(pow, 2, 5)


def test_shutdown_waits_for_all_calls(rayx_cluster):
    ex = RayxExecutor(max_workers=2)
    futures = [ex.submit(slow_identity, i, 0.05) for i in range(10)]
    ex.shutdown(wait=True)
    assert [f.result(timeout=0) for f in futures] == list(range(10))


def test_shutdown_cancel_futures(rayx_cluster):
    ex = RayxExecutor(max_workers=2)
    futures = [ex.submit(time.sleep, 0.1) for _ in range(50)]
    ex.shutdown(cancel_futures=True)
    cancelled = [f for f in futures if f.cancelled()]
    others = [f for f in futures if not f.cancelled()]
    assert len(cancelled) > 20 and others
    assert all(f.done() and f.exception() is None for f in others)


def test_shutdown_no_wait_still_completes(rayx_cluster):
    ex = RayxExecutor(max_workers=2)
    results = ex.map(abs, range(-5, 5))
    ex.shutdown(wait=False)
    assert list(results) == [abs(v) for v in range(-5, 5)]


def test_cancel_right_before_shutdown_does_not_hang(rayx_cluster):
    ex = RayxExecutor(max_workers=1)
    ex.submit(int).result()
    ex.submit(int).cancel()
    ex.shutdown(wait=True)


def test_owned_cluster_stops_with_the_executor():
    result = run_script("""
        import rayx
        from rayx_futures import RayxExecutor
        assert not rayx.is_initialized()
        ex = RayxExecutor(num_cpus=1)
        assert rayx.is_initialized() and ex._max_workers >= 1
        assert ex.submit(sum, [1, 2]).result() == 3
        ex.shutdown()
        print("initialized after shutdown:", rayx.is_initialized())
    """)
    assert result.returncode == 0, result.stderr
    assert "initialized after shutdown: False" in result.stdout


def test_unwaited_work_finishes_at_interpreter_exit(tmp_path):
    marker = tmp_path / "apple"
    result = run_script(f"""
        from rayx_futures import RayxExecutor
        from tests.test_executor import touch_then_sleep
        ex = RayxExecutor(max_workers=2)
        ex.submit(touch_then_sleep, {str(marker)!r}, 1.0)
    """)
    assert result.returncode == 0, result.stderr
    assert marker.read_text() == "finished"


def test_submit_during_interpreter_shutdown_raises():
    result = run_script("""
        import atexit
        @atexit.register
        def run_last():
            try:
                ex.submit(id, None)
            except RuntimeError as exc:
                print("runtime-error:", exc)
        from rayx_futures import RayxExecutor
        ex = RayxExecutor(max_workers=1)
        ex.submit(id, 42).result()
    """)
    assert result.returncode == 0, result.stderr
    assert "runtime-error: cannot schedule new futures after interpreter shutdown" in result.stdout


@pytest.mark.parametrize("method", ["terminate_workers", "kill_workers"])
def test_force_shutdown_stops_running_and_queued_calls(rayx_cluster, tmp_path, method):
    running, queued = str(tmp_path / "running"), str(tmp_path / "queued")
    ex = RayxExecutor(max_workers=1)
    first = ex.submit(touch_then_sleep, running, 30)
    second = ex.submit(write_file, queued)
    wait_for(lambda: os.path.exists(running), 30, what="the first call to start")
    getattr(ex, method)()
    assert second.cancelled()
    with pytest.raises(cf.BrokenExecutor, match="forcefully shut down"):
        first.result(timeout=30)
    with pytest.raises(RuntimeError):
        ex.submit(time.sleep, 0)
    ex.shutdown(wait=True)
    assert open(running).read() == "started"
    assert not os.path.exists(queued)


def test_force_shutdown_rejects_unknown_operation(rayx_cluster):
    with RayxExecutor(max_workers=1) as ex, pytest.raises(ValueError):
        ex._force_shutdown(operation="invalid operation")


@pytest.mark.timeout(120)
def test_cluster_death_breaks_the_executor():
    result = run_script("""
        import concurrent.futures as cf, os, signal, time
        import psutil
        from rayx_futures import RayxExecutor
        ex = RayxExecutor(max_workers=2)
        assert ex.submit(sum, [1, 1]).result() == 2
        pending = [ex.submit(time.sleep, 60) for _ in range(4)]
        for child in psutil.Process().children(recursive=True):
            try:
                node = "rayx.node_main" in " ".join(child.cmdline())
            except psutil.Error:  # a worker exiting meanwhile: not the node
                continue
            if node:
                child.send_signal(signal.SIGKILL)
        for f in pending:
            try:
                f.result(timeout=30)
            except cf.BrokenExecutor as exc:
                print("broken future:", type(exc).__name__)
        try:
            ex.submit(sum, [1])
        except cf.BrokenExecutor:
            print("submit refused")
        ex.shutdown()
    """, timeout=100)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("broken future: BrokenRayxExecutor") == 4, result.stdout
    assert "submit refused" in result.stdout


# --------------------------------------------------------------------------- with Dask


def test_dask_compute_with_executor_as_scheduler(rayx_cluster):
    dask = pytest.importorskip("dask")
    da = pytest.importorskip("dask.array")
    x = da.arange(100, chunks=10)
    with RayxExecutor() as ex:
        (total,) = dask.compute(x.sum(), scheduler=ex)
    assert total == sum(range(100))


def test_broken_error_is_a_broken_executor():
    assert issubclass(BrokenRayxExecutor, cf.BrokenExecutor)


@pytest.mark.timeout(120)
def test_example_runs_as_is():
    result = subprocess.run([sys.executable, os.path.join("examples", "executor_map.py")],
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
                            capture_output=True, text=True, timeout=100)
    assert result.returncode == 0, result.stderr
    assert "primes below 2,000,000: 148,933" in result.stdout


def test_unpicklable_call_fails_only_its_future(executor):
    future = executor.submit(id, threading.Lock())
    with pytest.raises(TypeError):
        future.result(timeout=30)
    assert executor.submit(mul, 2, 3).result() == 6


def test_unpicklable_call_queued_behind_a_running_one_fails_only_its_future(rayx_cluster):
    """A queued call is sent from the thread that saw the previous one finish; when it cannot
    be pickled there, the dispatcher meets the error again and fails only that future."""
    with RayxExecutor(max_workers=1) as ex:
        first = ex.submit(slow_identity, "first", 0.3)
        bad = ex.submit(id, threading.Lock())
        after = ex.submit(mul, 2, 3)
        assert first.result(timeout=30) == "first"
        with pytest.raises(TypeError):
            bad.result(timeout=30)
        assert after.result(timeout=30) == 6
