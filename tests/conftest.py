"""Shared fixtures: real clusters, started and stopped around the tests that use them.

Every test session ends by checking that no rayx process and no shared-memory segment of rayx
outlived the tests.
"""

from __future__ import annotations

import faulthandler
import os
import re
import signal
import sys
import threading
import time

import psutil
import pytest

import rayx

SHM = "/dev/shm"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout


def rayx_processes(containing: str = "") -> list[psutil.Process]:
    """Node, fork-server and worker processes of rayx on this machine (ours or strays).

    With `containing`, only those whose command line holds that text (a session directory).
    The command line is read once, by process_iter, so a process that exits meanwhile is
    skipped instead of raising.
    """
    found = []
    for p in psutil.process_iter(["cmdline", "pid"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if ("rayx.node_main" in cmd or "rayx.fork_server" in cmd) and containing in cmd:
            found.append(p)
    return found


def rayx_segments() -> list[str]:
    return [n for n in os.listdir(SHM) if n.startswith("rayx-")]


def stray_loky() -> list[str]:
    """loky processes and /dev/shm entries left by rayx workers, not by this test process:
    scikit-learn's loky use inside a task must end with the worker."""
    mine = {p.pid for p in psutil.Process().children(recursive=True)}
    procs = [f"pid {p.pid}" for p in psutil.process_iter(["cmdline"])
             if "joblib.externals.loky" in " ".join(p.info["cmdline"] or []) and p.pid not in mine]
    created_by = (re.match(r"(?:sem\.loky-|joblib_memmapping_folder_)(\d+)[-_]", n)
                  for n in os.listdir(SHM))
    files = [m.string for m in created_by if m and m.group(1) != str(os.getpid())]
    return procs + files


def wait_for(condition, timeout: float = 10.0, interval: float = 0.02, what: str = ""):
    """Poll `condition` until it returns a truthy value; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what or condition}")
        time.sleep(interval)


HARD_DEADLINE_GRACE = 60.0  # seconds past a test's pytest-timeout before the run is ended


def _end_the_run(config, nodeid: str) -> None:
    capture = config.pluginmanager.getplugin("capturemanager")
    if capture is not None:
        capture.suspend_global_capture(in_=True)  # so what follows reaches the terminal
    sys.stderr.write(f"\n{nodeid} is still stuck {HARD_DEADLINE_GRACE:.0f} s after its timeout "
                     "(a cleanup that waits forever): ending the test run\n")
    faulthandler.dump_traceback(all_threads=True)
    os._exit(3)


@pytest.fixture(autouse=True)
def hard_deadline(request):
    """pytest-timeout fails a stuck test by raising in it; if its cleanup then blocks too (an
    executor's shutdown waiting on a call that never ends), end the run instead of stalling."""
    marker = request.node.get_closest_marker("timeout")
    limit = marker.args[0] if marker and marker.args else request.config.getini("timeout")
    timer = threading.Timer(float(limit or 120) + HARD_DEADLINE_GRACE, _end_the_run,
                            args=(request.config, request.node.nodeid))
    timer.daemon = True
    timer.start()
    yield
    timer.cancel()


_test_starts: list[tuple[float, str]] = []  # (wall time, test id), for naming a leak's origin


def pytest_runtest_setup(item) -> None:
    _test_starts.append((time.time(), item.nodeid))


def _describe(procs: list[psutil.Process]) -> str:
    """pid, parent, state, age, the test that was running when it started, and its command line
    (the session directory names the cluster); each is also asked to dump its stacks (SIGUSR2)."""
    lines = []
    for p in procs:
        try:
            with p.oneshot():
                born, info = p.create_time(), (p.ppid(), p.status(), " ".join(p.cmdline()))
            p.send_signal(signal.SIGUSR2)
        except psutil.Error:
            continue
        during = [nodeid for start, nodeid in _test_starts if start <= born]
        lines.append(f"pid {p.pid} ppid {info[0]} {info[1]}, {time.time() - born:.0f} s old, "
                     f"started during {during[-1] if during else 'setup'}: {info[2][-240:]}")
    time.sleep(0.5)  # let the stack dumps reach stderr before the report
    return "\n".join(lines)


def _check_no_leftovers(before: set[int], shm_before: set[str], scope: str) -> None:
    """Shut down a cluster still running, then fail if rayx processes or segments remain."""
    if rayx.is_initialized():
        rayx.shutdown()
    deadline = time.monotonic() + 15
    while (left := [p for p in rayx_processes() if p.pid not in before]):
        if time.monotonic() > deadline:
            pytest.fail(f"rayx processes outlived {scope} by 15 s:\n{_describe(left)}")
        time.sleep(0.02)
    wait_for(lambda: not set(rayx_segments()) - shm_before, 15,
             what=f"rayx shared-memory segments of {scope} to be removed")


@pytest.fixture(scope="session", autouse=True)
def no_leaks():
    """Fail the run if rayx processes or shared-memory segments outlive the tests."""
    before = {p.pid for p in rayx_processes()}
    shm_before = set(rayx_segments())
    loky_before = set(stray_loky())
    yield
    _check_no_leftovers(before, shm_before, "the test session")
    wait_for(lambda: not set(stray_loky()) - loky_before, 15,
             what="loky processes and semaphores of rayx workers to be removed")


@pytest.fixture(scope="module", autouse=True)
def no_leaks_in_module(request):
    """The same check after each module, so that a leak is reported where it happened."""
    before = {p.pid for p in rayx_processes()}
    shm_before = set(rayx_segments())
    yield
    _check_no_leftovers(before, shm_before, request.module.__name__)


@pytest.fixture(scope="module")
def rayx_cluster():
    """A local cluster of 2 CPUs and 4 virtual GPUs for the tests of one module."""
    if rayx.is_initialized():
        rayx.shutdown()
    info = rayx.init(num_cpus=2, num_gpus=4, resources={"custom": 2.0},
                     object_store_memory=256 * 1024 * 1024)
    yield info
    rayx.shutdown()


@pytest.fixture
def fresh_cluster():
    """Factory for a cluster with test-specific settings; shut down after the test."""
    started = []

    def start(**kwargs):
        if rayx.is_initialized():
            rayx.shutdown()
        info = rayx.init(**kwargs)
        started.append(info)
        return info

    yield start
    rayx.shutdown()
