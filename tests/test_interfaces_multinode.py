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


def test_dask_graph_runs_on_both_nodes(two_nodes):
    import dask
    import numpy as np

    import rayx.dask

    @dask.delayed
    def leaf(i):
        time.sleep(0.2)
        return np.full(50_000, i), rayx.get_runtime_context().get_node_id()  # via the store

    @dask.delayed
    def combine(parts):
        return (sum(int(arr[0]) * len(arr) for arr, _ in parts), sorted({n for _, n in parts}),
                rayx.get_runtime_context().get_node_id())

    two_nodes.connect()
    try:
        nodes = {n["NodeID"] for n in rayx.nodes()}
        (total, leaf_nodes, combined_on), = dask.compute(
            combine([leaf(i) for i in range(8)]), scheduler=rayx.dask.get)
        assert total == 50_000 * sum(range(8))
        assert len(nodes) == 2
        assert set(leaf_nodes) == nodes, leaf_nodes  # the leaves ran on both nodes
        assert combined_on in nodes
    finally:
        rayx.shutdown()


def test_joblib_n_jobs_all_grows_when_a_node_joins():
    from rayx_joblib.backend import RayxBackend

    from .conftest import wait_for

    if rayx.is_initialized():
        rayx.shutdown()
    c = Cluster(head_cpus=1)
    try:
        c.add_node(num_cpus=1)
        c.connect()
        with joblib.parallel_backend("rayx", n_jobs=-1):
            par = joblib.Parallel()
            first = par(joblib.delayed(node_of)(x) for x in range(4))
            assert par._effective_n_jobs() == 2
        assert RayxBackend().effective_n_jobs(-1) == 2
        joined = c.add_node(num_cpus=2)
        wait_for(lambda: rayx.cluster_resources().get("CPU") == 4, 30,
                 what="the third node to join")
        assert RayxBackend().effective_n_jobs(-1) == 4
        assert RayxBackend().effective_n_jobs(-2) == 3
        with joblib.parallel_backend("rayx", n_jobs=-1):
            par = joblib.Parallel()
            second = par(joblib.delayed(node_of)(x) for x in range(8))
            assert par._effective_n_jobs() == 4
        assert [r[0] for r in first] == [x * x for x in range(4)]
        assert [r[0] for r in second] == [x * x for x in range(8)]
        assert joined.node_id in {r[1] for r in second}, second  # the new node did work
    finally:
        c.shutdown()
