"""Processes and memory of a whole system: the driver plus every process it spawned.

Memory is the sum of PSS (proportional set size: a shared page counts once, split among the
processes that map it) over the driver and all its descendants, plus the shared-memory files a
system keeps in /dev/shm without any process mapping them (rayx's store keeps each object in a
file that only readers map; joblib's memmapping folder is the same). RSS is used where PSS
cannot be read.
"""

from __future__ import annotations

import ctypes
import glob
import os
import threading
import time

import psutil

MB = 1024 * 1024
PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> None:
    """Orphaned grandchildren stay our descendants (Linux), so daemonised helpers are counted."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def descendants(pid: int | None = None) -> list[psutil.Process]:
    """Living descendants of `pid` (default: this process); zombies are left out."""
    try:
        kids = psutil.Process(pid or os.getpid()).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    alive = []
    for p in kids:
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.NoSuchProcess:
            pass
    return alive


def reap_zombies() -> None:
    """Collect exited children reparented to us while we were a subreaper."""
    for p in psutil.Process().children():
        try:
            if p.status() == psutil.STATUS_ZOMBIE:
                os.waitpid(p.pid, os.WNOHANG)
        except (psutil.NoSuchProcess, ChildProcessError, OSError):
            pass


def _proc_memory(p: psutil.Process) -> int:
    try:
        info = p.memory_full_info()
        return getattr(info, "pss", info.rss)
    except psutil.AccessDenied:
        return p.memory_info().rss
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return 0


def _mapped_inodes(pid: int) -> set[int]:
    """Inodes of the /dev/shm files the process maps. By inode, not path: a store renames its
    files (a freed object's file becomes a free file, and back), and a rename between reading
    the maps and listing the files counted a mapped file a second time, as unmapped."""
    inodes = set()
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                parts = line.split(None, 5)
                if len(parts) == 6 and parts[5].startswith("/dev/shm"):
                    inodes.add(int(parts[4]))
    except (OSError, ValueError):
        pass
    return inodes


def _unmapped_shm_bytes(patterns: list[str], mapped: set[int]) -> int:
    total = 0
    for pattern in patterns:
        for top in glob.glob(pattern):
            walk = [(top, [], [""])] if os.path.isfile(top) else os.walk(top)
            for root, _dirs, files in walk:
                for name in files:
                    path = os.path.join(root, name) if name else root
                    try:
                        st = os.stat(path)
                    except OSError:
                        continue
                    if st.st_ino not in mapped:
                        total += st.st_blocks * 512
    return total


def tree_memory(shm_patterns: list[str] | None = None, pid: int | None = None) -> dict:
    """{'bytes': whole-system memory, 'procs': how many processes} for `pid`'s tree."""
    root = psutil.Process(pid or os.getpid())
    procs = [root, *descendants(root.pid)]
    total = sum(_proc_memory(p) for p in procs)
    if shm_patterns:
        mapped: set[int] = set()
        for p in procs:
            mapped |= _mapped_inodes(p.pid)
        total += _unmapped_shm_bytes(shm_patterns, mapped)
    return {"bytes": total, "procs": len(procs)}


class PeakSampler:
    """Samples tree memory on a thread; `peak` is the largest whole-system figure seen."""

    def __init__(self, shm_patterns: list[str] | None = None, interval: float = 0.02):
        self.shm_patterns = shm_patterns
        self.interval = interval
        self.peak = 0
        self.seen: set[tuple[int, float]] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        self.peak = max(self.peak, tree_memory(self.shm_patterns)["bytes"])
        self.seen |= snapshot()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakSampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def snapshot(pid: int | None = None) -> set[tuple[int, float]]:
    """(pid, create_time) of every living descendant: identifies processes across pid reuse."""
    out = set()
    for p in descendants(pid):
        try:
            out.add((p.pid, p.create_time()))
        except psutil.NoSuchProcess:
            pass
    return out


def still_alive(seen: set[tuple[int, float]], grace: float = 0.0) -> list[psutil.Process]:
    """The processes of `seen` that still exist (same pid and the same start time), after
    waiting up to `grace` seconds for them to go."""
    deadline = time.monotonic() + grace
    alive = _alive(seen)
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = _alive(seen)
    return alive


def _alive(seen: set[tuple[int, float]]) -> list[psutil.Process]:
    alive = []
    for pid, created in seen:
        try:
            p = psutil.Process(pid)
            if abs(p.create_time() - created) < 0.01 and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.NoSuchProcess:
            pass
    return alive


def describe(p: psutil.Process) -> str:
    try:
        cmd = " ".join(p.cmdline())[:100] or p.name()
    except psutil.Error:
        cmd = "?"
    return f"{p.pid} {cmd}"


# Helpers that by design live until their parent process exits (they watch a pipe from it):
# not leaks while the driver is still running. The harness checks they are gone after exit.
LIVE_UNTIL_EXIT = ("resource_tracker",)


def _lingers_by_design(p: psutil.Process) -> bool:
    try:
        cmd = " ".join(p.cmdline())
    except psutil.Error:
        return False
    return any(name in cmd for name in LIVE_UNTIL_EXIT)


def wait_gone(timeout: float = 10.0) -> list[psutil.Process]:
    """Wait until this process has no living descendants (bar LIVE_UNTIL_EXIT helpers);
    return those that stay."""
    deadline = time.monotonic() + timeout

    def left():
        return [p for p in descendants() if not _lingers_by_design(p)]

    remaining = left()
    while remaining and time.monotonic() < deadline:
        reap_zombies()
        time.sleep(0.1)
        remaining = left()
    reap_zombies()
    return remaining


def kill_all(procs: list[psutil.Process]) -> None:
    """SIGKILL the given processes (ones this benchmark started), each by its pid."""
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=5)
    reap_zombies()
