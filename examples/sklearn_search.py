"""A scikit-learn RandomizedSearchCV over SVC on the digits data set, run on rayx.

The search code is unchanged scikit-learn: only the `parallel_backend("rayx")` block is new.
Run it with `python examples/sklearn_search.py` (it starts a local cluster; set RAYX_ADDRESS
to use a running one).
"""

from __future__ import annotations

import time

from joblib import parallel_backend
from scipy.stats import loguniform
from sklearn.datasets import load_digits
from sklearn.model_selection import RandomizedSearchCV
from sklearn.svm import SVC

import rayx
import rayx_joblib  # noqa: F401  (registers the "rayx" joblib backend)


def main() -> None:
    """Search C and gamma of an RBF SVC with 3-fold cross-validation on rayx."""
    rayx.init()
    X, y = load_digits(return_X_y=True)
    search = RandomizedSearchCV(
        SVC(kernel="rbf"),
        {"C": loguniform(1e-1, 1e3), "gamma": loguniform(1e-5, 1e-2)},
        n_iter=24,
        cv=3,
        random_state=0,
        n_jobs=-1,  # every CPU of the rayx cluster, not of this machine
    )
    start = time.perf_counter()
    with parallel_backend("rayx"):
        search.fit(X, y)
    elapsed = time.perf_counter() - start
    print(f"cluster CPUs: {rayx.cluster_resources()['CPU']:.0f}")
    print(f"{len(search.cv_results_['params'])} candidates x 3 folds in {elapsed:.1f} s")
    print(f"best params: C={search.best_params_['C']:.3g}, "
          f"gamma={search.best_params_['gamma']:.3g}")
    print(f"best cross-validated accuracy: {search.best_score_:.4f}")
    rayx.shutdown()


if __name__ == "__main__":
    main()
