"""Settings: every knob of rayx in one place, read once and passed down.

Defaults live in `Settings`; `RAYX_<FIELD>` environment variables override them, and arguments of
`rayx.init` override both. Child processes receive the settings they need on their command line.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, fields

# Libraries most tasks touch, imported by each node's fork server (when installed) so every
# worker shares their pages. A local cluster asks only for those its driver has imported:
# pandas alone costs a fifth of a second before the first worker can fork.
OPTIONAL_PREIMPORTS = ("numpy", "pandas")


@dataclass(slots=True)
class Settings:
    """Tunable behaviour of the runtime (see docs/architecture.md for what each one does)."""

    # values at or under this many bytes travel inline in messages, never touching the store
    inline_threshold: int = 100 * 1024
    # default store capacity as a fraction of RAM (capped by free space in /dev/shm)
    object_store_fraction: float = 0.3
    # how long an owner keeps an idle leased worker before handing it back (seconds)
    lease_idle_timeout: float = 0.25
    # tasks pushed to one leased worker before the owner waits for replies
    max_tasks_in_flight_per_worker: int = 8
    # workers started ahead of demand per node (None: one per CPU)
    prestart_workers: int | None = None
    # a node silent this long is declared dead (seconds)
    node_timeout: float = 10.0
    # seconds a worker waits for its node to answer a store call (reserve, seal) before the
    # task that stores fails with the error; a spill to disk can make the node slow to answer
    node_call_timeout: float = 60.0
    heartbeat_interval: float = 1.0
    # where session directories live
    temp_dir: str = "/tmp/rayx"
    # where shared-memory object files live
    shm_dir: str = "/dev/shm"
    # seconds a process waits for the cluster's processes to come up
    start_timeout: float = 30.0
    log_to_driver: bool = True
    # this host's address in a cluster that spans hosts ("" on one machine: Unix sockets)
    node_ip: str = ""
    # bytes of store objects a process keeps mapped after use, so the next task reading the
    # same object finds its pages mapped (no page faults); a freed object's mapping is dropped
    # within map_cache_sweep seconds. 0 turns the cache off.
    map_cache_bytes: int = 4 * 1024 * 1024 * 1024
    map_cache_sweep: float = 1.0
    # seconds the store keeps a freed object's file (1 MiB or more) for the next put of about
    # its size, which then skips allocating fresh pages; 0 unlinks freed files at once
    free_file_keep: float = 10.0
    # TLS for every gRPC call: PEM files (certificate and key of this process, CA to trust)
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""


def socket_path(session_dir: str, name: str) -> str:
    """Where a Unix socket of the session lives. AF_UNIX paths are limited to 107 bytes, so a
    long session path falls back to a short directory named after it (created 0700)."""
    path = os.path.join(session_dir, "sockets", name)
    if len(path) <= 100:
        return path
    short = _short_socket_dir(session_dir)
    os.makedirs(short, mode=0o700, exist_ok=True)
    return os.path.join(short, name)


def _short_socket_dir(session_dir: str) -> str:
    import hashlib
    return f"/tmp/rayx-s-{hashlib.sha1(session_dir.encode()).hexdigest()[:12]}"


def remove_short_socket_dir(session_dir: str) -> None:
    """Remove the short directory socket_path() may have made for this session directory."""
    import shutil
    shutil.rmtree(_short_socket_dir(session_dir), ignore_errors=True)


def _coerce(kind: str, raw: str):
    if "bool" in kind:
        return raw.strip().lower() in ("1", "true", "yes", "on")
    if "int" in kind and "None" in kind and raw.strip().lower() in ("", "none"):
        return None
    if "int" in kind:
        return int(raw)
    if "float" in kind:
        return float(raw)
    return raw


def load_settings(**overrides) -> Settings:
    """Build settings from defaults, then RAYX_* environment variables, then `overrides`."""
    values = {}
    for f in fields(Settings):
        raw = os.environ.get("RAYX_" + f.name.upper())
        if raw is not None:
            values[f.name] = _coerce(str(f.type), raw)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return Settings(**values)


def settings_to_env(settings: Settings) -> dict[str, str]:
    """Encode settings as RAYX_* variables, so child processes read the same values."""
    out = {}
    for k, v in dataclasses.asdict(settings).items():
        out["RAYX_" + k.upper()] = "none" if v is None else str(v)
    return out
