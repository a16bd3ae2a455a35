"""scikit-learn through each joblib backend: a GridSearchCV and a RandomForestClassifier.

The estimator code is the same for every system; only `joblib.parallel_backend(...)` differs.
"""

from __future__ import annotations

import contextlib

from bench.harness import NCPU, Case, Metric, Runner, Target, Workload, timed
from bench.systems import dask_local, joblib_loky, ray_local, rayx_local


def _data(n_samples: int):
    from sklearn.datasets import make_classification

    return make_classification(n_samples=n_samples, n_features=20, n_informative=10,
                               random_state=0)


def grid_search(X, y) -> None:
    from sklearn.model_selection import GridSearchCV
    from sklearn.svm import SVC

    grid = {"C": [0.1, 1, 10, 100], "gamma": [0.001, 0.01, 0.1]}
    GridSearchCV(SVC(), grid, cv=3, n_jobs=-1).fit(X, y)


def random_forest(X, y, trees: int) -> None:
    from sklearn.ensemble import RandomForestClassifier

    RandomForestClassifier(n_estimators=trees, n_jobs=-1, random_state=0).fit(X, y)


def _run(r: Runner, backend) -> None:
    """`backend` is a context manager that starts the system and selects its joblib backend."""
    X, y = _data(r.p["samples"])
    with backend():
        if r.p["what"] == "search":
            r.measure(lambda: {"time": timed(lambda: grid_search(X, y))})
        else:
            r.measure(lambda: {"time": timed(lambda: random_forest(X, y, r.p["trees"]))})


def rayx_backend(r: Runner):
    @contextlib.contextmanager
    def backend():
        import joblib

        import rayx_joblib  # noqa: F401 - registers the "rayx" backend

        with rayx_local(r), joblib.parallel_backend("rayx"):
            yield

    return backend


@contextlib.contextmanager
def ray_backend():
    import joblib
    from ray.util.joblib import register_ray

    with ray_local():
        register_ray()
        with joblib.parallel_backend("ray"):
            yield


@contextlib.contextmanager
def dask_backend():
    import joblib

    with dask_local(), joblib.parallel_backend("dask"):
        yield


@contextlib.contextmanager
def threads_backend():
    import joblib

    with joblib.parallel_backend("threading", n_jobs=NCPU):
        yield


def rayx_sk(r: Runner) -> None:
    _run(r, rayx_backend(r))


def ray_sk(r: Runner) -> None:
    _run(r, ray_backend)


def dask_sk(r: Runner) -> None:
    _run(r, dask_backend)


def loky_sk(r: Runner) -> None:
    _run(r, joblib_loky)


def threads_sk(r: Runner) -> None:
    _run(r, threads_backend)


def _cases(threads: bool) -> list[Case]:
    cases = [Case("rayx", "rayx_sk", ("rayx", "rayx_joblib", "sklearn")),
             Case("ray", "ray_sk", ("ray", "sklearn")),
             Case("dask", "dask_sk", ("distributed", "sklearn")),
             Case("loky", "loky_sk", ("joblib", "sklearn"))]
    if threads:
        cases.append(Case("threads", "threads_sk", ("sklearn",)))
    return cases


WORKLOADS = [
    Workload(
        name="gridsearch",
        title="GridSearchCV(SVC, 12 candidates, cv=3, n_jobs=-1) under each joblib backend",
        metrics=[Metric("time", "GridSearchCV fit, {samples:,} samples", "s", targets=(
            Target("loky", "<=", 1.0, "no slower than loky"),
            Target("ray", "<", 1.0, "faster than Ray's backend"),
            Target("dask", "<", 1.0, "faster than Dask's backend")))],
        cases=_cases(threads=False),
        full={"what": "search", "samples": 2_000},
        quick={"samples": 500, "repeats": 2},
        passes=3,  # its targets are ratios near 1: pool three passes against drift
    ),
    Workload(
        name="random_forest",
        title="RandomForestClassifier(n_jobs=-1).fit under each joblib backend",
        metrics=[Metric("time", "RandomForest fit, {trees} trees, {samples:,} samples", "s")],
        cases=_cases(threads=True),
        full={"what": "forest", "samples": 5_000, "trees": 200},
        quick={"samples": 1_000, "trees": 40, "repeats": 2},
        notes="threads is scikit-learn's own default for forests (the threading backend).",
    ),
]
