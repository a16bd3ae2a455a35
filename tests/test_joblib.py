"""The 'rayx' joblib backend: registration, joblib's features, sharing, nesting, scikit-learn."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import textwrap
import threading
import time

import joblib
import numpy as np
import pytest
from joblib import Parallel, delayed, parallel_backend, parallel_config

import rayx
import rayx_joblib
from rayx.exceptions import RayxTaskError
from rayx_joblib import RayxBackend

from .conftest import wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def square(x):
    return x * x


def interval(seconds):
    start = time.monotonic()
    time.sleep(seconds)
    return start, time.monotonic()


def fail_or_sleep(i):
    if i == 0:
        raise KeyError("first task fails")
    time.sleep(30)
    return i


def active_backend_name():
    backend, _ = joblib.parallel.get_active_backend()
    return type(backend).__name__


def nested_intervals(n):
    with parallel_backend("rayx"):  # by name, inside a worker
        return Parallel(n_jobs=-1)(delayed(interval)(0.3) for _ in range(n))


def loky_inside(n):
    return Parallel(n_jobs=2, backend="loky")(delayed(square)(i) for i in range(n))


def column_sum(x, j):
    return float(x[:, j].sum())


class CountingArray(np.ndarray):
    """Counts how often the driver pickles it (each pickling is one copy sent somewhere)."""

    pickled = 0

    def __reduce_ex__(self, protocol):
        CountingArray.pickled += 1
        return super().__reduce_ex__(protocol)


def max_overlap(spans) -> int:
    """The largest number of (start, end) spans running at one instant."""
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    best = running = 0
    for _, step in events:
        running += step
        best = max(best, running)
    return best


def run_script(code: str, timeout: float = 90) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


# --------------------------------------------------------------------------- registration


def test_import_registers_the_backend(rayx_cluster):
    assert joblib.parallel.BACKENDS["rayx"] is RayxBackend
    rayx_joblib.register()  # idempotent
    with parallel_backend("rayx", n_jobs=2):
        assert Parallel()(delayed(square)(i) for i in range(10)) == [i * i for i in range(10)]
    with parallel_config(backend="rayx"):
        assert active_backend_name() == "RayxBackend"
        assert Parallel(n_jobs=2)(delayed(square)(i) for i in range(5)) == [0, 1, 4, 9, 16]


def test_n_jobs_minus_one_means_the_cluster_cpus_and_n_jobs_caps_tasks():
    result = run_script("""
        import time
        import rayx, rayx_joblib
        from joblib import Parallel, delayed, effective_n_jobs, parallel_backend
        from tests.test_joblib import interval, max_overlap
        rayx.init(num_cpus=5)
        with parallel_backend("rayx"):
            print("all:", effective_n_jobs(-1), effective_n_jobs(-2), effective_n_jobs(3))
            capped = Parallel(n_jobs=2)(delayed(interval)(0.4) for _ in range(6))
            wide = Parallel(n_jobs=-1)(delayed(interval)(0.4) for _ in range(10))
        print("overlap:", max_overlap(capped), max_overlap(wide))
    """)
    assert result.returncode == 0, result.stderr
    assert "all: 5 4 3" in result.stdout
    capped, wide = result.stdout.split("overlap:")[1].split()
    assert int(capped) == 2 and int(wide) >= 3, result.stdout


# --------------------------------------------------------------------------- joblib features


def test_auto_batching_grows_batches_of_tiny_calls(rayx_cluster, capsys):
    with parallel_backend("rayx"):
        out = Parallel(n_jobs=2, verbose=10)(delayed(square)(i) for i in range(3000))
    assert out == [i * i for i in range(3000)]
    assert "Setting batch_size=" in capsys.readouterr().err


@pytest.mark.parametrize("return_as", ["generator", "generator_unordered"])
def test_generators(rayx_cluster, return_as):
    with parallel_backend("rayx"):
        gen = Parallel(n_jobs=2, return_as=return_as)(delayed(square)(i) for i in range(20))
        assert not isinstance(gen, list)
        results = list(gen)
    if return_as == "generator":
        assert results == [i * i for i in range(20)]
    else:
        assert sorted(results) == [i * i for i in range(20)]


def test_timeout(rayx_cluster):
    start = time.monotonic()
    # joblib raises multiprocessing's TimeoutError, whatever the backend.
    with parallel_backend("rayx"), pytest.raises(multiprocessing.TimeoutError):
        Parallel(n_jobs=2, timeout=0.5)(delayed(time.sleep)(s) for s in (0, 10, 10))
    assert time.monotonic() - start < 8
    wait_for(lambda: rayx.available_resources().get("CPU") == 2.0, 15,
             what="the timed-out tasks to be cancelled")


def test_verbose_progress(rayx_cluster, capsys):
    with parallel_backend("rayx"):
        Parallel(n_jobs=2, verbose=50)(delayed(square)(i) for i in range(8))
    out = capsys.readouterr()
    text = out.out + out.err
    assert "Using backend RayxBackend with 2 concurrent workers" in text
    assert "Done   8 out of   8" in text


def test_errors_keep_their_type_and_abort_the_rest(rayx_cluster):
    start = time.monotonic()
    with parallel_backend("rayx"), pytest.raises(KeyError, match="first task fails") as info:
        Parallel(n_jobs=2, batch_size=1)(delayed(fail_or_sleep)(i) for i in range(6))
    assert isinstance(info.value, RayxTaskError)
    assert time.monotonic() - start < 10
    # The sleeping tasks were really cancelled: the cluster's CPUs come back long before 30 s.
    wait_for(lambda: rayx.available_resources().get("CPU") == 2.0, 15,
             what="the remaining tasks to be cancelled")


# --------------------------------------------------------------------------- nesting


@pytest.mark.timeout(120)
def test_nested_parallel_neither_deadlocks_nor_oversubscribes(rayx_cluster):
    with parallel_backend("rayx"):
        groups = Parallel(n_jobs=2)(delayed(nested_intervals)(4) for _ in range(2))
    spans = [span for group in groups for span in group]
    assert len(spans) == 8
    # Both outer tasks hold a CPU while they wait; they lend it, so the inner tasks run on
    # the 2 CPUs of the node and never more than 2 at once.
    assert max_overlap(spans) <= 2


def test_backend_is_known_inside_workers(rayx_cluster):
    with parallel_backend("rayx"):
        names = Parallel(n_jobs=2)(delayed(active_backend_name)() for _ in range(2))
    assert names == ["RayxBackend", "RayxBackend"]


@pytest.mark.timeout(120)
def test_loky_works_inside_a_task(rayx_cluster):
    with parallel_backend("rayx"):
        out = Parallel(n_jobs=2)(delayed(loky_inside)(4) for _ in range(2))
    assert out == [[0, 1, 4, 9]] * 2


# --------------------------------------------------------------------------- large arguments


def test_large_argument_goes_to_the_store_once_per_call(rayx_cluster):
    data = np.arange(4_000_000, dtype=np.float64).reshape(-1, 4)  # 32 MB
    x = data.view(CountingArray)
    CountingArray.pickled = 0
    with parallel_backend("rayx"):
        sums = Parallel(n_jobs=2, batch_size=1)(delayed(column_sum)(x, j % 4)
                                                for j in range(12))
    assert sums == [float(data[:, j % 4].sum()) for j in range(12)]
    assert CountingArray.pickled == 1


def test_small_arguments_travel_inline(rayx_cluster):
    x = np.ones((10, 4)).view(CountingArray)
    CountingArray.pickled = 0
    with parallel_backend("rayx"):
        Parallel(n_jobs=2, batch_size=1)(delayed(column_sum)(x, j) for j in range(4))
    assert CountingArray.pickled == 4


class _PeakSampler:
    """Samples the bytes in the node's object store, the driver's RSS and the private dirty
    memory of the cluster's processes (a copy of X would land there; a store object they only
    read, or pages still shared with the fork server, do not), keeping the peaks."""

    def __init__(self):
        import psutil

        self._proc = psutil.Process()
        self._store = rayx.nodes()[0]["StoreDir"]
        self.store_peak = self.rss_peak = self.cluster_anon_peak = 0
        self.cluster_anon_base = self._cluster_anon()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _cluster_anon(self) -> int:
        total = 0
        for p in self._proc.children(recursive=True):  # node, fork server, workers
            try:
                with open(f"/proc/{p.pid}/smaps_rollup") as f:
                    total += next(int(line.split()[1]) * 1024 for line in f
                                  if line.startswith("Private_Dirty:"))
            except (OSError, StopIteration):
                pass
        return total

    def _store_bytes(self) -> int:
        """Bytes of objects in the store; free files (freed objects' memory kept for the next
        put, here mostly from earlier tests) are no copy of anything."""
        total = 0
        for entry in os.scandir(self._store):
            if entry.name.startswith("free-"):
                continue
            try:
                total += entry.stat().st_size
            except FileNotFoundError:
                pass
        return total

    def _run(self):
        while not self._stop.is_set():
            self.store_peak = max(self.store_peak, self._store_bytes())
            self.rss_peak = max(self.rss_peak, self._proc.memory_info().rss)
            self.cluster_anon_peak = max(self.cluster_anon_peak, self._cluster_anon())
            self._stop.wait(0.02)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


class _TinySplits:
    """CV splitter with small folds, so that memory is about how X travels, not X[train]."""

    def split(self, X, y=None, groups=None):
        for k in range(3):
            idx = np.arange(k * 2000, (k + 1) * 2000)
            yield idx, idx + 10_000

    def get_n_splits(self, X=None, y=None, groups=None):
        return 3


@pytest.mark.timeout(120)
def test_grid_search_over_200mb_does_not_copy_x_per_task(rayx_cluster):
    from sklearn.linear_model import Ridge
    from sklearn.model_selection import GridSearchCV

    x = np.random.default_rng(0).random((1_000_000, 25))  # 200 MB
    y = x[:, 0] * 2.0
    import psutil

    with parallel_backend("rayx"):  # the workers import scikit-learn before we measure
        GridSearchCV(Ridge(), {"alpha": [1.0, 2.0]}, cv=2, n_jobs=2).fit(x[:100], y[:100])

    base_rss = psutil.Process().memory_info().rss
    with _PeakSampler() as peaks, parallel_backend("rayx"):
        search = GridSearchCV(Ridge(), {"alpha": [0.1, 1.0, 10.0, 100.0]}, cv=_TinySplits(),
                              n_jobs=2, refit=False).fit(x, y)
    assert search.best_params_ == {"alpha": 0.1}
    # 12 tasks used X: one copy went to the store, the driver made none of its own, and no
    # worker made one either (they read X as a view of the store's pages).
    assert peaks.store_peak <= 1.2 * x.nbytes, peaks.store_peak
    assert peaks.rss_peak - base_rss <= 0.5 * x.nbytes, peaks.rss_peak - base_rss
    grew = peaks.cluster_anon_peak - peaks.cluster_anon_base
    assert grew <= 0.5 * x.nbytes, grew


# --------------------------------------------------------------------------- scikit-learn


def _digits():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return x[:600], y[:600]


@pytest.mark.timeout(120)
def test_sklearn_searches_match_sequential(rayx_cluster):
    from sklearn.model_selection import GridSearchCV, RandomizedSearchCV, cross_val_score
    from sklearn.svm import SVC

    x, y = _digits()
    grid = {"C": [1, 10], "gamma": [0.001, 0.0001]}

    def run():
        g = GridSearchCV(SVC(), grid, cv=3, n_jobs=-1).fit(x, y)
        r = RandomizedSearchCV(SVC(), {"C": [0.1, 1, 10, 100], "gamma": [1e-3, 1e-4]},
                               n_iter=4, cv=3, random_state=0, n_jobs=-1).fit(x, y)
        s = cross_val_score(SVC(gamma=0.001), x, y, cv=4, n_jobs=-1)
        return (g.best_params_, list(g.cv_results_["mean_test_score"]), r.best_params_,
                list(r.cv_results_["mean_test_score"]), list(s))

    with parallel_backend("sequential"):
        expected = run()
    with parallel_backend("rayx"):
        assert run() == expected


@pytest.mark.timeout(120)
def test_random_forest_matches_sequential(rayx_cluster):
    from sklearn.ensemble import RandomForestClassifier

    x, y = _digits()
    forest = RandomForestClassifier(n_estimators=20, random_state=0, n_jobs=-1)
    with parallel_backend("sequential"):
        expected = forest.fit(x, y).predict_proba(x)
    with parallel_backend("rayx"):
        got = forest.fit(x, y).predict_proba(x)
    np.testing.assert_array_equal(got, expected)


def test_backend_starts_a_cluster_when_none_runs_and_keeps_it():
    result = run_script("""
        import rayx, rayx_joblib
        from joblib import Parallel, delayed, parallel_backend
        with parallel_backend("rayx", n_jobs=2):
            first = Parallel()(delayed(abs)(-i) for i in range(4))
            address = rayx.get_runtime_context().node_id
            second = Parallel()(delayed(abs)(-i) for i in range(4))
            same = rayx.get_runtime_context().node_id == address
        print(first == second == [0, 1, 2, 3], same, rayx.is_initialized())
    """)
    assert result.returncode == 0, result.stderr
    assert "True True True" in result.stdout


@pytest.mark.timeout(120)
def test_example_runs_as_is():
    result = subprocess.run([sys.executable, os.path.join("examples", "sklearn_search.py")],
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
                            capture_output=True, text=True, timeout=100)
    assert result.returncode == 0, result.stderr
    assert "best cross-validated accuracy: 0.9" in result.stdout
