"""Joining an existing cluster: find its address and token, pick a node, build a CoreClient.

    rayx.init(address="auto")       -> the cluster `rayx start` started on this host
    rayx.init(address="HOST:PORT")  -> token from token=, RAYX_TOKEN, RAYX_TOKEN_FILE, or the
                                       cluster file of this host when it names that address
"""

from __future__ import annotations

import json
import os
import shutil
import socket

from rayx import ids, rpc
from rayx.config import Settings, remove_short_socket_dir
from rayx.core import CoreClient
from rayx.exceptions import RayxError
from rayx.protocol import rayx_pb2 as pb


def current_cluster_path(settings: Settings) -> str:
    return os.path.join(settings.temp_dir, "current_cluster.json")


def write_current_cluster(settings: Settings, address: str, session_dir: str) -> None:
    """Record the cluster this host belongs to, for address="auto" and the command line."""
    path = current_cluster_path(settings)
    with open(path + ".tmp", "w") as f:
        json.dump({"address": address, "session_dir": session_dir}, f)
    os.chmod(path + ".tmp", 0o600)
    os.rename(path + ".tmp", path)


def read_current_cluster(settings: Settings) -> dict | None:
    try:
        with open(current_cluster_path(settings)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def find_token(address: str, settings: Settings, token: str | None = None) -> str:
    """The cluster token: explicit, then RAYX_TOKEN, RAYX_TOKEN_FILE, then this host's file."""
    if token:
        return token
    if os.environ.get("RAYX_TOKEN"):
        return os.environ["RAYX_TOKEN"]
    if os.environ.get("RAYX_TOKEN_FILE"):
        with open(os.environ["RAYX_TOKEN_FILE"]) as f:
            return f.read().strip()
    current = read_current_cluster(settings)
    if current and current["address"] == address:
        with open(os.path.join(current["session_dir"], "token")) as f:
            return f.read().strip()
    raise RayxError(f"no token for the cluster at {address}: pass token=, set RAYX_TOKEN or "
                    "RAYX_TOKEN_FILE, or run on a host where `rayx start` joined that cluster")


def resolve_address(address: str, settings: Settings) -> str:
    if address != "auto":
        if ":" not in address:
            raise RayxError(f"bad cluster address {address!r}: expected HOST:PORT or 'auto'")
        return address
    current = read_current_cluster(settings)
    if current is None:
        raise RayxError("address='auto' found no cluster started on this host; run "
                        "`rayx start --head` first, or pass address='HOST:PORT'")
    return current["address"]


def local_ip_towards(host: str) -> str:
    """The address of this host on the route to `host` (no packet is sent)."""
    if host in ("127.0.0.1", "localhost"):
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((host, 9))
        return s.getsockname()[0]


def connect_driver(address: str, settings: Settings, token: str | None = None
                   ) -> tuple[CoreClient, str]:
    """A CoreClient for a driver joining the cluster at `address`; returns it and the private
    directory that holds its sockets (removed at shutdown)."""
    address = resolve_address(address, settings)
    token = find_token(address, settings, token)
    host = address.rsplit(":", 1)[0]
    my_ip = local_ip_towards(host)
    if host not in ("127.0.0.1", "localhost"):
        settings.node_ip = my_ip
    head = rpc.head_stub(rpc.channel(address, token, rpc.client_tls(settings)))
    try:
        nodes = [n for n in head.GetNodes(pb.Empty(), timeout=settings.start_timeout).nodes
                 if n.alive]
    except Exception as exc:
        raise RayxError(f"could not reach the cluster at {address}: {exc}") from exc
    local = [n for n in nodes if n.address.rsplit(":", 1)[0] == my_ip]
    chosen = (local or [n for n in nodes if n.address == address] or nodes)[0].address
    remove_dead_drivers_dirs(settings.temp_dir)
    private = os.path.join(settings.temp_dir,
                           f"driver_{_pid_namespace()}-{os.getpid()}_{ids.random_id(6)}")
    os.makedirs(os.path.join(private, "sockets"), mode=0o700)
    try:
        core = CoreClient(node_address=chosen, head_address=address, token=token,
                          session_dir=private, settings=settings)
    except BaseException:
        remove_private_dir(private)
        raise
    return core, private


def remove_dead_drivers_dirs(temp_dir: str) -> None:
    """Remove the private directories of drivers that ended without shutdown() (killed):
    each is named driver_<pid namespace>-<pid>_<id>, and goes once no process of this pid
    namespace has that pid (a directory from another namespace sharing /tmp is left alone)."""
    try:
        names = os.listdir(temp_dir)
    except FileNotFoundError:
        return
    ns = _pid_namespace()
    for name in names:
        kind, _, rest = name.partition("_")
        owner, _, _ = rest.partition("_")
        their_ns, _, pid = owner.partition("-")
        if kind != "driver" or their_ns != ns or not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            remove_private_dir(os.path.join(temp_dir, name))
        except PermissionError:  # another user's live process
            pass


def _pid_namespace() -> str:
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return "0"


def remove_private_dir(private: str) -> None:
    """Remove a connected driver's socket directory (and its short twin, if it has one)."""
    remove_short_socket_dir(private)
    shutil.rmtree(private, ignore_errors=True)
