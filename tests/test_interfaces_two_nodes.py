"""The executor's and the joblib backend's contract tests, run again on two node managers.

The tests are those of test_executor.py and test_joblib.py, imported here so that pytest runs
them a second time; this module's `rayx_cluster` fixture replaces the local cluster with a
driver connected to a head and a second node of one CPU each (2 CPUs in all, as the local
fixture has), so calls, retries, cancellations, nesting and large arguments cross nodes.
"""

from __future__ import annotations

import pytest

import rayx
from rayx.cluster_utils import Cluster

from .conftest import wait_for
from .test_executor import (  # noqa: F401  (collected here again)
    executor,
    test_as_completed_wait_and_callbacks,
    test_calls_are_never_deduplicated,
    test_cancel_pending_future_never_runs_its_call,
    test_closing_map_early_cancels_the_rest,
    test_exception_keeps_type_and_remote_traceback,
    test_initializer_runs_in_each_worker_first,
    test_lost_worker_after_retries_fails_only_its_future,
    test_lost_worker_is_retried,
    test_map_exception_reaches_the_right_item,
    test_map_in_order_with_and_without_chunks,
    test_map_timeout_raises_and_cancels_the_rest,
    test_max_tasks_per_child_retires_workers,
    test_max_workers_caps_concurrency,
    test_nested_executor_inside_a_task_does_not_deadlock,
    test_submit_returns_real_futures,
)
from .test_joblib import (  # noqa: F401
    test_backend_is_known_inside_workers,
    test_errors_keep_their_type_and_abort_the_rest,
    test_generators,
    test_nested_parallel_neither_deadlocks_nor_oversubscribes,
    test_random_forest_matches_sequential,
    test_sklearn_searches_match_sequential,
    test_timeout,
)


@pytest.fixture(scope="module")
def rayx_cluster():
    """A driver on a two-node cluster: the head and one joined node, one CPU each."""
    if rayx.is_initialized():
        rayx.shutdown()
    c = Cluster(head_cpus=1, heartbeat_interval=0.2)
    c.add_node(num_cpus=1)
    info = c.connect()
    wait_for(lambda: len([n for n in rayx.nodes() if n["Alive"]]) == 2, 20, what="2 nodes")
    yield info
    c.shutdown()
