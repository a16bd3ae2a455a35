"""rayx.dask: Dask graphs of every form on rayx, data kept in the object store, callbacks."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import dask
import dask.array as da
import dask.bag as db
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
from dask._task_spec import Task, TaskRef
from dask.callbacks import Callback
from dask.diagnostics import ProgressBar
from dask.highlevelgraph import HighLevelGraph

import rayx
import rayx.dask
from rayx.dask import RayxDaskClient, RayxDaskFuture
from rayx_futures import RayxExecutor

from .conftest import wait_for


def inc(x):
    return x + 1


def add(x, y):
    return x + y


def boom(x):
    raise ValueError(f"bad input {x}")


def sleep_then(x, seconds):
    time.sleep(seconds)
    return x


class Traced:
    """A value that logs the pid of every process that unpickles it."""

    def __init__(self, log: str, size: int):
        self.log, self.data = log, np.ones(size)

    def __reduce__(self):
        return (_rebuild_traced, (self.log, self.data))


def _rebuild_traced(log, data):
    with open(log, "a") as f:
        f.write(f"{os.getpid()}\n")
    obj = Traced.__new__(Traced)
    obj.log, obj.data = log, data
    return obj


def make_traced(log, size):
    return Traced(log, size)


def total_of(traced):
    return float(traced.data.sum())


# --------------------------------------------------------------------------- entry points


def test_compute_with_scheduler_argument(rayx_cluster):
    x = da.arange(100, chunks=10)
    assert dask.compute(x.sum(), scheduler=rayx.dask.get) == (4950,)


def test_config_set_and_helpers(rayx_cluster):
    x = da.ones((20, 20), chunks=5)
    with dask.config.set(scheduler=rayx.dask.get):
        assert dask.base.get_scheduler() is rayx.dask.get
        assert x.sum().compute() == 400
    with rayx.dask.enable_dask_on_rayx():
        assert dask.base.get_scheduler() is rayx.dask.get
    rayx.dask.enable_dask_on_rayx(num_cpus=1)
    try:
        assert isinstance(dask.base.get_scheduler().__self__, RayxDaskClient)
        assert x.mean().compute() == 1.0
    finally:
        rayx.dask.disable_dask_on_rayx()
    assert dask.config.get("scheduler", None) is None


def test_client_object_is_a_scheduler(rayx_cluster):
    client = RayxDaskClient(num_cpus=1)
    assert dask.compute(da.arange(10, chunks=3).sum(), scheduler=client) == (45,)


def test_bad_remote_options_fail_at_once(rayx_cluster):
    with pytest.raises(ValueError):
        RayxDaskClient(num_cpus=-1)


# --------------------------------------------------------------------------- graph forms


def test_legacy_tuple_graph_and_nested_keys(rayx_cluster):
    dsk = {"x": 1, "y": (inc, "x"), "z": (add, "y", 10), "w": "z", "v": (sum, ["x", "y", "z"])}
    assert rayx.dask.get(dsk, "z") == 12
    assert rayx.dask.get(dsk, ["y", "w"]) == (2, 12)
    assert rayx.dask.get(dsk, [["x", "y"], ["z", ["v"]]]) == ((1, 2), (12, (15,)))


def test_task_spec_graph(rayx_cluster):
    dsk = {
        "a": Task("a", inc, 1),
        "b": Task("b", add, TaskRef("a"), 5),
        "c": Task("c", add, TaskRef("a"), TaskRef("b")),
    }
    assert rayx.dask.get(dsk, ["c", "b"]) == (9, 7)


def test_high_level_graph(rayx_cluster):
    layers = {"one": {"x": 1}, "two": {"y": (inc, "x")}}
    hlg = HighLevelGraph(layers, {"one": set(), "two": {"one"}})
    assert rayx.dask.get(hlg, "y") == 2


def test_missing_key_raises_key_error(rayx_cluster):
    with pytest.raises(KeyError):
        rayx.dask.get({"x": 1}, "y")
    with pytest.raises(KeyError):
        rayx.dask.get({"x": 1, "y": (inc, "x")}, ["y", "nope"])


@pytest.mark.timeout(120)
def test_ten_thousand_task_chain(rayx_cluster):
    dsk = {"k0": 0}
    for i in range(1, 10_001):
        dsk[f"k{i}"] = (inc, f"k{i - 1}")
    assert rayx.dask.get(dsk, "k10000") == 10_000


# --------------------------------------------------------------------------- collections


def test_array_matches_sync(rayx_cluster):
    x = da.random.default_rng(0).random((300, 200), chunks=(50, 50))
    y = (x @ x.T + 1).mean(axis=0)[:10]
    np.testing.assert_allclose(y.compute(scheduler=rayx.dask.get),
                               y.compute(scheduler="sync"))


def test_dataframe_matches_sync(rayx_cluster):
    pdf = pd.DataFrame({"g": np.arange(2000) % 13, "v": np.arange(2000.0)})
    ddf = dd.from_pandas(pdf, npartitions=5)
    agg = ddf.groupby("g").v.agg(["sum", "mean", "count"])
    pd.testing.assert_frame_equal(agg.compute(scheduler=rayx.dask.get),
                                  agg.compute(scheduler="sync"))
    assert len(ddf[ddf.v > 1000]) == 999


def test_bag_matches_sync(rayx_cluster):
    b = db.from_sequence(range(200), npartitions=7).map(inc).filter(lambda v: v % 3).sum()
    assert b.compute(scheduler=rayx.dask.get) == b.compute(scheduler="sync")


def test_delayed_matches_sync(rayx_cluster):
    parts = [dask.delayed(inc)(i) for i in range(10)]
    total = dask.delayed(sum)(parts)
    assert dask.compute(total, parts[3], scheduler=rayx.dask.get) == (55, 4)


# --------------------------------------------------------------------------- data placement


def test_intermediate_results_never_reach_the_driver(rayx_cluster, tmp_path):
    log = str(tmp_path / "unpickled")
    big = dask.delayed(make_traced)(log, 500_000)  # 4 MB: lives in the object store
    result = dask.delayed(total_of)(big)
    assert result.compute(scheduler=rayx.dask.get) == 500_000.0
    pids = set(open(log).read().split())
    assert pids and str(os.getpid()) not in pids


def test_persist_keeps_results_in_the_object_store(rayx_cluster, tmp_path):
    x = da.arange(100, chunks=10) * 2
    (p,) = dask.persist(x, scheduler=rayx.dask.get)
    values = list(dict(p.__dask_graph__()).values())
    assert values and all(isinstance(v, RayxDaskFuture) for v in values)
    assert all(isinstance(v.ref, rayx.ObjectRef) for v in values)
    assert (p + 1).sum().compute(scheduler=rayx.dask.get) == 2 * 4950 + 100
    np.testing.assert_array_equal(p.compute(scheduler=rayx.dask.get), np.arange(100) * 2)

    log = str(tmp_path / "unpickled")
    traced = dask.delayed(make_traced)(log, 500_000).persist(scheduler=rayx.dask.get)
    assert not os.path.exists(log)  # persisted, not fetched
    assert dask.delayed(total_of)(traced).compute(scheduler=rayx.dask.get) == 500_000.0


def test_persist_dataframe(rayx_cluster):
    pdf = pd.DataFrame({"g": np.arange(500) % 5, "v": np.arange(500.0)})
    ddf = dd.from_pandas(pdf, npartitions=4).persist(scheduler=rayx.dask.get)
    got = ddf.groupby("g").v.sum().compute(scheduler=rayx.dask.get)
    pd.testing.assert_series_equal(got, pdf.groupby("g").v.sum())


# --------------------------------------------------------------------------- callbacks, errors


class Recorder(Callback):
    def __init__(self):
        super().__init__()
        self.events = []
        self.counts = []

    def _start(self, dsk):
        self.events.append("start")

    def _start_state(self, dsk, state):
        self.events.append("start_state")
        assert set(state) >= {"ready", "waiting", "running", "finished", "cache", "released"}

    def _pretask(self, key, dsk, state):
        self.events.append(("pre", key))
        assert key in state["running"]

    def _posttask(self, key, result, dsk, state, worker_id):
        self.events.append(("post", key))
        assert key in state["finished"] and isinstance(result, rayx.ObjectRef)
        self.counts.append(len(state["finished"]))

    def _finish(self, dsk, state, errored):
        self.events.append(("finish", errored))


def test_callbacks_fire_in_order_with_state(rayx_cluster):
    dsk = {"x": 1, "y": (inc, "x"), "z": (add, "y", "y")}
    with Recorder() as rec:
        assert rayx.dask.get(dsk, "z") == 4
    assert rec.events == ["start", "start_state", ("pre", "y"), ("post", "y"), ("pre", "z"),
                          ("post", "z"), ("finish", False)]
    assert rec.counts == [1, 2]


def test_progress_bar(rayx_cluster, capsys):
    x = da.ones((100, 100), chunks=10)
    with ProgressBar(dt=0.01):
        assert x.sum().compute(scheduler=rayx.dask.get) == 10_000
    assert "100% Completed" in capsys.readouterr().out


def test_callbacks_passed_to_compute(rayx_cluster):
    """As Dask's own schedulers take them: the tuples of Callback._callback."""
    rec = Recorder()
    x = dask.delayed(inc)(1)
    assert dask.compute(x, scheduler=rayx.dask.get, callbacks=[rec._callback]) == (2,)
    assert rec.events[0] == "start" and rec.events[-1] == ("finish", False)
    assert [e for e in rec.events if isinstance(e, tuple) and e[0] == "post"]


def test_profiler_and_cache_profiler_record_every_task(rayx_cluster):
    from dask.diagnostics import CacheProfiler, Profiler

    x = da.ones((40, 40), chunks=10)
    y = (x + 1).sum()
    with Profiler() as prof, CacheProfiler() as cprof:
        assert y.compute(scheduler=rayx.dask.get) == 3200
    assert len(prof.results) >= 16  # at least one record per chunk's task
    assert all(r.end_time >= r.start_time for r in prof.results)
    assert len(cprof.results) == len(prof.results)  # one cache record per finished task


def test_exceptions_keep_their_type_and_finish_reports_error(rayx_cluster):
    dsk = {"x": 1, "y": (boom, "x"), "z": (inc, "y")}
    with Recorder() as rec, pytest.raises(ValueError, match="bad input 1"):
        rayx.dask.get(dsk, "z")
    assert rec.events[-1] == ("finish", True)


def test_error_cancels_the_rest(rayx_cluster):
    dsk = {"bad": (boom, 1), "slow": (sleep_then, 1, 30), "both": (add, "bad", "slow")}
    start = time.monotonic()
    with pytest.raises(ValueError):
        rayx.dask.get(dsk, "both")
    assert time.monotonic() - start < 10
    wait_for(lambda: rayx.available_resources().get("CPU") == 2.0, 15,
             what="the slow task to be cancelled")


def test_dask_inside_tasks_does_not_deadlock(rayx_cluster):
    def graph_sum(n):
        return da.arange(n, chunks=5).sum().compute(scheduler=rayx.dask.get)

    # Both CPUs are held by the outer calls while their graphs run: they lend them back.
    with RayxExecutor(max_workers=2) as ex:
        assert list(ex.map(graph_sum, [20, 40], timeout=60)) == [190, 780]


@pytest.mark.timeout(120)
def test_example_runs_as_is():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, os.path.join("examples", "dask_dataframe.py")],
                            cwd=root, env={**os.environ, "PYTHONPATH": root},
                            capture_output=True, text=True, timeout=100)
    assert result.returncode == 0, result.stderr
    assert "partitions on rayx" in result.stdout and "matches pandas" in result.stdout
