"""Entry point of a node process: `python -m rayx.node_main CONFIG_JSON`.

Starts the gRPC server with the node manager (and, for the head node, the head service), writes
`node-<id>.json` into the session directory once serving, and runs until stopped: by the
Shutdown call, SIGTERM, or (local mode) the death of the driver that started it.
"""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import signal
import sys

from rayx import rpc, wire
from rayx.cluster import ready_path
from rayx.config import load_settings, remove_short_socket_dir
from rayx.head import HeadService
from rayx.node import NodeManager
from rayx.object_store import ObjectStore
from rayx.protocol import rayx_pb2_grpc

SIGNAL_POLL = 0.2  # seconds: how soon SIGTERM is seen when it was delivered to another thread


def run(config: dict) -> None:
    """Serve one node until told to stop, then tear everything of it down."""
    settings = load_settings()
    wire.configure_tls(settings)
    session_dir, node_id, token = config["session_dir"], config["node_id"], config["token"]
    tls = rpc.server_tls(settings)
    server, port = rpc.make_server(token, f"{config['host']}:{config.get('port', 0)}", tls=tls)
    address = f"{config['host']}:{port}"
    head = None
    if config.get("head"):
        head = HeadService(os.path.join(session_dir, "head.db"), token, settings)
        rayx_pb2_grpc.add_HeadServicer_to_server(head, server)
    head_address = config.get("head_address") or address
    store = ObjectStore(
        store_dir=os.path.join(settings.shm_dir, f"rayx-{config['session_name']}-{node_id[:12]}"),
        spill_dir=os.path.join(session_dir, f"spill-{node_id[:12]}"),
        capacity=int(config["object_store_memory"]), free_file_keep=settings.free_file_keep)
    try:
        node = NodeManager(node_id=node_id, address=address, head_address=head_address,
                           token=token, session_dir=session_dir, resources=config["resources"],
                           num_gpus=int(config.get("num_gpus", 0)),
                           gpu_devices=config.get("gpu_devices"), store=store,
                           preimport=config.get("preimport"),
                           settings=settings, driver_pid=int(config.get("driver_pid", 0)),
                           forward_output=bool(config.get("forward_output")))
    except BaseException:
        store.destroy()
        if head is not None:
            head.stop()
        raise
    rayx_pb2_grpc.add_NodeManagerServicer_to_server(node, server)
    server.start()
    if head is not None:
        head.start()
    # The handlers only note the signal: one that took a lock (Event.set) could deadlock on a
    # lock the main thread holds, and a signal that lands on another thread (gRPC's) never
    # interrupts a main thread blocked without a timeout, so the loop below polls.
    signals: list[int] = []
    signal.signal(signal.SIGTERM, lambda sig, frame: signals.append(sig))
    signal.signal(signal.SIGINT, signal.SIG_IGN if config.get("driver_pid") else
                  (lambda sig, frame: signals.append(sig)))
    try:
        node.start()
        _write_ready(session_dir, node_id, {"address": address, "pid": os.getpid(),
                                            "head": bool(head), "store_dir": store.store_dir})
        while not signals and not node.stopped.wait(SIGNAL_POLL):
            pass
    finally:
        node.stop()
        if head is not None:
            head.stop()
        server.stop(0.5).wait(2)
        _remove_ready(session_dir, node_id)
        remove_short_socket_dir(session_dir)


def _write_ready(session_dir: str, node_id: str, info: dict) -> None:
    path = ready_path(session_dir, node_id)
    with open(path + ".tmp", "w") as f:
        json.dump(info, f)
    os.rename(path + ".tmp", path)


def _remove_ready(session_dir: str, node_id: str) -> None:
    try:
        os.unlink(ready_path(session_dir, node_id))
    except FileNotFoundError:
        pass


def main() -> None:
    config = json.loads(sys.argv[1])
    faulthandler.register(signal.SIGUSR2, all_threads=True)  # `kill -USR2`: stacks to stderr
    logging.basicConfig(level=logging.WARNING,
                        format=f"[rayx node {config['node_id'][:8]}] %(levelname)s %(message)s")
    run(config)


if __name__ == "__main__":
    main()
