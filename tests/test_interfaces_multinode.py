"""The executor and the joblib backend against a cluster of two node managers."""

from __future__ import annotations

import time

import joblib
import pytest

import rayx
import rayx_joblib  # noqa: F401  (registers the backend)
from rayx.cluster_utils import Cluster
from rayx_futures import RayxExecutor


def node_of(x):
    time.sleep(0.2)
    return x * x, rayx.get_runtime_context().get_node_id()


@pytest.fixture(scope="module")
def two_nodes():
    if rayx.is_initialized():
        rayx.shutdown()
    c = Cluster(head_cpus=1)
    c.add_node(num_cpus=1)
    yield c
    c.shutdown()


def test_executor_with_address_uses_both_nodes(two_nodes, monkeypatch):
    monkeypatch.setenv("RAYX_TOKEN", two_nodes.session.token)
    with RayxExecutor(address=two_nodes.address) as ex:
        assert ex._max_workers == 2  # the cluster's CPUs, not this machine's
        results = list(ex.map(node_of, range(8)))
    assert [r[0] for r in results] == [x * x for x in range(8)]
    assert len({r[1] for r in results}) == 2
    rayx.shutdown()


def test_joblib_n_jobs_all_means_the_clusters_cpus(two_nodes):
    two_nodes.connect()
    try:
        with joblib.parallel_backend("rayx", n_jobs=-1):
            par = joblib.Parallel()
            results = par(joblib.delayed(node_of)(x) for x in range(8))
            assert par._effective_n_jobs() == 2
        assert [r[0] for r in results] == [x * x for x in range(8)]
        assert len({r[1] for r in results}) == 2
    finally:
        rayx.shutdown()
