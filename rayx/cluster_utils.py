"""A multi-node cluster on one machine, for tests and benchmarks: every node a real process
with its own node manager, object store and workers, joined to one head over gRPC."""

from __future__ import annotations

import os
import signal

import rayx
from rayx import cluster
from rayx.config import load_settings


class Cluster:
    """`Cluster(head_cpus=1)`, then `add_node(num_cpus=1)`, `connect()`, `shutdown()`."""

    def __init__(self, head_cpus: float = 1, head_resources: dict | None = None,
                 object_store_memory: int = 256 * 1024 * 1024, host: str = "127.0.0.1",
                 **settings):
        self.settings = load_settings(**settings)
        self.session = cluster.new_session(self.settings)
        self.host = host
        self.object_store_memory = object_store_memory
        self.nodes: list[cluster.NodeProcess] = []
        self.head = self._start(head=True, num_cpus=head_cpus, resources=head_resources)

    @property
    def address(self) -> str:
        return self.head.address

    def _start(self, head: bool, num_cpus, num_gpus=0, resources=None, store=None, host=None):
        table, gpus = cluster.node_resources(num_cpus, num_gpus, resources)
        node = cluster.start_node(
            self.session, self.settings, head=head,
            head_address="" if head else self.head.address, resources=table, num_gpus=gpus,
            object_store_memory=store or self.object_store_memory, driver_pid=os.getpid(),
            host=host or self.host, log_to_file=True)
        self.nodes.append(node)
        return node

    def add_node(self, num_cpus: float = 1, num_gpus: int = 0, resources: dict | None = None,
                 object_store_memory: int | None = None,
                 host: str | None = None) -> cluster.NodeProcess:
        """Start one more node process that joins this cluster's head (on `host`, if given,
        instead of the cluster's)."""
        return self._start(False, num_cpus, num_gpus, resources, object_store_memory, host)

    def kill_node(self, node: cluster.NodeProcess) -> None:
        """SIGKILL a node's manager, as a crash would: its workers follow it."""
        os.kill(node.process.pid, signal.SIGKILL)
        node.process.wait(10)
        self.nodes.remove(node)
        cluster.stop_node(node)

    def connect(self) -> rayx.api.ClusterInfo:
        """rayx.init() this process as a driver of the cluster."""
        return rayx.init(address=self.address, token=self.session.token)

    def shutdown(self) -> None:
        """Disconnect the driver, then stop every node (workers first, head last)."""
        if rayx.is_initialized():
            rayx.shutdown()
        for node in reversed(self.nodes):
            cluster.stop_node(node)
        self.nodes.clear()
