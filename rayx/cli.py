"""The `rayx` command: start, stop, status and submit.

    rayx start --head [--port 6380] ...     start the head node of a new cluster on this host
    rayx start --address HOST:PORT ...      start a node on this host that joins that cluster
    rayx stop                               stop every node `rayx start` started on this host
    rayx status [--address HOST:PORT]       nodes, resources used and total, demand, dead nodes;
                                            jobs (drivers) with their state
    rayx submit script.py [-- args]         run a driver script against the cluster
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import signal
import subprocess
import sys
import time

from rayx import cluster, connect, rpc
from rayx.config import load_settings
from rayx.exceptions import RayxError
from rayx.protocol import rayx_pb2 as pb


def _registry_dir(settings) -> str:
    path = os.path.join(settings.temp_dir, "started")
    os.makedirs(path, exist_ok=True)
    return path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rayx", description="Start, inspect and use rayx clusters.")
    sub = p.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="start a head node, or a node joining a cluster")
    role = start.add_mutually_exclusive_group(required=True)
    role.add_argument("--head", action="store_true", help="start the head of a new cluster")
    role.add_argument("--address", help="HOST:PORT of the head to join")
    start.add_argument("--port", type=int, default=6380, help="head port (default 6380)")
    start.add_argument("--node-ip-address", default="127.0.0.1",
                       help="address this node binds to and announces (default 127.0.0.1)")
    start.add_argument("--num-cpus", type=float, help="CPUs to offer (default: all)")
    start.add_argument("--num-gpus", type=int, help="GPUs to offer (default: detected)")
    start.add_argument("--resources", default="{}", help='custom resources, JSON: {"x": 2}')
    start.add_argument("--object-store-memory", type=int, help="store capacity in bytes")
    start.add_argument("--token", help="cluster token to join with (or RAYX_TOKEN)")
    start.add_argument("--tls-cert", help="TLS certificate file (PEM)")
    start.add_argument("--tls-key", help="TLS private key file (PEM)")
    start.add_argument("--tls-ca", help="CA bundle that client certificates must chain to")
    start.add_argument("--block", action="store_true",
                       help="stay in the foreground until stopped (Ctrl-C or rayx stop)")
    sub.add_parser("stop", help="stop every node started on this host by rayx start")
    status = sub.add_parser("status", help="show the cluster's nodes, resources and jobs")
    status.add_argument("--address", default="auto", help="HOST:PORT of the head (default auto)")
    submit = sub.add_parser("submit", help="run a driver script against the cluster")
    submit.add_argument("--address", default="auto", help="HOST:PORT of the head (default auto)")
    submit.add_argument("script", help="the Python script to run")
    submit.add_argument("args", nargs=argparse.REMAINDER, help="arguments after --")
    return p


def cmd_start(args) -> int:
    settings = load_settings(node_ip="" if args.node_ip_address == "127.0.0.1"
                             else args.node_ip_address,
                             **{k: os.path.abspath(getattr(args, k))
                                for k in ("tls_cert", "tls_key", "tls_ca") if getattr(args, k)})
    try:
        resources = json.loads(args.resources)
    except ValueError as exc:
        raise RayxError(f"--resources must be JSON like '{{\"x\": 2}}': {exc}") from exc
    table, gpus = cluster.node_resources(args.num_cpus, args.num_gpus, resources)
    store = args.object_store_memory or cluster.default_store_memory(settings)
    if args.head:
        session = cluster.new_session(settings)
        head_address = ""
    else:
        head_address = connect.resolve_address(args.address, settings)
        session = cluster.new_session(settings, connect.find_token(head_address, settings,
                                                                   args.token))
    node = cluster.start_node(session, settings, head=args.head, head_address=head_address,
                              resources=table, num_gpus=gpus, object_store_memory=store,
                              host=args.node_ip_address, port=args.port if args.head else 0,
                              log_to_file=True)
    cluster_address = node.address if args.head else head_address
    connect.write_current_cluster(settings, cluster_address, session.dir)
    with open(os.path.join(_registry_dir(settings), f"{node.process.pid}.json"), "w") as f:
        json.dump({"pid": node.process.pid, "store_dir": node.store_dir,
                   "session_dir": session.dir}, f)
    print(f"rayx node {node.node_id[:12]} started at {node.address}"
          f" ({'head' if args.head else 'joined ' + head_address})")
    if args.head:
        print(f"\nJoin another node:  RAYX_TOKEN=$(cat {session.dir}/token) "
              f"rayx start --address {node.address}")
        print(f"Connect a driver:   rayx.init(address=\"{node.address}\")  "
              "(or address=\"auto\" on this host)")
        print(f"Cluster token file: {session.dir}/token")
    if args.block:
        return _block(node)
    return 0


def _block(node: cluster.NodeProcess) -> int:
    stop = []
    signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
    signal.signal(signal.SIGINT, lambda *a: stop.append(1))
    while not stop and node.process.poll() is None:
        time.sleep(0.2)
    cluster.stop_node(node)
    return 0


def cmd_stop(args) -> int:
    settings = load_settings()
    stopped = 0
    for path in glob.glob(os.path.join(_registry_dir(settings), "*.json")):
        with open(path) as f:
            info = json.load(f)
        pid = info["pid"]
        try:
            os.kill(pid, signal.SIGTERM)
            stopped += 1
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + 10
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
        import shutil
        shutil.rmtree(info["store_dir"], ignore_errors=True)
        os.unlink(path)
    current = connect.current_cluster_path(settings)
    if os.path.exists(current):
        os.unlink(current)
    print(f"stopped {stopped} rayx node(s)")
    return 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie child of ours counts as gone
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    return True


def cmd_status(args) -> int:
    settings = load_settings()
    address = connect.resolve_address(args.address, settings)
    token = connect.find_token(address, settings)
    head = rpc.head_stub(rpc.channel(address, token, rpc.client_tls(settings)))
    nodes = head.GetNodes(pb.Empty(), timeout=10).nodes
    print(f"cluster {address}: {sum(n.alive for n in nodes)} alive, "
          f"{sum(not n.alive for n in nodes)} dead")
    for n in nodes:
        total, avail = dict(n.total.amounts), dict(n.available.amounts)
        used = ", ".join(f"{k} {total[k] - avail.get(k, 0):g}/{total[k]:g}"
                         for k in sorted(total) if k != "memory" and total[k] > 0)
        state = "ALIVE" if n.alive else "DEAD "
        print(f"  {state} {n.node_id[:12]} {n.address:22s} {used}")
        demand = dict(n.pending_demand.amounts)
        if demand:
            print(f"        pending demand: {demand}")
    _print_jobs(head.ListJobs(pb.Empty(), timeout=10).jobs)
    return 0


def _print_jobs(jobs) -> None:
    counts = {s: sum(j.state == s for j in jobs) for s in ("RUNNING", "SUCCEEDED", "FAILED")}
    print(f"jobs: {counts['RUNNING']} running, {counts['SUCCEEDED']} succeeded, "
          f"{counts['FAILED']} failed")
    now = time.time()
    for j in jobs:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(j.start_time))
        took = (j.end_time or now) - j.start_time
        entry = j.entrypoint if len(j.entrypoint) <= 80 else "..." + j.entrypoint[-77:]
        print(f"  {j.job_id} {j.state:9s} started {started} ({took:.1f} s) "
              f"pid {j.driver_pid} on {j.driver_host}: {entry}")
        if j.message:
            print(f"        {j.message}")


def cmd_submit(args) -> int:
    settings = load_settings()
    address = connect.resolve_address(args.address, settings)
    env = dict(os.environ, RAYX_ADDRESS=address,
               RAYX_TOKEN=connect.find_token(address, settings), PYTHONUNBUFFERED="1")
    extra = args.args[1:] if args.args[:1] == ["--"] else args.args
    return subprocess.call([sys.executable, args.script, *extra], env=env)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return {"start": cmd_start, "stop": cmd_stop, "status": cmd_status,
                "submit": cmd_submit}[args.command](args)
    except RayxError as exc:
        print(f"rayx {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
