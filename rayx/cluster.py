"""Starting and stopping node processes, and the session directory they share.

A session directory (settings.temp_dir/session_<time>_<id>) holds everything of one cluster:
`token` (mode 0600), `sockets/`, `logs/`, `head.db`, `node-<id>.json` ready files and spill
directories. Shared-memory objects live in settings.shm_dir/rayx-<session>-<node>/.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass

import psutil

from rayx import ids
from rayx.config import Settings, settings_to_env
from rayx.exceptions import RayxSystemError


@dataclass(slots=True)
class Session:
    name: str
    dir: str
    token: str


@dataclass(slots=True)
class NodeProcess:
    node_id: str
    address: str
    process: subprocess.Popen
    store_dir: str


def ready_path(session_dir: str, node_id: str) -> str:
    """The file a node process writes once it serves."""
    return os.path.join(session_dir, f"node-{node_id}.json")


def new_session(settings: Settings, token: str | None = None) -> Session:
    """Create a session directory with a fresh token readable only by this user."""
    name = f"{time.strftime('%Y%m%d-%H%M%S')}_{ids.random_id(4)}"
    path = os.path.join(settings.temp_dir, f"session_{name}")
    os.makedirs(settings.temp_dir, exist_ok=True)
    os.makedirs(path, mode=0o700)
    for sub in ("sockets", "logs"):
        os.makedirs(os.path.join(path, sub), mode=0o700)
    token = token or ids.random_id(16)
    fd = os.open(os.path.join(path, "token"), os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token)
    return Session(name, path, token)


def visible_gpu_devices() -> list[str]:
    """The GPU devices this process may use, as CUDA names them: CUDA_VISIBLE_DEVICES when set
    (ids or UUIDs; empty, "-1" or "NoDevFiles" mean none), else nvidia-smi's list."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        devices = []
        for d in (d.strip() for d in visible.split(",")):
            if not d or d == "NoDevFiles" or d.startswith("-"):
                break  # CUDA ignores this entry and every one after it
            devices.append(d)
        return devices
    smi = shutil.which("nvidia-smi")
    return [] if smi is None else list(_smi_devices(smi))


@functools.lru_cache(maxsize=4)
def _smi_devices(smi: str) -> tuple[str, ...]:
    """Device ids from `nvidia-smi -L`, read once per process (it takes a fraction of a second)."""
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    return tuple(str(i) for i in range(sum(1 for ln in out.splitlines() if ln.startswith("GPU "))))


def detect_gpus() -> int:
    """How many GPUs this process may use (see visible_gpu_devices)."""
    return len(visible_gpu_devices())


def gpu_devices_for(num_gpus: int) -> list[str]:
    """The device names behind a node's GPU ids 0..num_gpus-1: the visible devices in order,
    or plain ids when more GPUs are declared than are visible (virtual GPUs, for tests)."""
    visible = visible_gpu_devices() if num_gpus else []
    return visible[:num_gpus] if len(visible) >= num_gpus else [str(i) for i in range(num_gpus)]


def default_store_memory(settings: Settings) -> int:
    """A fraction of RAM, capped by what the shared-memory filesystem can hold."""
    want = int(psutil.virtual_memory().total * settings.object_store_fraction)
    try:
        st = os.statvfs(settings.shm_dir)
        want = min(want, int(st.f_bavail * st.f_frsize * 0.8))
    except OSError:
        pass
    return max(want, 64 * 1024 * 1024)


def node_resources(num_cpus, num_gpus, resources, memory=None) -> tuple[dict, int]:
    """The resource table of a node from init/start arguments and detection."""
    cpus = float(num_cpus if num_cpus is not None else (psutil.cpu_count() or 1))
    gpus = int(num_gpus if num_gpus is not None else detect_gpus())
    table = {"CPU": cpus, "GPU": float(gpus),
             "memory": float(memory if memory is not None
                             else psutil.virtual_memory().available)}
    table.update({k: float(v) for k, v in (resources or {}).items()})
    return table, gpus


def start_node(session: Session, settings: Settings, *, head: bool, head_address: str = "",
               resources: dict, num_gpus: int, object_store_memory: int, driver_pid: int = 0,
               host: str = "127.0.0.1", port: int = 0, log_to_file: bool = False,
               extra: dict | None = None) -> NodeProcess:
    """Start a node process (head and node manager when head=True); wait until it serves."""
    node_id = ids.random_id(10)
    config = dict(session_dir=session.dir, session_name=session.name, node_id=node_id,
                  token=session.token, head=head, head_address=head_address,
                  resources=resources, num_gpus=num_gpus,
                  gpu_devices=gpu_devices_for(num_gpus),
                  object_store_memory=object_store_memory, driver_pid=driver_pid, host=host,
                  port=port, forward_output=log_to_file, **(extra or {}))
    env = dict(os.environ, **settings_to_env(settings))
    out = None
    if log_to_file:
        out = open(os.path.join(session.dir, "logs", f"node-{node_id[:12]}.log"), "ab")
    proc = subprocess.Popen([sys.executable, "-m", "rayx.node_main", json.dumps(config)],
                            env=env, stdout=out, stderr=out, stdin=subprocess.DEVNULL,
                            start_new_session=log_to_file)
    if out is not None:
        out.close()
    path = ready_path(session.dir, node_id)
    deadline = time.monotonic() + settings.start_timeout
    while not os.path.exists(path):
        if proc.poll() is not None:
            raise RayxSystemError(f"the node process exited with code {proc.returncode} "
                                  f"before serving; see {session.dir}/logs")
        if time.monotonic() > deadline:
            proc.kill()
            raise RayxSystemError(f"the node process did not start within "
                                  f"{settings.start_timeout} s (RAYX_START_TIMEOUT)")
        time.sleep(0.005)
    with open(path) as f:
        info = json.load(f)
    return NodeProcess(node_id, info["address"], proc, info["store_dir"])


def stop_node(node: NodeProcess, timeout: float = 10.0) -> None:
    """Ask a node process to stop (SIGTERM), then kill it if it lingers."""
    if node.process.poll() is None:
        node.process.terminate()
        try:
            node.process.wait(timeout)
        except subprocess.TimeoutExpired:
            node.process.kill()
            node.process.wait(5)
    shutil.rmtree(node.store_dir, ignore_errors=True)
